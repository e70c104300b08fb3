"""Does synthetic data help? The augmentation experiment, the memorisation check
and the report.

The seed project answered "yes" from one seed, with model selection on folds
that held synthetic images, patients leaking across splits and no AUROC
(REFERENCE.md section 3). This file asks the same question so that a reviewer
could accept the answer:

  * patient-disjoint train / validation / test splits (made by `extract`);
  * one generator per class, trained on that class's TRAIN split only, so a
    synthetic image never carries a validation or test patient;
  * synthetic images only ever enter the training set; model selection and the
    decision threshold use the real VALIDATION split (classify.py); every run is
    scored on exactly the same real TEST split;
  * a grid of synthetic-to-real ratios x real-data fractions x generators x
    seeds, where ratio 0 is the real-only baseline that the other cells are
    PAIRED with (same seed, same real subset, same initialisation), so the
    reported difference is a paired bootstrap over the shared test images;
  * real and synthetic images at one common resolution (the classifier's
    --size, 32 px by default: the DDPM's native size; GAN samples are
    downsampled to it);
  * train-on-synthetic / test-on-real (TSTR) as a direct measure of how much
    class signal the generators carry;
  * a memorisation check: is a synthetic image closer to a training image than
    real test images ever are?

Everything lands in OUT: generators/, synthetic/, scores/, results.csv (one row
per classifier run, rewritten atomically after each run, so an interrupted
study resumes where it stopped) and report.md with its plots (written by report.py).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import report
from common import CLIError, atomic_path, save_image_grid

GENERATORS = ("ddpm", "gan")
RESULT_FIELDS = ("run", "mode", "generator", "ratio", "real_fraction", "seed", "auroc", "auroc_ci_low",
                 "auroc_ci_high", "accuracy", "sensitivity", "specificity", "n_train", "n_synthetic",
                 "n_test", "test_set", "seconds", "finished_at")
MEMORIZATION_PERCENTILE = 1.0  # flag synthetic images closer than the 1st percentile of real-test NN distances


# --------------------------------------------------------------------------- configuration


@dataclass
class GeneratorConfig:
    """How each per-class generator is trained and sampled."""

    ddpm_preset: str | None = None  # None: fine-tune cifar10-32 when weights are found, else "small" from scratch
    ddpm_pretrained: Path | None = None
    ddpm_epochs: int = 20
    ddpm_max_steps: int | None = None
    ddpm_batch_size: int = 32
    ddpm_lr: float | None = None  # None: 1e-5 to fine-tune, 2e-4 from scratch
    ddpm_grid_steps: int = 50  # DDIM steps of the per-epoch monitoring grid the DDPM trainer draws
    ddpm_ema_decay: float | None = None  # None: ddpm's default (0.999, warmed up over the first steps)
    ddpm_warmup: int = 0  # linear learning-rate warm-up steps
    gan_size: int = 64
    gan_epochs: int = 20
    gan_max_steps: int | None = None
    gan_batch_size: int = 32
    sampler: str = "ddim"  # DDIM (Song et al. 2021) at 50 steps: ~20x cheaper than 1000 ancestral steps
    sample_steps: int = 50
    n_synthetic: int | None = None  # per class; None = enough for the largest ratio at the full real fraction


@dataclass
class StudyConfig:
    data: Path
    out: Path
    generators: tuple[str, ...] = GENERATORS
    ratios: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)  # synthetic images per real training image, per class
    real_fractions: tuple[float, ...] = (1.0, 0.25, 0.1)
    seeds: int = 3
    size: int = 32  # the common resolution of real and synthetic images for the classifier
    classifier: str = "resnet18"
    classifier_epochs: int = 20
    classifier_batch_size: int = 64
    patience: int = 5
    tstr: bool = True
    bootstrap: int = 1000
    fid_max_images: int = 2000
    inception: bool = True  # try Inception FID/KID/IS (slow on a CPU); the classifier-feature distances always run
    device: str = "auto"
    gen: GeneratorConfig = field(default_factory=GeneratorConfig)
    title: str = "the augmentation experiment"


# --------------------------------------------------------------------------- running other commands in-process


def run_command(argv: list[str], what: str) -> None:
    """Run `python main.py ARGV` in this process (no second torch import); any
    failure becomes one CLIError naming the stage (the command's own message is
    already on stderr)."""
    import main

    print(f"\n== {what}\n   python main.py {' '.join(argv)}", flush=True)
    try:
        rc = main.main(argv)
    except SystemExit as e:  # argparse rejects an argument by exiting
        rc = e.code if isinstance(e.code, int) else 2
    if rc != 0:
        raise CLIError(f"{what} failed (exit {rc}; its message is above): python main.py {' '.join(argv)}")


# --------------------------------------------------------------------------- real data and subsets


@dataclass
class RealData:
    """The three real splits at the classifier's resolution."""

    train_x: torch.Tensor  # (N, S, S) uint8
    train_y: torch.Tensor  # (N,) int64
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    test_paths: list[str]
    val_paths: list[str]


def load_real(root: Path, size: int) -> RealData:
    import data

    for split, d in data.SPLIT_DIRS.items():
        if not (root / d).is_dir():
            raise CLIError(f"{root} is not in the extract layout: {root / d} is missing "
                           f"(make one with `python main.py extract`)")
    tr, va, te = (data.load_split(root, s, size) for s in data.SPLITS)
    for name, s in (("train", tr), ("validation", va), ("test", te)):
        if set(s.labels.tolist()) != {0, 1}:
            raise CLIError(f"the {name} split under {root} needs images of both classes (infiltration, no_finding)")
    return RealData(tr.images, tr.labels, va.images, va.labels, te.images, te.labels, list(te.paths), list(va.paths))


def real_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of a stratified random subset of the real training split:
    round(fraction * n_c) images of each class c (at least 2). A pure function
    of (seed, fraction), so the baseline and every augmented run of one seed
    and fraction see the same real images."""
    rng = np.random.default_rng([seed, round(fraction * 1_000_000)])
    keep = []
    for c in (0, 1):
        idx = np.flatnonzero(labels == c)
        k = min(len(idx), max(2, round(fraction * len(idx))))
        keep.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(keep))


def synthetic_subset(labels: np.ndarray, per_class: dict[int, int], seed: int, salt: int) -> np.ndarray:
    """per_class[c] synthetic images of class c, drawn without replacement."""
    rng = np.random.default_rng([seed, salt, 17])
    keep = []
    for c, k in per_class.items():
        idx = np.flatnonzero(labels == c)
        keep.append(rng.choice(idx, size=min(k, len(idx)), replace=False))
    return np.sort(np.concatenate(keep))


# --------------------------------------------------------------------------- generators: train per class, sample


def ddpm_plan(g: GeneratorConfig) -> list[str]:
    """The DDPM arguments: fine-tune google/ddpm-cifar10-32 (the seed's recipe,
    AdamW lr 1e-5) when its weights are given or already on disk, else train a
    preset from scratch at Ho et al.'s CIFAR-10 learning rate, 2e-4."""
    import ddpm

    if g.ddpm_pretrained is None and g.ddpm_preset is None:
        local = Path(ddpm.DEFAULT_PRETRAINED)
        if (local / "config.json").is_file() or local.is_file():
            g = dataclasses.replace(g, ddpm_pretrained=local)
        else:
            print(f"note: no google/ddpm-cifar10-32 weights at {local}; training the 'small' DDPM from scratch "
                  "(pass --pretrained PATH to fine-tune)", flush=True)
            g = dataclasses.replace(g, ddpm_preset="small")
    if g.ddpm_pretrained is not None:
        args = ["--finetune", "--pretrained", str(g.ddpm_pretrained), "--lr", str(g.ddpm_lr or 1e-5)]
    else:
        args = ["--preset", g.ddpm_preset, "--lr", str(g.ddpm_lr or 2e-4)]
    if g.ddpm_ema_decay is not None:
        args += ["--ema-decay", str(g.ddpm_ema_decay)]
    if g.ddpm_warmup:
        args += ["--warmup", str(g.ddpm_warmup)]
    return args + ["--sample-steps", str(g.ddpm_grid_steps), "--num-samples", "16" if g.ddpm_grid_steps > 5 else "4"]


def train_generator(cfg: StudyConfig, gen: str, cls: str) -> tuple[Path, bool]:
    """Train (or reuse) the generator of one class on that class's TRAIN split;
    return its checkpoint and whether it was (re)trained now. A `done.json`
    beside the checkpoint marks a finished run; a checkpoint without it is an
    interrupted run, continued with --resume."""
    import data

    out = cfg.out / "generators" / f"{gen}_{cls}"
    done, ckpt = out / "done.json", out / "checkpoint.pt"
    if done.is_file() and ckpt.is_file():
        print(f"reusing {gen} for {cls}: {ckpt}", flush=True)
        return ckpt, False
    g = cfg.gen
    train_dir = cfg.data / data.SPLIT_DIRS["train"]  # the train split only: no validation/test patient
    common = ["--data", str(train_dir), "--class", cls, "--out", str(out), "--device", cfg.device, "--seed", "0"]
    if gen == "ddpm":
        argv = ["ddpm", *common, *ddpm_plan(g), "--epochs", str(g.ddpm_epochs), "--batch-size", str(g.ddpm_batch_size)]
        if g.ddpm_max_steps is not None:
            argv += ["--max-steps", str(g.ddpm_max_steps)]
    else:
        argv = ["gan", *common, "--size", str(g.gan_size), "--epochs", str(g.gan_epochs), "--num-samples", "16",
                "--batch-size", str(g.gan_batch_size), "--no-epoch-checkpoints"]
        if g.gan_max_steps is not None:
            argv += ["--max-steps", str(g.gan_max_steps)]
    if ckpt.is_file():
        argv.append("--resume")
    run_command(argv, f"training the {gen} of class {cls} (train split only)")
    with atomic_path(done) as tmp:
        tmp.write_text(json.dumps({"argv": argv, "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}))
    return ckpt, True


def sample_generator(cfg: StudyConfig, gen: str, cls: str, ckpt: Path, n: int, fresh: bool) -> Path:
    """n samples of one class into OUT/synthetic/<gen>/<cls>/, reused when
    already there and the generator was not retrained (`fresh`). They are
    written to a temporary folder and renamed, so a folder under that name is
    always complete."""
    import shutil

    folder = cfg.out / "synthetic" / gen / cls
    if not fresh and folder.is_dir() and len(list(folder.glob("sample_*.png"))) >= n:
        print(f"reusing {n} {gen} samples of {cls}: {folder}", flush=True)
        return folder
    tmp = folder.with_name(f".{cls}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    argv = ["sample", "--checkpoint", str(ckpt), "--out", str(tmp), "-n", str(n), "--seed", "1",
            "--device", cfg.device]
    if gen == "ddpm":
        argv += ["--sampler", cfg.gen.sampler, "--steps", str(cfg.gen.sample_steps)]
    run_command(argv, f"sampling {n} {gen} images of class {cls}")
    (tmp / "grid.png").unlink(missing_ok=True)  # the grid is not a training image
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


# --------------------------------------------------------------------------- classifier runs and results.csv


def read_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_results(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, RESULT_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def save_npy(array: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


@dataclass(frozen=True)
class Run:
    """One classifier training: the key that makes results.csv resumable."""

    mode: str  # "real" (baseline, ratio 0), "aug" (real + synthetic) or "tstr" (synthetic only)
    generator: str  # "none" for the baseline
    ratio: float
    fraction: float
    seed: int

    @property
    def name(self) -> str:
        if self.mode == "real":
            return f"real_f{self.fraction:g}_s{self.seed}"
        if self.mode == "tstr":
            return f"tstr_{self.generator}_s{self.seed}"
        return f"{self.generator}_r{self.ratio:g}_f{self.fraction:g}_s{self.seed}"


def plan_runs(cfg: StudyConfig) -> list[Run]:
    """The grid; ratio 0 is the real-only baseline, shared by both generators."""
    runs = []
    for seed in range(cfg.seeds):
        for frac in cfg.real_fractions:
            runs.append(Run("real", "none", 0.0, frac, seed))
            runs += [Run("aug", g, r, frac, seed) for g in cfg.generators for r in cfg.ratios if r > 0]
        if cfg.tstr:
            runs += [Run("tstr", g, 0.0, 1.0, seed) for g in cfg.generators]
    return runs


def classifier_config(cfg: StudyConfig, seed: int):
    import classify

    return classify.ClassifyConfig(model=cfg.classifier, size=cfg.size, epochs=cfg.classifier_epochs,
                                   batch_size=cfg.classifier_batch_size, patience=cfg.patience, seed=seed,
                                   device=cfg.device)


def run_classifier(cfg: StudyConfig, run: Run, real: RealData, synth: dict) -> tuple[dict, np.ndarray, object]:
    """Train one classifier for `run`; return its metrics, its test scores and the model."""
    import classify

    ty = real.train_y.numpy()
    sub = real_subset(ty, run.fraction, run.seed)
    tx, ty_t = real.train_x[sub], real.train_y[sub]
    sx = sy = None
    if run.mode != "real":
        s_x, s_y = synth[run.generator]
        counts = {c: int((ty_t == c).sum()) for c in (0, 1)}
        if run.mode == "aug":
            per_class = {c: round(run.ratio * k) for c, k in counts.items()}
        else:  # TSTR: as many synthetic images as the real training set has, class by class
            per_class = counts
        pick = synthetic_subset(s_y.numpy(), per_class, run.seed, salt=GENERATORS.index(run.generator))
        if len(pick) < sum(per_class.values()):
            print(f"warning: {run.name} wants {sum(per_class.values())} synthetic images, only {len(pick)} exist "
                  "(raise --n-synthetic); results.csv records the number used", flush=True)
        sx, sy = s_x[pick], s_y[pick]
        if run.mode == "tstr":
            tx, ty_t, sx, sy = sx, sy, None, None
    metrics, model = classify.train_and_evaluate(tx, ty_t, real.val_x, real.val_y, real.test_x, real.test_y,
                                                 classifier_config(cfg, run.seed), synthetic_x=sx,
                                                 synthetic_y=sy, progress=False)
    scores = np.asarray(classify.predict(model, real.test_x), dtype=np.float64)  # float64: no artificial ties
    return metrics, scores, model


def run_grid(cfg: StudyConfig, real: RealData, synth: dict) -> None:
    """Train every classifier of the grid not already in results.csv."""
    import classify

    results_path = cfg.out / "results.csv"
    rows = read_results(results_path)
    done = {r["run"] for r in rows if (cfg.out / "scores" / f"{r['run']}.npy").is_file()}
    rows = [r for r in rows if r["run"] in done]
    test_set = _fingerprint(real.test_paths)
    save_npy(real.test_y.numpy(), cfg.out / "scores" / "test_labels.npy")
    runs = plan_runs(cfg)
    todo = [r for r in runs if r.name not in done]
    print(f"\n== classifiers: {len(runs)} runs in the grid, {len(runs) - len(todo)} already done, {len(todo)} to go",
          flush=True)
    ref = reference_run(cfg)
    for i, run in enumerate(todo, 1):
        t0 = time.time()
        metrics, scores, model = run_classifier(cfg, run, real, synth)
        if run == ref:  # the real-only classifier whose features the memorisation check and FID use
            classify.save_classifier(model, classifier_config(cfg, run.seed), cfg.out / "classifiers" / "reference.pt",
                                     metrics)
        save_npy(scores, cfg.out / "scores" / f"{run.name}.npy")
        if run.mode == "tstr":  # classify saw the synthetic images as its training set: name them as such
            metrics = {**metrics, "n_train": 0, "n_synthetic": metrics.get("n_train", 0)}
        rows.append({**{k: metrics.get(k, "") for k in RESULT_FIELDS}, "run": run.name, "mode": run.mode,
                     "generator": run.generator, "ratio": run.ratio, "real_fraction": run.fraction,
                     "seed": run.seed, "test_set": test_set, "seconds": round(time.time() - t0, 1),
                     "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")})
        write_results(results_path, rows)  # after every run: an interruption loses at most one run
        print(f"[{i}/{len(todo)}] {run.name}: test AUROC {metrics['auroc']:.3f} "
              f"({metrics['auroc_ci_low']:.3f}-{metrics['auroc_ci_high']:.3f}), "
              f"{int(metrics.get('n_train', 0))} real + {int(metrics.get('n_synthetic', 0))} synthetic, "
              f"{time.time() - t0:.0f}s", flush=True)


def reference_run(cfg: StudyConfig) -> Run:
    """The real-only classifier of seed 0 at the largest real fraction."""
    return Run("real", "none", 0.0, max(cfg.real_fractions), 0)


def reference_classifier(cfg: StudyConfig):
    import classify

    path = cfg.out / "classifiers" / "reference.pt"
    return classify.load_classifier(path)[0] if path.is_file() else None


def _fingerprint(paths: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(sorted(Path(p).name for p in paths)).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- memorisation check


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
                       embed=None, percentile: float = MEMORIZATION_PERCENTILE) -> dict:
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


# --------------------------------------------------------------------------- image distances (FID, KID)


def distances(cfg: StudyConfig, real: RealData, synth: dict, model) -> dict:
    """Per generator and class: Inception FID/KID/IS (fid.evaluate) when its
    weights can be had, and always the Frechet distance and KID on the real-only
    classifier's features (a chest X-ray feature space; Inception was trained
    on photographs). Cached in OUT/distances.json."""
    import classify
    import fid

    path = cfg.out / "distances.json"
    cache = json.loads(path.read_text()) if path.is_file() else {}
    rng = np.random.default_rng(0)
    inception_missing = cache.get("inception_missing")
    for gen, (s_x, s_y) in synth.items():
        for c, cls in ((1, "infiltration"), (0, "no_finding")):
            key = f"{gen}/{cls}"
            if key in cache:
                continue
            r = real.train_x[real.train_y == c]
            f = s_x[s_y == c]
            r = r[np.sort(rng.permutation(len(r))[:cfg.fid_max_images])]
            f = f[np.sort(rng.permutation(len(f))[:cfg.fid_max_images])]
            entry = {"n_real": len(r), "n_fake": len(f)}
            if inception_missing is None and not cfg.inception:
                inception_missing = "not attempted in this configuration (--quick)"
            if inception_missing is None:
                try:
                    entry["inception"] = fid.evaluate(r, f, device=cfg.device, progress=False)
                except fid.InceptionWeightsMissing as e:
                    inception_missing = str(e)
            if model is not None:
                d = fid.feature_distance(classify.embed(model, r), classify.embed(model, f))
                entry["classifier"] = {"fd": d["cxr_fd"], "kid_mean": d["cxr_kid_mean"], "kid_std": d["cxr_kid_std"]}
            cache[key] = entry
    cache["inception_missing"] = inception_missing
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(cache, indent=1, default=float))
    return cache


# --------------------------------------------------------------------------- the whole study


# Settings that may grow between invocations of one study: more seeds, ratios, fractions or generators add runs.
GRID_EXTENT = ("out", "generators", "ratios", "real_fractions", "seeds", "tstr", "bootstrap", "fid_max_images",
               "inception", "device", "title")


def check_same_study(cfg: StudyConfig) -> None:
    """Refuse to mix results of different recipes in one OUT: a finished run is
    skipped by its setting alone, so the recipe (data, resolution, classifier,
    generators) must be the one that made it. Recorded in OUT/study.json."""
    path = cfg.out / "study.json"
    recipe = json.loads(json.dumps({k: v for k, v in dataclasses.asdict(cfg).items() if k not in GRID_EXTENT},
                                   default=str))
    if path.is_file():
        old = json.loads(path.read_text())
        changed = sorted(k for k in set(old) | set(recipe) if old.get(k) != recipe.get(k))
        if changed:
            raise CLIError(f"{cfg.out} holds a study made with other settings ({changed[0]}: {old.get(changed[0])} "
                           f"there, {recipe.get(changed[0])} now); use a new --out or the same settings")
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(recipe, indent=1))



def run_study(cfg: StudyConfig) -> Path:
    """Generators, samples, classifier grid, memorisation, distances, report."""
    import data

    t_start = time.time()
    cfg.out.mkdir(parents=True, exist_ok=True)
    check_same_study(cfg)
    real = load_real(cfg.data, cfg.size)
    with atomic_path(cfg.out / "splits.json") as tmp:  # what every run was validated and tested on
        tmp.write_text(json.dumps({"data": str(cfg.data), "size": cfg.size, "validation": real.val_paths,
                                   "test": real.test_paths}, indent=0))
    per_class_train = max(int((real.train_y == c).sum()) for c in (0, 1))
    n_syn = cfg.gen.n_synthetic or max(1, math.ceil(max(cfg.ratios + (1.0,)) * per_class_train))
    print(f"real data at {cfg.size}px: {len(real.train_y)} train, {len(real.val_y)} validation, "
          f"{len(real.test_y)} test; {n_syn} synthetic images per class and generator", flush=True)

    synth = {}
    for gen in cfg.generators:
        for cls in data.CLASSES:
            ckpt, fresh = train_generator(cfg, gen, cls)
            sample_generator(cfg, gen, cls, ckpt, n_syn, fresh)
        s = data.load_folder(cfg.out / "synthetic" / gen, cfg.size, progress=False)
        synth[gen] = (s.images, s.labels)

    run_grid(cfg, real, synth)
    model = reference_classifier(cfg)

    print("\n== memorisation check and image distances", flush=True)
    memo = {}
    embed = None
    if model is not None:
        import classify

        embed = lambda u8: classify.embed(model, u8)  # noqa: E731
    for gen, (s_x, _) in synth.items():
        res = memorization_check(real.train_x, s_x, real.test_x, embed)
        save_closest_pairs(real.train_x, s_x, res, cfg.out / f"closest_pairs_{gen}.png")
        memo[gen] = public(res)
    with atomic_path(cfg.out / "memorization.json") as tmp:
        tmp.write_text(json.dumps(memo, indent=1))
    with warnings.catch_warnings():  # few images per class: FID's singular-covariance warnings, said in the report
        warnings.simplefilter("ignore")
        dist = distances(cfg, real, synth, model)

    path = report.write_report(cfg, real, synth, memo, dist, read_results(cfg.out / "results.csv"),
                               elapsed=time.time() - t_start, memorization_percentile=MEMORIZATION_PERCENTILE)
    print(f"\nwrote {path} and {cfg.out / 'results.csv'} ({time.time() - t_start:.0f}s)", flush=True)
    return path


# --------------------------------------------------------------------------- the demo: everything on phantoms, on a CPU


def demo_config(out: Path, quick: bool, device: str) -> tuple[StudyConfig, int]:
    """The demo's reduced study and its phantom count. Budget: under 10 minutes
    on a 2-core CPU for the full demo, about a minute for --quick (the tests)."""
    if quick:
        gen = GeneratorConfig(ddpm_preset="tiny", ddpm_epochs=1, ddpm_max_steps=8, ddpm_batch_size=16, ddpm_grid_steps=2,
                              ddpm_ema_decay=0.5,
                              gan_size=64, gan_epochs=1, gan_max_steps=8, gan_batch_size=16, sample_steps=4)
        cfg = StudyConfig(out / "data", out, ratios=(0.0, 1.0), real_fractions=(1.0, 0.5), seeds=1,
                          classifier="small", classifier_epochs=2, classifier_batch_size=32, patience=2,
                          bootstrap=200, fid_max_images=64, inception=False, device=device, gen=gen,
                          title="the quick demo (phantoms, tiny models: a smoke test)")
        return cfg, 120
    # Measured on an idle 2-core CPU: the tiny UNet (0.18 M parameters) at lr 2e-3 draws
    # recognisable phantoms after ~700 steps of batch 32 (~0.17 s a step); 400 steps are
    # still mostly noise. The GAN runs at 32 px, the classifier's resolution, 4x cheaper than 64.
    gen = GeneratorConfig(ddpm_preset="tiny", ddpm_epochs=1000, ddpm_max_steps=700, ddpm_batch_size=32, ddpm_lr=2e-3,
                          ddpm_warmup=50, ddpm_grid_steps=2, ddpm_ema_decay=0.995, gan_size=32, gan_epochs=1000,
                          gan_max_steps=500, gan_batch_size=32, sample_steps=20)
    cfg = StudyConfig(out / "data", out, ratios=(0.0, 0.5, 1.0, 2.0), real_fractions=(1.0, 0.25), seeds=1,
                      classifier="small", classifier_epochs=8, classifier_batch_size=32, patience=3,
                      bootstrap=1000, fid_max_images=200, device=device, gen=gen,
                      title="the demo (embedded phantoms, small models, one seed)")
    return cfg, 400


def run_demo(out: Path, quick: bool = False, device: str = "auto") -> Path:
    t0 = time.time()
    cfg, n_phantoms = demo_config(out, quick, device)
    if not (cfg.data / "manifest.csv").is_file():
        run_command(["extract", "--phantoms", str(n_phantoms), "--out", str(cfg.data), "--size", "64", "--seed", "0"],
                    f"writing {n_phantoms} phantom X-rays")
    path = run_study(cfg)
    lines = path.read_text().splitlines()
    print(f"\ndemo finished in {(time.time() - t0) / 60:.1f} min; {path} begins:\n\n" + "\n".join(lines[:1]), flush=True)
    return path


# --------------------------------------------------------------------------- command line


def _floats(text: str, name: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise CLIError(f"{name} must be comma-separated numbers, got {text!r}") from None
    if not vals:
        raise CLIError(f"{name} is empty")
    return vals


def config_from_args(a) -> StudyConfig:
    gens = tuple(g.strip() for g in a.generators.split(",") if g.strip())
    bad = [g for g in gens if g not in GENERATORS]
    if bad or not gens:
        raise CLIError(f"--generators: unknown {bad or 'empty list'} (choose from {','.join(GENERATORS)})")
    ratios = tuple(sorted(set(_floats(a.ratios, "--ratios"))))
    if min(ratios) < 0 or 0 not in ratios or len(ratios) < 2:
        raise CLIError("--ratios must be >= 0 and include 0 (the real-only baseline) and at least one positive ratio")
    fracs = tuple(sorted(set(_floats(a.real_fractions, "--real-fractions")), reverse=True))
    if not all(0 < f <= 1 for f in fracs):
        raise CLIError("--real-fractions must lie in (0, 1]")
    for name in ("seeds", "size", "epochs", "ddpm_epochs", "gan_epochs", "sample_steps", "batch_size", "bootstrap"):
        if getattr(a, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be at least 1")
    if a.n_synthetic is not None and a.n_synthetic < 1:
        raise CLIError("--n-synthetic must be at least 1")
    if a.ddpm_finetune and a.pretrained is None:
        raise CLIError("--ddpm-finetune needs --pretrained PATH (google/ddpm-cifar10-32 weights)")
    if a.pretrained is not None and not a.pretrained.exists():
        raise CLIError(f"--pretrained: not found: {a.pretrained}")
    if not a.data.is_dir():
        raise CLIError(f"--data: folder not found: {a.data}")
    gen = GeneratorConfig(ddpm_preset=a.ddpm_preset, ddpm_pretrained=a.pretrained, ddpm_epochs=a.ddpm_epochs,
                          ddpm_max_steps=a.ddpm_max_steps, gan_size=a.gan_size, gan_epochs=a.gan_epochs,
                          gan_max_steps=a.gan_max_steps, sampler=a.sampler, sample_steps=a.sample_steps,
                          n_synthetic=a.n_synthetic)
    return StudyConfig(a.data, a.out, gens, ratios, fracs, a.seeds, a.size, a.classifier, a.epochs, a.batch_size,
                       a.patience, not a.no_tstr, a.bootstrap, device=a.device, gen=gen)


def cmd_experiment(a) -> None:
    run_study(config_from_args(a))


def cmd_demo(a) -> None:
    run_demo(a.out, a.quick, a.device)


def cmd_memorization(a) -> None:
    """`memorization --train DIR --synthetic DIR`: the check on its own."""
    import data

    if a.size < 1:
        raise CLIError("--size must be at least 1")
    data.list_images(a.synthetic)  # a missing or empty --synthetic fails now, before the training set is read
    if (a.train / data.SPLIT_DIRS["train"]).is_dir():  # extract layout: train split vs the test split's patients
        train = data.load_split(a.train, "train", a.size).images
        reference = data.load_split(a.train, "test", a.size).images
        how = "train split; reference: test split"
    else:  # a plain folder: a random 20% stands in for the unseen patients
        images = data.load_folder(a.train, a.size).images
        if len(images) < 10:
            raise CLIError(f"--train {a.train}: need at least 10 images to hold out a reference set")
        perm = torch.from_numpy(np.random.default_rng(0).permutation(len(images)))
        cut = len(images) // 5
        train, reference = images[perm[cut:]], images[perm[:cut]]
        how = "80% of the folder; reference: the held-out 20% (seed 0)"
    synthetic = data.load_folder(a.synthetic, a.size).images
    embed = None
    if a.classifier is not None:
        import classify

        model, _ = classify.load_classifier(a.classifier)
        embed = lambda u8: classify.embed(model, u8)  # noqa: E731
    res = memorization_check(train, synthetic, reference, embed)
    if a.out is not None:
        save_closest_pairs(train, synthetic, res, a.out / "closest_pairs.png")
        with atomic_path(a.out / "memorization.json") as tmp:
            tmp.write_text(json.dumps(public(res), indent=1))
    res = public(res)
    res["train"] = how
    print(f"{res['n_flagged']} of {res['n_synthetic']} synthetic images ({res['flagged_fraction']:.1%}) are closer to "
          f"a training image than the {MEMORIZATION_PERCENTILE:g}st percentile of real held-out images "
          f"(pixel threshold {res['pixel']['threshold']:.4f}; {how})", file=sys.stderr if a.json else sys.stdout)
    if a.json:
        print(json.dumps(res))


def add_commands(sub) -> None:
    import argparse

    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("experiment", formatter_class=fmt,
                       help="the whole study: generators per class, classifier grid, memorisation, report.md")
    p.add_argument("--data", required=True, type=Path, help="real data in the extract layout (patient-disjoint splits)")
    p.add_argument("--out", required=True, type=Path, help="study folder; re-running skips finished work")
    p.add_argument("--generators", default="ddpm,gan", help="comma-separated: ddpm, gan")
    p.add_argument("--ratios", default="0,0.5,1,2", help="synthetic images per real training image (0 = real only)")
    p.add_argument("--real-fractions", default="1,0.25,0.1", help="fractions of the real train split (stratified)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per setting")
    p.add_argument("--n-synthetic", type=int, default=None,
                   help="samples per class and generator (default: enough for the largest ratio)")
    p.add_argument("--classifier", choices=("small", "resnet18"), default="resnet18")
    p.add_argument("--size", type=int, default=32, help="common resolution of real and synthetic images")
    p.add_argument("--epochs", type=int, default=20, help="classifier epochs (early stopping on validation AUROC)")
    p.add_argument("--batch-size", type=int, default=64, help="classifier batch size")
    p.add_argument("--patience", type=int, default=5, help="classifier early-stopping patience (epochs)")
    p.add_argument("--ddpm-finetune", action="store_true", help="fine-tune google/ddpm-cifar10-32 (needs --pretrained)")
    p.add_argument("--pretrained", type=Path, default=None, help="google/ddpm-cifar10-32 weights (file or folder)")
    p.add_argument("--ddpm-preset", choices=("cifar10", "small", "tiny"), default=None,
                   help="train this DDPM from scratch (default: fine-tune when weights are found, else small)")
    p.add_argument("--ddpm-epochs", type=int, default=20)
    p.add_argument("--ddpm-max-steps", type=int, default=None)
    p.add_argument("--gan-size", type=int, default=64, help="GAN resolution (samples are resized to --size)")
    p.add_argument("--gan-epochs", type=int, default=20)
    p.add_argument("--gan-max-steps", type=int, default=None)
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    p.add_argument("--sample-steps", type=int, default=50, help="DDPM sampling steps")
    p.add_argument("--no-tstr", action="store_true", help="skip train-on-synthetic / test-on-real")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the report's intervals")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("demo", formatter_class=fmt,
                       help="the experiment end to end on phantom X-rays with small models (about 5-10 min on a CPU)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--quick", action="store_true", help="a much smaller smoke test (about a minute)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("memorization", formatter_class=fmt,
                       help="are synthetic images closer to training images than real held-out images are?")
    p.add_argument("--train", required=True, type=Path,
                   help="extract-layout root (train split vs test split) or a plain folder (20%% held out)")
    p.add_argument("--synthetic", required=True, type=Path, help="folder of synthetic images")
    p.add_argument("--size", type=int, default=32, help="common resolution for the pixel distance")
    p.add_argument("--classifier", type=Path, default=None,
                   help="classifier checkpoint for the feature distance (default: pixels only)")
    p.add_argument("--out", type=Path, default=None, help="write memorization.json and closest_pairs.png here")
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.set_defaults(func=cmd_memorization)
