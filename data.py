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

Sections, top to bottom: reading one image; finding images; a folder as
tensors (cached) and the splits of the layout; writing the layout (shared by
the NIH extraction in extract.py and the phantoms); synthetic phantoms; the
`extract` command.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import multiprocessing
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import CLIError, atomic_path, save_png

CLASSES = ("infiltration", "no_finding")
LABELS = {"no_finding": 0, "infiltration": 1}  # the positive class is the finding
SPLITS = ("train", "validation", "test")
SPLIT_DIRS = {"train": "train_data", "validation": "validation_data", "test": "test_data"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SPLIT_FRACTIONS = {"train": 0.7, "validation": 0.1, "test": 0.2}  # by patient, never by image
MANIFEST_FIELDS = ("image", "class", "split", "patient_id", "source")


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
    """Hash of everything the cached array depends on: the decoder/resizer version,
    the size, and each file's absolute path (which also fixes its label), byte
    size, modification time and inode (an atomic rewrite gets a new inode even
    within one mtime tick)."""
    h = hashlib.sha256(f"xray-synth cache v2 size={size}".encode())
    for p in files:
        try:
            st = p.stat()
        except OSError:  # vanished since listing: key it as missing, load_grey will report it
            st = os.stat_result((0,) * 10)
        h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode())
    return h.hexdigest()[:24]


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
    if size < 1:
        raise CLIError(f"image size must be at least 1 pixel, got {size}")
    files = list_images(root, class_name)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_file = cache / f"{_cache_key(files, size)}.npz"
    if cache_file.is_file():
        try:
            with np.load(cache_file, allow_pickle=False) as z:
                images, labels = z["images"], z["labels"]
                paths, skipped = [str(p) for p in z["paths"]], [str(p) for p in z["skipped"]]
            # A file of the right name but the wrong content (another writer, a bug) is not trusted.
            if (images.dtype == np.uint8 and images.shape[1:] == (size, size) and len(images) == len(labels)
                    == len(paths) and len(paths) + len(skipped) == len(files)):
                return ImageSet(torch.from_numpy(images), torch.from_numpy(labels), paths, skipped)
        except (OSError, ValueError, KeyError, EOFError):
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


def load_split(root: str | os.PathLike, split: str, size: int, class_name: str | None = None) -> ImageSet:
    """One split of the extract layout, ROOT/<split>_data, via load_folder (cached).
    `split` is train, validation or test."""
    split = split.removesuffix("_data")
    if split not in SPLIT_DIRS:
        raise CLIError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    folder = Path(root) / SPLIT_DIRS[split]
    if not folder.is_dir():
        raise CLIError(f"{folder} not found: {root} is not a data set written by `python main.py extract` "
                       f"(expected {', '.join(SPLIT_DIRS.values())} inside it)")
    return load_folder(folder, size, class_name)


# --------------------------------------------------------------------------- model inputs


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 1, H, W) in [-1, 1]: x / 127.5 - 1."""
    return images.unsqueeze(1).float().div_(127.5).sub_(1.0)


def to_rgb_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 3, H, W) in [-1, 1], grey repeated to RGB (the DDPM's input)."""
    return to_unit_range(images).expand(-1, 3, -1, -1).contiguous()


class XRayDataset(torch.utils.data.Dataset):
    """A torch Dataset over the class-folder layout: (image, label) pairs with the
    input each model family expects. `rgb=True`: (3, S, S) for the DDPM; else
    (1, S, S) for the GAN and the classifier; labels from the folder names.
    The images are decoded and resized once (load_folder's cache), so a
    DataLoader over this costs an index and a conversion per item."""

    def __init__(self, root: str | os.PathLike, size: int, class_name: str | None = None, rgb: bool = False):
        self.set = load_folder(root, size, class_name)
        self.convert = to_rgb_range if rgb else to_unit_range

    def __len__(self) -> int:
        return len(self.set)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.convert(self.set.images[i:i + 1])[0], int(self.set.labels[i])


# --------------------------------------------------------------------------- writing the layout
#
# Shared by the NIH extraction (extract.py) and the phantoms: a list of Entry,
# one per output PNG, is rendered (in a small process pool), then the manifest
# and summary are written and files left over from an earlier, different
# selection are removed, so that the folders hold exactly what the manifest says
# (the loaders read folders, and a stale file could put a patient in two splits).


@dataclass(frozen=True)
class Entry:
    """One image of the layout and how to make it."""

    image: str       # output path relative to OUT: train_data/infiltration/00000001_000.png
    cls: str         # infiltration | no_finding
    split: str       # train | validation | test
    patient_id: str
    source: str      # the source file, or "phantom:seed=S:index=I"
    recipe: tuple    # ("file", path) or ("phantom", seed, index, infiltration)


def entry_path(split: str, cls: str, stem: str) -> str:
    return f"{SPLIT_DIRS[split]}/{cls}/{stem}.png"


def prepare_out_dir(out: str | os.PathLike, create: bool = True) -> Path:
    """OUT as a folder we can write (created unless create=False), or a one-line CLIError."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file, not a folder")
    if not create:
        return out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"cannot create output folder {out}: {e.strerror or e}") from e
    if not os.access(out, os.W_OK):
        raise CLIError(f"output folder {out} is not writable")
    return out


def _is_current(path: Path, size: int) -> bool:
    """An existing output of the right size and mode. Only the header is read:
    outputs are written atomically, so a file that exists is a whole file."""
    try:
        with Image.open(path) as im:
            return im.size == (size, size) and im.mode == "L"
    except (OSError, ValueError, SyntaxError):
        return False


def _render(job: tuple) -> tuple[int, str, str]:
    """Make one output PNG (runs in a worker process). Returns (index, status,
    message), status one of reused, written, unreadable."""
    index, dst, size, recipe = job
    if _is_current(dst, size):
        return index, "reused", ""
    try:
        if recipe[0] == "phantom":
            _, seed, i, infiltration = recipe
            img = make_phantom(np.random.default_rng([seed, i]), size, infiltration)
        else:
            img = center_crop_resize(load_grey(recipe[1]), size)
    except UnreadableImage as e:
        return index, "unreadable", str(e)
    save_png(img, dst)
    return index, "written", ""


def render_entries(entries: list[Entry], out: Path, size: int, workers: int = 2,
                   progress: bool = True) -> tuple[dict[str, int], list[tuple[Entry, str]]]:
    """Write every entry's PNG under out (reusing current ones). Returns the
    count per status and the unreadable entries with their error."""
    from tqdm import tqdm

    jobs = [(i, out / e.image, size, e.recipe) for i, e in enumerate(entries)]
    for d in {(out / e.image).parent for e in entries}:
        d.mkdir(parents=True, exist_ok=True)
    counts = {"written": 0, "reused": 0, "unreadable": 0}
    failed = []
    pool = None
    if workers > 1 and len(jobs) >= 64:  # below that, starting processes costs more than it saves
        # fork: the workers need nothing but this module's functions, already loaded.
        methods = multiprocessing.get_all_start_methods()
        pool = multiprocessing.get_context("fork" if "fork" in methods else None).Pool(workers)
    try:
        results = pool.imap_unordered(_render, jobs, chunksize=8) if pool else map(_render, jobs)
        for i, status, message in tqdm(results, total=len(jobs), desc=f"writing {out}", unit="img",
                                       disable=not progress or len(jobs) < 64, dynamic_ncols=True):
            counts[status] += 1
            if status == "unreadable":
                warnings.warn(f"skipping unreadable image {message}", stacklevel=2)
                failed.append((entries[i], message))
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return counts, failed


def remove_stale(out: Path, keep: set[str]) -> int:
    """Delete images in OUT's split/class folders that the manifest does not list
    (an earlier run with another seed, size or source), and leftover temporaries."""
    removed = 0
    for split_dir in SPLIT_DIRS.values():
        for cls in CLASSES:
            folder = out / split_dir / cls
            if not folder.is_dir():
                continue
            for f in folder.iterdir():
                rel = f"{split_dir}/{cls}/{f.name}"
                if f.is_file() and rel not in keep and (f.suffix.lower() in IMAGE_EXTENSIONS or f.name.startswith(".")):
                    f.unlink()
                    removed += 1
    return removed


def write_manifest(out: Path, entries: list[Entry]) -> None:
    """OUT/manifest.csv: image,class,split,patient_id,source, one row per image."""
    with atomic_path(out / "manifest.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(MANIFEST_FIELDS)
        for e in sorted(entries, key=lambda e: (SPLITS.index(e.split), e.cls, e.image)):
            w.writerow((e.image, e.cls, e.split, e.patient_id, e.source))


def read_manifest(out: str | os.PathLike) -> list[dict]:
    """The rows of OUT/manifest.csv as dicts."""
    path = Path(out) / "manifest.csv"
    if not path.is_file():
        raise CLIError(f"no manifest.csv in {out}")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def count_layout(entries: list[Entry]) -> dict:
    """Images per split and class, and patients per split."""
    counts = {s: {c: 0 for c in CLASSES} for s in SPLITS}
    patients = {s: set() for s in SPLITS}
    for e in entries:
        counts[e.split][e.cls] += 1
        patients[e.split].add(e.patient_id)
    return {"counts": counts, "patients": {s: len(p) for s, p in patients.items()}, "total": len(entries)}


def finish_layout(out: Path, entries: list[Entry], summary: dict) -> dict:
    """Manifest, stale-file cleanup and OUT/summary.json; returns the summary."""
    write_manifest(out, entries)
    summary["removed_stale"] = remove_stale(out, {e.image for e in entries})
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def format_summary(summary: dict) -> str:
    """The summary as a few human-readable lines."""
    lines = []
    cand = summary.get("candidates")
    if cand:
        lines.append("candidates: " + ", ".join(f"{c} {n:,}" for c, n in cand.items()))
    lines.append(f"{'split':<12}{'infiltration':>14}{'no_finding':>12}{'patients':>10}")
    for s in SPLITS:
        c = summary["counts"][s]
        lines.append(f"{s:<12}{c['infiltration']:>14,}{c['no_finding']:>12,}{summary['patients'][s]:>10,}")
    skipped = {k: v for k, v in summary.get("skipped", {}).items() if v}
    if skipped:
        lines.append("skipped rows: " + "; ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in skipped.items()))
    if summary.get("dry_run"):
        lines.append(f"dry run: {summary['total']:,} images selected, nothing written")
    else:
        lines.append(f"{summary['total']:,} images in {summary['out']} ({summary.get('written', 0):,} written, "
                     f"{summary.get('reused', 0):,} reused, {summary.get('removed_stale', 0):,} stale removed)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- synthetic phantoms
#
# A stand-in data set that needs no download, so that every command runs
# offline. These are drawings, not medical images: a density map in which
# bone and soft tissue are bright and air is dark, like a radiograph, built from
# smooth shapes in normalised coordinates (x, y in [-1, 1], x to the image
# right = the patient's left, y down). Sizes below are in those units.


PHANTOM_DRAW_MAX = 128  # px; larger phantoms are drawn at this size and upsampled


def _soft(d: np.ndarray, width: float) -> np.ndarray:
    """Smooth step: ~1 where d > 0 (inside a shape), ~0 where d < 0; `width` is the blur."""
    return 0.5 * (1.0 + np.tanh(d / width))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Unit-variance noise whose blobs are about size/cells pixels wide (bicubic-upsampled white noise)."""
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC))


def _superellipse(x, y, cx, cy, rx, ry, p):
    """> 0 inside the superellipse |dx/rx|^p + |dy/ry|^p = 1, 0 on it, < 0 outside."""
    return 1.0 - (np.abs((x - cx) / rx) ** p + np.abs((y - cy) / ry) ** p) ** (1.0 / p)


def make_phantom(rng: np.random.Generator, size: int, infiltration: bool) -> np.ndarray:
    """One synthetic PA chest radiograph, uint8 (size, size), deterministic for the rng's state.

    Anatomy: body outline and neck, two lung fields (narrow apex, wide base,
    domed diaphragm), mediastinum and trachea, heart shadow on the patient's
    left (image right), spine, posterior and anterior ribs, clavicles, lung
    texture. Variation: rotation, scale, position, lung and heart size, rib
    spacing, exposure (brightness, contrast, gamma), noise. `infiltration` adds
    2-4 patchy, ill-defined opacities inside the lungs, large enough (radius
    >= 5% of the width) to survive downsampling to 32 px.
    """
    # The anatomy is smooth, so it is drawn at most at PHANTOM_DRAW_MAX px and upsampled; only the
    # pixel noise is made at full size. Edges are at least 1.5 px soft so small sizes do not alias.
    full, size = size, min(size, PHANTOM_DRAW_MAX)
    edge = max(0.02, 1.5 / size)
    # Python floats (not NumPy float64 scalars) keep the arithmetic below in float32.
    rot = float(np.deg2rad(rng.normal(0.0, 2.5)))
    scale = float(rng.uniform(0.92, 1.06))
    dx, dy = (float(v) for v in rng.normal(0.0, 0.025, 2))
    lung_w, lung_h = float(rng.uniform(0.25, 0.30)), float(rng.uniform(0.56, 0.64))
    heart_r = float(rng.uniform(0.24, 0.31))

    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1  # pixel centres
    yy, xx = np.meshgrid(c, c, indexing="ij")
    x = (math.cos(rot) * xx + math.sin(rot) * yy) / scale - dx  # (S, S) patient coordinates
    y = (-math.sin(rot) * xx + math.cos(rot) * yy) / scale - dy
    ax = np.abs(x)

    # Body: soft tissue, thicker (brighter) in the middle; the neck on top.
    body = _soft(_superellipse(x, y, 0.0, 0.25, float(rng.uniform(0.86, 0.97)), 1.05, 3.0), edge)
    body = np.maximum(body, _soft(0.2 - ax, edge) * _soft(-0.5 - y, edge))
    dens = body * (0.50 + 0.12 * (1 - x ** 2))

    # Lungs, one per side; the patient's left (image right) sits a little higher.
    top = -0.8 + float(rng.normal(0.0, 0.02))
    lungs = np.zeros_like(x)
    for side in (-1, 1):
        sx = side * x  # distance from the midline towards this lung
        floor = top + 2 * lung_h - (0.05 if side > 0 else 0.0)
        t = np.clip((y - top) / (floor - top), 0, 1)  # 0 at the apex, 1 at the base
        medial = 0.10 + 0.03 * t
        lateral = 0.16 + 2 * lung_w * (0.5 + 0.5 * np.sin(np.pi / 2 * np.sqrt(t)))
        rel = (sx - 0.5 * (medial + lateral)) / (lateral - medial)  # -0.5 medial .. 0.5 lateral
        apex = top + 0.6 * (rel + 0.1) ** 2
        dome = floor - 0.12 + 0.5 * rel ** 2 + 0.1 * rel  # diaphragm: lowest at the costophrenic angle
        inside = np.minimum.reduce([sx - medial, lateral - sx, y - apex, dome - y])
        lungs = np.maximum(lungs, _soft(inside, 1.5 * edge))

    # Heart (on the diaphragm, mostly image right) and mediastinum hide the lung behind them.
    floor = top + 2 * lung_h
    hx = 0.17 + float(rng.normal(0.0, 0.02))
    heart = _soft(_superellipse(x, y, hx, floor - 0.75 * heart_r, 1.25 * heart_r, 0.95 * heart_r, 2.2), 4 * edge)
    aortic_knob = 0.05 * np.exp(-(((y + 0.3) / 0.1) ** 2)) * (x > 0)
    medi = _soft(0.11 + aortic_knob - np.abs(x - 0.01), 2 * edge) * _soft(floor - 0.1 - y, 0.05)
    cover = np.maximum(heart, medi)
    air = lungs * (1 - cover)  # (S, S) in [0, 1]: how much lung is in the beam path
    dens += 0.06 * cover * body
    dens -= 0.1 * _soft(0.035 - np.abs(x - 0.005), edge) * _soft(-0.3 - y, 0.05) * _soft(y + 0.95, edge)  # trachea
    dens += 0.12 * _soft(y - (floor - 0.15), 0.1) * body * (1 - air)  # abdomen below the diaphragm

    # Lung texture: vessels fan out from the hila, so markings are densest there.
    texture = _smooth_noise(rng, size, 14) + 0.6 * _smooth_noise(rng, size, 28)
    hila = np.exp(-(((ax - 0.2) / 0.09) ** 2 + ((y + 0.02) / 0.15) ** 2))
    vessels = np.exp(-(((ax - 0.2) / 0.3) ** 2 + ((y + 0.02) / 0.45) ** 2))
    dens -= air * (0.42 - 0.035 * texture * (0.5 + vessels) - 0.08 * vessels)
    dens += 0.08 * hila * body

    # Bones: spine (seen through the mediastinum), ribs, clavicles.
    dens += 0.035 * _soft(0.065 - ax, edge) * body * (0.75 + 0.25 * np.cos(40 * y)) * (0.4 + 0.6 * cover)
    u = np.clip(ax - 0.08, 0, None)  # distance from the spine
    k = np.arange(10, dtype=np.float32)[:, None, None]  # ten rib pairs, broadcast to (10, S, S)
    y0 = -0.76 + k * rng.uniform(0.105, 0.115, (10, 1, 1)).astype(np.float32)
    half = 0.014 + 0.0015 * k  # lower ribs are thicker
    posterior = y0 - 0.3 * u + 0.85 * u ** 2  # up from the spine, then down laterally
    anterior = y0 + 0.32 + 0.3 * (0.75 - u)  # fainter, falling towards the sternum
    ribs = np.maximum(_soft(half - np.abs(y - posterior), 0.8 * edge).max(0) * _soft(0.86 - ax, 2 * edge)
                      * _soft(ax - 0.07, edge),
                      0.5 * _soft(half - np.abs(y - anterior), edge).max(0) * _soft(0.8 - ax, 2 * edge)
                      * _soft(ax - 0.25, 0.1))
    dens += 0.07 * ribs * body * (0.2 + 0.8 * air)  # bone shows best against air
    clavicle = -0.70 - 0.18 * u + 0.35 * u ** 2
    dens += 0.14 * _soft(0.028 - np.abs(y - clavicle), edge) * _soft(0.62 - ax, 2 * edge) * _soft(ax - 0.07, edge)

    if infiltration:
        # Patchy ill-defined opacities: Gaussian blobs broken up by noise, only where there is lung.
        patch = np.zeros_like(x)
        grain = _smooth_noise(rng, size, 16)
        for _ in range(rng.integers(2, 5)):
            side = int(rng.choice((-1, 1)))
            px = side * (0.14 + lung_w) + float(rng.uniform(-0.6, 0.6)) * lung_w
            py = -0.08 + float(rng.uniform(-0.35, 0.6)) * lung_h
            r = float(rng.uniform(0.10, 0.2))
            patch += float(rng.uniform(0.6, 1.0)) * np.exp(-((x - px) ** 2 + (y - py) ** 2) / (2 * r * r))
        dens += 0.22 * np.clip(patch * (0.75 + 0.35 * grain), 0, 1.2) * air

    # Exposure: quantum noise, a little low-frequency non-uniformity, then brightness/contrast/gamma.
    dens += 0.02 * _smooth_noise(rng, size, 6)
    if full != size:
        dens = np.asarray(Image.fromarray(dens).resize((full, full), Image.Resampling.BICUBIC))
    dens = dens + 0.012 * rng.standard_normal(dens.shape, dtype=np.float32)
    img = float(rng.uniform(0.02, 0.08)) + float(rng.uniform(0.9, 1.15)) * np.clip(dens, 0, 1)
    img = np.clip(img, 0, 1) ** float(rng.uniform(0.85, 1.15))
    return np.round(img * 255).astype(np.uint8)


def phantom_plan(n: int, seed: int = 0) -> list[Entry]:
    """The entries of n phantoms: odd indices infiltration, even no_finding (so an
    odd n has one more no_finding), each phantom its own patient, and per class
    the first 70% train, 10% validation, 20% test. Phantom i's pixels depend only
    on (seed, i, size): growing n keeps the earlier images."""
    per_class = {"no_finding": (n + 1) // 2, "infiltration": n // 2}
    entries = []
    for i in range(n):
        cls = "infiltration" if i % 2 else "no_finding"
        position = (i // 2 + 0.5) / per_class[cls]
        split = "train" if position < 0.7 else "validation" if position < 0.8 else "test"
        entries.append(Entry(entry_path(split, cls, f"phantom_{i:06d}"), cls, split, str(i),
                             f"phantom:seed={seed}:index={i}", ("phantom", seed, i, cls == "infiltration")))
    return entries


def write_phantoms(n: int, out: str | os.PathLike, size: int = 256, seed: int = 0,
                   workers: int = 1, progress: bool = True) -> dict:
    """Write n phantoms (half each class) in the extract layout with manifest.csv
    and summary.json under out; returns the summary dict."""
    if n < 2:
        raise CLIError(f"--phantoms must be at least 2 (one per class), got {n}")
    if size < 8:
        raise CLIError(f"--size must be at least 8, got {size}")
    if seed < 0:
        raise CLIError(f"--seed must be >= 0, got {seed}")
    out = prepare_out_dir(out)
    entries = phantom_plan(n, seed)
    status, failed = render_entries(entries, out, size, workers, progress)
    assert not failed  # phantoms are drawn, never decoded
    summary = {"source": "phantoms", "out": str(out), "size": size, "seed": seed, "dry_run": False,
               "candidates": {c: sum(e.cls == c for e in entries) for c in CLASSES}, "skipped": {},
               **count_layout(entries), "written": status["written"], "reused": status["reused"]}
    return finish_layout(out, entries, summary)


# --------------------------------------------------------------------------- the `extract` command


def _int_at_least(name: str, minimum: int):
    """An argparse type: a whole number >= minimum, with a message naming the option."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be at least {minimum}, got {value}")
        return value
    parse.__name__ = name  # argparse names the type in its messages
    return parse


def add_commands(sub) -> None:
    p = sub.add_parser(
        "extract", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="build the two-class data set (NIH ChestX-ray14 or synthetic phantoms)",
        description="NIH mode: select Infiltration vs No Finding images from the NIH metadata CSV, split them "
                    "70/10/20 by patient, balance each split by random sampling, and write "
                    "OUT/{train,validation,test}_data/{infiltration,no_finding}/*.png resized to --size, with "
                    "OUT/manifest.csv and OUT/summary.json. Phantom mode (--phantoms N): write N synthetic chest "
                    "X-ray phantoms (a stand-in for trying the pipeline, not medical data) in the same layout.")
    p.add_argument("--csv", type=Path, metavar="FILE", help="NIH Data_Entry_2017(_v2020).csv[.gz] or the seed's final_data.csv")
    p.add_argument("--images", type=Path, metavar="DIR",
                   help="image root, searched recursively (images_001/images/*.png ...); optional with --dry-run")
    p.add_argument("--out", type=Path, metavar="DIR", help="output folder (optional with --dry-run)")
    p.add_argument("--per-class", type=_int_at_least("--per-class", 1), default=None, metavar="N",
                   help="at most N images per class, spread 70/10/20 over the splits (None: all that balance allows)")
    p.add_argument("--seed", type=_int_at_least("--seed", 0), default=0, metavar="S", help="seed of the patient split and the balancing sample")
    p.add_argument("--size", type=_int_at_least("--size", 1), default=256, metavar="N", help="output images are SIZE x SIZE, 8-bit grey")
    p.add_argument("--infiltration-only", action="store_true",
                   help="infiltration = Infiltration as the only label, instead of anywhere among the labels")
    p.add_argument("--official-test-list", type=Path, default=None, metavar="FILE",
                   help="NIH test_list.txt: these images form the test split; the rest is split 70:10 by patient")
    p.add_argument("--dry-run", action="store_true", help="select and split from the CSV alone (and --images, if given, to drop files not on disk); write nothing")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line")
    p.add_argument("--phantoms", type=_int_at_least("--phantoms", 1), default=None, metavar="N",
                   help="write N synthetic phantoms in total, split evenly between the two classes "
                        "(odd N: one more no_finding) instead of reading NIH data")
    p.add_argument("--workers", type=_int_at_least("--workers", 1), default=2, metavar="N", help="processes that decode and resize")
    p.set_defaults(func=cmd_extract)


def cmd_extract(args) -> None:
    if args.phantoms is not None:
        clash = [flag for flag, value in (("--csv", args.csv), ("--images", args.images),
                                          ("--per-class", args.per_class),
                                          ("--infiltration-only", args.infiltration_only),
                                          ("--official-test-list", args.official_test_list),
                                          ("--dry-run", args.dry_run)) if value]
        if clash:
            raise CLIError(f"--phantoms cannot be combined with {', '.join(clash)}")
        if args.out is None:
            raise CLIError("--out is required")
        summary = write_phantoms(args.phantoms, args.out, args.size, args.seed, args.workers, progress=not args.json)
    else:
        import extract  # NIH-specific; imported here because it imports this module

        if args.csv is None:
            raise CLIError("--csv is required (or --phantoms N for synthetic data)")
        if not args.dry_run and args.images is None:
            raise CLIError("--images is required (unless --dry-run)")
        if not args.dry_run and args.out is None:
            raise CLIError("--out is required (unless --dry-run)")
        cfg = extract.ExtractConfig(csv=args.csv, images=args.images, out=args.out, per_class=args.per_class,
                                    seed=args.seed, size=args.size, infiltration_only=args.infiltration_only,
                                    official_test_list=args.official_test_list, dry_run=args.dry_run,
                                    workers=args.workers, progress=not args.json)
        summary = extract.run(cfg)
    print(format_summary(summary), flush=True)
    if args.json:
        print(json.dumps(summary, separators=(",", ":")))
