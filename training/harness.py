"""The training run both generators share: open it (`training_run`), then loop (`train_loop`).

A model's runner (ddpm_run.py, gan_run.py) opens `training_run` and hands `train_loop` a step
function (one optimiser step, from the teaching module) and a state function (what its checkpoint
holds); the loop owns what a user expects of a long run: deterministic data order, a progress bar,
a CSV loss log, a checkpoint per epoch written atomically, `--resume` that continues bit for bit,
Ctrl-C that saves and exits, and a non-finite loss, gradient or weight that stops before saving.
"""

from __future__ import annotations

import csv
import math
import os
import random
import shutil
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from plumbing.configs import CLIError, RunConfig, first_line, total_steps
from plumbing.files import atomic_path, check_output, first_nonfinite, load_checkpoint, remove_stale_temporaries, require_keys, save_checkpoint
from plumbing.runtime import epoch_order, pick_device, seed_everything


# --------------------------------------------------------------------------- random state


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


# --------------------------------------------------------------------------- one run per folder


def _listing(folder: Path) -> dict:
    """Each entry of `folder` but the lock, with its size and modification time: what a run has written."""
    return {p.name: (p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.iterdir() if p.name != ".lock"}


def flock_file(lock: Path, busy: str):
    """`lock` opened ("a+") under an exclusive flock, or None when the file was removed or replaced before the
    lock was taken (open it again). Another holder: the one-line CLIError `busy`, its "{pid}" the holder's."""
    import fcntl

    f = open(lock, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise CLIError(busy.format(pid=holder)) from None
    try:
        if os.stat(lock).st_ino == os.fstat(f.fileno()).st_ino:
            return f
    except FileNotFoundError:
        pass
    f.close()
    return None


@contextmanager
def run_lock(folder: str | os.PathLike, what: str = "run") -> Iterator[Path]:
    """Hold an exclusive lock on a run folder for the whole run, so that two runs
    never write into one folder. The OS releases the lock when the process ends,
    however it ends, so a lock left by a killed run is never in the way; the file
    names the holder's pid for the message. Also clears stale temporaries. A run
    that ends in an error before it has written anything removes the lock file it
    made, and the folders it made: a refusal leaves no trace."""
    import fcntl

    folder, made = Path(folder), []  # made: the folders this run creates
    lock = folder / ".lock"
    while True:
        made += [p for p in (folder, *folder.parents) if not p.exists() and p not in made]
        folder.mkdir(parents=True, exist_ok=True)
        new = not lock.exists()
        try:  # a refused run may remove the lock, or the folder it made, meanwhile: then again
            f = flock_file(lock, f"{folder} is in use by another {what} (pid {{pid}}); wait for it or choose another --out")
        except FileNotFoundError:
            continue
        if f is not None:
            break
    try:
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        remove_stale_temporaries(folder)
        before = _listing(folder)
        yield folder
    except BaseException:
        if new and _listing(folder) == before:  # refused before writing anything
            lock.unlink()
            for p in sorted(made, key=lambda p: len(p.parts), reverse=True):  # deepest first
                try:
                    p.rmdir()  # only when empty: another run may have begun to use it
                except OSError:
                    break
        raise
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


# --------------------------------------------------------------------------- the loss log


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


# --------------------------------------------------------------------------- the training loop


class Interrupted(CLIError):
    """Ctrl-C stopped a run after it saved a checkpoint: `saved` says what was kept, `how` how to go on
    (a caller that resumes by other means than --resume, such as the study, says its own)."""

    def __init__(self, saved: str, how: str = "continue with --resume"):
        super().__init__(f"{saved} ({how})")
        self.saved = saved


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
                    raise Interrupted(f"interrupted at step {step}; saved {out / 'checkpoint.pt'}")
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
    """Refuse, before any work, an --out that is a file or lies under one, one that cannot be written (a
    read-only folder), or one inside --data (a generator's sample grids there would be read as training
    images by the next run)."""
    out = Path(out)
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise CLIError(f"--out {out} is not a folder ({blocker} is a file)")
    if data is not None and out.resolve().is_relative_to(Path(data).resolve()):
        raise CLIError(f"--out {out} is inside --data {data}: the run's images would become training images "
                       "(choose an --out outside --data)")
    check_output(out, "--out", folder=True)


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
