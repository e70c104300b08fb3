"""Synthetic chest radiograph phantoms: a stand-in data set that needs no
download, so that every command runs offline.

These are drawings, not medical images: a density map in which bone and soft
tissue are bright and air is dark, like a radiograph, built from smooth shapes
in normalised coordinates (x, y in [-1, 1], x to the image right = the
patient's left, y down). Sizes and positions below are in those units;
densities are added to the map, where 1 is white. `write_phantoms` puts them in
the extract layout (data.py), half of them with infiltration-like opacities.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from data import CLASSES, SPLITS

from tools.layout import Entry, count_layout, entry_path, finish_layout, open_out_dir, render_entries
from plumbing.configs import CLIError

PHANTOM_DRAW_MAX = 128  # px; larger phantoms are drawn at this size and upsampled

# How one patient differs from the next (drawn once per phantom).
ROTATION_SD_DEG = 2.5              # in-plane rotation
SCALE_RANGE = (0.92, 1.06)         # patient size relative to the field of view
SHIFT_SD = 0.025                   # position in x and y
BODY_HALF_WIDTH_RANGE = (0.86, 0.97)
LUNG_WIDTH_RANGE = (0.25, 0.30)    # lung_w: a lung's base is 0.16 + 2 lung_w from the midline
LUNG_HEIGHT_RANGE = (0.56, 0.64)   # lung_h: half the apex-to-diaphragm height
HEART_RADIUS_RANGE = (0.24, 0.31)
RIB_SPACING_RANGE = (0.105, 0.115)  # vertical distance between neighbouring ribs
N_RIBS = 10                        # rib pairs

# Infiltration: 2-4 blobs of this radius and weight per image.
OPACITY_COUNT = (2, 5)             # rng.integers bounds: 2, 3 or 4
OPACITY_RADIUS_RANGE = (0.10, 0.2)
OPACITY_WEIGHT_RANGE = (0.6, 1.0)
OPACITY_DENSITY = 0.22

# Exposure: the detector's response, drawn per image.
QUANTUM_NOISE_SD = 0.012           # per pixel, at full size
BRIGHTNESS_RANGE = (0.02, 0.08)    # offset
CONTRAST_RANGE = (0.9, 1.15)       # gain
GAMMA_RANGE = (0.85, 1.15)


# --------------------------------------------------------------------------- drawing helpers


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


# --------------------------------------------------------------------------- one phantom


def make_phantom(rng: np.random.Generator, size: int, infiltration: bool) -> np.ndarray:
    """One synthetic PA chest radiograph, uint8 (size, size), deterministic for the rng's state.

    Anatomy: body and neck, lung fields, mediastinum and trachea, heart shadow on the patient's left
    (image right), spine, ribs, clavicles, lung texture; varied in pose, size, rib spacing, exposure
    and noise. `infiltration` adds 2-4 patchy opacities inside the lungs, radius >= 5% of the width
    so that they survive downsampling to 32 px.
    """
    # The anatomy is smooth, so it is drawn at most at PHANTOM_DRAW_MAX px and upsampled; only the
    # pixel noise is made at full size. Edges are at least 1.5 px soft so small sizes do not alias.
    full, size = size, min(size, PHANTOM_DRAW_MAX)
    edge = max(0.02, 1.5 / size)
    # Python floats (not NumPy float64 scalars) keep the arithmetic below in float32.
    rot = float(np.deg2rad(rng.normal(0.0, ROTATION_SD_DEG)))
    scale = float(rng.uniform(*SCALE_RANGE))
    dx, dy = (float(v) for v in rng.normal(0.0, SHIFT_SD, 2))
    lung_w, lung_h = float(rng.uniform(*LUNG_WIDTH_RANGE)), float(rng.uniform(*LUNG_HEIGHT_RANGE))
    heart_r = float(rng.uniform(*HEART_RADIUS_RANGE))

    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1  # pixel centres
    yy, xx = np.meshgrid(c, c, indexing="ij")
    x = (math.cos(rot) * xx + math.sin(rot) * yy) / scale - dx  # (S, S) patient coordinates
    y = (-math.sin(rot) * xx + math.cos(rot) * yy) / scale - dy
    ax = np.abs(x)

    # Body: a squarish superellipse (centre y 0.25, half height 1.05, p 3) of soft tissue,
    # density 0.50 plus up to 0.12 in the thicker middle; the neck (half width 0.2) on top.
    body = _soft(_superellipse(x, y, 0.0, 0.25, float(rng.uniform(*BODY_HALF_WIDTH_RANGE)), 1.05, 3.0), edge)
    body = np.maximum(body, _soft(0.2 - ax, edge) * _soft(-0.5 - y, edge))
    dens = body * (0.50 + 0.12 * (1 - x ** 2))

    # Lungs, one per side; the patient's left (image right) sits a little higher.
    top = -0.8 + float(rng.normal(0.0, 0.02))  # the apices
    lungs = np.zeros_like(x)
    for side in (-1, 1):
        sx = side * x  # distance from the midline towards this lung
        floor = top + 2 * lung_h - (0.05 if side > 0 else 0.0)  # the diaphragm at the lateral edge
        t = np.clip((y - top) / (floor - top), 0, 1)  # 0 at the apex, 1 at the base
        medial = 0.10 + 0.03 * t  # the mediastinal border, widening downwards
        # the rib cage: narrow at the apex, wide at the base
        lateral = 0.16 + 2 * lung_w * (0.5 + 0.5 * np.sin(np.pi / 2 * np.sqrt(t)))
        rel = (sx - 0.5 * (medial + lateral)) / (lateral - medial)  # -0.5 medial .. 0.5 lateral
        apex = top + 0.6 * (rel + 0.1) ** 2  # a rounded apex, highest just medial of centre
        dome = floor - 0.12 + 0.5 * rel ** 2 + 0.1 * rel  # diaphragm: lowest at the costophrenic angle
        inside = np.minimum.reduce([sx - medial, lateral - sx, y - apex, dome - y])
        lungs = np.maximum(lungs, _soft(inside, 1.5 * edge))

    # Heart (on the diaphragm, mostly image right) and mediastinum hide the lung behind them.
    floor = top + 2 * lung_h
    hx = 0.17 + float(rng.normal(0.0, 0.02))  # heart centre, right of the midline
    heart = _soft(_superellipse(x, y, hx, floor - 0.75 * heart_r, 1.25 * heart_r, 0.95 * heart_r, 2.2), 4 * edge)
    aortic_knob = 0.05 * np.exp(-(((y + 0.3) / 0.1) ** 2)) * (x > 0)  # a bulge of the left mediastinal border
    medi = _soft(0.11 + aortic_knob - np.abs(x - 0.01), 2 * edge) * _soft(floor - 0.1 - y, 0.05)
    cover = np.maximum(heart, medi)
    air = lungs * (1 - cover)  # (S, S) in [0, 1]: how much lung is in the beam path
    dens += 0.06 * cover * body  # heart and great vessels: denser than the chest wall
    dens -= 0.1 * _soft(0.035 - np.abs(x - 0.005), edge) * _soft(-0.3 - y, 0.05) * _soft(y + 0.95, edge)  # trachea
    dens += 0.12 * _soft(y - (floor - 0.15), 0.1) * body * (1 - air)  # abdomen below the diaphragm

    # Lung texture: vessels fan out from the hila (x +-0.2, y -0.02), so markings are densest there.
    texture = _smooth_noise(rng, size, 14) + 0.6 * _smooth_noise(rng, size, 28)
    hila = np.exp(-(((ax - 0.2) / 0.09) ** 2 + ((y + 0.02) / 0.15) ** 2))
    vessels = np.exp(-(((ax - 0.2) / 0.3) ** 2 + ((y + 0.02) / 0.45) ** 2))
    dens -= air * (0.42 - 0.035 * texture * (0.5 + vessels) - 0.08 * vessels)  # air: -0.42, less where vessels are
    dens += 0.08 * hila * body

    # Bones: spine (half width 0.065, vertebrae every 2 pi / 40, seen through the mediastinum), ribs, clavicles.
    dens += 0.035 * _soft(0.065 - ax, edge) * body * (0.75 + 0.25 * np.cos(40 * y)) * (0.4 + 0.6 * cover)
    u = np.clip(ax - 0.08, 0, None)  # distance from the spine
    k = np.arange(N_RIBS, dtype=np.float32)[:, None, None]  # rib pairs, broadcast to (N_RIBS, S, S)
    y0 = -0.76 + k * rng.uniform(*RIB_SPACING_RANGE, (N_RIBS, 1, 1)).astype(np.float32)  # where rib k meets the spine
    half = 0.014 + 0.0015 * k  # half thickness: lower ribs are thicker
    posterior = y0 - 0.3 * u + 0.85 * u ** 2  # up from the spine, then down laterally
    anterior = y0 + 0.32 + 0.3 * (0.75 - u)  # fainter, falling towards the sternum
    ribs = np.maximum(_soft(half - np.abs(y - posterior), 0.8 * edge).max(0) * _soft(0.86 - ax, 2 * edge)
                      * _soft(ax - 0.07, edge),
                      0.5 * _soft(half - np.abs(y - anterior), edge).max(0) * _soft(0.8 - ax, 2 * edge)
                      * _soft(ax - 0.25, 0.1))
    dens += 0.07 * ribs * body * (0.2 + 0.8 * air)  # bone shows best against air
    clavicle = -0.70 - 0.18 * u + 0.35 * u ** 2  # an S-curve out to x = +-0.62, denser than a rib
    dens += 0.14 * _soft(0.028 - np.abs(y - clavicle), edge) * _soft(0.62 - ax, 2 * edge) * _soft(ax - 0.07, edge)

    if infiltration:
        # Patchy ill-defined opacities: Gaussian blobs broken up by noise, only where there is lung.
        patch = np.zeros_like(x)
        grain = _smooth_noise(rng, size, 16)
        for _ in range(rng.integers(*OPACITY_COUNT)):
            side = int(rng.choice((-1, 1)))
            px = side * (0.14 + lung_w) + float(rng.uniform(-0.6, 0.6)) * lung_w  # around mid-lung, either side
            py = -0.08 + float(rng.uniform(-0.35, 0.6)) * lung_h  # upper to lower zone
            r = float(rng.uniform(*OPACITY_RADIUS_RANGE))
            patch += float(rng.uniform(*OPACITY_WEIGHT_RANGE)) * np.exp(-((x - px) ** 2 + (y - py) ** 2) / (2 * r * r))
        dens += OPACITY_DENSITY * np.clip(patch * (0.75 + 0.35 * grain), 0, 1.2) * air

    # Exposure: a little low-frequency non-uniformity, quantum noise, then brightness/contrast/gamma.
    dens += 0.02 * _smooth_noise(rng, size, 6)
    if full != size:
        dens = np.asarray(Image.fromarray(dens).resize((full, full), Image.Resampling.BICUBIC))
    dens = dens + QUANTUM_NOISE_SD * rng.standard_normal(dens.shape, dtype=np.float32)
    img = float(rng.uniform(*BRIGHTNESS_RANGE)) + float(rng.uniform(*CONTRAST_RANGE)) * np.clip(dens, 0, 1)
    img = np.clip(img, 0, 1) ** float(rng.uniform(*GAMMA_RANGE))
    return np.round(img * 255).astype(np.uint8)


# --------------------------------------------------------------------------- a data set of phantoms


def draw(seed: int, index: int, infiltration: bool, size: int) -> np.ndarray:
    """Phantom `index` of the set drawn with `seed`: its pixels depend on nothing else."""
    return make_phantom(np.random.default_rng([seed, index]), size, infiltration)


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
                             f"phantom:seed={seed}:index={i}", (draw, seed, i, cls == "infiltration")))
    return entries


def min_phantoms() -> int:
    """The smallest N for which phantom_plan gives every split images of both classes
    (10: the 70/10/20 cut needs 5 per class before validation gets one)."""
    n = 2
    while not all(all(count_layout(phantom_plan(n))["counts"][s].values()) for s in SPLITS):
        n += 1
    return n


def write_phantoms(n: int, out: str | os.PathLike, size: int = 256, seed: int = 0,
                   workers: int = 2, progress: bool = True) -> dict:
    """Write n phantoms (half each class) in the extract layout with manifest.csv
    and summary.json under out; returns the summary dict. An out holding images
    that no extract wrote, or an NIH extract, is refused before anything is written."""
    if n < 2:
        raise CLIError(f"--phantoms must be at least 2 (one per class), got {n}")
    if size < 8:
        raise CLIError(f"--size must be at least 8, got {size}")
    if seed < 0:
        raise CLIError(f"--seed must be at least 0, got {seed}")
    out, entries = Path(out), phantom_plan(n, seed)
    previous = open_out_dir(out, entries)  # refuses, before writing, what it may not replace
    status, failed = render_entries(entries, out, size, workers, progress, previous)
    assert not failed  # phantoms are drawn, never decoded
    summary = {"source": "phantoms", "out": str(out), "size": size, "seed": seed, "dry_run": False,
               "min_phantoms": min_phantoms(),
               "candidates": {c: sum(e.cls == c for e in entries) for c in CLASSES}, "skipped": {},
               **count_layout(entries), "written": status["written"], "reused": status["reused"]}
    if n < min_phantoms():
        print(f"warning: {n} phantoms leave a split without images of both classes; classify and memorization "
              f"need --phantoms {min_phantoms()} or more", file=sys.stderr)
    return finish_layout(out, entries, summary)
