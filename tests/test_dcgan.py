"""DCGAN baseline: shapes, the original network, training outputs, resume, sampling, collapse warnings,
the end-of-training diversity verdict, and the two presets (DiffAugment, spectral norm, R1; issue 12)."""

import csv
import dataclasses
import functools
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

import dcgan
from training import diffaugment
import main
from study import experiment as study
from plumbing.files import load_checkpoint
from training import gan_run

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
    m = gan_run.CollapseMonitor(window=200)
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
        m = gan_run.CollapseMonitor(every=10, diversity=lambda: next(ratio))
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
    assert gan_run.CollapseMonitor().finish(5) is None  # no diversity measure: nothing to judge


def test_collapse_warning_reaches_the_log(tmp_path, monkeypatch, capsys):
    data = write_phantoms(tmp_path / "data", 8, size=32)
    # A window of 1 with an absurd floor: the first step already counts as the discriminator winning.
    monkeypatch.setattr(gan_run, "CollapseMonitor", functools.partial(gan_run.CollapseMonitor, loss_d_floor=100.0))
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


# --------------------------------------------------------------------------- presets, DiffAugment, SN and R1 (issue 12)


def test_presets_fix_the_update_ratio_and_learning_rates():
    settings = {p: dcgan.TrainConfig(data=".", out=".", preset=p).settings() for p in dcgan.PRESETS}
    assert settings["original"] == dcgan.Preset(g_steps=2, lr_g=2e-4, lr_d=1e-4, augment="", spectral_norm=False,
                                                r1_gamma=0.0)
    assert settings["modern"] == dcgan.Preset(g_steps=1, lr_g=2e-4, lr_d=2e-4, augment="translation,cutout",
                                              spectral_norm=True, r1_gamma=0.0)
    assert settings["modern-r1"] == dataclasses.replace(settings["modern"], spectral_norm=False, r1_gamma=1.0)
    assert dcgan.TrainConfig(data=".", out=".").preset == "modern"  # the default, and so the study's and the demo's
    assert study.gan_recipe(size=32, max_steps=300, batch_size=32).settings() == settings["modern"]
    given = dcgan.TrainConfig(data=".", out=".", preset="original", lr_d=3e-4, g_steps=1).settings()
    assert (given.g_steps, given.lr_g, given.lr_d, given.augment) == (1, 2e-4, 3e-4, "")  # options win over the preset


def tiny_step(preset: str, size: int = 32):
    """make_step on tiny networks of `preset`, with its optimisers' step() calls counted."""
    cfg = dcgan.DCGANConfig(size=size, g_width=4, d_width=4)
    tcfg = dcgan.TrainConfig(data=".", out=".", preset=preset)
    p = tcfg.settings()
    G, D = dcgan.Generator(cfg), dcgan.Discriminator(cfg, p)
    opt_g, opt_d = (torch.optim.Adam(m.parameters(), lr) for m, lr in ((G, p.lr_g), (D, p.lr_d)))
    calls = []
    for name, opt in (("G", opt_g), ("D", opt_d)):
        opt.step = functools.partial(lambda step, n: (calls.append(n), step())[1], opt.step, name)
    step = dcgan.make_step(G, D, opt_g, opt_d, cfg, tcfg, torch.device("cpu"), gan_run.augmentation(p.augment))
    return step, calls, (opt_g, opt_d)


@pytest.mark.parametrize("preset, order, lrs", [("original", ["D", "G", "G"], (2e-4, 1e-4)),
                                                ("modern", ["D", "G"], (2e-4, 2e-4)),
                                                ("modern-r1", ["D", "G"], (2e-4, 2e-4))])
def test_update_ratio_and_learning_rates_in_the_step(preset, order, lrs):
    step, calls, opts = tiny_step(preset)
    torch.manual_seed(0)
    metrics = step(torch.rand(4, 1, 32, 32) * 2 - 1)
    assert calls == order and tuple(o.param_groups[0]["lr"] for o in opts) == lrs
    assert ("r1" in metrics) == (preset == "modern-r1")  # the penalty is computed (and logged) in its preset only
    if preset == "modern-r1":
        assert math.isfinite(metrics["r1"]) and metrics["r1"] > 0


def test_diffaugment_is_applied_to_real_and_fake_in_both_steps(monkeypatch):
    seen, augment = [], diffaugment.diff_augment

    def recording(x, policy):
        seen.append((x, policy))
        return augment(x, policy)

    monkeypatch.setattr(gan_run.diffaugment, "diff_augment", recording)
    for preset, policy in (("modern", "translation,cutout"), ("original", "")):
        seen.clear()
        step, _, _ = tiny_step(preset)
        real = torch.rand(4, 1, 32, 32) * 2 - 1
        step(real)
        # D step: T(real), T(fake); then T(fake) in each G step: one policy for all of them
        assert len(seen) == 2 + dcgan.PRESETS[preset].g_steps and {p for _, p in seen} == {policy}
        assert seen[0][0] is real and all(x.shape == real.shape for x, _ in seen)
        assert not seen[1][0].requires_grad and seen[2][0].requires_grad  # fake: detached for D, G's graph for G


def test_diffaugment_is_differentiable_down_to_the_generators_input():
    torch.manual_seed(0)
    cfg = dcgan.DCGANConfig(size=32, g_width=4, d_width=4)
    G, D = dcgan.Generator(cfg), dcgan.Discriminator(cfg, dcgan.PRESETS["modern"])
    z = dcgan.sample_noise(4, cfg).requires_grad_(True)
    D(diffaugment.diff_augment(G(z), "color,translation,cutout")).sum().backward()
    assert torch.isfinite(z.grad).all() and (z.grad.flatten(1).abs().sum(1) > 0).all()  # every image's z is reached
    with pytest.raises(ValueError, match="unknown DiffAugment policy 'flip'"):
        diffaugment.diff_augment(z, "translation,flip")


def test_translation_is_a_whole_pixel_shift_with_zeros_entering():
    torch.manual_seed(0)
    x = torch.arange(1, 64 * 32 * 32 + 1, dtype=torch.float32).reshape(64, 1, 32, 32)  # every pixel unique, not 0
    y = diffaugment.translation(x)
    assert y.shape == x.shape
    shifts = set()
    for xi, yi in zip(x[:, 0], y[:, 0]):
        r, c = (yi > 0).nonzero()[0].tolist()
        sr, sc = [int(v) - a for v, a in zip((xi == yi[r, c]).nonzero()[0], (r, c))]  # source - destination
        assert max(abs(sr), abs(sc)) <= 4  # 0.125 of 32
        shifts.add((sr, sc))
        rows, cols = torch.arange(32).view(-1, 1) + sr, torch.arange(32).view(1, -1) + sc
        inside = (rows >= 0) & (rows < 32) & (cols >= 0) & (cols < 32)
        expect = torch.where(inside, xi[rows.clamp(0, 31), cols.clamp(0, 31)], torch.zeros(()))
        assert torch.equal(yi, expect)
    assert len(shifts) > 20  # drawn per image


def test_cutout_erases_one_square_of_half_the_side():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 32, 32) + 1  # no zeros of its own
    y = diffaugment.cutout(x)
    assert y.shape == x.shape
    erased = y == 0
    assert torch.equal(erased[:, :1].expand_as(erased), erased)  # the same square in every channel
    areas = []
    for e in erased[:, 0]:
        rows, cols = e.any(1).nonzero().flatten(), e.any(0).nonzero().flatten()
        box = e[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.all() and len(rows) <= 16 and len(cols) <= 16  # one rectangle, clipped from 16x16
        areas.append(int(e.sum()))
    assert max(areas) == 16 * 16 and min(areas) >= 8 * 8  # the centre lies in the image: at least a quarter shows
    assert torch.equal(y[~erased], x[~erased])


def test_colour_is_brightness_and_contrast_per_image():
    torch.manual_seed(0)
    x = torch.rand(256, 1, 8, 8) * 2 - 1
    shift = (diffaugment.brightness(x) - x).flatten(1)
    assert torch.allclose(shift, shift[:, :1].expand_as(shift)) and shift.abs().max() <= 0.5
    y = diffaugment.contrast(x)
    ratio = (y - y.mean((1, 2, 3), keepdim=True)) / (x - x.mean((1, 2, 3), keepdim=True))
    assert ratio.min() >= 0.5 - 1e-5 and ratio.max() <= 1.5 + 1e-5
    torch.testing.assert_close(y.mean((1, 2, 3)), x.mean((1, 2, 3)))  # contrast keeps each image's mean


def test_modern_discriminator_is_spectrally_normalised_without_batchnorm():
    cfg = dcgan.DCGANConfig(size=64, g_width=4, d_width=8)
    D = dcgan.Discriminator(cfg, dcgan.PRESETS["modern"])
    convs = [m for m in D.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 and all(torch.nn.utils.parametrize.is_parametrized(m, "weight") for m in convs)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in D.modules())
    for _ in range(30):  # power iterations (one per training-mode forward) converge on sigma(W)
        D(torch.randn(2, 1, 64, 64))
    for m in convs:  # W / sigma(W) has spectral norm 1 (Miyato et al. 2018, Eq. 8)
        assert torch.linalg.matrix_norm(m.weight.flatten(1), ord=2).item() == pytest.approx(1.0, abs=0.02)
    original = dcgan.Discriminator(cfg, dcgan.PRESETS["original"])
    assert [type(m) for m in original.modules()] == [type(m) for m in dcgan.Discriminator(cfg).modules()]
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in original.modules())


def test_r1_penalty_of_a_linear_discriminator():
    w = (torch.arange(12, dtype=torch.float32).reshape(1, 3, 2, 2) / 10).requires_grad_(True)
    real = torch.randn(5, 3, 2, 2, requires_grad=True)
    logits = (real * w).flatten(1).sum(1)  # D(x) = <w, x>: grad_x D = w for every image
    r1 = dcgan.r1_penalty(logits, real)
    assert r1.item() == pytest.approx((w ** 2).sum().item(), rel=1e-6)  # ||w||^2 = 5.06
    r1.backward()  # create_graph: the penalty's own gradient reaches D's weights, d||w||^2/dw = 2w
    torch.testing.assert_close(w.grad, 2 * w.detach())
    D = dcgan.Discriminator(dcgan.DCGANConfig(size=32, d_width=4), dcgan.PRESETS["modern-r1"])
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in D.modules())  # a per-image penalty: no batch stats
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in D.modules())  # R1 instead of SN


def test_a_checkpoint_without_a_preset_resumes_as_the_original(tmp_path):
    data = write_phantoms(tmp_path / "data", 12, size=32)
    common = ["--size", 32, "--batch-size", 4]
    assert gan(data, tmp_path / "full", *common, "--max-steps", 4, "--preset", "original") == 0
    assert gan(data, tmp_path / "old", *common, "--max-steps", 2, "--preset", "original") == 0
    path = tmp_path / "old" / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    assert ckpt["preset"] == "original" and ckpt["train"]["g_steps"] == 2
    del ckpt["preset"]  # as written before presets existed: no preset, the old "train" entry
    ckpt["train"] = {"lr_g": 2e-4, "lr_d": 1e-4, "betas": [0.5, 0.999], "g_steps": 2, "amp": False}
    torch.save(ckpt, path)
    assert torch.equal(dcgan.generate(load_checkpoint(path), 4, seed=1), dcgan.generate(ckpt, 4, seed=1))
    assert gan(data, tmp_path / "old", *common, "--max-steps", 4, "--resume") == 0  # the default preset: left out
    full, old = load_checkpoint(tmp_path / "full" / "checkpoint.pt"), load_checkpoint(path)
    assert old["preset"] == "original" and old["opt_d"]["param_groups"][0]["lr"] == 1e-4
    for key in ("generator", "discriminator"):  # bit for bit the original run
        assert all(torch.equal(t, old[key][k]) for k, t in full[key].items()), key


def test_preset_errors_are_one_line(tmp_path, capsys):
    data = write_phantoms(tmp_path / "data", 4, size=32)
    with pytest.raises(SystemExit) as exit_:  # argparse refuses it before main's handler
        gan(data, tmp_path / "run", "--preset", "fancy")
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith("error: ") and "--preset" in err and "'fancy'" in err
    assert len(err.splitlines()) == 1
    assert gan(data, tmp_path / "run", "--size", 32, "--batch-size", 4, "--max-steps", 1) == 0  # modern
    assert gan(data, tmp_path / "run", "--size", 32, "--max-steps", 2, "--resume", "--preset", "original") == 2
    assert capsys.readouterr().err.strip().endswith("the checkpoint was trained with --preset modern, not original")
    with pytest.raises(main.CLIError, match="--preset must be one of original, modern"):
        dcgan.TrainConfig(data=".", out=".", preset="fancy")


def test_a_short_modern_run_on_phantoms_does_not_collapse(tmp_path):
    # The monitor's measure (diversity.txt: 16 fixed-noise samples' spread over the real images', as in the study)
    # at step 100, the end. At the demo's budget (300 steps, default widths) the modern preset measured 0.62-0.68
    # on phantoms (README). One thread: about 9 s of CPU; two threads on a busy 2-core machine spin for minutes.
    data = embedded_phantoms(tmp_path / "data", 48, 32)
    out, threads = tmp_path / "run", torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert gan(data, out, "--size", 32, "--batch-size", 16, "--max-steps", 100, "--num-samples", 16,
                   "--no-epoch-checkpoints") == 0
    finally:
        torch.set_num_threads(threads)
    line = (out / "diversity.txt").read_text()
    worst, end = (float(v) for v in re.search(r"worst ([\d.]+) at step \d+; at the end \(step 100\) ([\d.]+)",
                                              line).groups())
    assert min(worst, end) > gan_run.DIVERSITY_FLOOR and line.strip().endswith("not collapsed"), line
    assert not (out / "warnings.log").exists()
