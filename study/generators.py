"""The study's generators (study.py runs the experiment around them): the recipe of each, training one
on a cell's real images only (or reusing it), and drawing its samples into a folder. `ddpm` and `gan`
are one model per class and real fraction, trained on that class's images alone; `ddpm-cfg` is ONE
class-conditional DDPM per real fraction for both classes, sampled with classifier-free guidance (Ho &
Salimans 2022; ddpm.Guided) at the scale choose_guidance picks on the real validation split.

Nothing here imports study.py; `cfg` below is a study.StudyConfig.
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

import data
import dcgan
import ddpm
import fid
from training import monitor
from plumbing.configs import CLIError
from plumbing.files import atomic_path, load_checkpoint, save_png, to_uint8
from plumbing.runtime import pick_device
from training import ddpm_run
from training import gan_run

GENERATORS = ("ddpm", "gan", "ddpm-cfg")
GUIDANCE_GRID = (1.0, 1.5, 2.0, 3.0)  # the guidance scales ddpm-cfg chooses from (w = 1: plain conditional)
# The DDPM from scratch: v-prediction on the cosine schedule, which reached pixel KID 0.50 on real NIH images at
# 600 steps where epsilon + linear reached 8.0 (README, "Does it matter here?" and "Real X-rays at small scale").
SCRATCH = dict(preset="tiny", lr=2e-3, warmup=50, ema_decay=0.995, prediction="v_prediction", beta_schedule="cosine")


# --------------------------------------------------------------------------- recipes


def ddpm_recipe(preset: str | None = None, pretrained: Path | None = None, lr: float | None = None,
                **settings) -> ddpm.TrainConfig:
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
    return ddpm.TrainConfig(data=Path(), out=Path(), **{**plan, **settings})


def gan_recipe(**settings) -> dcgan.TrainConfig:
    """The DCGAN trained for each class (`settings`: dcgan.TrainConfig fields): a
    16-image grid per epoch and one checkpoint, not one per epoch."""
    return dcgan.TrainConfig(data=Path(), out=Path(), **{"num_samples": 16, "no_epoch_checkpoints": True, **settings})


# --------------------------------------------------------------------------- training and sampling, per cell


def recipe(cfg, gen: str):
    """The training config of generator `gen` in a study config: its field of the generator's name
    (ddpm-cfg: ddpm_cfg)."""
    return getattr(cfg, gen.replace("-", "_"))


def train_generator(cfg, gen: str, cls: str | None, frac: float, folder: Path, trained_on: str,
                    share: float) -> tuple[Path, bool]:
    """Train (or reuse) the generator of one class (cls None: of both, ddpm-cfg) and real fraction on that cell's
    real images only; return its checkpoint and whether it was trained now. Its steps and monitoring cadence scale
    with `share` (cell images / all): every generator takes the same epochs. inputs.json records the images
    (others are refused); done.json marks a finished run; without it, a checkpoint is resumed."""
    out = cfg.out / "generators" / (f"{gen}_{cls}_f{frac:g}" if cls else f"{gen}_f{frac:g}")
    what = f"class {cls}" if cls else "both classes"
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
                              max_steps=steps, eval_every=every, eval_data=cfg.data / data.SPLIT_DIRS["validation"])
    with atomic_path(inputs) as tmp:
        tmp.write_text(json.dumps({"trained_on": trained_on, "data": str(folder)}))
    ckpt = {"ddpm": ddpm_run.train, "gan": gan_run.train, "ddpm-cfg": ddpm_run.train}[gen](run)
    with atomic_path(done) as tmp:
        finished = time.strftime("%Y-%m-%d %H:%M:%S")
        tmp.write_text(json.dumps({"config": dataclasses.asdict(run), "finished_at": finished}, default=str))
    return ckpt, True


def noise_seed(gen: str, cls: str, frac: float) -> int:
    """The sampling seed of one generator, class and fraction, a hash of the three: with
    one seed for all, deterministic DDIM gives each infiltration sample a no_finding twin."""
    return int(data.digest(gen, cls, f"{frac:g}")[:8], 16)


def draw(cfg, gen: str, cls: str, checkpoint: dict, n: int, seed: int, guidance: float = 1.0):
    """n images (n, C, H, W) in [-1, 1] of class `cls` from a generator's checkpoint."""
    device = pick_device(cfg.device)
    if gen == "gan":
        return dcgan.generate(checkpoint, n, seed=seed, batch_size=64, device=device)
    guided = {"class_name": cls, "guidance": guidance} if gen == "ddpm-cfg" else {}
    return ddpm.generate(checkpoint, n, seed=seed, batch_size=64, device=device, sampler=cfg.sampler,
                         steps=cfg.sample_steps, **guided)


def choose_guidance(cfg, ckpt: Path, frac: float, val_x, val_y, fresh: bool) -> float:
    """The guidance scale of a ddpm-cfg, chosen on the real VALIDATION split only (never test): for each w of
    GUIDANCE_GRID and each class, as many samples as the split has images of that class (at most
    monitor.MAX_IMAGES), from noise of their own seed (not the pool's; the same for every w, a paired
    comparison), and their KID (fid.kid, unbiased at any N) to the validation images of that class, on
    monitor.pixels (pooled pixels: no X-ray classifier exists yet while the generators are made; monitor.py
    says why not random-CNN features). The w with the lowest mean KID over the classes wins; ties go to the
    smaller w. OUT/generators/ddpm-cfg_f<frac>/guidance.json keeps the table (report.py plots it), reused
    unless the model is `fresh`."""
    path = ckpt.with_name("guidance.json")
    if not fresh and path.is_file():
        return json.loads(path.read_text())["chosen"]
    print(f"\n== choosing the ddpm-cfg guidance scale at real fraction {frac:g} on the validation split "
          f"(w in {', '.join(f'{w:g}' for w in GUIDANCE_GRID)})", flush=True)
    ckpt = ckpt.with_name("best.pt") if ckpt.with_name("best.pt").is_file() else ckpt  # monitor.py's pick
    checkpoint, kid = load_checkpoint(ckpt), {}
    for cls in data.CLASSES:
        real = val_x[val_y == data.LABELS[cls]][:monitor.MAX_IMAGES]  # (n, S, S) uint8
        for w in GUIDANCE_GRID:
            images = draw(cfg, "ddpm-cfg", cls, checkpoint, len(real), noise_seed("ddpm-cfg guidance", cls, frac), w)
            grey = to_uint8(images.mean(dim=1, keepdim=True))  # (n, H, W) uint8, as the pool's PNGs hold
            fake = torch.from_numpy(np.stack([data.center_crop_resize(g, real.shape[-1]) for g in grey]))  # as loaded
            kid.setdefault(f"{w:g}", {})[cls] = fid.kid(monitor.pixels(real), monitor.pixels(fake))[0]
    mean = {w: sum(v.values()) / len(v) for w, v in kid.items()}
    chosen = float(min(mean, key=lambda w: (mean[w], float(w))))
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"grid": list(GUIDANCE_GRID), "kid": kid, "mean_kid": mean, "chosen": chosen,
                                   "n_validation": {c: int((val_y == data.LABELS[c]).sum().clip(max=monitor.MAX_IMAGES))
                                                    for c in data.CLASSES},
                                   "measure": "KID on 2x2-pooled pixels (monitor.pixels) to the validation images "
                                              "of the same class"}, indent=1))
    print(f"guidance scale {chosen:g} (mean validation KID {mean[f'{chosen:g}']:.4g})", flush=True)
    return chosen


def sample_generator(cfg, gen: str, cls: str, frac: float, ckpt: Path, n: int, fresh: bool,
                     guidance: float = 1.0) -> Path:
    """n grey samples into OUT/synthetic/<gen>/f<frac>/<cls>/ (reused unless `fresh`), at `guidance` for
    ddpm-cfg, via a temporary folder renamed at the end, so a folder of that name is complete."""
    folder = cfg.out / "synthetic" / gen / f"f{frac:g}" / cls
    if not fresh and folder.is_dir() and len(list(folder.glob("sample_*.png"))) >= n:
        print(f"reusing {n} {gen} samples of {cls} at real fraction {frac:g}: {folder}", flush=True)
        return folder
    print(f"\n== sampling {n} {gen} images of class {cls} at real fraction {frac:g}", flush=True)
    ckpt = ckpt.with_name("best.pt") if ckpt.with_name("best.pt").is_file() else ckpt  # monitor.py's pick
    images = draw(cfg, gen, cls, load_checkpoint(ckpt), n, noise_seed(gen, cls, frac), guidance)
    grey = images.mean(dim=1, keepdim=True)  # (N, C, H, W) -> (N, 1, H, W): X-rays are grey, as `sample` writes
    tmp = folder.with_name(f".{cls}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for i, img in enumerate(to_uint8(grey)):
        save_png(img, tmp / f"sample_{i:05d}.png")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder

