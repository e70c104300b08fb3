"""Nothing lost, nothing silently wrong (issue 10): the generator cases, ddpm, gan and
sample, each on tiny phantoms and tiny networks. Every failure must be one line on stderr
starting "error:", with a non-zero exit code and no traceback, and no file the project
did not write may ever disappear or change.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dcgan
from clitools import ROOT, cli, images, quiet, refused, snapshot
from plumbing.configs import CLIError
from plumbing.files import first_nonfinite, load_checkpoint, save_checkpoint, save_image_grid
from training import gan_run

TINY_DDPM = ("--preset", "tiny", "--epochs", "1", "--max-steps", "2", "--batch-size", "4", "--num-samples", "2",
             "--sample-steps", "2", "--device", "cpu")
TINY_GAN = ("--size", "32", "--g-width", "8", "--d-width", "8", "--epochs", "1", "--max-steps", "2",
            "--batch-size", "4", "--num-samples", "4", "--no-epoch-checkpoints", "--device", "cpu")
DDIM2 = ("--sampler", "ddim", "--steps", "2", "--device", "cpu")


def pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png")) if folder.is_dir() else []


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


@pytest.fixture(scope="module")
def tiny_gan(tmp_path_factory, phantoms) -> Path:
    out = tmp_path_factory.mktemp("gan") / "run"
    assert quiet("gan", "--data", phantoms / "train_data", "--out", out, *TINY_GAN) == 0
    return out / "checkpoint.pt"


# --------------------------------------------------------------------------- 3: a generator never trains on its own outputs


def test_3_an_out_inside_data_is_refused(tmp_path, capsys):
    data = images(tmp_path / "d" / "infiltration", 4)
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, "gan", "--data", tmp_path / "d", "--out", data / "run", *TINY_GAN)
    refused(code, err, "--out", "inside --data")
    code, _, err = cli(capsys, "ddpm", "--data", tmp_path / "d", "--out", tmp_path / "d" / "run", *TINY_DDPM)
    refused(code, err, "--out", "inside --data")
    code, _, err = cli(capsys, "ddpm", "--data", tmp_path / "d", "--out", tmp_path / "d", *TINY_DDPM)  # the same folder
    refused(code, err, "--out", "inside --data")
    (tmp_path / "link").symlink_to(tmp_path / "d")  # the same folder by another name
    code, _, err = cli(capsys, "gan", "--data", tmp_path / "link", "--out", tmp_path / "d" / "run", *TINY_GAN)
    refused(code, err, "inside --data")
    assert snapshot(tmp_path) == before and not (tmp_path / "d" / "run").exists()


# --------------------------------------------------------------------------- 4: nothing non-finite is saved or sampled


@pytest.mark.parametrize("steps", ["10", "1"])
def test_4_diverging_training_saves_nothing_non_finite(tmp_path, capsys, steps):
    four, out, samples = images(tmp_path / "four", 4), tmp_path / "run", tmp_path / "s"
    code, _, err = cli(capsys, "ddpm", "--data", four, "--out", out, "--preset", "tiny", "--batch-size", 4,
                       "--lr", "1e9", "--max-steps", steps, "--epochs", 10, "--num-samples", 2,
                       "--sample-steps", 2, "--device", "cpu")
    if (out / "checkpoint.pt").exists():
        assert first_nonfinite(load_checkpoint(out / "checkpoint.pt")) is None
    if code != 0:
        line = refused(code, err)
        assert "keeps the last good state" not in line or (out / "checkpoint.pt").exists()
    if not (out / "checkpoint.pt").exists():
        return
    # the weights saved are finite: sampling from them must be finite too, or refuse and write nothing
    code, _, err = cli(capsys, "sample", "--checkpoint", out / "checkpoint.pt", "--out", samples, "-n", 2, *DDIM2)
    if code != 0:
        refused(code, err, "non-finite")
        assert not pngs(samples) and not (samples / "samples.json").exists()
    else:
        assert len(pngs(samples)) == 3


def test_4_non_finite_flags_are_refused_while_parsing(tmp_path, capsys, tiny_ddpm):
    for call, flag in [(("ddpm", "--data", tmp_path, "--out", tmp_path / "o", "--grad-clip", "nan"), "--grad-clip"),
                       (("ddpm", "--data", tmp_path, "--out", tmp_path / "o", "--lr", "inf"), "--lr"),
                       (("sample", "--checkpoint", tiny_ddpm, "--out", tmp_path / "s", "--eta", "nan"), "--eta"),
                       (("gan", "--data", tmp_path, "--out", tmp_path / "g", "--lr-g", "inf"), "--lr-g"),
                       (("gan", "--data", tmp_path, "--out", tmp_path / "g", "--lr-d=-inf"), "--lr-d")]:
        code, _, err = cli(capsys, *call)
        refused(code, err, flag, "finite")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("part", ["ema", "model", "optimizer"])
def test_4_sample_refuses_a_ddpm_checkpoint_with_non_finite_tensors(tmp_path, capsys, tiny_ddpm, part):
    ckpt = load_checkpoint(tiny_ddpm)
    if part == "optimizer":
        ckpt[part]["state"][0]["exp_avg"][0] = float("inf")
    else:
        key = next(iter(ckpt[part]))
        ckpt[part][key] = torch.full_like(ckpt[part][key], float("nan"))
    save_checkpoint(ckpt, tmp_path / "bad.pt")
    code, _, err = cli(capsys, "sample", "--checkpoint", tmp_path / "bad.pt", "--out", tmp_path / "s", "-n", 2, *DDIM2)
    refused(code, err, "non-finite", part)
    assert not (tmp_path / "s").exists()  # refused before the folder is made or locked
    if part == "ema":  # the library function refuses too
        with pytest.raises(CLIError, match="non-finite"):
            import ddpm

            ddpm.generate(ckpt, 1, seed=0, batch_size=1, device=torch.device("cpu"), sampler="ddim", steps=2)


def test_4_sample_never_writes_a_non_finite_image(tmp_path, capsys, tiny_gan):
    # Finite weights that draw NaN: a negative BatchNorm running variance (sqrt of it is NaN in eval mode).
    ckpt = load_checkpoint(tiny_gan)
    key = next(k for k in ckpt["generator"] if k.endswith("running_var"))
    ckpt["generator"][key] = -torch.ones_like(ckpt["generator"][key])
    save_checkpoint(ckpt, tmp_path / "nan_out.pt")
    assert first_nonfinite(ckpt) is None
    s = tmp_path / "s"
    code, _, err = cli(capsys, "sample", "--checkpoint", tmp_path / "nan_out.pt", "--out", s, "-n", 3, "--device", "cpu")
    refused(code, err, "non-finite")
    assert not pngs(s) and not (s / "samples.json").exists()
    with pytest.raises(CLIError, match="non-finite"):  # nor does any grid of the project
        save_image_grid(torch.full((2, 1, 4, 4), float("nan")), tmp_path / "grid.png")
    assert not (tmp_path / "grid.png").exists()


def test_4_gan_logs_its_gradient_norms(tiny_gan):
    with open(tiny_gan.parent / "loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(float(r["grad_d"]) > 0 and float(r["grad_g"]) > 0 for r in rows)


# --------------------------------------------------------------------------- 5: one run per folder


def test_5_a_second_run_into_a_locked_folder_is_refused(tmp_path, capsys, phantoms, tiny_ddpm):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time, sys\nfrom training.harness import run_lock\n"
                               f"with run_lock(r'{out}'):\n    print('held', flush=True); time.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = cli(capsys, "ddpm", "--data", phantoms / "train_data", "--out", out, *TINY_DDPM)
        refused(code, err, "in use", str(holder.pid))
        code, _, err = cli(capsys, "gan", "--data", phantoms / "train_data", "--out", out, *TINY_GAN)
        refused(code, err, "in use", str(holder.pid))
        code, _, err = cli(capsys, "sample", "--checkpoint", tiny_ddpm, "--out", out, "-n", 1, *DDIM2)
        refused(code, err, "in use", str(holder.pid))
        assert [p.name for p in out.iterdir()] == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    assert quiet("gan", "--data", phantoms / "train_data", "--out", out, *TINY_GAN) == 0  # released with its holder


# --------------------------------------------------------------------------- 6: sample folders are never mixed


def test_6_sample_refuses_a_non_empty_folder_unless_forced(tmp_path, capsys, tiny_ddpm, tiny_gan):
    s = tmp_path / "s"
    assert cli(capsys, "sample", "--checkpoint", tiny_ddpm, "--out", s, "-n", 6, *DDIM2)[0] == 0
    first = snapshot(s)
    code, _, err = cli(capsys, "sample", "--checkpoint", tiny_gan, "--out", s, "-n", 2, "--device", "cpu")
    refused(code, err, "--force")
    assert snapshot(s) == first
    assert cli(capsys, "sample", "--checkpoint", tiny_gan, "--out", s, "-n", 2, "--device", "cpu", "--force")[0] == 0
    assert [p.name for p in pngs(s)] == ["grid.png", "sample_00000.png", "sample_00001.png"]  # cleared, not mixed
    manifest = json.loads((s / "samples.json").read_text())
    assert manifest["kind"] == "dcgan" and manifest["files"] == ["sample_00000.png", "sample_00001.png", "grid.png"]
    mine = images(s, 1, ext=".jpg")  # an image the project did not write
    before = snapshot(s)
    code, _, err = cli(capsys, "sample", "--checkpoint", tiny_gan, "--out", s, "-n", 2, "--device", "cpu", "--force")
    refused(code, err, "img_0.jpg")
    assert snapshot(s) == before and (mine / "img_0.jpg").is_file()


def test_6_force_never_deletes_what_a_hand_edited_manifest_names(tmp_path, capsys, tiny_gan):
    s = tmp_path / "s"
    assert cli(capsys, "sample", "--checkpoint", tiny_gan, "--out", s, "-n", 2, "--device", "cpu")[0] == 0
    (tmp_path / "keep.png").write_bytes(b"the user's")
    (s / "sample_00007.png").write_bytes(b"the user's, named like a sample")
    manifest = json.loads((s / "samples.json").read_text())
    manifest["files"] += ["../keep.png", "sample_00007.png/../../keep.png", "samples.json"]
    (s / "samples.json").write_text(json.dumps(manifest))
    code, _, err = cli(capsys, "sample", "--checkpoint", tiny_gan, "--out", s, "-n", 2, "--device", "cpu", "--force")
    refused(code, err, "sample_00007.png")  # named like a sample, but no sample wrote it
    assert (tmp_path / "keep.png").read_bytes() == b"the user's" and (s / "sample_00007.png").is_file()
    (s / "samples.json").write_text("[not json")
    code, _, err = cli(capsys, "sample", "--checkpoint", tiny_gan, "--out", s, "-n", 2, "--device", "cpu", "--force")
    refused(code, err, "samples.json")


# --------------------------------------------------------------------------- 7: output paths checked before any work


def test_7_an_out_that_is_a_file_is_refused_before_any_work(tmp_path, capsys, phantoms, tiny_ddpm, monkeypatch):
    f = tmp_path / "a_file"
    f.write_text("mine")

    def no_work(*a, **k):
        raise AssertionError("work started before --out was checked")

    import data
    import ddpm

    monkeypatch.setattr(data, "load_folder", no_work)
    monkeypatch.setattr(ddpm, "generate", no_work)
    for out in (f, f / "under"):
        for call in [("ddpm", "--data", phantoms / "train_data", "--out", out, *TINY_DDPM),
                     ("gan", "--data", phantoms / "train_data", "--out", out, *TINY_GAN),
                     ("sample", "--checkpoint", tiny_ddpm, "--out", out, "-n", 2, *DDIM2)]:
            code, _, err = cli(capsys, *call)
            refused(code, err, "--out", "is a file")
    assert f.read_text() == "mine" and [p.name for p in tmp_path.iterdir()] == ["a_file"]


# --------------------------------------------------------------------------- 10: --resume keeps the checkpoint's model


def test_10_resume_refuses_another_model_and_keeps_its_settings(tmp_path, capsys, phantoms):
    run, train = tmp_path / "run", ("ddpm", "--data", phantoms / "train_data", "--out", tmp_path / "run")
    assert quiet(*train, *TINY_DDPM, "--beta-schedule", "linear", "--image-size", 16) == 0
    before = snapshot(run)
    for extra, flag in [(("--preset", "small"), "--preset tiny, not small"), (("--finetune",), "without --finetune"),
                        (("--pretrained", tmp_path / "elsewhere"), "--pretrained"),
                        (("--image-size", 32), "--image-size 16, not 32"),
                        (("--beta-schedule", "cosine"), "--beta-schedule linear, not cosine"),
                        (("--variance", "fixed_small"), "--variance fixed_large, not fixed_small")]:
        if flag is None:
            continue
        code, _, err = cli(capsys, *train, "--resume", *extra, "--device", "cpu")
        refused(code, err, "--resume", flag)
    assert snapshot(run) == before
    # options left at their defaults continue the checkpoint's model, and the saved config says so
    code, out, err = cli(capsys, *train, "--resume", *TINY_DDPM[2:-4], "--max-steps", 3, "--sample-steps", 2, "--device", "cpu")
    assert code == 0, err
    assert "keeps the checkpoint's schedule (linear, fixed_large)" in out
    args = load_checkpoint(run / "checkpoint.pt")["args"]
    assert (args["preset"], args["image_size"], args["beta_schedule"], args["finetune"]) == ("tiny", 16, "linear", False)


def test_10_gan_resume_refuses_another_network(tmp_path, capsys, phantoms):
    run = tmp_path / "run"
    assert quiet("gan", "--data", phantoms / "train_data", "--out", run, *TINY_GAN) == 0
    before = snapshot(run)
    code, _, err = cli(capsys, "gan", "--data", phantoms / "train_data", "--out", run, "--resume", "--g-width", 16)
    refused(code, err, "--g-width 8, not 16")
    assert snapshot(run) == before


# --------------------------------------------------------------------------- 11, 12: checked before training; any folder name


def test_11_sample_steps_beyond_the_schedule_fail_before_training(tmp_path, capsys, phantoms):
    code, _, err = cli(capsys, "ddpm", "--data", phantoms / "train_data", "--out", tmp_path / "o",
                       "--sample-steps", 1001, *TINY_DDPM[:-4])
    refused(code, err, "--sample-steps")
    assert not (tmp_path / "o").exists()


def test_12_a_non_utf8_data_folder_trains_and_samples(tmp_path):
    latin = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9"))
    try:
        images(latin / "infiltration", 4)
    except (UnicodeEncodeError, OSError):
        pytest.skip("this file system refuses non-UTF-8 names")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for argv in (("ddpm", "--data", latin / "infiltration", "--out", latin / "run", *TINY_DDPM),
                 ("sample", "--checkpoint", latin / "run" / "checkpoint.pt", "--out", latin / "s", "-n", 2, *DDIM2)):
        r = subprocess.run([sys.executable, "main.py", *map(os.fsencode, map(str, argv))], cwd=ROOT, env=env,
                           capture_output=True)
        assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr[-2000:]
    assert os.fsencode(load_checkpoint(latin / "run" / "checkpoint.pt")["args"]["data"]) == os.fsencode(latin / "infiltration")
    assert len(pngs(latin / "s")) == 3


# --------------------------------------------------------------------------- 14, 15: damaged checkpoints and weight files


@pytest.mark.parametrize("which, drop", [("ddpm", "optimizer"), ("ddpm", "rng"), ("gan", "opt_d"), ("gan", "config"),
                                         ("sample-gan", "generator"), ("sample-ddpm", "config")])
def test_14_checkpoints_with_missing_keys_are_one_line(tmp_path, capsys, phantoms, tiny_ddpm, tiny_gan, which, drop):
    src = tiny_gan if "gan" in which else tiny_ddpm
    run = tmp_path / "run"
    ckpt = load_checkpoint(src)
    del ckpt[drop]
    save_checkpoint(ckpt, run / "checkpoint.pt")
    before = snapshot(run)
    if which.startswith("sample"):
        call = ("sample", "--checkpoint", run / "checkpoint.pt", "--out", tmp_path / "s", "-n", 2, *DDIM2)
    else:
        call = (which, "--data", phantoms / "train_data", "--out", run, "--resume", "--device", "cpu")
    code, _, err = cli(capsys, *call)
    refused(code, err, repr(drop))
    assert snapshot(run)["checkpoint.pt"] == before["checkpoint.pt"]


def test_14_a_checkpoint_whose_weights_do_not_fit_is_one_line(tmp_path, capsys, phantoms, tiny_ddpm):
    run = tmp_path / "run"
    ckpt = load_checkpoint(tiny_ddpm)
    ckpt["model"].pop(next(iter(ckpt["model"])))
    save_checkpoint(ckpt, run / "checkpoint.pt")
    code, _, err = cli(capsys, "ddpm", "--data", phantoms / "train_data", "--out", run, "--resume", "--device", "cpu")
    refused(code, err, "cannot restore 'model'")


def _diffusers_folder(folder: Path, config) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    header = b"{}"
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    return folder


def test_15_odd_config_json_and_safetensors_headers_are_one_line(tmp_path, capsys, phantoms):
    good = {"block_out_channels": [128, 256, 256, 256], "down_block_types": ["DownBlock2D"] * 4,
            "up_block_types": ["UpBlock2D"] * 4, "layers_per_block": 2, "norm_num_groups": 32}
    variants = [(dict(good, norm_num_groups=7), "norm_num_groups"), (dict(good, block_out_channels=[]), "block_out"),
                (dict(good, norm_eps=None), "norm_eps"), (dict(good, norm_num_groups=0), "norm_num_groups"),
                (dict(good, down_block_types=[1, 2]), "config.json"), ([1, 2], "config.json"), ("text", "config.json")]
    for i, (config, word) in enumerate(variants):
        folder = _diffusers_folder(tmp_path / f"cfg{i}", config)
        code, _, err = cli(capsys, "ddpm", "--finetune", "--pretrained", folder, "--data", phantoms / "train_data",
                           "--out", tmp_path / f"o{i}", "--max-steps", 1, "--device", "cpu")
        refused(code, err, "config.json", word)
        assert not (tmp_path / f"o{i}" / "checkpoint.pt").exists()
    for i, header in enumerate((b"[1, 2]", b'"text"', b"3", b'{"w": 5}')):
        f = tmp_path / f"w{i}.safetensors"
        f.write_bytes(len(header).to_bytes(8, "little") + header)
        code, _, err = cli(capsys, "ddpm", "--finetune", "--pretrained", f, "--data", phantoms / "train_data",
                           "--out", tmp_path / f"w{i}", "--max-steps", 1, "--device", "cpu")
        refused(code, err, "safetensors")


# --------------------------------------------------------------------------- 17: wild learning rates


def test_17_an_exploding_gan_is_warned_about_or_stopped(tmp_path, capsys, phantoms):
    code, out, err = cli(capsys, "gan", "--data", phantoms / "train_data", "--out", tmp_path / "g",
                         *TINY_GAN[:-2], "--lr-g", "1e9", "--lr-d", "1e9", "--device", "cpu")
    if code != 0:
        line = refused(code, err)
        assert "learning rate" in line or "non-finite" in line, line
        assert not (tmp_path / "g" / "checkpoint.pt").exists() or \
            first_nonfinite(load_checkpoint(tmp_path / "g" / "checkpoint.pt")) is None
    else:
        assert "warning: a loss reached" in out + err
        assert "a loss reached" in (tmp_path / "g" / "warnings.log").read_text()


def test_17_the_loss_ceiling_warns_once_per_episode():
    m = gan_run.CollapseMonitor(window=1000)
    said = [m(s, {"loss_d": loss, "loss_g": 0.7}) for s, loss in enumerate([1.3, 250.0, 1e21, 1.2, 101.0], 1)]
    assert [bool(w) for w in said] == [False, True, False, False, True]
    assert "a loss reached 250" in said[1] and "--lr-g" in said[1]
    assert not m(6, {"loss_d": 1.0, "loss_g": dcgan.LOSS_CEILING})  # the bound itself is still sane


# --------------------------------------------------------------------------- the property: nothing lost


def test_no_generator_command_deletes_or_changes_a_file_it_did_not_write(tmp_path, capsys, phantoms, tiny_ddpm):
    work = tmp_path / "w"
    sentinels = [work / "keep.txt", work / "ddpm" / "notes.txt", work / "ddpm" / "loss.csv.bak",
                 work / "samples" / "notes.txt", work / "samples" / "mine.png", work / "gan" / "notes.txt",
                 work / "gan" / "mine.png", work / "used" / "sample_00000.png", work / "used" / "grid.png"]
    for s in sentinels:
        s.parent.mkdir(parents=True, exist_ok=True)
        s.write_text(f"the user's {s.name}")
    before = snapshot(work)
    data = phantoms / "train_data"
    calls = [
        ("ddpm", "--data", data, "--out", work / "ddpm", *TINY_DDPM),
        ("ddpm", "--data", data, "--out", work / "ddpm", *TINY_DDPM),  # a checkpoint exists: refused
        ("ddpm", "--data", data, "--out", work / "ddpm", *TINY_DDPM, "--max-steps", 3, "--resume"),
        ("gan", "--data", data, "--out", work / "gan", *TINY_GAN),
        ("gan", "--data", work, "--out", work / "gan", *TINY_GAN),  # inside --data: refused
        ("sample", "--checkpoint", tiny_ddpm, "--out", work / "samples", "-n", 2, *DDIM2),
        ("sample", "--checkpoint", tiny_ddpm, "--out", work / "samples", "-n", 2, *DDIM2, "--force"),
        ("sample", "--checkpoint", tiny_ddpm, "--out", work / "used", "-n", 2, *DDIM2, "--force"),  # not its own files
        ("sample", "--checkpoint", work / "ddpm" / "checkpoint.pt", "--out", work / "fresh", "-n", 2, *DDIM2),
        ("sample", "--checkpoint", work / "ddpm" / "checkpoint.pt", "--out", work / "fresh", "-n", 1, *DDIM2, "--force"),
    ]
    codes = [cli(capsys, *call)[0] for call in calls]
    assert codes == [0, 2, 0, 0, 2, 2, 2, 2, 0, 0]
    after = snapshot(work)
    assert {k: after.get(k) for k in before} == before
    assert sorted(p.name for p in (work / "fresh").iterdir()) == [".lock", "grid.png", "sample_00000.png", "samples.json"]
    assert not [p for p in work.rglob(".*") if p.name != ".lock"]  # no temporaries left anywhere
