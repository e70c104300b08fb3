"""Typed configurations that are also command-line options, and the error a user can fix.

`flag` makes a dataclass field an option of main.py (its default and help written once, beside the
code that reads them); `check_config` validates a config against its fields' metadata, so a config
built in Python is checked like one from the command line. `CLIError` is a problem the user can fix:
main.py prints it as one line and exits 2.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterator


class CLIError(Exception):
    """A problem the user can fix; main.py prints it as one line and exits 2."""


@contextmanager
def user_error() -> Iterator[None]:
    """Re-raise a ValueError of library code (diffusion.py's checks) as the CLIError main.py prints."""
    try:
        yield
    except ValueError as e:
        raise CLIError(str(e)) from e


def shown(path: str | os.PathLike) -> str:
    """A path as text any stream prints: bytes that are not UTF-8 (a Latin-1 folder name) become U+FFFD."""
    return os.fsencode(path).decode("utf-8", "replace")


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (else its type's name), for one-line errors."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# --------------------------------------------------------------------------- typed configurations


# meta keys of flag: flag: another option name ("--class"); short: a short alias ("-n"); choices;
# min / above: the smallest allowed number (>= / >); positional: an argument without "--"; metavar.
def flag(default: Any = MISSING, help: str = "", **meta) -> Any:
    """A dataclass field that is also main.py's option `--field-name` with this default and help (none: no option)."""
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
    resume: bool = flag(False, "continue OUT/checkpoint.pt (with its model settings; see docs/ddpm.md)")
    amp: bool = flag(False, "bfloat16 autocast (CPU, or CUDA with bf16 support)")
    compile: bool = flag(False, "torch.compile the network(s), worth it on GPUs")
    device: str = flag("auto", "auto, cpu, cuda, cuda:1")
    eval_every: int | None = flag(None, "every N steps: KID and a detectability proxy against held-out real images "
                                  "in loss.csv, best.pt, curves.png (training/monitor.py)", min=1)
    eval_data: Path | None = flag(None, "the held-out real images --eval-every compares with (default: "
                                  "validation_data beside --data, in the extract layout; never the test split)")
    eval_on_test: bool = flag(False, "let --eval-data be an extract's test split: best.pt is then chosen on the "
                              "images that final numbers are measured on (recorded in the checkpoints)")

    def __post_init__(self):
        self.data, self.out = Path(self.data), Path(self.out)
        self.eval_data = None if self.eval_data is None else Path(self.eval_data)
        check_config(self)
        if self.eval_data is not None and self.eval_every is None:  # an option that would do nothing
            raise CLIError("--eval-data without --eval-every: nothing would be monitored (give --eval-every N)")
        if self.eval_on_test and self.eval_data is None:
            raise CLIError("--eval-on-test needs --eval-data (the default held-out folder is never the test split)")


def total_steps(cfg: RunConfig, n: int, world_size: int = 1) -> tuple[int, int]:
    """(steps of the run, steps per epoch) for n training images: --max-steps when given, else --epochs
    (default DEFAULT_EPOCHS) passes of n // (batch * world) steps (a set smaller than a batch is one step)."""
    per_epoch = max(1, (n // world_size) // cfg.batch_size)
    return (cfg.max_steps if cfg.max_steps is not None else (cfg.epochs or DEFAULT_EPOCHS) * per_epoch), per_epoch


def keep_saved(cfg, saved: dict, source: str = "--resume: the checkpoint"):
    """`cfg` with the `saved` settings of `source` (the checkpoint on --resume; a pretrained model's schedule).
    An option counts as given when it is not at its field's default (one given at the default looks left out);
    given otherwise, it is an error."""
    names = [f for f in fields(cfg) if f.name in saved]
    for f in names:
        given, was = getattr(cfg, f.name), saved[f.name]
        if given != f.default and given != was:
            trained = (f"{'with' if was else 'without'} {option_name(f)}" if isinstance(given, bool)
                       else f"with {option_name(f)} {was}, not {given}")
            raise CLIError(f"{source} was trained {trained}")
    return replace(cfg, **{f.name: saved[f.name] for f in names})
