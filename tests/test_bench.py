"""python -m tools.bench --quick end to end: every figure is produced and finite (speed itself is
never asserted; that is what the benchmark is for)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_quick_produces_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "tools.bench", "--quick", "--device", "cpu", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {row["name"]: row for row in json.loads(out.read_text())["rows"]}
    expected = ("UNet forward", "UNet training step", "sampling", "sampling, s per image: DPM-Solver++", "guided DDIM step",
                "FID features", "DCGAN training step 256", "DCGAN training step 64", "data: images/s", "peak memory",
                "data wait")
    for prefix in expected:
        row = next((v for k, v in rows.items() if k.startswith(prefix)), None)
        assert row is not None, f"no row for {prefix}: {list(rows)}"
        assert row["ours"] is not None and math.isfinite(row["ours"]) and row["ours"] > 0, row
    unet = next(v for k, v in rows.items() if k.startswith("UNet forward"))
    if unet["reference"] is not None:  # diffusers installed: the same weights give the same output
        assert float(unet["note"].split("=")[1]) < 1e-4
    sampling = next(v for k, v in rows.items() if k.startswith("sampling"))
    assert sampling["ratio"] > 1  # DDIM's 50 network calls cost less than DDPM's 1000
    assert not any(k.startswith("torch.compile") for k in rows)  # only with --compile (minutes of compiling)
