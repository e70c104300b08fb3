"""data.py, extract.py and phantoms.py: NIH extraction with patient-level splits, image
decoding, the cache, and the synthetic phantoms.

Tests on the real NIH files use the nih_dir / nih64_dir fixtures (skipped when
../shared/data is absent); everything else builds a tiny NIH-like release in
tmp_path, so the suite runs anywhere.
"""

import csv
import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from tools import extract
import main
from tools import phantoms
from plumbing.configs import CLIError

ROOT = Path(__file__).resolve().parents[1]
# The official header: 9 names, but a plain CSV split gives 11 fields, like every row.
NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")


def run_cli(capsys, *argv):
    """main.main in-process: (exit code, stdout, stderr)."""
    try:
        code = main.main([str(a) for a in argv])
    except SystemExit as e:  # argparse rejects a bad argument value before main's handler
        code = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def read_manifest(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def check_layout(out: Path, size: int) -> list[dict]:
    """Manifest columns, balance per split, patient-disjoint splits, and every file decodes at size."""
    rows = read_manifest(out)
    assert list(rows[0]) == ["image", "class", "split", "patient_id", "source"]
    patients = {}
    for split in data.SPLITS:
        n = {c: sum(r["split"] == split and r["class"] == c for r in rows) for c in data.CLASSES}
        assert n["infiltration"] == n["no_finding"], (split, n)
        patients[split] = {r["patient_id"] for r in rows if r["split"] == split}
    assert not patients["train"] & patients["validation"]
    assert not patients["train"] & patients["test"]
    assert not patients["validation"] & patients["test"]
    for r in rows:
        assert r["image"] == f"{data.SPLIT_DIRS[r['split']]}/{r['class']}/{Path(r['image']).name}"
        with Image.open(out / r["image"]) as im:
            assert im.size == (size, size) and im.mode == "L"
            im.load()
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*.png")}
    assert on_disk == {r["image"] for r in rows}  # the folders hold exactly the manifest
    return rows


def fake_release(tmp_path: Path, n_per_class=12, patient_col=True, gz=False) -> tuple[Path, Path]:
    """A tiny NIH-like release: CSV (official header) + images_001/images/*.png.
    Mostly two images per patient; patient 7 has one image of each class; some
    'Effusion' rows and rows without a file on disk."""
    images = tmp_path / "release" / "images_001" / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = [NIH_HEADER if patient_col else "Unnamed: 0,Image Index,Finding Labels"]
    k = 0
    for cls, label in (("infiltration", "Effusion|Infiltration"), ("no_finding", "No Finding")):
        for i in range(n_per_class):
            patient = 1 + (k + 1) // 2
            name = f"{patient:08d}_{(k + 1) % 2:03d}.png"
            k += 1
            lines.append(f"{name},{label},0,{patient},50,M,PA,2500,2048,0.14,0.14" if patient_col
                         else f"{k},{name},{label}")
            Image.fromarray(phantoms.make_phantom(rng, 80, cls == "infiltration")[:, :70]).save(images / name)
    lines.append("00009998_000.png,Effusion,0,9998,50,F,AP,2500,2048,0.14,0.14" if patient_col
                 else f"{k + 1},00009998_000.png,Effusion")
    lines.append("00009999_000.png,Infiltration,0,9999,50,F,AP,2500,2048,0.14,0.14" if patient_col
                 else f"{k + 2},00009999_000.png,Infiltration")  # listed, not downloaded
    text = "\n".join(lines) + "\n"
    csv_path = tmp_path / ("meta.csv.gz" if gz else "meta.csv")
    if gz:
        with gzip.open(csv_path, "wt") as f:
            f.write(text)
    else:
        csv_path.write_text(text)
    return csv_path, tmp_path / "release"


# --------------------------------------------------------------------------- the real NIH metadata and images


def test_dry_run_on_full_csv_reproduces_published_counts(nih_dir, capsys):
    csv_path = nih_dir / "Data_Entry_2017_v2020.csv.gz"
    code, out, _ = run_cli(capsys, "extract", "--csv", csv_path, "--dry-run", "--json")
    assert code == 0
    s = last_json(out)
    assert s["rows"] == 112_120
    assert s["candidates"] == {"infiltration": 19_894, "no_finding": 60_361}
    for split in data.SPLITS:
        assert s["counts"][split]["infiltration"] == s["counts"][split]["no_finding"] > 0
    assert s["total"] == 2 * sum(s["counts"][sp]["infiltration"] for sp in data.SPLITS)
    frac = s["counts"]["train"]["infiltration"] / (s["total"] / 2)
    assert 0.65 < frac < 0.75

    rows, _ = extract.read_metadata(csv_path)
    cfg = extract.ExtractConfig(csv=csv_path, images=None, out=None, infiltration_only=True, dry_run=True)
    selected, summary = extract.plan(rows, cfg, None, None)
    assert summary["candidates"] == {"infiltration": 9_547, "no_finding": 60_361}
    split_of = {}
    for row, _, split in selected:  # patient-disjoint, with 5,513 patients that have both classes
        assert split_of.setdefault(row.patient, split) == split


def test_real_extract_is_balanced_patient_disjoint_and_reused(nih_dir, tmp_path, capsys):
    out = tmp_path / "nih"
    argv = ["extract", "--csv", nih_dir / "Data_Entry_2017_v2020.csv.gz", "--images", nih_dir,
            "--out", out, "--per-class", 20, "--size", 64, "--json"]
    code, stdout, _ = run_cli(capsys, *argv)
    assert code == 0
    s = last_json(stdout)
    assert s["total"] == 40 and s["written"] == 40
    assert s["skipped"]["not_on_disk"] > 79_000  # the CSV lists the whole release, 300 files are here
    assert json.loads((out / "summary.json").read_text())["counts"] == s["counts"]
    rows = check_layout(out, 64)
    assert all(Path(r["source"]).is_file() for r in rows)

    code, stdout, _ = run_cli(capsys, *argv)  # the same run again: nothing to decode
    s2 = last_json(stdout)
    assert (s2["written"], s2["reused"], s2["counts"]) == (0, 40, s["counts"])


def test_rgba_release_images_become_their_grey_content(nih_dir):
    rgba = [p for p in sorted((nih_dir / "images_001" / "images").glob("*.png")) if Image.open(p).mode == "RGBA"]
    assert rgba, "the sample release has a few RGBA images"
    for p in rgba:
        rgb = np.asarray(Image.open(p).convert("RGB")).astype(int)
        grey = data.load_grey(p).astype(int)
        assert grey.shape == rgb.shape[:2]
        assert np.abs(grey - rgb[..., 0]).max() <= 1  # content is grey: R = G = B = the value we keep
        assert np.abs(grey - rgb.mean(-1)).max() <= 1


def test_nih_64px_set_loads(nih64_dir):
    s = data.load_folder(nih64_dir / "images", 32, progress=False)
    assert len(s) == 1000 and s.images.shape == (1000, 32, 32) and s.images.dtype == torch.uint8
    assert not s.skipped and (s.labels == -1).all()
    x = data.to_rgb_range(s.images[:4])
    assert x.shape == (4, 3, 32, 32) and x.min() >= -1 and x.max() <= 1


# --------------------------------------------------------------------------- extraction on a tiny fake release


def test_fake_release_extract_split_and_rerun(tmp_path, capsys):
    csv_path, images = fake_release(tmp_path, gz=True)
    out = tmp_path / "out"
    code, stdout, _ = run_cli(capsys, "extract", "--csv", csv_path, "--images", images, "--out", out,
                              "--size", 32, "--seed", 3, "--json")
    assert code == 0
    s = last_json(stdout)
    assert s["candidates"] == {"infiltration": 13, "no_finding": 12}
    assert s["skipped"]["not_on_disk"] == 1 and s["skipped"]["other_findings"] == 1
    rows = check_layout(out, 32)
    assert {r["patient_id"] for r in rows} <= {str(p) for p in range(1, 14)}

    # Output inside the image root: its PNGs (same names) must not be taken for sources.
    inner = images / "derived"
    code, stdout, _ = run_cli(capsys, "extract", "--csv", csv_path, "--images", images, "--out", inner,
                              "--size", 32, "--seed", 3, "--json")
    assert last_json(stdout)["counts"] == s["counts"]
    assert all("derived" not in r["source"] for r in read_manifest(inner))

    # Another seed into the same folder: stale images of the first selection are removed.
    code, stdout, _ = run_cli(capsys, "extract", "--csv", csv_path, "--images", images, "--out", out,
                              "--size", 32, "--seed", 4, "--json")
    check_layout(out, 32)


def test_selection_ignores_csv_order_and_derives_patients(tmp_path):
    csv_path, _ = fake_release(tmp_path, patient_col=False)  # like the seed's final_data.csv
    rows, _ = extract.read_metadata(csv_path)
    assert (rows[0].image, rows[0].patient) == ("00000001_001.png", "1")
    cfg = extract.ExtractConfig(csv=csv_path, images=None, out=None, seed=5, dry_run=True)
    a, _ = extract.plan(rows, cfg, None, None)
    b, _ = extract.plan(list(reversed(rows)), cfg, None, None)
    assert [(r.image, c, s) for r, c, s in a] == [(r.image, c, s) for r, c, s in b]
    cfg.per_class = 5
    capped, summary = extract.plan(rows, cfg, None, None)
    assert sum(c == "infiltration" for _, c, _ in capped) <= 5 and summary["skipped"]["per_class_cap"] > 0


def test_official_test_list(tmp_path):
    csv_path, _ = fake_release(tmp_path)
    rows, _ = extract.read_metadata(csv_path)
    listed = {"00000003_000.png", "00000003_001.png", "00000007_000.png"}  # patient 7's no_finding image leaks
    cfg = extract.ExtractConfig(csv=csv_path, images=None, out=None, dry_run=True)
    selected, summary = extract.plan(rows, cfg, None, listed)
    assert summary["skipped"]["patient_in_official_test"] == 1
    assert {r.image for r, _, s in selected if s == "test"} <= listed
    assert all(r.patient not in {"3", "7"} for r, _, s in selected if s != "test")


def test_corrupt_and_16bit_images(tmp_path, capsys):
    csv_path, images = fake_release(tmp_path)
    folder = images / "images_001" / "images"
    bad = folder / "00000002_000.png"  # an infiltration image
    bad.write_bytes(bad.read_bytes()[:100])  # truncated download
    wide = (np.arange(70 * 80).reshape(80, 70) * 11 % 65536).astype(np.uint16)
    Image.fromarray(wide).save(folder / "00000010_001.png")  # a no_finding image
    assert Image.open(folder / "00000010_001.png").mode.startswith("I;16")
    grey = data.load_grey(folder / "00000010_001.png")
    assert np.abs(grey.astype(int) - np.round(wide / 257.0)).max() <= 1

    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="00000002_000.png"):
        code, stdout, _ = run_cli(capsys, "extract", "--csv", csv_path, "--images", images, "--out", out,
                                  "--size", 32, "--json")
    assert code == 0
    s = last_json(stdout)
    assert s["skipped"]["unreadable"] == 1 and any("00000002_000.png" in f for f in s["unreadable_files"])
    rows = check_layout(out, 32)  # still balanced after the loss
    assert "00000002_000.png" not in {Path(r["image"]).name for r in rows}


@pytest.mark.parametrize("case", ["missing_csv", "no_columns", "empty_root", "out_is_file", "phantoms_and_csv",
                                  "no_images_arg", "bad_size"])
def test_bad_input_is_one_line_error(tmp_path, capsys, case):
    csv_path, images = fake_release(tmp_path)
    out = tmp_path / "out"
    argv = ["extract", "--csv", csv_path, "--images", images, "--out", out]
    expect = {"missing_csv": "file not found", "no_columns": "'Finding Labels'", "empty_root": "no images",
              "out_is_file": "is a file", "phantoms_and_csv": "cannot be combined", "no_images_arg": "--images",
              "bad_size": "--size"}[case]
    if case == "missing_csv":
        argv[2] = tmp_path / "nope.csv"
    elif case == "no_columns":
        (tmp_path / "bad.csv").write_text("Image Index,Labels\na.png,No Finding\n")
        argv[2] = tmp_path / "bad.csv"
    elif case == "empty_root":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "notes.txt").write_text("not an image")
        argv[4] = tmp_path / "empty"
    elif case == "out_is_file":
        out.write_text("x")
    elif case == "phantoms_and_csv":
        argv += ["--phantoms", "10"]
    elif case == "no_images_arg":
        argv = argv[:3] + argv[5:]
    elif case == "bad_size":
        argv += ["--size", "0"]
    code, out_text, err = run_cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], err


def test_error_from_a_real_process_has_no_traceback(tmp_path):
    (tmp_path / "f").write_text("x")
    r = subprocess.run([sys.executable, str(ROOT / "main.py"), "extract", "--phantoms", "4", "--out",
                        str(tmp_path / "f")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"error: --out {tmp_path / 'f'} is a file, not a folder"


# --------------------------------------------------------------------------- loading and the cache


def test_load_split_and_cache(tmp_path, capsys):
    out = tmp_path / "ph"
    assert run_cli(capsys, "extract", "--phantoms", 20, "--out", out, "--size", 32)[0] == 0
    cache = Path(data.default_cache_dir())
    before = set(cache.glob("*.npz"))
    train = data.load_split(out, "train", 16)
    assert len(train) == 14 and set(train.labels.tolist()) == {0, 1} and train.images.shape[1:] == (16, 16)
    assert len(set(cache.glob("*.npz")) - before) == 1
    again = data.load_split(out, "train", 16)
    assert torch.equal(again.images, train.images) and again.paths == train.paths
    assert len(data.load_split(out, "test", 16, class_name="infiltration")) == 2
    new = set(cache.glob("*.npz")) - before
    for f in new:  # a damaged cache file is rebuilt, not trusted
        f.write_bytes(b"garbage")
    assert torch.equal(data.load_split(out, "train", 16).images, train.images)
    with pytest.raises(CLIError, match="validation_data"):
        data.load_split(tmp_path, "validation", 16)
    with pytest.raises(CLIError, match="unknown split"):
        data.load_split(out, "dev", 16)


def test_cache_key_follows_file_content(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 20), 40 * i, np.uint8)).save(folder / f"{i}.png")
    assert data.load_folder(folder, 8, progress=False).images[2, 0, 0] == 80
    Image.fromarray(np.full((20, 20), 200, np.uint8)).save(folder / "2.png")  # rewritten in place
    assert data.load_folder(folder, 8, progress=False).images[2, 0, 0] == 200


# --------------------------------------------------------------------------- phantoms


def test_phantoms_deterministic_in_range_and_varied():
    a = phantoms.make_phantom(np.random.default_rng(7), 64, True)
    b = phantoms.make_phantom(np.random.default_rng(7), 64, True)
    assert a.dtype == np.uint8 and a.shape == (64, 64) and np.array_equal(a, b)
    assert 20 < a.std() and a.min() < 40 and a.max() > 180  # dark lungs/background, bright bone and abdomen
    others = [phantoms.make_phantom(np.random.default_rng(s), 64, False) for s in range(3)]
    assert not np.array_equal(others[0], others[1])
    for size in (32, 256):
        assert phantoms.make_phantom(np.random.default_rng(0), size, False).shape == (size, size)


def test_write_phantoms_layout_and_rerun(tmp_path, capsys):
    out = tmp_path / "ph"
    code, stdout, _ = run_cli(capsys, "extract", "--phantoms", 21, "--out", out, "--size", 32, "--seed", 2, "--json")
    s = last_json(stdout)
    assert code == 0 and s["total"] == 21
    assert s["candidates"] == {"infiltration": 10, "no_finding": 11}
    rows = read_manifest(out)
    assert len({r["patient_id"] for r in rows}) == 21
    assert {r["split"] for r in rows} == set(data.SPLITS)
    first = {r["image"]: np.asarray(Image.open(out / r["image"])) for r in rows}

    again = phantoms.write_phantoms(21, tmp_path / "ph2", size=32, seed=2, progress=False)
    assert again["counts"] == s["counts"]
    assert all(np.array_equal(first[k], np.asarray(Image.open(tmp_path / "ph2" / k))) for k in first)
    assert phantoms.write_phantoms(21, out, size=32, seed=2, progress=False)["reused"] == 21
    smaller = phantoms.write_phantoms(10, out, size=32, seed=2, progress=False)
    assert smaller["removed_stale"] > 0 and len(list(out.rglob("*.png"))) == 10
    check_layout(out, 32)


def test_phantom_classes_are_linearly_separable_at_32px():
    n = 300  # per class
    x = np.stack([phantoms.make_phantom(np.random.default_rng([1, i]), 32, i % 2 == 1) for i in range(2 * n)])
    x = torch.tensor(x.reshape(2 * n, -1), dtype=torch.float32) / 255
    y = torch.arange(2 * n, dtype=torch.float32) % 2
    train, test = slice(0, 400), slice(400, None)
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-3
    z = (x - mu) / sd
    w = torch.zeros(z.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=100)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z[train] @ w + b, y[train]) + 1e-2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    accuracy = ((z[test] @ w + b > 0).float() == y[test]).float().mean().item()
    assert accuracy > 0.7, accuracy  # chance is 0.5


def test_xray_dataset_gives_each_model_family_its_input(tmp_path):
    phantoms.write_phantoms(6, tmp_path / "ph", size=32, seed=0, progress=False)
    grey = data.XRayDataset(tmp_path / "ph", 32)
    rgb = data.XRayDataset(tmp_path / "ph", 32, rgb=True)
    x, y = grey[0]
    assert len(grey) == 6 and x.shape == (1, 32, 32) and y in (0, 1)
    assert -1 <= x.min() and x.max() <= 1
    x3, _ = rgb[0]
    assert x3.shape == (3, 32, 32) and torch.equal(x3[0], x[0]) and torch.equal(x3[2], x[0])
    assert sorted(int(grey[i][1]) for i in range(6)) == [0, 0, 0, 1, 1, 1]
