"""Command line for the whole project: `python main.py COMMAND --help`.

The modules are libraries (typed dataclass configs, plain functions); this file
is the only one that knows argparse. Each command's options are built from its
config dataclass (`add_config_flags`): a field's default and help are written
once, beside the code that reads them. Every expected failure becomes one line
on stderr with a non-zero exit code (no traceback for bad input).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import typing
from pathlib import Path

import common
from common import CLIError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (exit 2), no usage dump."""

    def error(self, message):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


# --------------------------------------------------------------------------- options from dataclass configs


def _finite_float(text: str) -> float:
    """A float option: NaN and infinity are refused while parsing, not after an epoch."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


_PARSERS = {int: _whole, float: _finite_float, str: str, Path: Path}


def _comma_list(item: type):
    """A tuple option written as a comma-separated list: "0,0.5,1"."""
    parse_item = _PARSERS[item]

    def parse(text: str) -> tuple:
        items = tuple(parse_item(v.strip()) for v in text.split(",") if v.strip())
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        return items
    parse.__name__ = f"comma-separated {item.__name__}"
    return parse


def _plain_type(hint) -> tuple[type, bool]:
    """(the type inside `X | None`, whether None is allowed)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if type(None) in typing.get_args(hint) and len(args) == 1:
        return args[0], True
    return hint, False


def add_config_flags(parser: argparse.ArgumentParser, cls, exclude: tuple[str, ...] = ()) -> None:
    """One option per field of the dataclass `cls` that has help text (see common.flag)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("help") or f.name in exclude:
            continue
        kind, _ = _plain_type(hints[f.name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        kw = dict(help=meta["help"])
        if meta.get("metavar"):
            kw["metavar"] = meta["metavar"]
        if kind is bool:
            kw.update(action="store_false" if default else "store_true")
        else:
            origin = typing.get_origin(kind)
            kw["type"] = _comma_list(typing.get_args(kind)[0]) if origin is tuple else _PARSERS[kind]
            if meta.get("choices"):
                kw["choices"] = meta["choices"]
        if meta.get("positional"):
            parser.add_argument(f.name, **kw)
            continue
        names = list(dict.fromkeys([common.option_name(f), meta.get("short")] if meta.get("short") else [common.option_name(f)]))
        if kind is not bool:
            kw.update(default=default, required=required)
        parser.add_argument(*names, dest=f.name, **kw)


def config_from_args(cls, args: argparse.Namespace, **overrides):
    """Build `cls` from the parsed options; fields that are not options keep their defaults."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**given, **overrides})


def _add(sub, name: str, help: str, cls=None, func=None, description: str | None = None, exclude=()):
    p = sub.add_parser(name, help=help, description=description or help,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if cls is not None:
        add_config_flags(p, cls, exclude)
    p.set_defaults(func=func)
    return p


# --------------------------------------------------------------------------- commands: data


def data_commands(sub) -> None:
    import data

    data.add_commands(sub)


# --------------------------------------------------------------------------- commands: generators (ddpm, sample)


def ddpm_commands(sub) -> None:
    import ddpm

    ddpm.add_commands(sub)
    p = sub.add_parser("sample", help="write N images from a DDPM or GAN checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint.pt written by `ddpm` or `gan`")
    p.add_argument("--out", required=True, type=Path, help="folder for the PNGs and grid.png")
    p.add_argument("-n", type=int, default=64, help="number of images")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm", help="DDPM only: ancestral or DDIM")
    p.add_argument("--steps", type=int, default=None, help="DDPM only: sampling steps (default 1000 ddpm, 50 ddim)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM only: 0 deterministic, 1 DDPM-like noise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action="store_true", help="DDPM only: bf16 autocast for the network")
    p.add_argument("--compile", action="store_true", help="DDPM only: torch.compile the network")
    p.set_defaults(func=cmd_sample)


def cmd_sample(args) -> None:
    """Sample from a checkpoint of either generator; PNGs are grey, like the data."""
    import importlib

    from common import load_checkpoint, pick_device, save_image_grid, save_png, to_uint8

    if args.n < 1 or args.batch_size < 1:
        raise CLIError("-n and --batch-size must be at least 1")
    if args.steps is not None and args.steps < 1:
        raise CLIError("--steps must be at least 1")
    ckpt = load_checkpoint(args.checkpoint)
    kind = ckpt.get("kind") if isinstance(ckpt, dict) else None
    if kind not in ("ddpm", "dcgan"):
        raise CLIError(f"{args.checkpoint} is not a DDPM or GAN checkpoint of this project (kind={kind!r})")
    module = importlib.import_module(kind)
    images = module.generate(ckpt, args.n, seed=args.seed, batch_size=args.batch_size,
                             device=pick_device(args.device), sampler=args.sampler, steps=args.steps, eta=args.eta,
                             amp=args.amp, compile=args.compile)
    grey = images.mean(dim=1, keepdim=True)  # (N, C, H, W) -> (N, 1, H, W): X-rays are grey
    args.out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(to_uint8(grey)):
        save_png(img, args.out / f"sample_{i:05d}.png")
    save_image_grid(grey[:64], args.out / "grid.png")
    print(f"wrote {args.n} images and grid.png to {args.out}")


# --------------------------------------------------------------------------- commands: the GAN baseline


def gan_commands(sub) -> None:
    import dcgan

    dcgan.add_commands(sub)


# --------------------------------------------------------------------------- commands: evaluation (fid, classify)


def eval_commands(sub) -> None:
    import classify
    import fid

    fid.add_commands(sub)
    classify.add_commands(sub)


# --------------------------------------------------------------------------- commands: the study (experiment, demo, memorization)


def study_commands(sub) -> None:
    import study

    study.add_commands(sub)


# --------------------------------------------------------------------------- commands: export


def export_commands(sub) -> None:
    import hub

    _add(sub, "export", "write a DDPM checkpoint in the Hugging Face diffusers layout (DDPMPipeline)",
         hub.ExportConfig, cmd_export)


def cmd_export(args) -> None:
    import hub

    hub.export(config_from_args(hub.ExportConfig, args))


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="main.py", description="Synthetic chest X-rays (DDPM, DCGAN) and whether they help a classifier.",
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for register in (data_commands, ddpm_commands, gan_commands, eval_commands, study_commands, export_commands):
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory (try a smaller --batch-size)", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
