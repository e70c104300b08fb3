"""diffusion.py's schedules and prediction types (issue 14) against diffusers' DDPMScheduler, DDIMScheduler and
DPMSolverMultistepScheduler configured the same way (diffusers is only an oracle here): the betas, the
timestep spacings, single steps and whole loops for every prediction type, zero terminal SNR, T = 1 and
diffusers' own test_full_loop_with_v_prediction constants; then the objective (targets, min-SNR weights),
old checkpoints, the training flags and each bad input."""

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm
from training import ddpm_run
import diffusion
from tools import export as hub
import main
from diffusion import GaussianDiffusion
from plumbing.configs import CLIError
from plumbing.files import load_checkpoint, save_checkpoint

diffusers = pytest.importorskip("diffusers")
warnings.filterwarnings("ignore", module="diffusers")  # its deprecation chatter, not ours

PREDICTIONS = diffusion.PREDICTION_TYPES
# (our settings, the same in diffusers' names): every schedule, with and without zero terminal SNR
SCHEDULES = [dict(beta_schedule="linear"), dict(beta_schedule="linear", beta_start=1e-3, beta_end=0.03),
             dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), dict(beta_schedule="cosine"),
             dict(beta_schedule="sigmoid", beta_start=1e-4, beta_end=0.03)]


def theirs(settings: dict) -> dict:
    """Our GaussianDiffusion settings as diffusers scheduler keyword arguments."""
    d = GaussianDiffusion(**settings).config()
    return dict(num_train_timesteps=d["num_timesteps"], beta_start=d["beta_start"], beta_end=d["beta_end"],
                beta_schedule=hub._BETA_SCHEDULES[d["beta_schedule"]], prediction_type=d["prediction_type"],
                rescale_betas_zero_snr=d["rescale_betas_zero_snr"], timestep_spacing=d["timestep_spacing"],
                clip_sample=d["clip_sample"])


def in_float64(sched, d: GaussianDiffusion, ours: bool = False):
    """`sched` computing its formulas in float64, on the float64 schedule (make_betas and rescale_zero_terminal_snr,
    which equal its own, test_betas_match_ddpm_scheduler) or, with `ours`, on our float32 alpha-bar buffers.
    Left in float32, each side loses 1 - alpha-bar near t = 0 to cancellation (1 - alpha-bar_0 = 1e-4 taken from a
    float32 alpha-bar carries 6e-4 relative error): diffusers' DDPM step, which forms beta_t = 1 - alpha-bar_t /
    alpha-bar_{t-1}, moves by up to 4e-4 at t = 1; our DDIM step, which forms sqrt(1 - alpha-bar_prev), by 2e-5 when
    it lands on t = 0. Removing the one side's rounding or the other's leaves the arithmetic, which agrees to 1e-5."""
    if ours:
        sched.alphas_cumprod = d.alphas_cumprod.double()
    else:
        betas = diffusion.make_betas(d.beta_schedule, d.num_timesteps, d.beta_start, d.beta_end)
        sched.alphas_cumprod = torch.cumprod(1 - (diffusion.rescale_zero_terminal_snr(betas) if d.rescale_betas_zero_snr
                                                  else betas), 0)
    sched.one = sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return sched


def ddpm_scheduler(settings: dict):
    d = GaussianDiffusion(**settings)
    return in_float64(diffusers.DDPMScheduler(**theirs(settings), variance_type=d.variance_type), d)


def ddim_scheduler(settings: dict):
    return in_float64(diffusers.DDIMScheduler(**theirs(settings), set_alpha_to_one=True), GaussianDiffusion(**settings), ours=True)


def gaussian_model(d: GaussianDiffusion, s: float = 0.5):
    """The exact network for data x_0 ~ N(0, s^2) per pixel, in d's prediction type: with a = alpha-bar_t,
    E[x_0 | x_t] = sqrt(a) s^2 x_t / (a s^2 + 1 - a), E[eps | x_t] = sqrt(1 - a) x_t / (a s^2 + 1 - a), v from both.
    A smooth oracle: a random UNet's deterministic trajectory doubles float32 rounding at every step."""
    def model(x, t):
        t = torch.as_tensor(t).reshape(-1)
        a = d.alphas_cumprod.double()[t].reshape(-1, 1, 1, 1)
        x = x.double()
        x0, eps = a.sqrt() * s * s * x / (a * s * s + 1 - a), (1 - a).sqrt() * x / (a * s * s + 1 - a)
        out = {"epsilon": eps, "sample": x0, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}[d.prediction_type]
        return out.float()
    return model


# --------------------------------------------------------------------------- the schedule


@pytest.mark.parametrize("settings, zero_snr", itertools.product(SCHEDULES, (False, True)))
def test_betas_match_ddpm_scheduler(settings, zero_snr):
    """float64 here, float32 in diffusers: the only difference is its rounding (< 1e-6 on alpha-bar, 4e-6 rescaled; up to 2e-6
    on the rescaled betas, 1 - alpha-bar_t / alpha-bar_{t-1} of float32 alpha-bars), so the rescaling is also
    compared with diffusers' own rescale_zero_terminal_snr run in float64."""
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    for T in (1000, 10):
        ours = GaussianDiffusion(T, **settings, rescale_betas_zero_snr=zero_snr, prediction_type="v_prediction",
                                 timestep_spacing="trailing")
        ref = diffusers.DDPMScheduler(**theirs(ours.config()))
        assert (ours.betas.double() - ref.betas.double()).abs().max() < (1e-5 if zero_snr else 1e-7), T
        assert (ours.alphas_cumprod.double() - ref.alphas_cumprod.double()).abs().max() < (1e-5 if zero_snr else 1e-6), T
        if zero_snr:  # Lin et al. Alg. 1: alpha-bar_T = 0 exactly, alpha-bar_1 unchanged, beta_T = 1
            plain = GaussianDiffusion(T, **settings)
            betas = diffusion.make_betas(plain.beta_schedule, T, plain.beta_start, plain.beta_end)
            assert torch.allclose(diffusion.rescale_zero_terminal_snr(betas), rescale_zero_terminal_snr(betas),
                                  rtol=0, atol=1e-12)
            assert ours.alphas_cumprod[-1] == 0 and ours.betas[-1] == 1 and ours.snr[-1] == 0
            assert ours.alphas_cumprod[0] == plain.alphas_cumprod[0]
    if not zero_snr:  # T = 1: one beta, the schedule's first (cosine: capped at 0.999, as diffusers)
        ref = diffusers.DDPMScheduler(**theirs(dict(settings, num_timesteps=1)))
        assert torch.allclose(GaussianDiffusion(1, **settings).betas.double(), ref.betas.double(), atol=1e-7)


def test_sigmoid_and_scaled_linear_closed_forms():
    d = GaussianDiffusion(5, "sigmoid", beta_start=0.001, beta_end=0.011)
    x = torch.tensor([-6.0, -3.0, 0.0, 3.0, 6.0], dtype=torch.float64)
    assert torch.allclose(d.betas.double(), 0.001 + 0.01 / (1 + torch.exp(-x)), atol=1e-9)
    d = GaussianDiffusion(3, "scaled_linear", beta_start=0.01, beta_end=0.09)
    assert torch.allclose(d.betas.double(), torch.tensor([0.01, 0.04, 0.09], dtype=torch.float64), atol=1e-9)


@pytest.mark.parametrize("spacing", diffusion.TIMESTEP_SPACINGS)
def test_timesteps_match_set_timesteps(spacing):
    """Every k of T = 1, 7, 10, 48 and k = 1..60 plus a few of 1000, against both schedulers' set_timesteps."""
    for T in (1, 7, 10, 48, 1000):
        d = GaussianDiffusion(T, timestep_spacing=spacing)
        ddim = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
        ddpm_ = diffusers.DDPMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
        for k in sorted({*range(1, min(T, 60) + 1), *([T, 7, 30, 50, 333, 999] if T == 1000 else [])}):
            ddim.set_timesteps(k)
            ddpm_.set_timesteps(k)
            assert d.ddim_timesteps(k) == ddim.timesteps.tolist() == ddpm_.timesteps.tolist(), (T, k)
    d = GaussianDiffusion(1000, timestep_spacing=spacing)
    assert d.dpmpp_timesteps(20) == GaussianDiffusion().dpmpp_timesteps(20)  # DPM-Solver++: linspace always


# --------------------------------------------------------------------------- single steps


@pytest.mark.parametrize("prediction, clip, variance", itertools.product(PREDICTIONS, (True, False), diffusion.VARIANCE_TYPES))
def test_ddpm_steps_match_ddpm_scheduler(prediction, clip, variance):
    """p_sample at t = T-1 .. 0 with the same network output, x_t and noise, for each schedule."""
    for settings in SCHEDULES:
        d = GaussianDiffusion(**settings, prediction_type=prediction, clip_sample=clip, variance_type=variance)
        sched = ddpm_scheduler(d.config())
        g = torch.Generator().manual_seed(0)
        x, out = torch.randn(3, 3, 8, 8, generator=g), 1.5 * torch.randn(3, 3, 8, 8, generator=g)
        for t in (999, 700, 500, 37, 1, 0):
            expected = sched.step(out, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
            got = d.p_sample(lambda *_: out, x, torch.full((3,), t), torch.randn(x.shape, generator=torch.Generator().manual_seed(t)))
            # relative above 1: unclipped, x_0 = x_t / sqrt(alpha-bar) reaches 50 at the cosine's t = T (float32 ulp 4e-6)
            assert ((got - expected).abs() / expected.abs().clamp(min=1)).max().item() < 1e-5, (settings, t)


@pytest.mark.parametrize("prediction, spacing", itertools.product(PREDICTIONS, diffusion.TIMESTEP_SPACINGS))
def test_ddim_steps_match_ddim_scheduler(prediction, spacing):
    """ddim_step (eta 0 and 0.7) from t to t - T // k, the step DDIMScheduler takes under every spacing."""
    d = GaussianDiffusion(prediction_type=prediction, timestep_spacing=spacing)
    sched = ddim_scheduler(d.config())
    sched.set_timesteps(30)
    g = torch.Generator().manual_seed(1)
    x, out, z = (torch.randn(3, 3, 8, 8, generator=g) for _ in range(3))
    for t, eta in itertools.product(sched.timesteps.tolist()[::7] + [sched.timesteps[-1].item()], (0.0, 0.7)):
        expected = sched.step(out, t, x, eta=eta, use_clipped_model_output=True, variance_noise=z).prev_sample
        got = d.ddim_step(lambda *_: out, x, torch.full((3,), t), torch.full((3,), max(t - 1000 // 30, -1)), eta, z)
        assert (got - expected).abs().max().item() < 1e-5, (t, eta)


# --------------------------------------------------------------------------- whole loops


def ddpm_loop(sched, model, x, g, steps=None):
    if steps is not None:
        sched.set_timesteps(steps)
    for t in sched.timesteps:
        x = sched.step(model(x, int(t)), int(t), x, generator=g).prev_sample
    return x


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_full_ddpm_loops_match_ddpm_scheduler(prediction):
    """All T ancestral steps, same x_T and step noise; zero SNR with the predictions defined there."""
    for settings in (dict(beta_schedule="cosine"), dict(beta_schedule="sigmoid", variance_type="fixed_small"),
                     *([dict(rescale_betas_zero_snr=True, timestep_spacing="trailing")] if prediction != "epsilon" else [])):
        d = GaussianDiffusion(**settings, prediction_type=prediction)
        model = gaussian_model(d)
        x_T = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(2))
        expected = ddpm_loop(ddpm_scheduler(d.config()), model, x_T, torch.Generator().manual_seed(5))
        got = d.sample(model, x_T.shape, x_T=x_T, generator=torch.Generator().manual_seed(5), progress=False)
        assert (got - expected.clamp(-1, 1)).abs().max().item() < 1e-5, settings


def test_diffusers_full_loop_with_v_prediction_constants():
    """diffusers' tests/schedulers/test_scheduler_ddpm.py test_full_loop_with_v_prediction: its dummy model
    sample * t / (t + 1), its deterministic sample, torch.manual_seed(0), fixed_small; sum 202.0296, mean 0.2631."""
    n = 4 * 3 * 8 * 8
    x_T = (torch.arange(n).reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2)
    d = GaussianDiffusion(prediction_type="v_prediction", variance_type="fixed_small")
    model = lambda x, t: x * torch.as_tensor(t).reshape(-1, 1, 1, 1) / (torch.as_tensor(t).reshape(-1, 1, 1, 1) + 1)  # noqa: E731
    got = d.p_sample_loop(model, x_T.shape, x_T=x_T, generator=torch.manual_seed(0), progress=False)
    assert abs(got.abs().sum().item() - 202.0296) < 1e-2 and abs(got.abs().mean().item() - 0.2631) < 1e-3
    expected = ddpm_loop(ddpm_scheduler(d.config()), model, x_T, torch.manual_seed(0))
    assert (got - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("spacing", diffusion.TIMESTEP_SPACINGS)
def test_strided_ddpm_is_ddpm_scheduler_with_fixed_small(spacing):
    """`--sampler ddpm --steps k` (DDIM with eta 1) equals DDPMScheduler.set_timesteps(k) exactly when the
    variance is fixed_small (the posterior's); with fixed_large diffusers adds 1 - a_t / a_prev instead."""
    for prediction, k in itertools.product(PREDICTIONS, (7, 50)):
        d = GaussianDiffusion(prediction_type=prediction, timestep_spacing=spacing, variance_type="fixed_small")
        model = gaussian_model(d)
        x_T = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(2))
        expected = ddpm_loop(ddpm_scheduler(d.config()), model, x_T, torch.Generator().manual_seed(5), k)
        got = d.sample(model, x_T.shape, "ddpm", k, x_T=x_T, generator=torch.Generator().manual_seed(5), progress=False)
        assert (got - expected.clamp(-1, 1)).abs().max().item() < 1e-5, (prediction, k)


@pytest.mark.parametrize("prediction, zero_snr", [(p, False) for p in PREDICTIONS] + [("v_prediction", True), ("sample", True)])
def test_ddim_loops_match_ddim_scheduler(prediction, zero_snr):
    """Trailing spacing with k dividing T (DDIMScheduler then steps to the next timestep of its own list;
    with linspace or k not dividing T it steps to t - T // k instead, a diffusers quirk we do not copy)."""
    for eta, k in ((0.0, 20), (1.0, 50)):
        d = GaussianDiffusion(prediction_type=prediction, rescale_betas_zero_snr=zero_snr, timestep_spacing="trailing")
        sched, model, g = ddim_scheduler(d.config()), gaussian_model(d), torch.Generator().manual_seed(3)
        sched.set_timesteps(k)
        x = torch.randn(16, 3, 8, 8, generator=g)
        for t in sched.timesteps:
            x = sched.step(model(x, int(t)), t, x, eta=eta, generator=g, use_clipped_model_output=True).prev_sample
        got = d.sample(model, x.shape, "ddim", k, eta, generator=torch.Generator().manual_seed(3), progress=False)
        assert (got - x.clamp(-1, 1)).abs().max().item() < 1e-5, (eta, k)


@pytest.mark.parametrize("prediction, schedule", itertools.product(PREDICTIONS, ("linear", "cosine", "scaled_linear")))
def test_dpmpp_loops_match_dpm_solver_multistep_scheduler(prediction, schedule):
    """DPM-Solver++(2M), diffusers' default linspace; clip_sample is its thresholding with sample_max_value 1."""
    settings = dict(beta_schedule=schedule, **({"beta_start": 0.00085, "beta_end": 0.012} if schedule == "scaled_linear" else {}))
    d = GaussianDiffusion(**settings, prediction_type=prediction)
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=d.beta_start, beta_end=d.beta_end, beta_schedule=hub._BETA_SCHEDULES[schedule],
        prediction_type=prediction, algorithm_type="dpmsolver++", solver_order=2, thresholding=True, sample_max_value=1.0)
    in_float64(sched, d, ours=True).set_timesteps(20)
    ac = sched.alphas_cumprod[sched.timesteps]  # its float32 sigmas, recomputed in float64 by its formula
    sched.sigmas = torch.cat([((1 - ac) / ac).sqrt(), torch.zeros(1, dtype=torch.float64)])
    model = gaussian_model(d)
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    for t in sched.timesteps:
        x = sched.step(model(x, int(t)), t, x).prev_sample
    got = d.sample(model, x.shape, "dpmpp", 20, generator=torch.Generator().manual_seed(3), progress=False)
    assert (got - x.clamp(-1, 1)).abs().max().item() < 1e-5


def test_dpmpp_at_zero_terminal_snr_takes_the_exact_limit():
    """At alpha-bar_T = 0, lambda = -inf and the first DPM-Solver++ step is the DDIM step from pure noise
    (eps = x_T). diffusers instead sets alpha-bar_T = 2^-24 (its sigma would be infinite), so its numbers differ
    by about sqrt(2^-24) = 2.4e-4: compared here with the limit, not with diffusers."""
    d = GaussianDiffusion(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    model, x = gaussian_model(d), torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    tau = d.dpmpp_timesteps(10)
    full = lambda s: torch.full((4,), s)  # noqa: E731
    got, x0 = d.dpmpp_step(model, x, full(tau[0]), full(tau[1]))
    assert tau[0] == 999 and torch.isfinite(got).all()
    assert (got - d.ddim_step(model, x, full(tau[0]), full(tau[1]))).abs().max().item() < 1e-6
    out = d.sample(model, x.shape, "dpmpp", 10, x_T=x, progress=False)
    assert torch.isfinite(out).all() and 0.3 < out.std().item() < 0.6


def test_one_timestep_samples_with_every_sampler():
    """T = 1 (diffusers handles it): DDPMScheduler, DDIMScheduler and DPMSolverMultistepScheduler agree."""
    for prediction in PREDICTIONS:
        d = GaussianDiffusion(1, prediction_type=prediction)
        model, x_T = gaussian_model(d), torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        expected = ddpm_loop(ddpm_scheduler(d.config()), model, x_T, torch.Generator().manual_seed(1)).clamp(-1, 1)
        for sampler in ("ddpm", "ddim", "dpmpp"):
            got = d.sample(model, x_T.shape, sampler, x_T=x_T, generator=torch.Generator().manual_seed(1), progress=False)
            assert (got - expected).abs().max().item() < 1e-5, (prediction, sampler)
        diffusion.check_sampler("dpmpp", 1, num_timesteps=1)
        with pytest.raises(ValueError, match="1..1"):
            diffusion.check_sampler("ddim", 2, num_timesteps=1)


# --------------------------------------------------------------------------- the objective


@pytest.mark.parametrize("prediction, weight", itertools.product(PREDICTIONS, diffusion.LOSS_WEIGHTS))
def test_training_loss_targets_and_min_snr_weights(prediction, weight):
    """The loss written out from the same t and noise: target eps, v or x_0; min-SNR weights
    min(SNR, 5) / SNR, / (SNR + 1), / 1. The model is called as model(x_t, t), two positional arguments."""
    d = GaussianDiffusion(beta_schedule="cosine", prediction_type=prediction, loss_weight=weight)
    x0 = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    calls = []

    def model(*args, **kwargs):
        calls.append((len(args), kwargs))
        return 0.1 * args[0]

    torch.manual_seed(4)
    loss = d.training_loss(model, x0)
    torch.manual_seed(4)
    t = torch.randint(0, 1000, (6,))
    eps = torch.randn_like(x0)
    a = d.alphas_cumprod.double()[t].reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    target = {"epsilon": eps, "sample": x0, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}[prediction]
    snr = (a / (1 - a)).reshape(-1)
    w = {"none": torch.ones(6, dtype=torch.float64), "min-snr": snr.clamp(max=5) / {"epsilon": snr, "sample": 1,
                                                                                   "v_prediction": snr + 1}[prediction]}[weight]
    expected = (w * (0.1 * x_t - target).pow(2).flatten(1).mean(1)).mean()
    assert calls == [(2, {})] and abs(loss.item() - expected.item()) < 1e-5 * expected.item()


def test_min_snr_weights_the_x0_error_alike_for_every_prediction():
    """Hang et al.: with each type's weight, the loss is min(SNR, gamma) ||x_0 - x_0^||^2, whatever the network
    predicts (||eps - eps^||^2 = SNR ||x_0 - x_0^||^2, ||v - v^||^2 = (SNR + 1) ||x_0 - x_0^||^2)."""
    x0 = torch.rand(8, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x0_hat = x0 + 0.1 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    losses = []
    for prediction in PREDICTIONS:
        d = GaussianDiffusion(prediction_type=prediction, loss_weight="min-snr", snr_gamma=2.0)
        torch.manual_seed(3)  # the same t and noise for each type; the network answers with the x_0^ above
        t, eps = torch.randint(0, 1000, (8,)), torch.randn_like(x0)
        a = d.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        eps_hat = (x_t - a.sqrt() * x0_hat) / (1 - a).sqrt()
        answer = {"epsilon": eps_hat, "sample": x0_hat, "v_prediction": a.sqrt() * eps_hat - (1 - a).sqrt() * x0_hat}
        torch.manual_seed(3)
        losses.append(d.training_loss(lambda x, t: answer[prediction], x0).item())
        snr = d.snr[t]
    expected = (snr.clamp(max=2.0) * (x0 - x0_hat).pow(2).flatten(1).mean(1)).mean().item()
    assert np.allclose(losses, expected, rtol=1e-3), (losses, expected)


# --------------------------------------------------------------------------- checkpoints and commands


OLD_DIFFUSION = dict(num_timesteps=1000, beta_schedule="linear", variance_type="fixed_large", clip_sample=True)


def _checkpoint(diffusion_entry: dict) -> dict:
    torch.manual_seed(0)
    model = ddpm.UNet(ddpm.PRESETS["tiny"])
    from dataclasses import asdict
    return {"kind": "ddpm", "config": asdict(model.config), "image_size": 16, "diffusion": diffusion_entry,
            "model": model.state_dict(), "ema": None, "step": 1}


def test_old_checkpoint_loads_and_samples_as_before():
    """A "diffusion" entry from before these options: the defaults, i.e. the released configuration, and the
    same images as with every new key written out at its default."""
    cpu = torch.device("cpu")
    _, d_old, _ = ddpm.model_from_checkpoint(_checkpoint(OLD_DIFFUSION), cpu)
    assert d_old.config() == GaussianDiffusion().config() == {**OLD_DIFFUSION, **dict(
        beta_start=1e-4, beta_end=0.02, prediction_type="epsilon", rescale_betas_zero_snr=False,
        timestep_spacing="leading", loss_weight="none", snr_gamma=5.0)}
    for sampler, steps in (("ddim", 3), ("dpmpp", 3), ("ddpm", 3)):
        kw = dict(seed=0, batch_size=2, device=cpu, sampler=sampler, steps=steps)
        assert torch.equal(ddpm.generate(_checkpoint(OLD_DIFFUSION), 2, **kw),
                           ddpm.generate(_checkpoint(GaussianDiffusion().config()), 2, **kw)), sampler
    cfg = ddpm_run.TrainConfig(data=".", out="o").resumed({"diffusion": OLD_DIFFUSION, "args": {}})
    assert cfg.diffusion_settings() == GaussianDiffusion().config()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def _train(images, out, *extra):
    return main.main(["ddpm", "--data", str(images), "--out", str(out), "--preset", "tiny", "--image-size", "16",
                      "--batch-size", "2", "--num-samples", "2", "--sample-steps", "2", "--device", "cpu", *extra])


def test_training_flags_reach_the_checkpoint_sample_and_resume(images, tmp_path, capsys):
    out = tmp_path / "v"
    flags = ["--prediction", "v_prediction", "--beta-schedule", "sigmoid", "--beta-end", "0.03", "--zero-snr",
             "--timestep-spacing", "trailing", "--loss-weight", "min-snr", "--snr-gamma", "3"]
    assert _train(images, out, "--max-steps", "2", *flags) == 0
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["diffusion"] == dict(GaussianDiffusion().config(), beta_schedule="sigmoid", beta_end=0.03,
                                     prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                     timestep_spacing="trailing", loss_weight="min-snr", snr_gamma=3.0)
    unet, d, size = ddpm.model_from_checkpoint(ckpt, torch.device("cpu"))
    got = ddpm.generate(ckpt, 2, seed=0, batch_size=2, device=torch.device("cpu"), sampler="ddim", steps=4)
    ref = d.sample(unet, (2, 3, 16, 16), "ddim", 4, generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.equal(got, ref) and d.ddim_timesteps(4)[0] == 999  # trailing: the chain starts at t = T
    assert hub.scheduler_config(ckpt["diffusion"])["rescale_betas_zero_snr"] is True
    assert _train(images, out, "--max-steps", "3", "--resume") == 0  # no flags: the checkpoint's settings
    assert load_checkpoint(out / "checkpoint.pt")["diffusion"] == ckpt["diffusion"]
    capsys.readouterr()
    assert _train(images, out, "--max-steps", "4", "--resume", "--prediction", "sample") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trained with --prediction v_prediction, not sample" in err


def test_strided_ddpm_sampling_says_how_it_differs_from_diffusers(tmp_path, capsys):
    path = tmp_path / "c.pt"
    save_checkpoint(_checkpoint(OLD_DIFFUSION), path)
    assert main.main(["sample", "--checkpoint", str(path), "--out", str(tmp_path / "s"), "-n", "1",
                      "--sampler", "ddpm", "--steps", "2", "--device", "cpu"]) == 0
    note = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(note) == 1 and "DDPMScheduler.set_timesteps(2) in the mean" in note[0] and "fixed_large" in note[0]


@pytest.mark.parametrize("extra, text", [
    (["--beta-schedule", "linear", "--beta-start", "0.02", "--beta-end", "0.01"],
     "--beta-start 0.02 must be below --beta-end 0.01"),
    (["--beta-schedule", "linear", "--beta-end", "1.5"], "must lie in (0, 1)"),
    (["--beta-schedule", "linear", "--beta-start", "0"], "must lie in (0, 1)"),
    (["--beta-schedule", "cosine", "--beta-end", "0.1"], "with the cosine schedule: it defines"),
    (["--beta-end", "0.1"], "the cosine schedule (the default from scratch; add --beta-schedule linear)"),
    (["--zero-snr", "--timestep-spacing", "trailing", "--prediction", "epsilon"], "--zero-snr with --prediction epsilon"),
    (["--zero-snr", "--prediction", "v_prediction"], "--zero-snr with --timestep-spacing leading"),
    (["--snr-gamma", "3"], "--snr-gamma 3 with --loss-weight none"),
    (["--loss-weight", "min-snr", "--snr-gamma", "0"], "--snr-gamma must be greater than 0"),
])
def test_bad_schedule_options_are_one_line_errors(images, tmp_path, capsys, extra, text):
    out = tmp_path / "bad"
    assert _train(images, out, *extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and text in err and "Traceback" not in err, err
    assert not out.exists()


def test_unknown_schedule_or_prediction_is_a_one_line_argparse_error(images, tmp_path, capsys):
    for extra, text in ((["--beta-schedule", "laplace"], "invalid choice: 'laplace'"),
                        (["--prediction", "x0"], "invalid choice: 'x0'"),
                        (["--timestep-spacing", "even"], "invalid choice: 'even'"),
                        (["--loss-weight", "snr"], "invalid choice: 'snr'")):
        with pytest.raises(SystemExit) as e:
            _train(images, tmp_path / "bad", *extra)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and text in err, err


def test_bad_settings_in_python_and_in_checkpoints():
    for kw, text in ((dict(beta_schedule="laplace"), "unknown --beta-schedule"),
                     (dict(prediction_type="x0"), "unknown --prediction"),
                     (dict(timestep_spacing="even"), "unknown --timestep-spacing"),
                     (dict(loss_weight="snr"), "unknown --loss-weight"),
                     (dict(num_timesteps=1, rescale_betas_zero_snr=True, prediction_type="sample",
                           timestep_spacing="linspace"), "at least 2 timesteps"),
                     (dict(num_timesteps=0), "positive integer")):
        with pytest.raises(ValueError, match=text):
            GaussianDiffusion(**kw)
    bad = _checkpoint(dict(OLD_DIFFUSION, rescale_betas_zero_snr=True))
    with pytest.raises(CLIError, match="malformed DDPM checkpoint: --zero-snr with --prediction epsilon"):
        ddpm.model_from_checkpoint(bad, torch.device("cpu"))
    with pytest.raises(CLIError, match="malformed DDPM checkpoint: --zero-snr with --prediction epsilon"):
        ddpm_run.TrainConfig(data=".", out="o").resumed(bad)


def test_hub_scheduler_config_maps_every_option():
    for settings in (*SCHEDULES, dict(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                      timestep_spacing="linspace", loss_weight="min-snr")):
        d = GaussianDiffusion(**settings)
        config = hub.scheduler_config(d.config())
        ref = diffusers.DDPMScheduler.from_config(config)
        assert (ref.alphas_cumprod.double() - d.alphas_cumprod.double()).abs().max() < 1e-6
        for ours, name in (("prediction_type", "prediction_type"), ("timestep_spacing", "timestep_spacing"),
                           ("rescale_betas_zero_snr", "rescale_betas_zero_snr"), ("variance_type", "variance_type")):
            assert ref.config[name] == d.config()[ours]
    assert math.isclose(hub.scheduler_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                              "beta_end": 0.012})["beta_end"], 0.012)
