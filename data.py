"""Chest X-ray data: robust image loading, the class-folder layout, and a
resized-tensor cache that keeps PNG decoding out of the training loop.

Layout (the seed's, written by `main.py extract`):
    DIR/{train_data,validation_data,test_data}/{infiltration,no_finding}/*.png
Every loader here searches a folder recursively, so a single class folder, a
split folder or the whole tree all work.

Every image becomes ONE grey channel, uint8, whatever mode it was stored in
(L, RGB, RGBA, LA, I;16, P). Models see float tensors in [-1, 1]:
    DDPM:              (N, 3, 32, 32), grey repeated to RGB
    GAN / classifier:  (N, 1, S, S)
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile

from common import CLIError, atomic_path

CLASSES = ("infiltration", "no_finding")
LABELS = {"no_finding": 0, "infiltration": 1}  # the positive class is the finding
SPLITS = ("train", "validation", "test")
SPLIT_DIRS = {"train": "train_data", "validation": "validation_data", "test": "test_data"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


# --------------------------------------------------------------------------- reading one image


class UnreadableImage(ValueError):
    """A file that is not a decodable image (corrupt, truncated, wrong format)."""


def load_grey(path: str | os.PathLike) -> np.ndarray:
    """Decode any PNG/JPEG mode the NIH release and its copies use into uint8 (H, W).

    16-bit images are scaled to the 8-bit range (divide by 257, i.e. 65535 -> 255);
    alpha is dropped, not composited; palette images go through their palette.
    """
    try:
        with Image.open(path) as im:
            im.load()  # force the full decode here: truncated files fail now, not mid-epoch
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                a = np.asarray(im, dtype=np.float64)
                top = 65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0
                return np.clip(np.round(a * (255.0 / top)), 0, 255).astype(np.uint8)
            if mode == "F":
                a = np.asarray(im, dtype=np.float64)
                return np.clip(np.round(a), 0, 255).astype(np.uint8)
            if mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            if im.mode in ("RGBA", "LA", "PA"):
                im = im.convert(im.mode[:-1] or "L")  # drop alpha, keep the colour/grey values
            return np.asarray(im.convert("L"), dtype=np.uint8).copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UnreadableImage(f"{path}: {e}") from e


def center_crop_resize(img: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square (aspect kept), then resize to size x size.
    Downsizing uses PIL's antialiased BOX-then-bicubic (reduce + BICUBIC)."""
    h, w = img.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    im = Image.fromarray(img[top:top + s, left:left + s])
    if s != size:
        im = im.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0 if s >= 3 * size else None)
    return np.asarray(im, dtype=np.uint8)


# --------------------------------------------------------------------------- finding images


def list_images(root: str | os.PathLike, class_name: str | None = None) -> list[Path]:
    """All image files under root, recursively, sorted; non-image files are ignored.
    With class_name, only files inside a folder of that name."""
    root = Path(root)
    if not root.exists():
        raise CLIError(f"data folder not found: {root}")
    if not root.is_dir():
        raise CLIError(f"not a folder: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if class_name is not None:
        files = [p for p in files if class_name in p.relative_to(root).parts[:-1]]
        if not files:
            raise CLIError(f"no images of class {class_name!r} under {root} (expected a folder named {class_name})")
    if not files:
        raise CLIError(f"no images (.png, .jpg) found under {root}")
    return files


def label_of(path: Path) -> int:
    """1 for infiltration, 0 for no_finding, -1 when no folder names a class."""
    for part in reversed(path.parts[:-1]):
        if part in LABELS:
            return LABELS[part]
    return -1


# --------------------------------------------------------------------------- a folder as tensors, cached


@dataclass
class ImageSet:
    """A folder of images resized to one size, held in memory."""

    images: torch.Tensor  # (N, S, S) uint8
    labels: torch.Tensor  # (N,) int64: 1 infiltration, 0 no_finding, -1 unknown
    paths: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.images.shape[0]


def _cache_key(files: list[Path], size: int) -> str:
    h = hashlib.sha256(f"v1 size={size}".encode())
    for p in files:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def default_cache_dir() -> Path:
    return Path(os.environ.get("XRAY_CACHE", Path.home() / ".cache" / "xray-synth"))


def load_folder(root: str | os.PathLike, size: int, class_name: str | None = None,
                cache_dir: str | os.PathLike | None = None, progress: bool = True) -> ImageSet:
    """Every image under root (optionally one class), centre-cropped and resized
    to size x size, as a uint8 tensor. The result is cached as one .npz keyed by
    the file list, sizes and modification times, so the next run (and the next
    epoch) reads one array instead of decoding thousands of PNGs.

    Unreadable files are skipped with a warning naming each and a count at the end.
    """
    files = list_images(root, class_name)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_file = cache / f"{_cache_key(files, size)}.npz"
    if cache_file.is_file():
        try:
            with np.load(cache_file, allow_pickle=False) as z:
                return ImageSet(torch.from_numpy(z["images"]), torch.from_numpy(z["labels"]),
                                [str(p) for p in z["paths"]], [str(p) for p in z["skipped"]])
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is rebuilt below

    from tqdm import tqdm

    images, labels, paths, skipped = [], [], [], []
    for p in tqdm(files, desc=f"loading {Path(root).name} at {size}px", disable=not progress or len(files) < 200,
                  dynamic_ncols=True):
        try:
            images.append(center_crop_resize(load_grey(p), size))
        except UnreadableImage as e:
            warnings.warn(f"skipping unreadable image {e}", stacklevel=2)
            skipped.append(str(p))
            continue
        labels.append(label_of(p))
        paths.append(str(p))
    if skipped:
        print(f"skipped {len(skipped)} unreadable image(s) under {root}", file=sys.stderr)
    if not images:
        raise CLIError(f"none of the {len(files)} image(s) under {root} could be read")
    arr = np.stack(images)
    lab = np.asarray(labels, dtype=np.int64)
    try:
        with atomic_path(cache_file) as tmp, open(tmp, "wb") as f:
            np.savez(f, images=arr, labels=lab, paths=np.asarray(paths), skipped=np.asarray(skipped, dtype=str))
    except OSError:
        pass  # a read-only cache location only costs speed
    return ImageSet(torch.from_numpy(arr), torch.from_numpy(lab), paths, skipped)


# --------------------------------------------------------------------------- model inputs


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 1, H, W) in [-1, 1]: x / 127.5 - 1."""
    return images.unsqueeze(1).float().div_(127.5).sub_(1.0)


def to_rgb_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 3, H, W) in [-1, 1], grey repeated to RGB (the DDPM's input)."""
    return to_unit_range(images).expand(-1, 3, -1, -1).contiguous()
