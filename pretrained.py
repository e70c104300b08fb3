"""google/ddpm-cifar10-32 coming in (hub.py is the way out): where its files are (a folder, the
Hugging Face cache, a download from the Hub), reading weight files without running code, and
diffusers' config.json and weight names mapped to those of ddpm.UNet (an explicit key map).
ddpm.load_pretrained puts these together; nothing here imports ddpm, diffusers or safetensors.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

import common
from common import CLIError

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
        first = common.first_line(e)
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


def locate(path: Path, download: bool = True) -> tuple[dict | None, Path]:
    """(config.json as a dict, or None for a lone weights file; the weights file) of a diffusers model at
    `path`: a folder with config.json and one of WEIGHT_FILES, or one weights file. A folder without
    weights is read from the Hugging Face cache's copy of HF_REPO when there is one, else, with
    `download`, the two files are downloaded into it."""
    is_folder = not path.is_file() and path.suffix not in (".bin", ".safetensors")
    if is_folder and not any((path / f).is_file() for f in WEIGHT_FILES):
        cached = find_cached_snapshot()
        if cached is not None:
            print(f"no weights in {common.shown(path)}: using the Hugging Face cache's {HF_REPO} at {cached}")
            path = cached
        for name in ("config.json", WEIGHT_FILES[0]) if cached is None and download else ():
            try:
                if not (path / name).is_file():
                    common.download(HF_URL.format(name), path / name)
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


# --------------------------------------------------------------------------- diffusers' names -> ours


# Attention sub-keys of older diffusers checkpoints -> the current names, which ours follow.
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def unet_config(cfg: dict) -> dict:
    """ddpm.UNetConfig's fields from a diffusers UNet2DModel config.json; refuses what the UNet does not
    implement (hub.unet_config_to_diffusers is the inverse). num_class_embeds N (a class-conditional UNet)
    is N - 1 classes and the no-label token of classifier-free guidance, the last row, as ddpm.UNet has it."""
    unsupported = {"time_embedding_type": "positional", "center_input_sample": False, "act_fn": "silu",
                   "mid_block_scale_factor": 1, "resnet_time_scale_shift": "default", "class_embed_type": None,
                   "add_attention": True, "time_embedding_dim": None,
                   "downsample_type": "conv", "upsample_type": "conv"}
    for key, ok in unsupported.items():
        if cfg.get(key, ok) != ok:
            raise CLIError(f"config.json: {key}={cfg[key]!r} is not supported (this UNet implements {ok!r})")
    down = cfg.get("down_block_types", [])
    up = cfg.get("up_block_types", [])
    levels = tuple(i for i, name in enumerate(down) if name.startswith("Attn"))
    if tuple(len(up) - 1 - i for i, name in enumerate(up) if name.startswith("Attn"))[::-1] != levels:
        raise CLIError("config.json: attention must sit at the same levels in down_block_types and up_block_types")
    chs, groups, eps = tuple(cfg.get("block_out_channels", ())), cfg.get("norm_num_groups", 32), cfg.get("norm_eps", 1e-5)
    if not chs or type(groups) is not int or groups < 1 or any(type(c) is not int or c < 1 or c % groups for c in chs):
        raise CLIError(f"config.json: block_out_channels {list(chs)} must be positive multiples of norm_num_groups {groups}")
    if type(eps) not in (int, float) or not eps > 0:
        raise CLIError(f"config.json: norm_eps must be a positive number, got {eps!r}")
    head = cfg.get("attention_head_dim")
    if levels and head is not None and any(head != chs[i] for i in levels):
        raise CLIError("config.json: only single-head attention (attention_head_dim null) is supported")
    embeds = cfg.get("num_class_embeds")
    if embeds is not None and (type(embeds) is not int or embeds < 2):
        raise CLIError(f"config.json: num_class_embeds must be null or a whole number >= 2 (classes and the "
                       f"no-label token), got {embeds!r}")
    sample_size = cfg.get("sample_size", 32)
    return dict(in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
                sample_size=sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size,
                block_out_channels=chs, layers_per_block=cfg.get("layers_per_block", 2), attention_levels=levels,
                norm_groups=groups, norm_eps=eps, dropout=cfg.get("dropout", 0.0), freq_shift=cfg.get("freq_shift", 0),
                flip_sin_to_cos=cfg.get("flip_sin_to_cos", True), downsample_padding=cfg.get("downsample_padding", 1),
                num_classes=None if embeds is None else embeds - 1)


def convert_diffusers_state_dict(sd: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Explicit key map, diffusers -> ours: names are the same except
        attentions.*.{query,key,value,proj_attn}  -> {to_q,to_k,to_v,to_out}   (old generation)
        attentions.*.to_out.0                     -> to_out                    (current generation)
    (class_embedding.weight, a conditional UNet's (num_classes + 1, 4 C0) table, keeps its name)
    and [C, C, 1, 1] attention projections (1x1 convolutions in old conversions) become [C, C].
    Every tensor's shape is checked; the first missing, unexpected or mis-shaped key is an error."""
    ours = model.state_dict()
    out = {}
    for key, value in sd.items():
        parts = key.split(".")  # e.g. mid_block.attentions.0.query.weight
        if "attentions" in parts:
            parts[-2:-1] = _OLD_ATTENTION_NAMES.get(parts[-2], parts[-2]).split(".")
            if parts[-3:-1] == ["to_out", "0"]:
                del parts[-2]
            if value.dim() == 4 and value.shape[2:] == (1, 1):
                value = value[:, :, 0, 0]
        new = ".".join(parts)
        if new not in ours:
            raise CLIError(f"unexpected key in pretrained weights: {key}")
        if value.shape != ours[new].shape:
            raise CLIError(f"shape mismatch for {key}: file has {tuple(value.shape)}, model expects {tuple(ours[new].shape)}")
        out[new] = value.float()
    missing = [k for k in ours if k not in out]
    if missing:
        raise CLIError(f"pretrained weights lack key {missing[0]} ({len(missing)} missing in all)")
    return out
