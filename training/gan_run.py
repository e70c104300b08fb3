"""`main.py gan`: DCGAN training (dcgan.make_step) inside the harness (harness.training_run and
train_loop: checks, lock, torchrun, resume, log, checkpoints, Ctrl-C, NaN refusal), with the
collapse monitor below, per-epoch sample grids and, with --eval-every, monitor.py.
"""

from __future__ import annotations

import math
import uuid
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

import data
from dcgan import LEGACY_PRESET, LOSS_CEILING, Discriminator, Generator, TrainConfig, count_parameters, make_step, sample_noise
from plumbing.configs import keep_saved, shown, total_steps
from plumbing.files import atomic_path, save_image_grid, to_uint8
from training import diffaugment
from training import monitor as quality
from training.harness import Run, train_loop, training_run


def augmentation(policy: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The preset's DiffAugment T(x) for dcgan.make_step ('' is the identity)."""
    diffaugment.check_policy(policy)
    return lambda x: diffaugment.diff_augment(x, policy)


# --------------------------------------------------------------------------- collapse detection


DIVERSITY_FLOOR = 0.25  # samples' spread below 1/4 of the real images': collapsed (study/gate.py uses the same floor)


def mean_pairwise_distance(x: torch.Tensor) -> float:
    """Mean L2 distance between all pairs of a batch (N, ...), per pixel (RMS)."""
    flat = x.flatten(1).float()
    return (torch.pdist(flat) / math.sqrt(flat.shape[1])).mean().item()


class CollapseMonitor:
    """Watches the training metrics for the two failures the original run showed, and for divergence:
    1. D wins: loss_d < `loss_d_floor` on each of the last `window` steps, or D(x) - D(G(z)) > `gap_ceiling`
       on all of them (G then gets vanishing gradients);
    2. mode collapse: `diversity()` (G's fixed-noise samples' mean pairwise distance over the real images')
       below `diversity_floor`, measured every `every` steps; `finish` judges the end state, worst point beside;
    3. divergence: a loss above LOSS_CEILING.
    Called as (step, metrics) after each step: a warning for 1 or 3 when it starts, again only once it cleared.
    """

    def __init__(self, window: int = 200, loss_d_floor: float = 0.05, gap_ceiling: float = 0.99,
                 every: int = 100, diversity_floor: float = DIVERSITY_FLOOR,
                 diversity: Callable[[], float] | None = None):
        self.loss_d_floor, self.gap_ceiling, self.every, self.diversity_floor = loss_d_floor, gap_ceiling, every, diversity_floor
        self.diversity = diversity
        self.recent = deque(maxlen=window)
        self.firing = {"d_wins": False, "exploded": False}
        self.worst: tuple[float, int] | None = None  # (lowest diversity ratio, its step) since this run started

    def _edge(self, name: str, condition: bool, message: str) -> str | None:
        fire = condition and not self.firing[name]
        self.firing[name] = condition
        return message if fire else None

    def _measure(self, step: int) -> float:
        ratio = self.diversity()
        if self.worst is None or ratio < self.worst[0]:
            self.worst = (ratio, step)
        return ratio

    def __call__(self, step: int, metrics: dict) -> str | None:
        self.recent.append((metrics["loss_d"], metrics.get("d_real", 0.5) - metrics.get("d_fake", 0.5)))
        full = len(self.recent) == self.recent.maxlen
        d_wins = full and (all(l < self.loss_d_floor for l, _ in self.recent)
                           or all(g > self.gap_ceiling for _, g in self.recent))
        warnings = [self._edge("d_wins", d_wins,
                               f"discriminator has won for {len(self.recent)} steps (loss_d < {self.loss_d_floor} "
                               f"or D(x) - D(G(z)) > {self.gap_ceiling}): training has likely diverged")]
        worst = max(metrics["loss_d"], metrics.get("loss_g", 0.0))
        warnings.append(self._edge("exploded", worst > LOSS_CEILING,
                                   f"a loss reached {worst:.3g} (a working GAN's stays far below {LOSS_CEILING:g}): "
                                   "training has diverged; try a lower --lr-g / --lr-d"))
        if self.diversity is not None and step % self.every == 0:
            self._measure(step)
        found = [w for w in warnings if w]
        return "; ".join(found) if found else None

    def finish(self, step: int) -> tuple[str, bool] | None:
        """The diversity verdict at the end of training (step `step`), with the worst
        point of the run beside it: (one line, collapsed at the end?); None without
        a diversity measure."""
        if self.diversity is None:
            return None
        end = self._measure(step)
        collapsed = end < self.diversity_floor
        low, at = self.worst
        state = "mode collapse: the samples are nearly identical" if collapsed else "not collapsed"
        return (f"diversity (samples' pairwise distance over the real images'; collapsed below "
                f"{self.diversity_floor:g}): worst {low:.3f} at step {at}; at the end (step {step}) {end:.3f}: "
                f"{state}", collapsed)

    def report(self, step: int, out: Path) -> None:
        """`finish`, printed and kept: OUT/diversity.txt always, OUT/warnings.log too
        when the samples are collapsed at the end (the state the run's samples are in)."""
        found = self.finish(step)
        if found is None:
            return
        line, collapsed = found
        print(("warning: " if collapsed else "") + line, flush=True)
        with atomic_path(out / "diversity.txt") as tmp:
            tmp.write_text(line + "\n")
        if collapsed:
            with open(out / "warnings.log", "a") as f:
                f.write(f"step {step}: {line}\n")


# --------------------------------------------------------------------------- training


def train(tcfg: TrainConfig) -> Path:
    """Train on a folder (torchrun: DDP), a checkpoint and sample grid per epoch; returns the checkpoint's
    path. training_run does what both generators share: checks, lock, torchrun, resume, seeds."""
    with training_run(tcfg, "dcgan", ("config", "generator", "discriminator", "opt_g", "opt_d")) as run:
        return _train(tcfg, run)


def _train(tcfg: TrainConfig, run: Run) -> Path:
    info, device, out = run.info, run.info.device, tcfg.out
    cfg = tcfg.network(run.ckpt["config"] if run.ckpt else None)
    if run.ckpt:  # the checkpoint's preset (one written before presets: the original), as for its shape
        tcfg = keep_saved(tcfg, {"preset": run.ckpt.get("preset", LEGACY_PRESET)})
    elif info.is_main:
        quality.clear_stale_best(out, "dcgan")
    run_id = (run.ckpt or {}).get("run") or uuid.uuid4().hex  # names the run in checkpoint.pt and best.pt
    p = tcfg.settings()
    G, D = Generator(cfg).to(device), Discriminator(cfg, p).to(device)
    opt_g = torch.optim.Adam(G.parameters(), lr=p.lr_g, betas=tcfg.betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=p.lr_d, betas=tcfg.betas)
    start = run.restore(generator=G, discriminator=D, opt_g=opt_g, opt_d=opt_d)
    train_set = data.load_training_folder(tcfg.data, cfg.size, tcfg.class_name)
    images = train_set.images  # (N, S, S) uint8
    real = data.to_unit_range(images)  # (N, 1, S, S) in [-1, 1]
    if cfg.channels == 3:
        real = real.expand(-1, 3, -1, -1).contiguous()  # grey repeated to RGB, as the original's input
    if info.is_main:
        print(f"DCGAN {cfg.size}x{cfg.size}x{cfg.channels}, preset {tcfg.preset} ({p.g_steps} G per D update, lr G "
              f"{p.lr_g:g}, lr D {p.lr_d:g}, DiffAugment {p.augment or 'none'}, spectral norm "
              f"{'on' if p.spectral_norm else 'off'}, R1 gamma {p.r1_gamma:g}): generator {count_parameters(G):,} "
              f"parameters, discriminator {count_parameters(D):,}; {real.shape[0]} training images"
              + (f", resuming at step {start}" if start else ""))
    if info.world_size > 1 and device.type == "cuda":
        # One batch statistic over all GPUs, as a single-GPU run of the global batch would see.
        # On CPU (gloo) plain BatchNorm normalises each rank's own batch: the same per-batch
        # statistics a single process has at the per-rank batch size.
        G, D = nn.SyncBatchNorm.convert_sync_batchnorm(G), nn.SyncBatchNorm.convert_sync_batchnorm(D)
    G_train, D_train = run.wrap(G), run.wrap(D)  # state dicts still come from G and D

    # Fixed noise for the per-epoch grids and the collapse check: its own generator,
    # so drawing it never moves the training RNG (resume stays bit-exact).
    fixed_z = sample_noise(tcfg.num_samples, cfg, torch.Generator().manual_seed(tcfg.seed)).to(device)
    real_spread = mean_pairwise_distance(real[:64])

    @torch.no_grad()
    def fixed_samples(z: torch.Tensor = fixed_z) -> torch.Tensor:
        G.eval()  # eval: no BatchNorm running-statistics update, same as `sample` (see generate)
        x = G(z).float()
        G.train()
        return x

    def eval_samples(n: int) -> torch.Tensor:
        """n samples of fixed noise (another seed than the grids') as grey uint8 (n, S, S), for monitor.py."""
        z = sample_noise(n, cfg, torch.Generator().manual_seed(tcfg.seed + 1)).to(device)
        return torch.from_numpy(to_uint8(fixed_samples(z).mean(dim=1, keepdim=True).cpu()))

    def on_epoch_end(epoch: int) -> None:
        save_image_grid(fixed_samples().cpu(), out / f"samples_epoch{epoch + 1:03d}.png", nrow=8)

    def state() -> dict:
        train = {**asdict(p), "betas": list(tcfg.betas), "amp": tcfg.amp}
        return {"kind": "dcgan", "run": run_id, "config": asdict(cfg), "preset": tcfg.preset, "train": train,
                "generator": G.state_dict(), "discriminator": D.state_dict(),
                "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "seed": tcfg.seed}

    monitor = CollapseMonitor(window=tcfg.collapse_window, every=100,
                              diversity=lambda: mean_pairwise_distance(fixed_samples()[:64]) / max(real_spread, 1e-8))
    total = total_steps(tcfg, real.shape[0], info.world_size)[0]
    watch = (quality.setup(tcfg, cfg.size, total, eval_samples, state, ("loss_d", "loss_g"), device, start, train_set)
             if info.is_main else None)
    fields = (("loss_d", "loss_g", "d_real", "d_fake", "grad_d", "grad_g") + (("r1",) if p.r1_gamma else ())
              + (quality.FIELDS if watch else ()))
    step = train_loop(real, make_step(G_train, D_train, opt_g, opt_d, cfg, tcfg, device, augmentation(p.augment)), state, tcfg, info,
                      start, on_epoch_end, fields, monitor, keep_epoch_checkpoints=not tcfg.no_epoch_checkpoints,
                      evaluate=watch)
    if info.is_main:
        save_image_grid(fixed_samples().cpu(), out / "samples_latest.png", nrow=8)
        monitor.report(step, out)  # diversity at the end, beside the run's worst point
        print(f"step {step}: checkpoint, samples_latest.png and loss.csv in {shown(out)}")
    return out / "checkpoint.pt"
