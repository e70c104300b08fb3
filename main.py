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
import errno
import json
import math
import re
import sys
import typing
from pathlib import Path

from plumbing.configs import CLIError, check_config, flag, option_name, shown, user_error
from plumbing.files import atomic_path, first_nonfinite, load_checkpoint
from plumbing.runtime import pick_device
from training.harness import check_out, run_lock



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
    """One option per field of the dataclass `cls` that has help text (see flag)."""
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
        names = list(dict.fromkeys([option_name(f), meta.get("short")] if meta.get("short") else [option_name(f)]))
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
    from tools import extract

    _add(sub, "extract", "build the two-class data set (NIH ChestX-ray14 or synthetic phantoms)",
         extract.ExtractConfig, cmd_extract,
         description="NIH mode: select Infiltration vs No Finding images from the NIH metadata CSV, split them "
                     "70/10/20 by patient, balance each split by random sampling, and write "
                     "OUT/{train,validation,test}_data/{infiltration,no_finding}/*.png resized to --size, with "
                     "OUT/manifest.csv and OUT/summary.json. Phantom mode (--phantoms N): write N synthetic chest "
                     "X-ray phantoms (a stand-in for trying the pipeline, not medical data) in the same layout.")


def json_line(obj, **kw) -> str:
    """One line of strict JSON: a non-finite float becomes null, never a bare NaN (which
    json.dumps would write and no strict parser reads)."""
    import json

    def finite(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        return [finite(x) for x in v] if isinstance(v, (list, tuple)) else v

    return json.dumps(finite(obj), allow_nan=False, **kw)


def cmd_extract(args) -> None:
    from tools import extract

    summary = extract.run(config_from_args(extract.ExtractConfig, args, progress=not args.json))
    print(extract.format_summary(summary), flush=True)
    if args.json:
        print(json_line(summary, separators=(",", ":")))


# --------------------------------------------------------------------------- commands: generators (ddpm, sample)


@dataclasses.dataclass(kw_only=True)
class SampleConfig:
    """The `sample` command. It reads checkpoints of both generators, so it lives here
    rather than in ddpm.py or dcgan.py; in Python, call ddpm.generate or dcgan.generate."""

    checkpoint: Path = flag(help="checkpoint.pt written by `ddpm` or `gan`")
    out: Path = flag(help="folder for the PNGs, grid.png and samples.json (must be empty, or see --force)")
    n: int = flag(64, "number of images", flag="-n", min=1)
    sampler: str = flag("ddpm", "DDPM only: ancestral (ddpm), DDIM (ddim) or DPM-Solver++(2M) (dpmpp)",
                               choices=("ddpm", "ddim", "dpmpp"))
    steps: int | None = flag(None, "DDPM only: sampling steps (default 1000 ddpm, 50 ddim, 20 dpmpp); ddpm "
                                    "with fewer than 1000 is ancestral sampling on a strided chain (DDIM, eta 1)", min=1)
    eta: float = flag(0.0, "DDIM only: 0 deterministic, 1 DDPM-like noise (not defined for dpmpp)")
    seed: int = flag(0, "the same seed gives the same images")
    batch_size: int = flag(64, "images per forward pass", min=1)
    device: str = flag("auto", "auto, cpu, cuda, cuda:1")
    amp: bool = flag(False, "DDPM only: bf16 autocast for the network")
    compile: bool = flag(False, "DDPM only: torch.compile the network")
    class_name: str | None = flag(None, "class-conditional DDPM only (ddpm --conditional): the class to draw",
                                         flag="--class")
    guidance: float = flag(1.0, "class-conditional DDPM only: classifier-free guidance scale w, eps(x, none) "
                                  "+ w (eps(x, y) - eps(x, none)); 1 conditional, 0 unconditional", min=0)
    force: bool = flag(False, "replace an earlier sample's images in --out (only the files that its "
                              "samples.json lists; anything else there is refused)")

    def __post_init__(self):
        self.checkpoint, self.out = Path(self.checkpoint), Path(self.out)
        check_config(self)
        import diffusion

        with user_error():  # before OUT is touched; GANs ignore these options
            diffusion.check_sampler(self.sampler, self.steps, self.eta)
        if self.eta and self.sampler == "ddpm":  # an option that would do nothing is refused
            raise CLIError(f"--eta {self.eta:g} with --sampler ddpm, which takes no eta (all steps: Alg. 2; fewer: eta 1); "
                           "use --sampler ddim")


def ddpm_commands(sub) -> None:
    from training import ddpm_run

    _add(sub, "ddpm", "fine-tune google/ddpm-cifar10-32 (--finetune) or train a DDPM from scratch",
         ddpm_run.TrainConfig, cmd_ddpm)
    _add(sub, "sample", "write N images from a DDPM or GAN checkpoint", SampleConfig, cmd_sample)


def cmd_ddpm(args) -> None:
    from training import ddpm_run

    ddpm_run.train(config_from_args(ddpm_run.TrainConfig, args))


DDPM_ONLY = ("sampler", "steps", "eta", "amp", "compile")  # the options of `sample` that a GAN has no use for
SAMPLE_FILE = re.compile(r"sample_\d{5}\.png|grid\.png")  # what `sample` writes, besides its samples.json


def earlier_samples(out: Path, force: bool) -> list[Path]:
    """The files an earlier `sample` wrote into OUT (its samples.json lists them), which --force replaces.
    Refused: an OUT that is a file, a non-empty OUT without --force, and with it anything that an
    earlier sample did not write (hidden files such as the run lock aside)."""
    check_out(out)
    found = sorted(p for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []
    if found and not force:
        raise CLIError(f"--out {out} is not empty: pass --force to replace an earlier sample's images, "
                       "or choose an empty --out")
    manifest, listed = out / "samples.json", []
    if manifest.is_file():
        try:
            listed = [n for n in json.loads(manifest.read_text())["files"] if SAMPLE_FILE.fullmatch(str(n))]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CLIError(f"{manifest} is not a list of samples written by `sample` ({e})") from e
    ours = [out / n for n in listed if (out / n).is_file()] + ([manifest] if manifest.is_file() else [])
    other = next((p for p in found if p not in ours), None)
    if other is not None:
        raise CLIError(f"--out {out} holds {other.name}, which `sample` did not write; refusing to mix or "
                       "delete it (choose an empty --out)")
    return ours


def cmd_sample(args) -> None:
    """Sample from a checkpoint of either generator; PNGs are grey, like the data. OUT and the
    checkpoint are checked before OUT is locked and before any sampling; no image is written
    until all are drawn and finite."""
    import dcgan
    import ddpm
    from plumbing.files import require_keys, save_image_grid, save_png, to_uint8

    cfg = config_from_args(SampleConfig, args)
    earlier_samples(cfg.out, cfg.force)
    ckpt = load_checkpoint(cfg.checkpoint)
    kind = ckpt.get("kind") if isinstance(ckpt, dict) else None
    if kind not in ("ddpm", "dcgan"):
        raise CLIError(f"{cfg.checkpoint} is not a DDPM or GAN checkpoint of this project (kind={kind!r})")
    bad = first_nonfinite(ckpt)
    if bad:
        raise CLIError(f"{cfg.checkpoint}: {bad} is non-finite (NaN or infinity); refusing to sample from it")
    if kind == "ddpm":
        ddpm.class_label(ckpt, cfg.class_name, cfg.guidance)  # --class and --guidance against the checkpoint, now
    elif cfg.class_name is not None or cfg.guidance != 1:
        raise CLIError("--class and --guidance need a class-conditional DDPM checkpoint (this is a GAN's)")
    else:
        require_keys(ckpt, ("config", "generator"), "this GAN checkpoint")  # what is missing, before what is extra
        given = [option_name(f) for f in dataclasses.fields(cfg) if f.name in DDPM_ONLY and getattr(cfg, f.name) != f.default]
        if given:
            raise CLIError(f"{', '.join(given)}: DDPM options, and this is a GAN checkpoint (leave them out)")
    device = pick_device(cfg.device)
    with run_lock(cfg.out, "sample"):
        earlier = earlier_samples(cfg.out, cfg.force)  # again: nothing can write here from now on
        if kind == "ddpm":
            images = ddpm.generate(ckpt, cfg.n, seed=cfg.seed, batch_size=cfg.batch_size, device=device,
                                   sampler=cfg.sampler, steps=cfg.steps, eta=cfg.eta, amp=cfg.amp, compile=cfg.compile,
                                   class_name=cfg.class_name, guidance=cfg.guidance)
        else:
            images = dcgan.generate(ckpt, cfg.n, seed=cfg.seed, batch_size=cfg.batch_size, device=device)
        grey = images.mean(dim=1, keepdim=True)  # (N, C, H, W) -> (N, 1, H, W): X-rays are grey
        pngs = to_uint8(grey)  # refuses non-finite images, before any file is touched
        for p in earlier:
            p.unlink()
        names = [f"sample_{i:05d}.png" for i in range(cfg.n)] + ["grid.png"]
        with atomic_path(cfg.out / "samples.json") as tmp:  # first: lists what may be written next
            conditional = {"class": cfg.class_name, "guidance": cfg.guidance} if cfg.class_name is not None else {}
            tmp.write_text(json.dumps({"checkpoint": str(cfg.checkpoint), "kind": kind, "seed": cfg.seed,
                                       **conditional, "files": names}, indent=1) + "\n")
        for name, img in zip(names, pngs):
            save_png(img, cfg.out / name)
        save_image_grid(grey[:64], cfg.out / "grid.png")
    print(f"wrote {cfg.n} images and grid.png to {shown(cfg.out)}")


# --------------------------------------------------------------------------- commands: the GAN baseline


def gan_commands(sub) -> None:
    import dcgan

    _add(sub, "gan", "train the DCGAN baseline (Radford et al. 2016) on a folder of X-rays", dcgan.TrainConfig, cmd_gan)


def cmd_gan(args) -> None:
    import dcgan

    from training import gan_run

    gan_run.train(config_from_args(dcgan.TrainConfig, args))


# --------------------------------------------------------------------------- commands: evaluation (fid, classify)


def eval_commands(sub) -> None:
    import classify
    import fid

    _add(sub, "fid", "FID, KID and Inception Score of FAKE against REAL", fid.FIDConfig, cmd_fid,
         description="REAL and FAKE are image folders (searched recursively) or .npz statistics "
                     "(pytorch-fid's format: mu, sigma). Folder statistics are cached.")
    _add(sub, "classify", "train and test the Infiltration vs No Finding classifier", classify.RunConfig, cmd_classify,
         description="Train on DIR/train_data (plus --synthetic images, training only), select the epoch and "
                     "threshold on DIR/validation_data, report AUROC with a bootstrap 95%% interval on DIR/test_data.")


def cmd_fid(args) -> None:
    import fid

    cfg = config_from_args(fid.FIDConfig, args)
    if cfg.classifier is not None:
        import functools

        from study import distances

        features_fn, size = distances.classifier_features(cfg.classifier)  # a damaged checkpoint: before any image
        res = fid.run(cfg, functools.partial(distances.classifier_feature_distance, features_fn=features_fn, size=size))
    else:
        res = fid.run(cfg)
    if res["fid"] is not None:
        print(f"FID  {res['fid']:.4f}   (n_real={res['n_real']}, n_fake={res['n_fake']})")
        if res["kid_mean"] is not None:
            print(f"KID  {res['kid_mean']:.6f} +- {res['kid_std']:.6f}   (100 subsets of {res['kid_subset_size']})")
        else:
            print("KID  n/a (an .npz without features)")
    if res["is_mean"] is not None:
        print(f"IS   {res['is_mean']:.4f} +- {res['is_std']:.4f}   (FAKE, 10 splits)")
    if "cxr_fd" in res:
        print(f"chest X-ray classifier features (not comparable with FID): FD {res['cxr_fd']:.4f}, "
              f"KID {res['cxr_kid_mean']:.6f} +- {res['cxr_kid_std']:.6f}")
    for prefix, name in (("", "Inception"), ("cxr_", "classifier")):
        if res.get(f"{prefix}precision") is not None:
            print(f"{name} features, k = {args.pr_k or fid.PRDC_K}: "
                  + ", ".join(f"{k} {res[prefix + k]:.4f}" for k in fid.PRDC_KEYS))
    if args.json:
        print(json_line(res))


def cmd_classify(args) -> None:
    import classify

    m = classify.run(config_from_args(classify.RunConfig, args))
    print(f"{m['model']} classifier at {m['size']}px: trained on {m['n_train']} real + {m['n_synthetic']} synthetic "
          f"images, best epoch {m['best_epoch']} (validation AUROC {m['val_auroc']:.4f} on {m['n_val']} images)")
    print(f"test ({m['n_test']} real images): AUROC {m['auroc']:.4f} "
          f"[95% CI {m['auroc_ci_low']:.4f}, {m['auroc_ci_high']:.4f}]; at threshold {m['threshold']:.4f} "
          f"(chosen on validation): accuracy {m['accuracy']:.4f}, sensitivity {m['sensitivity']:.4f}, "
          f"specificity {m['specificity']:.4f}")
    if args.save is not None:
        shown = str(args.save).encode("utf-8", "surrogateescape").decode("utf-8", "replace")  # any file name
        print(f"saved {shown}")
    if args.json:
        print(json_line(m))


# --------------------------------------------------------------------------- commands: the study (experiment, demo, memorization)


def study_commands(sub) -> None:
    from study import memorization
    from study import experiment

    p = _add(sub, "experiment", "the whole study: generators per real fraction (ddpm and gan per class, ddpm-cfg "
             "for both), classifier grid, memorisation, report.md and summary.json", experiment.ExperimentOptions,
             cmd_experiment)
    p.add_argument("--synthetic", action="append", default=[], metavar="NAME=DIR",
                   help="add another generator's samples (DIR/infiltration/, DIR/no_finding/) as generator NAME; "
                        "repeatable")
    _add(sub, "demo", "the experiment end to end on phantom X-rays with small models (about 5-10 min on a CPU)",
         experiment.DemoConfig, cmd_demo)
    p = _add(sub, "memorization", "are synthetic images closer to training images than real held-out images are?",
             memorization.MemorizationConfig, cmd_memorization)
    p.add_argument("--json", action="store_true", help="last line: one JSON object")


def cmd_experiment(args) -> None:
    from study import experiment

    experiment.run_study(experiment.study_config(config_from_args(experiment.ExperimentOptions, args, synthetic=tuple(args.synthetic))))


def cmd_demo(args) -> None:
    from study import experiment

    cfg = config_from_args(experiment.DemoConfig, args)
    experiment.run_demo(cfg.out, cfg.quick, cfg.device)


def cmd_memorization(args) -> None:
    from study import memorization

    res = memorization.run(config_from_args(memorization.MemorizationConfig, args))
    print(f"{res['n_flagged']} of {res['n_synthetic']} synthetic images ({res['flagged_fraction']:.1%}) are exact "
          f"copies of a training image or closer to one than the {memorization.ordinal(res['percentile'])} percentile "
          f"of the yardstick ({res['train']}); chance rate (real images judged the same way): "
          f"{res['chance_fraction']:.1%}; one-sided binomial p = {res['p_value']:.3g}",
          file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json_line(res))


# --------------------------------------------------------------------------- commands: export


def export_commands(sub) -> None:
    from tools import export

    _add(sub, "export", "write a DDPM checkpoint in the Hugging Face diffusers layout (DDPMPipeline)",
         export.ExportConfig, cmd_export)


def cmd_export(args) -> None:
    from tools import export

    export.export(config_from_args(export.ExportConfig, args))


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
    except OSError as e:  # a disk that fills up or turns read-only mid-run, where no check can see it coming
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise
        print(f"error: {e.strerror}" + (f": {shown(e.filename)}" if e.filename else ""), file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
