"""The Hugging Face side of the project: a DDPM checkpoint going out in diffusers'
layout (the way in, google/ddpm-cifar10-32 from a folder, the Hub cache or a download, is
plumbing/weightfiles.py and ddpm.load_pretrained). Imports neither diffusers, huggingface_hub nor safetensors.
Read top to bottom:
  1. a writer of the safetensors format (github.com/huggingface/safetensors, README
     "Format"), the inverse of plumbing.weightfiles.read_safetensors;
  2. our UNetConfig, state dict and schedule -> diffusers' UNet2DModel and
     DDPMScheduler (the inverse of ddpm.unet_config, ddpm.convert_diffusers_state_dict and
     ddpm_run.scheduler_settings);
  3. `main.py export`: the folder DDPMPipeline.from_pretrained reads (model_index.json,
     unet/{config.json, diffusion_pytorch_model.safetensors}, scheduler/scheduler_config.json)
     and a model card, README.md, written whole beside --out and renamed into place, under a lock.
Checked against diffusers 0.42 and safetensors 0.8 in tests/test_hub.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

import torch

import ddpm
from plumbing.configs import check_config, CLIError, flag, shown
from plumbing.files import atomic_path, check_output, first_nonfinite, load_checkpoint, write_error
from training.harness import flock_file

# --------------------------------------------------------------------------- safetensors (our own writer)

_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
                torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """The safetensors format, written atomically: 8 bytes little-endian header length N,
    N bytes of JSON {"__metadata__": {str: str} (optional), name: {dtype, shape, data_offsets:
    [begin, end]}} padded with spaces to a multiple of 8 as the reference writer does, then
    the tensors' bytes, row-major, little-endian, no gaps. As in the reference, the largest
    elements come first (then by name), so each tensor is aligned to its element size."""
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("safetensors metadata must map str to str")
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header, offset = ({"__metadata__": metadata} if metadata is not None else {}), 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    head += b" " * (-len(head) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for name in order:
            t = tensors[name].detach().cpu()
            raw = t.contiguous().reshape(-1).view(torch.uint8)  # the bytes in host order
            if sys.byteorder == "big" and t.element_size() > 1:
                raw = raw.view(-1, t.element_size()).flip(1).reshape(-1)
            f.write(raw.numpy().tobytes())


# --------------------------------------------------------------------------- UNet: ours -> diffusers UNet2DModel

# UNetConfig field -> UNet2DModel config.json key, where only the name differs.
_UNET_FIELDS = {"in_channels": "in_channels", "out_channels": "out_channels", "sample_size": "sample_size",
                "block_out_channels": "block_out_channels", "layers_per_block": "layers_per_block",
                "norm_groups": "norm_num_groups", "norm_eps": "norm_eps", "dropout": "dropout",
                "freq_shift": "freq_shift", "flip_sin_to_cos": "flip_sin_to_cos", "downsample_padding": "downsample_padding",
                "num_classes": "num_class_embeds"}  # written as num_classes + 1: the no-label token is a row too
DIFFUSERS_VERSION = "0.42.1"  # the release tests/test_hub.py checks the layout against


def unet_config_to_diffusers(cfg: ddpm.UNetConfig) -> dict:
    """UNet2DModel's config.json for our UNet: the inverse of pretrained.unet_config,
    with every setting written out (diffusers' defaults differ from this UNet's).
    A UNetConfig field this table does not know is refused, never dropped."""
    ours = asdict(cfg)
    if ours.get("num_classes") is not None:
        ours["num_classes"] += 1  # UNet2DModel(num_class_embeds=num_classes + 1): the classes and "no label"
    unknown = [k for k in ours if k not in _UNET_FIELDS and k != "attention_levels"]
    if unknown:
        raise CLIError(f"cannot export UNetConfig field {unknown[0]}={ours[unknown[0]]!r}: hub.py maps no diffusers setting to it")
    n, levels = len(cfg.block_out_channels), cfg.attention_levels
    if any(not 0 <= i < n for i in levels):
        raise CLIError(f"cannot export attention_levels {levels}: the UNet has levels 0..{n - 1}")
    return {"_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION, "num_class_embeds": None,
            **{_UNET_FIELDS[k]: (list(v) if isinstance(v, tuple) else v) for k, v in ours.items() if k in _UNET_FIELDS},
            "down_block_types": ["AttnDownBlock2D" if i in levels else "DownBlock2D" for i in range(n)],
            "up_block_types": ["AttnUpBlock2D" if n - 1 - i in levels else "UpBlock2D" for i in range(n)],
            "mid_block_type": "UNetMidBlock2D", "attention_head_dim": None,  # one head as wide as the level
            "act_fn": "silu", "time_embedding_type": "positional", "center_input_sample": False,
            "mid_block_scale_factor": 1, "resnet_time_scale_shift": "default", "add_attention": True,
            "downsample_type": "conv", "upsample_type": "conv", "class_embed_type": None}


def state_dict_to_diffusers(sd: dict[str, torch.Tensor], cfg: ddpm.UNetConfig) -> dict[str, torch.Tensor]:
    """Explicit key map, ours -> diffusers: attentions.*.to_out -> attentions.*.to_out.0
    (diffusers keeps a dropout beside the projection); every other key, class_embedding.weight of a
    conditional UNet among them, is the same.
    Each tensor's shape is checked against a UNet built from `cfg`, so the weights
    written match the config.json written; the first mismatch is an error."""
    with torch.device("meta"):  # shapes only, no memory or initialisation
        expected = ddpm.UNet(cfg).state_dict()
    out = {}
    for key, value in sd.items():
        if key not in expected:
            raise CLIError(f"unexpected key in the checkpoint's weights: {key}")
        if value.shape != expected[key].shape:
            raise CLIError(f"shape mismatch for {key}: checkpoint has {tuple(value.shape)}, config implies {tuple(expected[key].shape)}")
        parts = key.split(".")  # e.g. mid_block.attentions.0.to_out.weight
        if "attentions" in parts and parts[-2] == "to_out":
            parts.insert(-1, "0")
        out[".".join(parts)] = value
    missing = [k for k in expected if k not in sd]
    if missing:
        raise CLIError(f"the checkpoint's weights lack {missing[0]} ({len(missing)} missing in all)")
    return out


# --------------------------------------------------------------------------- scheduler: ours -> diffusers DDPMScheduler

# same formulas under diffusers' names, see diffusion.make_betas
_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2", "sigmoid": "sigmoid"}
_TRAINING_ONLY = ("loss_weight", "snr_gamma")  # how the loss was weighted: nothing a scheduler samples with


def scheduler_config(diffusion: dict) -> dict:
    """DDPMScheduler's scheduler_config.json for a checkpoint's "diffusion" entry: every sampling setting maps to
    the DDPMScheduler option of the same meaning (GaussianDiffusion uses diffusers' names and formulas; the
    parity is tests/test_schedules.py). A setting that has no DDPMScheduler equivalent is refused, never dropped;
    the loss weighting is training-only and has none to need."""
    if not isinstance(diffusion, dict):
        raise CLIError(f"malformed diffusion settings in the checkpoint: a {type(diffusion).__name__}, "
                       "not a dict of settings")
    known = tuple(ddpm.GaussianDiffusion().config())
    unknown = [k for k in diffusion if k not in known]
    if unknown:
        raise CLIError(f"cannot export diffusion setting {unknown[0]}={diffusion[unknown[0]]!r}: hub.py maps no DDPMScheduler setting to it")
    try:
        d = ddpm.GaussianDiffusion(**diffusion).config()  # fills in the defaults training used
    except (ValueError, TypeError) as e:
        raise CLIError(f"malformed diffusion settings in the checkpoint: {e}") from e
    return {"_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
            "num_train_timesteps": d["num_timesteps"], "beta_start": d["beta_start"], "beta_end": d["beta_end"],
            "beta_schedule": _BETA_SCHEDULES[d["beta_schedule"]], "trained_betas": None,
            "variance_type": d["variance_type"], "clip_sample": d["clip_sample"], "clip_sample_range": 1.0,
            "prediction_type": d["prediction_type"], "thresholding": False, "timestep_spacing": d["timestep_spacing"],
            "steps_offset": 0, "rescale_betas_zero_snr": d["rescale_betas_zero_snr"]}


# --------------------------------------------------------------------------- the model card


def _flat_numbers(tree, prefix: str = "") -> list[tuple[str, float]]:
    """("a/b", 1.0) for every number in a nested dict such as the study's distances.json."""
    if isinstance(tree, dict):
        return [row for k, v in tree.items() for row in _flat_numbers(v, f"{prefix}/{k}" if prefix else str(k))]
    return [(prefix, tree)] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def model_card(ckpt: dict, image_size: int, weights: str, distances: dict | None) -> str:
    """README.md for the Hub: what was trained on what, and that it is not for diagnosis."""
    args, d = (ckpt.get(k) if isinstance(ckpt.get(k), dict) else {} for k in ("args", "diffusion"))
    data = f"`{args['data']}`" if args.get("data") else "not recorded in the checkpoint"
    start = "fine-tuned from google/ddpm-cifar10-32" if args.get("finetune") else "trained from scratch"
    rows = _flat_numbers(distances or {})
    L = ["---", "library_name: diffusers", "pipeline_tag: unconditional-image-generation",
         "tags: [ddpm, chest-x-ray, synthetic-data, research]", "---", "",
         "# Synthetic chest X-ray DDPM (research artifact)", "",
         "**This is a research artifact. It must not be used for diagnosis or any clinical decision.** "
         "Its images are synthetic, were not reviewed by radiologists, and may carry artefacts, memorised "
         "training images or label-irrelevant cues.", "",
         f"- Training data: {data}, class {args.get('class_name') or 'all classes in that folder'}",
         f"- Model: DDPM UNet ({start}), {ckpt.get('step', 'unknown')} training steps, {weights} weights",
         f"- Images: {image_size}x{image_size}, grey repeated to 3 channels (average the channels for a grey image)",
         f"- Noise schedule: {d.get('beta_schedule', 'linear')}, {d.get('num_timesteps', 1000)} steps"
         + (f", {d['prediction_type']} prediction" if d.get("prediction_type", "epsilon") != "epsilon" else "")
         + (", zero terminal SNR" if d.get("rescale_betas_zero_snr") else ""), ""]
    if ckpt.get("classes"):  # DDPMPipeline passes no labels: the UNet alone, with class_labels, is the way in
        L[-1:-1] = [f"- Class-conditional (classifier-free guidance): class_labels {ckpt['classes']}, and "
                    f"{len(ckpt['classes'])} for no label; call `UNet2DModel(x, t, class_labels=...)`, not DDPMPipeline"]
    L += (["Measured against held-out real images:", "", "| measure | value |", "|---|---|"]
          + [f"| {name} | {value:.4g} |" for name, value in rows] if rows else ["Held-out distances: not measured."])
    L += ["", "```python", "from diffusers import DDPMPipeline", "",
          "pipe = DDPMPipeline.from_pretrained(FOLDER_OR_REPO)", "images = pipe(batch_size=4).images  # 1000 steps", "```",
          "", "Exported by xray-synth (`python main.py export`).", ""]
    return "\n".join(L)


# --------------------------------------------------------------------------- `main.py export`

WEIGHTS_FILE = "unet/diffusion_pytorch_model.safetensors"
EXPORT_FILES = ("model_index.json", "README.md", "unet/config.json", WEIGHTS_FILE, "scheduler/scheduler_config.json")


@dataclass
class ExportConfig:
    checkpoint: Path = flag(help="checkpoint.pt written by `main.py ddpm`")
    out: Path = flag(help="folder for model_index.json, unet/, scheduler/ and README.md (diffusers' layout)")
    force: bool = flag(False, "replace an earlier export in --out (only the files export writes)")
    distances: Path | None = flag(None, "JSON of held-out distances for the model card; "
                                         "without it, distances.json beside the checkpoint when there", metavar="JSON")

    def __post_init__(self):
        self.checkpoint, self.out = Path(self.checkpoint), Path(self.out)
        self.distances = None if self.distances is None else Path(self.distances)
        check_config(self)


def _is_ours(rel: str) -> bool:
    """Whether a path under --out is a file export writes (or an atomic_path temporary of one)."""
    folder, _, name = rel.rpartition("/")
    m = re.fullmatch(r"\.(.+)\.[a-z0-9_]{8}(\.[^.]+)", name)
    return (f"{folder}/{m.group(1)}".lstrip("/") if m else rel) in EXPORT_FILES


def _earlier_export(out: Path, force: bool) -> list[Path]:
    """The files of an earlier export in `out`, which --force replaces; anything else is refused."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file, not a folder")
    check_output(out, "--out", folder=True)  # a parent that is a file, a read-only folder
    found = [Path(root, name) for root, dirs, files in os.walk(out) for name in dirs + files]
    if found and not force:
        raise CLIError(f"--out {out} exists and is not empty (pass --force to replace an earlier export)")
    for p in found:
        rel = p.relative_to(out).as_posix()
        if not (p.is_file() and _is_ours(rel) or rel in ("unet", "scheduler") and p.is_dir() and not p.is_symlink()):
            raise CLIError(f"--out {out} holds {rel}, which export does not write; refusing to replace it (choose an empty --out)")
    return [p for p in found if p.is_file()]


@contextmanager
def _export_lock(out: Path) -> Iterator[None]:
    """An exclusive lock on --out for one export (flock, as training.harness.run_lock), on a file beside it,
    .NAME.export-lock, removed at the end; a second export into the same folder is refused in one line."""
    lock = out.with_name(f".{out.name}.export-lock")
    busy = f"--out {shown(out)} is in use by another export (pid {{pid}}); wait for it or choose another --out"
    while (f := flock_file(lock, busy)) is None:  # the holder removed the file once we had opened it: again
        pass
    try:
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        yield
    finally:
        lock.unlink(missing_ok=True)
        f.close()


def _write(folder: Path, files: dict[str, bytes], tensors: dict[str, torch.Tensor]) -> None:
    """The whole export into `folder`: `files` (path: bytes) and the weights."""
    write_safetensors(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})  # as diffusers writes it
    for name, content in files.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes(content)


def _leftovers(out: Path) -> list[Path]:
    """Folders an export killed mid-way left beside `out` (.NAME.partial-*, .NAME.replaced-*), when they hold
    nothing but export files."""
    found = [p for p in out.parent.iterdir() if p.is_dir() and not p.is_symlink()
             and any(p.name.startswith(f".{out.name}.{what}-") for what in ("partial", "replaced"))]
    return [p for p in found if all(q.is_dir() and q.name in ("unet", "scheduler") or q.is_file()
                                    and _is_ours(q.relative_to(p).as_posix()) for q in p.rglob("*"))]


def export(cfg: ExportConfig, distances: dict | None = None) -> Path:
    """Write the checkpoint's EMA weights (its "model" weights when it has no EMA) as a
    diffusers DDPMPipeline folder; returns cfg.out. Everything is checked before the
    first file is written. `distances` (for the model card) defaults to the JSON file
    cfg.distances, else distances.json beside the checkpoint. The folder appears whole or not at all: it is
    written beside --out (whose parent must be writable) and renamed in place, under a lock."""
    _earlier_export(cfg.out, cfg.force)  # now, and again under the lock
    out = cfg.out.resolve() if cfg.out.is_symlink() else cfg.out
    parent = next(p for p in out.parents if p.exists())
    if not os.access(parent, os.W_OK):
        raise CLIError(f"--out {cfg.out}: {parent} is not writable (export writes the folder beside --out, "
                       "then renames it into place)")
    ckpt = load_checkpoint(cfg.checkpoint)
    kind = ckpt.get("kind") if isinstance(ckpt, dict) else None
    if kind == "dcgan":
        raise CLIError(f"only DDPM checkpoints export ({cfg.checkpoint} is a GAN checkpoint)")
    if kind != "ddpm":
        raise CLIError(f"{cfg.checkpoint} is not a DDPM checkpoint of this project (kind={kind!r})")
    weights = "EMA" if ckpt.get("ema") else "model"
    sd = ckpt.get("ema") or ckpt.get("model")
    try:
        unet_cfg = ddpm.UNetConfig(**ckpt["config"])
        unet_cfg = replace(unet_cfg, sample_size=int(ckpt.get("image_size") or unet_cfg.sample_size))
    except (KeyError, TypeError, ValueError) as e:
        raise CLIError(f"malformed DDPM checkpoint {cfg.checkpoint}: {str(e) or type(e).__name__}") from e
    if not isinstance(sd, dict):
        raise CLIError(f"malformed DDPM checkpoint {cfg.checkpoint}: no weights")
    bad = first_nonfinite(sd)
    if bad:
        raise CLIError(f"{cfg.checkpoint}: weight {bad} holds NaN or infinity; refusing to export it")
    tensors = state_dict_to_diffusers(sd, unet_cfg)
    texts = {"unet/config.json": unet_config_to_diffusers(unet_cfg),
             "scheduler/scheduler_config.json": scheduler_config(ckpt.get("diffusion") or {})}
    if distances is None:
        path = cfg.distances or cfg.checkpoint.parent / "distances.json"
        try:
            distances = json.loads(path.read_text()) if cfg.distances or path.is_file() else None
        except (OSError, ValueError) as e:
            raise CLIError(f"cannot read distances {path} ({e})") from e
    if distances is not None and not isinstance(distances, dict):
        raise CLIError("distances must be a JSON object of names and numbers (nested objects allowed)")
    texts["README.md"] = model_card(ckpt, unet_cfg.sample_size, weights, distances)
    texts["model_index.json"] = {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
                                 "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}

    files = {name: shown(content if isinstance(content, str) else json.dumps(content, indent=2) + "\n").encode()
             for name, content in texts.items()}  # shown: a non-UTF-8 path in the card as U+FFFD, never an error

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with _export_lock(out):
            earlier = _earlier_export(cfg.out, cfg.force)  # another export may have finished meanwhile
            for p in _leftovers(out):
                shutil.rmtree(p)
            old, tmp = None, Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
            try:
                mask = os.umask(0)
                os.umask(mask)
                os.chmod(tmp, stat.S_IMODE(out.stat().st_mode) if out.is_dir() else 0o777 & ~mask)  # not 0700
                _write(tmp, files, tensors)
                if earlier or out.is_dir() and any(out.iterdir()):
                    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.replaced-"))
                    os.replace(out, old)  # --out is now absent, never half of either export
                try:
                    os.replace(tmp, out)  # onto a missing or empty --out
                except OSError:
                    if old is not None:
                        os.replace(old, out)  # the earlier export back in place
                    raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            if old is not None:
                shutil.rmtree(old)  # the earlier export: only files export writes (_earlier_export)
    except OSError as e:
        raise write_error(e, out) from e
    print(f"exported the {weights} weights (step {ckpt.get('step', '?')}) to {shown(cfg.out)}: "
          f"DDPMPipeline.from_pretrained({shown(cfg.out)!r})")
    return cfg.out
