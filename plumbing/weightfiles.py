"""Pretrained weights coming in: where a diffusers model's files are (a folder, the Hugging Face
cache, a download from the Hub) and reading weight files without running code (safetensors parsed
by hand; `.bin` pickles with `torch.load(weights_only=True)`). The key map from diffusers' names to
ours is in ddpm.py; tools/export.py is the way out. Imports neither diffusers nor safetensors.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from plumbing import files
from plumbing.configs import CLIError, first_line, shown

HF_REPO = "google/ddpm-cifar10-32"
HF_URL = "https://huggingface.co/google/ddpm-cifar10-32/resolve/main/{}"
DEFAULT_PRETRAINED = Path("models/ddpm-cifar10-32")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


# --------------------------------------------------------------------------- weight files, read without running code


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
        if not isinstance(header, dict):
            raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
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
        first = first_line(e)
        for line in str(e).splitlines():  # the refusal names the offending global
            if "Unsupported global" in line or "Unsupported operand" in line:
                first = line.strip()
        raise CLIError(f"refusing to load {path}: not a plain tensor file (a pickle that would run code "
                       f"or build arbitrary objects): {first}") from e
    if not isinstance(sd, dict):
        raise CLIError(f"{path} does not hold a state dict")
    return sd


# --------------------------------------------------------------------------- where the files are


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps downloads: $HF_HUB_CACHE, else $HF_HOME/hub,
    else $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "huggingface" / "hub"


def find_cached_snapshot(repo: str = HF_REPO, weight_files: tuple[str, ...] = WEIGHT_FILES) -> Path | None:
    """The snapshot folder of the Hub model `repo` in the Hugging Face cache, if it holds config.json and
    one of `weight_files`. Layout (huggingface_hub): models--OWNER--NAME/refs/main names a revision;
    snapshots/REVISION/FILE are symlinks into blobs/ (copies on some systems). Prefers the revision
    refs/main names, else the newest snapshot. A dangling link: None, and a line saying so."""
    root = hub_cache_dir() / f"models--{repo.replace('/', '--')}"
    snapshots, ref = root / "snapshots", root / "refs" / "main"
    revision = ref.read_text().strip() if ref.is_file() else ""
    snap = snapshots / revision if revision and Path(revision).name == revision != ".." else None
    if snap is None or not snap.is_dir():
        candidates = [p for p in snapshots.iterdir() if p.is_dir()] if snapshots.is_dir() else []
        snap = max(candidates, key=lambda p: p.stat().st_mtime, default=None)
    if snap is None:
        return None
    for name in ("config.json", *weight_files):
        if (snap / name).is_symlink() and not (snap / name).exists():
            print(f"the Hugging Face cache copy at {snap} is broken ({name} points to a missing file); "
                  "not using it", flush=True)
            return None
    complete = (snap / "config.json").is_file() and any((snap / name).is_file() for name in weight_files)
    return snap if complete else None


def pipeline_root(path: Path) -> Path | None:
    """The diffusers pipeline folder (model_index.json, unet/, scheduler/; what export writes) that `path` is,
    or whose unet/ (or a file in it) `path` is; None when it belongs to none."""
    folder = path if path.is_dir() else path.parent
    if (folder / "model_index.json").is_file():
        return folder
    return folder.parent if folder.name == "unet" and (folder.parent / "model_index.json").is_file() else None


def pipeline_scheduler(path: Path) -> dict | None:
    """The scheduler/scheduler_config.json of the pipeline `path` belongs to (pipeline_root), or None."""
    root = pipeline_root(Path(path))
    file = root / "scheduler" / "scheduler_config.json" if root is not None else None
    if file is None or not file.is_file():
        return None
    try:
        config = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CLIError(f"{shown(file)} is not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise CLIError(f"{shown(file)} is not a JSON object of scheduler settings")
    return config


def locate(path: Path, download: bool = True) -> tuple[dict | None, Path]:
    """(config.json as a dict, or None for a lone weights file; the weights file) of a diffusers model at
    `path`: a folder with config.json and one of WEIGHT_FILES, a pipeline folder (model_index.json; its
    unet/ is read), or one weights file. Only a folder that is missing or empty (hidden files aside) stands
    for HF_REPO: it is read from the Hugging Face cache's copy when there is one, else, with `download`,
    downloaded into it. A folder holding anything else is another model's: refused, never filled."""
    is_folder = not path.is_file() and path.suffix not in (".bin", ".safetensors", ".pt", ".pth")
    has_weights = lambda folder: any((folder / f).is_file() for f in WEIGHT_FILES)  # noqa: E731
    if is_folder and not has_weights(path) and pipeline_root(path) == path:
        print(f"{shown(path)} is a diffusers pipeline: reading its UNet, {shown(path / 'unet')}")
        path = path / "unet"
    if is_folder and not has_weights(path):
        held = sorted(p.name for p in path.iterdir() if not p.name.startswith(".")) if path.is_dir() else []
        if held or pipeline_root(path) is not None:
            raise CLIError(f"no weights ({WEIGHT_FILES[0]} or {WEIGHT_FILES[1]}) in {shown(path)}, which holds "
                           f"{', '.join(held[:3]) or 'nothing'}: another model's folder is neither read as {HF_REPO} "
                           "nor filled with it (give the folder or file that holds the weights)")
        cached = find_cached_snapshot()
        if cached is not None:
            print(f"no weights in {shown(path)}: using the Hugging Face cache's {HF_REPO} at {cached}")
            path = cached
        for name in (WEIGHT_FILES[0], "config.json") if cached is None and download else ():  # config.json last
            try:
                if not (path / name).is_file():
                    files.download(HF_URL.format(name), path / name)
            except OSError as e:  # URLError, timeouts, refused connections
                raise CLIError(f"no pretrained weights at {path} and the download failed ({getattr(e, 'reason', e)}): "
                               f"fetch config.json and {WEIGHT_FILES[0]} from https://huggingface.co/{HF_REPO}/tree/"
                               f"main into {path}/ (or pass --pretrained PATH)") from e
    weights = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None) if is_folder else path
    if weights is None or not weights.is_file():
        raise CLIError(f"pretrained weights not found: {path} (expected a folder with config.json and "
                       f"{WEIGHT_FILES[0]}, or that file alone)")
    if not (is_folder and (path / "config.json").is_file()):
        return None, weights
    try:
        return json.loads((path / "config.json").read_text()), weights
    except (ValueError, UnicodeDecodeError) as e:
        raise CLIError(f"{path / 'config.json'} is not valid JSON ({e})") from e
