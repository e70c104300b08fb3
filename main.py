"""Command line for the whole project: `python main.py COMMAND --help`.

Each module registers its own subcommands through `add_commands(subparsers)`;
this file only wires them together and turns every expected failure into one
line on stderr with a non-zero exit code (no traceback for bad input).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from common import CLIError, load_checkpoint, pick_device, save_image_grid, save_png, to_uint8

# Modules that contribute subcommands, in the order `--help` lists them.
COMMAND_MODULES = ("data", "ddpm", "dcgan", "fid", "classify", "study")
# A checkpoint's "kind" names the module whose generate() samples it.
GENERATORS = {"ddpm": "ddpm", "dcgan": "dcgan"}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (exit 2), no usage dump."""

    def error(self, message):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="main.py", description="Synthetic chest X-rays (DDPM, DCGAN) and whether they help a classifier.",
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
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
    return parser


def cmd_sample(args) -> None:
    """Sample from a checkpoint of either generator; PNGs are grey, like the data."""
    if args.n < 1 or args.batch_size < 1:
        raise CLIError("-n and --batch-size must be at least 1")
    if args.steps is not None and args.steps < 1:
        raise CLIError("--steps must be at least 1")
    ckpt = load_checkpoint(args.checkpoint)
    kind = ckpt.get("kind") if isinstance(ckpt, dict) else None
    if kind not in GENERATORS:
        raise CLIError(f"{args.checkpoint} is not a DDPM or GAN checkpoint of this project (kind={kind!r})")
    module = importlib.import_module(GENERATORS[kind])
    images = module.generate(ckpt, args.n, seed=args.seed, batch_size=args.batch_size,
                             device=pick_device(args.device), sampler=args.sampler, steps=args.steps, eta=args.eta,
                             amp=args.amp, compile=args.compile)
    grey = images.mean(dim=1, keepdim=True)  # (N, C, H, W) -> (N, 1, H, W): X-rays are grey
    args.out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(to_uint8(grey)):
        save_png(img, args.out / f"sample_{i:05d}.png")
    save_image_grid(grey[:64], args.out / "grid.png")
    print(f"wrote {args.n} images and grid.png to {args.out}")


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
