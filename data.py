"""Chest X-ray data: robust image loading, the class-folder layout, and a
resized-tensor cache that keeps PNG decoding out of the training loop.

Layout (the original experiment's, written by `main.py extract`), searched recursively, so a
class folder, a split folder or the whole tree all work:
    DIR/{train_data,validation_data,test_data}/{infiltration,no_finding}/*.png

Every image becomes ONE grey channel, uint8, whatever mode it was stored in
(L, RGB, RGBA, LA, I;16, P). Models see float tensors in [-1, 1]:
    DDPM:              (N, 3, 32, 32), grey repeated to RGB
    GAN / classifier:  (N, 1, S, S)

Sections: reading one image; finding images; a folder as tensors (cached) and the splits;
model inputs; copies and near-copies (the leakage guard). Writing a layout: tools/layout.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from plumbing.configs import CLIError
from plumbing.files import atomic_path


CLASSES = ("infiltration", "no_finding")
LABELS = {"no_finding": 0, "infiltration": 1}  # the positive class is the finding
SPLITS = ("train", "validation", "test")
SPLIT_DIRS = {"train": "train_data", "validation": "validation_data", "test": "test_data"}
# What pytorch-fid reads, so a folder means the same set of images to every command and to it.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
SPLIT_FRACTIONS = {"train": 0.7, "validation": 0.1, "test": 0.2}  # by patient, never by image
MANIFEST_FIELDS = ("image", "class", "split", "patient_id", "source")


# --------------------------------------------------------------------------- reading one image


class UnreadableImage(ValueError):
    """A file that is not a decodable image (corrupt, truncated, wrong format)."""


def load_grey(path: str | os.PathLike) -> np.ndarray:
    """Decode any image mode the NIH release and its copies use (any file of
    IMAGE_EXTENSIONS, the first frame of a multi-page TIFF) into uint8 (H, W).

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


def _image_files(root: Path) -> list[Path]:
    """Image files under root, recursively, sorted; hidden files and folders (atomic
    writes' temporaries among them) are left out, as are files of other extensions."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def list_images(root: str | os.PathLike, class_name: str | None = None) -> list[Path]:
    """All image files under root (IMAGE_EXTENSIONS, any case), recursively, sorted;
    other files are ignored. With class_name, only files inside a folder of that name."""
    root = Path(root)
    if not root.exists():
        raise CLIError(f"data folder not found: {root}")
    if not root.is_dir():
        raise CLIError(f"not a folder: {root}")
    files = _image_files(root)
    if class_name is not None:
        files = [p for p in files if class_name in p.relative_to(root).parts[:-1]]
        if not files:
            raise CLIError(f"no images of class {class_name!r} under {root} (expected a folder named {class_name})")
    if not files:
        raise CLIError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
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
    # Paths are hashed as the bytes the file system holds (os.fsencode): a name that is not
    # UTF-8 (a Latin-1 folder) is a str with surrogates, which str.encode() refuses.
    h = hashlib.sha256(os.fsencode(salt))
    for p in files:
        try:
            st = p.stat()
        except OSError:  # vanished since listing: key it as missing, load_grey will report it
            st = os.stat_result((0,) * 10)
        h.update(os.fsencode(p.resolve()) + f"\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode())
    return h.hexdigest()[:24]


def default_cache_dir() -> Path:
    return Path(os.environ.get("XRAY_CACHE", Path.home() / ".cache" / "xray-synth"))


def training_folder(root: str | os.PathLike) -> tuple[Path, str | None]:
    """The folder to read as a training set, and a note to print: an extract-layout
    root (one holding train_data/) gives its train split only, never its
    validation or test patients; any other folder is itself (no note). The
    generators and the memorisation check train on, or search, this folder."""
    train = Path(root) / SPLIT_DIRS["train"]
    if train.is_dir():
        return train, f"note: {root} is an extract layout: using its train split {train} only"
    return Path(root), None


def load_training_folder(root: str | os.PathLike, size: int, class_name: str | None = None) -> ImageSet:
    """load_folder of training_folder(root): a generator given an extract root trains on
    its train split only, and says so on stdout."""
    folder, note = training_folder(root)
    if note is not None:
        print(note, flush=True)
    return load_folder(folder, size, class_name)


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
    root = Path(root)
    folder = root / SPLIT_DIRS[split]
    if (root / "manifest.csv").is_file() and not (folder.is_dir() and _image_files(folder)):
        raise CLIError(f"the {split} split of {root} is empty{split_hint(root)}")
    if not folder.is_dir():
        raise CLIError(f"{folder} not found: {root} is not a data set written by `python main.py extract` "
                       f"(expected {', '.join(SPLIT_DIRS.values())} inside it)")
    return load_folder(folder, size, class_name)


def split_hint(root: Path) -> str:
    """Why an extract's split can lack images (or a class), from its summary.json: for
    phantoms, how many are needed; "" when the summary does not say."""
    try:
        summary = json.loads((Path(root) / "summary.json").read_text())
        source, total = summary["source"], int(summary["total"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    if source == "phantoms":  # tools/phantoms.py records its minimum (it imports this module, not the reverse)
        return (f": {total} phantoms are too few; extract --phantoms {summary.get('min_phantoms', 10)} or more gives "
                f"every split images of both classes")
    return ": the extract selected no images for it (too few patients in --csv, or on disk under --images)"


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


# --------------------------------------------------------------------------- copies and near-copies: the leakage guard

# Near-copies: area-averaged 8x8 AND 16x16 thumbnails within these RMS differences (grey levels
# 0-255): above what a re-encode or a resize moves them, below the closest distinct images
# (measured in docs/data.md, "Copies and near-copies").
NEAR_RMS = {8: 2.5, 16: 3.5}



def nearest(query: torch.Tensor, reference: torch.Tensor, skip_self: bool = False,
            chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance from each query row (N, D) to its nearest reference row
    (M, D), and its index. skip_self: query IS reference, and row i may not
    pick itself (leave-one-out)."""
    dists, idx = [], []
    for start in range(0, query.shape[0], chunk):
        d = torch.cdist(query[start:start + chunk].double(), reference.double())  # (n, M)
        if skip_self:
            rows = torch.arange(d.shape[0])
            d[rows, rows + start] = math.inf
        m = d.min(dim=1)
        dists.append(m.values)
        idx.append(m.indices)
    return torch.cat(dists).numpy(), torch.cat(idx).numpy()


def digest(*parts) -> str:
    """A short stable hash of strings and bytes (what a study's work depends on)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def pixel_hashes(u8: torch.Tensor) -> list[str]:
    """SHA-256 of each image's decoded pixels (uint8 (N, S, S)): equal hashes, equal images."""
    return [hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for a in u8.numpy()]


def thumbnails(u8: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 (N, S, S) -> (N, k * k) float64: the k x k area average, grey levels 0-255."""
    return F.adaptive_avg_pool2d(u8.unsqueeze(1).double(), k).flatten(1)


# --------------------------------------------------------------------------- the leakage guard


def find_copy(candidates: torch.Tensor, references: torch.Tensor) -> tuple[int, int, str] | None:
    """The first candidate image that equals (same pixels) or nearly equals (both
    thumbnails within NEAR_RMS) a reference image: (candidate, reference, how), or
    None. Both uint8 (N, S, S) at one size."""
    if len(candidates) == 0 or len(references) == 0:
        return None
    exact = {h: j for j, h in reversed(list(enumerate(pixel_hashes(references))))}
    d, near = nearest(thumbnails(candidates, 8), thumbnails(references, 8))
    for i, h in enumerate(pixel_hashes(candidates)):
        if h in exact:
            return i, exact[h], "a copy (identical pixels)"
        j, rms8 = int(near[i]), d[i] / 8  # Euclidean over 64 values -> RMS
        if rms8 <= NEAR_RMS[8]:  # confirmed at the finer scale, so a chance match of coarse shapes is not enough
            diff = thumbnails(candidates[i:i + 1], 16) - thumbnails(references[j:j + 1], 16)
            rms16 = float(diff.pow(2).mean().sqrt())
            if rms16 <= NEAR_RMS[16]:
                return i, j, f"a near-copy (thumbnails {rms8:.2f} / {rms16:.2f} grey levels apart at 8x8 / 16x16)"
    return None


def check_synthetic_folder(folder: Path, root: Path, what: str) -> Path:
    """A folder of synthetic images must hold infiltration/ and no_finding/ with
    images, and lie outside the validation and test splits of the data set `root`."""
    for cls in CLASSES:
        if not (folder / cls).is_dir():
            raise CLIError(f"{what}: no {cls}/ subfolder (the folder must hold "
                           f"{' and '.join(c + '/' for c in CLASSES)})")
        list_images(folder / cls)  # an empty class folder is a one-line error
    for split in ("validation", "test"):
        a, b = folder.resolve(), (root / SPLIT_DIRS[split]).resolve()
        if a == b or b in a.parents or a in b.parents:
            raise CLIError(f"{what} overlaps the {split} split; synthetic images may only train")
    return folder


def check_no_heldout_copies(synthetic: torch.Tensor, names: list[str], heldout: dict, what: str) -> None:
    """Refuse (CLIError naming the first offender) a synthetic set holding a copy or
    near-copy of a held-out image. heldout: {split: (uint8 images, names)}."""
    hits = [(hit, split, ref_names) for split, (x, ref_names) in heldout.items()
            if (hit := find_copy(synthetic, x)) is not None]
    if hits:
        (i, j, how), split, ref_names = min(hits, key=lambda h: h[0][0])
        raise CLIError(f"{what}: {names[i]} is {how} of the {split} image {ref_names[j]}; "
                       "synthetic images may only train, and must not be held-out images")
