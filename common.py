"""Shared plumbing: devices, seeding, atomic files, checkpoints, EMA, DDP, and the
training loop that both generators (ddpm.py, dcgan.py) run.

Nothing here knows about a particular model. A model file hands `train_loop` a
step function and a state function; the loop owns everything a user expects of
a long run: deterministic data order, a progress bar, a CSV loss log, a
checkpoint per epoch written atomically, `--resume` that continues bit for bit,
Ctrl-C that saves and exits, and a NaN loss that stops before it can overwrite
the last good checkpoint.
"""

from __future__ import annotations

import csv
import errno
import json
import math
import os
import random
import re
import shutil
import signal
import tempfile
import time
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image


class CLIError(Exception):
    """A problem the user can fix; main.py prints it as one line and exits 2."""


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


TEMP_PREFIX = "."  # atomic writes go to ".NAME.XXXXXXXX.SUFFIX" beside NAME


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
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIError(f"cannot read checkpoint {path} ({first}); expected a .pt file written by this project") from e


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


def open_run(out: str | os.PathLike, resume: bool, kind: str) -> dict | None:
    """The checkpoint a run continues (OUT/checkpoint.pt, which must be of this `kind`), or None
    for a fresh run, which must not overwrite an existing checkpoint."""
    path = Path(out) / "checkpoint.pt"
    if not resume:
        if path.exists():
            raise CLIError(f"{path} exists: pass --resume to continue it, or choose another --out")
        return None
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != kind:
        raise CLIError(f"{path} is not a {kind} checkpoint (kind={ckpt.get('kind')!r})")
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
    """(N, C, H, W) in [-1, 1] -> uint8 (N, H, W) for grey or (N, H, W, 3) for RGB."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    x = x.permute(0, 2, 3, 1).numpy()
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
            w = csv.DictWriter(f, self.fields)
            w.writeheader()
            w.writerows(rows)

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.fields, extrasaction="ignore").writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The safetensors format: 8-byte little-endian header length N, N bytes of JSON
    {name: {dtype, shape, data_offsets: [begin, end]}}, then the raw little-endian tensors."""
    raw = Path(path).read_bytes()
    try:
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        body = memoryview(raw)[8 + n:]
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            dtype, shape = _SAFETENSORS_DTYPES[info["dtype"]], info["shape"]
            if not 0 <= begin <= end <= len(body) or end - begin != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"tensor {name} has inconsistent offsets")
            out[name] = torch.frombuffer(bytearray(body[begin:end]), dtype=dtype).reshape(shape) if end > begin \
                else torch.empty(shape, dtype=dtype)
        return out
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CLIError(f"{path} is not a valid .safetensors file ({e})") from e


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a weights file: .safetensors parsed directly, anything else only
    through torch.load(weights_only=True), which refuses any pickle that would run code."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        for line in str(e).splitlines():  # the refusal names the offending global
            if "Unsupported global" in line or "Unsupported operand" in line:
                first = line.strip()
        raise CLIError(f"refusing to load {path}: not a plain tensor file (a pickle that would run code "
                       f"or build arbitrary objects): {first}") from e
    if not isinstance(sd, dict):
        raise CLIError(f"{path} does not hold a state dict")
    return sd


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


def wrap_ddp(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """DistributedDataParallel around `model` when running under torchrun, else `model`."""
    if info.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DistributedDataParallel or torch.compile."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# --------------------------------------------------------------------------- the training loop


@dataclass
class LoopConfig:
    epochs: int = 20
    batch_size: int = 32
    max_steps: int | None = None  # stop after this many optimiser steps in total
    seed: int = 0
    out: Path = Path("runs/out")
    log_every: int = 1
    keep_epoch_checkpoints: bool = False  # also keep checkpoint_epochNNN.pt beside checkpoint.pt


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
    cfg: LoopConfig,
    dist_info: DistInfo,
    start_step: int = 0,
    on_epoch_end: Callable[[int], None] | None = None,
    log_fields: tuple[str, ...] = ("loss",),
    monitor: Callable[[int, dict], str | None] | None = None,
) -> int:
    """Run `step_fn` over shuffled batches of `data` (N, ...) for cfg.epochs epochs.

    step_fn(batch) does one optimiser step and returns metrics (floats); the first
    of `log_fields` must be finite or the run stops. state_fn() returns the
    model-specific part of the checkpoint; the loop adds step, epoch and RNG
    state. Each rank takes every world_size-th sample of the epoch's order, so
    the global batch is cfg.batch_size * world_size. Returns the final step.

    To resume, the caller loads OUT/checkpoint.pt, builds its networks, restores
    their and the optimisers' states, then set_rng_state(ckpt["rng"]) (after the
    networks, whose initialisation would otherwise move the RNG), and passes
    ckpt["step"] as start_step: the loop skips what that step already covered.
    """
    from tqdm import tqdm  # imported here so that plain imports of common stay light

    out = Path(cfg.out)
    if dist_info.device.type == "cuda":
        # The uint8 images go to the GPU once (20,000 at 256 px are 1.3 GB): batches are then
        # gathered there, with no host-to-device copy per step and nothing to pin.
        data = data.to(dist_info.device)
    n = data.shape[0]
    per_rank = n // dist_info.world_size
    steps_per_epoch = max(1, per_rank // cfg.batch_size)  # a set smaller than a batch is one short step
    total = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    log = CSVLog(out / "loss.csv", list(log_fields) + ["images_per_s"], resume_step=start_step) if dist_info.is_main else None
    step = start_step
    saved_step = start_step if start_step else None  # the step OUT/checkpoint.pt holds, if any

    def stop_message(what: str) -> str:
        kept = (f"{out / 'checkpoint.pt'} keeps the last good state (step {saved_step})" if saved_step is not None
                else "no checkpoint was written")
        return f"{what}; stopped, {kept} (try a lower --lr)"

    def checkpoint(epoch_done: int) -> None:
        nonlocal saved_step
        if dist_info.is_main:
            state = state_fn()
            bad = first_nonfinite(state)
            if bad:  # never save weights that would sample black images
                raise CLIError(stop_message(f"{bad} became non-finite by step {step}"))
            state.update(step=step, epoch=epoch_done, rng=rng_state())
            save_checkpoint(state, out / "checkpoint.pt")
        saved_step = step

    def finish_epoch(epoch: int) -> None:
        """The epoch's pictures and (optionally) its checkpoint copy, once per finished epoch."""
        if dist_info.is_main:
            if on_epoch_end is not None:
                on_epoch_end(epoch)
            if cfg.keep_epoch_checkpoints:
                with atomic_path(out / f"checkpoint_epoch{epoch + 1:03d}.pt") as tmp:
                    shutil.copyfile(out / "checkpoint.pt", tmp)

    bar = tqdm(total=total, initial=min(step, total), disable=not dist_info.is_main, desc="train", dynamic_ncols=True)

    with _StopRequest() as stop:
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
                if log is not None and step % cfg.log_every == 0:
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
                    bar.close()
                    raise CLIError(f"interrupted at step {step}; saved {out / 'checkpoint.pt'} (continue with --resume)")
                if step >= total:
                    break
            epoch_done = epoch + 1 if step % steps_per_epoch == 0 else epoch
            checkpoint(epoch_done)
            if epoch_done > epoch:
                finish_epoch(epoch)
            elif step >= total and dist_info.is_main and on_epoch_end is not None:
                on_epoch_end(epoch)  # a run stopped mid-epoch by --max-steps still leaves its pictures
    bar.close()
    return step
