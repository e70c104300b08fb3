"""The diffusion process of DDPM (Ho, Jain and Abbeel, NeurIPS 2020) and its samplers: DDPM's
ancestral sampler (Alg. 2), DDIM (Song, Meng and Ermon, ICLR 2021) and DPM-Solver++(2M) (Lu et al. 2022).
The network that predicts the noise lives in ddpm.py; this file is only the arithmetic around it.
Read top to bottom:
  1. the noise schedule (linear, or the cosine of Nichol & Dhariwal 2021),
  2. the diffusion process: forward q (Eq. 4), posterior (Eq. 6-7), reverse p
     (Eq. 11, Alg. 2), one DDIM step (Song et al. Eq. 12, 16), one DPM-Solver++
     step (Lu et al. Prop. 4.1, Alg. 2) and the loops.
Checked against diffusers 0.42 in tests/test_ddpm.py (DDPMScheduler, DDIMScheduler,
DPMSolverMultistepScheduler give the same numbers); nothing here imports diffusers.

Timestep convention: code t = 0 .. T-1 is the paper's t = 1 .. T. So betas[0] is
the paper's beta_1, x_0 in code names the data only as "x0", and the last
reverse step is taken at code t = 0, where no noise is added.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import CLIError

# --------------------------------------------------------------------------- 1. the noise schedule

NUM_TIMESTEPS = 1000  # T of the released model
BETA_SCHEDULES = ("linear", "cosine")
VARIANCE_TYPES = ("fixed_large", "fixed_small")
DEFAULT_STEPS = {"ddpm": NUM_TIMESTEPS, "ddim": 50, "dpmpp": 20}  # network calls per image, by sampler


def make_betas(schedule: str, T: int) -> torch.Tensor:
    """beta_t for t = 0..T-1 in float64.
    linear: 1e-4 .. 0.02 (Ho et al. Sec. 4). cosine: Nichol & Dhariwal Eq. 17, alpha-bar = f(t) / f(0) with
    f(t) = cos^2(((t/T + s) / (1 + s)) pi/2), s = 0.008 (paper t), as beta = 1 - f(t) / f(t-1) capped at
    0.999 (their Sec. 3.2); the cap bites only at t = T, where f(T) = 0 would make beta 1."""
    if schedule == "linear":
        return torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    if schedule == "cosine":
        s = 0.008
        f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {schedule!r} (linear or cosine)")


def extract(a: torch.Tensor, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """a[t] for a batch of timesteps t (B,), shaped (B, 1, 1, 1) to broadcast against x."""
    return a.gather(0, t).reshape(t.shape[0], *([1] * (len(shape) - 1)))


# --------------------------------------------------------------------------- 2. the diffusion process


class GaussianDiffusion(nn.Module):
    """The forward process q(x_t | x_0), its posterior, and the learned reverse
    process p(x_{t-1} | x_t) of DDPM, plus the DDIM and DPM-Solver++ samplers. The model predicts
    the noise eps that was added (Ho et al. Eq. 11)."""

    def __init__(self, num_timesteps: int = NUM_TIMESTEPS, beta_schedule: str = "linear",
                 variance_type: str = "fixed_large", clip_sample: bool = True):
        super().__init__()
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"unknown variance_type {variance_type!r} (fixed_large or fixed_small)")
        self.num_timesteps, self.beta_schedule = num_timesteps, beta_schedule
        self.variance_type, self.clip_sample = variance_type, clip_sample

        betas = make_betas(beta_schedule, num_timesteps)  # computed in float64, stored as float32
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
        return dict(num_timesteps=self.num_timesteps, beta_schedule=self.beta_schedule,
                    variance_type=self.variance_type, clip_sample=self.clip_sample)

    # ---- forward process and its posterior

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps  (DDPM Eq. 4, reparameterised)."""
        return (extract(self.sqrt_alphas_cumprod, t, x0.shape) * x0
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise)

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The mean mu~_t = coef1 x_0 + coef2 x_t of q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I)
        (DDPM Eq. 6-7); its variance beta~_t is the buffer posterior_variance."""
        return extract(self.posterior_mean_coef1, t, x_t.shape) * x0 + extract(self.posterior_mean_coef2, t, x_t.shape) * x_t

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - alpha-bar_t) eps) / sqrt(alpha-bar_t), Eq. 4 solved for x_0."""
        return extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps

    def predict_noise_from_start(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """eps = (x_t - sqrt(alpha-bar_t) x_0) / sqrt(1 - alpha-bar_t), Eq. 4 solved for eps."""
        return (x_t - extract(self.sqrt_alphas_cumprod, t, x_t.shape) * x0) / extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape)

    def model_predictions(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor):
        """(eps, x_0): the x_0 the network's noise implies, clipped to [-1, 1] as the released sampler does,
        and the noise that this x_0 implies in turn, so x_t = sqrt(a) x_0 + sqrt(1 - a) eps still holds.
        DDPM's posterior mean reads x_0 only; DDIM's step reads both."""
        eps = model(x_t, t).float()
        x0 = self.predict_start_from_noise(x_t, t, eps)
        if not self.clip_sample:
            return eps, x0
        x0 = x0.clamp(-1.0, 1.0)
        # Patch: diffusers' DDIMScheduler keeps the network's eps beside the clipped x_0 by default
        # (use_clipped_model_output=False). Then every step that clips jumps by sqrt(a_t) (clip(x_0) - x_0),
        # however small the step, and DDIM gets worse with more steps on a model whose early x_0 leaves
        # [-1, 1] (README, "Sampler quality"). Re-deriving eps is its use_clipped_model_output=True.
        return self.predict_noise_from_start(x_t, t, x0), x0

    # ---- reverse process (DDPM)

    def p_mean_variance(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor):
        """Mean and variance of p(x_{t-1} | x_t) (DDPM Eq. 11): the posterior mean at the
        predicted x_0, which is the same as (x_t - beta_t / sqrt(1 - alpha-bar_t) eps) / sqrt(alpha_t)
        unless x_0 is clipped. Returns (mean, variance, predicted x_0)."""
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
        """The "leading" spacing of diffusers' DDIMScheduler: T // steps apart, starting at 0.
        For 50 of 1000 steps: 980, 960, ..., 20, 0."""
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"steps must be in 1..{self.num_timesteps}, got {steps}")
        ratio = self.num_timesteps // steps
        return [i * ratio for i in range(steps)][::-1]

    def ddim_step(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
                  eta: float = 0.0, noise: torch.Tensor | None = None, return_x0: bool = False):
        """One DDIM update x_t -> x_{t_prev} (Song et al. Eq. 12), with a = alpha-bar:
            x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z,
            sigma = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)  (Eq. 16),
        x0 and eps from model_predictions (eps re-derived from the clipped x0: diffusers' step with
        use_clipped_model_output=True). eta = 0 is deterministic, and then the same step as DPM-Solver++'s
        first order; eta = 1 is ancestral sampling on the strided chain; z is `noise` (None: no noise term).
        t_prev = -1 ends the chain with a_prev = 1, so the last step returns x0 (diffusers' set_alpha_to_one)."""
        eps, x0 = self.model_predictions(model, x_t, t)
        a_t = extract(self.alphas_cumprod, t, x_t.shape)
        a_prev = extract(self.alphas_cumprod_prev, t_prev + 1, x_t.shape)  # alpha-bar_{t_prev}; 1 at t_prev = -1
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
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
        """diffusers' "linspace" spacing, DPMSolverMultistepScheduler's default: round(i (T - 1) / steps) for
        i = steps .. 1, ties to even as numpy rounds. For 20 of 1000: 999, 949, 899, ..., 100, 50.
        At most T - 1 steps: with T, i = 500 and 501 would both round to 500."""
        if not 1 <= steps < self.num_timesteps:
            raise ValueError(f"steps must be in 1..{self.num_timesteps - 1}, got {steps}")
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
        lam = lambda a: 0.5 * (a / (1 - a)).log()  # noqa: E731  lambda from a = alpha-bar; +inf at a = 1
        _, x0 = self.model_predictions(model, x_t, t)
        a_t = extract(self.alphas_cumprod, t, x_t.shape)
        a_prev = extract(self.alphas_cumprod_prev, t_prev + 1, x_t.shape)  # alpha-bar_{t_prev}; 1 at t_prev = -1
        h, d = lam(a_prev) - lam(a_t), x0
        if x0_last is not None:
            half_inv_r = h / (2 * (lam(a_t) - lam(extract(self.alphas_cumprod, t_last, x_t.shape))))  # 1 / (2r)
            d = (1 + half_inv_r) * x0 - half_inv_r * x0_last
        x_prev = ((1 - a_prev) / (1 - a_t)).sqrt() * x_t - a_prev.sqrt() * torch.expm1(-h) * d
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
        if sampler == "ddpm" and steps in (None, self.num_timesteps):
            out = self.p_sample_loop(model, shape, x_T, generator, progress, keep)
        elif sampler in ("ddpm", "ddim"):
            eta = 1.0 if sampler == "ddpm" else eta
            out = self.ddim_sample(model, shape, steps or DEFAULT_STEPS["ddim"], eta, x_T, generator, progress, keep)
        elif sampler == "dpmpp" and not eta:
            out = self.dpmpp_sample(model, shape, steps or DEFAULT_STEPS["dpmpp"], x_T, generator, progress, keep)
        else:
            raise ValueError(f"sampler {sampler!r} with eta {eta:g}: expected ddpm, ddim (any eta) or dpmpp (eta 0)")
        return out.clamp(-1.0, 1.0) if keep is None else (out[0].clamp(-1.0, 1.0), out[1])

    # ---- the objective

    def training_loss(self, model: nn.Module, x0: torch.Tensor) -> torch.Tensor:
        """DDPM Alg. 1: t ~ Uniform{0..T-1}, eps ~ N(0, I), loss = || eps - eps_theta(x_t, t) ||^2."""
        t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        return F.mse_loss(model(self.q_sample(x0, t, noise), t).float(), noise)


def check_sampler(sampler: str, steps: int | None, eta: float = 0.0, num_timesteps: int = NUM_TIMESTEPS,
                  option: str = "--steps") -> None:
    """A sampler setting as one-line errors, before any work: steps in 1..T (1..T-1 for dpmpp, see
    dpmpp_timesteps; None: the sampler's default) and eta only where it is defined (not for the ODE solver)."""
    if sampler not in DEFAULT_STEPS:
        raise CLIError(f"unknown sampler {sampler!r} (choose from {', '.join(DEFAULT_STEPS)})")
    limit = num_timesteps - (sampler == "dpmpp")
    if steps is not None and not 1 <= steps <= limit:
        raise CLIError(f"{option} must be in 1..{limit}" + (" for --sampler dpmpp" if sampler == "dpmpp" else
                                                            " (the schedule's length)") + f", got {steps}")
    if sampler == "dpmpp" and eta:
        raise CLIError(f"--eta {eta:g} is not defined for --sampler dpmpp (an ODE solver, deterministic)")


def _trajectory(record: list) -> dict:
    """[(t, x_t, x0), ...] in the chain's order -> {"t": [...], "x": (K, B, C, H, W), "x0": (K, B, C, H, W)}."""
    if not record:
        raise ValueError("keep: none of these timesteps is on the sampler's chain (see ddim_timesteps)")
    ts, xs, x0s = zip(*record)
    return {"t": list(ts), "x": torch.stack(xs), "x0": torch.stack(x0s)}
