"""Is a synthetic image a copy of a real one? Two checks on decoded pixels.

1. The leakage guard (data.check_no_heldout_copies): a synthetic image must not
   equal or nearly equal an image of the validation or test split; `classify
   --synthetic` and the study refuse a set that holds one, naming the first.
2. The memorisation check (`memorization_check`, the study's and `python main.py
   memorization`): each synthetic image's distance to its nearest training image,
   in pixels and in a classifier's features, against the same distance for real
   images the generator never saw (the yardstick). An image closer than the
   yardstick's PERCENTILE-th percentile, or an exact copy, is flagged; a
   permutation test (`permutation_p`) asks whether more synthetic images are
   flagged than exchangeable real ones would be. docs/experiment.md, "Memorisation".
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import classify
import data
from plumbing.configs import check_config, CLIError, flag
from plumbing.files import atomic_path, check_output, save_image_grid

PERCENTILE = 1.0  # flag synthetic images closer than the 1st percentile of real held-out NN distances
N_PERMUTATIONS = 999  # re-splits of the permutation test: p-values in steps of 0.001
FALSE_POSITIVE_RATE = 0.05  # memorisation is reported at p < this: the rate for a generator that copies nothing
OUTPUTS = ("memorization.json", "closest_pairs.png")  # what `memorization --out DIR` writes into DIR



def ordinal(p: float) -> str:
    """1 -> '1st', 2 -> '2nd', 3 -> '3rd', 11 -> '11th', 5 -> '5th', 0.5 -> '0.5th'."""
    if p != int(p):
        return f"{p:g}th"
    n = int(p)
    return f"{n}{'th' if n % 100 in (11, 12, 13) else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


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


def flagged_fraction(d_ref, d_syn, exact_syn, percentile: float) -> np.ndarray:
    """Share of synthetic images (d_syn (..., n, spaces), exact_syn (..., n)) below the percentile-th
    percentile of d_ref (..., m, spaces) in any space, or exact copies."""
    threshold = np.percentile(d_ref, percentile, axis=-2)  # (..., spaces)
    return ((d_syn < threshold[..., None, :]).any(axis=-1) | exact_syn).mean(axis=-1)


def permutation_p(d_ref, d_syn, exact_ref, exact_syn, percentile: float = PERCENTILE,
                  n_perm: int = N_PERMUTATIONS, seed: int = 0) -> float:
    """One-sided permutation p-value of flagged_fraction: yardstick and synthetic images
    (distances and exact flags together) pooled, re-split at random into groups of the
    observed sizes, the threshold and the synthetic share recomputed;
    p = (1 + #{re-split share >= observed}) / (1 + n_perm)."""
    d, exact = np.concatenate([d_ref, d_syn]), np.concatenate([exact_ref, exact_syn])  # (n, spaces), (n,)
    observed, n_ref = flagged_fraction(d_ref, d_syn, exact_syn, percentile), len(d_ref)
    rng = np.random.default_rng(seed)
    shares = []
    for k in np.diff(np.r_[0:n_perm:100, n_perm]):  # 100 re-splits at a time: memory stays bounded
        ref = rng.permuted(np.tile(np.arange(len(d)), (k, 1)), axis=1)[:, :n_ref]  # (k, n_ref): each row a re-split
        threshold = np.percentile(d[ref], percentile, axis=1)  # (k, spaces)
        hit = (d < threshold[:, None, :]).any(axis=-1) | exact  # (k, n): all images; the yardstick's are removed
        shares.append((hit.sum(axis=1) - np.take_along_axis(hit, ref, axis=1).sum(axis=1)) / (len(d) - n_ref))
    return float((1 + (np.concatenate(shares) >= observed).sum()) / (1 + n_perm))


def memorization_check(train: torch.Tensor, synthetic: torch.Tensor, heldout: torch.Tensor | None = None,
                       embed=None, percentile: float = PERCENTILE) -> dict:
    """Each synthetic image's distance to its nearest image among ALL training images: RMS
    pixel difference, and with `embed` (uint8 -> (N, D)) the cosine distance of features.
    Flagged in a space when closer than the `percentile`-th percentile of the yardstick's
    distances, or an exact copy of a training image. Yardstick: `heldout`'s nearest-training
    distances (real images of other patients), or with None each training image's distance
    to its nearest OTHER one. chance_fraction: the yardstick's own flagged share, each judged
    without itself; p_value: permutation_p. train, synthetic, heldout: uint8 (N, S, S)."""
    spaces = {"pixel": _pixels}
    if embed is not None:
        spaces["feature"] = lambda u8: _unit(embed(u8))
    yard = "heldout" if heldout is not None else "leave-one-out"
    train_hashes = data.pixel_hashes(train)
    seen = set(train_hashes)
    exact = np.array([h in seen for h in data.pixel_hashes(synthetic)], bool)
    if heldout is not None:
        exact_ref = np.array([h in seen for h in data.pixel_hashes(heldout)], bool)
    else:  # a training image with an identical twin in the training set
        counts = Counter(train_hashes)
        exact_ref = np.array([counts[h] > 1 for h in train_hashes], bool)
    out = {"n_synthetic": int(synthetic.shape[0]), "n_train": int(train.shape[0]), "yardstick": yard,
           "n_yardstick": int(exact_ref.size), "percentile": percentile, "n_exact_copies": int(exact.sum())}
    flagged, chance, d_syns, d_refs = exact.copy(), exact_ref.copy(), [], []
    for name, f in spaces.items():
        t = f(train)
        d_syn, i_syn = data.nearest(f(synthetic), t)
        d_ref = data.nearest(f(heldout), t)[0] if heldout is not None else data.nearest(t, t, skip_self=True)[0]
        if name == "feature":
            d_syn, d_ref = d_syn**2 / 2, d_ref**2 / 2  # cosine distance 1 - cos
        threshold = float(np.percentile(d_ref, percentile))
        hit = (d_syn < threshold) | exact
        chance_hit = (d_ref < leave_one_out_percentile(d_ref, percentile)) | exact_ref
        flagged |= hit
        chance |= chance_hit
        d_syns.append(d_syn)
        d_refs.append(d_ref)
        out[name] = {"threshold": threshold, "n_flagged": int(hit.sum()), "flagged_fraction": float(hit.mean()),
                     "chance_fraction": float(chance_hit.mean()), "synthetic_median": float(np.median(d_syn)),
                     "yardstick_median": float(np.median(d_ref)), "synthetic_min": float(d_syn.min()),
                     "yardstick_min": float(d_ref.min())}
        if name == "pixel":
            out["_pixel_distance"], out["_pixel_index"] = d_syn, i_syn
    p = permutation_p(np.stack(d_refs, axis=1), np.stack(d_syns, axis=1), exact_ref, exact, percentile)
    out.update(n_flagged=int(flagged.sum()), flagged_fraction=float(flagged.mean()),
               chance_fraction=float(chance.mean()), p_value=p, test="permutation", n_permutations=N_PERMUTATIONS,
               false_positive_rate=FALSE_POSITIVE_RATE)
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

    train: Path = flag(help="extract-layout root (its train split is searched; the test split is the "
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
    if cfg.out is not None:  # before any image is read
        check_output(cfg.out, "--out", folder=True)
        for name in OUTPUTS:
            check_output(cfg.out / name, "--out", folder=False)
    data.list_images(cfg.synthetic)  # a missing or empty --synthetic fails now, before the training set is read
    folder, note = data.training_folder(cfg.train)
    train = data.load_folder(folder, cfg.size).images
    heldout = None
    if note is not None:  # extract layout: other patients are the yardstick
        print(note, flush=True)
        heldout = data.load_split(cfg.train, "test", cfg.size).images  # validation chose things: not unseen
        how = "train split; yardstick: test split"
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
        save_closest_pairs(train, synthetic, res, cfg.out / OUTPUTS[1])
        with atomic_path(cfg.out / OUTPUTS[0]) as tmp:
            tmp.write_text(json.dumps(public(res), indent=1))
    return {**public(res), "train": how}
