"""Does synthetic data help? The augmentation experiment and the demo; study/report.py
writes the report (study/stats.py: its statistics; study/memorization.py: the copy checks).

Patient-disjoint splits; nested real subsets (10% inside 25% inside the train split) with one
generator per class AND real fraction (ddpm-cfg: one for both classes), trained only on that
cell's images (study/generators.py; external samples, `--synthetic NAME=DIR`, join every cell).
Synthetic images only train, and a set holding a copy of a held-out image is refused; selection
uses the real validation split. A grid of ratios x real fractions x generators x seeds, each run
PAIRED with the real-only run of its seed at the same optimiser steps, judged by
stats.compare_generators; every synthetic set first meets the usability gate (study/gate.py).

Everything lands in OUT: study.json (the inputs it depends on; a changed one is refused),
real_subsets/, generators/, synthetic/, gate.json, scores/, results.csv (one row per classifier
run, so a study resumes where it stopped), summary.json, report.md. Why: docs/experiment.md.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

import classify
import data
import dcgan
import ddpm
import diffusion
import fid
from study import gate
from tools import phantoms
from study import report
from study import stats
from study.generators import (GENERATORS, choose_guidance, ddpm_recipe, gan_recipe, noise_seed,  # noqa: F401 (study.X)
                        recipe, sample_generator, train_generator)
from plumbing.configs import CLIError, check_config, first_line, flag, option_name, user_error
from plumbing.files import atomic_path, check_output
from training import ddpm_run
from training.harness import run_lock
from tools import layout

RESULT_FIELDS = ("run", "mode", "generator", "ratio", "real_fraction", "seed", "auroc", "auroc_ci_low",
                 "auroc_ci_high", "accuracy", "sensitivity", "specificity", "n_train", "n_synthetic",
                 "n_test", "test_set", "seconds", "finished_at", "steps", "synthetic_set", "generator_run")
SUBSET_SEED = 0  # the one random order of the real training images that every nested subset is cut from
DDPM_STEPS, GAN_STEPS, EVAL_EVERY = 600, 500, 100  # per class at fraction 1 (docs/real_xrays.md)


# --------------------------------------------------------------------------- configuration


@dataclass
class StudyConfig:
    """One study. `ddpm`, `gan`, `ddpm_cfg`: the generators' training configs for every cell."""

    data: Path
    out: Path
    ddpm: ddpm_run.TrainConfig | None = None  # needed when "ddpm" is among the generators
    gan: dcgan.TrainConfig | None = None  # needed when "gan" is
    ddpm_cfg: ddpm_run.TrainConfig | None = None  # needed when "ddpm-cfg" is (conditional=True)
    generators: tuple[str, ...] = GENERATORS
    external: dict[str, Path] = field(default_factory=dict)  # NAME -> DIR/{infiltration,no_finding}/: given samples
    ratios: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)  # synthetic images per real training image, per class
    real_fractions: tuple[float, ...] = (1.0, 0.25, 0.1)
    seeds: int = 5
    generator_runs: int = 3  # training runs of each generator recipe per cell; classifier seed i uses run i mod K
    size: int = 32  # the common resolution of real and synthetic images for the classifier
    classifier: str = "resnet18"
    classifier_epochs: int = 20  # the real-only run's epochs: every run of a real fraction takes its steps
    classifier_batch_size: int = 64
    margin: float = stats.MARGIN
    tstr: bool = True
    bootstrap: int = 2000
    fid_max_images: int = 2000
    inception: bool = True  # try Inception FID/KID/IS (slow on a CPU); the classifier-feature distances always run
    device: str = "auto"
    sampler: str = "ddpm"  # the cheapest within KID's SD of DDPM-1000 on phantoms (docs/ddpm.md, "Sampler quality")
    sample_steps: int | None = None  # None: the sampler's default, diffusion.DEFAULT_STEPS
    n_synthetic: int | None = None  # per class and cell; None = enough for the largest ratio
    title: str = "the augmentation experiment"
    gate: gate.GateConfig = field(default_factory=gate.GateConfig)  # its size and device are the study's

    def __post_init__(self):
        missing = [g for g in self.generators if recipe(self, g) is None]
        if missing:
            raise CLIError(f"the study trains {', '.join(missing)} but has no training config for it")
        if not self.margin >= 0:
            raise CLIError(f"--margin must be at least 0, got {self.margin}")
        runs = self.generator_runs
        if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
            raise CLIError(f"--generator-runs must be a whole number of at least 1, got {runs!r}")
        if self.generators and runs > self.seeds:  # the budget: a run no classifier trains with is wasted
            raise CLIError(f"--generator-runs {runs} is more than --seeds {self.seeds}: every generator run needs a "
                           "classifier seed (seed i uses run i mod K); raise --seeds or lower --generator-runs")
        with user_error():  # before any generator trains
            diffusion.check_sampler(self.sampler, self.sample_steps, option="--sample-steps")
        self.sample_steps = self.sample_steps or diffusion.DEFAULT_STEPS[self.sampler]

    @property
    def all_generators(self) -> tuple[str, ...]:
        return self.generators + tuple(self.external)


@dataclass
class ExperimentOptions:
    """The options of `python main.py experiment`; `study_config` turns them into a StudyConfig."""

    data: Path = flag(help="real data in the extract layout (patient-disjoint splits)")
    out: Path = flag(help="study folder; re-running skips finished work")
    generators: str = flag("ddpm,gan,ddpm-cfg", "comma-separated: ddpm (one per class), gan (one per class), "
                           "ddpm-cfg (one class-conditional DDPM for both, with classifier-free guidance)")
    ratios: str = flag("0,0.5,1,2", "synthetic images per real training image (0 = real only)")
    real_fractions: str = flag("1,0.25,0.1", "nested fractions of the real train split (stratified)")
    seeds: int = flag(5, "classifier training seeds per setting (under 3: the verdict can only be inconclusive)",
                      min=1)
    generator_runs: int = flag(3, "training runs of each generator per cell, each with its own seed and sampling "
                               "noise; classifier seed i uses run i mod K (1: the verdict can only be inconclusive)",
                               min=1)
    margin: float = flag(stats.MARGIN, "equivalence margin: the smallest AUROC difference worth having", min=0)
    n_synthetic: int | None = flag(None, "samples per class and cell (default: enough for the largest ratio)", min=1)
    classifier: str = flag("resnet18", "the classifier's network", choices=classify.MODELS)
    size: int = flag(32, "common resolution of real and synthetic images", min=1)
    epochs: int = flag(20, "classifier epochs of real data: the step budget of every run of a fraction", min=1)
    batch_size: int = flag(64, "classifier batch size", min=1)
    ddpm_finetune: bool = flag(False, "fine-tune google/ddpm-cifar10-32 (needs --pretrained)")
    pretrained: Path | None = flag(None, "google/ddpm-cifar10-32 weights (file or folder)")
    ddpm_preset: str | None = flag(None, "train this DDPM from scratch (default: fine-tune when weights are found, "
                                         "else tiny)", choices=tuple(ddpm.PRESETS))
    ddpm_max_steps: int = flag(DDPM_STEPS, "DDPM steps per class at fraction 1 (scaled); given, wins over epochs", min=1)
    ddpm_epochs: int | None = flag(None, "DDPM epochs per class, the budget when --ddpm-max-steps is left out", min=1)
    gan_size: int = flag(64, "GAN resolution (samples are resized to --size)", choices=dcgan.SIZES)
    gan_max_steps: int = flag(GAN_STEPS, "GAN steps per class at fraction 1 (scaled); given, wins over epochs", min=1)
    gan_epochs: int | None = flag(None, "GAN epochs per class, the budget when --gan-max-steps is left out", min=1)
    sampler: str = flag("ddpm", "the DDPM's sampler for the synthetic images", choices=tuple(diffusion.DEFAULT_STEPS))
    sample_steps: int | None = flag(None, "DDPM sampling steps (default: 1000 ddpm, 50 ddim, 20 dpmpp)", min=1)
    tstr: bool = flag(True, "train on synthetic, test on real (TSTR); --no-tstr skips it", flag="--no-tstr")
    bootstrap: int = flag(2000, "bootstrap resamples (seeds x test patients) for the report's intervals", min=100)
    device: str = flag("auto", "auto, cpu, cuda, cuda:1")
    synthetic: tuple[str, ...] = ()  # NAME=DIR, repeatable: main.py adds the option

    def __post_init__(self):
        check_config(self)


DDPM_OPTIONS = ("ddpm_finetune", "pretrained", "ddpm_preset", "ddpm_max_steps", "ddpm_epochs", "sampler", "sample_steps")
GAN_OPTIONS = ("gan_size", "gan_max_steps", "gan_epochs")  # ExperimentOptions of one generator kind each


def _floats(text: str, name: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise CLIError(f"{name} must be comma-separated numbers, got {text!r}") from None
    if not vals:
        raise CLIError(f"{name} is empty")
    return vals


def external_generators(specs: tuple[str, ...], root: Path) -> dict[str, Path]:
    """--synthetic NAME=DIR options as {NAME: DIR}, each folder checked (both class
    subfolders with images, no overlap with the held-out splits) before any work."""
    out = {}
    for spec in specs:
        name, _, folder = (s.strip() for s in spec.partition("="))
        if not name or not folder:
            raise CLIError(f"--synthetic {spec!r}: expected NAME=DIR")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", name) or name in GENERATORS + ("none", "real", "tstr", *out):
            raise CLIError(f"--synthetic {spec!r}: NAME must be letters, digits and '-', and not "
                           f"{', '.join(GENERATORS)}, none, real, tstr or a name given twice")
        out[name] = data.check_synthetic_folder(Path(folder), root, f"--synthetic {name}={folder}")
    return out


def check_layout(root: Path) -> None:
    for d in data.SPLIT_DIRS.values():
        if not (root / d).is_dir():
            raise CLIError(f"{root} is not in the extract layout: {root / d} is missing "
                           f"(make one with `python main.py extract`)")


def check_out(out: Path, root: Path) -> None:
    """Before any work: --data (where it exists) in the extract layout, and --out a
    folder (or not there yet) outside its split folders."""
    if root.is_dir():
        check_layout(root)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file, not a folder")
    splits = [root.resolve() / d for d in data.SPLIT_DIRS.values()]
    if any(d in [out.resolve(), *out.resolve().parents] for d in splits):
        raise CLIError(f"--out {out} lies inside a split folder of --data {root}: its images would be read as data")
    check_output(out, "--out", folder=True)  # a read-only folder, a parent that is a file


def study_config(o: ExperimentOptions) -> StudyConfig:
    """The study the experiment's options describe, each list and path checked."""
    gens = tuple(g.strip() for g in o.generators.split(",") if g.strip())
    bad = [g for g in gens if g not in GENERATORS]
    if bad:
        raise CLIError(f"--generators: unknown {bad} (choose from {','.join(GENERATORS)})")
    ratios = tuple(sorted(set(_floats(o.ratios, "--ratios"))))
    if min(ratios) < 0 or 0 not in ratios or len(ratios) < 2:
        raise CLIError("--ratios must be >= 0 and include 0 (the real-only baseline) and at least one positive ratio")
    fracs = tuple(sorted(set(_floats(o.real_fractions, "--real-fractions")), reverse=True))
    if not all(0 < f <= 1 for f in fracs):
        raise CLIError("--real-fractions must lie in (0, 1]")
    if o.ddpm_finetune and o.pretrained is None:
        raise CLIError("--ddpm-finetune needs --pretrained PATH (google/ddpm-cifar10-32 weights)")
    if o.ddpm_preset is not None and o.pretrained is not None:  # options that would do nothing are refused
        raise CLIError(f"--ddpm-preset {o.ddpm_preset} with --pretrained: the DDPM is fine-tuned from the weights; "
                       "leave out one of them")
    for names, needs in ((DDPM_OPTIONS, {"ddpm", "ddpm-cfg"}), (GAN_OPTIONS, {"gan"})):
        given = [f for f in dataclasses.fields(o) if f.name in names and getattr(o, f.name) != f.default]
        if given and not needs & set(gens):
            raise CLIError(f"{option_name(given[0])} with --generators {o.generators!r}: it sets a generator "
                           "the study does not train")
    if o.pretrained is not None and not o.pretrained.exists():
        raise CLIError(f"--pretrained: not found: {o.pretrained}")
    if not o.data.is_dir():
        raise CLIError(f"--data: folder not found: {o.data}")
    check_out(o.out, o.data)
    external = external_generators(o.synthetic, o.data)
    if not gens and not external:
        raise CLIError("--generators is empty and no --synthetic NAME=DIR is given: nothing to compare")
    ddpm_steps = None if o.ddpm_epochs and o.ddpm_max_steps == DDPM_STEPS else o.ddpm_max_steps
    gan_steps = None if o.gan_epochs and o.gan_max_steps == GAN_STEPS else o.gan_max_steps
    return StudyConfig(
        o.data, o.out,
        ddpm=ddpm_recipe(o.ddpm_preset, o.pretrained, epochs=o.ddpm_epochs, max_steps=ddpm_steps,
                         eval_every=EVAL_EVERY) if "ddpm" in gens else None,
        gan=gan_recipe(size=o.gan_size, epochs=o.gan_epochs, max_steps=gan_steps, eval_every=EVAL_EVERY)
        if "gan" in gens else None,
        ddpm_cfg=ddpm_recipe(o.ddpm_preset, o.pretrained, epochs=o.ddpm_epochs, conditional=True,  # both classes:
                             max_steps=ddpm_steps and 2 * ddpm_steps, eval_every=2 * EVAL_EVERY)  # the pair's steps
        if "ddpm-cfg" in gens else None,
        generators=gens, external=external, ratios=ratios, real_fractions=fracs, seeds=o.seeds,
        generator_runs=o.generator_runs, size=o.size,
        classifier=o.classifier, classifier_epochs=o.epochs, classifier_batch_size=o.batch_size, margin=o.margin,
        tstr=o.tstr, bootstrap=o.bootstrap, device=o.device, sampler=o.sampler, sample_steps=o.sample_steps,
        n_synthetic=o.n_synthetic)


# --------------------------------------------------------------------------- real data, subsets, fingerprints


@dataclass
class RealData:
    """The three real splits at the classifier's resolution."""

    train_x: torch.Tensor  # (N, S, S) uint8
    train_y: torch.Tensor  # (N,) int64
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    paths: dict[str, list[str]]  # per split
    test_patients: np.ndarray  # (n_test,) patient id of each test image
    patients_note: str  # where the patient ids came from


def patients_of(root: Path, paths: list[str]) -> tuple[np.ndarray, str]:
    """Each test image's patient from ROOT/manifest.csv (`patient_id`); an image the
    manifest does not list (or all, without a manifest) is its own patient."""
    rows = layout.read_manifest(root) if (root / "manifest.csv").is_file() else []
    known = {str((root / r["image"]).resolve()): r["patient_id"] for r in rows if r.get("patient_id")}
    ids = [known.get(str(Path(p).resolve())) for p in paths]
    missing = sum(i is None for i in ids)
    ids = np.array([i if i is not None else f"image:{p}" for i, p in zip(ids, paths)])
    if not missing:
        return ids, "patients from manifest.csv"
    return ids, (f"{missing} of {len(paths)} test images have no patient_id in manifest.csv"
                 if rows else "no manifest.csv") + ": each such image is counted as its own patient"


def load_real(root: Path, size: int) -> RealData:
    check_layout(root)
    tr, va, te = (data.load_split(root, s, size) for s in data.SPLITS)
    for name, s in (("train", tr), ("validation", va), ("test", te)):
        if set(s.labels.tolist()) != {0, 1}:
            raise CLIError(f"the {name} split under {root} needs images of both classes (infiltration, no_finding)")
    patients, note = patients_of(root, list(te.paths))
    return RealData(tr.images, tr.labels, va.images, va.labels, te.images, te.labels,
                    {"train": list(tr.paths), "validation": list(va.paths), "test": list(te.paths)}, patients, note)


def real_subset(labels: np.ndarray, fraction: float, seed: int = SUBSET_SEED) -> np.ndarray:
    """Indices of a stratified subset of the real training split: the first
    round(fraction * n_c) images (at least 2) of class c in one random order per
    class that depends on `seed` alone. So the subsets are NESTED: 10% inside 25%
    inside the full split. The study keeps the seed fixed (SUBSET_SEED): every
    classifier seed of a cell sees the images that cell's generator trained on."""
    rng = np.random.default_rng(seed)
    keep = []
    for c in (0, 1):
        order = rng.permutation(np.flatnonzero(labels == c))
        keep.append(order[:min(len(order), max(2, round(fraction * len(order))))])
    return np.sort(np.concatenate(keep))


def synthetic_subset(labels: np.ndarray, per_class: dict[int, int], seed: int, salt: int) -> np.ndarray:
    """per_class[c] synthetic images of class c: the first ones of a random order
    per (seed, salt), so the subsets of ratios 0.5, 1 and 2 are nested."""
    rng = np.random.default_rng([seed, salt, 17])
    keep = [rng.permutation(np.flatnonzero(labels == c))[:per_class.get(c, 0)] for c in (0, 1)]
    return np.sort(np.concatenate(keep))


def folder_digest(folder: Path) -> str:
    """A hash of every image file under `folder`: its relative name and its bytes."""
    return data.digest(*(f"{p.relative_to(folder).as_posix()}:{hashlib.sha256(p.read_bytes()).hexdigest()}"
                    for p in data.list_images(folder)))


def study_inputs(cfg: StudyConfig) -> dict[str, str]:
    """What the study's work depends on outside OUT: each split's files and contents,
    manifest.csv, and every --synthetic folder."""
    inputs = {f"{s} split": folder_digest(cfg.data / d) for s, d in data.SPLIT_DIRS.items()}
    manifest = cfg.data / "manifest.csv"
    inputs["manifest.csv"] = data.digest(manifest.read_bytes()) if manifest.is_file() else "none"
    inputs |= {f"--synthetic {name}": folder_digest(folder) for name, folder in cfg.external.items()}
    return inputs


# Settings that may grow or change between invocations of one study: they add runs or change the report only.
GRID_EXTENT = ("out", "generators", "external", "ratios", "real_fractions", "seeds", "margin", "tstr", "bootstrap",
               "fid_max_images", "inception", "device", "title", "gate")


def check_same_study(cfg: StudyConfig, inputs: dict[str, str]) -> None:
    """Refuse to mix work from other inputs in one OUT: finished runs and generators
    are reused by name, so the recipe (resolution, classifier, generators' configs)
    and the inputs (study_inputs) must be those that made them (OUT/study.json)."""
    path = cfg.out / "study.json"
    recipe = json.loads(json.dumps({k: v for k, v in dataclasses.asdict(cfg).items() if k not in GRID_EXTENT},
                                   default=str))
    if path.is_file():
        old = json.loads(path.read_text())
        if set(old) != {"recipe", "inputs"}:
            raise CLIError(f"{cfg.out} holds a study written by an older version of this program; use a new --out")
        was = old["recipe"].get("generator_runs")  # classifier runs belong to their seed's generator run
        if was != cfg.generator_runs:
            what = f"of {was} generator run(s) per cell, not {cfg.generator_runs}" if was else "of an older version"
            raise CLIError(f"{cfg.out} holds a study {what}: two designs are never mixed; use a new --out"
                           + (f" or --generator-runs {was}" if was else ""))
        changed = sorted(k for k in set(old["recipe"]) | set(recipe) if old["recipe"].get(k) != recipe.get(k))
        if changed:
            k = changed[0]
            raise CLIError(f"{cfg.out} holds a study made with other settings: {k} changed ({old['recipe'].get(k)} "
                           f"there, {recipe.get(k)} now); use a new --out or the same settings")
        changed = [k for k in inputs if k in old["inputs"] and old["inputs"][k] != inputs[k]]
        if changed:
            raise CLIError(f"the {changed[0]} changed since {cfg.out} was made (other files or contents), and its "
                           "finished runs and generators belong to the old data; use a new --out")
        inputs = {**old["inputs"], **inputs}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"recipe": recipe, "inputs": inputs}, indent=1))


# --------------------------------------------------------------------------- generators: one per class and fraction


class Pool(NamedTuple):
    """The synthetic images of one generator and real fraction, at the classifier's size: all its training runs'."""

    images: torch.Tensor  # (N, S, S) uint8
    labels: torch.Tensor  # (N,)
    digest: str  # of the pixels and labels: a finished run or measurement is reused only with the same pool
    runs: np.ndarray | None = None  # (N,) the generator run of each image; None: one run (a given set)
    run_digests: tuple[str, ...] = ()  # the digest of each run's images

    def of_run(self, k: int) -> Pool:
        """The images of generator run k (a pool of one run: itself)."""
        if self.runs is None:
            return self
        keep = torch.from_numpy(np.flatnonzero(self.runs == k))
        return Pool(self.images[keep], self.labels[keep], self.run_digests[k])


def generator_run(cfg: StudyConfig, gen: str, seed: int) -> int:
    """The training run of `gen` that classifier seed `seed` uses: stats.assign_runs' seed mod K (a given set: 0)."""
    return seed % (cfg.generator_runs if gen in cfg.generators else 1)


def subset_folder(cfg: StudyConfig, real: RealData, frac: float) -> tuple[Path, str]:
    """The cell's real training images as a folder a generator reads, and a hash of
    which they are: the train split itself when the subset is all of it, else
    OUT/real_subsets/f<frac>/<class>/ with copies of its files (written to a
    temporary folder and renamed, so a folder there is complete)."""
    idx = real_subset(real.train_y.numpy(), frac)
    class_of = {label: cls for cls, label in data.LABELS.items()}
    train = real.paths["train"]
    files = {f"{class_of[int(real.train_y[i])]}/{Path(train[i]).name}": train[i] for i in idx}
    trained_on = data.digest(*sorted(files))
    if len(idx) == len(real.train_y):
        return cfg.data / data.SPLIT_DIRS["train"], trained_on
    folder = cfg.out / "real_subsets" / f"f{frac:g}"
    if folder.is_dir() and {p.relative_to(folder).as_posix() for p in data.list_images(folder)} == set(files):
        return folder, trained_on
    tmp = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for rel, src in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, tmp / rel)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder, trained_on


def load_pool(cfg: StudyConfig, folder: Path, what: str, real: RealData, runs: bool = False) -> Pool:
    """A synthetic folder at the classifier's size; refused if it holds a held-out image. With `runs`, each
    generator run's images lie in FOLDER/g<run>/ (generators.sample_generator)."""
    s = data.load_folder(folder, cfg.size, progress=False)
    if (s.labels < 0).any():
        raise CLIError(f"{what}: {s.paths[int(np.flatnonzero(s.labels.numpy() < 0)[0])]} is in no class folder "
                       f"({' or '.join(c + '/' for c in data.CLASSES)})")
    heldout = {"validation": (real.val_x, real.paths["validation"]), "test": (real.test_x, real.paths["test"])}
    data.check_no_heldout_copies(s.images, s.paths, heldout, what)
    digest = lambda keep: data.digest(*data.pixel_hashes(s.images[keep]), *s.labels[keep].tolist())  # noqa: E731
    if not runs:
        return Pool(s.images, s.labels, digest(slice(None)))
    run = np.array([int(Path(p).relative_to(folder).parts[0].removeprefix("g")) for p in s.paths])
    return Pool(s.images, s.labels, digest(slice(None)), run,
                tuple(digest(torch.from_numpy(np.flatnonzero(run == k))) for k in range(run.max() + 1)))


def make_pools(cfg: StudyConfig, real: RealData, pools: dict) -> dict[str, dict[float, Pool]]:
    """{generator: {real fraction: Pool}}: `pools` (the external ones) and the trained generators' samples,
    per class, real fraction (ddpm-cfg: one model for both classes) and training run, each run in one Pool."""
    ty = real.train_y.numpy()
    for frac in cfg.real_fractions:
        sub = real_subset(ty, frac)
        n_real = max(int((ty[sub] == c).sum()) for c in (0, 1))
        n_syn = cfg.n_synthetic or max(1, math.ceil(max(cfg.ratios + (1.0,)) * n_real))
        folder, trained_on = subset_folder(cfg, real, frac) if cfg.generators else (None, "")
        for gen, run in ((g, k) for g in cfg.generators for k in range(cfg.generator_runs)):
            if gen == "ddpm-cfg":  # one model for both classes, its guidance scale chosen on validation
                ckpt, fresh = train_generator(cfg, gen, None, frac, folder, trained_on, len(sub) / len(ty), run)
                w = choose_guidance(cfg, ckpt, frac, real, fresh)
                for cls in data.CLASSES:
                    sample_generator(cfg, gen, cls, frac, ckpt, n_syn, fresh, guidance=w, run=run)
            else:
                for cls in data.CLASSES:
                    share = float((ty[sub] == data.LABELS[cls]).sum() / (ty == data.LABELS[cls]).sum())
                    ckpt, fresh = train_generator(cfg, gen, cls, frac, folder, trained_on, share, run)
                    sample_generator(cfg, gen, cls, frac, ckpt, n_syn, fresh, run=run)
            if run < cfg.generator_runs - 1:
                continue
            pool = load_pool(cfg, cfg.out / "synthetic" / gen / f"f{frac:g}", f"the {gen} samples", real, runs=True)
            pools.setdefault(gen, {})[frac] = pool
    return pools


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
    """The grid; ratio 0 is the real-only baseline, shared by every generator.
    TSTR uses the generators of the largest real fraction."""
    runs = []
    for seed in range(cfg.seeds):
        for frac in cfg.real_fractions:
            runs.append(Run("real", "none", 0.0, frac, seed))
            runs += [Run("aug", g, r, frac, seed) for g in cfg.all_generators for r in cfg.ratios if r > 0]
        if cfg.tstr:
            runs += [Run("tstr", g, 0.0, max(cfg.real_fractions), seed) for g in cfg.all_generators]
    return runs


def step_budget(cfg: StudyConfig, n_real: int) -> int:
    """Optimiser steps of every run of one real fraction: the real-only run's, classifier_epochs epochs of n_real."""
    return cfg.classifier_epochs * max(1, n_real // min(cfg.classifier_batch_size, n_real))


def classifier_config(cfg: StudyConfig, seed: int, steps: int | None = None) -> classify.ClassifyConfig:
    return classify.ClassifyConfig(model=cfg.classifier, size=cfg.size, epochs=cfg.classifier_epochs, steps=steps,
                                   batch_size=cfg.classifier_batch_size, seed=seed, device=cfg.device)


def run_classifier(cfg: StudyConfig, run: Run, real: RealData, pools: dict) -> tuple[dict, np.ndarray, object]:
    """Train one classifier for `run`; return its metrics, its test scores and the model."""
    ty = real.train_y.numpy()
    sub = real_subset(ty, run.fraction)
    tx, ty_t = real.train_x[sub], real.train_y[sub]
    steps = step_budget(cfg, len(sub))
    sx = sy = None
    if run.mode != "real":
        pool = pools[run.generator][run.fraction].of_run(generator_run(cfg, run.generator, run.seed))
        counts = {c: int((ty_t == c).sum()) for c in (0, 1)}
        if run.mode == "aug":
            per_class = {c: round(run.ratio * k) for c, k in counts.items()}
        else:  # TSTR: as many synthetic images as the real training set has, class by class
            per_class = counts
        salt = int(data.digest(run.generator)[:8], 16)  # each generator its own draw order
        pick = synthetic_subset(pool.labels.numpy(), per_class, run.seed, salt)
        if len(pick) < sum(per_class.values()):
            print(f"warning: {run.name} wants {sum(per_class.values())} synthetic images, only {len(pick)} exist "
                  "(raise --n-synthetic); results.csv records the number used", flush=True)
        sx, sy = pool.images[pick], pool.labels[pick]
        if run.mode == "tstr":
            tx, ty_t, sx, sy = sx, sy, None, None
    metrics, model = classify.train_and_evaluate(tx, ty_t, real.val_x, real.val_y, real.test_x, real.test_y,
                                                 classifier_config(cfg, run.seed, steps), synthetic_x=sx,
                                                 synthetic_y=sy, progress=False)
    scores = np.asarray(classify.predict(model, real.test_x), dtype=np.float64)  # float64: no artificial ties
    return metrics, scores, model


def run_grid(cfg: StudyConfig, real: RealData, pools: dict, test_set: str) -> list[dict]:
    """Train every classifier of the grid not already in results.csv (a finished
    run counts only with the same test split and synthetic pool); return the grid's rows."""
    results_path = cfg.out / "results.csv"

    def pool_of(run: Run) -> str:  # the images of the generator run that the run's seed trains with
        if run.mode == "real":
            return ""
        return pools[run.generator][run.fraction].of_run(generator_run(cfg, run.generator, run.seed)).digest

    def reusable(r: dict) -> bool:
        same_pool = r["run"] not in by_name or r.get("synthetic_set") == pool_of(by_name[r["run"]])
        return (cfg.out / "scores" / f"{r['run']}.npy").is_file() and r["test_set"] == test_set and same_pool
    runs = plan_runs(cfg)
    by_name = {r.name: r for r in runs}
    rows = [r for r in read_results(results_path) if reusable(r)]
    done = {r["run"] for r in rows}
    save_npy(real.test_y.numpy(), cfg.out / "scores" / "test_labels.npy")
    todo = [r for r in runs if r.name not in done]
    print(f"\n== classifiers: {len(runs)} runs in the grid, {len(runs) - len(todo)} already done, {len(todo)} to go",
          flush=True)
    ref = Run("real", "none", 0.0, max(cfg.real_fractions), 0)  # its features serve memorisation and distances
    for i, run in enumerate(todo, 1):
        t0 = time.time()
        metrics, scores, model = run_classifier(cfg, run, real, pools)
        if run == ref:  # the real-only classifier whose features the memorisation check and FID use
            classify.save_classifier(model, classifier_config(cfg, run.seed), cfg.out / "classifiers" / "reference.pt",
                                     metrics)
        save_npy(scores, cfg.out / "scores" / f"{run.name}.npy")
        if run.mode == "tstr":  # classify saw the synthetic images as its training set: name them as such
            metrics = {**metrics, "n_train": 0, "n_synthetic": metrics.get("n_train", 0)}
        rows = [r for r in rows if r["run"] != run.name]
        rows.append({**{k: metrics.get(k, "") for k in RESULT_FIELDS}, "run": run.name, "mode": run.mode,
                     "generator": run.generator, "ratio": run.ratio, "real_fraction": run.fraction,
                     "seed": run.seed, "test_set": test_set, "synthetic_set": pool_of(run),
                     "generator_run": "" if run.mode == "real" else generator_run(cfg, run.generator, run.seed),
                     "seconds": round(time.time() - t0, 1), "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")})
        write_results(results_path, rows)  # after every run: an interruption loses at most one run
        print(f"[{i}/{len(todo)}] {run.name}: test AUROC {metrics['auroc']:.3f}, {int(metrics['steps'])} steps, "
              f"{int(metrics.get('n_train', 0))} real + {int(metrics.get('n_synthetic', 0))} synthetic, "
              f"{time.time() - t0:.0f}s", flush=True)
    return [r for r in rows if r["run"] in by_name]


# --------------------------------------------------------------------------- the whole study


def run_study(cfg: StudyConfig) -> Path:
    """The study under a lock on OUT: one study at a time in a folder."""
    check_out(cfg.out, cfg.data)
    with run_lock(cfg.out, "study"):
        return _run_study(cfg)


def fetch_inception() -> None:
    """Once, before any work: the FID Inception weights into models/ (downloaded when absent), or one note
    saying which file to put where. report.py reads them from disk only, and without them leaves Inception out."""
    try:
        fid.resolve_weights(None)
    except CLIError as e:  # offline, or a download with the wrong hash
        print(f"note: no FID Inception weights ({first_line(e.__cause__ or e)}): the report leaves out Inception "
              f"FID, KID and IS; to have them, put {fid.WEIGHTS_FILE} (from {fid.WEIGHTS_URL}) at "
              f"{fid.default_weights_path()} and run the same command again", flush=True)


def _run_study(cfg: StudyConfig) -> Path:
    """Inputs checked, generators, samples, classifier grid, memorisation, distances, report."""
    t_start = time.time()
    real = load_real(cfg.data, cfg.size)
    external = {name: dict.fromkeys(cfg.real_fractions, load_pool(cfg, folder, f"--synthetic {name}", real))
                for name, folder in cfg.external.items()}  # one set of samples for every fraction, checked first
    inputs = study_inputs(cfg)
    check_same_study(cfg, inputs)
    with atomic_path(cfg.out / "splits.json") as tmp:  # what every run was validated and tested on
        tmp.write_text(json.dumps({"data": str(cfg.data), "size": cfg.size, "validation": real.paths["validation"],
                                   "test": real.paths["test"]}, indent=0))
    print(f"real data at {cfg.size}px: {len(real.train_y)} train, {len(real.val_y)} validation, "
          f"{len(real.test_y)} test ({len(set(real.test_patients))} test patients; {real.patients_note})", flush=True)
    if cfg.inception:
        fetch_inception()  # once, after the inputs are checked and before the hours of work
    pools = make_pools(cfg, real, external)
    gates = gate.check_pools(cfg, real, pools)  # before the grid: is each set of samples usable?
    rows = run_grid(cfg, real, pools, inputs["test split"])
    path = report.evaluate_and_write(cfg, real, pools, gates, rows, elapsed=time.time() - t_start)
    print(f"\nwrote {path}, {cfg.out / 'summary.json'} and {cfg.out / 'results.csv'} ({time.time() - t_start:.0f}s)",
          flush=True)
    return path


# --------------------------------------------------------------------------- the demo: everything on phantoms, on a CPU


@dataclass
class DemoConfig:
    """The options of `python main.py demo`."""

    out: Path = flag(Path("runs/demo"), "study folder: phantoms in OUT/data, then everything `experiment` writes")
    quick: bool = flag(False, "a much smaller smoke test (a minute or two)")
    device: str = flag("auto", "auto, cpu, cuda, cuda:1")


def demo_config(out: Path, quick: bool, device: str) -> tuple[StudyConfig, int]:
    """The demo's reduced study and its phantom count: the full demo for a CPU, --quick for the tests."""
    if quick:
        cfg = StudyConfig(out / "data", out,
                          ddpm=ddpm_recipe("tiny", max_steps=8, batch_size=16, sample_steps=2, num_samples=4,
                                           ema_decay=0.5),
                          gan=gan_recipe(size=64, max_steps=8, batch_size=16),
                          ddpm_cfg=ddpm_recipe("tiny", max_steps=16, batch_size=16, sample_steps=2, num_samples=4,
                                               ema_decay=0.5, conditional=True),
                          ratios=(0.0, 1.0), real_fractions=(1.0, 0.5), seeds=2, generator_runs=2,
                          classifier="small", classifier_epochs=2, classifier_batch_size=32, bootstrap=200,
                          fid_max_images=64, inception=False, device=device, sampler="dpmpp", sample_steps=4,
                          gate=gate.GateConfig(epochs=2, patience=1),
                          title="the quick demo (phantoms, tiny models: a smoke test)")
        return cfg, 120
    # One real fraction and one ratio, 350 steps per class for the DDPMs and 700 for the one of both classes,
    # one generator run and two seeds (so its verdict is a smoke test): sized to keep the demo, gate included, to
    # minutes on a CPU (docs/performance.md, "Measured times").
    cfg = StudyConfig(out / "data", out,
                      ddpm=ddpm_recipe("tiny", max_steps=350, batch_size=16, sample_steps=2, num_samples=4),
                      gan=gan_recipe(size=32, max_steps=300, batch_size=32),
                      ddpm_cfg=ddpm_recipe("tiny", max_steps=700, batch_size=16, sample_steps=2, num_samples=4,
                                           conditional=True),
                      ratios=(0.0, 1.0), real_fractions=(1.0,), seeds=2, generator_runs=1, classifier="small",
                      classifier_epochs=8, classifier_batch_size=32, bootstrap=1000, fid_max_images=200,
                      device=device, sampler="dpmpp", sample_steps=20,
                      title="the demo (embedded phantoms, small models, two seeds, one generator run: a smoke test)")
    return cfg, 400


def run_demo(out: Path, quick: bool = False, device: str = "auto") -> Path:
    t0 = time.time()
    cfg, n_phantoms = demo_config(out, quick, device)
    check_out(cfg.out, cfg.data)
    with run_lock(cfg.out, "demo"):
        if not (cfg.data / "manifest.csv").is_file():
            print(f"\n== writing {n_phantoms} phantom X-rays to {cfg.data}", flush=True)
            phantoms.write_phantoms(n_phantoms, cfg.data, size=64, seed=0)
        check_out(cfg.out, cfg.data)
        path = _run_study(cfg)
    first = path.read_text().split("\n# ")[0]  # the answer, after any gate and memorisation warnings
    print(f"\ndemo finished in {(time.time() - t0) / 60:.1f} min; {path} begins:\n\n{first}", flush=True)
    return path
