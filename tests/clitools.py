"""Helpers shared by the safety tests (issue 10): run main.py as a user would and
check that a refusal is exactly one `error:` line, with no traceback."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import main

ROOT = Path(__file__).resolve().parents[1]


def cli(capsys, *argv):
    """main.main in-process: (exit code, stdout, stderr); never a traceback."""
    try:
        code = main.main([str(a) for a in argv])
    except SystemExit as e:  # argparse rejects a bad value before main's handler
        code = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, out + err
    return code, out, err


def refused(code, err, *words) -> str:
    """A non-zero exit with exactly one `error:` line that mentions every word."""
    assert code not in (0, None), err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
    return lines[0]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root with the hash of its content."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def process(*argv) -> tuple[int, str, str]:
    """main.py in a child process, as a user runs it: a path that is not UTF-8 is printed
    with the real streams' error handlers (pytest's capture streams refuse it)."""
    r = subprocess.run([sys.executable, "main.py", *map(str, argv)], cwd=ROOT, capture_output=True)
    out, err = (b.decode("utf-8", "backslashreplace") for b in (r.stdout, r.stderr))
    assert "Traceback" not in out + err, out + err
    return r.returncode, out, err


def quiet(*argv) -> int:
    try:
        return main.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def images(folder: Path, n: int, size: int = 32, ext: str = ".png") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(folder / f"img_{i}{ext}")
    return folder
