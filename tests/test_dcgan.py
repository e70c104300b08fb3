"""DCGAN baseline: shapes, the original network, training outputs, resume, sampling, collapse warnings and
the end-of-training diversity verdict."""

import csv
import functools
import math

import numpy as np
import pytest
import torch
from PIL import Image

import dcgan
import main
from common import load_checkpoint

TINY = ["--g-width", "8", "--d-width", "8"]  # small networks: the loop, not the model, is under test


def write_phantoms(root, n, size=64, seed=0):
    """Structured grey PNGs: two dark 'lungs' in a bright body, jittered, with noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        img = np.full((size, size), 200.0)
        for cx in (0.32, 0.68):
            cx += rng.normal(0, 0.03)
            cy, rx, ry = 0.5 + rng.normal(0, 0.03), 0.14 + rng.normal(0, 0.01), 0.3 + rng.normal(0, 0.02)
            img[((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1] = 60
        img += rng.normal(0, 8, img.shape)
        folder = root / ("infiltration" if i % 2 else "no_finding")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"p{i:03d}.png")
    return root


def gan(data, out, *extra):
    return main.main(["gan", "--data", str(data), "--out", str(out), "--device", "cpu", *TINY, *map(str, extra)])


@pytest.mark.parametrize("size", dcgan.SIZES)
def test_shapes_every_size(size):
    cfg = dcgan.DCGANConfig(size=size)
    G, D = dcgan.Generator(cfg), dcgan.Discriminator(cfg)
    x = G(torch.randn(2, cfg.latent_dim, 1, 1))
    assert x.shape == (2, 1, size, size) and x.abs().max() <= 1
    assert D(x).shape == (2,)
    # D always reaches 8x8 before its final 8x8 conv; G always starts at 4x4.
    assert size / 2 ** len(cfg.d_widths) == 8 and 4 * 2 ** len(cfg.g_widths) == size


def test_default_is_the_original_network():
    cfg = dcgan.DCGANConfig(channels=3)  # the original experiment's RGB 256x256
    G, D = dcgan.Generator(cfg), dcgan.Discriminator(cfg)
    g_convs = [(m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0]) for m in G.modules()
               if isinstance(m, torch.nn.ConvTranspose2d)]
    assert g_convs == [(100, 1024, 4, 1), (1024, 512, 4, 2), (512, 256, 4, 2), (256, 128, 4, 2),
                       (128, 64, 4, 2), (64, 32, 4, 2), (32, 3, 4, 2)]
    d_convs = [(m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0]) for m in D.modules()
               if isinstance(m, torch.nn.Conv2d)]
    assert d_convs == [(3, 64, 4, 2), (64, 128, 4, 2), (128, 256, 4, 2), (256, 512, 4, 2),
                       (512, 1024, 4, 2), (1024, 1, 8, 1)]
    # BatchNorm after every layer but G's output and D's input and logit layers.
    assert [m.num_features for m in G.modules() if isinstance(m, torch.nn.BatchNorm2d)] == [1024, 512, 256, 128, 64, 32]
    assert [m.num_features for m in D.modules() if isinstance(m, torch.nn.BatchNorm2d)] == [128, 256, 512, 1024]
    n_g, n_d = dcgan.count_parameters(G), dcgan.count_parameters(D)
    expect_g = sum(a * b * k * k for a, b, k, _ in g_convs) + 2 * (1024 + 512 + 256 + 128 + 64 + 32)
    expect_d = sum(a * b * k * k for a, b, k, _ in d_convs) + 2 * (128 + 256 + 512 + 1024)
    print(f"original DCGAN 256x256x3: generator {n_g:,} parameters, discriminator {n_d:,}")
    assert (n_g, n_d) == (expect_g, expect_d) == (12_817_856, 11_213_568)
    # DCGAN initialisation: conv weights N(0, 0.02), BatchNorm scale N(1, 0.02).
    w = D.body[-1][0].weight
    assert abs(w.mean().item()) < 1e-3 and abs(w.std().item() - 0.02) < 1e-3
    assert abs(G.project[1].weight.mean().item() - 1) < 0.01


def embedded_phantoms(root, n, size):
    """The project's phantoms (`main.py extract --phantoms`)."""
    assert main.main(["extract", "--phantoms", str(n), "--out", str(root), "--size", str(size)]) == 0
    return root


def test_training_writes_outputs_and_discriminator_learns(tmp_path):
    data = embedded_phantoms(tmp_path / "data", 32, 64)
    out = tmp_path / "run"
    # --lr-d 1e-3: with the original 1e-4 the tiny test discriminator (12k parameters) falls
    # behind its generator within a few steps; a faster D must learn the real/fake split.
    assert gan(data, out, "--size", 64, "--batch-size", 8, "--epochs", 3, "--lr-d", 1e-3, "--num-samples", 16) == 0
    for name in ("checkpoint.pt", "checkpoint_epoch001.pt", "checkpoint_epoch003.pt", "samples_epoch001.png",
                 "samples_epoch003.png", "samples_latest.png", "loss.csv"):
        assert (out / name).is_file(), name
    with open(out / "loss.csv") as f:
        rows = list(csv.DictReader(f))
    steps = 3 * (len(list((data / "train_data").rglob("*.png"))) // 8)  # an extract root: its train split only
    assert len(rows) == steps and {"loss_d", "loss_g", "d_real", "d_fake"} <= set(rows[0])
    loss_d = [float(r["loss_d"]) for r in rows]
    gap = [float(r["d_real"]) - float(r["d_fake"]) for r in rows]
    assert all(math.isfinite(v) for v in loss_d)
    assert np.mean(loss_d[-3:]) < loss_d[0]  # D learns to tell real from fake
    assert np.mean(gap[-3:]) > gap[0]
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["kind"] == "dcgan" and ckpt["step"] == steps and ckpt["epoch"] == 3
    assert ckpt["config"] == {"size": 64, "channels": 1, "latent_dim": 100, "g_width": 8, "d_width": 8}
    assert {"generator", "discriminator", "opt_g", "opt_d", "rng"} <= set(ckpt)
    grid = Image.open(out / "samples_epoch001.png")
    assert grid.size == (8 * (64 + 2) + 2, 2 * (64 + 2) + 2)  # 16 fixed-noise samples, 8 per row

    # `main.py sample` reads the GAN checkpoint and writes PNGs of the trained size.
    samples = tmp_path / "samples"
    assert main.main(["sample", "--checkpoint", str(out / "checkpoint.pt"), "--out", str(samples), "-n", "3",
                      "--device", "cpu"]) == 0
    pngs = sorted(samples.glob("sample_*.png"))
    assert len(pngs) == 3 and all(Image.open(p).size == (64, 64) for p in pngs)

    # generate() is deterministic for a seed and independent of the batch size.
    a = dcgan.generate(ckpt, 5, seed=3, batch_size=5, device="cpu")
    b = dcgan.generate(ckpt, 5, seed=3, batch_size=2, device="cpu")
    assert a.shape == (5, 1, 64, 64) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.equal(a, dcgan.generate(ckpt, 5, seed=4, batch_size=5, device="cpu"))


def test_resume_is_bit_exact(tmp_path):
    data = write_phantoms(tmp_path / "data", 12, size=32)
    common = ["--size", 32, "--batch-size", 4, "--epochs", 5]  # 3 steps per epoch: the resume crosses an epoch
    assert gan(data, tmp_path / "full", *common, "--max-steps", 4) == 0
    assert gan(data, tmp_path / "split", *common, "--max-steps", 2) == 0
    assert gan(data, tmp_path / "split", *common, "--max-steps", 4, "--resume") == 0
    full, split = load_checkpoint(tmp_path / "full" / "checkpoint.pt"), load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert full["step"] == split["step"] == 4
    for key in ("generator", "discriminator"):
        for name, t in full[key].items():
            assert torch.equal(t, split[key][name]), f"{key}.{name}"
    for key in ("opt_g", "opt_d"):
        for i, s in full[key]["state"].items():
            for name, t in s.items():
                assert torch.equal(t, split[key]["state"][i][name]), f"{key}[{i}].{name}"
    with open(tmp_path / "split" / "loss.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]


def test_amp_runs(tmp_path):
    data = write_phantoms(tmp_path / "data", 4, size=32)
    assert gan(data, tmp_path / "run", "--size", 32, "--batch-size", 4, "--max-steps", 1, "--amp") == 0
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["train"]["amp"] is True


@pytest.mark.slow
def test_compile_matches_eager_training(tmp_path):
    data = write_phantoms(tmp_path / "data", 8, size=32)
    common = ["--size", 32, "--batch-size", 4, "--max-steps", 2]
    assert gan(data, tmp_path / "eager", *common) == 0
    assert gan(data, tmp_path / "compiled", *common, "--compile") == 0
    rows = [list(csv.DictReader(open(tmp_path / run / "loss.csv"))) for run in ("eager", "compiled")]
    assert float(rows[0][0]["loss_d"]) == pytest.approx(float(rows[1][0]["loss_d"]), abs=1e-4)  # first step: same maths
    eager, compiled = (load_checkpoint(tmp_path / run / "checkpoint.pt")["generator"] for run in ("eager", "compiled"))
    # Adam's first steps move each weight by about lr * sign(grad), so allow a few lr-sized differences
    assert max((eager[k] - compiled[k]).abs().max().item() for k in eager) < 2e-3


def test_collapse_monitor_fires_on_a_winning_discriminator():
    m = dcgan.CollapseMonitor(window=200)
    healthy = [m(s, {"loss_d": 1.2, "d_real": 0.6, "d_fake": 0.4}) for s in range(1, 301)]
    assert not any(healthy)
    won = [m(s, {"loss_d": 0.01, "d_real": 0.999, "d_fake": 0.001}) for s in range(301, 701)]
    fired = [i for i, w in enumerate(won) if w]
    assert fired == [199] and "discriminator has won" in won[199]  # once, after a full window
    m(701, {"loss_d": 1.0, "d_real": 0.6, "d_fake": 0.4})  # recovers: re-armed
    again = [m(s, {"loss_d": 0.01, "d_real": 0.999, "d_fake": 0.001}) for s in range(702, 902)]
    assert sum(bool(w) for w in again) == 1



def test_collapse_is_judged_at_the_end_with_the_worst_point_beside_it(tmp_path):
    def monitor(*ratios):
        ratio = iter(ratios)
        m = dcgan.CollapseMonitor(every=10, diversity=lambda: next(ratio))
        assert not any(m(s, {"loss_d": 1.0}) for s in range(1, 21))  # measured at 10 and 20, no warning mid-run
        return m

    # Issue 16: samples alike at step 10 and diverse at the end leave no standing warning.
    line, collapsed = monitor(0.02, 0.5, 0.9).finish(25)
    assert not collapsed and line.endswith("worst 0.020 at step 10; at the end (step 25) 0.900: not collapsed"), line
    monitor(0.02, 0.5, 0.9).report(25, tmp_path)
    assert (tmp_path / "diversity.txt").read_text() == line + "\n" and not (tmp_path / "warnings.log").exists()

    # Collapsed at the end: a warning, in warnings.log as well, with the worst point (here the end itself).
    line, collapsed = monitor(0.6, 0.1, 0.05).finish(22)
    assert collapsed and line.endswith("worst 0.050 at step 22; at the end (step 22) 0.050: mode collapse: the "
                                       "samples are nearly identical"), line
    monitor(0.6, 0.1, 0.05).report(22, tmp_path)
    assert (tmp_path / "warnings.log").read_text() == f"step 22: {line}\n"
    assert (tmp_path / "diversity.txt").read_text() == line + "\n"
    assert dcgan.CollapseMonitor().finish(5) is None  # no diversity measure: nothing to judge


def test_collapse_warning_reaches_the_log(tmp_path, monkeypatch, capsys):
    data = write_phantoms(tmp_path / "data", 8, size=32)
    # A window of 1 with an absurd floor: the first step already counts as the discriminator winning.
    monkeypatch.setattr(dcgan, "CollapseMonitor", functools.partial(dcgan.CollapseMonitor, loss_d_floor=100.0))
    out = tmp_path / "run"
    assert gan(data, out, "--size", 32, "--batch-size", 4, "--max-steps", 1, "--collapse-window", 1) == 0
    assert "step 1: discriminator has won" in (out / "warnings.log").read_text()
    assert "warning: discriminator has won" in capsys.readouterr().out
    assert "at the end (step 1)" in (out / "diversity.txt").read_text()  # the end state, measured once more


@pytest.mark.parametrize("extra, message", [
    (["--size", "100"], "--size 100: must be a power of two"),
    (["--epochs", "0"], "--epochs must be at least 1"),
])
def test_bad_input_is_one_line(tmp_path, capsys, extra, message):
    data = write_phantoms(tmp_path / "data", 2, size=32)
    assert gan(data, tmp_path / "run", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def test_missing_data_and_resume_without_checkpoint(tmp_path, capsys):
    assert gan(tmp_path / "nowhere", tmp_path / "run") == 2
    assert "data folder not found" in capsys.readouterr().err
    data = write_phantoms(tmp_path / "data", 2, size=32)
    assert gan(data, tmp_path / "run", "--resume") == 2
    assert "no checkpoint" in capsys.readouterr().err
