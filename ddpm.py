"""Denoising diffusion: the UNet of Ho, Jain and Abbeel's released CIFAR-10 DDPM (NeurIPS 2020),
its pretrained weights, fine-tuning and sampling. The diffusion process and the samplers (DDPM, DDIM,
DPM-Solver++) are in diffusion.py. Read top to bottom:
  3. the UNet, whose default configuration is exactly `google/ddpm-cifar10-32`,
  4. loading that model's diffusers-format weights (an explicit key map),
  5. training: one step of Alg. 1 (`train_step`; training/ddpm_run.py runs the loop), 6. sampling.
(Sections 1 and 2, the noise schedule and the diffusion process, are diffusion.py's.)
Checked against diffusers 0.42 in tests/test_ddpm.py (UNet2DModel gives the same numbers);
nothing here imports diffusers.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffusion import DEFAULT_STEPS, GaussianDiffusion, check_sampler, make_betas  # noqa: F401 (ddpm.X re-exported)
from plumbing import weightfiles
from plumbing.configs import CLIError, first_line, shown, user_error
from plumbing.files import first_nonfinite, require_keys
from plumbing.runtime import autocast
from plumbing.weightfiles import DEFAULT_PRETRAINED

# --------------------------------------------------------------------------- 3. the UNet


@dataclass
class UNetConfig:
    """The default is google/ddpm-cifar10-32 (Ho et al.'s CIFAR-10 model, 35.7 M parameters)."""

    in_channels: int = 3
    out_channels: int = 3
    sample_size: int = 32
    block_out_channels: tuple = (128, 256, 256, 256)  # channels per resolution level
    layers_per_block: int = 2          # resnets per down level; up levels have one more
    attention_levels: tuple = (1,)     # levels with self-attention (level 1 = 16x16 at 32x32); mid always has it
    norm_groups: int = 32
    norm_eps: float = 1e-6
    dropout: float = 0.0               # 0.1 in the original CIFAR-10 training, 0 in the released config
    freq_shift: int = 1                # sinusoid exponent -ln(10000) i / (half - freq_shift)
    flip_sin_to_cos: bool = False      # [sin, cos] order as in Ho's code
    downsample_padding: int = 0        # 0: pad right/bottom only (TF "SAME"), as the released model
    num_classes: int | None = None     # class-conditional: labels 0..num_classes-1, and num_classes = "no label"

    def __post_init__(self):
        self.block_out_channels, self.attention_levels = tuple(self.block_out_channels), tuple(self.attention_levels)


PRESETS = {
    "cifar10": UNetConfig(),
    "small": UNetConfig(block_out_channels=(32, 64, 128)),  # 3.7 M parameters, for CPU demos
    "tiny": UNetConfig(block_out_channels=(16, 32), layers_per_block=1, norm_groups=8),  # 0.18 M, for tests
}


class TimeEmbedding(nn.Module):
    """t (B,) -> (B, c_time): the sinusoidal embedding of Vaswani et al. (DDPM Appendix B), width c,
    exponent -ln(10000) i / (c/2 - freq_shift), then Linear, SiLU, Linear."""

    def __init__(self, c: int, c_time: int, cfg: UNetConfig):
        super().__init__()
        self.c, self.freq_shift, self.flip_sin_to_cos = c, cfg.freq_shift, cfg.flip_sin_to_cos
        self.linear_1, self.linear_2 = nn.Linear(c, c_time), nn.Linear(c_time, c_time)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.c // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - self.freq_shift))
        args = t.float()[:, None] * freqs[None]  # (B, half)
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1) if self.flip_sin_to_cos else emb
        return self.linear_2(F.silu(self.linear_1(emb)))


class ResnetBlock(nn.Module):
    """GroupNorm, SiLU, conv, + time embedding, GroupNorm, SiLU, dropout, conv; plus a 1x1 shortcut when channels change."""

    def __init__(self, c_in: int, c_out: int, c_time: int, cfg: UNetConfig):
        super().__init__()
        self.norm1 = nn.GroupNorm(cfg.norm_groups, c_in, eps=cfg.norm_eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(c_time, c_out)
        self.norm2 = nn.GroupNorm(cfg.norm_groups, c_out, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # (B, c_in, H, W), emb (B, c_time) -> (B, c_out, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, width C, scale 1/sqrt(C), residual."""

    def __init__(self, c: int, cfg: UNetConfig):
        super().__init__()
        self.group_norm = nn.GroupNorm(cfg.norm_groups, c, eps=cfg.norm_eps)
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(c, c) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # softmax(q k^T / sqrt(C)) v
        return x + self.to_out(h).transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    """(B, C, H, W) -> (B, C, H/2, W/2) by a 3x3 stride-2 convolution."""

    def __init__(self, c: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            # Patch: the TF original pads right and bottom only ("SAME" for stride 2); symmetric padding gives other numbers
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """(B, C, H, W) -> (B, C, 2H, 2W): nearest-neighbour x2, then a 3x3 convolution."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def level(resnets: list, attentions: list, sampler: str, layer: nn.Module | None) -> nn.ModuleDict:
    """One resolution level named as diffusers' blocks, so weights load by name: resnets, attentions (nn.Identity
    where none) and `sampler` ("downsamplers"/"upsamplers": the stride-2 layer, empty where the UNet turns)."""
    return nn.ModuleDict({"resnets": nn.ModuleList(resnets), "attentions": nn.ModuleList(attentions),
                          sampler: nn.ModuleList([layer] if layer is not None else [])})


class UNet(nn.Module):
    """eps_theta(x_t, t): the noise-prediction network of DDPM (Ho et al. Appendix B,
    a PixelCNN++-style UNet). For the default config:
    32x32x128 -> 16x16x256 (attention) -> 8x8x256 -> 4x4x256, mid, and back up."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = cfg = config or UNetConfig()
        chs, n = cfg.block_out_channels, len(cfg.block_out_channels)
        c_time = 4 * chs[0]
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.time_embedding = TimeEmbedding(chs[0], c_time, cfg)
        self.class_embedding = None
        if cfg.num_classes is not None:
            # diffusers' UNet2DModel(num_class_embeds=num_classes + 1): one vector per label, added to the time
            # embedding; the extra row is the "no label" token of classifier-free guidance (Ho & Salimans 2022).
            # N(0, 1) rows as nn.Embedding (and diffusers) start them: distinct from step 0, so that the labels are
            # told apart early (a zero start learns them late: docs/ddpm.md); with_classes zeroes them to fine-tune.
            self.class_embedding = nn.Embedding(cfg.num_classes + 1, c_time)

        def attention(i: int, c: int) -> nn.Module:
            return AttnBlock(c, cfg) if i in cfg.attention_levels else nn.Identity()

        skip_chs, c = [chs[0]], chs[0]  # channels of every skip, in order of creation
        self.down_blocks = nn.ModuleList()
        for i, c_out in enumerate(chs):  # down: layers_per_block resnets, then a downsampler except at the bottom
            resnets = [ResnetBlock(c if j == 0 else c_out, c_out, c_time, cfg) for j in range(cfg.layers_per_block)]
            last = i == n - 1
            self.down_blocks.append(level(resnets, [attention(i, c_out) for _ in resnets], "downsamplers",
                                          None if last else Downsample(c_out, cfg.downsample_padding)))
            skip_chs += [c_out] * (cfg.layers_per_block + (0 if last else 1))
            c = c_out
        self.mid_block = nn.ModuleDict({"resnets": nn.ModuleList([ResnetBlock(c, c, c_time, cfg) for _ in range(2)]),
                                        "attentions": nn.ModuleList([AttnBlock(c, cfg)])})  # resnet, attention, resnet
        self.up_blocks = nn.ModuleList()
        for i, c_out in reversed(list(enumerate(chs))):  # up: one resnet more per level, on [h, skip]
            resnets = [ResnetBlock((c if j == 0 else c_out) + skip_chs.pop(), c_out, c_time, cfg)
                       for j in range(cfg.layers_per_block + 1)]
            c = c_out
            self.up_blocks.append(level(resnets, [attention(i, c_out) for _ in resnets], "upsamplers",
                                        Upsample(c_out) if i > 0 else None))
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, chs[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(chs[0], cfg.out_channels, 3, padding=1)
        self.channels_last = True  # speed only, see forward; False gives the plain NCHW path

    def forward(self, x: torch.Tensor, t: torch.Tensor | int, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W), t int tensor (B,) or scalar -> predicted noise (B, C, H, W). class_labels (B,) int,
        only for a class-conditional UNet: 0..num_classes-1, or num_classes (also what None means) for "no label"."""
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        emb = self.time_embedding(t)  # (B, 4 C0)
        if self.class_embedding is not None:
            if class_labels is None:
                class_labels = torch.full((x.shape[0],), self.config.num_classes, device=x.device)
            emb = emb + self.class_embedding(class_labels.to(x.device))  # (B,) -> (B, 4 C0)
        elif class_labels is not None:
            raise ValueError("class_labels given to a UNet without classes (UNetConfig.num_classes is None)")
        if self.channels_last:
            # Speed, not maths: NHWC activations spare oneDNN/cuDNN their layout conversions
            # (docs/performance.md); outputs agree to ~1e-6.
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.conv_in(x)
        skips = [h]  # every output on the way down, taken back in reverse order on the way up
        for block in self.down_blocks:  # (B, C, H, W) -> (B, C_out, H/2, W/2), but for the lowest level
            for resnet, attention in zip(block.resnets, block.attentions):
                h = attention(resnet(h, emb))
                skips.append(h)
            for downsample in block.downsamplers:
                h = downsample(h)
                skips.append(h)
        mid = self.mid_block
        h = mid.resnets[1](mid.attentions[0](mid.resnets[0](h, emb)), emb)
        for block in self.up_blocks:  # (B, C, H, W) -> (B, C_out, 2H, 2W), but for the top level
            for resnet, attention in zip(block.resnets, block.attentions):
                h = attention(resnet(torch.cat([h, skips.pop()], dim=1), emb))  # (B, C + C_skip, H, W) -> (B, C_out, H, W)
            for upsample in block.upsamplers:
                h = upsample(h)
        return self.conv_out(F.silu(self.conv_norm_out(h))).contiguous()


# --------------------------------------------------------------------------- 4. pretrained weights: diffusers' names -> ours


# Attention sub-keys of older diffusers checkpoints -> the current names, which ours follow.
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def unet_config(cfg: dict) -> dict:
    """ddpm.UNetConfig's fields from a diffusers UNet2DModel config.json; refuses what the UNet does not
    implement (tools/export.py's unet_config_to_diffusers is the inverse). num_class_embeds N (a class-conditional UNet)
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


def load_pretrained(path: str | Path = DEFAULT_PRETRAINED, download: bool = True) -> UNet:
    """UNet from a diffusers model (a folder with config.json and weights, an export's folder or a lone weights
    file; a missing or empty folder: the Hugging Face cache's google/ddpm-cifar10-32, else a download)."""
    config, weights = weightfiles.locate(Path(path), download)
    return unet_from_diffusers(config, weightfiles.read_weights(weights), path)


def unet_from_diffusers(config: dict | None, state_dict: dict[str, torch.Tensor], path: str | Path) -> UNet:
    """The UNet of a diffusers config.json (None: the cifar10-32 one) with its weights under our names."""
    try:
        model = UNet(UNetConfig(**unet_config(config)) if config is not None else None)
    except (ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise CLIError(f"the config.json of {shown(path)} does not describe a UNet this project builds "
                       f"({first_line(e)})") from e
    model.load_state_dict(convert_diffusers_state_dict(state_dict, model))
    return model


def with_classes(model: UNet, num_classes: int) -> UNet:
    """`model` made class-conditional: the same weights plus a zero class embedding, so that its output is
    the same for every label until training moves the embedding (a conditional fine-tune starts as exactly
    the pretrained unconditional model). A model that already has classes keeps its table, if of that size."""
    if model.config.num_classes == num_classes:
        return model
    if model.config.num_classes is not None:
        raise CLIError(f"the pretrained UNet is class-conditional with {model.config.num_classes} classes; "
                       f"--conditional trains {num_classes}")
    conditional = UNet(replace(model.config, num_classes=num_classes))
    missing, unexpected = conditional.load_state_dict(model.state_dict(), strict=False)
    assert missing == ["class_embedding.weight"] and not unexpected, (missing, unexpected)
    nn.init.zeros_(conditional.class_embedding.weight)
    return conditional


# --------------------------------------------------------------------------- 5. training (DDPM Alg. 1): `main.py ddpm`


def train_step(model: nn.Module, diffusion: GaussianDiffusion, x0: torch.Tensor, optimizer: torch.optim.Optimizer,
               class_labels: torch.Tensor | None = None, grad_clip: float = 1.0, amp: bool = False):
    """One step of DDPM Algorithm 1 (Ho et al. 2020) on a batch x0 (B, C, H, W) in [-1, 1]:
        t ~ Uniform({1, ..., T}),  eps ~ N(0, I)
        gradient step on  || eps - eps_theta(sqrt(alpha-bar_t) x0 + sqrt(1 - alpha-bar_t) eps, t) ||^2
    (diffusion.training_loss; v or x0 is the target for those prediction types). class_labels (B,):
    a conditional model's labels. Returns (loss, gradient norm before clipping), as tensors."""
    net = model if class_labels is None else functools.partial(model, class_labels=class_labels)
    with autocast(x0.device, amp):
        loss = diffusion.training_loss(net, x0)  # lines 2-5: draw t and eps, x_t by Eq. 4, the squared error
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    optimizer.step()
    return loss.detach(), grad_norm


def drop_labels(labels: torch.Tensor, p: float, null: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Label dropout of classifier-free guidance (Ho & Salimans 2022, Alg. 1, "c <- none with probability
    p_uncond"): each label becomes the no-label token `null` with probability p, to learn eps(x, none) too."""
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, null), labels)


# --------------------------------------------------------------------------- 6. sampling: `main.py sample`


CPU_MAX_BATCH = 64  # Guided's widest single forward on a CPU (docs/performance.md, "Cost of guidance")


class Guided(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022, Eq. 6) around a class-conditional UNet, as a model(x, t)
    that every sampler of diffusion.py takes unchanged:
        eps~(x, y) = eps(x, none) + w (eps(x, y) - eps(x, none)),
    their (1 + w') eps(x, y) - w' eps(x, none) with w' = w - 1 (our w is diffusers' guidance_scale).
    w = 1 (conditional) or 0 (unconditional): one pass; otherwise one forward of 2B rows, in pieces of at
    most max_batch. Linear in the raw output, so v- or x0-prediction is guided the same way.
    class_labels (B,) are fixed for the batch; `null` is the no-label token (UNetConfig.num_classes)."""

    def __init__(self, model: nn.Module, class_labels: torch.Tensor, scale: float, null: int,
                 max_batch: int | None = None):
        super().__init__()
        self.model, self.scale, self.null, self.max_batch = model, float(scale), null, max_batch
        self.register_buffer("class_labels", class_labels, persistent=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        if self.scale == 1:
            return self.model(x, t, class_labels=self.class_labels)
        if self.scale == 0:
            return self.model(x, t, class_labels=None)
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        x2, t2 = torch.cat([x, x]), torch.cat([t, t])  # (2B, C, H, W): rows 0..B-1 with the label, then none
        y2 = torch.cat([self.class_labels, torch.full_like(self.class_labels, self.null)])
        rows = self.max_batch or len(x2)
        out = torch.cat([self.model(*piece[:2], class_labels=piece[2]).float()
                         for piece in zip(x2.split(rows), t2.split(rows), y2.split(rows))])
        cond, uncond = out.chunk(2)  # (2B, C, H, W) -> 2 x (B, C, H, W); combined in float32
        return uncond + self.scale * (cond - uncond)


def class_label(ckpt: dict, class_name: str | None, guidance: float = 1.0) -> int | None:
    """The label `sample --class NAME` asks of a checkpoint, checked before anything is written: None for
    an unconditional checkpoint (where --class and --guidance are refused); a conditional one needs --class,
    one of its "classes"."""
    classes = ckpt.get("classes")
    if classes is None:
        if class_name is not None:
            raise CLIError(f"--class {class_name}: this DDPM checkpoint is unconditional (trained without --conditional)")
        if guidance != 1:
            raise CLIError(f"--guidance {guidance:g} needs a class-conditional checkpoint (trained with --conditional)")
        return None
    if not isinstance(classes, dict) or not all(isinstance(k, str) for k in classes):
        raise CLIError(f"malformed DDPM checkpoint: its classes are a {type(classes).__name__}, "
                       "not class names and labels")
    if class_name is None:
        raise CLIError(f"this DDPM checkpoint is class-conditional: choose its class with --class "
                       f"({' or '.join(classes)})")
    if class_name not in classes:
        raise CLIError(f"--class {class_name!r} is not a class of this checkpoint (it knows {', '.join(classes)})")
    config = ckpt.get("config")
    label, n = classes[class_name], config.get("num_classes") if isinstance(config, dict) else None
    if type(label) is not int or type(n) is not int or not 0 <= label < n:  # the embedding has rows 0..n (n: none)
        raise CLIError(f"malformed DDPM checkpoint: its classes map {class_name!r} to label {label!r}, outside "
                       f"its UNet's class table (num_classes {n!r})")
    return label


def model_from_checkpoint(ckpt: dict, device: torch.device) -> tuple[UNet, GaussianDiffusion, int]:
    """The UNet (EMA weights when present), its diffusion and image size from a checkpoint of `train`.
    Weights holding NaN or infinity are refused: they would sample black images."""
    try:
        weights = require_keys(ckpt, ("config", "model"), "this DDPM checkpoint").get("ema") or ckpt["model"]
        model = UNet(UNetConfig(**ckpt["config"]))
        model.load_state_dict(weights)
        diffusion = GaussianDiffusion(**ckpt.get("diffusion", {}))
    except (TypeError, RuntimeError, ValueError) as e:
        raise CLIError(f"malformed DDPM checkpoint: {first_line(e)}") from e
    if first_nonfinite(weights):
        raise CLIError(f"the checkpoint's weight {first_nonfinite(weights)} is non-finite (NaN or infinity)")
    return model.to(device).eval(), diffusion.to(device), ckpt.get("image_size", model.config.sample_size)


def generate(ckpt: dict, n: int, *, seed: int, batch_size: int, device: torch.device, sampler: str = "ddpm",
             steps: int | None = None, eta: float = 0.0, amp: bool = False, compile: bool = False,
             class_name: str | None = None, guidance: float = 1.0) -> torch.Tensor:
    """n images (n, 3, H, W) in [-1, 1] from a checkpoint, deterministic for a seed.
    amp: bf16 autocast for the network (the sampler's arithmetic stays float32);
    compile: torch.compile the network once, worth it for thousands of images.
    class_name, guidance: a conditional checkpoint's class and guidance scale w (Guided; see class_label)."""
    label = class_label(ckpt, class_name, guidance)
    unet, diffusion, size = model_from_checkpoint(ckpt, device)
    with user_error():
        check_sampler(sampler, steps, eta, diffusion.num_timesteps)
    if sampler == "ddpm" and steps not in (None, diffusion.num_timesteps):
        same = ("exactly" if diffusion.variance_type == "fixed_small"
                else f"in the mean; its variance_type {diffusion.variance_type} would add noise of variance 1 - a_t/a_prev")
        print(f"note: --sampler ddpm with --steps {steps} < {diffusion.num_timesteps} samples ancestrally on the "
              f"strided chain, which is DDIM with eta 1 (--eta is ignored; the posterior's variance): diffusers' "
              f"DDPMScheduler.set_timesteps({steps}) {same}")
    net = torch.compile(unet) if compile else unet
    generator = torch.Generator(device).manual_seed(seed)
    out = []
    for start in range(0, n, batch_size):
        shape = (min(batch_size, n - start), unet.config.in_channels, size, size)
        guided = net if label is None else Guided(net, torch.full(shape[:1], label, device=device), guidance,
                                                  unet.config.num_classes,
                                                  CPU_MAX_BATCH if device.type == "cpu" else None)

        def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with autocast(device, amp):
                return guided(x, t).float()

        out.append(diffusion.sample(model, shape, sampler, steps, eta, generator=generator).cpu())
    return torch.cat(out)
