"""The diffusion process of DDPM (Ho, Jain and Abbeel, NeurIPS 2020) and its samplers: DDPM's
ancestral sampler (Alg. 2), DDIM (Song, Meng and Ermon, ICLR 2021) and DPM-Solver++(2M) (Lu et al. 2022).
The network lives in ddpm.py; this file is only the arithmetic around it. Read top to bottom:
  1. the noise schedule (linear, scaled linear, cosine, sigmoid; zero terminal SNR, Lin et al. 2024),
  2. the diffusion process: forward q (Eq. 4), posterior (Eq. 6-7), what the network predicts
     (eps, v or x_0) turned into (eps, x_0) in one place, reverse p (Eq. 11, Alg. 2), one DDIM step
     (Song et al. Eq. 12, 16), one DPM-Solver++ step (Lu et al. Prop. 4.1, Alg. 2), the loops,
  3. the objective, per prediction type, optionally min-SNR-gamma weighted (Hang et al. 2023).
Checked against diffusers 0.42 in tests/test_ddpm.py and tests/test_schedules.py (DDPMScheduler,
DDIMScheduler, DPMSolverMultistepScheduler give the same numbers); nothing here imports diffusers.

Timestep convention: code t = 0 .. T-1 is the paper's t = 1 .. T. So betas[0] is
the paper's beta_1, x_0 in code names the data only as "x0", and the last
reverse step is taken at code t = 0, where no noise is added.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# --------------------------------------------------------------------------- 1. the noise schedule

NUM_TIMESTEPS = 1000  # T of the released model
BETA_START, BETA_END = 1e-4, 0.02  # Ho et al. Sec. 4
BETA_SCHEDULES = ("linear", "scaled_linear", "cosine", "sigmoid")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_large", "fixed_small")
LOSS_WEIGHTS = ("none", "min-snr")
DEFAULT_STEPS = {"ddpm": NUM_TIMESTEPS, "ddim": 50, "dpmpp": 20}  # network calls per image, by sampler


def make_betas(schedule: str, T: int, beta_start: float = BETA_START, beta_end: float = BETA_END) -> torch.Tensor:
    """beta_t for t = 0..T-1 in float64, under diffusers' DDPMScheduler names:
    linear: beta_start .. beta_end evenly (Ho et al. Sec. 4: 1e-4 .. 0.02).
    scaled_linear: sqrt(beta) evenly from sqrt(beta_start) to sqrt(beta_end), squared (Rombach et al. 2022).
    cosine (diffusers: squaredcos_cap_v2): Nichol & Dhariwal Eq. 17, alpha-bar = f(t) / f(0) with
      f(t) = cos^2(((t/T + s) / (1 + s)) pi/2), s = 0.008, as beta = 1 - f(t) / f(t-1) capped at 0.999
      (their Sec. 3.2; it bites only at t = T); beta_start and beta_end unused, as in diffusers.
    sigmoid: beta = beta_start + (beta_end - beta_start) sigmoid(x), x evenly from -6 to 6 (diffusers'
      "sigmoid", GeoDiff's, Xu et al. ICLR 2022; docs/ddpm.md says why not Jabri et al.'s)."""
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
    if schedule == "cosine":
        s = 0.008
        f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    if schedule == "sigmoid":
        return beta_start + (beta_end - beta_start) * torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64))
    raise ValueError(f"unknown beta schedule {schedule!r} (choose from {', '.join(BETA_SCHEDULES)})")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024 ("Common diffusion noise schedules and sample steps are flawed", Alg. 1): shift and
    scale sqrt(alpha-bar) so that it ends at 0 (SNR(T) = alpha-bar_T / (1 - alpha-bar_T) = 0: x_T is pure
    noise, as sampling assumes) and still starts at its old value; beta_T becomes 1. Float64 in and out."""
    sqrt_ab = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab ** 2
    return 1 - torch.cat([ab[:1], ab[1:] / ab[:-1]])


def check_settings(num_timesteps: int, beta_schedule: str, beta_start: float, beta_end: float, prediction_type: str,
                   rescale_betas_zero_snr: bool, timestep_spacing: str, variance_type: str,
                   loss_weight: str, snr_gamma: float) -> None:
    """GaussianDiffusion's settings, each bad one or bad combination as a one-line ValueError naming the
    command-line options (main.py shows it as one line)."""
    for name, value, allowed in (("--beta-schedule", beta_schedule, BETA_SCHEDULES),
                                 ("--prediction", prediction_type, PREDICTION_TYPES),
                                 ("--timestep-spacing", timestep_spacing, TIMESTEP_SPACINGS),
                                 ("--variance", variance_type, VARIANCE_TYPES), ("--loss-weight", loss_weight, LOSS_WEIGHTS)):
        if value not in allowed:
            raise ValueError(f"unknown {name} {value!r} (choose from {', '.join(allowed)})")
    if not (isinstance(num_timesteps, int) and num_timesteps >= 1):
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
    if not beta_start < beta_end:
        raise ValueError(f"--beta-start {beta_start:g} must be below --beta-end {beta_end:g} (betas grow with t)")
    if not 0 < beta_start < beta_end < 1:
        raise ValueError(f"--beta-start {beta_start:g} and --beta-end {beta_end:g} must lie in (0, 1): "
                         "a beta is the fraction of variance replaced by noise in one step")
    if not snr_gamma > 0:
        raise ValueError(f"--snr-gamma must be greater than 0, got {snr_gamma:g}")
    if rescale_betas_zero_snr and prediction_type == "epsilon":
        raise ValueError("--zero-snr with --prediction epsilon: at t = T, x_0 = (x_T - sqrt(1 - alpha-bar) eps) / "
                         "sqrt(alpha-bar) divides by alpha-bar_T = 0 (use v_prediction, Lin et al. Sec. 3.2, or sample)")
    if rescale_betas_zero_snr and timestep_spacing == "leading":
        raise ValueError("--zero-snr with --timestep-spacing leading: DDIM's chain would start at T - T/k, never "
                         "at t = T where the rescaled schedule is pure noise (use trailing, Lin et al. Sec. 3.3, or linspace)")
    if rescale_betas_zero_snr and num_timesteps < 2:
        raise ValueError("--zero-snr needs at least 2 timesteps (Alg. 1 pins alpha-bar_1 and sets alpha-bar_T = 0)")
    betas = make_betas(beta_schedule, num_timesteps, beta_start, beta_end)
    if rescale_betas_zero_snr and not torch.isfinite(rescale_zero_terminal_snr(betas)).all():
        raise ValueError(f"--zero-snr with --beta-start {beta_start:g} and --beta-end {beta_end:g}: alpha-bar "
                         "reaches 0 in float64 before t = T, where the rescaling (Lin et al. Alg. 1) divides 0 by 0 "
                         "(use smaller betas)")
    last = torch.prod(1 - betas)  # alpha-bar_T in float64
    if prediction_type == "epsilon" and not rescale_betas_zero_snr and torch.isinf((1 / last).sqrt().float()):
        raise ValueError(f"--beta-schedule {beta_schedule} from --beta-start {beta_start:g} to --beta-end {beta_end:g} "
                         f"with --prediction epsilon: alpha-bar_T = {last.item():.3g}, so 1 / sqrt(alpha-bar) in x_0 = "
                         "(x_t - sqrt(1 - alpha-bar) eps) / sqrt(alpha-bar) overflows float32 and no image could be "
                         "sampled (use smaller betas, or --prediction v_prediction or sample)")


def extract(a: torch.Tensor, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """a[t] for a batch of timesteps t (B,), shaped (B, 1, 1, 1) to broadcast against x."""
    return a.gather(0, t).reshape(t.shape[0], *([1] * (len(shape) - 1)))


# --------------------------------------------------------------------------- 2. the diffusion process


class GaussianDiffusion(nn.Module):
    """The forward process q(x_t | x_0), its posterior, and the learned reverse process p(x_{t-1} | x_t)
    of DDPM, plus the DDIM and DPM-Solver++ samplers. The defaults are the released model's (Ho et al.:
    linear 1e-4 .. 0.02, T = 1000, eps prediction). The options keep diffusers' names, so a
    scheduler_config.json maps one to one (tools/export.py): beta_schedule, beta_start, beta_end
    (make_betas); prediction_type "epsilon" (Ho et al. Eq. 11), "v_prediction" (v = sqrt(alpha-bar) eps -
    sqrt(1 - alpha-bar) x_0, Salimans & Ho 2022, Sec. 4) or "sample" (x_0); rescale_betas_zero_snr (Lin et al.
    2024, Alg. 1); timestep_spacing (ddim_timesteps); variance_type "fixed_large" beta_t or "fixed_small"
    beta~_t (Sec. 3.2); clip_sample (model_predictions); loss_weight, snr_gamma (training_loss, Hang et al.
    2023). What each means and which combinations are refused: docs/ddpm.md."""

    def __init__(self, num_timesteps: int = NUM_TIMESTEPS, beta_schedule: str = "linear",
                 variance_type: str = "fixed_large", clip_sample: bool = True, beta_start: float = BETA_START,
                 beta_end: float = BETA_END, prediction_type: str = "epsilon", rescale_betas_zero_snr: bool = False,
                 timestep_spacing: str = "leading", loss_weight: str = "none", snr_gamma: float = 5.0):
        super().__init__()
        check_settings(num_timesteps, beta_schedule, beta_start, beta_end, prediction_type, rescale_betas_zero_snr,
                       timestep_spacing, variance_type, loss_weight, snr_gamma)
        self.num_timesteps, self.beta_schedule = num_timesteps, beta_schedule
        self.variance_type, self.clip_sample = variance_type, clip_sample
        self.beta_start, self.beta_end, self.prediction_type = beta_start, beta_end, prediction_type
        self.rescale_betas_zero_snr, self.timestep_spacing = rescale_betas_zero_snr, timestep_spacing
        self.loss_weight, self.snr_gamma = loss_weight, snr_gamma

        betas = make_betas(beta_schedule, num_timesteps, beta_start, beta_end)  # float64, stored as float32
        betas = rescale_zero_terminal_snr(betas) if rescale_betas_zero_snr else betas
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, 0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
        buffers = dict(
            betas=betas,                                              # beta_t
            alphas_cumprod=alphas_cumprod,                            # alpha-bar_t = prod_{s<=t} (1 - beta_s)
            alphas_cumprod_prev=alphas_cumprod_prev,                  # alpha-bar_{t-1}, 1 at t = 0
            sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1 - alphas_cumprod).sqrt(),
            sqrt_recip_alphas_cumprod=(1 / alphas_cumprod).sqrt(),
            sqrt_recipm1_alphas_cumprod=(1 / alphas_cumprod - 1).sqrt(),
            posterior_variance=posterior_variance,                    # beta~_t (Eq. 7), 0 at t = 0
            snr=alphas_cumprod / (1 - alphas_cumprod),                # SNR_t = alpha-bar / (1 - alpha-bar); 0 at a zero-SNR T
            # lambda_t = log(sqrt(alpha-bar) / sqrt(1 - alpha-bar)) (Lu et al.), from float64: exact where alpha-bar in
            # float32 has underflowed (and equal in neighbouring steps); -inf at a zero-SNR T
            lambdas=0.5 * (alphas_cumprod.log() - (-alphas_cumprod).log1p()),
            posterior_mean_coef1=betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
            posterior_mean_coef2=(1 - alphas_cumprod_prev) * alphas.sqrt() / (1 - alphas_cumprod),
            # sigma_t^2 of the reverse step (Sec. 3.2): beta_t ("fixed_large") or beta~_t ("fixed_small").
            # Patch: diffusers uses beta_t at every t; Ho's code puts beta~_1 at t = 0. Samples are equal
            # either way because no noise is added at t = 0; only the likelihood bound would differ.
            model_variance=betas if variance_type == "fixed_large" else posterior_variance,
        )
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)

    def config(self) -> dict:
        """The constructor's arguments: GaussianDiffusion(**d.config()) is d again (a checkpoint's "diffusion")."""
        return dict(num_timesteps=self.num_timesteps, beta_schedule=self.beta_schedule,
                    variance_type=self.variance_type, clip_sample=self.clip_sample, beta_start=self.beta_start,
                    beta_end=self.beta_end, prediction_type=self.prediction_type,
                    rescale_betas_zero_snr=self.rescale_betas_zero_snr, timestep_spacing=self.timestep_spacing,
                    loss_weight=self.loss_weight, snr_gamma=self.snr_gamma)

    # ---- forward process and its posterior

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps  (DDPM Eq. 4, reparameterised)."""
        return (extract(self.sqrt_alphas_cumprod, t, x0.shape) * x0
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise)

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """mu~_t = coef1 x_0 + coef2 x_t, the mean of q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I) (DDPM Eq. 6-7)."""
        return extract(self.posterior_mean_coef1, t, x_t.shape) * x0 + extract(self.posterior_mean_coef2, t, x_t.shape) * x_t

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - alpha-bar_t) eps) / sqrt(alpha-bar_t), Eq. 4 solved for x_0."""
        return extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps

    def predict_noise_from_start(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """eps = (x_t - sqrt(alpha-bar_t) x_0) / sqrt(1 - alpha-bar_t), Eq. 4 solved for eps."""
        return (x_t - extract(self.sqrt_alphas_cumprod, t, x_t.shape) * x0) / extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape)

    def model_predictions(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor):
        """(eps, x_0) from the network's output, whatever it predicts; every sampler reads only these.
        With a = alpha-bar_t and x_t = sqrt(a) x_0 + sqrt(1 - a) eps (Eq. 4):
          epsilon: eps = out, x_0 = (x_t - sqrt(1 - a) eps) / sqrt(a);
          v_prediction: x_0 = sqrt(a) x_t - sqrt(1 - a) v, eps = sqrt(1 - a) x_t + sqrt(a) v (Salimans & Ho,
            Appendix D; no division, so defined at a = 0);
          sample: x_0 = out, eps = (x_t - sqrt(a) x_0) / sqrt(1 - a).
        Then x_0 is clipped to [-1, 1] as the released sampler does, and eps re-derived from it, so
        x_t = sqrt(a) x_0 + sqrt(1 - a) eps still holds. DDPM's posterior mean reads x_0 only; DDIM's step both."""
        out = model(x_t, t).float()
        if self.prediction_type == "epsilon":
            eps, x0 = out, self.predict_start_from_noise(x_t, t, out)
        elif self.prediction_type == "v_prediction":
            a, s = extract(self.sqrt_alphas_cumprod, t, x_t.shape), extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape)
            eps, x0 = s * x_t + a * out, a * x_t - s * out
        else:
            eps, x0 = self.predict_noise_from_start(x_t, t, out), out
        if not self.clip_sample:
            return eps, x0
        x0 = x0.clamp(-1.0, 1.0)
        # Patch: diffusers' DDIMScheduler keeps the network's eps beside the clipped x_0 by default
        # (use_clipped_model_output=False). Then every step that clips jumps by sqrt(a_t) (clip(x_0) - x_0),
        # however small the step, and DDIM gets worse with more steps on a model whose early x_0 leaves
        # [-1, 1] (docs/ddpm.md, "Sampler quality"). Re-deriving eps is its use_clipped_model_output=True.
        return self.predict_noise_from_start(x_t, t, x0), x0

    # ---- reverse process (DDPM)

    def p_mean_variance(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor):
        """(mean, variance, predicted x_0) of p(x_{t-1} | x_t) (DDPM Eq. 11): the posterior mean at the predicted
        x_0, equal to (x_t - beta_t / sqrt(1 - alpha-bar_t) eps) / sqrt(alpha_t) unless x_0 is clipped."""
        _, x0 = self.model_predictions(model, x_t, t)
        return self.q_posterior(x0, x_t, t), extract(self.model_variance, t, x_t.shape), x0

    def p_sample(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                 return_x0: bool = False):
        """One ancestral step x_{t-1} = mean + sigma_t z  (DDPM Alg. 2, line 4) with the given z.
        No noise is added at t = 0: the last step returns the mean, which there is the
        predicted x_0 (coef1 = 1, coef2 = 0). return_x0: return (x_{t-1}, predicted x_0)."""
        mean, var, x0 = self.p_mean_variance(model, x_t, t)
        nonzero = (t != 0).float().reshape(-1, *([1] * (x_t.dim() - 1)))  # a mask, so no host sync
        x_prev = mean + nonzero * var.sqrt() * noise
        return (x_prev, x0) if return_x0 else x_prev

    @torch.inference_mode()
    def p_sample_loop(self, model: nn.Module, shape, x_T=None, generator=None, progress=True, keep=None):
        """DDPM Alg. 2: start from x_T ~ N(0, I) and take all T ancestral steps.
        Noise is drawn from `generator` in the order diffusers' DDPMPipeline draws it
        (x_T, then one z per step except the last), so the same seed gives the same image.
        keep: timesteps at which to record x_t and the x_0 predicted from it; then returns
        (x_0, trajectory) with trajectory = {"t": [...], "x": (K, B, C, H, W), "x0": (K, B, C, H, W)}."""
        from tqdm import tqdm

        device, record = self.betas.device, []
        x = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T.to(device)
        for i in tqdm(range(self.num_timesteps - 1, -1, -1), desc="DDPM", disable=not progress, leave=False):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            z = torch.randn(shape, generator=generator, device=device) if i > 0 else torch.zeros_like(x)
            x_prev, x0 = self.p_sample(model, x, t, z, return_x0=True)
            record += [(i, x, x0)] if keep is not None and i in keep else []
            x = x_prev
        return x if keep is None else (x, _trajectory(record))

    # ---- DDIM (Song et al.): the same network on a shorter, non-Markovian chain

    def ddim_timesteps(self, steps: int) -> list[int]:
        """The chain of the strided samplers, by timestep_spacing, as diffusers' DDIMScheduler and
        DDPMScheduler.set_timesteps (numpy's round, ties to even). For 50 of 1000 steps:
        leading: i (T // k), 980, 960, ..., 20, 0;  trailing: round(T - i T / k) - 1, 999, 979, ..., 19;
        linspace: round(i (T - 1) / (k - 1)), 999, 979, ..., 20, 0 (spacing 20.4)."""
        T = self.num_timesteps
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be in 1..{T}, got {steps}")
        # Patch: numpy's float arange / linspace, as diffusers computes them; the exact fractions round otherwise
        # at ties (trailing, T = 7, k = 6: 3.5 exactly is 4, numpy's 3.4999999999999996 is 3).
        if self.timestep_spacing == "trailing":
            return (np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1).tolist()
        if self.timestep_spacing == "linspace":
            return np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64).tolist()
        return [i * (T // steps) for i in range(steps)][::-1]

    def ddim_step(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
                  eta: float = 0.0, noise: torch.Tensor | None = None, return_x0: bool = False):
        """One DDIM update x_t -> x_{t_prev} (Song et al. Eq. 12), with a = alpha-bar:
            x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z,
            sigma = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)  (Eq. 16),
        x0 and eps from model_predictions (eps from the clipped x0: diffusers' use_clipped_model_output=True).
        eta = 0: deterministic, DPM-Solver++'s first-order step; eta = 1: ancestral on the strided chain; z is
        `noise` (None: none). t_prev = -1 ends with a_prev = 1, returning x0 (diffusers' set_alpha_to_one).
        Where float32 alpha-bar underflowed to 0 at both ends, a_t / a_prev (0/0) is 0: sqrt(a_prev) = 0 there."""
        eps, x0 = self.model_predictions(model, x_t, t)
        a_t = extract(self.alphas_cumprod, t, x_t.shape)
        a_prev = extract(self.alphas_cumprod_prev, t_prev + 1, x_t.shape)  # alpha-bar_{t_prev}; 1 at t_prev = -1
        ratio = torch.where(a_prev > 0, a_t / a_prev, torch.zeros_like(a_t))  # a_t <= a_prev: 0 when a_prev is
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - ratio)).sqrt()
        x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        x_prev = x_prev if noise is None else x_prev + sigma * noise
        return (x_prev, x0) if return_x0 else x_prev

    @torch.inference_mode()
    def ddim_sample(self, model: nn.Module, shape, steps: int = 50, eta: float = 0.0, x_T=None,
                    generator=None, progress=True, keep=None):
        """DDIM: ddim_step along tau = ddim_timesteps(steps), from x_T ~ N(0, I), drawing noise
        as diffusers' DDIMScheduler does (x_T, then one z per step when eta > 0).
        keep: as in p_sample_loop (timesteps of tau)."""
        from tqdm import tqdm

        device, tau, record = self.betas.device, self.ddim_timesteps(steps), []
        x = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T.to(device)
        for i, i_prev in tqdm(list(zip(tau, tau[1:] + [-1])), desc="DDIM", disable=not progress, leave=False):
            t, t_prev = (torch.full((shape[0],), s, device=device, dtype=torch.long) for s in (i, i_prev))
            z = torch.randn(shape, generator=generator, device=device) if eta > 0 else None
            x_prev, x0 = self.ddim_step(model, x, t, t_prev, eta, z, return_x0=True)
            record += [(i, x, x0)] if keep is not None and i in keep else []
            x = x_prev
        return x if keep is None else (x, _trajectory(record))

    # ---- DPM-Solver++ (Lu et al. 2022): the probability-flow ODE solved in lambda, on the data prediction

    def dpmpp_timesteps(self, steps: int) -> list[int]:
        """DPMSolverMultistepScheduler's "linspace": round(i (T - 1) / steps), i = steps .. 1, ties to even (20 of
        1000: 999, 949, ..., 50); at most T - 1 steps (one when T = 1). Whatever timestep_spacing says: it starts
        at t = T - 1, as Lin et al. ask of a zero-SNR schedule."""
        if not 1 <= steps <= max(self.num_timesteps - 1, 1):
            raise ValueError(f"steps must be in 1..{max(self.num_timesteps - 1, 1)}, got {steps}")
        return [round(i * ((self.num_timesteps - 1) / steps)) for i in range(steps, 0, -1)]

    def dpmpp_step(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
                   x0_last: torch.Tensor | None = None, t_last: torch.Tensor | None = None):
        """One DPM-Solver++(2M) update x_t -> x_{t_prev} (Lu et al. 2022, arXiv:2211.01095). With a = alpha-bar,
        alpha = sqrt(a), sigma = sqrt(1 - a), lambda = log(alpha / sigma) and h = lambda_prev - lambda_t:
            x_prev = (sigma_prev / sigma_t) x_t - alpha_prev (e^-h - 1) D,
        the exact solution of the ODE in lambda (their Prop. 4.1) with the data prediction held at D.
        First order (Alg. 2, line 4): D = x0 of model_predictions, clipped as in every sampler here.
        Second order, given the previous step's x0_last at t_last (the multistep buffer; Alg. 2, lines 7-9):
            D = (1 + 1/(2r)) x0 - 1/(2r) x0_last,  r = h_last / h = (lambda_t - lambda_last) / h.
        t_prev = -1 ends at sigma = 0 (lambda = +inf), where the first-order step returns x0 exactly and the
        second order is undefined (r = 0). Returns (x_prev, x0): the loop keeps x0 for the next step."""
        lam = F.pad(self.lambdas, (1, 0), value=math.inf)  # lambda_s at index s + 1: +inf at s = -1 (alpha-bar 1)
        _, x0 = self.model_predictions(model, x_t, t)
        a_t = extract(self.alphas_cumprod, t, x_t.shape)
        a_prev = extract(self.alphas_cumprod_prev, t_prev + 1, x_t.shape)  # alpha-bar_{t_prev}; 1 at t_prev = -1
        lam_t, lam_prev = extract(lam, t + 1, x_t.shape), extract(lam, t_prev + 1, x_t.shape)
        h, d, zero = lam_prev - lam_t, x0, torch.zeros_like(a_t)
        if x0_last is not None:
            lam_last = extract(lam, t_last + 1, x_t.shape)
            half_inv_r = torch.where(lam_last > -math.inf, h / (2 * (lam_t - lam_last)), zero)  # 1/(2r); 0 after SNR 0
            d = (1 + half_inv_r) * x0 - half_inv_r * x0_last
        # alpha_prev = 0 where alpha-bar is 0 even in float64 (lambda -inf at t_prev and t, h undefined): no data term
        data_term = torch.where(lam_prev > -math.inf, a_prev.sqrt() * torch.expm1(-h), zero) * d
        x_prev = ((1 - a_prev) / (1 - a_t)).sqrt() * x_t - data_term
        return x_prev, x0

    @torch.inference_mode()
    def dpmpp_sample(self, model: nn.Module, shape, steps: int = 20, x_T=None, generator=None, progress=True, keep=None):
        """DPM-Solver++(2M) along tau = dpmpp_timesteps(steps), ending at sigma = 0: one network call per step,
        first order at the first step (nothing buffered yet) and at the last, as diffusers does by default
        (final_sigmas_type "zero"); second order in between. Deterministic: only x_T is drawn.
        keep: as in p_sample_loop (timesteps of tau)."""
        from tqdm import tqdm

        device, tau, record, x0_last, t_last = self.betas.device, self.dpmpp_timesteps(steps), [], None, None
        x = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T.to(device)
        for i, i_prev in tqdm(list(zip(tau, tau[1:] + [-1])), desc="DPM-Solver++", disable=not progress, leave=False):
            t, t_prev = (torch.full((shape[0],), s, device=device, dtype=torch.long) for s in (i, i_prev))
            x_prev, x0 = self.dpmpp_step(model, x, t, t_prev, *((x0_last, t_last) if i_prev >= 0 else ()))
            record += [(i, x, x0)] if keep is not None and i in keep else []
            x, x0_last, t_last = x_prev, x0, t
        return x if keep is None else (x, _trajectory(record))

    def sample(self, model: nn.Module, shape, sampler: str = "ddpm", steps: int | None = None, eta: float = 0.0,
               x_T=None, generator=None, progress: bool = True, keep=None):
        """Images (B, C, H, W) in [-1, 1] (with keep: (images, trajectory), see p_sample_loop).
        "ddim": `steps` (default 50) DDIM steps with `eta`. "dpmpp": `steps` (default 20) DPM-Solver++(2M)
        steps (an ODE solver: eta must be 0). "ddpm": Alg. 2 over all T steps. Given fewer steps (1 <= steps < T)
        it is NOT Alg. 2 but ancestral sampling on the strided chain, i.e. DDIM with eta = 1, and `eta` is
        ignored: what `main.py sample --sampler ddpm --steps N` has always done, kept for the command line."""
        steps = steps or default_steps(sampler, self.num_timesteps)
        if sampler == "ddpm" and steps == self.num_timesteps:
            out = self.p_sample_loop(model, shape, x_T, generator, progress, keep)
        elif sampler in ("ddpm", "ddim"):
            eta = 1.0 if sampler == "ddpm" else eta
            out = self.ddim_sample(model, shape, steps, eta, x_T, generator, progress, keep)
        elif sampler == "dpmpp" and not eta:
            out = self.dpmpp_sample(model, shape, steps, x_T, generator, progress, keep)
        else:
            raise ValueError(f"sampler {sampler!r} with eta {eta:g}: expected ddpm, ddim (any eta) or dpmpp (eta 0)")
        return out.clamp(-1.0, 1.0) if keep is None else (out[0].clamp(-1.0, 1.0), out[1])

    # ---- the objective

    def training_loss(self, model: nn.Module, x0: torch.Tensor) -> torch.Tensor:
        """DDPM Alg. 1: t ~ Uniform{0..T-1}, eps ~ N(0, I), loss = || target - model(x_t, t) ||^2 with the
        target of prediction_type: eps (Ho et al. Eq. 14), v = sqrt(a) eps - sqrt(1 - a) x_0 (Salimans & Ho
        Sec. 4) or x_0. loss_weight "min-snr" weights each image by min(SNR_t, gamma) / SNR_t (eps),
        min(SNR_t, gamma) / (SNR_t + 1) (v) or min(SNR_t, gamma) (x_0): the same weight min(SNR, gamma) on the
        x_0 error in every case (Hang et al. 2023, Sec. 3.4: ||eps - eps^||^2 = SNR ||x_0 - x_0^||^2 and
        ||v - v^||^2 = (SNR + 1) ||x_0 - x_0^||^2), gamma = snr_gamma (5 in their paper)."""
        t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        out = model(self.q_sample(x0, t, noise), t).float()
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = (extract(self.sqrt_alphas_cumprod, t, x0.shape) * noise
                      - extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * x0)
        else:
            target = x0
        if self.loss_weight == "none":
            return F.mse_loss(out, target)
        snr = self.snr[t]  # (B,)
        if self.prediction_type == "epsilon":  # min(SNR, gamma) / SNR as min(1, gamma / SNR): 1 where SNR underflows
            weight = (self.snr_gamma / snr).clamp(max=1)
        else:
            weight = snr.clamp(max=self.snr_gamma) / (snr + 1 if self.prediction_type == "v_prediction" else 1)
        return (weight * (out - target).pow(2).flatten(1).mean(1)).mean()


def default_steps(sampler: str, num_timesteps: int) -> int:
    """A sampler's default number of network calls (DEFAULT_STEPS), no more than the schedule allows."""
    return min(DEFAULT_STEPS[sampler], num_timesteps if sampler != "dpmpp" else max(num_timesteps - 1, 1))


def check_sampler(sampler: str, steps: int | None, eta: float = 0.0, num_timesteps: int = NUM_TIMESTEPS,
                  option: str = "--steps") -> None:
    """A sampler setting as one-line errors, before any work: steps in 1..T (1..T-1 for dpmpp, see
    dpmpp_timesteps; None: the sampler's default) and eta only where it is defined (not for the ODE solver)."""
    if sampler not in DEFAULT_STEPS:
        raise ValueError(f"unknown sampler {sampler!r} (choose from {', '.join(DEFAULT_STEPS)})")
    limit = max(num_timesteps - 1, 1) if sampler == "dpmpp" else num_timesteps
    if steps is not None and not 1 <= steps <= limit:
        raise ValueError(f"{option} must be in 1..{limit}" + (" for --sampler dpmpp" if sampler == "dpmpp" else
                                                            " (the schedule's length)") + f", got {steps}")
    if sampler == "dpmpp" and eta:
        raise ValueError(f"--eta {eta:g} is not defined for --sampler dpmpp (an ODE solver, deterministic)")
    if not 0 <= eta <= 1:
        raise ValueError(f"--eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like noise), got {eta:g}")


def _trajectory(record: list) -> dict:
    """[(t, x_t, x0), ...] in the chain's order -> {"t": [...], "x": (K, B, C, H, W), "x0": (K, B, C, H, W)}."""
    if not record:
        raise ValueError("keep: none of these timesteps is on the sampler's chain (see ddim_timesteps)")
    ts, xs, x0s = zip(*record)
    return {"t": list(ts), "x": torch.stack(xs), "x0": torch.stack(x0s)}
