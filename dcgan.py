"""DCGAN: the baseline generator, a clean version of the original experiment's.

Radford, Metz and Chintala, "Unsupervised Representation Learning with Deep
Convolutional Generative Adversarial Networks", ICLR 2016. The paper's rules
(section 3) are all here: strided convolutions instead of pooling, BatchNorm
except at G's output and D's input, ReLU in G with Tanh out, LeakyReLU(0.2) in D,
weights N(0, 0.02), Adam with beta1 = 0.5. The default is the original experiment's
256x256 network, layer for layer (shapes beside Generator and Discriminator).

Training presets (PRESETS): `original` (2 G updates per D, D at half G's rate);
`modern`, the default (1:1, DiffAugment of Zhao et al. 2020, spectral norm in D of
Miyato et al. 2018); `modern-r1` (an R1 penalty, Mescheder et al. 2018, in its place).
What differs from the original experiment, and the measured comparison: docs/dcgan.md.
`python main.py gan --help` trains; `python main.py sample --checkpoint ...` samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from plumbing.configs import CLIError, RunConfig, first_line, flag, keep_saved
from plumbing.files import first_nonfinite, require_keys
from plumbing.runtime import autocast, unwrap

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
    augment: str  # DiffAugment policy applied to real and fake images before D ('': none; training/diffaugment.py)
    spectral_norm: bool  # D: spectrally normalised convolutions and no BatchNorm (Miyato et al. 2018)
    r1_gamma: float  # weight gamma of the R1 penalty on real images (0: none; Mescheder et al. 2018)

    @property
    def batch_norm_in_d(self) -> bool:
        """The original D has BatchNorm; a regularised one has none (Miyato et al. 2018; Gulrajani et al. 2017, 4)."""
        return not (self.spectral_norm or self.r1_gamma)


PRESETS = {
    # The original experiment: G twice per D step, at twice D's learning rate.
    "original": Preset(g_steps=2, lr_g=2e-4, lr_d=1e-4, augment="", spectral_norm=False, r1_gamma=0.0),
    # Balanced updates, DiffAugment's translation + cutout (the paper's policy for its small-data runs;
    # grey images have no colour to speak of) and spectral normalisation in D (docs/dcgan.md).
    "modern": Preset(g_steps=1, lr_g=2e-4, lr_d=2e-4, augment="translation,cutout", spectral_norm=True,
                     r1_gamma=0.0),
    # The same with an R1 penalty in place of spectral normalisation (docs/dcgan.md compares them).
    # gamma = 1: between StyleGAN2's 0.01 (CIFAR) and Mescheder et al.'s 10.
    "modern-r1": Preset(g_steps=1, lr_g=2e-4, lr_d=2e-4, augment="translation,cutout", spectral_norm=False,
                        r1_gamma=1.0),
}
LEGACY_PRESET = "original"  # a checkpoint written before presets existed has no "preset" key: it is this


@dataclass
class TrainConfig(RunConfig):
    """Everything `python main.py gan` sets: the run's options (RunConfig) and the GAN's below.
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
        otherwise is an error, see keep_saved), else the defaults."""
        if saved is None:
            return DCGANConfig(**{k: getattr(self, k) for k in ("size", "channels", "g_width", "d_width")
                                  if getattr(self, k) is not None})
        keep_saved(self, saved)
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

    `preset` None or original: the paper's D, with BatchNorm. spectral_norm: no BatchNorm, each
    conv weight W used as W / sigma(W), sigma from one power iteration per forward (Miyato et al.
    2018, Eq. 8, Alg. 1), so each layer is 1-Lipschitz. R1: no BatchNorm, no normalisation.
    Without BatchNorm the convolutions have biases (0 at init).
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
    require_keys(ckpt, ("config", "generator"), "this GAN checkpoint")
    bad = first_nonfinite(ckpt["generator"])
    if bad:
        raise CLIError(f"the checkpoint's weight generator.{bad} is non-finite (NaN or infinity); refusing to sample")
    try:
        cfg = DCGANConfig(**ckpt["config"])
        G = Generator(cfg)
        G.load_state_dict(ckpt["generator"])
    except (TypeError, RuntimeError, ValueError) as e:
        raise CLIError(f"malformed GAN checkpoint: {first_line(e)}") from e
    G.to(device).eval()
    # The noise is drawn on the CPU from its own generator, so the result does not
    # depend on the device, the batch size, or anything else using the global RNG.
    z = sample_noise(n, cfg, torch.Generator().manual_seed(seed))
    return torch.cat([G(zb.to(device)).float().cpu() for zb in z.split(batch_size)])


# --------------------------------------------------------------------------- training


def r1_penalty(logits_real: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """R1 = E_x ||grad_x D(x)||^2 over real x (Mescheder, Geiger and Nowozin 2018, Eq. 9); D adds gamma/2 R1.
    `logits_real` (B,) from `real` (B, C, H, W), which requires grad; create_graph lets R1 train D."""
    grad, = torch.autograd.grad(logits_real.sum(), real, create_graph=True)  # (B, C, H, W): each image's own
    return grad.pow(2).flatten(1).sum(1).mean()


def make_step(G: nn.Module, D: nn.Module, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
              cfg: DCGANConfig, tcfg: TrainConfig, device: torch.device,
              augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Callable[[torch.Tensor], dict]:
    """One discriminator update followed by `g_steps` generator updates (the original's 1:2, modern 1:1).

    D step:  maximise log D(T(x)) + log(1 - D(T(G(z))))   (Goodfellow et al. 2014, Eq. 1)
             [- gamma/2 R1 with an R1 preset]
    G step:  maximise log D(T(G(z))), the non-saturating loss of the same paper.
    T is `augment`, the preset's DiffAugment (None: identity, as in the original), drawn afresh for every
    batch and applied to real and fake alike (Zhao et al. 2020, Eq. 2-3); G's gradient flows through it.
    """
    D_plain, G_plain = unwrap(D), unwrap(G)
    p = tcfg.settings()
    T = augment or (lambda x: x)  # noqa: E731

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


