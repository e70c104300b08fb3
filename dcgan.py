"""DCGAN: the baseline generator, a clean version of the original experiment's.

Radford, Metz and Chintala, "Unsupervised Representation Learning with Deep
Convolutional Generative Adversarial Networks", ICLR 2016. The architecture
rules of the paper (section 3) are all here: strided convolutions instead of
pooling, transposed convolutions to upsample, BatchNorm in both networks except
the generator's output and the discriminator's input layer, ReLU in the
generator with Tanh at the output, LeakyReLU(0.2) in the discriminator, weights
drawn from N(0, 0.02), Adam with beta1 = 0.5.

The default network is the original experiment's 256x256 one (README, "DCGAN
baseline"), layer for layer; B is the batch, C the image channels:

    Generator                                      Discriminator
    (B, 100, 1, 1)    -> (B, 1024, 4, 4)   4x4 s1  (B, C, 256, 256)   -> (B, 64, 128, 128)
    (B, 1024, 4, 4)   -> (B, 512, 8, 8)    4x4 s2  (B, 64, 128, 128)  -> (B, 128, 64, 64)
    (B, 512, 8, 8)    -> (B, 256, 16, 16)  4x4 s2  (B, 128, 64, 64)   -> (B, 256, 32, 32)
    (B, 256, 16, 16)  -> (B, 128, 32, 32)  4x4 s2  (B, 256, 32, 32)   -> (B, 512, 16, 16)
    (B, 128, 32, 32)  -> (B, 64, 64, 64)   4x4 s2  (B, 512, 16, 16)   -> (B, 1024, 8, 8)
    (B, 64, 64, 64)   -> (B, 32, 128, 128) 4x4 s2  (B, 1024, 8, 8)    -> (B, 1, 1, 1)  8x8 conv
    (B, 32, 128, 128) -> (B, C, 256, 256)  4x4 s2, Tanh

Every 4x4 stride-2 layer halves (D) or doubles (G) the side, so the original's D
takes five halvings from 256 to 8 and then one 8x8 convolution, with no
padding, over what is left. Other sizes (powers of two, 32..256) add or remove
stride-2 stages at the image end: channel widths are counted from the image
(G's last hidden layer has `g_width` channels, D's first has `d_width`, doubling
per stage away from the image, as in Radford et al.'s own code), so a 64 px
net is G 256-128-64-32 and D 64-128-256, and D always ends at 8x8.

What differs from the original experiment (README, "DCGAN baseline", says why):
one grey channel by default, a logit and BCE-with-logits instead of sigmoid + BCE,
a checkpoint per epoch, and a warning when D wins outright, G ends collapsed or a loss explodes.

Two training presets (`--preset`, PRESETS below). `original` keeps that
experiment's imbalance: two G updates per D update, D at half G's learning
rate. `modern` (the default) trains the same G the way small-data GANs are
trained today: one D update per G update at equal learning rates; DiffAugment
(diffaugment.py, Zhao et al. 2020) on real and fake images before D in both
steps; and a discriminator without BatchNorm whose convolutions are spectrally
normalised (Miyato et al. 2018). `modern-r1` puts an R1 penalty (Mescheder et
al. 2018) in place of spectral normalisation. README, "DCGAN baseline", gives
the measured comparison, and why the default is spectral normalisation.

`python main.py gan --help` trains; `python main.py sample --checkpoint ...` samples.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data
import diffaugment
import monitor as quality  # --eval-every: held-out KID and 1-NN (CollapseMonitor below watches D and G)
from common import CLIError, autocast, flag, save_image_grid, train_loop, unwrap

SIZES = (32, 64, 128, 256)
LOSS_CEILING = 100.0  # a BCE above 100: the right answer got probability below e^-100, D or G is hopelessly wrong
INIT_STD = 0.02  # Radford et al. 2016, section 4: "initialized from a zero-centered Normal with std 0.02"
LEAK = 0.2  # slope of the discriminator's LeakyReLU (Radford et al. 2016, section 3)


# --------------------------------------------------------------------------- configuration


@dataclass
class DCGANConfig:
    """The two networks' shape; the defaults are the original experiment's 256x256 DCGAN, grey."""

    size: int = 256  # image side, a power of two from 32 to 256
    channels: int = 1  # 1 grey, 3 the original's RGB
    latent_dim: int = 100  # z ~ N(0, I) of this many dimensions
    g_width: int = 32  # channels of G's last hidden layer; doubles per stage toward z
    d_width: int = 64  # channels of D's first layer; doubles per stage toward the logit

    def __post_init__(self):
        if self.size not in SIZES:
            raise CLIError(f"--size {self.size}: must be a power of two from 32 to 256 ({', '.join(map(str, SIZES))})")
        if self.channels not in (1, 3):
            raise CLIError(f"--channels {self.channels}: must be 1 (grey) or 3 (RGB)")
        if min(self.latent_dim, self.g_width, self.d_width) < 1:
            raise CLIError("latent_dim, g_width and d_width must be at least 1")

    @property
    def g_widths(self) -> list[int]:
        """G's hidden widths from 4x4 up to size/2: 1024, 512, ..., 32 at 256 px."""
        n = int(math.log2(self.size)) - 2  # 4 * 2**(n-1) = size/2
        return [self.g_width * 2 ** i for i in reversed(range(n))]

    @property
    def d_widths(self) -> list[int]:
        """D's widths from size/2 down to 8x8: 64, 128, ..., 1024 at 256 px."""
        n = int(math.log2(self.size)) - 3  # size / 2**n = 8
        return [self.d_width * 2 ** i for i in range(n)]


@dataclass(frozen=True)
class Preset:
    """How D and G are trained: what `--preset` fixes (--lr-g, --lr-d and --g-steps may override it)."""

    g_steps: int  # generator updates per discriminator update
    lr_g: float  # Adam learning rates
    lr_d: float
    augment: str  # DiffAugment policy applied to real and fake images before D ('': none; diffaugment.py)
    spectral_norm: bool  # D: spectrally normalised convolutions and no BatchNorm (Miyato et al. 2018)
    r1_gamma: float  # weight gamma of the R1 penalty on real images (0: none; Mescheder et al. 2018)

    @property
    def batch_norm_in_d(self) -> bool:
        """The original D has BatchNorm; a regularised D has none: SN-GAN's discriminator has none, and a
        gradient penalty is a per-image quantity that batch statistics would mix (Gulrajani et al. 2017, 4)."""
        return not (self.spectral_norm or self.r1_gamma)


PRESETS = {
    # The original experiment: G twice per D step, at twice D's learning rate.
    "original": Preset(g_steps=2, lr_g=2e-4, lr_d=1e-4, augment="", spectral_norm=False, r1_gamma=0.0),
    # Balanced updates, DiffAugment's translation + cutout (the paper's policy for its small-data runs;
    # grey images have no colour to speak of) and spectral normalisation in D (README, "DCGAN baseline").
    "modern": Preset(g_steps=1, lr_g=2e-4, lr_d=2e-4, augment="translation,cutout", spectral_norm=True,
                     r1_gamma=0.0),
    # The same with an R1 penalty in place of spectral normalisation: as good on phantoms, less diverse, and
    # a double backward (README). gamma = 1: between StyleGAN2's 0.01 (CIFAR) and Mescheder et al.'s 10.
    "modern-r1": Preset(g_steps=1, lr_g=2e-4, lr_d=2e-4, augment="translation,cutout", spectral_norm=False,
                        r1_gamma=1.0),
}
LEGACY_PRESET = "original"  # a checkpoint written before presets existed has no "preset" key: it is this


@dataclass
class TrainConfig(common.RunConfig):
    """Everything `python main.py gan` sets: the run's options (common.RunConfig) and the GAN's below.
    The network's defaults are the original experiment's; its training is the `modern` preset's unless
    --preset original. size, channels, g_width and d_width None mean 256, 1, 32, 64, or the checkpoint's
    on resume; lr_g, lr_d and g_steps None mean the preset's."""

    size: int | None = flag(None, "image side, 32/64/128/256 (default 256; on --resume the checkpoint's)")
    channels: int | None = flag(None, "1 grey, 3 the original experiment's RGB (default 1)", choices=(1, 3))
    g_width: int | None = flag(None, "channels of G's last hidden layer (default 32)", min=1)
    d_width: int | None = flag(None, "channels of D's first layer (default 64)", min=1)
    preset: str = flag("modern", "modern: 1 D per G update at equal learning rates, DiffAugment, spectral norm in D; "
                       "modern-r1: the same with an R1 penalty instead of spectral norm; original: the original "
                       "experiment's 2 G updates per D, D at half G's learning rate (on --resume: the checkpoint's)",
                       choices=tuple(PRESETS))
    lr_g: float | None = flag(None, "generator Adam learning rate (default: the preset's, 2e-4)", above=0)
    lr_d: float | None = flag(None, "discriminator Adam learning rate (default: the preset's, 2e-4 modern, "
                              "1e-4 original)", above=0)
    g_steps: int | None = flag(None, "generator updates per discriminator update (default: the preset's, 1 modern, "
                               "2 original)", min=1)
    num_samples: int = flag(64, "fixed-noise samples in each epoch's grid", min=1)
    no_epoch_checkpoints: bool = flag(False, "keep only OUT/checkpoint.pt, not a copy per epoch "
                                             "(runs of many tiny epochs)")
    collapse_window: int = flag(200, "steps D must win for before a warning", min=1)
    betas: tuple[float, float] = (0.5, 0.999)  # Adam's; beta1 = 0.5: Radford et al. found 0.9 oscillates

    def __post_init__(self):
        super().__post_init__()
        if self.size is not None and self.size not in SIZES:
            raise CLIError(f"--size {self.size}: must be a power of two from 32 to 256 ({', '.join(map(str, SIZES))})")

    def settings(self) -> Preset:
        """The preset, with the learning rates and update ratio given as options in its place."""
        given = {k: getattr(self, k) for k in ("lr_g", "lr_d", "g_steps") if getattr(self, k) is not None}
        return replace(PRESETS[self.preset], **given)

    def network(self, saved: dict | None = None) -> DCGANConfig:
        """The networks' shape: the options given, else the checkpoint's (`saved`; one given
        otherwise is an error, see common.keep_saved), else the defaults."""
        if saved is None:
            return DCGANConfig(**{k: getattr(self, k) for k in ("size", "channels", "g_width", "d_width")
                                  if getattr(self, k) is not None})
        common.keep_saved(self, saved)
        return DCGANConfig(**saved)


# --------------------------------------------------------------------------- the networks


def init_weights(module: nn.Module) -> None:
    """DCGAN initialisation: conv weights N(0, 0.02), biases 0; BatchNorm scale N(1, 0.02), shift 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, INIT_STD)
        if module.bias is not None:  # only D without BatchNorm has biases
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, INIT_STD)
        nn.init.zeros_(module.bias)


def up(c_in: int, c_out: int) -> nn.Sequential:
    """(B, c_in, r, r) -> (B, c_out, 2r, 2r): 4x4 transposed conv, stride 2, BatchNorm, ReLU."""
    # No conv bias anywhere: the BatchNorm shift that follows makes it redundant.
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True))


def down(c_in: int, c_out: int, norm: bool = True, bias: bool = False) -> nn.Sequential:
    """(B, c_in, r, r) -> (B, c_out, r/2, r/2): 4x4 conv, stride 2, BatchNorm (if `norm`), LeakyReLU(0.2)."""
    layers = [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=bias)]
    if norm:
        layers.append(nn.BatchNorm2d(c_out))
    return nn.Sequential(*layers, nn.LeakyReLU(LEAK, True))


class Generator(nn.Module):
    """z (B, latent_dim, 1, 1) -> image (B, C, size, size) in [-1, 1]."""

    def __init__(self, cfg: DCGANConfig):
        super().__init__()
        w = cfg.g_widths
        # (B, latent, 1, 1) -> (B, w[0], 4, 4): a 4x4 transposed conv on a 1x1 input is a
        # fully connected layer whose output is reshaped to 4x4 (the paper's "project and reshape").
        self.project = nn.Sequential(nn.ConvTranspose2d(cfg.latent_dim, w[0], 4, 1, 0, bias=False),
                                     nn.BatchNorm2d(w[0]), nn.ReLU(True))
        # (B, w[i], r, r) -> (B, w[i+1], 2r, 2r), from 4x4 up to size/2; at 256 px:
        # 1024@4 -> 512@8 -> 256@16 -> 128@32 -> 64@64 -> 32@128
        self.body = nn.Sequential(*[up(a, b) for a, b in zip(w, w[1:])])
        # (B, w[-1], size/2, size/2) -> (B, C, size, size); no BatchNorm at the output (section 3)
        self.to_image = nn.Sequential(nn.ConvTranspose2d(w[-1], cfg.channels, 4, 2, 1, bias=False), nn.Tanh())
        self.apply(init_weights)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.to_image(self.body(self.project(z)))


class Discriminator(nn.Module):
    """image (B, C, size, size) -> one real/fake logit per image (B,).

    `preset` None or original: the DCGAN discriminator of the paper. A preset with
    spectral_norm: the same convolutions, no BatchNorm, each weight W used as
    W / sigma(W), its largest singular value estimated by one power iteration per
    forward pass (Miyato et al. 2018, Eq. 8 and Algorithm 1; torch's
    `spectral_norm` parametrisation), which bounds each layer's Lipschitz constant by 1.
    A preset with an R1 penalty: the same convolutions, no BatchNorm, no normalisation.
    Without BatchNorm the convolutions have biases (initialised to 0).
    """

    def __init__(self, cfg: DCGANConfig, preset: Preset | None = None):
        super().__init__()
        w, bn = cfg.d_widths, preset is None or preset.batch_norm_in_d
        # (B, C, size, size) -> (B, w[0], size/2, size/2); no BatchNorm on the input layer (section 3)
        # The original has no conv biases (its BatchNorm shifts make them redundant; the input layer's
        # omission is Radford et al.'s); a D without BatchNorm gets them back.
        self.from_image = down(cfg.channels, w[0], norm=False, bias=not bn)
        # (B, w[i], r, r) -> (B, w[i+1], r/2, r/2), down to 8x8; at 256 px:
        # 64@128 -> 128@64 -> 256@32 -> 512@16 -> 1024@8
        self.body = nn.Sequential(*[down(a, b, norm=bn, bias=not bn) for a, b in zip(w, w[1:])])
        # (B, w[-1], 8, 8) -> (B, 1, 1, 1): the original's 8x8 conv over the whole remaining extent.
        # Patch: the original put a sigmoid here; we return the logit and use BCE-with-logits.
        self.to_logit = nn.Conv2d(w[-1], 1, 8, 1, 0, bias=False)
        self.apply(init_weights)
        if preset is not None and preset.spectral_norm:  # after init_weights, which writes the raw weights
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.utils.parametrizations.spectral_norm(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_logit(self.body(self.from_image(x))).flatten()  # (B, 1, 1, 1) -> (B,)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def sample_noise(n: int, cfg: DCGANConfig, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """z ~ N(0, I), shaped (n, latent_dim, 1, 1) for the generator's first layer."""
    return torch.randn(n, cfg.latent_dim, 1, 1, generator=generator, device=device)


# --------------------------------------------------------------------------- sampling


@torch.no_grad()
def generate(ckpt: dict, n: int, *, seed: int = 0, batch_size: int = 64,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """n images (n, C, size, size) in [-1, 1] from a `gan` checkpoint, the same for the same seed.

    The generator runs in eval mode: BatchNorm uses the running statistics it
    gathered in training, so an image depends only on its own z, not on the
    batch it happens to share or on the batch size (in train mode each sample
    would shift with its neighbours, and a batch of one would be degenerate).
    The price: the running averages trail the weights by ~10 steps (momentum
    0.1), which only matters in the first steps of training.
    """
    common.require_keys(ckpt, ("config", "generator"), "this GAN checkpoint")
    bad = common.first_nonfinite(ckpt["generator"])
    if bad:
        raise CLIError(f"the checkpoint's weight generator.{bad} is non-finite (NaN or infinity); refusing to sample")
    try:
        cfg = DCGANConfig(**ckpt["config"])
        G = Generator(cfg)
        G.load_state_dict(ckpt["generator"])
    except (TypeError, RuntimeError, ValueError) as e:
        raise CLIError(f"malformed GAN checkpoint: {common.first_line(e)}") from e
    G.to(device).eval()
    # The noise is drawn on the CPU from its own generator, so the result does not
    # depend on the device, the batch size, or anything else using the global RNG.
    z = sample_noise(n, cfg, torch.Generator().manual_seed(seed))
    return torch.cat([G(zb.to(device)).float().cpu() for zb in z.split(batch_size)])


# --------------------------------------------------------------------------- collapse detection

DIVERSITY_FLOOR = 0.25  # samples' spread below 1/4 of the real images': collapsed (gate.py uses the same floor)


def mean_pairwise_distance(x: torch.Tensor) -> float:
    """Mean L2 distance between all pairs of a batch (N, ...), per pixel (RMS)."""
    flat = x.flatten(1).float()
    return (torch.pdist(flat) / math.sqrt(flat.shape[1])).mean().item()


class CollapseMonitor:
    """Watches the training metrics for the two failures the original run showed, and for divergence.

    1. The discriminator wins: loss_d < `loss_d_floor` on every one of the last
       `window` steps, or D(x) - D(G(z)) > `gap_ceiling` on all of them. G then
       receives vanishing gradients and rarely recovers.
    2. Mode collapse: `diversity()` (the mean pairwise distance of G's fixed-noise
       samples over that of real images) below `diversity_floor`; the samples are
       nearly one image. (A 200-step run on the NIH 64 px set whose 64 samples
       looked like one image by eye measured 0.10-0.24; real-vs-real is 1 by
       construction.) Measured every `every` steps and once more by `finish`.
    3. Divergence: a loss above LOSS_CEILING (a learning rate far too high).

    Called by train_loop after each step with (step, metrics); returns a warning
    for 1 and 3 once when the condition starts, and again only after it has
    cleared. Diversity raises no warning mid-run: a GAN's samples often look alike
    early and spread out later (issue 16: "collapse" at step 100, diverse samples
    at the end), so `finish` judges the END state and reports the worst point
    beside it, as two separate facts.
    """

    def __init__(self, window: int = 200, loss_d_floor: float = 0.05, gap_ceiling: float = 0.99,
                 every: int = 100, diversity_floor: float = DIVERSITY_FLOOR,
                 diversity: Callable[[], float] | None = None):
        self.loss_d_floor, self.gap_ceiling, self.every, self.diversity_floor = loss_d_floor, gap_ceiling, every, diversity_floor
        self.diversity = diversity
        self.recent = deque(maxlen=window)
        self.firing = {"d_wins": False, "exploded": False}
        self.worst: tuple[float, int] | None = None  # (lowest diversity ratio, its step) since this run started

    def _edge(self, name: str, condition: bool, message: str) -> str | None:
        fire = condition and not self.firing[name]
        self.firing[name] = condition
        return message if fire else None

    def _measure(self, step: int) -> float:
        ratio = self.diversity()
        if self.worst is None or ratio < self.worst[0]:
            self.worst = (ratio, step)
        return ratio

    def __call__(self, step: int, metrics: dict) -> str | None:
        self.recent.append((metrics["loss_d"], metrics.get("d_real", 0.5) - metrics.get("d_fake", 0.5)))
        full = len(self.recent) == self.recent.maxlen
        d_wins = full and (all(l < self.loss_d_floor for l, _ in self.recent)
                           or all(g > self.gap_ceiling for _, g in self.recent))
        warnings = [self._edge("d_wins", d_wins,
                               f"discriminator has won for {len(self.recent)} steps (loss_d < {self.loss_d_floor} "
                               f"or D(x) - D(G(z)) > {self.gap_ceiling}): training has likely diverged")]
        worst = max(metrics["loss_d"], metrics.get("loss_g", 0.0))
        warnings.append(self._edge("exploded", worst > LOSS_CEILING,
                                   f"a loss reached {worst:.3g} (a working GAN's stays far below {LOSS_CEILING:g}): "
                                   "training has diverged; try a lower --lr-g / --lr-d"))
        if self.diversity is not None and step % self.every == 0:
            self._measure(step)
        found = [w for w in warnings if w]
        return "; ".join(found) if found else None

    def finish(self, step: int) -> tuple[str, bool] | None:
        """The diversity verdict at the end of training (step `step`), with the worst
        point of the run beside it: (one line, collapsed at the end?); None without
        a diversity measure."""
        if self.diversity is None:
            return None
        end = self._measure(step)
        collapsed = end < self.diversity_floor
        low, at = self.worst
        state = "mode collapse: the samples are nearly identical" if collapsed else "not collapsed"
        return (f"diversity (samples' pairwise distance over the real images'; collapsed below "
                f"{self.diversity_floor:g}): worst {low:.3f} at step {at}; at the end (step {step}) {end:.3f}: "
                f"{state}", collapsed)

    def report(self, step: int, out: Path) -> None:
        """`finish`, printed and kept: OUT/diversity.txt always, OUT/warnings.log too
        when the samples are collapsed at the end (the state the run's samples are in)."""
        found = self.finish(step)
        if found is None:
            return
        line, collapsed = found
        print(("warning: " if collapsed else "") + line, flush=True)
        with common.atomic_path(out / "diversity.txt") as tmp:
            tmp.write_text(line + "\n")
        if collapsed:
            with open(out / "warnings.log", "a") as f:
                f.write(f"step {step}: {line}\n")


# --------------------------------------------------------------------------- training


def r1_penalty(logits_real: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """R1 = E_x ||grad_x D(x)||^2 over real images x (Mescheder, Geiger and Nowozin 2018, Eq. 9; D's loss
    adds gamma / 2 of it). `real` (B, C, H, W) must require grad and `logits_real` (B,) be computed from it;
    the graph is kept (create_graph) so that the penalty's own gradient reaches D's weights."""
    grad, = torch.autograd.grad(logits_real.sum(), real, create_graph=True)  # (B, C, H, W): each image's own
    return grad.pow(2).flatten(1).sum(1).mean()


def make_step(G: nn.Module, D: nn.Module, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
              cfg: DCGANConfig, tcfg: TrainConfig, device: torch.device) -> Callable[[torch.Tensor], dict]:
    """One discriminator update followed by `g_steps` generator updates (the original's 1:2, modern 1:1).

    D step:  maximise log D(T(x)) + log(1 - D(T(G(z))))   (Goodfellow et al. 2014, Eq. 1)
             [- gamma/2 R1 with an R1 preset]
    G step:  maximise log D(T(G(z))), the non-saturating loss of the same paper.
    T is the preset's DiffAugment (identity in the original), drawn afresh for every batch and applied to
    real and fake alike (Zhao et al. 2020, Eq. 2-3); G's gradient flows through it.
    """
    D_plain, G_plain = unwrap(D), unwrap(G)
    p = tcfg.settings()

    def T(x: torch.Tensor) -> torch.Tensor:
        return diffaugment.diff_augment(x, p.augment)

    def step(real: torch.Tensor) -> dict:
        real = real.to(device, non_blocking=True)
        b = real.shape[0]
        ones, zeros = torch.ones(b, device=device), torch.zeros(b, device=device)

        # Real and fake go through D as two batches, so BatchNorm normalises each
        # on its own statistics (as in Radford et al.'s code); mixing them would let
        # D tell them apart by the batch statistics alone.
        with torch.no_grad(), autocast(device, tcfg.amp):
            fake = G(sample_noise(b, cfg, device=device))
        if p.r1_gamma:
            real = real.detach().requires_grad_(True)  # R1 differentiates D(T(x)) with respect to x itself
        with autocast(device, tcfg.amp):
            logits_real, logits_fake = D(T(real)), D(T(fake))
        loss_d = (F.binary_cross_entropy_with_logits(logits_real.float(), ones)
                  + F.binary_cross_entropy_with_logits(logits_fake.float(), zeros))
        r1 = r1_penalty(logits_real.float(), real) if p.r1_gamma else None
        opt_d.zero_grad(set_to_none=True)
        (loss_d if r1 is None else loss_d + p.r1_gamma / 2 * r1).backward()
        grad_d = torch.nn.utils.clip_grad_norm_(D_plain.parameters(), float("inf"))  # the norm only: max inf
        opt_d.step()

        # G steps through the plain D with D's weights frozen: no gradient is
        # computed for D, and under DDP no all-reduce is started for it.
        D_plain.requires_grad_(False)
        for _ in range(p.g_steps):
            with autocast(device, tcfg.amp):
                logits = D_plain(T(G(sample_noise(b, cfg, device=device))))
            loss_g = F.binary_cross_entropy_with_logits(logits.float(), ones)
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            grad_g = torch.nn.utils.clip_grad_norm_(G_plain.parameters(), float("inf"))
            opt_g.step()
        D_plain.requires_grad_(True)
        return {"loss_d": loss_d.item(), "loss_g": loss_g.item(), "grad_d": grad_d.item(), "grad_g": grad_g.item(),
                "d_real": torch.sigmoid(logits_real.float()).mean().item(),
                "d_fake": torch.sigmoid(logits_fake.float()).mean().item(),
                **({} if r1 is None else {"r1": r1.item()})}

    return step


def train(tcfg: TrainConfig) -> Path:
    """Train on a folder, one checkpoint and sample grid per epoch (torchrun: DDP); returns the
    checkpoint's path. common.training_run does what both generators share (checks, lock, torchrun,
    resume, seeds); rank 0 matches a single-process run, and DDP copies its initial weights to all ranks."""
    with common.training_run(tcfg, "dcgan", ("config", "generator", "discriminator", "opt_g", "opt_d")) as run:
        return _train(tcfg, run)


def _train(tcfg: TrainConfig, run: common.Run) -> Path:
    info, device, out = run.info, run.info.device, tcfg.out
    cfg = tcfg.network(run.ckpt["config"] if run.ckpt else None)
    if run.ckpt:  # the checkpoint's preset (one written before presets: the original), as for its shape
        tcfg = common.keep_saved(tcfg, {"preset": run.ckpt.get("preset", LEGACY_PRESET)})
    p = tcfg.settings()
    G, D = Generator(cfg).to(device), Discriminator(cfg, p).to(device)
    opt_g = torch.optim.Adam(G.parameters(), lr=p.lr_g, betas=tcfg.betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=p.lr_d, betas=tcfg.betas)
    start = run.restore(generator=G, discriminator=D, opt_g=opt_g, opt_d=opt_d)
    images = data.load_training_folder(tcfg.data, cfg.size, tcfg.class_name).images  # (N, S, S) uint8
    real = data.to_unit_range(images)  # (N, 1, S, S) in [-1, 1]
    if cfg.channels == 3:
        real = real.expand(-1, 3, -1, -1).contiguous()  # grey repeated to RGB, as the original's input
    if info.is_main:
        print(f"DCGAN {cfg.size}x{cfg.size}x{cfg.channels}, preset {tcfg.preset} ({p.g_steps} G per D update, lr G "
              f"{p.lr_g:g}, lr D {p.lr_d:g}, DiffAugment {p.augment or 'none'}, spectral norm "
              f"{'on' if p.spectral_norm else 'off'}, R1 gamma {p.r1_gamma:g}): generator {count_parameters(G):,} "
              f"parameters, discriminator {count_parameters(D):,}; {real.shape[0]} training images"
              + (f", resuming at step {start}" if start else ""))
    if info.world_size > 1 and device.type == "cuda":
        # One batch statistic over all GPUs, as a single-GPU run of the global batch would see.
        # On CPU (gloo) plain BatchNorm normalises each rank's own batch: the same per-batch
        # statistics a single process has at the per-rank batch size.
        G, D = nn.SyncBatchNorm.convert_sync_batchnorm(G), nn.SyncBatchNorm.convert_sync_batchnorm(D)
    G_train, D_train = run.wrap(G), run.wrap(D)  # state dicts still come from G and D

    # Fixed noise for the per-epoch grids and the collapse check: its own generator,
    # so drawing it never moves the training RNG (resume stays bit-exact).
    fixed_z = sample_noise(tcfg.num_samples, cfg, torch.Generator().manual_seed(tcfg.seed)).to(device)
    real_spread = mean_pairwise_distance(real[:64])

    @torch.no_grad()
    def fixed_samples(z: torch.Tensor = fixed_z) -> torch.Tensor:
        G.eval()  # eval: no BatchNorm running-statistics update, same as `sample` (see generate)
        x = G(z).float()
        G.train()
        return x

    def eval_samples(n: int) -> torch.Tensor:
        """n samples of fixed noise (another seed than the grids') as grey uint8 (n, S, S), for monitor.py."""
        z = sample_noise(n, cfg, torch.Generator().manual_seed(tcfg.seed + 1)).to(device)
        return torch.from_numpy(common.to_uint8(fixed_samples(z).mean(dim=1, keepdim=True).cpu()))

    def on_epoch_end(epoch: int) -> None:
        save_image_grid(fixed_samples().cpu(), out / f"samples_epoch{epoch + 1:03d}.png", nrow=8)

    def state() -> dict:
        train = {**asdict(p), "betas": list(tcfg.betas), "amp": tcfg.amp}
        return {"kind": "dcgan", "config": asdict(cfg), "preset": tcfg.preset, "train": train,
                "generator": G.state_dict(), "discriminator": D.state_dict(),
                "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "seed": tcfg.seed}

    monitor = CollapseMonitor(window=tcfg.collapse_window, every=100,
                              diversity=lambda: mean_pairwise_distance(fixed_samples()[:64]) / max(real_spread, 1e-8))
    total = common.total_steps(tcfg, real.shape[0], info.world_size)[0]
    watch = (quality.setup(tcfg, cfg.size, total, eval_samples, state, ("loss_d", "loss_g"), device, start)
             if info.is_main else None)
    fields = (("loss_d", "loss_g", "d_real", "d_fake", "grad_d", "grad_g") + (("r1",) if p.r1_gamma else ())
              + (quality.FIELDS if watch else ()))
    step = train_loop(real, make_step(G_train, D_train, opt_g, opt_d, cfg, tcfg, device), state, tcfg, info,
                      start, on_epoch_end, fields, monitor, keep_epoch_checkpoints=not tcfg.no_epoch_checkpoints,
                      evaluate=watch)
    if info.is_main:
        save_image_grid(fixed_samples().cpu(), out / "samples_latest.png", nrow=8)
        monitor.report(step, out)  # diversity at the end, beside the run's worst point
        print(f"step {step}: checkpoint, samples_latest.png and loss.csv in {common.shown(out)}")
    return out / "checkpoint.pt"
