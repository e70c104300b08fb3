"""Chest X-ray data: robust image loading, the class-folder layout, and a
resized-tensor cache that keeps PNG decoding out of the training loop.

Layout (the original experiment's, written by `main.py extract`):
    DIR/{train_data,validation_data,test_data}/{infiltration,no_finding}/*.png
Every loader here searches a folder recursively, so a single class folder, a
split folder or the whole tree all work.

Every image becomes ONE grey channel, uint8, whatever mode it was stored in
(L, RGB, RGBA, LA, I;16, P). Models see float tensors in [-1, 1]:
    DDPM:              (N, 3, 32, 32), grey repeated to RGB
    GAN / classifier:  (N, 1, S, S)

Sections, top to bottom: reading one image; finding images; a folder as
tensors (cached) and the splits of the layout; writing the layout (shared by
the NIH extraction in extract.py and the phantoms in phantoms.py, which both
import this module).
"""

from __future__ import annotations

import csv
import hashlib
import json
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


def files_key(files: list[Path], salt: str) -> str:
    """A cache key for what is computed from `files`: a hash of `salt` (what else
    the result depends on) and each file's absolute path (which also fixes its
    label), byte size, modification time and inode (an atomic rewrite gets a new
    inode even within one mtime tick). Used here and by fid.py's statistics cache."""
    h = hashlib.sha256(salt.encode())
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
    cache_file = cache / f"{files_key(files, f'xray-synth cache v2 size={size}')}.npz"  # v2: decoder/resizer version
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
# Shared by the NIH extraction (extract.py) and the phantoms (phantoms.py): a list of Entry,
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
    recipe: tuple    # (function, *args): the image is function(*args, size), uint8 (size, size)


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


def read_resized(path: str | os.PathLike, size: int) -> np.ndarray:
    """The recipe of an image copied from a file: decoded, centre-cropped, resized."""
    return center_crop_resize(load_grey(path), size)


def _render(job: tuple) -> tuple[int, str, str]:
    """Make one output PNG (runs in a worker process). Returns (index, status,
    message), status one of reused, written, unreadable."""
    index, dst, size, (make, *args) = job
    if _is_current(dst, size):
        return index, "reused", ""
    try:
        img = make(*args, size)
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
        # fork: the workers need nothing but the recipes' functions, already loaded.
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
