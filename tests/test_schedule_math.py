"""The schedule math of diffusion.py checked without diffusers: the betas and alpha-bars of every
beta_schedule, zero terminal SNR, q_sample, v, the posterior, one DDPM step, one DDIM step, DPM-Solver++(2M)
and the timestep spacings, against closed forms and numbers recorded once from diffusers 0.42.1 (the live
comparison, over many more cases, is tests/test_schedules.py). This lane runs with the card's packages only.

Inputs are a (1, 1, 2, 2) tensor of binary fractions, exact in float32 and float64. Timesteps are code
t = 0..T-1 (diffusers' numbering too); T = 1000.

Tolerances: our buffers are float32, each rounded once from float64, with a few float32 operations per step,
so RTOL = 1e-6; ATOL = 1e-12 only absorbs exact zeros (and diffusers' 1e-20 floor on beta~_0). The records
carry 8 significant digits. Three places need more, each said where it is used: diffusers' float32 alpha-bar
at the cosine cap, our float32 1 - alpha-bar_prev when DDIM lands on t = 0, and the eps <-> x_0 conversions,
which divide float32 rounding by sqrt(alpha-bar) or sqrt(1 - alpha-bar).
"""

# How the constants below were recorded (diffusers 0.42.1, torch 2.14.1, CPU; `python -W ignore snippet.py`
# prints every constant block below, as it stands). SCHEDULES are DDPMScheduler's own float32 buffers. Every
# other oracle runs diffusers' code in float64: rescale_zero_terminal_snr on float64 betas, the schedulers
# through f64 (their own code on their linear alpha-bar recomputed in float64, as tests/test_schedules.py's
# in_float64 does). Stock diffusers forms 1 - alpha-bar from float32 alpha-bars at run time, and near t = 0
# that is diffusers' rounding, not its math: stock float32 against ours, the DDPM step at t = 1 differs by
# 5e-5, the posterior coefficients at t = 1 and 10 by 1e-4 and 2.3e-4 relative, DDPMScheduler's rescaled betas
# near t = 0 by up to 4e-3 relative. DDPMScheduler.step draws its noise with randn_tensor, replaced here by the
# fixed Z (or by zeros, to read the posterior mean).
#
# import torch, diffusers
# import diffusers.schedulers.scheduling_ddpm as ddpm_module
# from diffusers import DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler
# from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr
#
# T = lambda *v: torch.tensor(v, dtype=torch.float64).reshape(1, 1, 2, 2)  # noqa: E731
# X0, EPS, X_T = T(0.5, -0.25, 0.875, -1.0), T(1.0, -0.5, 0.25, 2.0), T(1.5, -0.75, 0.3125, -2.0)
# OUT, OUT2, Z = T(0.75, -1.5, 0.125, 1.25), T(-0.5, 1.0, 0.625, -0.875), T(0.25, -1.25, 1.75, 0.5)
# IDX = [0, 1, 499, 998, 999]
# r8 = lambda x: [float("%.8g" % v) for v in torch.as_tensor(x).double().flatten().tolist()]  # noqa: E731
# AC64 = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)  # its linear alpha-bar, float64
#
# def f64(s):  # the scheduler's own step code, run in float64 on AC64
#     s.alphas_cumprod, s.one = AC64.clone(), torch.tensor(1.0, dtype=torch.float64)
#     s.final_alpha_cumprod = s.one
#     return s
#
# def show(name, d):
#     print(f"{name} = {{", *[f"    {k!r}: {v!r}," for k, v in d.items()], "}", sep="\n")
#
# print("# diffusers", diffusers.__version__, "torch", torch.__version__)
# show("SCHEDULES", {ours: (r8(s.betas[IDX]), r8(s.alphas_cumprod[IDX])) for ours, s in [
#     ("linear", DDPMScheduler()), ("scaled_linear", DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
#     ("cosine", DDPMScheduler(beta_schedule="squaredcos_cap_v2")), ("sigmoid", DDPMScheduler(beta_schedule="sigmoid"))]})
# show("ZERO_SNR", {name: (r8(b[IDX]), r8(torch.cumprod(1 - b, 0)[IDX])) for name, b in [
#     ("linear", rescale_zero_terminal_snr(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))),
#     ("scaled_linear", rescale_zero_terminal_snr(torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2))]})
# s = f64(DDPMScheduler())
# show("Q_SAMPLE", {t: r8(s.add_noise(X0, EPS, torch.tensor([t]))) for t in (0, 499, 999)})
# show("VELOCITY", {t: r8(s.get_velocity(X0, EPS, torch.tensor([t]))) for t in (0, 499, 999)})
# ddpm_module.randn_tensor = lambda shape, **kw: torch.zeros(shape, dtype=torch.float64)  # no noise: the posterior mean
# s = f64(DDPMScheduler(prediction_type="sample", clip_sample=False))
# one_zero, zero_one = torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.tensor([[0.0, 1.0]], dtype=torch.float64)
# show("POSTERIOR", {t: r8([s._get_variance(t, variance_type="fixed_small"), *s.step(one_zero, t, zero_one).prev_sample[0]])
#                    for t in (0, 1, 499, 999)})  # (beta~_t, coef1, coef2): step(x0 = [1, 0], x_t = [0, 1]) = [coef1, coef2]
# ddpm_module.randn_tensor = lambda shape, **kw: Z.clone()
# show("DDPM_STEP", {(v, p, t): r8(f64(DDPMScheduler(variance_type=v, prediction_type=p)).step(OUT, t, X_T).prev_sample)
#                    for v in ("fixed_large", "fixed_small") for p in ("epsilon", "v_prediction") for t in (999, 500, 10, 1, 0)})
# ddim = {p: f64(DDIMScheduler(prediction_type=p)) for p in ("epsilon", "v_prediction")}
# [d.set_timesteps(10) for d in ddim.values()]  # leading: 900, 800, ..., 0, so prev = t - 100
# show("DDIM_STEP", {(p, t, eta): r8(ddim[p].step(OUT, t, X_T, eta=eta, use_clipped_model_output=True, variance_noise=Z).prev_sample)
#                    for p in ("epsilon", "v_prediction") for t in (900, 500, 100, 0) for eta in (0.0, 1.0)})
#
# def dpmpp():  # 10 steps, its sigmas recomputed in float64 from AC64 (set_timesteps stores them in float32)
#     s = f64(DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, thresholding=True, sample_max_value=1.0))
#     s.set_timesteps(10)
#     ac = s.alphas_cumprod[s.timesteps]
#     s.sigmas = torch.cat([((1 - ac) / ac).sqrt(), torch.zeros(1, dtype=torch.float64)])
#     return s
#
# s = dpmpp()
# x1 = s.step(OUT, s.timesteps[0], X_T).prev_sample  # first order, 999 -> 899
# x2 = s.step(OUT2, s.timesteps[1], x1).prev_sample  # second order, 899 -> 799
# s, x = dpmpp(), X_T
# for t in s.timesteps:
#     x = s.step(0.9 * x, t, x).prev_sample
# show("DPMPP", {"two_steps": (r8(x1), r8(x2)), "run_0.9x": r8(x)})
# spacing = {}
# for name, s, k in [*[(sp, DDIMScheduler(timestep_spacing=sp), 10) for sp in ("leading", "trailing", "linspace")],
#                    ("trailing T=7", DDIMScheduler(num_train_timesteps=7, timestep_spacing="trailing"), 6),
#                    ("dpmpp", DPMSolverMultistepScheduler(), 10)]:
#     s.set_timesteps(k)
#     spacing[name] = s.timesteps.tolist()
# show("SPACINGS", spacing)

import numpy as np
import pytest
import torch

import diffusion
from diffusion import GaussianDiffusion

# --------------------------------------------------------------------------- inputs and records

X0 = torch.tensor([0.5, -0.25, 0.875, -1.0]).reshape(1, 1, 2, 2)
EPS = torch.tensor([1.0, -0.5, 0.25, 2.0]).reshape(1, 1, 2, 2)
X_T = torch.tensor([1.5, -0.75, 0.3125, -2.0]).reshape(1, 1, 2, 2)
OUT = torch.tensor([0.75, -1.5, 0.125, 1.25]).reshape(1, 1, 2, 2)  # the network's output, whatever it predicts
OUT2 = torch.tensor([-0.5, 1.0, 0.625, -0.875]).reshape(1, 1, 2, 2)  # its output at DPM-Solver++'s second step
Z = torch.tensor([0.25, -1.25, 1.75, 0.5]).reshape(1, 1, 2, 2)  # the step noise
IDX = [0, 1, 499, 998, 999]
SCHEDULE_KW = {"linear": {}, "scaled_linear": dict(beta_start=0.00085, beta_end=0.012), "cosine": {}, "sigmoid": {}}
RTOL, ATOL = 1e-6, 1e-12

# schedule: (betas[IDX], alphas_cumprod[IDX]) of DDPMScheduler (cosine: "squaredcos_cap_v2"), float32
SCHEDULES = {
    "linear": ([9.9999997e-05, 0.00011991992, 0.01004004, 0.01998008, 0.02],
               [0.99989998, 0.99978006, 0.078587234, 4.1181942e-05, 4.0358304e-05]),
    "scaled_linear": ([0.00084999995, 0.00085469859, 0.0048037926, 0.011982375, 0.011999999],
                      [0.99914998, 0.99829602, 0.27766943, 0.0047166958, 0.0046600951]),
    "cosine": ([4.1284224e-05, 4.6141751e-05, 0.0031458861, 0.7499994, 0.99900001],
               [0.99995869, 0.99991256, 0.49384347, 2.4287663e-06, 2.428735e-09]),
    "sigmoid": ([0.0001492052, 0.00014979832, 0.010020121, 0.0199502, 0.019950796],
                [0.99985081, 0.99970102, 0.30193099, 4.0489624e-05, 3.9681821e-05]),
}
# schedule: (betas[IDX], alphas_cumprod[IDX]) after diffusers' rescale_zero_terminal_snr, float64
ZERO_SNR = {
    "linear": ([0.0001, 0.00012068664, 0.010271043, 0.75226723, 1.0],
               [0.9999, 0.99977933, 0.076028751, 4.2132625e-09, 0.0]),
    "scaled_linear": ([0.00085, 0.00091733359, 0.0055157787, 0.751137, 1.0],
                      [0.99915, 0.99823345, 0.24235917, 1.9678881e-07, 0.0]),
}
Q_SAMPLE = {  # t: add_noise(X0, EPS, t), linear schedule
    0: [0.509975, -0.2549875, 0.87745625, -0.97995],
    499: [1.1000696, -0.55003478, 0.48526801, 1.6394708],
    999: [1.0031562, -0.50157811, 0.25555367, 1.9936068],
}
VELOCITY = {  # t: get_velocity(X0, EPS, t) = sqrt(alpha-bar) EPS - sqrt(1 - alpha-bar) X0
    0: [0.99495, -0.497475, 0.2412375, 2.0099],
    499: [-0.19961707, 0.099808537, -0.76983112, 1.5205708],
    999: [-0.49363709, 0.24681855, -0.87339414, 1.0126855],
}
POSTERIOR = {  # t: (beta~_t, posterior_mean_coef1, posterior_mean_coef2); beta~_0 = 0, floored at 1e-20 by diffusers
    0: [1e-20, 1.0, 0.0],
    1: [5.4531877e-05, 0.5452915, 0.4547085],
    499: [0.010031355, 0.0030700711, 0.99410667],
    999: [0.019999984, 0.00012835149, 0.98994868],
}
DDPM_STEP = {  # (variance_type, prediction_type, t): DDPMScheduler.step(OUT, t, X_T) with noise Z, clip_sample on
    ("fixed_large", "epsilon", 999): [1.5204067, -0.91910985, 0.55697469, -1.909315],
    ("fixed_large", "epsilon", 500): [1.5192894, -0.8678944, 0.4882916, -1.9411171],
    ("fixed_large", "epsilon", 10): [1.4361853, -0.76214976, 0.34201849, -1.8550733],
    ("fixed_large", "epsilon", 1): [1.2300919, -0.7516027, 0.33067173, -1.4492331],
    ("fixed_large", "epsilon", 0): [1.0, -0.73503675, 0.31126556, -1.0],
    ("fixed_large", "v_prediction", 999): [1.5201833, -0.91910985, 0.55683055, -1.909315],
    ("fixed_large", "v_prediction", 500): [1.5153083, -0.8678944, 0.48608094, -1.9411171],
    ("fixed_large", "v_prediction", 10): [1.4361853, -0.76193585, 0.34192585, -1.8550733],
    ("fixed_large", "v_prediction", 1): [1.2300919, -0.75151409, 0.33063437, -1.4492331],
    ("fixed_large", "v_prediction", 0): [1.0, -0.7349625, 0.31123437, -1.0],
    ("fixed_small", "epsilon", 999): [1.5204067, -0.91910978, 0.55697458, -1.9093151],
    ("fixed_small", "epsilon", 500): [1.5192787, -0.86784064, 0.48821634, -1.9411386],
    ("fixed_small", "epsilon", 10): [1.4358802, -0.76062405, 0.33988249, -1.8556836],
    ("fixed_small", "epsilon", 1): [1.2292004, -0.74714492, 0.32443084, -1.4510162],
    ("fixed_small", "epsilon", 0): [1.0, -0.73503675, 0.31126556, -1.0],
    ("fixed_small", "v_prediction", 999): [1.5201833, -0.91910978, 0.55683044, -1.9093151],
    ("fixed_small", "v_prediction", 500): [1.5152975, -0.86784064, 0.48600568, -1.9411386],
    ("fixed_small", "v_prediction", 10): [1.4358802, -0.76041013, 0.33978985, -1.8556836],
    ("fixed_small", "v_prediction", 1): [1.2292004, -0.74705631, 0.32439347, -1.4510162],
    ("fixed_small", "v_prediction", 0): [1.0, -0.7349625, 0.31123437, -1.0],
}
DDIM_STEP = {  # (prediction_type, t, eta): DDIMScheduler.step(OUT, t, X_T, eta, variance_noise=Z), t -> t - 100
    ("epsilon", 900, 0.0): [1.5214694, -0.72713788, 0.33470443, -2.0211599],
    ("epsilon", 900, 1.0): [0.89252916, -1.4170088, 1.7484446, -0.42492721],
    ("epsilon", 500, 0.0): [1.5818296, -0.52220063, 0.4158385, -2.0493918],
    ("epsilon", 500, 1.0): [1.2976946, -1.0344278, 1.6357264, -1.0324813],
    ("epsilon", 100, 0.0): [1.0170547, -0.29430842, 0.2887498, -1.0324954],
    ("epsilon", 100, 1.0): [1.0029487, -0.29224137, 0.30502885, -0.99590308],
    ("epsilon", 0, 0.0): [1.0, -0.73503675, 0.31126556, -1.0],
    ("epsilon", 0, 1.0): [1.0, -0.73503675, 0.31126556, -1.0],
    ("v_prediction", 900, 0.0): [1.4828277, -0.72713788, 0.30962227, -2.0211599],
    ("v_prediction", 900, 1.0): [0.83753684, -1.4170088, 1.7127493, -0.42492721],
    ("v_prediction", 500, 0.0): [1.3486117, -0.52220063, 0.28633681, -2.0493918],
    ("v_prediction", 500, 1.0): [0.92621862, -1.0344278, 1.4294525, -1.0324813],
    ("v_prediction", 100, 0.0): [1.0170547, -0.24047093, 0.25736677, -1.0324954],
    ("v_prediction", 100, 1.0): [1.0029487, -0.2368308, 0.27272884, -0.99590308],
    ("v_prediction", 0, 0.0): [1.0, -0.7349625, 0.31123437, -1.0],
    ("v_prediction", 0, 1.0): [1.0, -0.7349625, 0.31123437, -1.0],
}
DPMPP = {  # DPMSolverMultistepScheduler, dpmsolver++ order 2, clipped x_0 (thresholding at 1.0), 10 steps
    "two_steps": ([1.5100611, -0.73967465, 0.32270057, -2.0100024],  # OUT at 999 -> 899 (first order)
                  [1.5316744, -0.78196362, 0.27974349, -2.0313015]),  # then OUT2 at 899 -> 799 (second order)
    "run_0.9x": [1.0, -0.53849204, 0.24010131, -1.0],  # all 10 steps from X_T, network 0.9 x
}
SPACINGS = {  # set_timesteps: DDIMScheduler(timestep_spacing=...) with 10 steps, T = 7 with 6; DPM-Solver++ 10
    "leading": [900, 800, 700, 600, 500, 400, 300, 200, 100, 0],
    "trailing": [999, 899, 799, 699, 599, 499, 399, 299, 199, 99],
    "linspace": [999, 888, 777, 666, 555, 444, 333, 222, 111, 0],
    "trailing T=7": [6, 5, 4, 2, 1, 0],
    "dpmpp": [999, 899, 799, 699, 599, 500, 400, 300, 200, 100],
}


def close(got, expected, rtol=RTOL, atol=ATOL):
    """|got - expected| <= atol + rtol |expected| elementwise, got a tensor (any dtype), expected a list."""
    np.testing.assert_allclose(torch.as_tensor(got).double().flatten().numpy(), np.asarray(expected, dtype=np.float64),
                               rtol=rtol, atol=atol)


def full(t: int) -> torch.Tensor:
    return torch.full((1,), t, dtype=torch.long)


def constant(out: torch.Tensor):
    """A network that answers `out` whatever x_t and t."""
    return lambda x, t: out


# --------------------------------------------------------------------------- the schedule


def test_linear_schedule_closed_forms():
    """Ho et al. Sec. 4: beta = linspace(1e-4, 0.02, 1000), alpha-bar = cumprod(1 - beta); each buffer is the float64
    value rounded once to float32 (2^-24 relative), computed here with numpy."""
    d = GaussianDiffusion()
    betas = np.linspace(1e-4, 0.02, 1000)
    alphas_cumprod = np.cumprod(1 - betas)
    close(d.betas, betas, rtol=2 ** -24, atol=0)
    close(d.alphas_cumprod, alphas_cumprod, rtol=2 ** -24, atol=0)
    close(d.alphas_cumprod_prev, np.concatenate([[1.0], alphas_cumprod[:-1]]), rtol=2 ** -24, atol=0)
    close(d.posterior_variance, betas * np.concatenate([[0.0], 1 - alphas_cumprod[:-1]]) / (1 - alphas_cumprod),
          rtol=2 ** -23, atol=0)
    assert d.betas[0].item() == np.float32(1e-4) and d.betas[-1].item() == np.float32(0.02)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_betas_and_alphas_cumprod_match_the_recorded_ddpm_scheduler(schedule):
    d = GaussianDiffusion(beta_schedule=schedule, **SCHEDULE_KW[schedule])
    betas, alphas_cumprod = SCHEDULES[schedule]
    close(d.betas[IDX], betas)
    close(d.alphas_cumprod[IDX[:-1]], alphas_cumprod[:-1])
    if schedule != "cosine":
        close(d.alphas_cumprod[-1], alphas_cumprod[-1])
    else:  # diffusers stores the capped beta_T as float32(0.999) = 0.99900001 and forms 1 - beta_T in float32, so its
        # alpha-bar_T is 1.3e-5 relative below alpha-bar_{T-1} (1 - 0.999); ours computes that product in float64
        close(d.alphas_cumprod[-1], alphas_cumprod[-1], rtol=2e-5)
        close(d.alphas_cumprod[-1], d.alphas_cumprod[-2].item() * (1 - 0.999))


@pytest.mark.parametrize("schedule", list(ZERO_SNR))
def test_zero_terminal_snr_matches_the_recorded_rescale(schedule):
    """Lin et al. Alg. 1: diffusion.rescale_zero_terminal_snr in float64 against diffusers' function in float64
    (8 recorded digits: rtol 1e-7), and the float32 buffers GaussianDiffusion builds from it (RTOL)."""
    betas, alphas_cumprod = ZERO_SNR[schedule]
    rescaled = diffusion.rescale_zero_terminal_snr(diffusion.make_betas(schedule, 1000, **SCHEDULE_KW[schedule]))
    close(rescaled[IDX], betas, rtol=1e-7)
    close(torch.cumprod(1 - rescaled, 0)[IDX], alphas_cumprod, rtol=1e-7)
    d = GaussianDiffusion(beta_schedule=schedule, **SCHEDULE_KW[schedule], rescale_betas_zero_snr=True,
                          prediction_type="v_prediction", timestep_spacing="trailing")
    close(d.betas[IDX], betas)
    close(d.alphas_cumprod[IDX], alphas_cumprod)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_zero_terminal_snr_ends_at_zero(schedule):
    """alpha-bar, beta and SNR at t = T - 1 are exactly 0, 1 and 0; alpha-bar at t = 0 as before the rescaling."""
    plain = GaussianDiffusion(beta_schedule=schedule, **SCHEDULE_KW[schedule])
    d = GaussianDiffusion(beta_schedule=schedule, **SCHEDULE_KW[schedule], rescale_betas_zero_snr=True,
                          prediction_type="v_prediction", timestep_spacing="trailing")
    assert d.alphas_cumprod[-1].item() == 0.0 and d.betas[-1].item() == 1.0 and d.snr[-1].item() == 0.0
    close(d.alphas_cumprod[0], plain.alphas_cumprod[0].item())
    assert (d.alphas_cumprod[:-1] > 0).all() and (d.alphas_cumprod[1:] < d.alphas_cumprod[:-1]).all()


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timestep_spacings_match_the_recorded_set_timesteps(spacing):
    assert GaussianDiffusion(timestep_spacing=spacing).ddim_timesteps(10) == SPACINGS[spacing]


def test_trailing_tie_and_dpmpp_timesteps_match_the_recorded_set_timesteps():
    """T = 7, k = 6 trailing: numpy's 7 - 3 * 7/6 = 3.4999999999999996 rounds to 3, where 3.5 would round to 4."""
    assert GaussianDiffusion(7, timestep_spacing="trailing").ddim_timesteps(6) == SPACINGS["trailing T=7"]
    assert GaussianDiffusion().dpmpp_timesteps(10) == SPACINGS["dpmpp"]


# --------------------------------------------------------------------------- the forward process and its posterior


@pytest.mark.parametrize("t", [0, 499, 999])
def test_q_sample_closed_forms_and_recorded_add_noise(t):
    """DDPM Eq. 4: with noise 0, x_t = sqrt(alpha-bar_t) x_0; with x_0 = 0, x_t = sqrt(1 - alpha-bar_t) eps."""
    d = GaussianDiffusion()
    a = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t]
    close(d.q_sample(X0, full(t), torch.zeros_like(X0)), np.sqrt(a) * X0.double().flatten().numpy())
    close(d.q_sample(torch.zeros_like(X0), full(t), EPS), np.sqrt(1 - a) * EPS.double().flatten().numpy())
    close(d.q_sample(X0, full(t), EPS), Q_SAMPLE[t])


@pytest.mark.parametrize("t", [0, 499, 999])
def test_v_eps_and_x0_conversions(t):
    """The network's v (diffusers' get_velocity), eps or x_0 turned back into (eps, x_0) by model_predictions
    (no clipping). From v there is no division: RTOL. From eps, x_0 = (x_t - sqrt(1 - a) eps) / sqrt(a); from x_0,
    eps = (x_t - sqrt(a) x_0) / sqrt(1 - a): the float32 rounding of x_t and of the two terms (2^-24 relative, on
    values up to 2) is divided by sqrt(a) (0.0064 at t = 999) or sqrt(1 - a) (0.01 at t = 0), hence atol
    2^-21 / sqrt(a) or 2^-21 / sqrt(1 - a), a = alpha-bar_t (measured: 1.5e-5 at t = 999, under 7.5e-5)."""
    x_t = GaussianDiffusion().q_sample(X0, full(t), EPS)
    a = float(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t])
    v = torch.tensor(VELOCITY[t]).reshape(X0.shape)
    for prediction, out, atol in (("v_prediction", v, ATOL), ("epsilon", EPS, 2 ** -21 / a ** 0.5),
                                  ("sample", X0, 2 ** -21 / (1 - a) ** 0.5)):
        d = GaussianDiffusion(prediction_type=prediction, clip_sample=False)
        eps, x0 = d.model_predictions(constant(out), x_t, full(t))
        close(x0, X0.flatten().tolist(), atol=atol)
        close(eps, EPS.flatten().tolist(), atol=atol)


@pytest.mark.parametrize("t", list(POSTERIOR))
def test_posterior_matches_the_recorded_ddpm_scheduler(t):
    """beta~_t (fixed_small's variance) and the posterior mean coefficients of DDPM Eq. 7."""
    d = GaussianDiffusion()
    close([d.posterior_variance[t], d.posterior_mean_coef1[t], d.posterior_mean_coef2[t]], POSTERIOR[t])


def test_posterior_mean_of_a_noiseless_x_t_is_the_noiseless_x_prev():
    """Closed form, every t: with x_t = sqrt(alpha-bar_t) x_0, the posterior mean (Eq. 7) is sqrt(alpha-bar_{t-1}) x_0."""
    d = GaussianDiffusion()
    t = torch.arange(1000)
    x0 = X0.expand(1000, 1, 2, 2)
    mean = d.q_posterior(x0, d.q_sample(x0, t, torch.zeros_like(x0)), t)
    close(mean, (d.alphas_cumprod_prev.double().sqrt().reshape(-1, 1, 1, 1) * x0.double()).flatten().tolist())


# --------------------------------------------------------------------------- one step of each sampler


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddpm_step_matches_the_recorded_ddpm_scheduler(variance, prediction):
    """p_sample (DDPM Alg. 2, line 4) with clip_sample on, noise Z; at t = 0 no noise is added at all."""
    d = GaussianDiffusion(variance_type=variance, prediction_type=prediction, clip_sample=True)
    for t in (999, 500, 10, 1, 0):
        close(d.p_sample(constant(OUT), X_T, full(t), Z), DDPM_STEP[variance, prediction, t])
    assert torch.equal(d.p_sample(constant(OUT), X_T, full(0), Z), d.p_sample(constant(OUT), X_T, full(0), 0 * Z))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddim_step_matches_the_recorded_ddim_scheduler(prediction):
    """ddim_step (Song et al. Eq. 12) with eta 0 and 1, noise Z, t -> t - 100 (t_prev = -1: alpha-bar_prev = 1).
    Landing on t_prev = 0, ours forms 1 - alpha-bar_0 = 1e-4 in float32 from alpha-bar_0 = 0.9999, whose float32
    spacing 6e-8 is 6e-4 relative of it: measured 6e-6 relative on the output, hence 2e-5 there."""
    d = GaussianDiffusion(prediction_type=prediction, clip_sample=True)
    for t in (900, 500, 100, 0):
        for eta in (0.0, 1.0):
            got = d.ddim_step(constant(OUT), X_T, full(t), full(max(t - 100, -1)), eta, Z)
            close(got, DDIM_STEP[prediction, t, eta], rtol=2e-5 if t == 100 else RTOL)


def test_dpmpp_two_steps_and_a_short_run_match_the_recorded_dpm_solver():
    """dpmpp_step: first order 999 -> 899 (the same step as DDIM with eta 0), then second order 899 -> 799 with the
    first step's x_0 buffered (Lu et al. Alg. 2); then the whole 10-step sampler against diffusers' loop."""
    d = GaussianDiffusion()
    x1, x0 = d.dpmpp_step(constant(OUT), X_T, full(999), full(899))
    close(x1, DPMPP["two_steps"][0])
    close(x1, d.ddim_step(constant(OUT), X_T, full(999), full(899)).flatten().tolist())
    x2, _ = d.dpmpp_step(constant(OUT2), x1, full(899), full(799), x0, full(999))
    close(x2, DPMPP["two_steps"][1])
    assert SPACINGS["dpmpp"][:3] == [999, 899, 799]
    close(d.sample(lambda x, t: 0.9 * x, X_T.shape, "dpmpp", 10, x_T=X_T, progress=False), DPMPP["run_0.9x"])
