"""DDPM: the schedule against closed forms, the UNet and the samplers against
diffusers (the reference, used here only as an oracle), the loader's errors,
and the training / sampling commands on a tiny model."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm
from training import ddpm_run
import main
from plumbing import weightfiles
from plumbing.configs import CLIError
from plumbing.files import load_checkpoint
from plumbing.runtime import autocast
from training.harness import EMA

ROOT = Path(__file__).resolve().parents[1]

# google/ddpm-cifar10-32's config.json, as diffusers UNet2DModel keyword arguments
CIFAR10_CONFIG = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32)
TINY_CONFIG = dict(CIFAR10_CONFIG, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                   down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                        clip_sample=True, variance_type="fixed_large")


# --------------------------------------------------------------------------- schedule math


def test_linear_alpha_bar_matches_closed_form():
    d = ddpm.GaussianDiffusion()
    assert d.betas.dtype == torch.float32 and d.betas.shape == (1000,)
    beta = [1e-4 + (0.02 - 1e-4) * s / 999 for s in range(1000)]
    for t in (0, 1, 99, 499, 999):
        expected = math.prod(1 - b for b in beta[:t + 1])
        assert d.alphas_cumprod[t].item() == pytest.approx(expected, rel=1e-5)
    assert d.alphas_cumprod[999].item() == pytest.approx(4.036e-5, rel=1e-3)  # x_T is almost pure noise


def test_posterior_variance_formula_and_variance_types():
    large, small = ddpm.GaussianDiffusion(variance_type="fixed_large"), ddpm.GaussianDiffusion(variance_type="fixed_small")
    beta = [1e-4 + (0.02 - 1e-4) * s / 999 for s in range(1000)]
    abar = np.cumprod([1 - b for b in beta])  # float64, so 1 - abar keeps its digits at small t
    for t in (1, 10, 500, 999):
        expected = (1 - abar[t - 1]) / (1 - abar[t]) * beta[t]  # beta~_t (DDPM Eq. 7)
        assert large.posterior_variance[t].item() == pytest.approx(expected, rel=1e-5)
    assert large.posterior_variance[0].item() == 0.0  # beta~_1 = 0: x_0 is known given x_1
    assert torch.equal(large.model_variance, large.betas)
    assert torch.equal(small.model_variance, small.posterior_variance)


def test_cosine_schedule_and_ddim_spacing():
    d = ddpm.GaussianDiffusion(beta_schedule="cosine")
    assert 0 < d.betas.min() and d.betas.max() <= 0.999
    assert torch.all(d.alphas_cumprod[1:] < d.alphas_cumprod[:-1])
    assert ddpm.GaussianDiffusion().ddim_timesteps(50) == list(range(980, -1, -20))


def test_q_sample_mean_and_variance():
    d = ddpm.GaussianDiffusion()
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1, 1, 1), 0.5)
    t = torch.full((200_000,), 300)
    x = d.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    abar = d.alphas_cumprod[300].item()
    assert x.mean().item() == pytest.approx(0.5 * math.sqrt(abar), abs=5e-3)
    assert x.var().item() == pytest.approx(1 - abar, rel=1e-2)


def test_x0_recovered_from_noise():
    d = ddpm.GaussianDiffusion()
    x0, eps = torch.rand(8, 3, 4, 4) * 2 - 1, torch.randn(8, 3, 4, 4)
    t = torch.tensor([0, 1, 2, 100, 500, 900, 998, 999])
    back = d.predict_start_from_noise(d.q_sample(x0, t, eps), t, eps)
    assert torch.allclose(back, x0, atol=2e-3)  # x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)


def test_no_noise_at_last_step():
    d = ddpm.GaussianDiffusion()
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    x = torch.randn(2, 3, 4, 4)
    t0, t5 = torch.zeros(2, dtype=torch.long), torch.full((2,), 5)
    assert torch.equal(d.p_sample(model, x, t0, torch.randn_like(x)), d.p_sample(model, x, t0, torch.zeros_like(x)))
    assert not torch.equal(d.p_sample(model, x, t5, torch.randn_like(x)), d.p_sample(model, x, t5, torch.zeros_like(x)))


# --------------------------------------------------------------------------- parity with diffusers


@pytest.fixture(scope="module")
def cifar_ref(tmp_path_factory):
    """A randomly initialised diffusers UNet2DModel of the cifar10-32 config, saved both ways."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.UNet2DModel(**CIFAR10_CONFIG).eval()
    st, pt = tmp_path_factory.mktemp("st"), tmp_path_factory.mktemp("bin")
    ref.save_pretrained(st)
    ref.save_pretrained(pt, safe_serialization=False)
    return ref, st, pt


_X, _T = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 417, 999])


def _max_diff(ref, ours):
    with torch.no_grad():
        if not hasattr(ref, "_expected"):  # the reference's output, computed once per model
            ref._expected = ref(_X, _T).sample
        return (ref._expected - ours.eval()(_X, _T)).abs().max().item()


def test_cifar10_unet_shape_and_parity_safetensors_and_bin(cifar_ref):
    ref, st, pt = cifar_ref
    ours = ddpm.load_pretrained(st)
    assert ours.config == ddpm.UNetConfig()  # config.json maps to exactly our default
    assert len(ours.state_dict()) == 328 and sum(p.numel() for p in ours.parameters()) == 35_746_307
    assert _max_diff(ref, ours) < 1e-4
    assert _max_diff(ref, ddpm.load_pretrained(pt)) < 1e-4
    assert _max_diff(ref, ddpm.load_pretrained(st / "diffusion_pytorch_model.safetensors")) < 1e-4  # lone file


def test_parity_with_old_attention_names_and_conv_weights(cifar_ref, tmp_path):
    ref, _, _ = cifar_ref
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in ref.state_dict().items():
        for new, name in old.items():
            if f".{new}." in k:
                k = k.replace(f".{new}.", f".{name}.")
                v = v[:, :, None, None] if v.dim() == 2 else v  # [C, C] -> [C, C, 1, 1]
        sd[k] = v
    assert "mid_block.attentions.0.proj_attn.weight" in sd
    torch.save(sd, tmp_path / "diffusion_pytorch_model.bin")
    assert _max_diff(ref, ddpm.load_pretrained(tmp_path / "diffusion_pytorch_model.bin")) < 1e-4


@pytest.fixture(scope="module")
def tiny_ref(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.UNet2DModel(**TINY_CONFIG).eval()
    folder = tmp_path_factory.mktemp("tiny")
    ref.save_pretrained(folder)
    return ref, folder


def test_tiny_config_parity(tiny_ref):
    ref, folder = tiny_ref
    ours = ddpm.load_pretrained(folder)
    assert ours.config.attention_levels == (1,) and ours.config.norm_groups == 8
    assert _max_diff(ref, ours) < 1e-5


def test_ddpm_step_matches_ddpm_scheduler(tiny_ref):
    from diffusers import DDPMScheduler

    ref, folder = tiny_ref
    ours, d = ddpm.load_pretrained(folder).eval(), ddpm.GaussianDiffusion()
    sched = DDPMScheduler(**SCHEDULER_CONFIG)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for t in (999, 500, 37, 1, 0):
        with torch.no_grad():
            expected = sched.step(ref(x, t).sample, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(t))
            got = d.p_sample(ours, x, torch.full((2,), t), noise)
        assert (got - expected).abs().max().item() < 1e-4, t


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_loop_matches_ddim_scheduler(eta):
    """20 DDIM steps with the same model, x_T and step noise. The model is the exact noise
    predictor for Gaussian data x_0 ~ N(0, s^2): E[eps | x_t] = sqrt(1 - a) x_t / (a s^2 + 1 - a).
    (An untrained random UNet is a poor oracle here: its deterministic eta = 0 trajectory
    doubles float32 rounding differences at every step.)"""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(SCHEDULER_CONFIG)  # leading spacing, set_alpha_to_one, as the Hub model
    sched.set_timesteps(20)
    d = ddpm.GaussianDiffusion()
    assert sched.timesteps.tolist() == d.ddim_timesteps(20) == list(range(950, -1, -50))

    def model(x, t):
        a = d.alphas_cumprod[t].reshape(-1, 1, 1, 1) if torch.is_tensor(t) and t.dim() else d.alphas_cumprod[int(t)]
        return (1 - a).sqrt() * x / (a * 0.25 + 1 - a)

    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 3, 8, 8, generator=g)
    for t in sched.timesteps:  # eps re-derived from the clipped x_0, as ddpm.model_predictions does
        x = sched.step(model(x, t), t, x, eta=eta, generator=g, use_clipped_model_output=True).prev_sample
    got = d.sample(model, (64, 3, 8, 8), "ddim", 20, eta, generator=torch.Generator().manual_seed(3))
    assert (got - x.clamp(-1, 1)).abs().max().item() < 1e-4
    assert 0.3 < got.std().item() < 0.6  # roughly the data's spread (0.5) after 20 steps


# --------------------------------------------------------------------------- loader errors


def test_loader_errors_name_the_key(tiny_ref, tmp_path):
    from safetensors.torch import save_file

    ref, _ = tiny_ref
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    missing = dict(sd)
    del missing["mid_block.resnets.1.conv2.bias"]
    bad_shape = dict(sd, **{"conv_in.weight": torch.zeros(16, 3, 5, 5)})
    extra = dict(sd, **{"conv_in.extra": torch.zeros(1)})
    for name, state, text in (("missing", missing, "lack key mid_block.resnets.1.conv2.bias"),
                              ("shape", bad_shape, "shape mismatch for conv_in.weight"),
                              ("extra", extra, "unexpected key in pretrained weights: conv_in.extra")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(dict(ref.config)))
        save_file(state, folder / "diffusion_pytorch_model.safetensors")
        with pytest.raises(CLIError, match=text):
            ddpm.load_pretrained(folder)
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CLIError, match="not a valid .safetensors"):
        ddpm.load_pretrained(tmp_path / "junk.safetensors")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "diffusion_pytorch_model.bin"
    torch.save({"conv_in.weight": _Evil(marker)}, path)
    with pytest.raises(CLIError, match="refusing to load"):
        ddpm.load_pretrained(path)
    assert not marker.exists()
    code = main.main(["ddpm", "--finetune", "--pretrained", str(path), "--data", str(tmp_path / "data"),
                      "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and not marker.exists()
    assert err.count("\n") == 1 and err.startswith("error: refusing to load") and "Traceback" not in err


def test_offline_download_gives_one_clear_message(tmp_path, monkeypatch):
    monkeypatch.setattr(weightfiles, "HF_URL", "http://127.0.0.1:9/{}")  # nothing listens on the discard port
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no_cache"))  # nor may a real Hugging Face cache answer
    folder = tmp_path / "models" / "ddpm-cifar10-32"
    with pytest.raises(CLIError) as e:
        ddpm.load_pretrained(folder)
    msg = str(e.value)
    assert "config.json" in msg and "diffusion_pytorch_model.safetensors" in msg and str(folder) in msg
    assert "\n" not in msg and not (folder / "config.json").exists()


# --------------------------------------------------------------------------- training and sampling commands


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for cls in ("infiltration", "no_finding"):
        (root / cls).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def _train(images_dir, out, *extra):
    args = ["ddpm", "--data", str(images_dir), "--out", str(out), "--batch-size", "2", "--epochs", "1",
            "--num-samples", "4", "--sample-steps", "3", "--lr", "1e-3", "--device", "cpu", *extra]
    assert main.main(args) == 0


def test_finetune_writes_checkpoint_log_and_grid(tiny_ref, images_dir, tmp_path):
    _, folder = tiny_ref
    out = tmp_path / "run"
    _train(images_dir, out, "--finetune", "--pretrained", str(folder), "--class", "infiltration", "--warmup", "2")
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["kind"] == "ddpm" and ckpt["step"] == 2 and ckpt["epoch"] == 1  # 4 images / batch 2
    assert ckpt["config"]["block_out_channels"] == (16, 32) and set(ckpt["ema"]) == set(ckpt["model"])
    rows = list(csv.DictReader(open(out / "loss.csv")))
    assert [r["step"] for r in rows] == ["1", "2"] and float(rows[0]["lr"]) == pytest.approx(5e-4)
    assert Image.open(out / "samples_epoch001.png").size[0] > 64


def test_conditional_finetune_from_the_pretrained_model(tiny_ref, images_dir, tmp_path):
    """`ddpm --finetune --conditional`: the released UNet, every weight of it, plus a class embedding of
    classes + 1 rows (zero at step 0: test_conditional.py), trained on both class folders."""
    ref, folder = tiny_ref
    out = tmp_path / "cfg"
    _train(images_dir, out, "--finetune", "--pretrained", str(folder), "--conditional", "--max-steps", "2")
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["classes"] == {"no_finding": 0, "infiltration": 1} and ckpt["config"]["num_classes"] == 2
    released = ddpm.load_pretrained(folder).state_dict()
    assert set(ckpt["model"]) == set(released) | {"class_embedding.weight"}
    assert all(ckpt["model"][k].shape == v.shape for k, v in released.items())
    assert ckpt["model"]["class_embedding.weight"].shape == (3, ref.config.block_out_channels[0] * 4)


def test_resume_equals_straight_run(images_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _train(images_dir, a, "--preset", "tiny", "--max-steps", "2")
    _train(images_dir, a, "--preset", "tiny", "--max-steps", "4", "--resume")
    _train(images_dir, b, "--preset", "tiny", "--max-steps", "4")
    ca, cb = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    assert ca["step"] == cb["step"] == 4
    for part in ("model", "ema"):
        for k in cb[part]:
            assert torch.equal(ca[part][k], cb[part][k]), (part, k)
    assert all(torch.equal(x["exp_avg"], y["exp_avg"]) for x, y in
               zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values()))
    assert (a / "loss.csv").read_text().count("\n") == (b / "loss.csv").read_text().count("\n") == 5


def test_bad_arguments_are_one_line(images_dir, tmp_path, capsys):
    for extra, text in ((["--image-size", "31"], "divisible by 2"), (["--batch-size", "100"], "lower --batch-size"),
                        (["--ema-decay", "1"], "--ema-decay")):
        assert main.main(["ddpm", "--data", str(images_dir), "--out", str(tmp_path), "--preset", "tiny", *extra]) == 2
        err = capsys.readouterr().err
        assert text in err and err.count("\n") == 1
    assert main.main(["ddpm", "--data", str(tmp_path / "nope"), "--out", str(tmp_path), "--preset", "tiny"]) == 2


def test_torchrun_two_cpu_processes(images_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main.py", "ddpm",
           "--data", str(images_dir), "--out", str(out), "--preset", "tiny", "--batch-size", "2", "--max-steps", "2",
           "--num-samples", "2", "--sample-steps", "2", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 2  # global batch 4 = 2 per process x 2 processes, 8 images: 2 steps = one epoch
    assert (out / "samples_epoch001.png").is_file()


@pytest.fixture(scope="module")
def tiny_checkpoint(images_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tinyrun")
    _train(images_dir, out, "--preset", "tiny", "--max-steps", "1")
    return out / "checkpoint.pt"


def test_sample_command_writes_pngs_deterministically(tiny_checkpoint, tmp_path):
    def run(out, seed, *extra):
        assert main.main(["sample", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "-n", "3",
                          "--batch-size", "2", "--seed", str(seed), "--device", "cpu", *extra]) == 0
        return [(out / f"sample_{i:05d}.png").read_bytes() for i in range(3)]

    first = run(tmp_path / "a", 1, "--sampler", "ddim", "--steps", "5")
    assert first == run(tmp_path / "b", 1, "--sampler", "ddim", "--steps", "5")
    assert first != run(tmp_path / "c", 2, "--sampler", "ddim", "--steps", "5")
    assert (tmp_path / "a" / "grid.png").is_file() and len(list((tmp_path / "a").glob("*.png"))) == 4
    run(tmp_path / "d", 1, "--sampler", "ddpm", "--steps", "4", "--eta", "0")  # strided ancestral sampling


def test_full_ancestral_loop_on_a_short_chain():
    d, calls = ddpm.GaussianDiffusion(num_timesteps=10), []
    model = lambda x, t: calls.append(t.tolist()) or torch.zeros_like(x)  # noqa: E731
    x = d.sample(model, (2, 3, 4, 4), "ddpm", generator=torch.Generator().manual_seed(0), progress=False)
    assert [c[0] for c in calls] == list(range(9, -1, -1)) and x.abs().max() <= 1


def test_amp_close_to_fp32_on_tiny_model():
    torch.manual_seed(0)
    model = ddpm.UNet(ddpm.PRESETS["tiny"])
    x, t = torch.randn(4, 3, 32, 32), torch.tensor([0, 10, 500, 999])
    with torch.no_grad():
        ref = model(x, t)
        with autocast(torch.device("cpu"), True):
            low = model(x, t)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max().item() < 0.05 * ref.abs().max().item()


@pytest.mark.slow
def test_compile_matches_eager_on_tiny_model():
    torch.manual_seed(0)
    model = ddpm.UNet(ddpm.PRESETS["tiny"]).eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 700])
    with torch.no_grad():
        assert (torch.compile(model)(x, t) - model(x, t)).abs().max().item() < 1e-4


def test_sampling_with_amp_stays_close_to_fp32(tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint)
    kw = dict(seed=0, batch_size=2, device=torch.device("cpu"), sampler="ddim", steps=5)
    ref = ddpm.generate(ckpt, 2, **kw)
    low = ddpm.generate(ckpt, 2, amp=True, **kw)
    # bf16 keeps ~3 significant digits and x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) magnifies
    # the network's error early in the chain: a few percent of the [-1, 1] range on average
    assert low.dtype == torch.float32 and (low - ref).abs().mean().item() < 0.05


def test_fast_paths_match_the_plain_path():
    """channels_last activations and SDPA attention are speed-ups, not new maths."""
    torch.manual_seed(0)
    model = ddpm.UNet(ddpm.UNetConfig(block_out_channels=(32, 64), layers_per_block=1, norm_groups=8)).eval()
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([0, 400, 999])
    with torch.no_grad():
        fast = model(x, t)
        model.channels_last = False
        plain = model(x, t)
        assert (fast - plain).abs().max().item() < 1e-4 and fast.is_contiguous()

        block = model.down_blocks[1].attentions[0]  # attention at the second level (16x16)
        h = torch.randn(2, 64, 8, 8)
        seq = block.group_norm(h).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = block.to_q(seq), block.to_k(seq), block.to_v(seq)
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(64), dim=-1)  # written out, no SDPA
        explicit = h + block.to_out(attn @ v).transpose(1, 2).reshape(h.shape)
        assert (block(h) - explicit).abs().max().item() < 1e-4


# --------------------------------------------------------------------------- schedules, variances, EMA: closed forms


def test_cosine_alpha_bar_matches_closed_form():
    """Nichol & Dhariwal Eq. 17: alpha-bar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) pi/2);
    the per-step cap beta <= 0.999 only bites at the last step, where f(T) = cos^2(pi/2) = 0."""
    T, s = 1000, 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    d = ddpm.GaussianDiffusion(beta_schedule="cosine")
    for t in (0, 1, 250, 500, 900, 998):  # code t is the paper's t + 1
        assert d.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5), t
    assert d.betas[-1].item() == pytest.approx(0.999) and d.betas[:-1].max().item() < 0.999
    assert d.alphas_cumprod[-1].item() == pytest.approx(d.alphas_cumprod[-2].item() * 0.001, rel=1e-4)


def test_fixed_small_samples_with_the_posterior_variance():
    """fixed_small: sigma_t^2 = beta~_t = (1 - alpha-bar_{t-1}) / (1 - alpha-bar_t) beta_t (DDPM Eq. 7)."""
    small, large = ddpm.GaussianDiffusion(variance_type="fixed_small"), ddpm.GaussianDiffusion()
    beta = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - beta)
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    x, t = torch.zeros(4, 1, 1, 1), torch.tensor([1, 10, 500, 999])
    _, var_small, _ = small.p_mean_variance(model, x, t)
    _, var_large, _ = large.p_mean_variance(model, x, t)
    for i, step in enumerate(t.tolist()):
        assert var_small[i].item() == pytest.approx((1 - abar[step - 1]) / (1 - abar[step]) * beta[step], rel=1e-5)
        assert var_large[i].item() == pytest.approx(beta[step], rel=1e-5)
    z = torch.ones_like(x)  # x_t = 0 and eps = 0 give mean 0, so x_{t-1} = sigma_t z = sigma_t
    assert torch.allclose(small.p_sample(model, x, t, z), var_small.sqrt())


def test_ema_decay_warms_up():
    """EMA with step: decay min(decay, (1 + step) / (10 + step)), shadow <- d shadow + (1 - d) param."""
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    expected = 0.0
    for step in range(4):
        ema.update(model, step)
        d = min(0.9, (1 + step) / (10 + step))  # 0.1, 2/11, 3/12, 4/13
        expected = d * expected + (1 - d)
        assert ema.model.weight.item() == pytest.approx(expected, rel=1e-6), step
    assert expected == pytest.approx(1 - 0.1 * (2 / 11) * (3 / 12) * (4 / 13))
    ema.update(model, 1000)  # past warm-up the decay is the configured one
    assert ema.model.weight.item() == pytest.approx(0.9 * expected + 0.1, rel=1e-6)


# --------------------------------------------------------------------------- DDIM: one step, the strided chain, trajectories


def test_ddim_step_matches_the_formula_written_out():
    """Song et al. Eq. 12 with sigma from Eq. 16, in host floats, with eps re-derived from the clipped x_0."""
    d = ddpm.GaussianDiffusion()
    abar = d.alphas_cumprod.double().tolist()
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    model = lambda x_t, t: eps  # noqa: E731
    for t, t_prev, eta in ((999, 979, 0.0), (500, 450, 0.5), (20, 0, 1.0), (0, -1, 1.0)):
        a_t, a_prev = abar[t], abar[t_prev] if t_prev >= 0 else 1.0
        x0 = ((x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)).clamp(-1, 1)
        eps_clipped = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        expected = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma ** 2, 0.0)) * eps_clipped + sigma * z
        got, got_x0 = d.ddim_step(model, x, torch.full((2,), t), torch.full((2,), t_prev), eta, z, return_x0=True)
        assert (got - expected).abs().max().item() < 2e-5, (t, eta)
        assert (got_x0 - x0).abs().max().item() < 2e-5
    assert torch.equal(got, got_x0)  # the last step (a_prev = 1) returns the predicted x_0


def test_ddim_converges_as_steps_grow_where_x0_is_clipped():
    """DDIM with eta 0 solves an ODE to first order, so more steps must come closer to its solution, also
    where the x_0 clip bites. Keeping the network's eps beside the clipped x_0 (diffusers' default) jumps
    by sqrt(a_t) (clip(x_0) - x_0) at every such step, however small: there the mean error was 0.097, 0.165
    and 0.342 at 10, 100 and 1000 steps, and the samples' SD fell from 0.46 to 0.14 (the data's: 0.57).
    That made DDIM worse with more steps on the tiny phantom model (README, "Sampler quality")."""
    d = ddpm.GaussianDiffusion()
    exact = _gaussian_data_model(d)
    model = lambda x, t: 0.95 * exact(x, t)  # noqa: E731  an undertrained eps: x_0 = (x_t - ...) / sqrt(a) overshoots early
    x_T = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    run = lambda sampler, steps: d.sample(model, x_T.shape, sampler, steps, x_T=x_T, progress=False)  # noqa: E731
    limit = run("dpmpp", 999)  # the second-order solver of the same ODE on its finest grid
    errors = [(run("ddim", steps) - limit).abs().mean().item() for steps in (10, 100, 1000)]
    assert errors[0] > 5 * errors[1] > 25 * errors[2] and errors[2] < 0.002, errors  # first order: ~10x per 10x


def _gaussian_data_model(d, s2=0.25):
    """The exact noise predictor for data x_0 ~ N(0, s2): E[eps | x_t] = sqrt(1 - a) x_t / (a s2 + 1 - a)."""
    def model(x, t):
        a = d.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        return (1 - a).sqrt() * x / (a * s2 + 1 - a)
    return model


@pytest.mark.parametrize("sampler, eta", [("ddim", 0.0), ("ddpm", None)])
def test_strided_sampler_output_matches_float64_recomputation(sampler, eta):
    """20 strided steps against the chain recomputed in float64 with the same noise. sampler "ddpm" with
    fewer than T steps is ancestral sampling on the strided chain: DDIM with eta = 1."""
    d, steps, s2 = ddpm.GaussianDiffusion(), 20, 0.25
    g = torch.Generator().manual_seed(5)
    got = d.sample(_gaussian_data_model(d, s2), (32, 1, 4, 4), sampler, steps, eta or 0.0, generator=g, progress=False)
    eta = 1.0 if sampler == "ddpm" else eta
    abar = d.alphas_cumprod.double()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(32, 1, 4, 4, generator=g).double()
    tau = list(range(950, -1, -50))
    for t, t_prev in zip(tau, tau[1:] + [-1]):
        a_t, a_prev = abar[t], abar[t_prev] if t_prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
        eps = (1 - a_t).sqrt() * x / (a_t * s2 + 1 - a_t)
        x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        if eta > 0:
            x = x + sigma * torch.randn(32, 1, 4, 4, generator=g).double()
    assert (got.double() - x.clamp(-1, 1)).abs().max().item() < 1e-4


def test_trajectories_record_x_t_and_predicted_x0():
    d = ddpm.GaussianDiffusion(num_timesteps=10)
    model = _gaussian_data_model(d)
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    x, traj = d.sample(model, x_T.shape, "ddpm", x_T=x_T, generator=torch.Generator().manual_seed(1),
                       progress=False, keep=(9, 5, 0))
    assert traj["t"] == [9, 5, 0] and traj["x"].shape == traj["x0"].shape == (3, 3, 1, 4, 4)
    assert torch.equal(traj["x"][0], x_T)  # the chain starts at x_T
    assert torch.allclose(traj["x0"][-1], x, atol=1e-6)  # at t = 0 the step returns the predicted x_0
    plain = d.sample(model, x_T.shape, "ddpm", x_T=x_T, generator=torch.Generator().manual_seed(1), progress=False)
    assert torch.equal(plain, x)  # recording changes nothing

    d = ddpm.GaussianDiffusion()
    model = _gaussian_data_model(d)
    x, traj = d.sample(model, x_T.shape, "ddim", 10, x_T=x_T, progress=False, keep=range(1000))
    assert traj["t"] == list(range(900, -1, -100)) and traj["x"].shape == (10, 3, 1, 4, 4)
    assert torch.equal(traj["x0"][-1], x) and torch.equal(traj["x"][0], x_T)
    with pytest.raises(ValueError, match="keep"):
        d.sample(model, x_T.shape, "ddim", 10, x_T=x_T, progress=False, keep=(5,))


# --------------------------------------------------------------------------- the new training options


def test_sample_steps_beyond_the_schedule_fail_before_training(images_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main.main(["ddpm", "--data", str(images_dir), "--out", str(out), "--preset", "tiny",
                      "--sample-steps", "1001"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--sample-steps must be in 1..1000" in err and not out.exists()
    with pytest.raises(CLIError, match="--ema-decay"):
        ddpm_run.TrainConfig(data=images_dir, out=out, ema_decay=1.0)


def test_cosine_schedule_trains_and_sample_uses_it(images_dir, tmp_path, capsys):
    out = tmp_path / "cos"
    _train(images_dir, out, "--preset", "tiny", "--max-steps", "2", "--beta-schedule", "cosine", "--variance", "fixed_small",
           "--prediction", "epsilon")
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 2 and ckpt["diffusion"]["beta_schedule"] == "cosine"
    assert ckpt["diffusion"]["variance_type"] == "fixed_small"
    assert ckpt["args"]["beta_schedule"] == "cosine" and ckpt["args"]["out"] == str(out)  # the config, Paths as str

    kw = dict(seed=0, batch_size=2, device=torch.device("cpu"), sampler="ddim", steps=3)
    got = ddpm.generate(ckpt, 2, **kw)
    unet, _, size = ddpm.model_from_checkpoint(ckpt, torch.device("cpu"))
    for schedule, same in (("cosine", True), ("linear", False)):
        d = ddpm.GaussianDiffusion(beta_schedule=schedule, variance_type="fixed_small")
        ref = d.sample(unet, (2, 3, size, size), "ddim", 3, generator=torch.Generator().manual_seed(0), progress=False)
        assert torch.equal(got, ref) == same, schedule
    assert main.main(["sample", "--checkpoint", str(out / "checkpoint.pt"), "--out", str(tmp_path / "s"), "-n", "2",
                      "--sampler", "ddpm", "--steps", "3", "--device", "cpu"]) == 0
    assert "strided chain, which is DDIM with eta 1" in capsys.readouterr().out  # said, not silent

    _train(images_dir, out, "--preset", "tiny", "--max-steps", "3", "--resume")  # default options: linear
    assert "keeps the checkpoint's schedule (cosine, fixed_small)" in capsys.readouterr().out
    assert load_checkpoint(out / "checkpoint.pt")["diffusion"]["beta_schedule"] == "cosine"


# --------------------------------------------------------------------------- DPM-Solver++(2M): diffusers as oracle

# DPMSolverMultistepScheduler for the Hub model's schedule. Thresholding with sample_max_value 1 is exactly
# clip_sample (the threshold s = clamp(quantile, 1, 1) = 1); everything else is diffusers' default:
# timestep_spacing "linspace" (ours: dpmpp_timesteps), final_sigmas_type "zero", solver_type "midpoint".
DPMPP_CONFIG = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                    algorithm_type="dpmsolver++", solver_order=2, thresholding=True, sample_max_value=1.0)


def test_dpmpp_timesteps_default_steps_and_trajectory():
    from diffusers import DPMSolverMultistepScheduler

    d = ddpm.GaussianDiffusion()
    sched = DPMSolverMultistepScheduler(**DPMPP_CONFIG)
    for steps in (1, 10, 15, 20, 26, 999):  # 26 has a tie (499.5) that numpy and we round to even
        sched.set_timesteps(steps)
        assert sched.timesteps.tolist() == d.dpmpp_timesteps(steps), steps
    assert d.dpmpp_timesteps(20)[:3] == [999, 949, 899] and d.dpmpp_timesteps(20)[-1] == 50
    for bad in (0, 1000):
        with pytest.raises(ValueError, match="steps must be in 1..999"):
            d.dpmpp_timesteps(bad)
    with pytest.raises(ValueError, match=r"dpmpp \(eta 0\)"):
        d.sample(_gaussian_data_model(d), (1, 1, 2, 2), "dpmpp", eta=1.0)

    calls, model = [], _gaussian_data_model(d)
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    x, traj = d.sample(lambda x, t: calls.append(t[0].item()) or model(x, t), x_T.shape, "dpmpp", x_T=x_T,
                       progress=False, keep=range(1000))
    assert calls == traj["t"] == d.dpmpp_timesteps(20)  # default 20 steps, one network call each
    assert torch.equal(traj["x"][0], x_T) and torch.equal(traj["x0"][-1], x)  # the last step returns x_0


def test_dpmpp_step_first_order_is_ddim_and_second_order_is_alg2_written_out():
    """First order: DDIM with eta = 0. Second order: Lu et al. Alg. 2, lines 7-9, in host float64."""
    abar = ddpm.GaussianDiffusion().alphas_cumprod.double().tolist()
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 3  # x_0 often clipped at small t
    x0_last = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    full = lambda s: torch.full((2,), s)  # noqa: E731
    lam = lambda a: 0.5 * math.log(a / (1 - a))  # noqa: E731
    for clip in (True, False):
        d = ddpm.GaussianDiffusion(clip_sample=clip)
        model = _gaussian_data_model(d, s2=4.0)
        for t, t_prev, t_last in ((949, 899, 999), (500, 450, 550), (100, 50, 150)):
            first, x0 = d.dpmpp_step(model, x, full(t), full(t_prev))
            assert (first - d.ddim_step(model, x, full(t), full(t_prev))).abs().max().item() < 1e-5, (clip, t)
            h = lam(abar[t_prev]) - lam(abar[t])
            r = (lam(abar[t]) - lam(abar[t_last])) / h
            D = (1 + 1 / (2 * r)) * x0.double() - 1 / (2 * r) * x0_last.double()
            expected = (math.sqrt((1 - abar[t_prev]) / (1 - abar[t])) * x.double()
                        - math.sqrt(abar[t_prev]) * (math.exp(-h) - 1) * D)
            got, _ = d.dpmpp_step(model, x, full(t), full(t_prev), x0_last, full(t_last))
            assert (got.double() - expected).abs().max().item() < 1e-5, (clip, t)
        last, x0 = d.dpmpp_step(model, x, full(50), full(-1))
        assert torch.equal(last, x0)  # sigma = 0 at the end: the first-order step returns x_0


@pytest.mark.parametrize("steps, clip", [(10, True), (15, True), (20, True), (20, False)])
def test_dpmpp_loop_matches_dpm_solver_multistep_scheduler(steps, clip):
    """The whole loop with the exact noise predictor for Gaussian data (see the DDIM parity test)."""
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(**dict(DPMPP_CONFIG, thresholding=clip))
    sched.set_timesteps(steps)
    d = ddpm.GaussianDiffusion(clip_sample=clip)
    model = _gaussian_data_model(d)
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    for t in sched.timesteps:
        x = sched.step(model(x, torch.full((64,), int(t))), t, x).prev_sample
    got = d.sample(model, (64, 3, 8, 8), "dpmpp", steps, generator=torch.Generator().manual_seed(3), progress=False)
    assert (got - x.clamp(-1, 1)).abs().max().item() < 1e-4
    assert 0.35 < got.std().item() < 0.55  # roughly the data's spread (0.5)


def test_dpmpp_single_steps_match_the_scheduler_with_a_random_unet(tiny_ref):
    """Each step from the scheduler's own x_t, with our network and our multistep buffer."""
    from diffusers import DPMSolverMultistepScheduler

    ref, folder = tiny_ref
    ours, d = ddpm.load_pretrained(folder).eval(), ddpm.GaussianDiffusion()
    sched = DPMSolverMultistepScheduler(**DPMPP_CONFIG)
    sched.set_timesteps(10)
    tau = sched.timesteps.tolist()
    full = lambda s: torch.full((2,), s)  # noqa: E731
    x, x0_last, worst = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), None, 0.0
    for k, (t, t_prev) in enumerate(zip(tau, tau[1:] + [-1])):
        with torch.no_grad():
            expected = sched.step(ref(x, t).sample, t, x).prev_sample
            buffer = (x0_last, full(tau[k - 1])) if k > 0 and t_prev >= 0 else ()
            got, x0_last = d.dpmpp_step(ours, x, full(t), full(t_prev), *buffer)
        worst = max(worst, (got - expected).abs().max().item())
        x = expected
    assert worst < 1e-5


def test_sample_command_dpmpp_and_its_one_line_errors(tiny_checkpoint, tmp_path, capsys):
    base = ["sample", "--checkpoint", str(tiny_checkpoint), "-n", "2", "--device", "cpu"]
    assert main.main([*base, "--out", str(tmp_path / "a"), "--sampler", "dpmpp", "--steps", "3"]) == 0
    assert len(list((tmp_path / "a").glob("sample_*.png"))) == 2
    for extra, text in ((["--sampler", "dpmpp", "--eta", "1"], "--eta 1 is not defined for --sampler dpmpp"),
                        (["--steps", "0"], "--steps must be at least 1"),
                        (["--sampler", "dpmpp", "--steps", "1000"], "--steps must be in 1..999 for --sampler dpmpp")):
        assert main.main([*base, "--out", str(tmp_path / "b"), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and text in err and "Traceback" not in err, err
    assert not (tmp_path / "b").exists()
    with pytest.raises(CLIError, match="--eta 0.5 is not defined"):
        ddpm.generate(load_checkpoint(tiny_checkpoint), 1, seed=0, batch_size=1, device=torch.device("cpu"),
                      sampler="dpmpp", eta=0.5)


def test_training_grid_with_dpmpp(images_dir, tmp_path, capsys):
    out = tmp_path / "grid"
    _train(images_dir, out, "--preset", "tiny", "--max-steps", "1", "--sample-sampler", "dpmpp")
    assert (out / "samples_epoch001.png").is_file()
    capsys.readouterr()
    assert main.main(["ddpm", "--data", str(images_dir), "--out", str(tmp_path / "bad"), "--preset", "tiny",
                      "--sample-sampler", "dpmpp", "--sample-steps", "1000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--sample-steps must be in 1..999 for --sampler dpmpp" in err
    assert not (tmp_path / "bad").exists()


def test_defaults_depend_on_how_the_unet_starts(images_dir, tmp_path):
    """From scratch: the recipe measured to work on small data (v + cosine, fast lr for the tiny UNet, warm-up,
    a faster EMA); fine-tuning: the original experiment's recipe and the released schedule. Given wins."""
    scratch = ddpm_run.TrainConfig(data=images_dir, out=tmp_path / "a", preset="tiny").completed()
    assert (scratch.lr, scratch.warmup, scratch.ema_decay, scratch.beta_schedule, scratch.prediction) == \
        (2e-3, 50, 0.995, "cosine", "v_prediction")
    assert ddpm_run.TrainConfig(data=images_dir, out=tmp_path / "a", preset="small").completed().lr == 2e-4
    tune = ddpm_run.TrainConfig(data=images_dir, out=tmp_path / "a", finetune=True).completed()
    assert (tune.lr, tune.warmup, tune.ema_decay, tune.beta_schedule, tune.prediction) == \
        (1e-5, 0, 0.999, "linear", "epsilon")
    given = ddpm_run.TrainConfig(data=images_dir, out=tmp_path / "a", preset="tiny", lr=1e-4,
                                 prediction="epsilon").completed()
    assert (given.lr, given.prediction, given.beta_schedule) == (1e-4, "epsilon", "cosine")
    # a run records what it trained with: the options left out, at their values
    out = tmp_path / "run"
    assert main.main(["ddpm", "--data", str(images_dir), "--out", str(out), "--preset", "tiny", "--batch-size", "2",
                      "--max-steps", "1", "--num-samples", "2", "--sample-steps", "2", "--device", "cpu"]) == 0
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert (ckpt["args"]["lr"], ckpt["args"]["warmup"], ckpt["args"]["ema_decay"]) == (2e-3, 50, 0.995)
    assert (ckpt["diffusion"]["prediction_type"], ckpt["diffusion"]["beta_schedule"]) == ("v_prediction", "cosine")
