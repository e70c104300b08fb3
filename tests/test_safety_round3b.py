"""Nothing silently wrong, round three (issue 23), items 4, 9, 10, 15, 17-21: held-out images that are
not held out, damaged classifier checkpoints, a full or read-only disk, Ctrl-C in the study, options
that would do nothing, refusals that leave nothing behind, and the Inception weights of the study.
Each case: the hostile input, the one-line error (or the right result), and nothing the user wrote
changed or lost.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import fid
from clitools import ROOT, cli, images, quiet, refused, snapshot
from plumbing import files
from plumbing.files import load_checkpoint, save_checkpoint
from training import harness

TINY_DDPM = ("--preset", "tiny", "--max-steps", "2", "--batch-size", "4", "--num-samples", "2", "--sample-steps", "2",
             "--device", "cpu")
TINY_GAN = ("--size", "32", "--g-width", "8", "--d-width", "8", "--max-steps", "2", "--batch-size", "4",
            "--num-samples", "4", "--no-epoch-checkpoints", "--device", "cpu")


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if p.name != ".lock"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ph") / "data"
    assert quiet("extract", "--phantoms", 40, "--out", root, "--size", 32, "--seed", 0) == 0
    return root


@pytest.fixture(scope="module")
def tiny_ddpm(tmp_path_factory, phantoms) -> Path:
    out = tmp_path_factory.mktemp("ddpm") / "run"
    assert quiet("ddpm", "--data", phantoms / "train_data", "--out", out, *TINY_DDPM) == 0
    return out / "checkpoint.pt"


# --------------------------------------------------------------------------- 4: --eval-data that is not held out


def test_23_4_eval_data_on_the_test_split_or_a_copy_of_the_training_images(tmp_path, capsys, phantoms):
    copy = tmp_path / "copy"
    shutil.copytree(phantoms / "train_data", copy)  # byte for byte, under another name
    elsewhere = tmp_path / "test_copy"
    shutil.copytree(phantoms / "test_data", elsewhere)
    (tmp_path / "link").symlink_to(phantoms / "test_data")
    before = snapshot(tmp_path), snapshot(phantoms)
    train = ("ddpm", "--data", phantoms / "train_data", "--class", "infiltration", *TINY_DDPM, "--eval-every", 1)
    for held, words in [(copy, ("--eval-data", "identical pixels", "training image")),
                        (phantoms / "test_data", ("test split", "--eval-on-test")),
                        (tmp_path / "link", ("test split", "--eval-on-test")),  # by another name
                        (elsewhere, ("test split", "--eval-on-test"))]:  # copied elsewhere: found by content
        code, _, err = cli(capsys, *train, "--out", tmp_path / "run", "--eval-data", held)
        refused(code, err, *words)
        assert not (tmp_path / "run").exists()  # refused before anything is written
    code, _, err = cli(capsys, *train, "--out", tmp_path / "run", "--eval-data", phantoms / "validation_data",
                       "--eval-on-test")
    refused(code, err, "--eval-on-test", "not an extract's test split")
    assert (snapshot(tmp_path), snapshot(phantoms)) == before

    # said explicitly: allowed, and recorded in both checkpoints
    code, out, err = cli(capsys, *train, "--out", tmp_path / "run", "--eval-data", phantoms / "test_data",
                         "--eval-on-test")
    assert code == 0, err
    assert "warning: --eval-on-test" in out
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["args"]["eval_on_test"] is True
    assert load_checkpoint(tmp_path / "run" / "best.pt")["monitor"]["test_split"] is True
    assert snapshot(phantoms) == before[1]


# --------------------------------------------------------------------------- 9: a classifier checkpoint without weights


def test_23_9_fid_classifier_without_model_is_one_line(tmp_path, capsys):
    real, fake = images(tmp_path / "real", 4), images(tmp_path / "fake", 4)
    config = {"model": "small", "size": 32}
    save_checkpoint({"kind": "classifier", "config": config}, tmp_path / "no_model.pt")
    save_checkpoint({"kind": "classifier", "config": [1, 2], "model": {}}, tmp_path / "bad_config.pt")
    save_checkpoint({"kind": "classifier", "config": config, "model": [1]}, tmp_path / "bad_model.pt")
    before = snapshot(tmp_path)
    for name, words in (("no_model", ("lacks 'model'",)), ("bad_config", ("'config'",)),
                        ("bad_model", ("weights do not fit",))):
        code, _, err = cli(capsys, "fid", real, fake, "--classifier", tmp_path / f"{name}.pt", "--device", "cpu")
        refused(code, err, f"{name}.pt", *words)
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- 10: a full disk while saving a checkpoint


def test_23_10_full_disk_while_saving_a_checkpoint(tmp_path, capsys, monkeypatch, phantoms):
    class Full:  # the checkpoint's temporary on a disk that fills up after 1 kB
        def __init__(self, file):
            self.file, self.written = file, 0

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, b):
            self.written += len(b)
            if self.written > 1024:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.file.write(b)

    def full_open(path, *args, **kwargs):
        f = open(path, *args, **kwargs)
        return Full(f) if Path(path).name.startswith(".checkpoint.pt.") else f

    monkeypatch.setattr(files, "open", full_open, raising=False)
    out = tmp_path / "run"
    call = ("ddpm", "--data", phantoms / "train_data", "--out", out, *TINY_DDPM)
    code, _, err = cli(capsys, *call)
    refused(code, err, "no space left on the device holding", str(out), "while writing checkpoint.pt")
    assert not temporaries(out) and not (out / "checkpoint.pt").exists()
    monkeypatch.undo()  # space freed: the same command now trains and saves
    assert cli(capsys, *call)[0] == 0 and load_checkpoint(out / "checkpoint.pt")["step"] == 2


# --------------------------------------------------------------------------- 15: a read-only --out


@pytest.mark.parametrize("command", ["ddpm", "gan", "sample", "export", "experiment"])
def test_23_15_a_read_only_out_is_refused_before_any_work(tmp_path, capsys, monkeypatch, phantoms, tiny_ddpm,
                                                           command):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "mine.txt").write_text("mine")
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes through mode bits: let os.access answer as for the owner of the folder
        access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: access(p, mode, **kw) and not (
            mode & os.W_OK and not os.stat(p).st_mode & 0o200))
    argv = {"ddpm": ("ddpm", "--data", phantoms / "train_data", *TINY_DDPM),
            "gan": ("gan", "--data", phantoms / "train_data", *TINY_GAN),
            "sample": ("sample", "--checkpoint", tiny_ddpm, "-n", 1, "--sampler", "ddim", "--steps", 2, "--device", "cpu"),
            "export": ("export", "--checkpoint", tiny_ddpm),
            "experiment": ("experiment", "--data", phantoms, "--generators", "gan", "--device", "cpu")}[command]
    try:
        for out in (ro, ro / "run"):  # the folder itself, or a new one inside it
            code, _, err = cli(capsys, *argv, "--out", out)
            refused(code, err, "--out", "not writable")
        assert [p.name for p in ro.iterdir()] == ["mine.txt"] and (ro / "mine.txt").read_text() == "mine"
    finally:
        ro.chmod(0o755)


# --------------------------------------------------------------------------- 17: Ctrl-C says how each command continues


def test_23_17_ctrl_c_says_how_to_continue(tmp_path, capsys, monkeypatch, phantoms):
    class CtrlC(harness._StopRequest):  # as if Ctrl-C came during the first step
        def __enter__(self):
            super().__enter__()
            self.requested = True
            return self

    monkeypatch.setattr(harness, "_StopRequest", CtrlC)
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("offline")))
    monkeypatch.setattr(fid, "default_weights_path", lambda: tmp_path / "models" / fid.WEIGHTS_FILE)
    out = tmp_path / "study"
    code, _, err = cli(capsys, "experiment", "--data", phantoms, "--out", out, "--generators", "gan", "--gan-size", 32,
                       "--gan-max-steps", 3, "--real-fractions", 1, "--classifier", "small", "--device", "cpu")
    line = refused(code, err, "interrupted at step 1", "run the same command again")
    assert "--resume" not in line
    assert [load_checkpoint(p)["step"] for p in (out / "generators").rglob("checkpoint.pt")] == [1]
    code, _, err = cli(capsys, "gan", "--data", phantoms / "train_data", "--out", tmp_path / "gan", *TINY_GAN)
    refused(code, err, "interrupted at step 1", "continue with --resume")  # a plain run continues with --resume


# --------------------------------------------------------------------------- 18: --pr-k on statistics without features


def test_23_18_pr_k_on_statistics_without_features(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        x = rng.normal(size=(50, 4))
        np.savez(tmp_path / f"{name}.npz", mu=x.mean(0), sigma=np.cov(x, rowvar=False))
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "fid", tmp_path / "a.npz", tmp_path / "b.npz", "--pr-k", 2)
    refused(code, err, "--pr-k 2", "a.npz", "without features")
    code, out, err = cli(capsys, "fid", tmp_path / "a.npz", tmp_path / "b.npz")  # the default k: a note says so
    assert code == 0 and out.startswith("FID")
    assert "note: precision, recall, density and coverage need each image's features" in err
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- 19: options that would do nothing


def test_23_19_options_that_would_do_nothing_are_refused(tmp_path, capsys, phantoms):
    save_checkpoint({"kind": "dcgan", "config": {}, "generator": {}}, tmp_path / "gan.pt")
    before = snapshot(tmp_path)
    ddpm = ("ddpm", "--data", phantoms / "train_data", "--out", tmp_path / "run", *TINY_DDPM)
    for argv, words in [
        ((*ddpm, "--label-dropout", 0.3), ("--label-dropout", "without --conditional")),
        ((*ddpm, "--pretrained", tmp_path), ("--pretrained", "without --finetune")),
        ((*ddpm, "--finetune", "--preset", "small"), ("--preset small", "--finetune")),
        ((*ddpm, "--eval-data", phantoms / "validation_data"), ("--eval-data", "without --eval-every")),
        (("gan", "--data", phantoms / "train_data", "--out", tmp_path / "run", *TINY_GAN, "--eval-every", 1,
          "--eval-on-test"), ("--eval-on-test", "needs --eval-data")),
        (("sample", "--checkpoint", tmp_path / "gan.pt", "--out", tmp_path / "s", "--eta", 0.5), ("--eta", "ddpm")),
        (("sample", "--checkpoint", tmp_path / "gan.pt", "--out", tmp_path / "s", "--steps", 2, "--amp"),
         ("--steps", "--amp", "GAN checkpoint")),
        (("experiment", "--data", phantoms, "--out", tmp_path / "st", "--generators", "gan", "--sampler", "ddim"),
         ("--sampler", "does not train")),
        (("experiment", "--data", phantoms, "--out", tmp_path / "st", "--ddpm-preset", "tiny", "--pretrained",
          tmp_path / "gan.pt"), ("--ddpm-preset", "--pretrained")),
    ]:
        code, _, err = cli(capsys, *argv)
        refused(code, err, *words)
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["gan.pt"]
    from training import ddpm_run

    assert ddpm_run.TrainConfig(data=tmp_path, out=tmp_path, conditional=True, label_dropout=0.3).label_dropout == 0.3


# --------------------------------------------------------------------------- 20: a refusal leaves no lock behind


def _one_class(tmp_path: Path) -> Path:
    images(tmp_path / "one" / "infiltration", 6)
    return tmp_path / "one"


def test_23_20_a_refused_run_leaves_no_lock(tmp_path, capsys):
    data = _one_class(tmp_path)
    call = ("ddpm", "--data", data, *TINY_DDPM, "--conditional")
    code, _, err = cli(capsys, *call, "--out", tmp_path / "new" / "run")
    refused(code, err, "--conditional", "class folders")
    assert not (tmp_path / "new").exists()  # neither the lock nor the folders it would have made
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    before = snapshot(mine)
    code, _, err = cli(capsys, *call, "--out", mine)
    refused(code, err, "--conditional")
    assert snapshot(mine) == before and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_23_20_two_refused_runs_at_once_leave_nothing(tmp_path):
    data, out = _one_class(tmp_path), tmp_path / "run"
    argv = [sys.executable, "main.py", "ddpm", "--data", str(data), "--out", str(out), *map(str, TINY_DDPM),
            "--conditional"]
    procs = [subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2 and "Traceback" not in err
        assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err
        assert "class folders" in err or "in use" in err
    assert not out.exists()


# --------------------------------------------------------------------------- 21: the study and the Inception weights


def test_23_21_the_study_tries_the_inception_download_once_and_says_where_to_put_it(tmp_path, capsys, monkeypatch):
    from study import experiment, report

    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    weights = tmp_path / "models" / fid.WEIGHTS_FILE
    monkeypatch.setattr(fid, "default_weights_path", lambda: weights)
    experiment.fetch_inception()
    out, err = capsys.readouterr()
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert len(calls) == 1 and len(notes) == 1 and fid.WEIGHTS_FILE in notes[0] and str(weights) in notes[0]
    assert "downloading" not in out + err and not (tmp_path / "models").exists()

    # the report reads the weights from disk only: no second download, and it names the file too
    u8 = torch.randint(0, 256, (8, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([0, 1] * 4)
    real = experiment.RealData(None, None, u8, labels, u8, labels, {}, None, "")
    cfg = experiment.StudyConfig(tmp_path, tmp_path, generators=(), real_fractions=(1.0,))
    dist = report.distances(cfg, real, {"g": {1.0: experiment.Pool(u8, labels, "g")}}, model=None)
    assert len(calls) == 1 and str(weights) in dist["inception_missing"]
