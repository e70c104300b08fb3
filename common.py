"""Shared plumbing: typed configs, devices, seeding, atomic files and locks, checkpoints,
downloads, EMA, DDP, and the training run that both generators (ddpm.py, dcgan.py) share.

Nothing here knows about a particular model. A model file opens `training_run` (checks of
--out and --data, the folder's lock, torchrun, the checkpoint to resume, seeds) and hands
`train_loop` a step function and a state function; the loop owns everything a user expects
of a long run: deterministic data order, a progress bar, a CSV loss log, a checkpoint per
epoch written atomically, `--resume` that continues bit for bit, Ctrl-C that saves and
exits, and a non-finite loss, gradient or weight that stops before anything is saved.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager, nullcontext
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image


class CLIError(Exception):
    """A problem the user can fix; main.py prints it as one line and exits 2."""


def shown(path: str | os.PathLike) -> str:
    """A path as text any stream prints: bytes that are not UTF-8 (a Latin-1 folder name) become U+FFFD."""
    return os.fsencode(path).decode("utf-8", "replace")


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (else its type's name), for one-line errors."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# --------------------------------------------------------------------------- typed configurations


def flag(default: Any = MISSING, help: str = "", **meta) -> Any:
    """A dataclass field that is also a command-line option. main.py builds
    `--field-name` from it, with this default and help, so a default and its
    help are written once, beside the code that reads them. meta keys:
      flag: another option name ("--class"); short: a short alias ("-n");
      choices; min / above: the smallest allowed number (>= / >);
      positional: an argument without "--"; metavar.
    A field without help is not an option (set by the caller in Python only)."""
    return field(default=default, metadata={"help": help, **meta})


def option_name(f) -> str:
    """The command-line name of a config field, as error messages should say it."""
    return f.metadata.get("flag") or ("" if f.metadata.get("positional") else "--") + f.name.replace("_", "-")


def check_config(cfg) -> None:
    """Check a config against its fields' metadata: numbers finite and within
    min / above, values among choices. A config validates itself this way in
    __post_init__, so a study that builds one in Python is checked like the CLI."""
    for f in fields(cfg):
        value, meta = getattr(cfg, f.name), f.metadata
        for v in value if isinstance(value, tuple) else (value,):
            if v is None or isinstance(v, bool):
                continue
            if isinstance(v, float) and not math.isfinite(v):
                raise CLIError(f"{option_name(f)} must be a finite number, got {v}")
            if "min" in meta and isinstance(v, (int, float)) and v < meta["min"]:
                raise CLIError(f"{option_name(f)} must be at least {meta['min']}, got {v}")
            if "above" in meta and isinstance(v, (int, float)) and not v > meta["above"]:
                raise CLIError(f"{option_name(f)} must be greater than {meta['above']}, got {v}")
            if meta.get("choices") and v not in meta["choices"]:
                raise CLIError(f"{option_name(f)} must be one of {', '.join(map(str, meta['choices']))}, got {v!r}")


DEFAULT_EPOCHS = 20  # the budget of a run given neither --max-steps nor --epochs


@dataclass(kw_only=True)
class RunConfig:
    """A generator's run options (read by training_run and train_loop); each model's TrainConfig adds its own."""

    data: Path = flag(help="folder of training images, searched recursively")
    out: Path = flag(help="run folder: checkpoint.pt, loss.csv, samples_epochNNN.png")
    class_name: str | None = flag(None, "train on one class folder only, e.g. infiltration", flag="--class")
    max_steps: int | None = flag(None, "the training budget in optimiser steps (in all, not per epoch); "
                                 "when given, it wins over --epochs", min=1)
    epochs: int | None = flag(None, f"passes over the training images: the budget when --max-steps is left out "
                              f"(both left out: {DEFAULT_EPOCHS})", min=1)
    batch_size: int = flag(32, "per process", min=1)
    seed: int = flag(0, "seed of the initialisation, the noise and the data order")
    resume: bool = flag(False, "continue OUT/checkpoint.pt (with its model settings; see README)")
    amp: bool = flag(False, "bfloat16 autocast (CPU, or CUDA with bf16 support)")
    compile: bool = flag(False, "torch.compile the network(s), worth it on GPUs")
    device: str = flag("auto", "auto, cpu, cuda, cuda:1")
    eval_every: int | None = flag(None, "every N steps: KID and a detectability proxy against held-out real images "
                                  "in loss.csv, best.pt, curves.png (monitor.py)", min=1)
    eval_data: Path | None = flag(None, "the held-out real images --eval-every compares with (default: "
                                  "validation_data beside --data, in the extract layout; never the test split)")

    def __post_init__(self):
        self.data, self.out = Path(self.data), Path(self.out)
        self.eval_data = None if self.eval_data is None else Path(self.eval_data)
        check_config(self)


def total_steps(cfg: RunConfig, n: int, world_size: int = 1) -> tuple[int, int]:
    """(steps of the run, steps per epoch) for n training images: --max-steps when given, else --epochs
    (default DEFAULT_EPOCHS) passes of n // (batch * world) steps (a set smaller than a batch is one step)."""
    per_epoch = max(1, (n // world_size) // cfg.batch_size)
    return (cfg.max_steps if cfg.max_steps is not None else (cfg.epochs or DEFAULT_EPOCHS) * per_epoch), per_epoch


# --------------------------------------------------------------------------- devices and seeds


def pick_device(name: str | None = None) -> torch.device:
    """'auto' or None: CUDA when present, else CPU. An unusable name is a CLIError."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise CLIError(f"--device {name!r} is not a device name (try cpu, cuda, cuda:1)") from e
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"--device {name}: MPS (Apple GPU) is not available on this machine (use --device cpu)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise CLIError(f"--device {name}: only cpu, cuda and mps are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CLIError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) for a reproducible run."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every random state a training step touches, in a form torch.save keeps
    and `torch.load(weights_only=True)` reads back (tensors, ints, tuples)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    # Python's random state is nested tuples; a round trip may turn them into lists.
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def autocast(device: torch.device, enabled: bool):
    """bfloat16 autocast where it is supported (CPU, CUDA with bf16), else a no-op context."""
    ok = enabled and (device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported()))
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=ok)


# --------------------------------------------------------------------------- atomic files


TEMP_PREFIX = "."  # atomic writes go to ".NAME.<8 random characters>.SUFFIX" beside NAME


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the
    block finishes, so a crash never leaves a half-written file. The file gets
    the mode a plain open() would give (mkstemp's 0600 would otherwise survive
    the rename), and a full disk is one clear error, with no temporary left."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}.", suffix=path.suffix or ".tmp")
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise CLIError(f"no space left on the device holding {path.parent} while writing {path.name}") from e
        raise
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete what an atomic write killed mid-way (SIGKILL, power loss) left in
    `folder`: only files named like atomic_path's temporaries of a file that the
    project writes there. Returns how many were removed."""
    removed = 0
    for tmp in Path(folder).iterdir() if Path(folder).is_dir() else ():
        m = re.fullmatch(r"\.(.+)\.[a-z0-9_]{8}(\.[^.]+)", tmp.name)
        if m and tmp.is_file() and m.group(2) == (Path(m.group(1)).suffix or ".tmp"):
            tmp.unlink()
            removed += 1
    return removed


@contextmanager
def run_lock(folder: str | os.PathLike, what: str = "run") -> Iterator[Path]:
    """Hold an exclusive lock on a run folder for the whole run, so that two runs
    never write into one folder. The OS releases the lock when the process ends,
    however it ends, so a lock left by a killed run is never in the way; the file
    names the holder's pid for the message. Also clears stale temporaries."""
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".lock"
    f = open(lock, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise CLIError(f"{folder} is in use by another {what} (pid {holder}); wait for it or choose another --out") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        remove_stale_temporaries(folder)
        yield folder
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """torch.save to a temporary file, then rename: the old checkpoint survives a crash."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint with weights_only=True: a checkpoint must never run code."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle refusing a global, truncated zip, not a checkpoint at all
        raise CLIError(f"cannot read checkpoint {path} ({first_line(e)}); expected a .pt file written by this project") from e


def first_nonfinite(state, prefix: str = "") -> str | None:
    """The name of the first floating tensor in a (nested) state dict that holds
    NaN or infinity, or None. A checkpoint with such weights samples black images."""
    if torch.is_tensor(state):
        return prefix or "tensor" if state.is_floating_point() and not torch.isfinite(state).all() else None
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    for key, value in items:
        bad = first_nonfinite(value, f"{prefix}.{key}" if prefix else str(key))
        if bad:
            return bad
    return None


def require_keys(ckpt: dict, keys, what: str) -> dict:
    """`ckpt`, if it holds every one of `keys`; else one line naming what is missing."""
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise CLIError(f"{what} is not a complete checkpoint: it lacks {', '.join(map(repr, missing))}")
    return ckpt


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None) -> None:
    """Save (N, C, H, W) images in [-1, 1] (C = 1 or 3) as one PNG grid, atomically."""
    images = to_uint8(images)  # (N, H, W) or (N, H, W, 3)
    n = images.shape[0]
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    ncol = math.ceil(n / nrow)
    h, w = images.shape[1:3]
    pad = 2
    grid = np.zeros((ncol * (h + pad) + pad, nrow * (w + pad) + pad) + images.shape[3:], np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = img
    save_png(grid, path)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 (N, H, W) for grey or (N, H, W, 3) for RGB. Images holding
    NaN or infinity are refused: they would be written as black pictures of a diverged model."""
    x = images.detach().float().cpu()
    if not torch.isfinite(x).all():
        raise CLIError("the images hold NaN or infinity (non-finite): the model has diverged; no image written")
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return x[..., 0] if x.shape[-1] == 1 else x


def save_png(array: np.ndarray, path: str | os.PathLike) -> None:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


class CSVLog:
    """Append rows to a CSV file; on resume, rows past the resumed step are dropped
    so the log never shows a step twice."""

    def __init__(self, path: str | os.PathLike, fields: list[str], resume_step: int | None = None):
        self.path, self.fields = Path(path), ["step", "epoch"] + [f for f in fields if f not in ("step", "epoch")]
        rows = []
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, self.fields, extrasaction="ignore")  # a resumed run may log other columns
            w.writeheader()
            w.writerows(rows)

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.fields, extrasaction="ignore").writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


# --------------------------------------------------------------------------- downloads


def download(url: str, path: str | os.PathLike, sha256_prefix: str | None = None) -> None:
    """Fetch `url` to `path` atomically: a failed or cut-off download leaves no file (nor a folder made before
    the server answers); with sha256_prefix, another hash is refused. Network failures raise OSError."""
    print(f"downloading {url} -> {path}", file=sys.stderr, flush=True)
    h = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as r, atomic_path(path) as tmp, open(tmp, "wb") as f:
        while chunk := r.read(1 << 20):
            h.update(chunk)
            f.write(chunk)
        if sha256_prefix and not h.hexdigest().startswith(sha256_prefix):
            raise CLIError(f"downloaded {url} has the wrong sha256 ({h.hexdigest()[:8]}...), not saved")


# --------------------------------------------------------------------------- EMA


class EMA:
    """Exponential moving average of a model's weights (Polyak averaging), the
    weights DDPM samples with: shadow <- decay * shadow + (1 - decay) * param.

    With `step`, the decay warms up as min(decay, (1 + step) / (10 + step)), the
    num_updates rule of TensorFlow's ExponentialMovingAverage: early on the
    average follows the weights closely instead of clinging to the random
    initialisation (at a fixed 0.999, 150 steps leave it 86% initialisation)."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        import copy

        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int | None = None) -> None:
        decay = self.decay if step is None else min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - decay)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


# --------------------------------------------------------------------------- distributed (torchrun)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str | None = None) -> DistInfo:
    """Join the process group when started by torchrun (WORLD_SIZE > 1): NCCL on
    GPUs, gloo on CPU. A plain `python main.py ...` is a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo(0, 1, pick_device(device_name))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, device)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DistributedDataParallel or torch.compile."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# --------------------------------------------------------------------------- the training loop


class _StopRequest:
    """First Ctrl-C: finish the current step, save, exit. Second: stop at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._old = signal.getsignal(signal.SIGINT)
        try:
            signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread (some test runners): plain behaviour
            self._old = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this step and saving a checkpoint (press again to abort)", flush=True)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of an epoch, a pure function of (seed, epoch), so that a
    resumed run sees exactly the batches the uninterrupted run would have."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def train_loop(
    data: torch.Tensor,
    step_fn: Callable[[torch.Tensor], dict],
    state_fn: Callable[[], dict],
    cfg: RunConfig,
    dist_info: DistInfo,
    start_step: int = 0,
    on_epoch_end: Callable[[int], None] | None = None,
    log_fields: tuple[str, ...] = ("loss",),
    monitor: Callable[[int, dict], str | None] | None = None,
    keep_epoch_checkpoints: bool = False,
    evaluate: Callable[[int], dict] | None = None,
) -> int:
    """Run `step_fn` over shuffled batches of `data` (N, ...) for the steps of total_steps (cfg.max_steps, else
    cfg.epochs epochs), writing to cfg.out. step_fn(batch) does one optimiser step and returns metrics (floats),
    each of `log_fields` finite or the run stops. state_fn() returns the model-specific part of the
    checkpoint; the loop adds step, epoch, RNG state and the config (as "args"), and refuses to save a
    non-finite tensor. evaluate(step) (rank 0; monitor.Monitor) returns measures that join the step's
    loss.csv row (their names among `log_fields`), or {} when it has nothing to say. Each rank takes every
    world_size-th sample of the epoch's order, so the global batch is cfg.batch_size * world_size. To resume,
    pass the step Run.restore returns. Returns the final step."""
    from tqdm import tqdm  # imported here so that plain imports of common stay light

    out = Path(cfg.out)
    if dist_info.device.type == "cuda":
        # The uint8 images go to the GPU once (20,000 at 256 px are 1.3 GB): batches are then
        # gathered there, with no host-to-device copy per step and nothing to pin.
        data = data.to(dist_info.device)
    n = data.shape[0]
    total, steps_per_epoch = total_steps(cfg, n, dist_info.world_size)
    if cfg.max_steps is not None and cfg.epochs is not None and dist_info.is_main:
        print(f"note: --max-steps {cfg.max_steps} is the budget; --epochs {cfg.epochs} is ignored")
    log = CSVLog(out / "loss.csv", list(log_fields) + ["images_per_s"], resume_step=start_step) if dist_info.is_main else None
    step = start_step
    saved_step = start_step if start_step else None  # the step OUT/checkpoint.pt holds, if any

    def stop_message(what: str) -> str:
        kept = (f"{out / 'checkpoint.pt'} keeps the last good state (step {saved_step})" if saved_step is not None
                else "no checkpoint was written")
        return f"{what}; stopped, {kept} (try a lower learning rate)"

    def checkpoint(epoch_done: int) -> None:
        nonlocal saved_step
        if dist_info.is_main:
            state = state_fn()
            bad = first_nonfinite(state)
            if bad:  # never save weights that would sample black images
                raise CLIError(stop_message(f"{bad} became non-finite by step {step}"))
            args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items()}
            state.update(step=step, epoch=epoch_done, rng=rng_state(), args=args)
            save_checkpoint(state, out / "checkpoint.pt")
        saved_step = step

    def finish_epoch(epoch: int) -> None:
        """The epoch's pictures and (optionally) its checkpoint copy, once per finished epoch. With --eval-every N,
        pictures only for the epochs that hold an evaluation: a small set's epochs of a few steps would
        otherwise spend more time drawing grids than training."""
        if dist_info.is_main:
            every = cfg.eval_every or 1
            if on_epoch_end is not None and step // every > (step - steps_per_epoch) // every:
                on_epoch_end(epoch)
            if keep_epoch_checkpoints:
                with atomic_path(out / f"checkpoint_epoch{epoch + 1:03d}.pt") as tmp:
                    shutil.copyfile(out / "checkpoint.pt", tmp)

    bar = tqdm(total=total, initial=min(step, total), disable=not dist_info.is_main, desc="train", dynamic_ncols=True)

    with _StopRequest() as stop, bar:  # closing the bar on any exit puts an error on a line of its own
        while step < total:
            epoch, skip = divmod(step, steps_per_epoch)
            order = epoch_order(n, cfg.seed, epoch)[dist_info.rank::dist_info.world_size]
            for i in range(skip, steps_per_epoch):
                idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
                t0 = time.perf_counter()
                metrics = step_fn(data[idx.to(data.device)])
                rate = len(idx) * dist_info.world_size / max(time.perf_counter() - t0, 1e-9)
                bad = next((k for k in log_fields if k in metrics and not math.isfinite(metrics[k])), None)
                if bad:
                    raise CLIError(stop_message(f"{bad} became {metrics[bad]} at step {step + 1}"))
                step += 1
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()} | {"img/s": f"{rate:.1f}"})
                if evaluate is not None and dist_info.is_main:
                    metrics = {**metrics, **evaluate(step)}
                if log is not None:
                    log.write({"step": step, "epoch": epoch, **metrics, "images_per_s": rate})
                if monitor is not None and dist_info.is_main:
                    warning = monitor(step, metrics)
                    if warning:
                        tqdm.write(f"warning: {warning}")
                        with open(out / "warnings.log", "a") as f:
                            f.write(f"step {step}: {warning}\n")
                if stop.requested:
                    epoch_done = epoch + 1 if step % steps_per_epoch == 0 else epoch
                    checkpoint(epoch_done)
                    if epoch_done > epoch:  # Ctrl-C on an epoch's last step still leaves that epoch's pictures
                        finish_epoch(epoch)
                    raise CLIError(f"interrupted at step {step}; saved {out / 'checkpoint.pt'} (continue with --resume)")
                if step >= total:
                    break
            epoch_done = epoch + 1 if step % steps_per_epoch == 0 else epoch
            checkpoint(epoch_done)
            if epoch_done > epoch:
                finish_epoch(epoch)
            elif step >= total and dist_info.is_main and on_epoch_end is not None:
                on_epoch_end(epoch)  # a run stopped mid-epoch by --max-steps still leaves its pictures
    return step


# --------------------------------------------------------------------------- a generator's training run


def check_out(out: str | os.PathLike, data: str | os.PathLike | None = None) -> None:
    """Refuse, before any work, an --out that is a file or lies under one, or one inside --data
    (a generator's sample grids there would be read as training images by the next run)."""
    out = Path(out)
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise CLIError(f"--out {out} is not a folder ({blocker} is a file)")
    if data is not None and out.resolve().is_relative_to(Path(data).resolve()):
        raise CLIError(f"--out {out} is inside --data {data}: the run's images would become training images "
                       "(choose an --out outside --data)")


def open_run(out: str | os.PathLike, resume: bool, kind: str, keys: tuple[str, ...] = ()) -> dict | None:
    """The checkpoint a run continues (OUT/checkpoint.pt, of this `kind`, holding `keys`), or None
    for a fresh run, which must not overwrite an existing checkpoint."""
    path = Path(out) / "checkpoint.pt"
    if not resume:
        if path.exists():
            raise CLIError(f"{path} exists: pass --resume to continue it, or choose another --out")
        return None
    if not path.is_file():
        raise CLIError(f"--resume: no checkpoint at {path}")
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        raise CLIError(f"{path} is not a {kind} checkpoint (kind={ckpt.get('kind') if isinstance(ckpt, dict) else None!r})")
    return require_keys(ckpt, ("step", "rng", *keys), str(path))


def keep_saved(cfg, saved: dict):
    """`cfg` with the checkpoint's `saved` settings, the truth on --resume. An option counts as given when it is
    not at its field's default (one given at the default looks left out); given otherwise, it is an error."""
    names = [f for f in fields(cfg) if f.name in saved]
    for f in names:
        given, was = getattr(cfg, f.name), saved[f.name]
        if given != f.default and given != was:
            trained = (f"{'with' if was else 'without'} {option_name(f)}" if isinstance(given, bool)
                       else f"with {option_name(f)} {was}, not {given}")
            raise CLIError(f"--resume: the checkpoint was trained {trained}")
    return replace(cfg, **{f.name: saved[f.name] for f in names})


@dataclass
class Run:
    """A generator's run: its config, its place in the torchrun world, the checkpoint it continues (or None)."""

    cfg: Any
    info: DistInfo
    ckpt: dict | None

    def restore(self, **parts) -> int:
        """Load each part (network, optimiser, EMA) from the checkpoint's entry of that name, then the RNG (after
        the networks, whose initialisation would move it); ranks but 0 get noise of their own. Returns the step."""
        step = 0
        if self.ckpt is not None:
            for name, part in parts.items():
                try:
                    part.load_state_dict(self.ckpt[name])
                except (RuntimeError, ValueError, KeyError, TypeError) as e:
                    raise CLIError(f"{self.cfg.out / 'checkpoint.pt'}: cannot restore {name!r} ({first_line(e)})") from e
            set_rng_state(self.ckpt["rng"])
            step = self.ckpt["step"]
        if self.info.rank:
            torch.manual_seed(self.cfg.seed * 7919 + self.info.rank * 1_000_003 + step)
        return step

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """What a step runs: `model` in DistributedDataParallel under torchrun, compiled with --compile."""
        if self.info.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            cuda = self.info.device.type == "cuda"
            model = DistributedDataParallel(model, device_ids=[self.info.device.index] if cuda else None)
        return torch.compile(model) if self.cfg.compile else model


@contextmanager
def training_run(cfg, kind: str, keys: tuple[str, ...] = ()) -> Iterator[Run]:
    """What both generators do around their own part, in this order: check --out (check_out), join the
    torchrun world, lock --out for the whole run (rank 0; run_lock), open the checkpoint to continue
    (open_run, with its `keys`), seed everything with cfg.seed; at the end, leave the process group."""
    check_out(cfg.out, cfg.data)
    info = setup_distributed(cfg.device)
    try:
        with run_lock(cfg.out, f"{kind} run") if info.is_main else nullcontext():
            ckpt = open_run(cfg.out, cfg.resume, kind, keys)
            seed_everything(cfg.seed)
            yield Run(cfg, info, ckpt)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
