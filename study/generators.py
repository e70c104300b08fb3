"""The study's generators (study/experiment.py runs the experiment around them): the recipe of each, training one
on a cell's real images only (or reusing it), and drawing its samples into a folder. `ddpm` and `gan`
are one model per class and real fraction, trained on that class's images alone; `ddpm-cfg` is ONE
class-conditional DDPM per real fraction for both classes, sampled with classifier-free guidance (Ho &
Salimans 2022; ddpm.Guided) at the scale choose_guidance picks without the test split.

Nothing here imports study/experiment.py; `cfg` below is a study.experiment.StudyConfig.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

import classify
import data
import dcgan
import ddpm
from plumbing.configs import CLIError
from plumbing.files import atomic_path, load_checkpoint, save_png, to_uint8
from plumbing.runtime import pick_device
from training import ddpm_run
from training import gan_run
from training.harness import Interrupted

GENERATORS = ("ddpm", "gan", "ddpm-cfg")
GUIDANCE_GRID = (1.0, 1.5, 2.0, 3.0)  # the guidance scales ddpm-cfg chooses from (w = 1: plain conditional)
DEFAULT_GUIDANCE = 2.0  # kept unless another w's class separation clearly beats it (pick_guidance; docs/ddpm.md)
GUIDANCE_SAMPLES = 64  # samples per class and w that choose_guidance scores: AUROC's SD at chance about 0.05
GUIDANCE_ALPHA = 0.05  # pick_guidance's false-switch rate with no real difference between the scales
GUIDANCE_RULE = "class separation scored by a real-trained classifier; paired permutation test against the default"
# The DDPM from scratch: v-prediction on the cosine schedule, chosen by the measurements in docs/ddpm.md
# ("Does it matter here?") and docs/real_xrays.md.
SCRATCH = dict(preset="tiny", lr=2e-3, warmup=50, ema_decay=0.995, prediction="v_prediction", beta_schedule="cosine")


# --------------------------------------------------------------------------- recipes


def ddpm_recipe(preset: str | None = None, pretrained: Path | None = None, lr: float | None = None,
                **settings) -> ddpm_run.TrainConfig:
    """The DDPM of each cell: fine-tune google/ddpm-cifar10-32 (AdamW lr 1e-5, the original recipe) when its weights
    are given or on disk, else train from scratch with SCRATCH; `preset`, `lr`, `settings` win over either."""
    if pretrained is None and preset is None:
        local = Path(ddpm.DEFAULT_PRETRAINED)
        if (local / "config.json").is_file() or local.is_file():
            pretrained = local
        else:
            print(f"note: no google/ddpm-cifar10-32 weights at {local}; training the '{SCRATCH['preset']}' DDPM "
                  "from scratch (pass --pretrained PATH to fine-tune)", flush=True)
    plan = (dict(finetune=True, pretrained=pretrained, lr=lr or 1e-5) if pretrained is not None
            else {**SCRATCH, "preset": preset or SCRATCH["preset"], "lr": lr or SCRATCH["lr"]})
    return ddpm_run.TrainConfig(data=Path(), out=Path(), **{**plan, **settings})


def gan_recipe(**settings) -> dcgan.TrainConfig:
    """The DCGAN of each class (`settings`: dcgan.TrainConfig fields): a 16-image grid, one checkpoint."""
    return dcgan.TrainConfig(data=Path(), out=Path(), **{"num_samples": 16, "no_epoch_checkpoints": True, **settings})


# --------------------------------------------------------------------------- training and sampling, per cell


def recipe(cfg, gen: str):
    """The training config of generator `gen`: the study config's field of that name (ddpm-cfg: ddpm_cfg)."""
    return getattr(cfg, gen.replace("-", "_"))


def train_generator(cfg, gen: str, cls: str | None, frac: float, folder: Path, trained_on: str,
                    share: float, run: int = 0) -> tuple[Path, bool]:
    """Train (or reuse) the generator of one class (cls None: of both, ddpm-cfg) and real fraction on that cell's
    real images only; return its checkpoint and whether it was trained now. Its steps and monitoring cadence scale
    with `share` (cell images / all): every generator takes the same epochs. inputs.json records the images
    (others are refused); done.json marks a finished run; without it, a checkpoint is resumed. Training run
    `run` of the recipe trains with seed recipe.seed + run, in OUT/generators/<gen>[_<cls>]_f<frac>_g<run>."""
    out = cfg.out / "generators" / ((f"{gen}_{cls}_f{frac:g}" if cls else f"{gen}_f{frac:g}") + f"_g{run}")
    what = (f"class {cls}" if cls else "both classes") + f" (generator run {run})"
    done, ckpt, inputs = out / "done.json", out / "checkpoint.pt", out / "inputs.json"
    if inputs.is_file() and json.loads(inputs.read_text()).get("trained_on") != trained_on:
        raise CLIError(f"{out} was trained on other images than the real {frac:g} subset of {what} now: the data "
                       "changed; use a new --out")
    if done.is_file() and ckpt.is_file():
        print(f"reusing {gen} for {what} at real fraction {frac:g}: {ckpt}", flush=True)
        return ckpt, False
    base = recipe(cfg, gen)
    steps, every = (n if n is None else max(1, math.ceil(n * share)) for n in (base.max_steps, base.eval_every))
    print(f"\n== training the {gen} of {what} on the real {frac:g} subset ({folder})", flush=True)
    run = dataclasses.replace(base, data=folder, out=out, class_name=cls, device=cfg.device, resume=ckpt.is_file(),
                              max_steps=steps, eval_every=every, seed=base.seed + run,
                              eval_data=None if every is None else cfg.data / data.SPLIT_DIRS["validation"])
    with atomic_path(inputs) as tmp:
        tmp.write_text(json.dumps({"trained_on": trained_on, "data": str(folder)}))
    try:
        ckpt = {"ddpm": ddpm_run.train, "gan": gan_run.train, "ddpm-cfg": ddpm_run.train}[gen](run)
    except Interrupted as e:  # the study resumes a generator by itself: `experiment` has no --resume
        raise Interrupted(e.saved, "run the same command again to continue") from None
    with atomic_path(done) as tmp:
        finished = time.strftime("%Y-%m-%d %H:%M:%S")
        tmp.write_text(json.dumps({"config": dataclasses.asdict(run), "finished_at": finished}, default=str))
    return ckpt, True


def noise_seed(gen: str, cls: str, frac: float, run: int = 0) -> int:
    """A hash of (gen, cls, frac, run): one seed for all would give each DDIM infiltration sample a no_finding twin."""
    return int(data.digest(gen, cls, f"{frac:g}", f"run {run}")[:8], 16)


def sampled_checkpoint(ckpt: Path) -> dict:
    """What the study samples of the run whose checkpoint is `ckpt`: training/monitor.py's best.pt beside it when
    that is of the same run (the "run" name both hold, at a step no later than the checkpoint's), else `ckpt`.
    A best.pt of another run, or of a run that names none, is never sampled."""
    last, path = load_checkpoint(ckpt), ckpt.with_name("best.pt")
    if not path.is_file():
        return last
    best = load_checkpoint(path)
    if (isinstance(last, dict) and isinstance(best, dict) and last.get("run") is not None
            and best.get("run") == last["run"] and best.get("step", math.inf) <= last.get("step", -1)):
        return best
    print(f"note: {path} is not of the run of {ckpt} (another or an unnamed run); sampling {ckpt.name}", flush=True)
    return last


def draw(cfg, gen: str, cls: str, checkpoint: dict, n: int, seed: int, guidance: float = 1.0):
    """n images (n, C, H, W) in [-1, 1] of class `cls` from a generator's checkpoint."""
    device = pick_device(cfg.device)
    if gen == "gan":
        return dcgan.generate(checkpoint, n, seed=seed, batch_size=64, device=device)
    guided = {"class_name": cls, "guidance": guidance} if gen == "ddpm-cfg" else {}
    return ddpm.generate(checkpoint, n, seed=seed, batch_size=64, device=device, sampler=cfg.sampler,
                         steps=cfg.sample_steps, **guided)


def batch_auroc(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """AUROC of each row of scores (P, n), positive (n,) bool: the Mann-Whitney rank formula, ties averaged."""
    from scipy.stats import rankdata

    n1 = int(positive.sum())
    return (rankdata(scores, axis=1)[:, positive].sum(axis=1) - n1 * (n1 + 1) / 2) / (n1 * (len(positive) - n1))


def pick_guidance(scores: dict[float, np.ndarray], labels: np.ndarray, default: float = DEFAULT_GUIDANCE,
                  alpha: float = GUIDANCE_ALPHA, n_perm: int = 1000, seed: int = 0) -> dict:
    """The rule of choose_guidance. scores[w] (n,): a real-trained classifier's score of the n samples drawn at w,
    row i from the same noise for every w; labels (n,) their classes. Separation s_w = AUROC(scores[w], labels).
    The best w (ties: the smaller) replaces `default` only if a paired permutation test (each row's two scores
    swapped at random: exact when the two scales do not differ) gives s_best - s_default a one-sided p at most
    alpha / (K - 1), Bonferroni over the default's K - 1 rivals: with no real difference it switches at most
    alpha of the time. Otherwise `default` is kept."""
    if default not in scores:
        raise ValueError(f"the default guidance scale {default:g} is not among the candidates")
    y = np.asarray(labels) == 1
    sep = {w: float(batch_auroc(s[None], y)[0]) for w, s in scores.items()}
    best = max(sep, key=lambda w: (sep[w], -w))
    p = 1.0
    if best != default:
        a, b = scores[best], scores[default]
        swap = np.random.default_rng(seed).random((n_perm, len(a))) < 0.5  # (n_perm, n)
        a2, b2 = np.where(swap, b, a), np.where(swap, a, b)
        null = batch_auroc(a2, y) - batch_auroc(b2, y)
        p = float((1 + np.sum(null >= sep[best] - sep[default] - 1e-12)) / (1 + n_perm))
    level = alpha / max(1, len(scores) - 1)
    beats = p <= level
    return {"separation": {f"{w:g}": v for w, v in sep.items()}, "best": best, "default": default,
            "p_best_over_default": p, "level": level, "chosen": best if beats else default,
            "decision": ("the best w beats the default" if beats else "the default is the best w" if best == default
                         else "fallback: no w beats the default")}


def choose_guidance(cfg, ckpt: Path, frac: float, real, fresh: bool) -> float:
    """The guidance scale of a ddpm-cfg, chosen without the test split: a classifier (the gate's) trained on the
    real TRAINING images, its epoch chosen on validation, scores GUIDANCE_SAMPLES samples of each class at each w
    of GUIDANCE_GRID (noise of their own seed, the same for every w: paired), and pick_guidance chooses by the
    separation of the two classes' samples. OUT/generators/ddpm-cfg_f<frac>/guidance.json keeps the table
    (study/report.py reports it), reused unless the model is `fresh` or the file is of another rule."""
    path = ckpt.with_name("guidance.json")
    if not fresh and path.is_file() and json.loads(path.read_text()).get("rule") == GUIDANCE_RULE:
        return json.loads(path.read_text())["chosen"]
    print(f"\n== choosing the ddpm-cfg guidance scale at real fraction {frac:g} by class separation "
          f"(w in {', '.join(f'{w:g}' for w in GUIDANCE_GRID)}; default {DEFAULT_GUIDANCE:g})", flush=True)
    gcfg = dataclasses.replace(cfg.gate, size=cfg.size, device=cfg.device).classify_config()
    # the validation split stands in for test, which is never read here: selection and "test" both validation
    metrics, clf = classify.train_and_evaluate(real.train_x, real.train_y, real.val_x, real.val_y, real.val_x,
                                               real.val_y, gcfg, progress=False)
    checkpoint, scores = sampled_checkpoint(ckpt), {}  # training/monitor.py's pick
    labels = np.repeat([data.LABELS[c] for c in data.CLASSES], GUIDANCE_SAMPLES)
    for w in GUIDANCE_GRID:
        per_class = []
        for cls in data.CLASSES:
            images = draw(cfg, "ddpm-cfg", cls, checkpoint, GUIDANCE_SAMPLES,
                          noise_seed("ddpm-cfg guidance", cls, frac), w)
            grey = to_uint8(images.mean(dim=1, keepdim=True))  # (n, H, W) uint8, as the pool's PNGs hold
            per_class.append(torch.from_numpy(np.stack([data.center_crop_resize(g, cfg.size) for g in grey])))
        scores[w] = classify.predict(clf, torch.cat(per_class))
    table = pick_guidance(scores, labels)
    table["separation_ci"] = {f"{w:g}": classify.bootstrap_auroc_ci(s, labels) for w, s in scores.items()}  # 95%
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"grid": list(GUIDANCE_GRID), "rule": GUIDANCE_RULE, **table,
                                   "n_samples": GUIDANCE_SAMPLES, "classifier_val_auroc": metrics["val_auroc"]},
                                  indent=1))
    w = f"{table['chosen']:g}"
    print(f"guidance scale {w} ({table['decision']}; class separation {table['separation'][w]:.3f}, 95% interval "
          f"{table['separation_ci'][w][0]:.3f} to {table['separation_ci'][w][1]:.3f})", flush=True)
    return table["chosen"]


def sample_generator(cfg, gen: str, cls: str, frac: float, ckpt: Path, n: int, fresh: bool,
                     guidance: float = 1.0, run: int = 0) -> Path:
    """n grey samples of generator run `run` into OUT/synthetic/<gen>/f<frac>/g<run>/<cls>/ (reused unless `fresh`),
    at `guidance` for ddpm-cfg, via a temporary folder renamed at the end, so a folder of that name is complete."""
    folder = cfg.out / "synthetic" / gen / f"f{frac:g}" / f"g{run}" / cls
    if not fresh and folder.is_dir() and len(list(folder.glob("sample_*.png"))) >= n:
        print(f"reusing {n} {gen} samples of {cls} at real fraction {frac:g}, run {run}: {folder}", flush=True)
        return folder
    print(f"\n== sampling {n} {gen} images of class {cls} at real fraction {frac:g}, generator run {run}", flush=True)
    images = draw(cfg, gen, cls, sampled_checkpoint(ckpt), n, noise_seed(gen, cls, frac, run), guidance)  # best.pt
    grey = images.mean(dim=1, keepdim=True)  # (N, C, H, W) -> (N, 1, H, W): X-rays are grey, as `sample` writes
    tmp = folder.with_name(f".{cls}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for i, img in enumerate(to_uint8(grey)):
        save_png(img, tmp / f"sample_{i:05d}.png")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder

