"""FID, Inception Score and KID, computed the way the standard tools compute them,
plus precision, recall, density and coverage on the same features.

- FID (Heusel et al. 2017): Frechet distance between Gaussians fitted to the
  2048-d pool features of the TensorFlow Inception-v3 of 2015.
- IS (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))) over the 1008-way
  softmax of the same network, the fc layer applied without its bias.
- KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic kernel
  k(x, y) = (x.y / d + 1)^3 on the same features, averaged over subsets.
- PRDC (Kynkaanniemi et al. 2019; Naeem et al. 2020): k-NN balls in feature space.

The network is pytorch-fid's port (`pt_inception-2015-12-05-6726825d.pth`, four patched
block kinds), written out so its weights load by their own names; checked against pytorch-fid
0.3.0 and torch-fidelity 0.4.0 in tests/test_fid.py. Classifier features: study/distances.py.
"""

from __future__ import annotations

import math
import os
import sys
import urllib.error
import warnings
import zipfile
import zlib
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import linalg

import data
from plumbing.configs import check_config, CLIError, flag
from plumbing.files import atomic_path, download
from plumbing.runtime import pick_device

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
WEIGHTS_SHA256_PREFIX = "6726825d"  # torch-hub convention: the file name carries its hash
FID_MIN_IMAGES = 2048  # below the feature dimension the covariance is singular and FID is biased
INPUT_SIZE = 299
IS_SEED = KID_SEED = 2020  # torch-fidelity's rng_seed, so our IS and KID draw the same subsets


class InceptionWeightsMissing(CLIError):
    """The FID Inception weights are not on disk and could not be downloaded.
    Callers may catch this to fall back to KID on classifier features."""


# --------------------------------------------------------------------------- the FID Inception-v3


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3, TensorFlow's) -> ReLU."""

    def __init__(self, c_in: int, c_out: int, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, bias=False, **conv_kwargs)
        self.bn: nn.Module = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)

    @torch.no_grad()
    def fuse_(self) -> None:
        """Fold the inference-time BatchNorm into the conv: w' = w g/s, b' = beta - mean g/s,
        s = sqrt(var + eps). One pass over the activations instead of two."""
        bn, conv = self.bn, self.conv
        scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()  # (C_out,)
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=True)
        fused.weight.copy_(conv.weight.double() * scale[:, None, None, None])
        fused.bias.copy_(bn.bias.double() - bn.running_mean.double() * scale)
        self.conv, self.bn = fused, nn.Identity()


class FIDInceptionA(nn.Module):
    """Mixed_5b/5c/5d (35x35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        # Patch: TensorFlow's average pool leaves the zero padding out of the average.
        bp = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([b1, b5, b3, bp], 1)  # (B, 224 + pool_features, 35, 35)


class InceptionB(nn.Module):
    """Mixed_6a, grid reduction 35x35 -> 17x17 (unpatched)."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, 3, stride=2)], 1)  # (B, 768, 17, 17)


class FIDInceptionC(nn.Module):
    """Mixed_6b..6e (17x17): factorised 7x7 convolutions as 1x7 and 7x1."""

    def __init__(self, c_in: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                     self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        # Patch: TensorFlow's average pool leaves the zero padding out of the average.
        bp = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([b1, b7, bd, bp], 1)  # (B, 768, 17, 17)


class InceptionD(nn.Module):
    """Mixed_7a, grid reduction 17x17 -> 8x8 (unpatched)."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)  # (B, 1280, 8, 8)


class FIDInceptionE(nn.Module):
    """Mixed_7b (pytorch-fid's FIDInceptionE_1) and Mixed_7c (FIDInceptionE_2), 8x8,
    with the 3x3 convolutions split into parallel 1x3 and 3x1."""

    def __init__(self, c_in: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(c_in, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.max_pool:
            # Patch: the TF graph's last block max-pools here (the paper says average);
            # FID numbers everywhere are computed with this quirk.
            pooled = F.max_pool2d(x, 3, stride=1, padding=1)
        else:
            # Patch: TensorFlow's average pool leaves the zero padding out of the average.
            pooled = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)  # (B, 2048, 8, 8)


class FIDInceptionV3(nn.Module):
    """Images in [0, 1] -> (2048-d pool features, 1008 logits without the fc bias)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, c7=128)
        self.Mixed_6c = FIDInceptionC(768, c7=160)
        self.Mixed_6d = FIDInceptionC(768, c7=160)
        self.Mixed_6e = FIDInceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # 1008 = the 1000 ImageNet classes + 8 unused TF outputs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, 1 or 3, H, W) in [0, 1], any H and W."""
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):  # resizing 299 -> 299 is the identity
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # [0, 1] -> [-1, 1], the range the TF graph was trained on
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # grey -> RGB after the resize: 3x cheaper, same values
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # -> (B, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (B, 2048): the FID / KID features
        logits = pool @ self.fc.weight.T  # (B, 1008): no bias, as torch-fidelity's IS
        return pool, logits


# --------------------------------------------------------------------------- weights


def default_weights_path() -> Path:
    return Path(__file__).resolve().parent / "models" / WEIGHTS_FILE


def resolve_weights(path: str | os.PathLike | None) -> Path:
    """An explicit path must exist; the default one is downloaded when absent."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InceptionWeightsMissing(f"Inception weights not found: {path} (download {WEIGHTS_URL})")
        return path
    path = default_weights_path()
    if not path.is_file():
        made = not path.parent.exists()  # models/ is made for the download, and kept only if it succeeds
        try:
            download(WEIGHTS_URL, path, WEIGHTS_SHA256_PREFIX)
        except (urllib.error.URLError, OSError, TimeoutError, CLIError) as e:
            if made and path.parent.is_dir() and not any(path.parent.iterdir()):
                path.parent.rmdir()
            if isinstance(e, CLIError):
                raise
            raise InceptionWeightsMissing(
                f"cannot download the FID Inception weights ({getattr(e, 'reason', e)}); fetch {WEIGHTS_URL} "
                f"and put {WEIGHTS_FILE} at {path}, or pass --inception-weights PATH") from e
    return path


def load_inception(path: str | os.PathLike | None = None, device: torch.device | str = "cpu") -> FIDInceptionV3:
    """Build the network, load the weights key by key with a shape check, fold each
    BatchNorm into its conv for inference, and move it to `device` in channels_last."""
    path = resolve_weights(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a pickle, truncated, or a pickle with code in it
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIError(f"cannot read Inception weights {path}: {first}") from e
    if not isinstance(state, dict):
        raise CLIError(f"{path} is not a state dict")
    model = FIDInceptionV3()
    ours = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    theirs = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    for key, ref in ours.items():
        if key not in theirs:
            raise CLIError(f"{path} is not the FID Inception: key {key!r} is missing")
        if not torch.is_tensor(theirs[key]) or theirs[key].shape != ref.shape:
            got = tuple(theirs[key].shape) if torch.is_tensor(theirs[key]) else type(theirs[key]).__name__
            raise CLIError(f"{path}: {key} has shape {got}, expected {tuple(ref.shape)}")
    extra = sorted(set(theirs) - set(ours))
    if extra:
        raise CLIError(f"{path} is not the FID Inception: unexpected key {extra[0]!r}")
    model.load_state_dict({k: theirs[k].float() for k in ours}, strict=False)
    for m in model.modules():
        if isinstance(m, BasicConv2d):
            m.fuse_()
    return model.eval().requires_grad_(False).to(device, memory_format=torch.channels_last)


# --------------------------------------------------------------------------- features


def _as_unit_batch(images: list[np.ndarray] | torch.Tensor) -> torch.Tensor:
    """uint8 (H, W) arrays, or a tensor, -> float (B, C, H, W) in [0, 1], C = 1 or 3.
    Arrays of different sizes are each resized to 299 from their own resolution
    (what resizing them in one batch would do, had they one size)."""
    if torch.is_tensor(images):
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        return x.unsqueeze(1) if x.dim() == 3 else x  # (B, H, W) -> (B, 1, H, W)
    if len({a.shape for a in images}) == 1:
        return torch.from_numpy(np.stack(images))[:, None].float() / 255  # (B, 1, H, W)
    return torch.cat([F.interpolate(torch.from_numpy(a)[None, None].float() / 255, size=(INPUT_SIZE, INPUT_SIZE),
                                    mode="bilinear", align_corners=False) for a in images])  # (B, 1, 299, 299)


@torch.inference_mode()
def inception_features(model: FIDInceptionV3, images, batch_size: int = 50, progress: bool = True,
                       desc: str = "inception") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Pool features (N, 2048) and bias-free logits (N, 1008), float64, of
    - a folder (searched recursively, images at their stored resolution), or
    - a tensor: uint8 (N, H, W) / (N, C, H, W) in 0..255, or float (N, C, H, W) in [0, 1].
    Returns (features, logits, skipped paths)."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    skipped: list[str] = []
    if torch.is_tensor(images):
        n, load = images.shape[0], (lambda i, j: images[i:j])
    else:
        files = data.list_images(images)
        n = len(files)

        def load(i, j):
            batch = []
            for p in files[i:j]:
                try:
                    batch.append(data.load_grey(p))
                except data.UnreadableImage as e:
                    warnings.warn(f"skipping unreadable image {e}", stacklevel=3)
                    skipped.append(str(p))
            return batch

    feats, logits = [], []
    for i in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, dynamic_ncols=True):
        batch = load(i, i + batch_size)
        if len(batch) == 0:
            continue
        f, l = model(_as_unit_batch(batch).to(device))
        feats.append(f.double().cpu())
        logits.append(l.double().cpu())
    if skipped:
        print(f"skipped {len(skipped)} unreadable image(s) under {images}", file=sys.stderr)
    if not feats:
        raise CLIError(f"none of the {n} image(s) under {images} could be read")
    return torch.cat(feats).numpy(), torch.cat(logits).numpy(), skipped


def mean_and_covariance(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mu (D,) and sigma (D, D) as pytorch-fid computes them (np.cov, rowvar False)."""
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _stats_cache_file(folder: Path, weights: Path) -> Path:
    st = weights.stat()  # other weights, other statistics
    key = data.files_key(data.list_images(folder), f"fid-stats v2\0{weights.resolve()}\0{st.st_size}\0{st.st_mtime_ns}")
    return data.default_cache_dir() / "fid" / f"{key}.npz"


def load_stats(path: str | os.PathLike) -> dict:
    """An .npz of statistics: pytorch-fid's (mu, sigma) or ours (plus features, logits,
    n). Everything is checked here, so that a bad file is one line naming it: numbers
    only, all finite, mu (D,), sigma (D, D), features (n, D), logits (n, K), n a count."""
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise CLIError(f"{path} holds a single array (an .npy file?), not .npz statistics with mu and sigma")
        with z:
            out = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise CLIError(f"cannot read statistics {path}: {e}") from e
    if "mu" not in out or "sigma" not in out:
        raise CLIError(f"{path} has no 'mu' and 'sigma' arrays (keys: {', '.join(out) or 'none'})")
    for key in ("mu", "sigma", "features", "logits", "n"):
        if key in out and out[key].dtype.kind not in "iuf":
            raise CLIError(f"{path}: {key} must hold numbers, not {out[key].dtype} values")
        if key in out and not np.isfinite(out[key]).all():
            raise CLIError(f"{path}: {key} holds NaN or infinite values")
    mu, sigma = out["mu"], out["sigma"]
    if mu.ndim != 1 or sigma.shape != (mu.size,) * 2:
        raise CLIError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not match (expected (D,) and (D, D))")
    features = out.get("features")
    if features is not None and (features.ndim != 2 or features.shape[1] != mu.size):
        raise CLIError(f"{path}: features {features.shape} do not match mu {mu.shape} (expected (n, D))")
    if "logits" in out and (out["logits"].ndim != 2 or features is not None and len(out["logits"]) != len(features)):
        raise CLIError(f"{path}: logits {out['logits'].shape} do not match features (expected (n, K))")
    if "n" in out:
        n = out["n"]
        if n.shape != () or n != np.round(n) or n < 2 or features is not None and n != len(features):
            raise CLIError(f"{path}: n must be one whole number of at least 2, the image count"
                           f"{'' if features is None else f' ({len(features)} feature rows)'}; got {n.tolist()}")
    out.setdefault("n", np.asarray(len(features) if features is not None else -1))
    return out


def _is_npz(source) -> bool:
    return isinstance(source, (str, os.PathLike)) and str(source).endswith(".npz")


def _check_count(n: int, name) -> None:
    if n < 2:
        raise CLIError(f"{name}: {n} image(s); FID and KID need at least 2 per side (and 2,048 for a reliable FID)")


def feature_statistics(source, model: FIDInceptionV3, weights: Path, batch_size: int = 50,
                       progress: bool = True) -> dict:
    """Statistics (and, where available, features and logits) of a folder, an .npz,
    or a tensor. A folder's result is cached, keyed by its contents and the weights."""
    if _is_npz(source):
        return load_stats(source)
    if torch.is_tensor(source):
        _check_count(source.shape[0], "image tensor")
        f, l, _ = inception_features(model, source, batch_size, progress)
        mu, sigma = mean_and_covariance(f)
        return dict(mu=mu, sigma=sigma, features=f, logits=l, n=np.asarray(len(f)))
    path = Path(source)
    cache = _stats_cache_file(path, weights)
    if cache.is_file():
        try:
            return load_stats(cache)
        except CLIError:
            pass  # a damaged cache is rebuilt
    f, l, skipped = inception_features(model, path, batch_size, progress, desc=f"inception {path.name}")
    _check_count(len(f), path)
    mu, sigma = mean_and_covariance(f)
    out = dict(mu=mu, sigma=sigma, features=f.astype(np.float32), logits=l.astype(np.float32), n=np.asarray(len(f)))
    if not skipped:  # a folder with unreadable files is re-examined next time
        try:
            with atomic_path(cache) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, **out)
        except OSError:
            pass  # a read-only cache only costs time
    return out


# --------------------------------------------------------------------------- the metrics


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """d^2 = |mu1 - mu2|^2 + Tr(s1) + Tr(s2) - 2 Tr(sqrtm(s1 s2))  (Heusel et al. 2017, Dowson & Landau 1982).

    Safeguards as pytorch-fid: a non-finite sqrtm retries with eps*I added to both
    covariances; a complex root with a diagonal imaginary part above 1e-3 is an error."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise CLIError(f"statistics of different dimensions, {mu1.shape} vs {mu2.shape}: not from one network")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: singular covariance product; adding {eps} to the diagonal", stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise CLIError(f"FID: sqrtm has an imaginary component {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(scores: np.ndarray, splits: int = 10, *, are_probs: bool = False,
                    seed: int = IS_SEED) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))) per split (Salimans et al. 2016), (mean, std) over splits.
    `scores` are logits (N, K), or probabilities with are_probs=True. Like torch-fidelity,
    the rows are shuffled with RandomState(seed) before splitting."""
    scores = np.asarray(scores, dtype=np.float64)
    n = scores.shape[0]
    splits = max(1, min(splits, n))
    scores = scores[np.random.RandomState(seed).permutation(n)]
    if are_probs:
        log_p = np.log(np.clip(scores, 1e-300, None))
    else:
        log_p = scores - scores.max(axis=1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))  # log softmax
    p = np.exp(log_p)
    out = []
    for i in range(splits):
        part = slice(i * n // splits, (i + 1) * n // splits)
        p_y = p[part].mean(axis=0, keepdims=True)  # marginal p(y) of the split
        kl = (p[part] * (log_p[part] - np.log(p_y))).sum(axis=1)  # KL(p(y|x) || p(y)) per image
        out.append(np.exp(kl.mean()))
    return float(np.mean(out)), float(np.std(out))


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x.y / d + 1)^3, the KID kernel (Binkowski et al. 2018, Sec. 3)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two equal-size samples (Gretton et al. 2012, Eq. 3): the
    within-set means leave out the diagonal k(x_i, x_i)."""
    m = x.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


def kid(f1: np.ndarray, f2: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = KID_SEED) -> tuple[float, float, int]:
    """KID: mean and std of the unbiased MMD^2 over `subsets` random subsets, each drawn
    without replacement from each set (torch-fidelity's procedure and seed). The subset
    size is clipped to the smaller set. Returns (mean, std, subset size used)."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise CLIError(f"KID needs at least 2 images per side (got {len(f1)} and {len(f2)})")
    rng = np.random.RandomState(seed)
    mmds = [mmd2_unbiased(f1[rng.choice(len(f1), m, replace=False)], f2[rng.choice(len(f2), m, replace=False)])
            for _ in range(subsets)]
    return float(np.mean(mmds)), float(np.std(mmds)), m


def _warn_few(n_real: int, n_fake: int, what: str = "FID") -> None:
    if min(n_real, n_fake) < FID_MIN_IMAGES:
        warnings.warn(f"{what} from {n_real} real and {n_fake} fake images: below {FID_MIN_IMAGES} per side "
                      f"the covariance is singular and {what} is biased upwards; compare only at equal counts "
                      f"and prefer KID", stacklevel=3)


def evaluate(real, fake, inception_weights=None, device=None, batch_size: int = 50, progress: bool = True,
             pr_k: int | None = None) -> dict:
    """FID, KID and IS (of `fake`) with the FID Inception, and with pr_k precision, recall, density and
    coverage on the same features (prdc, k = pr_k). real/fake: folders, .npz statistics, or uint8 tensors
    (N, H, W). Values that need features an .npz lacks are None."""
    device = pick_device(device) if not isinstance(device, torch.device) else device
    weights = model = None
    if not (_is_npz(real) and _is_npz(fake)):  # two .npz files need no network
        weights = resolve_weights(inception_weights)
        model = load_inception(weights, device)
    r = feature_statistics(real, model, weights, batch_size, progress)
    f = feature_statistics(fake, model, weights, batch_size, progress)
    n_real, n_fake = (int(s["n"]) if int(s["n"]) >= 0 else None for s in (r, f))  # None: an .npz that does not say
    _warn_few(n_real or FID_MIN_IMAGES, n_fake or FID_MIN_IMAGES)
    out = dict(fid=frechet_distance(r["mu"], r["sigma"], f["mu"], f["sigma"]), kid_mean=None, kid_std=None,
               kid_subset_size=None, is_mean=None, is_std=None, n_real=n_real, n_fake=n_fake)
    if "features" in r and "features" in f:
        out["kid_mean"], out["kid_std"], out["kid_subset_size"] = kid(r["features"], f["features"])
    if "logits" in f:
        out["is_mean"], out["is_std"] = inception_score(f["logits"])
    if pr_k:
        has = "features" in r and "features" in f
        out.update(prdc(r["features"], f["features"], pr_k) if has else dict.fromkeys(PRDC_KEYS))
    bad = [k for k, v in out.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:  # never a number that is not one: NaN would print as "FID nan" and break strict JSON
        raise CLIError(f"{', '.join(bad)} came out non-finite: the statistics are not a valid mean and covariance")
    return out


# --------------------------------------------------------------------------- precision, recall, density, coverage
# Kynkaanniemi et al., NeurIPS 2019 (precision, recall); Naeem et al., ICML 2020 (density, coverage).


PRDC_K = 3  # Kynkaanniemi et al. 2019 use k = 3; Naeem et al. 2020 recommend k = 5 for density and coverage
PRDC_CHUNK = 2048  # rows and columns of one distance block: 2048^2 float64 = 32 MiB, whatever N and M
PRDC_KEYS = ("precision", "recall", "density", "coverage")  # what prdc returns, in this order


def _prdc_features(x, device: torch.device) -> torch.Tensor:
    x = x if torch.is_tensor(x) else torch.from_numpy(np.asarray(x))
    return x.to(device=device, dtype=torch.float64)


def knn_radii(x: torch.Tensor, k: int = PRDC_K, chunk: int = PRDC_CHUNK) -> torch.Tensor:
    """NND_k(x_i) = |x_i - NN_k(x_i)|: distance from each point to its k-th nearest OTHER
    point of the same set, the radius of its k-NN ball (Kynkaanniemi et al. 2019, Eq. 1).

    prdc and torch-fidelity take the (k+1)-th smallest distance with the point's own zero
    included; leaving the point out and taking the k-th is the same number, and does not
    depend on cdist's rounding giving an exact zero on the diagonal. Distances are
    computed in chunk x chunk blocks, of which only the k smallest per row are kept."""
    n = len(x)
    radii = torch.empty(n, dtype=x.dtype, device=x.device)
    for i in range(0, n, chunk):
        rows = x[i:i + chunk]
        nearest = rows.new_empty(len(rows), 0)  # (rows, <= k) running k smallest
        for j in range(0, n, chunk):
            d = torch.cdist(rows, x[j:j + chunk])  # (rows, cols)
            if i == j:  # the diagonal block: a point is not its own neighbour
                d.fill_diagonal_(float("inf"))
            d = d.topk(min(k, d.shape[1]), dim=1, largest=False).values
            both = torch.cat([nearest, d], dim=1)
            nearest = both.topk(min(k, both.shape[1]), dim=1, largest=False).values
        radii[i:i + chunk] = nearest.max(dim=1).values  # the k-th smallest: n > k fills all k slots
    return radii


def prdc(real_features, fake_features, k: int = PRDC_K, *, chunk: int = PRDC_CHUNK, closed: bool = False,
         device: str | torch.device | None = "cpu") -> dict:
    """Precision, recall, density and coverage of real (N, D) and fake (M, D), by k-NN balls B(x, NND_k(x)):

      precision = 1/M sum_j 1{fake_j in some real ball}          (Kynkaanniemi et al. 2019, Eq. 2)
      recall    = 1/N sum_i 1{real_i in some fake ball}          (Kynkaanniemi et al. 2019, Eq. 2)
      density   = 1/(kM) sum_j sum_i 1{fake_j in B(real_i)}      (Naeem et al. 2020)
      coverage  = 1/N sum_i 1{some fake_j in B(real_i)}          (Naeem et al. 2020)

    Balls are open (d < NND_k, the prdc package) or, with closed=True, closed (d <= NND_k,
    Kynkaanniemi et al. Eq. 1, torch-fidelity). Float64 on `device`, in chunk x chunk blocks."""
    device = device if isinstance(device, torch.device) else pick_device(device)
    real, fake = _prdc_features(real_features, device), _prdc_features(fake_features, device)
    if real.ndim != 2 or fake.ndim != 2:
        raise CLIError(f"PRDC needs features of shape (N, D); got {tuple(real.shape)} and {tuple(fake.shape)}")
    if real.shape[1] != fake.shape[1]:
        raise CLIError(f"PRDC: real and fake features differ in dimension ({real.shape[1]} vs {fake.shape[1]})")
    n, m = len(real), len(fake)
    if k < 1:
        raise CLIError(f"PRDC: k must be at least 1 (got {k})")
    if k >= min(n, m):  # the k-th neighbour of a point needs k others
        raise CLIError(f"PRDC with k = {k} needs more than {k} samples per side (got {n} real and {m} fake)")
    if chunk < 1:
        raise CLIError(f"PRDC: chunk must be at least 1 (got {chunk})")

    r_real, r_fake = knn_radii(real, k, chunk), knn_radii(fake, k, chunk)
    # Patch: prdc counts d < NND_k, torch-fidelity (after Kynkaanniemi Eq. 1) d <= NND_k.
    inside = torch.le if closed else torch.lt
    balls_per_fake = torch.zeros(m, dtype=torch.int64, device=device)  # real balls holding fake_j
    real_in_fake_ball = torch.zeros(n, dtype=torch.bool, device=device)
    real_ball_covered = torch.zeros(n, dtype=torch.bool, device=device)
    for i in range(0, n, chunk):
        for j in range(0, m, chunk):
            d = torch.cdist(real[i:i + chunk], fake[j:j + chunk])  # (real rows, fake cols)
            in_real_ball = inside(d, r_real[i:i + chunk, None])
            balls_per_fake[j:j + chunk] += in_real_ball.sum(dim=0)
            real_ball_covered[i:i + chunk] |= in_real_ball.any(dim=1)
            real_in_fake_ball[i:i + chunk] |= inside(d, r_fake[None, j:j + chunk]).any(dim=1)
    return dict(precision=(balls_per_fake > 0).double().mean().item(),
                recall=real_in_fake_ball.double().mean().item(),
                density=balls_per_fake.sum().item() / (k * m),
                coverage=real_ball_covered.double().mean().item())


# --------------------------------------------------------------------------- a chest X-ray feature distance


# --------------------------------------------------------------------------- the `fid` command


@dataclass
class FIDConfig:
    """The `fid` command's options (main.py); `run` does the work and returns the numbers."""

    real: str = flag(MISSING, "folder of real images, or .npz statistics", positional=True)
    fake: str = flag(MISSING, "folder of generated images, or .npz statistics", positional=True)
    inception_weights: Path | None = flag(None, f"{WEIGHTS_FILE} (default: models/, downloaded when absent)")
    batch_size: int = flag(50, "images per Inception forward pass", min=1)
    device: str = flag("auto", "auto, cpu, cuda, cuda:1, ...")
    json: bool = flag(False, "print the results as one JSON object on the last line")
    classifier: Path | None = flag(None, "classifier checkpoint: also report the Frechet distance and KID on "
                                   "its features")
    pr_k: int | None = flag(None, f"k of the k-nearest-neighbour balls of precision, recall, density and coverage, "
                            f"below the smaller set's size (default {PRDC_K}; then skipped for sets of {PRDC_K} or "
                            "fewer images)", min=1)

    def __post_init__(self):
        check_config(self)


def run(cfg: FIDConfig, classifier_distance: Callable[..., dict] | None = None) -> dict:
    """FID, KID and IS of cfg.fake against cfg.real, plus, with cfg.classifier, the distance that
    classifier_distance(real, fake, classifier, pr_k=k) returns (main.py passes
    study.distances.classifier_feature_distance). Without Inception weights and with a classifier,
    the Inception numbers are None (with a warning) instead of an error."""
    for p in (cfg.real, cfg.fake):
        if not Path(p).exists():
            raise CLIError(f"not found: {p}")
    # k against the set sizes before any network runs (fewer than 2 images is refused below, as for FID)
    counts = [int(load_stats(p)["n"]) if _is_npz(p) else len(data.list_images(p)) for p in (cfg.real, cfg.fake)]
    smaller, pr_k = min((n for n in counts if n >= 2), default=math.inf), cfg.pr_k or PRDC_K  # inf: no features
    if smaller <= pr_k and cfg.pr_k is not None:
        raise CLIError(f"--pr-k {pr_k} needs more than {pr_k} images per side; the smaller set has {smaller}")
    pr_k = pr_k if smaller > pr_k else None  # the default k on a tiny set: not computed, with a note at the end
    featureless = next((p for p in (cfg.real, cfg.fake) if _is_npz(p) and "features" not in load_stats(p)), None)
    if featureless is not None and cfg.pr_k is not None:
        raise CLIError(f"--pr-k {cfg.pr_k}: {featureless} holds statistics without features (mu and sigma only); "
                       "precision, recall, density and coverage need each image's features (give the image folder)")
    try:
        res = evaluate(cfg.real, cfg.fake, cfg.inception_weights, cfg.device, cfg.batch_size, pr_k=pr_k)
        res |= {k: res.get(k) for k in PRDC_KEYS}  # null where not computed, after the other numbers
    except InceptionWeightsMissing as e:
        if cfg.classifier is None:
            raise
        print(f"warning: {e}; reporting the classifier feature distance only", file=sys.stderr)
        res = dict(fid=None, kid_mean=None, kid_std=None, is_mean=None, is_std=None, n_real=None, n_fake=None,
                   **dict.fromkeys(PRDC_KEYS))
    if cfg.classifier is not None:
        res |= classifier_distance(cfg.real, cfg.fake, cfg.classifier, pr_k=pr_k)
        res |= {f"cxr_{k}": res.get(f"cxr_{k}") for k in PRDC_KEYS}
        if res["n_real"] is None:
            res["n_real"], res["n_fake"] = res["cxr_n_real"], res["cxr_n_fake"]
    if featureless is not None:
        print(f"note: precision, recall, density and coverage need each image's features, which {featureless} "
              "lacks: not computed", file=sys.stderr)
    elif pr_k is None:
        print(f"note: precision, recall, density and coverage need more than {PRDC_K} images per side (the smaller "
              f"set has {smaller}): not computed", file=sys.stderr)
    return res
