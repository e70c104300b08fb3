"""Devices, seeds, mixed precision: the few lines every model file needs around torch."""

from __future__ import annotations

import random

import numpy as np
import torch

from plumbing.configs import CLIError


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


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of an epoch, a pure function of (seed, epoch), so that a
    resumed run sees exactly the batches the uninterrupted run would have."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def autocast(device: torch.device, enabled: bool):
    """bfloat16 autocast where it is supported (CPU, CUDA with bf16), else a no-op context."""
    ok = enabled and (device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported()))
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=ok)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DistributedDataParallel or torch.compile."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
