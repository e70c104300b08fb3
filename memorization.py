"""Is a synthetic image a copy of a real one? Two checks on decoded pixels.

1. The leakage guard (`check_no_heldout_copies`): a synthetic image must not
   equal or nearly equal an image of the validation or test split, whatever
   its file name or folder; `classify --synthetic` and the study refuse a set
   that holds one, naming the first.
2. The memorisation check (`memorization_check`, the study's and `python main.py
   memorization`): for each synthetic image, the distance to its nearest
   training image, in pixels and in a classifier's features, against the same
   distance for real images the generator never saw (README, "Does synthetic
   data help? The experiment"). Every synthetic image is compared with every
   training image, an exact copy is always flagged, and the flagged rate is
   tested against the rate at which real unseen images are flagged by the same
   rule (the chance rate).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import classify
import data
import stats
from common import CLIError, atomic_path, check_config, flag, save_image_grid

PERCENTILE = 1.0  # flag synthetic images closer than the 1st percentile of real held-out NN distances
# Near-copies: area-averaged 8x8 AND 16x16 thumbnails within these RMS differences (grey levels
# 0-255). Measured at 32 px: a JPEG re-encode, or a copy saved at 128 or 256 px, moves them by at
# most 1.3 / 1.8 (100 NIH images), while the closest two distinct images of the NIH 64 px sample
# are 3.7 / 4.7 apart (phantoms: 7.0 / 9.2). An 8x8 average hash (bits) would not do: it put 53
# pairs of distinct NIH images (10,038 pairs of 600 phantoms) within 2 bits of each other.
NEAR_RMS = {8: 2.5, 16: 3.5}


def ordinal(p: float) -> str:
    """1 -> '1st', 2 -> '2nd', 3 -> '3rd', 11 -> '11th', 5 -> '5th', 0.5 -> '0.5th'."""
    if p != int(p):
        return f"{p:g}th"
    n = int(p)
    return f"{n}{'th' if n % 100 in (11, 12, 13) else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def train_folder(root: Path) -> tuple[Path, str | None]:
    """The folder to read as a training set, and a note to print: an extract-layout
    root (one holding train_data/) gives its train split only, never its
    validation or test patients; any other folder is itself (no note)."""
    train = Path(root) / data.SPLIT_DIRS["train"]
    if train.is_dir():
        return train, f"note: {root} is an extract layout: using its train split {train} only"
    return Path(root), None


# --------------------------------------------------------------------------- nearest image, exact copies


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
    for cls in data.CLASSES:
        if not (folder / cls).is_dir():
            raise CLIError(f"{what}: no {cls}/ subfolder (the folder must hold "
                           f"{' and '.join(c + '/' for c in data.CLASSES)})")
        data.list_images(folder / cls)  # an empty class folder is a one-line error
    for split in ("validation", "test"):
        a, b = folder.resolve(), (root / data.SPLIT_DIRS[split]).resolve()
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


# --------------------------------------------------------------------------- the memorisation check


def _pixels(u8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, S, S) -> (N, S*S) in [0, 1] divided by sqrt(S*S): distances become RMS pixel differences."""
    x = u8.reshape(u8.shape[0], -1).double() / 255.0
    return x / math.sqrt(x.shape[1])


def _unit(f: torch.Tensor) -> torch.Tensor:
    """Rows scaled to length 1: the Euclidean distance d of unit vectors gives cosine distance d^2 / 2."""
    f = torch.as_tensor(f).double()
    return f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)


def leave_one_out_percentile(d: np.ndarray, p: float) -> np.ndarray:
    """For each i, np.percentile(np.delete(d, i), p) (linear interpolation), in
    O(n log n): the k-th smallest of the others is s[k] below i's rank, s[k + 1] from it."""
    n = d.size
    order = np.argsort(d, kind="stable")
    s, rank = d[order], np.empty(n, int)
    rank[order] = np.arange(n)
    pos = p / 100 * (n - 2)  # position among the n - 1 others
    lo = int(math.floor(pos))

    def kth(k: int) -> np.ndarray:
        return np.where(k < rank, s[k], s[min(k + 1, n - 1)])
    return kth(lo) + (pos - lo) * (kth(min(lo + 1, n - 2)) - kth(lo))


def memorization_check(train: torch.Tensor, synthetic: torch.Tensor, heldout: torch.Tensor | None = None,
                       embed=None, percentile: float = PERCENTILE) -> dict:
    """For each synthetic image, the distance to its nearest image among ALL the
    training images, in pixels (RMS difference at a common size) and, when
    `embed` (uint8 -> (N, D)) is given, as cosine distance between classifier
    features. One rule per space: flagged when closer than the threshold, the
    `percentile`-th percentile of the yardstick distances, or an exact copy of
    a training image (identical pixels), whatever the threshold.

    Yardstick: the nearest-training distance of real images the generator never
    saw (`heldout`: other patients, e.g. the validation and test splits); with
    heldout None (a plain folder), each training image's distance to its nearest
    OTHER training image (leave-one-out; nothing leaves the searched set).
    Several films of one patient make those distances small, and so the
    threshold strict: a synthetic image is then flagged only when it is as close
    to a training image as a patient's own other film.

    Chance rate: the rate at which the yardstick images are flagged by the same
    rule, each judged against a threshold made without it (leave-one-out
    percentile), combined over the spaces as the synthetic images are (either
    space flags); p_value: one-sided binomial test of the synthetic rate against it.
    train, synthetic, heldout: uint8 (N, S, S) at one size."""
    spaces = {"pixel": _pixels}
    if embed is not None:
        spaces["feature"] = lambda u8: _unit(embed(u8))
    yard = "heldout" if heldout is not None else "leave-one-out"
    train_hashes = pixel_hashes(train)
    seen = set(train_hashes)
    exact = np.array([h in seen for h in pixel_hashes(synthetic)], bool)
    if heldout is not None:
        exact_ref = np.array([h in seen for h in pixel_hashes(heldout)], bool)
    else:  # a training image with an identical twin in the training set
        counts = Counter(train_hashes)
        exact_ref = np.array([counts[h] > 1 for h in train_hashes], bool)
    out = {"n_synthetic": int(synthetic.shape[0]), "n_train": int(train.shape[0]), "yardstick": yard,
           "n_yardstick": int(exact_ref.size), "percentile": percentile, "n_exact_copies": int(exact.sum())}
    flagged, chance = exact.copy(), exact_ref.copy()
    for name, f in spaces.items():
        t = f(train)
        d_syn, i_syn = nearest(f(synthetic), t)
        d_ref = nearest(f(heldout), t)[0] if heldout is not None else nearest(t, t, skip_self=True)[0]
        if name == "feature":
            d_syn, d_ref = d_syn**2 / 2, d_ref**2 / 2  # cosine distance 1 - cos
        threshold = float(np.percentile(d_ref, percentile))
        hit = (d_syn < threshold) | exact
        chance_hit = (d_ref < leave_one_out_percentile(d_ref, percentile)) | exact_ref
        flagged |= hit
        chance |= chance_hit
        out[name] = {"threshold": threshold, "n_flagged": int(hit.sum()), "flagged_fraction": float(hit.mean()),
                     "chance_fraction": float(chance_hit.mean()), "synthetic_median": float(np.median(d_syn)),
                     "yardstick_median": float(np.median(d_ref)), "synthetic_min": float(d_syn.min()),
                     "yardstick_min": float(d_ref.min())}
        if name == "pixel":
            out["_pixel_distance"], out["_pixel_index"] = d_syn, i_syn
    out.update(n_flagged=int(flagged.sum()), flagged_fraction=float(flagged.mean()),
               chance_fraction=float(chance.mean()),
               p_value=stats.binomial_greater_p(int(flagged.sum()), int(flagged.size), float(chance.mean())))
    return out


def save_closest_pairs(train: torch.Tensor, synthetic: torch.Tensor, result: dict, path: Path, k: int = 8) -> None:
    """Grid of the k synthetic images closest to a training image (top row) above
    their nearest training image (bottom row)."""
    order = np.argsort(result["_pixel_distance"])[:k]
    pairs = torch.cat([synthetic[order], train[result["_pixel_index"][order]]])  # (2k, S, S)
    save_image_grid(pairs.unsqueeze(1).float() / 127.5 - 1, path, nrow=len(order))


def public(result: dict) -> dict:
    return {k: v for k, v in result.items() if not k.startswith("_")}


# --------------------------------------------------------------------------- the check on two folders (`memorization`)


@dataclass
class MemorizationConfig:
    """The options of `python main.py memorization`."""

    train: Path = flag(help="extract-layout root (its train split is searched; validation + test are the "
                            "yardstick) or a plain folder (leave-one-out yardstick)")
    synthetic: Path = flag(help="folder of synthetic images")
    size: int = flag(32, "common resolution for the pixel distance", min=1)
    classifier: Path | None = flag(None, "classifier checkpoint for the feature distance (default: pixels only)")
    out: Path | None = flag(None, "write memorization.json and closest_pairs.png here")

    def __post_init__(self):
        check_config(self)


def run(cfg: MemorizationConfig) -> dict:
    """The check on its own: the result of memorization_check (without the
    per-image arrays), and under "train" what served as training and reference set."""
    data.list_images(cfg.synthetic)  # a missing or empty --synthetic fails now, before the training set is read
    folder, note = train_folder(cfg.train)
    train = data.load_folder(folder, cfg.size).images
    heldout = None
    if note is not None:  # extract layout: other patients are the yardstick
        print(note, flush=True)
        heldout = torch.cat([data.load_split(cfg.train, s, cfg.size).images for s in ("validation", "test")])
        how = "train split; yardstick: validation + test splits"
    else:
        if len(train) < 10:
            raise CLIError(f"--train {cfg.train}: need at least 10 images for a leave-one-out yardstick")
        how = "the whole folder; yardstick: leave-one-out nearest neighbours within it"
    synthetic = data.load_folder(cfg.synthetic, cfg.size).images
    embed = None
    if cfg.classifier is not None:
        model, _ = classify.load_classifier(cfg.classifier)
        embed = lambda u8: classify.embed(model, u8)  # noqa: E731
    res = memorization_check(train, synthetic, heldout, embed)
    if cfg.out is not None:
        save_closest_pairs(train, synthetic, res, cfg.out / "closest_pairs.png")
        with atomic_path(cfg.out / "memorization.json") as tmp:
            tmp.write_text(json.dumps(public(res), indent=1))
    return {**public(res), "train": how}
