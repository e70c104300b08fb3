"""Nothing lost, nothing silently wrong (issue 10): the data and evaluation cases,
each on tiny phantoms or a tiny NIH-like release (extract, fid, classify,
memorization). Every failure must be one line on stderr starting "error:", with
a non-zero exit code and no traceback, and no file the project did not write
may ever disappear or change.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import fid
import main
from tools import phantoms

from clitools import cli, images, process, quiet, refused, snapshot
from plumbing import files
from tools import layout

TEMPORARY = layout._TEMPORARY  # the name pattern of an atomic write's temporary file


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if TEMPORARY.fullmatch(p.name)]


def release(folder: Path, n: int = 40) -> tuple[Path, Path]:
    """A tiny NIH-like release: a CSV and n PNGs (one patient each, classes alternating)."""
    pics = folder / "images_001" / "images"
    pics.mkdir(parents=True)
    rng = np.random.default_rng(1)
    rows = ["Image Index,Finding Labels,Follow-up #,Patient ID"]
    for i in range(1, n + 1):
        name = f"{i:08d}_000.png"
        rows.append(f"{name},{'Infiltration' if i % 2 else 'No Finding'},0,{i}")
        Image.fromarray(phantoms.make_phantom(rng, 40, i % 2 == 1)).save(pics / name)
    (folder / "entries.csv").write_text("\n".join(rows) + "\n")
    return folder / "entries.csv", folder


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    """A small classifier checkpoint trained for one epoch on 24 phantoms at 32 px."""
    root = tmp_path_factory.mktemp("cls")
    assert quiet("extract", "--phantoms", 24, "--out", root / "data", "--size", 32) == 0
    assert quiet("classify", "--data", root / "data", "--size", 32, "--epochs", 1, "--device", "cpu",
                 "--save", root / "classifier.pt") == 0
    return root / "classifier.pt"


# --------------------------------------------------------------------------- 2: extract deletes only what it wrote


@pytest.mark.parametrize("where", ["train_data/infiltration", "test_data", "validation_data/no_finding/sub"])
def test_2_extract_never_deletes_images_it_did_not_write(tmp_path, capsys, where):
    mine = images(tmp_path / "d" / where, 3, ext=".jpg" if "sub" in where else ".png")
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "extract", "--phantoms", 4, "--out", tmp_path / "d", "--size", 32)
    refused(code, err, "did not write", "img_0")
    assert snapshot(tmp_path) == before and len(list(mine.iterdir())) == 3
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [where.split("/")[0]]  # nothing written


def test_2_phantoms_and_nih_never_replace_each_other(tmp_path, capsys):
    csv_path, root = release(tmp_path / "release")
    nih, ph = tmp_path / "nih", tmp_path / "ph"
    assert quiet("extract", "--csv", csv_path, "--images", root, "--out", nih, "--size", 32) == 0
    assert quiet("extract", "--phantoms", 10, "--out", ph, "--size", 32) == 0
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "extract", "--phantoms", 4, "--out", nih, "--size", 32)
    refused(code, err, "NIH images", "synthetic phantoms", "another --out")
    code, _, err = cli(capsys, "extract", "--csv", csv_path, "--images", root, "--out", ph, "--size", 32)
    refused(code, err, "NIH images", "synthetic phantoms", "another --out")
    assert snapshot(tmp_path) == before


def test_2_phantoms_do_not_replace_a_real_extract(tmp_path, capsys, nih_dir):
    out = tmp_path / "nih"
    assert quiet("extract", "--csv", nih_dir / "Data_Entry_2017_v2020.csv.gz", "--images", nih_dir,
                 "--out", out, "--size", 32, "--per-class", 10) == 0
    before = snapshot(out)
    code, _, err = cli(capsys, "extract", "--phantoms", 4, "--out", out, "--size", 32)
    refused(code, err, "another --out")
    assert snapshot(out) == before


def test_2_rerun_reuses_and_another_seed_replaces_what_the_manifest_lists(tmp_path, capsys):
    out, fresh = tmp_path / "d", tmp_path / "fresh"
    assert quiet("extract", "--phantoms", 12, "--out", out, "--size", 32, "--seed", 0) == 0
    mine = {out / "notes.txt": "mine", out / "train_data" / "infiltration" / "notes.txt": "mine too"}
    for path, text in mine.items():
        path.write_text(text)
    images(out, 1)  # an image outside the split folders is not read with the data set: left alone

    code, stdout, _ = cli(capsys, "extract", "--phantoms", 12, "--out", out, "--size", 32, "--json")
    s = json.loads(stdout.splitlines()[-1])
    assert (s["written"], s["reused"], s["removed_stale"]) == (0, 12, 0)

    # Another seed: the same file names, new pixels; nothing of the old set may be reused.
    code, stdout, _ = cli(capsys, "extract", "--phantoms", 12, "--out", out, "--size", 32, "--seed", 1, "--json")
    s = json.loads(stdout.splitlines()[-1])
    assert code == 0 and (s["written"], s["reused"], s["removed_stale"]) == (12, 0, 0)
    assert quiet("extract", "--phantoms", 12, "--out", fresh, "--size", 32, "--seed", 1) == 0
    assert {k: v for k, v in snapshot(out).items() if k.endswith(".png") and "_data" in k} == \
        {k: v for k, v in snapshot(fresh).items() if k.endswith(".png")}

    # Fewer images: exactly the files the previous manifest lists and the new one does not are removed.
    code, stdout, _ = cli(capsys, "extract", "--phantoms", 10, "--out", out, "--size", 32, "--seed", 1, "--json")
    s = json.loads(stdout.splitlines()[-1])
    old, new = ({e.image for e in phantoms.phantom_plan(n, 1)} for n in (12, 10))
    assert (s["written"], s["reused"], s["removed_stale"]) == (len(new - old), len(new & old), len(old - new)) \
        and len(old - new) >= 2
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png") if "_data" in str(p)) == \
        sorted(r["image"] for r in layout.read_manifest(out))
    assert all(path.read_text() == text for path, text in mine.items()) and (out / "img_0.png").is_file()
    assert not (out / layout.PENDING).exists() and not temporaries(out)


def test_2_an_interrupted_extract_is_resumed_and_never_reuses_half_replaced_files(tmp_path, capsys, monkeypatch):
    out, fresh = tmp_path / "d", tmp_path / "fresh"
    render = layout._render
    assert quiet("extract", "--phantoms", 12, "--out", out, "--size", 32, "--seed", 0, "--workers", 1) == 0
    calls = []

    def stopped_after_five(job):  # Ctrl-C while the sixth image is being written
        calls.append(job)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return render(job)

    monkeypatch.setattr(layout, "_render", stopped_after_five)
    assert quiet("extract", "--phantoms", 12, "--out", out, "--size", 32, "--seed", 1, "--workers", 1) == 130
    assert (out / layout.PENDING).is_file() and not temporaries(out)
    monkeypatch.setattr(layout, "_render", render)
    # Back to seed 0: five files already hold seed 1's pixels, and which ones the stopped run
    # cannot have recorded, so every file it was replacing is redrawn, none reused.
    code, stdout, _ = cli(capsys, "extract", "--phantoms", 12, "--out", out, "--size", 32, "--json", "--workers", 1)
    s = json.loads(stdout.splitlines()[-1])
    assert code == 0 and (s["written"], s["reused"]) == (12, 0)
    assert quiet("extract", "--phantoms", 12, "--out", fresh, "--size", 32, "--workers", 1) == 0
    assert {k: v for k, v in snapshot(out).items() if k.endswith(".png")} == \
        {k: v for k, v in snapshot(fresh).items() if k.endswith(".png")}
    assert not (out / layout.PENDING).exists()


def test_2_a_first_extract_stopped_half_way_is_resumed_not_refused(tmp_path, capsys, monkeypatch):
    out = tmp_path / "d"
    render, calls = layout._render, []

    def stopped_after_three(job):
        calls.append(job)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return render(job)

    monkeypatch.setattr(layout, "_render", stopped_after_three)
    assert quiet("extract", "--phantoms", 10, "--out", out, "--size", 32, "--workers", 1) == 130
    monkeypatch.setattr(layout, "_render", render)
    code, stdout, _ = cli(capsys, "extract", "--phantoms", 10, "--out", out, "--size", 32, "--json")
    s = json.loads(stdout.splitlines()[-1])
    assert code == 0 and (s["written"], s["reused"]) == (7, 3)


def test_2_a_hand_edited_manifest_cannot_make_extract_delete_anything_else(tmp_path, capsys):
    out = tmp_path / "d"
    assert quiet("extract", "--phantoms", 10, "--out", out, "--size", 32) == 0
    victims = [images(tmp_path, 1, ext=".png") / "img_0.png", images(out, 1, ext=".png") / "img_0.png"]
    with open(out / "manifest.csv", "a") as f:
        f.write("../img_0.png,infiltration,train,99,phantom:seed=0:index=99\n")
        f.write("train_data/infiltration/../../../img_0.png,infiltration,train,98,phantom:seed=0:index=98\n")
        f.write("img_0.png,infiltration,train,97,phantom:seed=0:index=97\n")
    before = {v: v.read_bytes() for v in victims}
    assert quiet("extract", "--phantoms", 4, "--out", out, "--size", 32) == 0
    assert all(v.read_bytes() == b for v, b in before.items())


def test_2_odd_things_in_the_way_are_one_line_refusals(tmp_path, capsys):
    out = tmp_path / "d"
    out.mkdir()
    (out / "summary.json").write_text("{}")  # not ours: no manifest beside it
    code, _, err = cli(capsys, "extract", "--phantoms", 4, "--out", out, "--size", 32)
    refused(code, err, "manifest.csv")
    (out / "summary.json").unlink()
    (out / "manifest.csv").write_text("name,size\nmine.png,3\n")  # a manifest of something else
    code, _, err = cli(capsys, "extract", "--phantoms", 4, "--out", out, "--size", 32)
    refused(code, err, "manifest.csv")
    (out / "manifest.csv").unlink()
    (out / "train_data").write_text("a file where a folder goes")
    code, _, err = cli(capsys, "extract", "--phantoms", 4, "--out", out, "--size", 32)
    refused(code, err, "train_data", "not a folder")
    code, _, err = cli(capsys, "extract", "--phantoms", 4, "--out", out / "train_data" / "x", "--size", 32)
    refused(code, err, "--out", "not a folder")
    assert sorted(p.name for p in out.iterdir()) == ["train_data"]


# --------------------------------------------------------------------------- 7: output paths checked before the work


def test_7_memorization_out_and_classify_save_are_checked_before_any_work(tmp_path, capsys, classifier):
    d = classifier.parent / "data"
    f = tmp_path / "a_file"
    f.write_text("mine")
    code, _, err = cli(capsys, "memorization", "--train", d, "--synthetic", d / "test_data", "--out", f)
    refused(code, err, "--out", "not a folder")
    code, _, err = cli(capsys, "memorization", "--train", d, "--synthetic", d / "test_data", "--out", f / "sub")
    refused(code, err, "--out", "not a folder")
    for save in (tmp_path, f / "classifier.pt", f):  # a folder; a parent that is a file; a file that is not ours
        code, _, err = cli(capsys, "classify", "--data", d, "--size", 32, "--epochs", 1, "--device", "cpu",
                           "--save", save)
        refused(code, err, "--save")
        assert "epoch" not in err  # refused before training
    assert f.read_text() == "mine"
    # a classifier checkpoint of this project may be replaced
    again = tmp_path / "c.pt"
    again.write_bytes(classifier.read_bytes())
    assert cli(capsys, "classify", "--data", d, "--size", 32, "--epochs", 1, "--device", "cpu",
               "--save", again)[0] == 0


# --------------------------------------------------------------------------- 8: a full disk during extract


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_8_disk_full_while_rendering_is_one_line_and_leaves_no_temporaries(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Image.Image, "save", _enospc)
    out = tmp_path / "d1"
    code, _, err = cli(capsys, "extract", "--phantoms", 4, "--out", out, "--size", 32, "--workers", 1)
    refused(code, err, "no space left on the device holding", "while writing phantom_")
    assert not temporaries(out)
    # in worker processes (a pool starts at 64 images): the worker's error reaches the user as one line
    out = tmp_path / "d2"
    code, _, err = cli(capsys, "extract", "--phantoms", 64, "--out", out, "--size", 8, "--workers", 2)
    refused(code, err, "no space left on the device holding", "while writing phantom_")
    assert not temporaries(out)
    # no file can even be created (tempfile.mkstemp fails)
    monkeypatch.undo()
    monkeypatch.setattr(files.tempfile, "mkstemp", _enospc)
    code, _, err = cli(capsys, "extract", "--phantoms", 4, "--out", tmp_path / "d3", "--size", 32, "--workers", 1)
    refused(code, err, "no space left on the device holding", "while writing")


@pytest.mark.parametrize("victim", ["manifest.csv", "summary.json"])
def test_8_disk_full_while_writing_the_manifest_or_summary(tmp_path, capsys, monkeypatch, victim):
    out = tmp_path / "d"

    class Full:  # an open() whose writes to the victim's temporary fail as on a full disk
        def __init__(self, file):
            self.file = file

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full_open(path, *args, **kwargs):
        f = open(path, *args, **kwargs)
        return Full(f) if Path(path).name.startswith(f".{victim}.") else f

    monkeypatch.setattr(layout, "open", full_open, raising=False)
    code, _, err = cli(capsys, "extract", "--phantoms", 10, "--out", out, "--size", 32, "--workers", 1)
    refused(code, err, "no space left on the device holding", f"while writing {victim}")
    assert not temporaries(out)
    monkeypatch.undo()  # space freed: the same command finishes, reusing every image
    code, stdout, _ = cli(capsys, "extract", "--phantoms", 10, "--out", out, "--size", 32, "--json")
    assert code == 0 and json.loads(stdout.splitlines()[-1])["reused"] == 10


# --------------------------------------------------------------------------- 12: folder names that are not UTF-8


def latin1(tmp_path: Path, name: bytes = b"caf\xe9") -> Path:
    folder = Path(os.fsdecode(os.fsencode(tmp_path) + b"/" + name))
    try:
        folder.mkdir()
    except (UnicodeEncodeError, OSError):
        pytest.skip("this file system refuses non-UTF-8 names")
    return folder


def test_12_non_utf8_folder_names_load(tmp_path, capsys, classifier):
    latin = latin1(tmp_path)
    images(latin / "infiltration", 6)
    images(latin / "no_finding", 6)
    first = data.load_folder(latin, 16, progress=False)
    again = data.load_folder(latin, 16, progress=False)  # from the cache, keyed by the path's bytes
    assert first.images.shape == (12, 16, 16) and torch.equal(first.images, again.images)
    assert sorted(first.labels.tolist()) == [0] * 6 + [1] * 6 and first.paths == again.paths
    code, out, err = process("memorization", "--train", latin, "--synthetic", latin / "infiltration",
                             "--out", latin / "memo", "--json")
    assert code == 0 and json.loads(out.splitlines()[-1])["n_synthetic"] == 6, err
    weights = latin / "w.pth"
    weights.write_bytes(b"not used")
    assert fid._stats_cache_file(latin, weights).name.endswith(".npz")
    code, out, err = process("fid", latin / "infiltration", latin / "no_finding", "--classifier", classifier,
                             "--inception-weights", latin / "missing.pth", "--json")
    assert code == 0 and json.loads(out.splitlines()[-1])["cxr_n_real"] == 6, err


def test_12_extract_writes_its_manifest_under_non_utf8_names(tmp_path, capsys):
    latin = latin1(tmp_path)
    csv_path, root = release(latin / "release")
    out = latin / "out"
    code, stdout, err = process("extract", "--csv", csv_path, "--images", root, "--out", out, "--size", 32)
    assert code == 0, err
    rows = layout.read_manifest(out)
    assert len(rows) == len(list(out.rglob("*.png"))) > 0
    assert all(Path(r["source"]).is_file() and os.fsencode(r["source"]).startswith(os.fsencode(latin)) for r in rows)
    code, stdout, _ = process("extract", "--csv", csv_path, "--images", root, "--out", out, "--size", 32, "--json")
    s = json.loads(stdout.splitlines()[-1])
    assert (s["written"], s["reused"]) == (0, len(rows))  # the sources read back byte for byte


# --------------------------------------------------------------------------- 13: the metadata CSV


def test_13_a_corrupt_gzip_csv_is_one_line(tmp_path, capsys):
    bad = tmp_path / "Data_Entry.csv.gz"
    bad.write_bytes(gzip.compress(b"Image Index,Finding Labels\n" * 50)[:40] + b"\x00garbage" * 20)
    code, _, err = cli(capsys, "extract", "--csv", bad, "--dry-run")
    refused(code, err, bad.name, "gzip")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("Image Index,Finding Labels\nx.png,Caf\xe9\n".encode("latin-1"))
    code, _, err = cli(capsys, "extract", "--csv", latin, "--dry-run")
    refused(code, err, latin.name)


def test_13_lower_case_labels_blame_the_csv_not_the_images(tmp_path, capsys):
    csv_path, root = release(tmp_path / "release", n=20)
    text = csv_path.read_text().replace("Infiltration", "infiltration").replace("No Finding", "no finding")
    csv_path.write_text(text)
    for extra in ((), ("--images", root)):
        code, _, err = cli(capsys, "extract", "--csv", csv_path, "--dry-run", *extra)
        line = refused(code, err, "case-sensitive", "'infiltration'", "'no finding'", "'Infiltration'")
        assert "--images" not in line


# --------------------------------------------------------------------------- 16: statistics files


def test_16_bad_statistics_files_are_one_line_and_json_stays_valid(tmp_path, capsys):
    mu, sigma = np.zeros(4), np.eye(4)
    np.savez(tmp_path / "good.npz", mu=mu, sigma=sigma, n=np.array(3000))
    np.save(tmp_path / "arr.npy", mu)
    os.replace(tmp_path / "arr.npy", tmp_path / "renamed.npz")
    np.savez(tmp_path / "n.npz", mu=mu, sigma=sigma, n=np.array([1, 2]))
    np.savez(tmp_path / "str.npz", mu=np.array("abc"), sigma=sigma, n=np.array(3000))
    np.savez(tmp_path / "shapes.npz", mu=mu, sigma=np.eye(3))
    np.savez(tmp_path / "dim.npz", mu=np.zeros(3), sigma=np.eye(3), n=np.array(3000))
    np.savez(tmp_path / "features.npz", mu=mu, sigma=sigma, features=np.zeros((5, 3)))
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    expected = {"renamed.npz": ".npy", "n.npz": "n must", "str.npz": "mu must hold numbers",
                "shapes.npz": "do not match", "dim.npz": "dimensions", "features.npz": "features",
                "junk.npz": "cannot read"}
    for bad, words in expected.items():
        code, _, err = cli(capsys, "fid", tmp_path / "good.npz", tmp_path / bad, "--json")
        refused(code, err, words)
    for nan in ({"mu": np.full(4, np.nan), "sigma": sigma}, {"mu": mu, "sigma": np.full((4, 4), np.inf)}):
        np.savez(tmp_path / "nan.npz", **nan, n=np.array(3000))
        code, out, err = cli(capsys, "fid", tmp_path / "good.npz", tmp_path / "nan.npz", "--json")
        refused(code, err, "nan.npz", "NaN or infinite")
        assert "FID" not in out
    code, out, _ = cli(capsys, "fid", tmp_path / "good.npz", tmp_path / "good.npz", "--json")
    assert code == 0 and json.loads(out.splitlines()[-1])["fid"] == 0.0


def test_16_printed_json_is_strict():
    line = main.json_line({"fid": float("nan"), "kid": [float("inf"), 1.5], "n": 3})
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}")) == \
        {"fid": None, "kid": [None, 1.5], "n": 3}


# --------------------------------------------------------------------------- 19: too few phantoms; fid offline


def test_19_a_phantom_set_without_a_test_split_says_so(tmp_path, capsys):
    assert phantoms.min_phantoms() == 10
    counts = layout.count_layout(phantoms.phantom_plan(10))["counts"]
    assert all(n > 0 for split in counts.values() for n in split.values())
    assert quiet("extract", "--phantoms", 4, "--out", tmp_path / "d", "--size", 32) == 0
    code, _, err = cli(capsys, "classify", "--data", tmp_path / "d", "--size", 32, "--epochs", 1)
    refused(code, err, "test split", "empty", "--phantoms 10")
    code, _, err = cli(capsys, "memorization", "--train", tmp_path / "d", "--synthetic", tmp_path / "d")
    refused(code, err, "test split", "empty", "--phantoms 10")
    assert quiet("extract", "--phantoms", 9, "--out", tmp_path / "d9", "--size", 32) == 0  # validation: one class
    code, _, err = cli(capsys, "classify", "--data", tmp_path / "d9", "--size", 32, "--epochs", 1)
    refused(code, err, "validation split", "both classes", "--phantoms 10")


@pytest.mark.parametrize("fails", ["on connect", "while reading"])
def test_19_fid_offline_leaves_no_empty_models_folder(tmp_path, capsys, monkeypatch, fails):
    monkeypatch.setattr(fid, "default_weights_path", lambda: tmp_path / "models" / fid.WEIGHTS_FILE)

    class Response:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def read(self, n):
            raise OSError("connection reset")

    def offline(*a, **k):
        if fails == "on connect":
            raise OSError("offline")
        return Response()

    monkeypatch.setattr(fid.urllib.request, "urlopen", offline)
    a, b = images(tmp_path / "a", 2), images(tmp_path / "b", 2)
    code, _, err = cli(capsys, "fid", a, b)
    refused(code, err, fid.WEIGHTS_FILE)
    assert not (tmp_path / "models").exists()


# --------------------------------------------------------------------------- image formats


def test_other_image_formats_are_read(tmp_path):
    folder = tmp_path / "mixed"
    exts = (".png", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".jpg", ".jpeg", ".PNG", ".TIF")
    for ext in exts:
        images(folder, 1, ext=ext)
        (folder / f"img_0{ext}").rename(folder / f"x{ext.replace('.', '_')}{ext}")
    (folder / "notes.txt").write_text("not an image")
    assert len(data.list_images(folder)) == len(exts)
    s = data.load_folder(folder, 16, progress=False)
    assert s.images.shape == (len(exts), 16, 16) and not s.skipped
    lossless = [i for i, p in enumerate(s.paths) if Path(p).suffix.lower() not in (".jpg", ".jpeg", ".webp")]
    assert len(lossless) == 8 and all(torch.equal(s.images[i], s.images[lossless[0]]) for i in lossless)
    wide = np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)  # 16 bits per pixel
    Image.fromarray(wide).save(tmp_path / "deep.tif")
    Image.fromarray(wide).save(tmp_path / "deep.pgm")
    assert np.array_equal(data.load_grey(tmp_path / "deep.tif"), (wide // 257).astype(np.uint8))
    assert np.array_equal(data.load_grey(tmp_path / "deep.pgm"), (wide // 257).astype(np.uint8))
    only = images(tmp_path / "only_bmp", 2, ext=".bmp")
    assert len(data.load_folder(only, 16, progress=False)) == 2


# --------------------------------------------------------------------------- the property: nothing lost


def test_no_data_command_deletes_or_changes_a_file_it_did_not_write(tmp_path, capsys, classifier):
    work = tmp_path / "w"
    csv_path, root = release(tmp_path / "release")
    assert quiet("extract", "--phantoms", 24, "--out", work / "data", "--size", 32) == 0
    assert quiet("extract", "--csv", csv_path, "--images", root, "--out", work / "nih", "--size", 32) == 0
    sentinels = [work / "keep.txt", work / "data" / "keep.txt", work / "data" / "mine.png",
                 work / "data" / "train_data" / "keep.txt", work / "data" / "test_data" / "no_finding" / "keep.txt",
                 work / "nih" / "keep.txt", work / "nih" / "validation_data" / "infiltration" / "keep.txt",
                 work / "user" / "train_data" / "infiltration" / "mine.png", work / "user" / "keep.txt",
                 work / "cls" / "notes.txt", work / "cls" / "mine.pt", work / "memo" / "notes.txt",
                 work / "fake" / "notes.txt", work / "fake" / "infiltration" / "notes.txt"]
    for s in sentinels:
        s.parent.mkdir(parents=True, exist_ok=True)
        if s.suffix == ".png":
            Image.fromarray(np.full((32, 32), 7, np.uint8)).save(s)
        else:
            s.write_text(f"the user's {s.name}")
    images(work / "fake" / "infiltration", 4)
    images(work / "fake" / "no_finding", 4)
    before = snapshot(work)
    device = ("--device", "cpu")
    calls = [
        ("extract", "--phantoms", 24, "--out", work / "data", "--size", 32),  # a re-run
        ("extract", "--phantoms", 10, "--out", work / "data", "--size", 32, "--seed", 3),  # another data set
        ("extract", "--phantoms", 24, "--out", work / "data", "--size", 64),  # another size
        ("extract", "--phantoms", 10, "--out", work / "user", "--size", 32),  # user images in the way: refused
        ("extract", "--phantoms", 10, "--out", work / "nih", "--size", 32),  # another source: refused
        ("extract", "--csv", csv_path, "--images", root, "--out", work / "nih", "--size", 32, "--seed", 5),
        ("classify", "--data", work / "data", "--size", 32, "--epochs", 1, "--save", work / "cls" / "c.pt", *device),
        ("classify", "--data", work / "data", "--size", 32, "--epochs", 1, "--save", work / "cls" / "mine.pt", *device),
        ("fid", work / "data" / "train_data", work / "fake", "--classifier", classifier,
         "--inception-weights", work / "missing.pth", *device),
        ("memorization", "--train", work / "data", "--synthetic", work / "fake", "--out", work / "memo"),
        ("memorization", "--train", work / "fake", "--synthetic", work / "fake", "--out", work / "memo",
         "--classifier", classifier),
    ]
    for call in calls:
        cli(capsys, *call)
    after = snapshot(work)
    ours = lambda k: k.endswith("manifest.csv") or k.endswith("summary.json") or "_data/" in k  # noqa: E731
    assert {k: after.get(k) for k in before if not ours(k) or "keep" in k or "mine" in k} == \
        {k: v for k, v in before.items() if not ours(k) or "keep" in k or "mine" in k}
    assert {k: after.get(k) for k in before if k.startswith("user")} == \
        {k: v for k, v in before.items() if k.startswith("user")}
    assert not temporaries(work) and not list(work.rglob(layout.PENDING))
