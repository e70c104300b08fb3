"""Files that survive a crash: atomic writes (a temporary beside the target, renamed when complete),
checkpoints read with `torch.load(weights_only=True)` so that a file never runs code, PNGs and image
grids that refuse non-finite pixels, downloads, and output paths checked before any work.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import re
import stat
import sys
import tempfile
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from plumbing.configs import CLIError, first_line


TEMP_PREFIX = "."  # atomic writes go to ".NAME.<8 random characters>.SUFFIX" beside NAME


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the
    block finishes, so a crash never leaves a half-written file. The file gets
    the mode a plain open() would give: an existing file's own (a private 0600
    checkpoint stays private), else 0666 less the umask (mkstemp's 0600 would
    otherwise survive the rename). A full disk is one clear error, with no temporary left."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}.", suffix=path.suffix or ".tmp")
        os.close(fd)
        os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode) if path.is_file() else 0o666 & ~_umask())
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



def write_error(e: OSError, path: Path) -> CLIError:
    """An OSError while writing `path` as one line (a full disk says so)."""
    if e.errno == errno.ENOSPC:
        return CLIError(f"no space left on the device holding {path.parent} while writing {path.name}")
    return CLIError(f"cannot write {path}: {e.strerror or e}")


def check_output(path: str | os.PathLike, option: str, folder: bool) -> Path:
    """Refuse, before any work, an output path that cannot be written: a file where a
    folder is wanted or the reverse, a file in the place of a parent folder, a parent
    that is not writable. Creates nothing; returns the path."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise CLIError(f"{option} {path} is a file, not a folder")
    if not folder and path.is_dir():
        raise CLIError(f"{option} {path} is a folder; give a file name (such as {path / 'classifier.pt'})")
    parent = path if folder else path.parent
    while not parent.exists() and parent != parent.parent:  # the nearest part of the path that exists
        parent = parent.parent
    if not parent.is_dir():
        raise CLIError(f"{option} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise CLIError(f"{option} {path}: {parent} is not writable")
    return path


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """torch.save to a temporary file, then rename: the old checkpoint survives a crash, and a failed
    write (a full disk) is one line naming the file, with no temporary left."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            try:
                torch.save(state, f)  # through a Python file: a failed write is an OSError, not only torch's text
            except RuntimeError as e:  # torch's zip writer wraps the OSError ("[enforce fail at inline_container")
                if isinstance(e.__context__, OSError):
                    raise e.__context__ from None
                raise
    except OSError as e:  # not a full disk, which atomic_path names: a read-only or failing disk
        raise write_error(e, path) from e


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


# --------------------------------------------------------------------------- images


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


# --------------------------------------------------------------------------- downloads


def download(url: str, path: str | os.PathLike, sha256_prefix: str | None = None) -> None:
    """Fetch `url` to `path` atomically: a failed or cut-off download leaves no file (nor a folder made before
    the server answers); with sha256_prefix, another hash is refused. Network failures raise OSError."""
    h = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as r, atomic_path(path) as tmp, open(tmp, "wb") as f:
        print(f"downloading {url} -> {path}", file=sys.stderr, flush=True)  # once the server answers: offline, no such line
        while chunk := r.read(1 << 20):
            h.update(chunk)
            f.write(chunk)
        if sha256_prefix and not h.hexdigest().startswith(sha256_prefix):
            raise CLIError(f"downloaded {url} has the wrong sha256 ({h.hexdigest()[:8]}...), not saved")
