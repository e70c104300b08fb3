"""DiffAugment: the same random, differentiable augmentation of real AND generated images before D.

Zhao, Liu, Lin, Zhu and Han, "Differentiable Augmentation for Data-Efficient GAN
Training", NeurIPS 2020. With a few hundred images D memorises the training set;
augmenting only real images would teach G to draw augmented ones (section 3.1), so
real and fake alike go through a differentiable T that passes G's gradient (Eq. 2-3):

    L_D = f(-D(T(x))) + f(D(T(G(z))))       L_G = f(-D(T(G(z))))

T is drawn afresh per image and per call. The policies are the paper's `translation`,
`cutout` and `color`, following Zhao et al.'s DiffAugment_pytorch.py line for line in
what they compute; on one grey channel, colour is brightness and contrast only.
Images are (B, C, H, W) in [-1, 1]; every function keeps the shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TRANSLATION_RATIO = 0.125  # shift by up to 1/8 of the side (the paper's default)
CUTOUT_RATIO = 0.5  # erase a square of half the side (the paper's default)


def brightness(x: torch.Tensor) -> torch.Tensor:
    """x + b, b ~ U(-0.5, 0.5) per image."""
    return x + (torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device) - 0.5)


def contrast(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) c + mean, c ~ U(0.5, 1.5) per image; the mean over the whole image."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device) + 0.5) + mean


def translation(x: torch.Tensor, ratio: float = TRANSLATION_RATIO) -> torch.Tensor:
    """Shift each image by a whole number of pixels, up to ratio * side each way, independently in y and x;
    what enters at the border is 0 (the reference pads with zeros: mid-grey in [-1, 1]). A gather, so the
    gradient reaches every pixel that stays in the frame."""
    b, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sh, sh + 1, (b, 1, 1), device=x.device)
    dx = torch.randint(-sw, sw + 1, (b, 1, 1), device=x.device)
    n, iy, ix = torch.meshgrid(torch.arange(b, device=x.device), torch.arange(h, device=x.device),
                               torch.arange(w, device=x.device), indexing="ij")  # each (B, H, W)
    # Output pixel (i, j) reads input (i + dy, j + dx); index 0 and H + 1 of the 1-padded image are zeros.
    iy = torch.clamp(iy + dy + 1, 0, h + 1)
    ix = torch.clamp(ix + dx + 1, 0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)  # (B, H+2, W+2, C)
    return padded[n, iy, ix].permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)


def cutout(x: torch.Tensor, ratio: float = CUTOUT_RATIO) -> torch.Tensor:
    """Set a (ratio * H) x (ratio * W) square to 0 in each image, centred anywhere in it (clipped at the border)."""
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - ch % 2), (b, 1, 1), device=x.device)
    cx = torch.randint(0, w + (1 - cw % 2), (b, 1, 1), device=x.device)
    n, iy, ix = torch.meshgrid(torch.arange(b, device=x.device), torch.arange(ch, device=x.device),
                               torch.arange(cw, device=x.device), indexing="ij")  # each (B, ch, cw)
    iy = torch.clamp(iy + cy - ch // 2, 0, h - 1)
    ix = torch.clamp(ix + cx - cw // 2, 0, w - 1)
    mask = torch.ones(b, h, w, dtype=x.dtype, device=x.device)
    mask[n, iy, ix] = 0
    return x * mask.unsqueeze(1)  # (B, 1, H, W) broadcast over the channels


POLICIES = {"color": (brightness, contrast), "translation": (translation,), "cutout": (cutout,)}


def check_policy(policy: str) -> tuple[str, ...]:
    """'translation,cutout' -> its names, in order; an unknown name is a ValueError naming it."""
    names = tuple(p for p in policy.split(",") if p)
    unknown = [p for p in names if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown DiffAugment policy {unknown[0]!r} (known: {', '.join(POLICIES)})")
    return names


def diff_augment(x: torch.Tensor, policy: str) -> torch.Tensor:
    """T(x): the policy's functions in order, e.g. 'translation,cutout'; '' returns x itself."""
    for name in check_policy(policy):
        for fn in POLICIES[name]:
            x = fn(x)
    return x
