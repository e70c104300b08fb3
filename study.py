"""Does synthetic data help? The augmentation experiment, the memorisation check
and the demo; report.py writes the report.

The original experiment answered "yes" from one random seed, with model
selection on folds that held synthetic images, patients leaking across splits
and no AUROC (README, "Does synthetic data help? The experiment"). This file
asks the same question so that a reviewer could accept the answer:

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

The generators are trained by calling ddpm.train / dcgan.train with their own
config objects (StudyConfig.ddpm, StudyConfig.gan) and sampled with their
`generate` functions. Everything lands in OUT: generators/, synthetic/, scores/,
results.csv (one row per classifier run, rewritten atomically after each run, so
an interrupted study resumes where it stopped) and report.md with its plots.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import classify
import data
import dcgan
import ddpm
import fid
import memorization
import phantoms
import report
from common import CLIError, atomic_path, check_config, flag, load_checkpoint, pick_device, save_png, to_uint8

GENERATORS = ("ddpm", "gan")
RESULT_FIELDS = ("run", "mode", "generator", "ratio", "real_fraction", "seed", "auroc", "auroc_ci_low",
                 "auroc_ci_high", "accuracy", "sensitivity", "specificity", "n_train", "n_synthetic",
                 "n_test", "test_set", "seconds", "finished_at")


# --------------------------------------------------------------------------- configuration


def ddpm_recipe(preset: str | None = None, pretrained: Path | None = None, lr: float | None = None,
                **settings) -> ddpm.TrainConfig:
    """The DDPM trained for each class: fine-tune google/ddpm-cifar10-32 (the
    original experiment's recipe, AdamW lr 1e-5) when its weights are given or
    already on disk, else train a preset from scratch at Ho et al.'s CIFAR-10
    learning rate, 2e-4. `settings` are other ddpm.TrainConfig fields; data,
    out, class_name and resume are set per class by train_generator."""
    if pretrained is None and preset is None:
        local = Path(ddpm.DEFAULT_PRETRAINED)
        if (local / "config.json").is_file() or local.is_file():
            pretrained = local
        else:
            print(f"note: no google/ddpm-cifar10-32 weights at {local}; training the 'small' DDPM from scratch "
                  "(pass --pretrained PATH to fine-tune)", flush=True)
            preset = "small"
    plan = (dict(finetune=True, pretrained=pretrained, lr=lr or 1e-5) if pretrained is not None
            else dict(preset=preset, lr=lr or 2e-4))
    return ddpm.TrainConfig(data=Path(), out=Path(), **plan, **settings)


def gan_recipe(**settings) -> dcgan.TrainConfig:
    """The DCGAN trained for each class (`settings`: dcgan.TrainConfig fields): a
    16-image grid per epoch and one checkpoint, not one per epoch."""
    return dcgan.TrainConfig(data=Path(), out=Path(), **{"num_samples": 16, "no_epoch_checkpoints": True, **settings})


@dataclass
class StudyConfig:
    """One study. `ddpm` and `gan` are the generators' own training configs,
    used for every class (train_generator sets their data, out, class and resume)."""

    data: Path
    out: Path
    ddpm: ddpm.TrainConfig | None = None  # needed when "ddpm" is among the generators
    gan: dcgan.TrainConfig | None = None  # needed when "gan" is
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
    sampler: str = "ddim"  # the DDPM's: DDIM (Song et al. 2021) at 50 steps, ~20x cheaper than 1000 ancestral steps
    sample_steps: int = 50
    n_synthetic: int | None = None  # per class; None = enough for the largest ratio at the full real fraction
    title: str = "the augmentation experiment"

    def __post_init__(self):
        missing = [g for g in self.generators if getattr(self, g) is None]
        if missing:
            raise CLIError(f"the study trains {', '.join(missing)} but has no training config for it")


@dataclass
class ExperimentOptions:
    """The options of `python main.py experiment`; `study_config` turns them into a StudyConfig."""

    data: Path = flag(help="real data in the extract layout (patient-disjoint splits)")
    out: Path = flag(help="study folder; re-running skips finished work")
    generators: str = flag("ddpm,gan", "comma-separated: ddpm, gan")
    ratios: str = flag("0,0.5,1,2", "synthetic images per real training image (0 = real only)")
    real_fractions: str = flag("1,0.25,0.1", "fractions of the real train split (stratified)")
    seeds: int = flag(3, "seeds per setting", min=1)
    n_synthetic: int | None = flag(None, "samples per class and generator (default: enough for the largest ratio)",
                                   min=1)
    classifier: str = flag("resnet18", "the classifier's network", choices=classify.MODELS)
    size: int = flag(32, "common resolution of real and synthetic images", min=1)
    epochs: int = flag(20, "classifier epochs (early stopping on validation AUROC)", min=1)
    batch_size: int = flag(64, "classifier batch size", min=1)
    patience: int = flag(5, "classifier early-stopping patience (epochs)")
    ddpm_finetune: bool = flag(False, "fine-tune google/ddpm-cifar10-32 (needs --pretrained)")
    pretrained: Path | None = flag(None, "google/ddpm-cifar10-32 weights (file or folder)")
    ddpm_preset: str | None = flag(None, "train this DDPM from scratch (default: fine-tune when weights are found, "
                                         "else small)", choices=tuple(ddpm.PRESETS))
    ddpm_epochs: int = flag(20, "DDPM training epochs per class", min=1)
    ddpm_max_steps: int | None = flag(None, "stop each DDPM after this many steps", min=1)
    gan_size: int = flag(64, "GAN resolution (samples are resized to --size)", choices=dcgan.SIZES)
    gan_epochs: int = flag(20, "GAN training epochs per class", min=1)
    gan_max_steps: int | None = flag(None, "stop each GAN after this many steps", min=1)
    sampler: str = flag("ddim", "the DDPM's sampler for the synthetic images", choices=("ddim", "ddpm"))
    sample_steps: int = flag(50, "DDPM sampling steps", min=1)
    tstr: bool = flag(True, "train on synthetic, test on real (TSTR); --no-tstr skips it", flag="--no-tstr")
    bootstrap: int = flag(1000, "bootstrap resamples for the report's intervals", min=1)
    device: str = flag("auto", "auto, cpu, cuda, cuda:1")

    def __post_init__(self):
        check_config(self)


def _floats(text: str, name: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise CLIError(f"{name} must be comma-separated numbers, got {text!r}") from None
    if not vals:
        raise CLIError(f"{name} is empty")
    return vals


def study_config(o: ExperimentOptions) -> StudyConfig:
    """The study the experiment's options describe, each list checked."""
    gens = tuple(g.strip() for g in o.generators.split(",") if g.strip())
    bad = [g for g in gens if g not in GENERATORS]
    if bad or not gens:
        raise CLIError(f"--generators: unknown {bad or 'empty list'} (choose from {','.join(GENERATORS)})")
    ratios = tuple(sorted(set(_floats(o.ratios, "--ratios"))))
    if min(ratios) < 0 or 0 not in ratios or len(ratios) < 2:
        raise CLIError("--ratios must be >= 0 and include 0 (the real-only baseline) and at least one positive ratio")
    fracs = tuple(sorted(set(_floats(o.real_fractions, "--real-fractions")), reverse=True))
    if not all(0 < f <= 1 for f in fracs):
        raise CLIError("--real-fractions must lie in (0, 1]")
    if o.ddpm_finetune and o.pretrained is None:
        raise CLIError("--ddpm-finetune needs --pretrained PATH (google/ddpm-cifar10-32 weights)")
    if o.pretrained is not None and not o.pretrained.exists():
        raise CLIError(f"--pretrained: not found: {o.pretrained}")
    if not o.data.is_dir():
        raise CLIError(f"--data: folder not found: {o.data}")
    return StudyConfig(
        o.data, o.out,
        ddpm=ddpm_recipe(o.ddpm_preset, o.pretrained, epochs=o.ddpm_epochs, max_steps=o.ddpm_max_steps)
        if "ddpm" in gens else None,
        gan=gan_recipe(size=o.gan_size, epochs=o.gan_epochs, max_steps=o.gan_max_steps) if "gan" in gens else None,
        generators=gens, ratios=ratios, real_fractions=fracs, seeds=o.seeds, size=o.size, classifier=o.classifier,
        classifier_epochs=o.epochs, classifier_batch_size=o.batch_size, patience=o.patience, tstr=o.tstr,
        bootstrap=o.bootstrap, device=o.device, sampler=o.sampler, sample_steps=o.sample_steps,
        n_synthetic=o.n_synthetic)


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


def train_generator(cfg: StudyConfig, gen: str, cls: str) -> tuple[Path, bool]:
    """Train (or reuse) the generator of one class on that class's TRAIN split;
    return its checkpoint and whether it was (re)trained now. A `done.json`
    beside the checkpoint marks a finished run; a checkpoint without it is an
    interrupted run, continued with resume."""
    out = cfg.out / "generators" / f"{gen}_{cls}"
    done, ckpt = out / "done.json", out / "checkpoint.pt"
    if done.is_file() and ckpt.is_file():
        print(f"reusing {gen} for {cls}: {ckpt}", flush=True)
        return ckpt, False
    print(f"\n== training the {gen} of class {cls} (train split only)", flush=True)
    train = {"ddpm": ddpm.train, "gan": dcgan.train}[gen]
    run = dataclasses.replace(getattr(cfg, gen), data=cfg.data / data.SPLIT_DIRS["train"], out=out, class_name=cls,
                              device=cfg.device, resume=ckpt.is_file())  # the train split: no validation/test patient
    ckpt = train(run)
    with atomic_path(done) as tmp:
        finished = time.strftime("%Y-%m-%d %H:%M:%S")
        tmp.write_text(json.dumps({"config": dataclasses.asdict(run), "finished_at": finished}, default=str))
    return ckpt, True


def sample_generator(cfg: StudyConfig, gen: str, cls: str, ckpt: Path, n: int, fresh: bool) -> Path:
    """n grey samples of one class into OUT/synthetic/<gen>/<cls>/, reused when
    already there and the generator was not retrained (`fresh`). They are
    written to a temporary folder and renamed, so a folder under that name is
    always complete."""
    folder = cfg.out / "synthetic" / gen / cls
    if not fresh and folder.is_dir() and len(list(folder.glob("sample_*.png"))) >= n:
        print(f"reusing {n} {gen} samples of {cls}: {folder}", flush=True)
        return folder
    print(f"\n== sampling {n} {gen} images of class {cls}", flush=True)
    checkpoint, device = load_checkpoint(ckpt), pick_device(cfg.device)
    if gen == "ddpm":
        images = ddpm.generate(checkpoint, n, seed=1, batch_size=64, device=device, sampler=cfg.sampler,
                               steps=cfg.sample_steps)
    else:
        images = dcgan.generate(checkpoint, n, seed=1, batch_size=64, device=device)
    grey = images.mean(dim=1, keepdim=True)  # (N, C, H, W) -> (N, 1, H, W): X-rays are grey, as `sample` writes
    tmp = folder.with_name(f".{cls}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for i, img in enumerate(to_uint8(grey)):
        save_png(img, tmp / f"sample_{i:05d}.png")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    print(f"wrote {n} images to {folder}", flush=True)
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
    return classify.ClassifyConfig(model=cfg.classifier, size=cfg.size, epochs=cfg.classifier_epochs,
                                   batch_size=cfg.classifier_batch_size, patience=cfg.patience, seed=seed,
                                   device=cfg.device)


def run_classifier(cfg: StudyConfig, run: Run, real: RealData, synth: dict) -> tuple[dict, np.ndarray, object]:
    """Train one classifier for `run`; return its metrics, its test scores and the model."""
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
    path = cfg.out / "classifiers" / "reference.pt"
    return classify.load_classifier(path)[0] if path.is_file() else None


def _fingerprint(paths: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(Path(p).name for p in paths)).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- image distances (FID, KID)


def distances(cfg: StudyConfig, real: RealData, synth: dict, model) -> dict:
    """Per generator and class: Inception FID/KID/IS (fid.evaluate) when its
    weights can be had, and always the Frechet distance and KID on the real-only
    classifier's features (a chest X-ray feature space; Inception was trained
    on photographs). Cached in OUT/distances.json."""
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
    t_start = time.time()
    cfg.out.mkdir(parents=True, exist_ok=True)
    check_same_study(cfg)
    real = load_real(cfg.data, cfg.size)
    with atomic_path(cfg.out / "splits.json") as tmp:  # what every run was validated and tested on
        tmp.write_text(json.dumps({"data": str(cfg.data), "size": cfg.size, "validation": real.val_paths,
                                   "test": real.test_paths}, indent=0))
    per_class_train = max(int((real.train_y == c).sum()) for c in (0, 1))
    n_syn = cfg.n_synthetic or max(1, math.ceil(max(cfg.ratios + (1.0,)) * per_class_train))
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
        embed = lambda u8: classify.embed(model, u8)  # noqa: E731
    for gen, (s_x, _) in synth.items():
        res = memorization.memorization_check(real.train_x, s_x, real.test_x, embed)
        memorization.save_closest_pairs(real.train_x, s_x, res, cfg.out / f"closest_pairs_{gen}.png")
        memo[gen] = memorization.public(res)
    with atomic_path(cfg.out / "memorization.json") as tmp:
        tmp.write_text(json.dumps(memo, indent=1))
    with warnings.catch_warnings():  # few images per class: FID's singular-covariance warnings, said in the report
        warnings.simplefilter("ignore")
        dist = distances(cfg, real, synth, model)

    path = report.write_report(cfg, real, synth, memo, dist, read_results(cfg.out / "results.csv"),
                               elapsed=time.time() - t_start, memorization_percentile=memorization.PERCENTILE)
    print(f"\nwrote {path} and {cfg.out / 'results.csv'} ({time.time() - t_start:.0f}s)", flush=True)
    return path


# --------------------------------------------------------------------------- the demo: everything on phantoms, on a CPU


@dataclass
class DemoConfig:
    """The options of `python main.py demo`."""

    out: Path = flag(Path("runs/demo"), "study folder: phantoms in OUT/data, then everything `experiment` writes")
    quick: bool = flag(False, "a much smaller smoke test (about a minute)")
    device: str = flag("auto", "auto, cpu, cuda, cuda:1")


def demo_config(out: Path, quick: bool, device: str) -> tuple[StudyConfig, int]:
    """The demo's reduced study and its phantom count. Budget: under 10 minutes
    on a 2-core CPU for the full demo, about a minute for --quick (the tests)."""
    if quick:
        cfg = StudyConfig(out / "data", out,
                          ddpm=ddpm_recipe("tiny", epochs=1, max_steps=8, batch_size=16, sample_steps=2, num_samples=4,
                                           ema_decay=0.5),
                          gan=gan_recipe(size=64, epochs=1, max_steps=8, batch_size=16),
                          ratios=(0.0, 1.0), real_fractions=(1.0, 0.5), seeds=1, classifier="small",
                          classifier_epochs=2, classifier_batch_size=32, patience=2, bootstrap=200, fid_max_images=64,
                          inception=False, device=device, sample_steps=4,
                          title="the quick demo (phantoms, tiny models: a smoke test)")
        return cfg, 120
    # Measured on an idle 2-core CPU: the tiny UNet (0.18 M parameters) at lr 2e-3 draws
    # recognisable phantoms after ~700 steps of batch 32 (~0.17 s a step); 400 steps are
    # still mostly noise. The GAN runs at 32 px, the classifier's resolution, 4x cheaper than 64.
    cfg = StudyConfig(out / "data", out,
                      ddpm=ddpm_recipe("tiny", lr=2e-3, epochs=1000, max_steps=700, batch_size=32, warmup=50,
                                       sample_steps=2, num_samples=4, ema_decay=0.995),
                      gan=gan_recipe(size=32, epochs=1000, max_steps=500, batch_size=32),
                      ratios=(0.0, 0.5, 1.0, 2.0), real_fractions=(1.0, 0.25), seeds=1, classifier="small",
                      classifier_epochs=8, classifier_batch_size=32, patience=3, bootstrap=1000, fid_max_images=200,
                      device=device, sample_steps=20, title="the demo (embedded phantoms, small models, one seed)")
    return cfg, 400


def run_demo(out: Path, quick: bool = False, device: str = "auto") -> Path:
    t0 = time.time()
    cfg, n_phantoms = demo_config(out, quick, device)
    if not (cfg.data / "manifest.csv").is_file():
        print(f"\n== writing {n_phantoms} phantom X-rays to {cfg.data}", flush=True)
        phantoms.write_phantoms(n_phantoms, cfg.data, size=64, seed=0)
    path = run_study(cfg)
    lines = path.read_text().splitlines()
    print(f"\ndemo finished in {(time.time() - t0) / 60:.1f} min; {path} begins:\n\n" + "\n".join(lines[:1]), flush=True)
    return path
