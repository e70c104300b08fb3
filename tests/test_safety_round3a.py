"""Nothing silently wrong, round three (issue 23), items 1-3, 5-8, 11-14 and 16: export racing export,
exports read back as pretrained models (their folder, their schedule, their classes), a stale best.pt,
a private checkpoint made public, eta out of range, schedules whose alpha-bar underflows, class labels
past the table, and exports under non-UTF-8 folder names. Each case: the hostile input, the one-line
error (or the right result), and nothing the user wrote changed or lost.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import ddpm
import diffusion
from clitools import ROOT, cli, process, quiet, refused, snapshot
from plumbing import weightfiles
from plumbing.configs import CLIError
from plumbing.files import atomic_path, load_checkpoint, save_checkpoint
from study import generators
from training import ddpm_run
from tools import export as hub

TINY_DDPM = ("--preset", "tiny", "--max-steps", "1", "--batch-size", "4", "--num-samples", "2", "--sample-steps", "2",
             "--device", "cpu")
FINETUNE = ("--finetune", "--max-steps", "1", "--batch-size", "4", "--num-samples", "2", "--sample-steps", "2",
            "--device", "cpu")


def checkpoint(seed: int = 0, classes: bool = False, **diffusion_settings) -> dict:
    """A tiny DDPM checkpoint as ddpm_run's state_fn writes it, 16 px, random weights (a random class table)."""
    torch.manual_seed(seed)
    model = ddpm.UNet(ddpm.UNetConfig(**{**asdict(ddpm.PRESETS["tiny"]), "num_classes": 2 if classes else None}))
    if classes:
        torch.nn.init.normal_(model.class_embedding.weight)
    return {"kind": "ddpm", "config": asdict(model.config), "image_size": 16, "step": 7, "args": {"data": "d"},
            "diffusion": diffusion.GaussianDiffusion(**diffusion_settings).config(), "model": model.state_dict(),
            "ema": model.state_dict(), **({"classes": {"no_finding": 0, "infiltration": 1}} if classes else {})}


def exported(tmp_path: Path, ckpt: dict, name: str = "export") -> Path:
    save_checkpoint(ckpt, tmp_path / f"{name}_run" / "checkpoint.pt")
    return hub.export(hub.ExportConfig(checkpoint=tmp_path / f"{name}_run" / "checkpoint.pt", out=tmp_path / name))


def class_folders(root: Path, n: int = 4, size: int = 16, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for cls in data.CLASSES:
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    """Eight 16 px images in class folders (what --conditional needs; the others read them all)."""
    return class_folders(tmp_path_factory.mktemp("classes") / "train_data")


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    return weightfiles.read_safetensors(folder / hub.WEIGHTS_FILE)


# --------------------------------------------------------------------------- 1: two exports into one --out


def test_23_1_export_takes_a_lock_and_two_racing_exports_leave_one_whole_model(tmp_path, capsys):
    for seed in (1, 2):
        save_checkpoint(checkpoint(seed), tmp_path / f"run{seed}" / "checkpoint.pt")
    out = tmp_path / "out"
    # a second process holding the export's lock: the export is refused in one line that names it, nothing written
    hold = ("import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
            "f.write(str(os.getpid())); f.flush(); print('locked', flush=True); time.sleep(120)")  # as export locks
    holder = subprocess.Popen([sys.executable, "-c", hold, tmp_path / ".out.export-lock"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = cli(capsys, "export", "--checkpoint", tmp_path / "run1" / "checkpoint.pt", "--out", out)
        refused(code, err, "in use by another export", f"pid {holder.pid}")
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # two real exports at once: one wins whole, the other is refused in one line (in use, or not empty)
    procs = [subprocess.Popen([sys.executable, "main.py", "export", "--checkpoint", tmp_path / f"run{seed}" / "checkpoint.pt",
                               "--out", out], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)]  # started together
    results = [(p.wait(), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    winner = 1 + [code for code, _ in results].index(0)
    loser_err = results[2 - winner][1]
    assert "Traceback" not in loser_err and loser_err.count("\n") == 1
    assert "in use by another export" in loser_err or "not empty" in loser_err
    ema = load_checkpoint(tmp_path / f"run{winner}" / "checkpoint.pt")["ema"]
    assert torch.equal(weights_of(out)["conv_in.weight"], ema["conv_in.weight"])
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(hub.EXPORT_FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run1", "run2"]  # no lock, no temporary left


# --------------------------------------------------------------------------- 2: --pretrained EXPORT_ROOT


def test_23_2_an_export_root_is_read_as_itself_and_never_filled_from_the_cache(tmp_path, capsys, monkeypatch, folders):
    root, other = exported(tmp_path, checkpoint(1)), exported(tmp_path, checkpoint(2), "other")
    # a Hugging Face cache holding another model, and no network: neither may be used for the export
    snap = tmp_path / "cache" / "models--google--ddpm-cifar10-32" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    for f in (other / "unet").iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))

    def no_network(*a, **k):
        raise AssertionError("went to the network")

    monkeypatch.setattr("urllib.request.urlopen", no_network)
    code, out, _ = cli(capsys, "ddpm", *FINETUNE, "--pretrained", root, "--data", folders, "--out", tmp_path / "ft")
    assert code == 0 and "reading its UNet" in out and "cache" not in out
    start = load_checkpoint(tmp_path / "ft" / "checkpoint.pt")
    assert start["args"]["pretrained"] == str(root)
    assert start["config"] == {**load_checkpoint(tmp_path / "export_run" / "checkpoint.pt")["config"], "sample_size": 16}
    tuned = start["model"]["conv_in.weight"]  # one step at lr 1e-5 from the export, far from the cache's model
    assert torch.allclose(tuned, weights_of(root)["conv_in.weight"], atol=1e-3)
    assert not torch.allclose(tuned, weights_of(other)["conv_in.weight"], atol=1e-2)
    model = ddpm.load_pretrained(root)
    assert torch.equal(model.state_dict()["conv_in.weight"], weights_of(root)["conv_in.weight"])
    # a folder holding other files and no weights (an export whose unet/ was moved away, notes): refused, untouched
    for folder in (root / "unet", tmp_path / "notes"):
        folder.mkdir(exist_ok=True)
        for f in list(folder.iterdir()):
            f.unlink()
        (folder / "README.md").write_text("mine")
    before = snapshot(tmp_path)
    for pretrained in (root, tmp_path / "notes"):
        code, _, err = cli(capsys, "ddpm", *FINETUNE, "--pretrained", pretrained, "--data", folders,
                           "--out", tmp_path / "x")
        refused(code, err, "no weights", "README.md", "neither read as google/ddpm-cifar10-32 nor filled")
    assert snapshot(tmp_path) == before and not (tmp_path / "x" / "checkpoint.pt").exists()


# --------------------------------------------------------------------------- 3: the pretrained model's schedule


def test_23_3_finetuning_keeps_the_schedule_the_model_was_trained_with(tmp_path, capsys, folders):
    root = exported(tmp_path, checkpoint(prediction_type="v_prediction", beta_schedule="cosine",
                                         timestep_spacing="trailing"))
    code, out, _ = cli(capsys, "ddpm", *FINETUNE, "--pretrained", root / "unet", "--data", folders,
                       "--out", tmp_path / "a")
    assert code == 0 and "fine-tuning with the schedule" in out
    d = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["diffusion"]
    assert (d["prediction_type"], d["beta_schedule"], d["timestep_spacing"]) == ("v_prediction", "cosine", "trailing")
    # a checkpoint of `main.py ddpm` as --pretrained: its EMA weights and its settings
    code, _, _ = cli(capsys, "ddpm", *FINETUNE, "--pretrained", tmp_path / "a" / "checkpoint.pt", "--data", folders,
                     "--out", tmp_path / "b")
    assert code == 0 and load_checkpoint(tmp_path / "b" / "checkpoint.pt")["diffusion"] == d
    # an option that contradicts the model's schedule: one line, nothing trained
    before = snapshot(tmp_path)
    for option in (("--prediction", "sample"), ("--beta-schedule", "sigmoid"), ("--timestep-spacing", "linspace")):
        code, _, err = cli(capsys, "ddpm", *FINETUNE, "--pretrained", root, *option, "--data", folders,
                           "--out", tmp_path / "c")
        refused(code, err, "--pretrained", "was trained with", option[0])
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- 5: a stale best.pt


def test_23_5_a_fresh_run_keeps_no_earlier_best_pt_and_the_study_samples_none(tmp_path, capsys, folders):
    run, held = tmp_path / "run", class_folders(tmp_path / "validation_data", seed=1)
    common = ("ddpm", "--data", folders, "--out", run, *TINY_DDPM)
    assert quiet(*common, "--max-steps", 2, "--eval-every", 1, "--eval-data", held) == 0
    old_best = (run / "best.pt").read_bytes()
    (run / "checkpoint.pt").unlink()
    code, out, _ = cli(capsys, *common)  # a fresh run without monitoring: it must not leave the old best.pt
    assert code == 0 and "removed" in out and not (run / "best.pt").exists()
    # a best.pt of another run beside this checkpoint (copied back): the study samples the checkpoint
    (run / "best.pt").write_bytes(old_best)
    assert generators.sampled_checkpoint(run / "checkpoint.pt")["run"] == load_checkpoint(run / "checkpoint.pt")["run"]
    assert generators.sampled_checkpoint(run / "checkpoint.pt")["step"] == 1  # not best.pt's
    assert "not of the run" in capsys.readouterr().out
    # a best.pt the project did not write: refused, never deleted
    (run / "checkpoint.pt").unlink()
    (run / "best.pt").write_text("mine")
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, *common)
    refused(code, err, "best.pt", "not the best.pt of an earlier ddpm run")
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- 6: a private checkpoint stays private


def test_23_6_resume_keeps_the_mode_of_a_private_checkpoint(tmp_path, capsys, folders):
    run = tmp_path / "run"
    assert quiet("ddpm", "--data", folders, "--out", run, *TINY_DDPM) == 0
    os.chmod(run / "checkpoint.pt", 0o600)
    assert quiet("ddpm", "--data", folders, "--out", run, *TINY_DDPM, "--max-steps", 2, "--resume") == 0
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 2
    assert stat.S_IMODE((run / "checkpoint.pt").stat().st_mode) == 0o600
    with atomic_path(tmp_path / "new.txt") as tmp:  # a new file: what a plain open() gives
        tmp.write_text("x")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == 0o666 & ~mask


# --------------------------------------------------------------------------- 7: eta outside [0, 1]


@pytest.mark.parametrize("eta", ["5", "-0.5", "1.01"])
def test_23_7_sample_refuses_eta_outside_0_1(tmp_path, capsys, eta):
    save_checkpoint(checkpoint(), tmp_path / "checkpoint.pt")
    code, _, err = cli(capsys, "sample", "--checkpoint", tmp_path / "checkpoint.pt", "--out", tmp_path / "s",
                       "--sampler", "ddim", "--eta", eta, "--steps", "2", "--device", "cpu")
    refused(code, err, "--eta", "[0, 1]")
    assert not (tmp_path / "s").exists()
    with pytest.raises(CLIError, match=r"--eta must be in \[0, 1\]"):
        ddpm.generate(checkpoint(), 1, seed=0, batch_size=1, device=torch.device("cpu"), sampler="ddim", steps=2,
                      eta=float(eta))


# --------------------------------------------------------------------------- 8: alpha-bar that underflows float32


def dummy_sample() -> torch.Tensor:
    """diffusers' SchedulerCommonTest.dummy_sample_deter: (4, 3, 8, 8) in [0, 1)."""
    n = 4 * 3 * 8 * 8
    return (torch.arange(n).flip(-1).reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2)


def dummy_model(x: torch.Tensor, t) -> torch.Tensor:
    """diffusers' SchedulerCommonTest.dummy_model: eps = x t / (t + 1)."""
    t = torch.as_tensor(t).reshape(-1, *(1,) * (x.dim() - 1)).to(x.dtype)
    return x * t / (t + 1)


def test_23_8_a_schedule_whose_alpha_bar_underflows_samples_finite_images(tmp_path):
    d = diffusion.GaussianDiffusion(beta_start=0.01, beta_end=0.2)  # diffusers' test_betas
    assert (d.alphas_cumprod[959:] == 0).all() and d.alphas_cumprod[958] > 0  # float32 underflow from t = 959
    ours = d.ddim_sample(dummy_model, (4, 3, 8, 8), steps=50, x_T=dummy_sample(), progress=False)
    # diffusers' DDIMScheduler on the float64 schedule (its float32 one gives NaN too), eps from the clipped x_0
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(beta_start=0.01, beta_end=0.2, clip_sample=True)
    sched.alphas_cumprod = torch.cumprod(1 - torch.linspace(0.01, 0.2, 1000, dtype=torch.float64), 0)
    sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    sched.set_timesteps(50)
    x = dummy_sample().double()
    for t in sched.timesteps:
        x = sched.step(dummy_model(x, t), t, x, 0.0, use_clipped_model_output=True).prev_sample
    print(f"DDIM 50 steps, betas 0.01..0.2: ours sum {ours.sum():.4f}, diffusers float64 {x.sum():.4f}, "
          f"max diff {(ours.double() - x).abs().max():.2g}")
    assert x.sum().item() == pytest.approx(205.4759, abs=1e-4) and (ours.double() - x).abs().max() < 1e-5
    g = torch.Generator().manual_seed(0)
    for settings in ({}, {"prediction_type": "v_prediction", "beta_start": 0.5, "beta_end": 0.9}):  # 0 even in float64
        d = diffusion.GaussianDiffusion(**{"beta_start": 0.01, "beta_end": 0.2, **settings})
        for sampler, steps, eta in (("ddim", 50, 0.0), ("ddim", 50, 1.0), ("ddpm", 50, 0.0), ("ddpm", None, 0.0),
                                    ("dpmpp", 20, 0.0), ("dpmpp", 999, 0.0)):
            x = d.sample(dummy_model, (2, 3, 8, 8), sampler, steps, eta, generator=g, progress=False)
            assert torch.isfinite(x).all(), (settings, sampler, steps, eta)
    d = diffusion.GaussianDiffusion(beta_start=0.01, beta_end=0.2, loss_weight="min-snr")  # SNR 0 in float32: weight 1
    assert torch.isfinite(d.training_loss(dummy_model, dummy_sample() * 2 - 1))


# --------------------------------------------------------------------------- 11: a conditional export fine-tuned


def test_23_11_conditional_finetune_of_a_conditional_export(tmp_path, capsys, folders):
    ckpt = checkpoint(classes=True)
    root = exported(tmp_path, ckpt)
    code, _, err = cli(capsys, "ddpm", *FINETUNE, "--conditional", "--pretrained", root / "unet", "--data", folders,
                       "--out", tmp_path / "cfg")
    assert code == 0, err
    tuned = load_checkpoint(tmp_path / "cfg" / "checkpoint.pt")
    table = tuned["model"]["class_embedding.weight"]
    assert tuned["classes"] == ckpt["classes"] and table.shape == (3, 64)
    assert torch.allclose(table, ckpt["ema"]["class_embedding.weight"], atol=1e-3)  # its own table, one step on
    code, _, err = cli(capsys, "ddpm", *FINETUNE, "--pretrained", root / "unet", "--data", folders,
                       "--out", tmp_path / "p")
    refused(code, err, "class-conditional", "--conditional")  # never trained as conditional unasked
    with pytest.raises(CLIError, match="3 classes"):
        ddpm.with_classes(ddpm.with_classes(ddpm.UNet(ddpm.PRESETS["tiny"]), 3), 2)


# --------------------------------------------------------------------------- 12: export under a Latin-1 folder name


def test_23_12_export_under_latin1_names_and_whole_or_not_at_all(tmp_path, capsys, monkeypatch):
    latin = os.fsdecode(b"caf\xe9")
    ckpt = checkpoint()
    ckpt["args"]["data"] = str(tmp_path / latin / "train_data")  # trained under a Latin-1 folder name
    save_checkpoint(ckpt, tmp_path / latin / "run" / "checkpoint.pt")
    out = tmp_path / latin / "export"
    code, stdout, _ = process("export", "--checkpoint", tmp_path / latin / "run" / "checkpoint.pt", "--out", out)
    assert code == 0 and "caf\ufffd" in stdout
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(hub.EXPORT_FILES)
    assert "caf\ufffd/train_data" in (out / "README.md").read_text(encoding="utf-8")
    # a disk that fills half-way: the earlier export stays whole (--force), a new one does not appear at all
    real_write = hub.write_safetensors

    def full_disk(*a, **k):
        real_write(*a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hub, "write_safetensors", full_disk)
    before = snapshot(tmp_path)
    for target, force in ((out, True), (tmp_path / "new", False)):  # in-process: pytest's stderr refuses the name
        with pytest.raises(CLIError, match="no space left") as e:
            hub.export(hub.ExportConfig(checkpoint=tmp_path / latin / "run" / "checkpoint.pt", out=target, force=force))
        assert "\n" not in str(e.value)
    assert snapshot(tmp_path) == before and not (tmp_path / "new").exists()
    assert not [p for p in tmp_path.rglob(".*")]  # no lock, no partial folder


# --------------------------------------------------------------------------- 13: a diffusion entry that is not a dict


@pytest.mark.parametrize("entry", [[1, 2], "linear", 5])
def test_23_13_export_refuses_a_diffusion_entry_that_is_not_a_dict(tmp_path, capsys, entry):
    save_checkpoint({**checkpoint(), "diffusion": entry}, tmp_path / "checkpoint.pt")
    code, _, err = cli(capsys, "export", "--checkpoint", tmp_path / "checkpoint.pt", "--out", tmp_path / "out")
    refused(code, err, "malformed diffusion settings", type(entry).__name__)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


# --------------------------------------------------------------------------- 14: a class past the embedding table


@pytest.mark.parametrize("classes", [{"no_finding": 0, "infiltration": 7}, {"no_finding": 0, "infiltration": -1},
                                     {"no_finding": 0, "infiltration": "1"}, ["infiltration"]])
def test_23_14_sample_refuses_a_class_past_the_embedding_table(tmp_path, capsys, classes):
    save_checkpoint({**checkpoint(classes=True), "classes": classes}, tmp_path / "checkpoint.pt")
    code, _, err = cli(capsys, "sample", "--checkpoint", tmp_path / "checkpoint.pt", "--out", tmp_path / "s",
                       "--class", "infiltration", "-n", "1", "--sampler", "ddim", "--steps", "2", "--device", "cpu")
    refused(code, err, "malformed DDPM checkpoint")
    assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------- 16: a schedule that can never sample


def test_23_16_a_schedule_that_can_never_sample_is_refused_where_it_is_set(tmp_path, capsys, folders):
    code, _, err = cli(capsys, "ddpm", "--data", folders, "--out", tmp_path / "run", *TINY_DDPM,
                       "--beta-schedule", "linear", "--prediction", "epsilon", "--beta-start", "0.5", "--beta-end", "0.9")
    refused(code, err, "--beta-start 0.5", "--beta-end 0.9", "--prediction epsilon", "v_prediction")
    assert not (tmp_path / "run").exists()
    ddpm_run.TrainConfig(data=folders, out=tmp_path / "v", beta_schedule="linear", beta_start=0.5, beta_end=0.9,
                         prediction="v_prediction")  # fine
    # a checkpoint trained with it before this check: `sample` names the schedule, not the model
    ckpt = checkpoint()
    ckpt["diffusion"].update(beta_start=0.5, beta_end=0.9)
    save_checkpoint(ckpt, tmp_path / "checkpoint.pt")
    code, _, err = cli(capsys, "sample", "--checkpoint", tmp_path / "checkpoint.pt", "--out", tmp_path / "s",
                       "--sampler", "ddim", "--steps", "2", "--device", "cpu", "-n", "1")
    line = refused(code, err, "--beta-start 0.5", "alpha-bar")
    assert "diverged" not in line and not (tmp_path / "s").exists()
