"""The study's generators (study.py runs the experiment around them): the recipe of each, training one
on a cell's real images only (or reusing it), and drawing its samples into a folder. `ddpm` and `gan`
are one model per class and real fraction, trained on that class's images alone.

Nothing here imports study.py; `cfg` below is a study.StudyConfig.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import data
import dcgan
import ddpm
from common import CLIError, atomic_path, load_checkpoint, pick_device, save_png, to_uint8

GENERATORS = ("ddpm", "gan")
SCRATCH = dict(preset="tiny", lr=2e-3, warmup=50, ema_decay=0.995)  # the DDPM from scratch (README, "Real X-rays at small scale")


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


def train_generator(cfg, gen: str, cls: str, frac: float, folder: Path, trained_on: str,
                    share: float) -> tuple[Path, bool]:
    """Train (or reuse) the generator of one class and real fraction on that cell's real images only; return
    its checkpoint and whether it was trained now. Its steps and monitoring cadence scale with `share` (cell
    images / all): every generator takes the same epochs. inputs.json records the images (others are refused);
    done.json marks a finished run; without it, a checkpoint is resumed."""
    out = cfg.out / "generators" / f"{gen}_{cls}_f{frac:g}"
    done, ckpt, inputs = out / "done.json", out / "checkpoint.pt", out / "inputs.json"
    if inputs.is_file() and json.loads(inputs.read_text()).get("trained_on") != trained_on:
        raise CLIError(f"{out} was trained on other images than the real {frac:g} subset of {cls} now: the data "
                       "changed; use a new --out")
    if done.is_file() and ckpt.is_file():
        print(f"reusing {gen} for {cls} at real fraction {frac:g}: {ckpt}", flush=True)
        return ckpt, False
    base = getattr(cfg, gen)
    steps, every = (n if n is None else max(1, math.ceil(n * share)) for n in (base.max_steps, base.eval_every))
    print(f"\n== training the {gen} of class {cls} on the real {frac:g} subset ({folder})", flush=True)
    run = dataclasses.replace(base, data=folder, out=out, class_name=cls, device=cfg.device, resume=ckpt.is_file(),
                              max_steps=steps, eval_every=every, eval_data=cfg.data / data.SPLIT_DIRS["validation"])
    with atomic_path(inputs) as tmp:
        tmp.write_text(json.dumps({"trained_on": trained_on, "data": str(folder)}))
    ckpt = {"ddpm": ddpm.train, "gan": dcgan.train}[gen](run)
    with atomic_path(done) as tmp:
        finished = time.strftime("%Y-%m-%d %H:%M:%S")
        tmp.write_text(json.dumps({"config": dataclasses.asdict(run), "finished_at": finished}, default=str))
    return ckpt, True


def noise_seed(gen: str, cls: str, frac: float) -> int:
    """The sampling seed of one generator, class and fraction, a hash of the three: with
    one seed for all, deterministic DDIM gives each infiltration sample a no_finding twin."""
    return int(data.digest(gen, cls, f"{frac:g}")[:8], 16)


def sample_generator(cfg, gen: str, cls: str, frac: float, ckpt: Path, n: int, fresh: bool) -> Path:
    """n grey samples into OUT/synthetic/<gen>/f<frac>/<cls>/ (reused unless `fresh`),
    via a temporary folder renamed at the end, so a folder of that name is complete."""
    folder = cfg.out / "synthetic" / gen / f"f{frac:g}" / cls
    if not fresh and folder.is_dir() and len(list(folder.glob("sample_*.png"))) >= n:
        print(f"reusing {n} {gen} samples of {cls} at real fraction {frac:g}: {folder}", flush=True)
        return folder
    print(f"\n== sampling {n} {gen} images of class {cls} at real fraction {frac:g}", flush=True)
    ckpt = ckpt.with_name("best.pt") if ckpt.with_name("best.pt").is_file() else ckpt  # monitor.py's pick
    checkpoint, device, seed = load_checkpoint(ckpt), pick_device(cfg.device), noise_seed(gen, cls, frac)
    if gen == "ddpm":
        images = ddpm.generate(checkpoint, n, seed=seed, batch_size=64, device=device, sampler=cfg.sampler,
                               steps=cfg.sample_steps)
    else:
        images = dcgan.generate(checkpoint, n, seed=seed, batch_size=64, device=device)
    grey = images.mean(dim=1, keepdim=True)  # (N, C, H, W) -> (N, 1, H, W): X-rays are grey, as `sample` writes
    tmp = folder.with_name(f".{cls}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for i, img in enumerate(to_uint8(grey)):
        save_png(img, tmp / f"sample_{i:05d}.png")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder

