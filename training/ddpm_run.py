"""`main.py ddpm`: DDPM training (ddpm.train_step, Ho et al. Alg. 1) inside the harness: checks, lock,
torchrun, resume, seeds (harness.training_run), the loop with its log, checkpoints, Ctrl-C and NaN
refusal (harness.train_loop), per-epoch sample grids, and with --eval-every the monitor (monitor.py)
that keeps OUT/best.pt.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn as nn

import data
from ddpm import (PRESETS, GaussianDiffusion, Guided, TrainConfig, UNet, UNetConfig, drop_labels, load_pretrained,
                  train_step, with_classes)
from plumbing.configs import CLIError, shown, total_steps
from plumbing.files import save_image_grid, to_uint8
from training import monitor
from training.harness import EMA, train_loop, training_run


def class_indices(labels: torch.Tensor, root: Path) -> dict[str, int]:
    """The classes of a conditional model, {name: index}, index = data.LABELS (no_finding 0, infiltration 1):
    refused unless every image lies in a class folder and both classes are there."""
    if (labels < 0).any() or set(labels.tolist()) != set(data.LABELS.values()):
        raise CLIError(f"--conditional needs the images under {root} in class folders, with images in each of "
                       f"{', '.join(c + '/' for c in data.LABELS)} and nowhere else")
    return dict(sorted(data.LABELS.items(), key=lambda item: item[1]))


def train(cfg: TrainConfig) -> Path:
    """Fine-tune or train with DDPM Alg. 1, inside training_run (checks, lock, torchrun, resume,
    seeds) and train_loop (data order, log, checkpoints, Ctrl-C, NaN); with --eval-every, monitor.py
    measures the samples against held-out images and keeps OUT/best.pt. Returns OUT/checkpoint.pt.
    --conditional: the class of each image goes in as a label, dropped to "no label" at --label-dropout
    (Ho & Salimans 2022, Alg. 1); the checkpoint's "classes" maps class names to labels."""
    with training_run(cfg, "ddpm", ("config", "diffusion", "model", "ema", "optimizer")) as run:
        if run.ckpt is not None:
            given, cfg = (cfg.beta_schedule, cfg.variance), cfg.resumed(run.ckpt)
            if run.info.is_main and given != (cfg.beta_schedule, cfg.variance):
                print(f"note: --resume keeps the checkpoint's schedule ({cfg.beta_schedule}, {cfg.variance})")
            model = UNet(UNetConfig(**run.ckpt["config"]))
        else:
            model = load_pretrained(cfg.pretrained) if cfg.finetune else UNet(PRESETS[cfg.preset])
            model = with_classes(model, len(data.LABELS)) if cfg.conditional else model
        device, ucfg, levels = run.info.device, model.config, 2 ** (len(model.config.block_out_channels) - 1)
        cfg = replace(cfg, image_size=cfg.image_size or ucfg.sample_size)  # the checkpoint's "args" say the size
        if cfg.image_size < 8 or cfg.image_size % levels:
            raise CLIError(f"--image-size {cfg.image_size} must be divisible by {levels}")
        diffusion = GaussianDiffusion(**cfg.diffusion_settings()).to(device)
        ema = EMA(model.to(device), cfg.ema_decay)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=device.type == "cuda")
        step = start_step = run.restore(model=model, ema=ema, optimizer=opt)
        train_set = data.load_training_folder(cfg.data, cfg.image_size, cfg.class_name)  # decoded once
        images, labels = train_set.images, train_set.labels.to(device)  # (N, S, S) uint8, (N,)
        classes = class_indices(train_set.labels, cfg.data) if ucfg.num_classes is not None else None
        if len(images) < cfg.batch_size * run.info.world_size:
            raise CLIError(f"{len(images)} images under {cfg.data} but the batch needs "
                           f"{cfg.batch_size * run.info.world_size} (lower --batch-size)")
        images = images.to(device) if device.type == "cuda" else images  # once, as train_loop would move them
        net = run.wrap(model)

        def step_fn(idx: torch.Tensor) -> dict:
            nonlocal step
            lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
            for group in opt.param_groups:
                group["lr"] = lr
            x0 = data.to_rgb_range(images[idx]).to(device, non_blocking=True)  # (B, S, S) uint8 -> (B, 3, S, S)
            y = None if classes is None else drop_labels(labels[idx], cfg.label_dropout, ucfg.num_classes)
            loss, grad_norm = train_step(net, diffusion, x0, opt, y, cfg.grad_clip, cfg.amp)  # DDPM Alg. 1
            ema.update(model, step)  # decay warm-up: see harness.EMA
            step += 1
            return {"loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr}

        def state_fn() -> dict:
            return {"kind": "ddpm", "config": asdict(ucfg), "diffusion": diffusion.config(), "image_size": cfg.image_size,
                    "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                    **({"classes": classes} if classes is not None else {})}

        # fixed noise, own generator: the grids of successive epochs are comparable and the training RNG is untouched
        x_T = torch.randn((cfg.num_samples, ucfg.in_channels, cfg.image_size, cfg.image_size),
                          generator=torch.Generator().manual_seed(cfg.seed))

        def sampling_model(n: int) -> nn.Module:
            """The EMA network; a conditional one told the classes in turn (0, 1, 0, ...; guidance scale 1)."""
            if classes is None:
                return ema.model
            return Guided(ema.model, torch.arange(n, device=device) % ucfg.num_classes, 1.0, ucfg.num_classes)

        def on_epoch_end(epoch: int) -> None:
            images = diffusion.sample(sampling_model(len(x_T)), x_T.shape, cfg.sample_sampler, cfg.sample_steps,
                                      x_T=x_T.to(device), progress=False)
            save_image_grid(images, cfg.out / f"samples_epoch{epoch + 1:03d}.png")

        def eval_samples(n: int) -> torch.Tensor:
            """n samples of fixed noise (another seed than the grids') as grey uint8 (n, S, S), for monitor.py."""
            noise = torch.randn((n, *x_T.shape[1:]), generator=torch.Generator().manual_seed(cfg.seed + 1))
            x = diffusion.sample(sampling_model(n), noise.shape, "ddim", cfg.sample_steps, x_T=noise.to(device),
                                 progress=False)
            return torch.from_numpy(to_uint8(x.mean(dim=1, keepdim=True)))  # RGB -> grey, as `sample` writes

        total = total_steps(cfg, len(images), run.info.world_size)[0]
        watch = monitor.setup(cfg, cfg.image_size, total, eval_samples, state_fn, ("loss",), device,
                              start_step) if run.info.is_main else None
        fields = ("loss", "grad_norm", "lr") + (monitor.FIELDS if watch else ())
        order = torch.arange(len(images))  # the loop deals out indices: step_fn takes each batch's images and labels
        final = train_loop(order, step_fn, state_fn, cfg, run.info, start_step, on_epoch_end, fields,
                                  evaluate=watch)
        if run.info.is_main:
            print(f"trained to step {final}; checkpoint {shown(cfg.out / 'checkpoint.pt')}")
        return cfg.out / "checkpoint.pt"
