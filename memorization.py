"""Is a synthetic image a copy of a training image? The memorisation check of
the study (study.py) and of `python main.py memorization`.

For each synthetic image, the distance to its nearest training image, in pixels
and in a classifier's features, against the same distance for real images of
other patients (README, "Does synthetic data help? The experiment"): a generator
that memorised its training set puts synthetic images closer to a training
image than a new patient's image ever is.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import classify
import data
from common import CLIError, atomic_path, check_config, flag, save_image_grid

PERCENTILE = 1.0  # flag synthetic images closer than the 1st percentile of real held-out NN distances
OUTPUTS = ("memorization.json", "closest_pairs.png")  # what `memorization --out DIR` writes into DIR


# --------------------------------------------------------------------------- nearest training image


def nearest(query: torch.Tensor, reference: torch.Tensor, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance from each query row (N, D) to its nearest reference row (M, D), and its index."""
    dists, idx = [], []
    for q in query.split(chunk):
        d = torch.cdist(q.double(), reference.double())  # (n, M)
        m = d.min(dim=1)
        dists.append(m.values)
        idx.append(m.indices)
    return torch.cat(dists).numpy(), torch.cat(idx).numpy()


def _pixels(u8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, S, S) -> (N, S*S) in [0, 1] divided by sqrt(S*S): distances become RMS pixel differences."""
    x = u8.reshape(u8.shape[0], -1).double() / 255.0
    return x / math.sqrt(x.shape[1])


def _unit(f: torch.Tensor) -> torch.Tensor:
    """Rows scaled to length 1: the Euclidean distance d of unit vectors gives cosine distance d^2 / 2."""
    f = torch.as_tensor(f).double()
    return f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)


def memorization_check(train: torch.Tensor, synthetic: torch.Tensor, reference: torch.Tensor,
                       embed=None, percentile: float = PERCENTILE) -> dict:
    """For each synthetic image, the distance to its nearest TRAINING image, in
    pixels (RMS difference at a common size) and, when `embed` (uint8 -> (N, D))
    is given, as cosine distance between classifier features. The yardstick is
    the same nearest-train distance of real held-out images (`reference`: other
    patients, so no copies): a synthetic image closer to a training image than
    the `percentile`-th percentile of those is flagged as a possible copy.

    train, synthetic, reference: uint8 (N, S, S) at one size.
    """
    spaces = {"pixel": _pixels}
    if embed is not None:
        spaces["feature"] = lambda u8: _unit(embed(u8))
    out = {"n_synthetic": int(synthetic.shape[0]), "n_train": int(train.shape[0]),
           "n_reference": int(reference.shape[0]), "percentile": percentile}
    flagged = np.zeros(synthetic.shape[0], bool)
    for name, f in spaces.items():
        t = f(train)
        d_syn, i_syn = nearest(f(synthetic), t)
        d_ref, _ = nearest(f(reference), t)
        if name == "feature":
            d_syn, d_ref = d_syn**2 / 2, d_ref**2 / 2  # cosine distance 1 - cos
        threshold = float(np.percentile(d_ref, percentile))
        hit = d_syn < threshold
        flagged |= hit
        out[name] = {"threshold": threshold, "n_flagged": int(hit.sum()), "flagged_fraction": float(hit.mean()),
                     "synthetic_median": float(np.median(d_syn)), "reference_median": float(np.median(d_ref)),
                     "synthetic_min": float(d_syn.min()), "reference_min": float(d_ref.min())}
        if name == "pixel":
            out["_pixel_distance"], out["_pixel_index"] = d_syn, i_syn
    # A copy in either space is flagged: for patient privacy a false alarm is cheaper than a miss.
    out["n_flagged"], out["flagged_fraction"] = int(flagged.sum()), float(flagged.mean())
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

    train: Path = flag(help="extract-layout root (train split vs test split) or a plain folder (20%% held out)")
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
        data.check_output(cfg.out, "--out", folder=True)
        for name in OUTPUTS:
            data.check_output(cfg.out / name, "--out", folder=False)
    data.list_images(cfg.synthetic)  # a missing or empty --synthetic fails now, before the training set is read
    if (cfg.train / data.SPLIT_DIRS["train"]).is_dir():  # extract layout: train split vs the test split's patients
        train = data.load_split(cfg.train, "train", cfg.size).images
        reference = data.load_split(cfg.train, "test", cfg.size).images
        how = "train split; reference: test split"
    else:  # a plain folder: a random 20% stands in for the unseen patients
        images = data.load_folder(cfg.train, cfg.size).images
        if len(images) < 10:
            raise CLIError(f"--train {cfg.train}: need at least 10 images to hold out a reference set")
        perm = torch.from_numpy(np.random.default_rng(0).permutation(len(images)))
        cut = len(images) // 5
        train, reference = images[perm[cut:]], images[perm[:cut]]
        how = "80% of the folder; reference: the held-out 20% (seed 0)"
    synthetic = data.load_folder(cfg.synthetic, cfg.size).images
    embed = None
    if cfg.classifier is not None:
        model, _ = classify.load_classifier(cfg.classifier)
        embed = lambda u8: classify.embed(model, u8)  # noqa: E731
    res = memorization_check(train, synthetic, reference, embed)
    if cfg.out is not None:
        save_closest_pairs(train, synthetic, res, cfg.out / OUTPUTS[1])
        with atomic_path(cfg.out / OUTPUTS[0]) as tmp:
            tmp.write_text(json.dumps(public(res), indent=1))
    return {**public(res), "train": how}
