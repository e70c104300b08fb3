"""The class-conditional DDPM and classifier-free guidance (issue 12): the class embedding against
diffusers' UNet2DModel(num_class_embeds=...), its zero start, label dropout, the guidance formula,
a real capability check on phantoms, and the command line's refusals."""

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import ddpm
from tools import export as hub
from tools import phantoms
from PIL import Image

from clitools import cli, images as clitools_images, quiet, refused
from plumbing.configs import CLIError
from plumbing.files import load_checkpoint, save_checkpoint
from training import ddpm_run

TINY = dict(block_out_channels=(16, 32), layers_per_block=1, norm_groups=8, sample_size=16)  # ddpm.PRESETS["tiny"]


def conditional_unet(seed: int = 0, random_classes: bool = True) -> ddpm.UNet:
    """A tiny two-class UNet with random weights; random_classes: a random (not zero) class embedding,
    so that the labels change the output."""
    torch.manual_seed(seed)
    model = ddpm.UNet(ddpm.UNetConfig(**TINY, num_classes=2)).eval()
    if random_classes:
        torch.nn.init.normal_(model.class_embedding.weight)
    return model


def inputs(b: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 16, 16, generator=g), torch.randint(0, 1000, (b,), generator=g)


# --------------------------------------------------------------------------- parity with diffusers


def test_conditional_forward_matches_diffusers_and_loads_through_the_key_map(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    config = dict(sample_size=16, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                  attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
                  num_class_embeds=3)  # two classes and the no-label token
    theirs = diffusers.UNet2DModel(**config).eval()  # random weights, its embedding random too
    theirs.save_pretrained(tmp_path)
    ours = ddpm.load_pretrained(tmp_path, download=False).eval()  # config.json and the key map, class_embedding.weight
    assert ours.config.num_classes == 2 and ours.class_embedding.weight.shape == (3, 64)
    x, t = inputs(6)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        diff = (ours(x, t, class_labels=y) - theirs(x, t, class_labels=y).sample).abs().max().item()
        moved = (ours(x, t, class_labels=y) - ours(x, t, class_labels=(y + 1) % 3)).abs().max().item()
        none = (ours(x, t) - theirs(x, t, class_labels=torch.full((6,), 2)).sample).abs().max().item()
    print(f"conditional forward: max |ours - diffusers| = {diff:.3g} (labels move the output by {moved:.3g})")
    assert diff < 1e-4 and none < 1e-4 and moved > 1e-2


def test_class_embedding_export_round_trip(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    model = conditional_unet()
    sd = model.state_dict()
    ckpt = {"kind": "ddpm", "config": asdict(model.config), "image_size": 16, "diffusion": ddpm.GaussianDiffusion().config(),
            "model": sd, "ema": None, "step": 1, "classes": {"no_finding": 0, "infiltration": 1}, "args": {}}
    save_checkpoint(ckpt, tmp_path / "run" / "checkpoint.pt")
    out = hub.export(hub.ExportConfig(checkpoint=tmp_path / "run" / "checkpoint.pt", out=tmp_path / "exported"))
    assert json.loads((out / "unet" / "config.json").read_text())["num_class_embeds"] == 3
    assert "class_labels" in (out / "README.md").read_text()
    back = ddpm.load_pretrained(out / "unet", download=False)
    assert back.config == model.config and all(torch.equal(back.state_dict()[k], v) for k, v in sd.items())
    theirs = diffusers.UNet2DModel.from_pretrained(out / "unet").eval()
    assert torch.equal(theirs.class_embedding.weight, sd["class_embedding.weight"])
    x, t = inputs()
    y = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        diff = (model(x, t, class_labels=y) - theirs(x, t, class_labels=y).sample).abs().max().item()
    print(f"exported conditional UNet: max |ours - diffusers| = {diff:.3g}")
    assert diff < 1e-4


def test_bad_num_class_embeds_in_config_is_one_line(tmp_path):
    base = hub.unet_config_to_diffusers(ddpm.UNetConfig(**TINY))
    for bad in (1, 2.5, "two"):
        with pytest.raises(CLIError, match="num_class_embeds"):
            ddpm.unet_config({**base, "num_class_embeds": bad})
    assert ddpm.unet_config(base)["num_classes"] is None


# --------------------------------------------------------------------------- the zero start, label dropout, guidance


def test_zero_embedding_gives_the_unconditional_output_for_every_label():
    plain = ddpm.UNet(ddpm.UNetConfig(**TINY)).eval()
    conditional = ddpm.with_classes(plain, 2).eval()  # what --finetune --conditional does to the pretrained UNet
    assert conditional.class_embedding.weight.abs().max() == 0
    x, t = inputs()
    with torch.no_grad():
        expected = plain(x, t)
        for label in (0, 1, 2):
            assert torch.equal(conditional(x, t, class_labels=torch.full((4,), label)), expected)
        assert torch.equal(conditional(x, t), expected)
    with pytest.raises(ValueError, match="without classes"):
        plain(x, t, class_labels=torch.zeros(4, dtype=torch.long))
    # from scratch, the rows start N(0, 1) as nn.Embedding's (distinct labels from step 0; docs/ddpm.md)
    torch.manual_seed(0)
    table = ddpm.UNet(ddpm.UNetConfig(**TINY, num_classes=2)).class_embedding.weight  # (3, 64)
    assert 0.8 < table.std().item() < 1.2 and (table[0] - table[1]).abs().min() > 0


def test_label_dropout_rate():
    labels = torch.arange(100_000) % 2
    dropped = ddpm.drop_labels(labels, 0.1, 2, generator=torch.Generator().manual_seed(0))
    n = int((dropped == 2).sum())
    # Binomial(100000, 0.1): SD 94.9; 5 SD either side (a false alarm once in 1.7 million seeds)
    assert abs(n - 10_000) < 5 * math.sqrt(100_000 * 0.1 * 0.9), n
    kept = dropped != 2
    assert torch.equal(dropped[kept], labels[kept])  # a label is dropped or kept, never changed
    assert torch.equal(ddpm.drop_labels(labels, 0.0, 2), labels)


def test_guidance_formula_at_w_0_1_and_2():
    model = conditional_unet()
    x, t = inputs()
    y = torch.tensor([0, 1, 1, 0])
    calls = []
    model.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
    with torch.no_grad():
        cond, uncond = model(x, t, class_labels=y), model(x, t, class_labels=torch.full((4,), 2))
        calls.clear()
        w1, w0, w2 = (ddpm.Guided(model, y, w, 2)(x, t) for w in (1.0, 0.0, 2.0))
        scalar_t = ddpm.Guided(model, y, 2.0, 2)(x, 417)
    assert calls == [4, 4, 8, 8]  # w = 1 and 0: one pass; otherwise both passes in ONE forward of 2B
    assert torch.equal(w1, cond) and torch.equal(w0, uncond)
    assert torch.allclose(w2, uncond + 2 * (cond - uncond), atol=1e-5)
    with torch.no_grad():
        c417, u417 = model(x, 417, class_labels=y), model(x, 417)
    assert torch.allclose(scalar_t, 2 * c417 - u417, atol=1e-5)
    calls.clear()
    with torch.no_grad():  # 2B wider than max_batch: the same guidance in forwards of at most max_batch rows
        split = ddpm.Guided(model, y, 2.0, 2, max_batch=3)(x, t), ddpm.Guided(model, y, 2.0, 2, max_batch=5)(x, 417)
    assert calls == [3, 3, 2, 5, 3]
    assert torch.allclose(split[0], w2, atol=1e-5) and torch.allclose(split[1], scalar_t, atol=1e-5)


def test_guided_model_runs_every_sampler():
    """Guided is a model(x, t) as any other: each sampler of diffusion.py takes it unchanged, and
    w = 1 samples exactly what the conditional network alone samples."""
    model = conditional_unet()
    diffusion = ddpm.GaussianDiffusion()
    y = torch.tensor([1, 0])
    for sampler, steps in (("ddpm", 4), ("ddim", 4), ("dpmpp", 4)):
        noise = lambda: torch.Generator().manual_seed(3)  # noqa: E731
        guided = diffusion.sample(ddpm.Guided(model, y, 1.0, 2), (2, 3, 16, 16), sampler, steps, generator=noise(),
                                  progress=False)
        direct = diffusion.sample(lambda x, t: model(x, t, class_labels=y), (2, 3, 16, 16), sampler, steps,
                                  generator=noise(), progress=False)
        assert torch.equal(guided, direct), sampler
        assert torch.isfinite(diffusion.sample(ddpm.Guided(model, y, 3.0, 2), (2, 3, 16, 16), sampler, steps,
                                               generator=noise(), progress=False)).all()


# --------------------------------------------------------------------------- a real capability check on phantoms


def auroc(scores_0: torch.Tensor, scores_1: torch.Tensor) -> float:
    """P(a class-1 score > a class-0 score), ties half: the Mann-Whitney form of the AUROC."""
    diff = scores_1[:, None] - scores_0[None, :]
    return ((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean()).item()


def logistic_regression(x: torch.Tensor, y: torch.Tensor):
    """A linear classifier on standardised pixels x (N, D) in [0, 1], labels y (N,) 0/1 -> its logit function."""
    x, y = x.double(), y.double()
    mu, sd = x.mean(0), x.std(0) + 1e-3
    torch.manual_seed(0)
    clf = torch.nn.Linear(x.shape[1], 1).double()
    opt = torch.optim.Adam(clf.parameters(), 1e-2, weight_decay=1e-3)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(clf((x - mu) / sd)[:, 0], y).backward()
        opt.step()
    return lambda z: clf((z.double() - mu) / sd)[:, 0].detach()


def test_guided_samples_carry_the_class_on_phantoms(tmp_path):
    """One tiny conditional DDPM, trained on both classes of phantoms with the from-scratch recipe (v-prediction,
    cosine schedule, given explicitly), draws at w = 2 samples that (a) train a classifier that tells the REAL test
    phantoms apart clearly better than chance (train on synthetic, test on real) and (b) a classifier trained on
    real phantoms tells apart far better than the same model's unguided (w = 0) samples. At 8 px (the opacities
    survive as brighter lungs) so that it runs in about a minute. Phantoms are drawings: this proves the machinery
    (labels in, labels out), not X-rays."""
    size, n = 8, 128
    phantoms.write_phantoms(400, tmp_path / "ph", size=32, seed=0)  # 280 train, 80 test
    ckpt_path = ddpm_run.train(ddpm_run.TrainConfig(
        data=tmp_path / "ph" / "train_data", out=tmp_path / "run", conditional=True, preset="tiny", image_size=size,
        prediction="v_prediction", beta_schedule="cosine", max_steps=1000, batch_size=32, lr=3e-3, warmup=20,
        ema_decay=0.99, num_samples=2, sample_steps=1, device="cpu"))
    train, test = (data.load_split(tmp_path / "ph", split, size) for split in ("train", "test"))
    real_clf = logistic_regression(train.images.flatten(1) / 255, train.labels)
    t = real_clf(test.images.flatten(1) / 255)
    real = auroc(t[test.labels == 0], t[test.labels == 1])
    ckpt = load_checkpoint(ckpt_path)
    kw = dict(n=n, batch_size=n, device=torch.device("cpu"), sampler="ddim", steps=20)
    fake = {w: [ddpm.generate(ckpt, class_name=c, guidance=w, seed=1 + i, **kw).mean(dim=1).flatten(1) * 0.5 + 0.5
                for i, c in enumerate(("no_finding", "infiltration"))] for w in (0.0, 2.0)}  # (n, S*S) in [0, 1]
    apart = {w: auroc(real_clf(f[0]), real_clf(f[1])) for w, f in fake.items()}
    tstr_clf = logistic_regression(torch.cat(fake[2.0]), torch.cat([torch.zeros(n), torch.ones(n)]))
    t = tstr_clf(test.images.flatten(1) / 255)
    tstr = auroc(t[test.labels == 0], t[test.labels == 1])
    print(f"real-phantom classifier: AUROC {real:.3f} on real test phantoms; samples' classes apart {apart[0.0]:.3f} "
          f"at w = 0, {apart[2.0]:.3f} at w = 2. Trained on the w = 2 samples: AUROC {tstr:.3f} on real test phantoms")
    # chance: the AUROC of 40 + 40 test phantoms has SD sqrt(81 / (12 * 40 * 40)) = 0.065, so 0.70 is 3 SD above
    # 0.5; two independent AUROCs of 128 + 128 samples at chance differ with SD 0.051, so 0.25 is 5 SD
    assert real > 0.85 and tstr > 0.70 and apart[2.0] > apart[0.0] + 0.25


# --------------------------------------------------------------------------- the command line


def class_folders(root: Path, n: int = 4, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for cls in data.CLASSES:
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    """A two-step conditional tiny DDPM trained through the command line, and an unconditional one."""
    root = class_folders(tmp_path_factory.mktemp("classes"))
    runs = tmp_path_factory.mktemp("runs")
    common_args = ["--data", root, "--preset", "tiny", "--image-size", "16", "--batch-size", "4", "--max-steps", "2",
                   "--num-samples", "2", "--sample-steps", "1", "--device", "cpu"]
    assert quiet("ddpm", *common_args, "--out", runs / "cfg", "--conditional", "--label-dropout", "0.5") == 0
    assert quiet("ddpm", *common_args, "--out", runs / "plain") == 0
    return root, runs / "cfg" / "checkpoint.pt", runs / "plain" / "checkpoint.pt"


def test_conditional_training_stores_its_classes_and_resumes(conditional_run, tmp_path):
    root, cfg_ckpt, plain_ckpt = conditional_run
    ckpt = load_checkpoint(cfg_ckpt)
    assert ckpt["classes"] == {"no_finding": 0, "infiltration": 1} and ckpt["config"]["num_classes"] == 2
    assert ckpt["args"]["conditional"] and ckpt["args"]["label_dropout"] == 0.5
    assert ckpt["model"]["class_embedding.weight"].shape == (3, 64)
    plain = load_checkpoint(plain_ckpt)
    assert "classes" not in plain and plain["config"]["num_classes"] is None
    assert not any(k.startswith("class_embedding") for k in plain["model"])


def test_sample_a_class_with_guidance(conditional_run, tmp_path, capsys):
    _, cfg_ckpt, _ = conditional_run
    base = ["sample", "--checkpoint", cfg_ckpt, "-n", "3", "--sampler", "ddim", "--steps", "2", "--device", "cpu"]
    code, out, err = cli(capsys, *base, "--out", tmp_path / "a", "--class", "infiltration", "--guidance", "2")
    assert code == 0, err
    assert json.loads((tmp_path / "a" / "samples.json").read_text())["class"] == "infiltration"
    ckpt = load_checkpoint(cfg_ckpt)
    kw = dict(seed=0, batch_size=2, device=torch.device("cpu"), sampler="ddim", steps=2)
    a, b = (ddpm.generate(ckpt, 3, class_name="infiltration", guidance=2.0, **kw) for _ in range(2))
    assert torch.equal(a, b) and torch.isfinite(a).all()  # deterministic, batches of 2 and 1
    # w = 0 is the unconditional model whatever the class
    assert torch.equal(ddpm.generate(ckpt, 3, class_name="infiltration", guidance=0.0, **kw),
                       ddpm.generate(ckpt, 3, class_name="no_finding", guidance=0.0, **kw))


@pytest.mark.parametrize("which, args, words", [
    ("plain", ["--class", "infiltration"], ["--class", "unconditional"]),
    ("plain", ["--guidance", "2"], ["--guidance", "class-conditional"]),
    ("conditional", [], ["class-conditional", "--class", "infiltration"]),
    ("conditional", ["--class", "pneumonia"], ["pneumonia", "not a class"]),
    ("conditional", ["--class", "infiltration", "--guidance", "-1"], ["--guidance"]),
])
def test_bad_class_options_are_refused_before_anything_is_written(conditional_run, tmp_path, capsys, which, args,
                                                                  words):
    _, cfg_ckpt, plain_ckpt = conditional_run
    out = tmp_path / "out"
    ckpt = plain_ckpt if which == "plain" else cfg_ckpt
    code, _, err = cli(capsys, "sample", "--checkpoint", ckpt, "--out", out, "-n", "2", *args)
    refused(code, err, *words)
    assert not out.exists()


def test_class_on_a_gan_checkpoint_is_refused(tmp_path, capsys):
    save_checkpoint({"kind": "dcgan", "config": {}, "generator": {}}, tmp_path / "gan.pt")
    code, _, err = cli(capsys, "sample", "--checkpoint", tmp_path / "gan.pt", "--out", tmp_path / "out",
                       "--class", "infiltration")
    refused(code, err, "--class", "GAN")
    assert not (tmp_path / "out").exists()


def test_bad_training_options_are_one_line(conditional_run, tmp_path, capsys):
    root, _, _ = conditional_run
    base = ["ddpm", "--data", root, "--preset", "tiny", "--max-steps", "1", "--device", "cpu"]
    refused(*cli(capsys, *base, "--out", tmp_path / "a", "--conditional", "--class", "infiltration")[::2],
            "--conditional", "--class")
    refused(*cli(capsys, *base, "--out", tmp_path / "b", "--conditional", "--label-dropout", "1")[::2],
            "--label-dropout")
    flat = tmp_path / "flat"
    clitools_images(flat, 4)
    refused(*cli(capsys, *base, "--data", flat, "--out", tmp_path / "c", "--conditional")[::2], "--conditional",
            "class folders")
