"""`main.py ddpm`: DDPM training (ddpm.train_step, Ho et al. Alg. 1) inside the harness: checks, lock,
torchrun, resume, seeds (harness.training_run), the loop with its log, checkpoints, Ctrl-C and NaN
refusal (harness.train_loop), per-epoch sample grids, and with --eval-every the monitor (monitor.py)
that keeps OUT/best.pt.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

import data
from ddpm import (PRESETS, GaussianDiffusion, Guided, UNet, UNetConfig, drop_labels, model_from_checkpoint, train_step,
                  unet_from_diffusers, with_classes)
from diffusion import (BETA_END, BETA_SCHEDULES, BETA_START, DEFAULT_STEPS, LOSS_WEIGHTS, NUM_TIMESTEPS,
                       PREDICTION_TYPES, TIMESTEP_SPACINGS, VARIANCE_TYPES, check_sampler, check_settings)
from plumbing import weightfiles
from plumbing.configs import CLIError, RunConfig, first_line, flag, keep_saved, shown, total_steps, user_error
from plumbing.weightfiles import DEFAULT_PRETRAINED
from plumbing.files import save_image_grid, to_uint8
from training import monitor
from training.harness import EMA, train_loop, training_run


# --------------------------------------------------------------------------- the options of `main.py ddpm`


# Defaults of the options left out, by how the UNet starts. Fine-tuning keeps the original experiment's recipe
# and the released model's schedule (Ho et al.: linear, eps); from scratch, the recipe measured to work on small
# data (docs/ddpm.md, "Does it matter here?": v-prediction on the cosine schedule, lr 2e-3 with warm-up and a
# faster EMA on the tiny UNet; larger UNets get Ho et al.'s CIFAR-10 lr 2e-4).
FINETUNE_DEFAULTS = dict(lr=1e-5, warmup=0, ema_decay=0.999, beta_schedule="linear", prediction="epsilon")
SCRATCH_DEFAULTS = dict(lr=2e-4, warmup=50, ema_decay=0.995, beta_schedule="cosine", prediction="v_prediction")
SCRATCH_LR = {"tiny": 2e-3}  # by preset; the others take SCRATCH_DEFAULTS["lr"]


# DDPMScheduler's scheduler_config.json key -> (GaussianDiffusion's argument, diffusers' default for a key left out)
_SCHEDULER_KEYS = {"num_train_timesteps": ("num_timesteps", 1000), "beta_schedule": ("beta_schedule", "linear"),
                   "beta_start": ("beta_start", 1e-4), "beta_end": ("beta_end", 0.02),
                   "prediction_type": ("prediction_type", "epsilon"), "variance_type": ("variance_type", "fixed_small"),
                   "clip_sample": ("clip_sample", True), "timestep_spacing": ("timestep_spacing", "leading"),
                   "rescale_betas_zero_snr": ("rescale_betas_zero_snr", False)}


_SCHEDULER_FIXED = {"trained_betas": None, "thresholding": False, "clip_sample_range": 1.0, "steps_offset": 0}


def scheduler_settings(config: dict) -> dict:
    """GaussianDiffusion's settings from a diffusers DDPMScheduler scheduler_config.json (the inverse of
    tools/export.py's scheduler_config; diffusers' squaredcos_cap_v2 is our cosine); a setting that
    GaussianDiffusion does not implement is refused."""
    for key, ours in _SCHEDULER_FIXED.items():
        if config.get(key, ours) != ours:
            raise CLIError(f"scheduler_config.json: {key}={config[key]!r} is not supported "
                           f"(GaussianDiffusion has {ours!r})")
    d = {name: config.get(key, default) for key, (name, default) in _SCHEDULER_KEYS.items()}
    d["beta_schedule"] = {"squaredcos_cap_v2": "cosine"}.get(d["beta_schedule"], d["beta_schedule"])
    try:
        return GaussianDiffusion(**d).config()
    except (TypeError, ValueError) as e:
        raise CLIError(f"scheduler_config.json: {first_line(e)}") from e


@dataclass(kw_only=True)
class TrainConfig(RunConfig):
    """Everything `train` needs: the run's options (RunConfig: data, out, epochs, ...) and the
    model's below; `main.py ddpm` makes one option per field."""

    finetune: bool = flag(False, "start from the pretrained CIFAR-10 UNet")
    pretrained: Path = flag(DEFAULT_PRETRAINED, "diffusers folder (config.json + diffusion_pytorch_model.safetensors/"
                            ".bin), an export's folder (its unet/ and schedule), a weights file or a ddpm "
                            "checkpoint.pt; a missing or empty folder: the Hugging Face cache's copy, else downloaded")
    preset: str = flag("cifar10", "UNet size when training from scratch", choices=tuple(PRESETS))
    image_size: int | None = flag(None, "training resolution (default: the model's, 32)")
    lr: float | None = flag(None, "AdamW learning rate (default: 1e-5 with --finetune; from scratch 2e-3 for "
                            "--preset tiny, else 2e-4)", above=0)
    warmup: int | None = flag(None, "linear learning-rate warm-up, in steps (default: 0 with --finetune, 50 from "
                              "scratch)", min=0)
    grad_clip: float = flag(1.0, "clip the gradient norm (0: off)", min=0)
    ema_decay: float | None = flag(None, "EMA decay of the weights used for sampling, in [0, 1); warms up as "
                                   "min(decay, (1+step)/(10+step)) (default: 0.999 with --finetune, 0.995 from scratch)",
                                   min=0)
    beta_schedule: str | None = flag(None, "noise schedule: linear (Ho et al.), scaled_linear (latent diffusion), "
                                     "cosine (Nichol & Dhariwal) or sigmoid (diffusers' GeoDiff one); see "
                                     "diffusion.make_betas (default: the pretrained model's, linear for "
                                     "google/ddpm-cifar10-32; cosine from scratch)", choices=BETA_SCHEDULES)
    beta_start: float | None = flag(None, f"first beta of linear, scaled_linear, sigmoid (default {BETA_START:g}; "
                                    "cosine has none)")
    beta_end: float | None = flag(None, f"last beta of linear, scaled_linear, sigmoid (default {BETA_END:g})")
    prediction: str | None = flag(None, "what the network predicts: the noise (Ho et al.), v = sqrt(a) eps - "
                                  "sqrt(1-a) x0 (Salimans & Ho 2022) or x0 (sample) (default: the pretrained model's, "
                                  "epsilon for google/ddpm-cifar10-32; v_prediction from scratch)",
                                  choices=PREDICTION_TYPES)
    zero_snr: bool = flag(False, "rescale the betas to zero terminal SNR (Lin et al. 2024, Alg. 1); needs --prediction "
                          "v_prediction or sample and --timestep-spacing trailing or linspace")
    timestep_spacing: str = flag("leading", "timesteps of the strided samplers (DDIM, ddpm with fewer steps), "
                                 "diffusers' names; DPM-Solver++ always uses linspace", choices=TIMESTEP_SPACINGS)
    loss_weight: str = flag("none", "weight of each timestep's loss: none, or min-snr (Hang et al. 2023)",
                            choices=LOSS_WEIGHTS)
    snr_gamma: float = flag(5.0, "gamma of --loss-weight min-snr: the SNR above which the weight stops growing",
                            above=0)
    variance: str = flag("fixed_large", "reverse-step variance: beta_t (fixed_large) or beta~_t (fixed_small)",
                         choices=VARIANCE_TYPES)
    num_samples: int = flag(16, "images in the per-epoch sample grid", min=1)
    sample_sampler: str = flag("ddim", "sampler of the per-epoch sample grid: DDIM or DPM-Solver++(2M)",
                               choices=("ddim", "dpmpp"))
    sample_steps: int | None = flag(None, "steps for the per-epoch sample grid (default: the sampler's, "
                                    f"{DEFAULT_STEPS['ddim']} ddim, {DEFAULT_STEPS['dpmpp']} dpmpp)", min=1)
    conditional: bool = flag(False, "one model for both classes, told the class folder of each image (a class "
                             "embedding: N(0, 1) from scratch, zero to fine-tune); sample with --class and --guidance")
    label_dropout: float = flag(0.1, "--conditional: the share of labels replaced by the no-label token, which "
                                "classifier-free guidance needs", min=0)

    def __post_init__(self):
        self.pretrained = Path(self.pretrained)
        super().__post_init__()
        if self.ema_decay is not None and not self.ema_decay < 1:
            raise CLIError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if not self.label_dropout < 1:
            raise CLIError(f"--label-dropout must be in [0, 1), got {self.label_dropout}")
        if self.conditional and self.class_name is not None:
            raise CLIError(f"--conditional trains on every class folder; leave out --class {self.class_name}")
        with user_error():  # now, not at the first grid
            check_sampler(self.sample_sampler, self.sample_steps, option="--sample-steps")
        if self.option("beta_schedule") == "cosine" and (self.beta_start, self.beta_end) != (None, None):
            raise CLIError("--beta-start/--beta-end with the cosine schedule" + ("" if self.beta_schedule else
                           " (the default from scratch; add --beta-schedule linear)") + ": it defines alpha-bar "
                           "directly and has no end betas (Nichol & Dhariwal Eq. 17)")
        if self.loss_weight != "min-snr" and self.snr_gamma != 5.0:
            raise CLIError(f"--snr-gamma {self.snr_gamma:g} with --loss-weight {self.loss_weight}: gamma is min-snr's")
        if self.label_dropout != 0.1 and not self.conditional:  # options that would do nothing are refused
            raise CLIError(f"--label-dropout {self.label_dropout:g} without --conditional: only a class-conditional "
                           "model drops labels (on --resume too, give --conditional)")
        if self.pretrained != Path(DEFAULT_PRETRAINED) and not (self.finetune or self.resume):
            raise CLIError(f"--pretrained {self.pretrained} without --finetune: a model trained from scratch "
                           "reads no weights")
        if self.preset != "cifar10" and self.finetune and not self.resume:
            raise CLIError(f"--preset {self.preset} with --finetune: the fine-tuned UNet is the pretrained one; "
                           "leave out --preset")
        with user_error():
            check_settings(**{k: v for k, v in self.diffusion_settings().items() if k != "clip_sample"})

    def defaults(self) -> dict:
        """The values of the options left out (None): FINETUNE_DEFAULTS with --finetune, else SCRATCH_DEFAULTS."""
        if self.finetune:
            return FINETUNE_DEFAULTS
        return {**SCRATCH_DEFAULTS, "lr": SCRATCH_LR.get(self.preset, SCRATCH_DEFAULTS["lr"])}

    def option(self, name: str):
        """The value an option takes: as given, else its default."""
        value = getattr(self, name)
        return self.defaults()[name] if value is None else value

    def completed(self) -> TrainConfig:
        """This config with every option left out at its default, as the run trains and the checkpoint records."""
        return replace(self, **{k: v for k, v in self.defaults().items() if getattr(self, k) is None})

    def diffusion_settings(self) -> dict:
        """GaussianDiffusion's arguments for these options (the checkpoint's "diffusion" entry is its config())."""
        return dict(num_timesteps=NUM_TIMESTEPS, beta_schedule=self.option("beta_schedule"), variance_type=self.variance,
                    clip_sample=True, beta_start=BETA_START if self.beta_start is None else self.beta_start,
                    beta_end=BETA_END if self.beta_end is None else self.beta_end,
                    prediction_type=self.option("prediction"),
                    rescale_betas_zero_snr=self.zero_snr, timestep_spacing=self.timestep_spacing,
                    loss_weight=self.loss_weight, snr_gamma=self.snr_gamma)

    def resumed(self, ckpt: dict) -> TrainConfig:
        """This config continuing `ckpt`, whose model and schedule settings are the truth (keep_saved); the
        learning rate, warm-up and EMA decay continue the checkpoint's unless given. A checkpoint from before
        an option existed holds no entry for it: it was trained with the default."""
        try:
            args, d = ckpt.get("args") or {}, GaussianDiffusion(**ckpt["diffusion"]).config()
        except (TypeError, ValueError) as e:
            raise CLIError(f"malformed DDPM checkpoint: {first_line(e)}") from e
        saved = {k: Path(args[k]) if k == "pretrained" else args[k] for k in ("finetune", "preset", "pretrained") if k in args}
        saved["conditional"] = (ckpt.get("config") or {}).get("num_classes") is not None
        saved.update(schedule_options(d), loss_weight=d["loss_weight"], snr_gamma=d["snr_gamma"])
        cfg = keep_saved(self, {**saved, **({"image_size": ckpt["image_size"]} if ckpt.get("image_size") else {})})
        return replace(cfg, **{k: args[k] for k in ("lr", "warmup", "ema_decay") if getattr(self, k) is None and k in args})

    def pretrained_schedule(self, d: dict | None) -> TrainConfig:
        """This config fine-tuning a model trained with the GaussianDiffusion settings `d` (None: its files do
        not say; google/ddpm-cifar10-32 is Ho et al.'s, the defaults). They are the defaults of the schedule
        options; one given otherwise is refused (keep_saved). The loss weighting stays the user's choice."""
        if d is None:
            return self
        source = f"--pretrained {shown(self.pretrained)}: the model"
        if d["num_timesteps"] != NUM_TIMESTEPS:
            raise CLIError(f"{source} was trained with {d['num_timesteps']} timesteps; "
                           f"`ddpm` trains with {NUM_TIMESTEPS}")
        return keep_saved(self, schedule_options(d), source)


def schedule_options(d: dict) -> dict:
    """TrainConfig's schedule options for GaussianDiffusion settings `d` (its config()), the loss weighting aside."""
    options = dict(beta_schedule=d["beta_schedule"], variance=d["variance_type"], prediction=d["prediction_type"],
                   zero_snr=d["rescale_betas_zero_snr"], timestep_spacing=d["timestep_spacing"])
    if d["beta_schedule"] != "cosine":  # cosine has no end betas (the options stay None)
        options.update(beta_start=d["beta_start"], beta_end=d["beta_end"])
    return options


# --------------------------------------------------------------------------- the pretrained model and its schedule


def pretrained_model(path: Path) -> tuple[UNet, dict | None]:
    """(UNet, the GaussianDiffusion settings it was trained with, or None where its files do not say) of
    --pretrained: anything ddpm.load_pretrained reads (an export's folder also gives its
    scheduler/scheduler_config.json), or a checkpoint of `main.py ddpm` (its EMA weights and settings)."""
    config, weights = weightfiles.locate(Path(path), True)
    sd = weightfiles.read_weights(weights)
    if "kind" in sd:  # a checkpoint of this project, not a state dict
        if sd["kind"] != "ddpm":
            raise CLIError(f"{shown(path)} is a {sd['kind']!r} checkpoint, not a DDPM's")
        model, diffusion, size = model_from_checkpoint(sd, torch.device("cpu"))
        model.config = replace(model.config, sample_size=size)
        return model.train(), diffusion.config()
    scheduler = weightfiles.pipeline_scheduler(weights)
    return unet_from_diffusers(config, sd, path), scheduler_settings(scheduler) if scheduler is not None else None


# --------------------------------------------------------------------------- training


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
            given, cfg = (cfg.option("beta_schedule"), cfg.variance), cfg.resumed(run.ckpt)
            if run.info.is_main and given != (cfg.option("beta_schedule"), cfg.variance):
                print(f"note: --resume keeps the checkpoint's schedule ({cfg.beta_schedule}, {cfg.variance})")
            model = UNet(UNetConfig(**run.ckpt["config"]))
        else:
            if run.info.is_main:
                monitor.clear_stale_best(cfg.out, "ddpm")
            classes = len(data.LABELS) if cfg.conditional else None  # from scratch: UNet's N(0, 1) class embedding
            model, schedule = (pretrained_model(cfg.pretrained) if cfg.finetune
                               else (UNet(replace(PRESETS[cfg.preset], num_classes=classes)), None))
            given, cfg = cfg.diffusion_settings(), cfg.pretrained_schedule(schedule)
            taken = {k: v for k, v in cfg.diffusion_settings().items() if given[k] != v}
            if run.info.is_main and taken:
                print(f"note: fine-tuning with the schedule --pretrained {shown(cfg.pretrained)} was trained with ("
                      + ", ".join(f"{k} {v}" for k, v in taken.items()) + "); an option left out or given at its "
                      "default takes the model's value")
            if model.config.num_classes is not None and not cfg.conditional:
                raise CLIError(f"--pretrained {shown(cfg.pretrained)} is class-conditional: pass --conditional to "
                               "fine-tune it")
            model = with_classes(model, len(data.LABELS)) if cfg.conditional else model
        cfg = cfg.completed()  # every option left out at its default, as the checkpoint's "args" record them
        run_id = (run.ckpt or {}).get("run") or uuid.uuid4().hex  # names the run in checkpoint.pt and best.pt
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
            return {"kind": "ddpm", "run": run_id, "config": asdict(ucfg), "diffusion": diffusion.config(),
                    "image_size": cfg.image_size, "model": model.state_dict(), "ema": ema.state_dict(),
                    "optimizer": opt.state_dict(),
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
                              start_step, train_set) if run.info.is_main else None
        fields = ("loss", "grad_norm", "lr") + (monitor.FIELDS if watch else ())
        order = torch.arange(len(images))  # the loop deals out indices: step_fn takes each batch's images and labels
        final = train_loop(order, step_fn, state_fn, cfg, run.info, start_step, on_epoch_end, fields,
                                  evaluate=watch)
        if run.info.is_main:
            print(f"trained to step {final}; checkpoint {shown(cfg.out / 'checkpoint.pt')}")
        return cfg.out / "checkpoint.pt"
