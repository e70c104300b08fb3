"""Watching a generator learn: every --eval-every steps, its samples are compared with
held-out real images of the class it draws (the validation split: never the test split, never
an image the generator trains on), as lucidrains' denoising-diffusion-pytorch Trainer does
with FID. The measures join loss.csv, the best weights so far are kept as best.pt, and
curves.png plots the loss and the measures against steps.

Two measures, cheap enough to run every hundred steps on a CPU:
  * KID (Binkowski et al. 2018, Sec. 3; fid.kid): the unbiased MMD^2 with the cubic
    polynomial kernel, on the pooled pixels (16x16 at 32 px). best.pt is chosen by it.
  * nn_accuracy: the leave-one-out 1-NN accuracy of "real or sample" (the classifier
    two-sample test of Lopez-Paz and Oquab 2017, with Xu et al. 2018's 1-NN) on the features
    of a randomly initialised classify.SmallCNN (Naeem et al. 2020). 0.5: cannot be told
    from real; 1.0: trivially fake; well below 0.5: copies.
Why these measures, and the measurements that chose each one's space: docs/evaluation.md.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

import classify
import data
import fid
from plumbing.configs import CLIError, RunConfig, shown
from plumbing.files import atomic_path, first_nonfinite, load_checkpoint, save_checkpoint

FIELDS = ("kid", "nn_accuracy")  # the columns an evaluation adds to loss.csv
MAX_IMAGES = 100  # held-out images (and as many samples) per evaluation: KID's variance falls as 1/n
FEATURE_SEED = 0  # the random feature network; fixed so that every evaluation, and every run, sees the same one


# --------------------------------------------------------------------------- the two measures


def one_nn_accuracy(real: np.ndarray, fake: np.ndarray) -> float:
    """Leave-one-out 1-NN accuracy of real (N, D) vs fake (M, D), Euclidean: the share of the
    N + M points whose nearest other point is of their own kind (Xu et al. 2018, Sec. 3)."""
    x = torch.from_numpy(np.concatenate([real, fake])).double()
    kind = torch.cat([torch.zeros(len(real)), torch.ones(len(fake))])
    d = torch.cdist(x, x)
    d.fill_diagonal_(math.inf)  # leave one out: a point is not its own neighbour
    return (kind[d.argmin(dim=1)] == kind).double().mean().item()


def pixels(u8: torch.Tensor) -> np.ndarray:
    """uint8 (N, S, S) -> (N, S*S/4): the image in [-1, 1], 2x2-average-pooled (16x16 at 32 px), flattened."""
    return F.avg_pool2d(data.to_unit_range(u8), 2).flatten(1).double().numpy()


class Features:
    """The two feature spaces, each centred on the held-out real images' mean and divided by their
    average per-feature SD (one scale for all features: KID's kernel x.y / D + 1 is then not flat,
    and a feature dead on the real images cannot blow up as a per-feature SD near 0 would).
      pix: pooled pixels, for KID: the layout of a 32 px radiograph (lung fields, mediastinum,
           diaphragm) is in its low-resolution pixels; smooth blobs and static score far from it.
      cnn: a random classify.SmallCNN's pooled features, for the 1-NN test: texture, which tells
           static and smooth blobs alike from radiographs (see "Real X-rays at small scale")."""

    def __init__(self, real: torch.Tensor, size: int, device: torch.device):
        with torch.random.fork_rng(devices=[]):  # the training RNG stays untouched: resume is bit-exact
            torch.manual_seed(FEATURE_SEED)
            self.net = classify.SmallCNN(image_size=size).to(device).eval()
        self.stats = {k: (v.mean(0), v.std(0).mean() + 1e-12) for k, v in self._raw(real).items()}
        self.real = self(real)

    def _raw(self, u8: torch.Tensor) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            return {"pix": pixels(u8), "cnn": classify.embed(self.net, u8).astype(np.float64)}

    def __call__(self, u8: torch.Tensor) -> dict[str, np.ndarray]:
        return {k: (v - self.stats[k][0]) / self.stats[k][1] for k, v in self._raw(u8).items()}


# --------------------------------------------------------------------------- the monitor


def heldout_folder(cfg: RunConfig) -> tuple[Path | None, str]:
    """The held-out real images to compare with: --eval-data, else the extract's validation_data
    (--data DIR/train_data or DIR itself -> DIR/validation_data). None and the reason when there are none."""
    train, val = data.SPLIT_DIRS["train"], data.SPLIT_DIRS["validation"]
    if cfg.eval_data is not None:
        folder = Path(cfg.eval_data)
    elif Path(cfg.data).name == train:
        folder = Path(cfg.data).parent / val
    elif (Path(cfg.data) / train).is_dir():  # an extract root: training reads its train split only
        folder = Path(cfg.data) / val
    else:
        return None, (f"--data {cfg.data} is a plain folder, not the {train} of an extract: no held-out images "
                      "beside it (give --eval-data DIR)")
    if not folder.is_dir():
        return None, f"no held-out images: {folder} is not a folder"
    train_dir, held = data.training_folder(cfg.data)[0].resolve(), folder.resolve()  # what training reads
    if train_dir == held or train_dir in held.parents or held in train_dir.parents:
        return None, f"{folder} overlaps --data {cfg.data}: its images are not held out"
    return folder, ""


def in_test_split(folder: Path) -> Path | None:
    """The extract test split that `folder` is or lies in (symlinks followed): a test_data/ beside a
    train_data/ or a manifest.csv. None otherwise."""
    for p in (folder.resolve(), *folder.resolve().parents):
        if p.name == data.SPLIT_DIRS["test"] and ((p.parent / data.SPLIT_DIRS["train"]).is_dir()
                                                  or (p.parent / "manifest.csv").is_file()):
            return p
    return None


def check_held_out(cfg: RunConfig, folder: Path, held: data.ImageSet, size: int,
                   train: data.ImageSet | None = None) -> bool:
    """Refuse held-out images that are not held out (data.find_copy compares pixels, not paths): a copy or
    near-copy of a training image, always; an extract's test split (the folder, or a copy of an image of the
    test split beside --data) unless cfg.eval_on_test. train: the training images (else loaded again).
    Returns whether they are the test split."""
    what = f"--eval-data {shown(folder)}" if cfg.eval_data is not None else f"the held-out folder {shown(folder)}"
    train_dir = data.training_folder(cfg.data)[0]
    train = data.load_folder(train_dir, size, cfg.class_name, progress=False) if train is None else train
    hit = data.find_copy(held.images, train.images)
    if hit is not None:
        raise CLIError(f"{what}: {shown(held.paths[hit[0]])} is {hit[2]} of the training image "
                       f"{shown(train.paths[hit[1]])}; the monitor must compare with images the model never trains on")
    where = in_test_split(folder)
    beside = train_dir.parent / data.SPLIT_DIRS["test"]
    if where is None and train_dir.name == data.SPLIT_DIRS["train"] and beside.is_dir():
        try:
            hit = data.find_copy(held.images, data.load_folder(beside, size, cfg.class_name, progress=False).images)
        except CLIError:  # no images (of the class) there: nothing to copy
            hit = None
        where = beside if hit is not None else None
    if where is not None and not cfg.eval_on_test:
        raise CLIError(f"{what} holds the test split {shown(where)}: best.pt would be chosen on the images the final "
                       "numbers are measured on (use the validation split, or pass --eval-on-test to do so anyway)")
    if cfg.eval_on_test and where is None:
        raise CLIError(f"--eval-on-test: {shown(folder)} is not an extract's test split; leave the option out")
    return where is not None


def clear_stale_best(out: Path, kind: str) -> None:
    """Before a fresh run into `out`: an earlier run's best.pt must not stay beside the new checkpoint (the study
    would sample it). Removed when it is one this project wrote (a `kind` checkpoint with its "monitor" record);
    anything else of that name is refused, never deleted."""
    path = Path(out) / "best.pt"
    if not path.exists() and not path.is_symlink():
        return
    try:
        old = load_checkpoint(path)
    except CLIError:
        old = None
    if not (isinstance(old, dict) and old.get("kind") == kind and isinstance(old.get("monitor"), dict)):
        raise CLIError(f"{shown(path)} is not the best.pt of an earlier {kind} run of this project; a fresh run "
                       "would leave it beside its own checkpoint (move it away, or choose another --out)")
    path.unlink()
    print(f"note: removed {shown(path)}, the best.pt (step {old.get('step', '?')}) of the run that was in "
          f"{shown(out)} before: a fresh run keeps only its own")


class Monitor:
    """Called by train_loop after every step; every `every` steps it samples, measures, logs,
    keeps best.pt (lower KID; finite weights only, written atomically) and redraws curves.png.

    sample_fn() -> uint8 (n, S, S) samples from fixed noise (the same every time, so steps compare);
    state_fn() -> the model's checkpoint entries, as train_loop saves them."""

    def __init__(self, out: Path, every: int, real: torch.Tensor, sample_fn: Callable[[], torch.Tensor],
                 state_fn: Callable[[], dict], loss_fields: tuple[str, ...], device: torch.device,
                 start_step: int = 0, source: dict | None = None):
        self.out, self.every, self.sample_fn, self.state_fn = Path(out), every, sample_fn, state_fn
        self.loss_fields, self.source = loss_fields, source or {}  # source: best.pt's record of the held-out images
        self.features, self.n_real = Features(real, real.shape[-1], device), len(real)
        # a resumed run's best so far: the KIDs it logged up to the step it continues from
        self.best = min((r["kid"] for r in self.logged() if r.get("kid") is not None and r["step"] <= start_step),
                        default=math.inf)

    def logged(self) -> list[dict]:
        """loss.csv's rows so far (a resumed run's, cut at its step), numbers as floats, blanks as None."""
        path = self.out / "loss.csv"
        if not path.is_file():
            return []
        with open(path, newline="") as f:
            return [{k: float(v) if v not in ("", None) else None for k, v in r.items()} for r in csv.DictReader(f)]

    def __call__(self, step: int) -> dict:
        if step % self.every:
            return {}
        fake = self.features(self.sample_fn())
        real = self.features.real
        kid = fid.kid(real["pix"], fake["pix"], subsets=1)[0]  # equal counts: every subset would be the whole sets
        row = {"kid": kid, "nn_accuracy": one_nn_accuracy(real["cnn"], fake["cnn"])}
        if kid < self.best:
            state = self.state_fn()
            bad = first_nonfinite(state)
            if bad:
                print(f"warning: {bad} is non-finite at step {step}; best.pt keeps its earlier weights")
            else:
                state.update(step=step, monitor={**row, "held_out": self.n_real, **self.source})
                save_checkpoint(state, self.out / "best.pt")
                self.best = kid
        self.draw([*self.logged(), {"step": step, **row}])
        return row

    def draw(self, rows: list[dict]) -> None:
        """curves.png: each loss (top) and the two measures (bottom) against steps, written atomically."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
        for name in self.loss_fields:
            pts = [(r["step"], r[name]) for r in rows if r.get(name) is not None]
            if pts:
                top.plot(*zip(*pts), lw=0.8, label=name)
        top.set_ylabel("loss")
        if top.lines:
            top.legend()
        evals = [r for r in rows if r.get("kid") is not None]
        bottom.plot([r["step"] for r in evals], [r["kid"] for r in evals], "o-", label="KID (lower is better)")
        right = bottom.twinx()
        right.plot([r["step"] for r in evals], [r["nn_accuracy"] for r in evals], "s--", color="tab:red",
                   label="1-NN accuracy (0.5 = indistinguishable)")
        right.set_ylim(0.4, 1.02)
        bottom.set_xlabel("step")
        bottom.set_ylabel(f"KID vs {self.n_real} held-out images")
        fig.legend(loc="lower left", fontsize=8)
        fig.tight_layout()
        with atomic_path(self.out / "curves.png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)


def setup(cfg: RunConfig, size: int, total: int, sample_fn: Callable[[int], torch.Tensor],
          state_fn: Callable[[], dict], loss_fields: tuple[str, ...], device: torch.device,
          start_step: int = 0, train: data.ImageSet | None = None) -> Monitor | None:
    """The monitor of a run, or None (with one line saying why) when --eval-every is not given, is larger
    than the run, or there are no held-out images; held-out images that are not are refused (check_held_out,
    against `train`, the run's training images). sample_fn(n) draws n samples as uint8 (n, S, S)."""
    if cfg.eval_every is None:
        return None
    if cfg.eval_every > total:
        print(f"note: --eval-every {cfg.eval_every} is larger than the run ({total} steps): "
              "training without monitoring")
        return None
    folder, why = heldout_folder(cfg)
    if cfg.eval_data is not None and folder is None:
        raise CLIError(f"--eval-data: {why}")
    try:
        held = data.load_folder(folder, size, cfg.class_name, progress=False) if folder else None
    except CLIError as e:  # a validation folder without this class, or without images
        held, why = None, str(e)
    if held is not None and len(held) < 2:
        held, why = None, f"{folder} holds {len(held)} image(s) of the class; KID needs 2"
    if held is None:
        print(f"note: --eval-every: {why}; training without monitoring")
        return None
    on_test = check_held_out(cfg, folder, held, size, train)
    if on_test:
        print(f"warning: --eval-on-test: best.pt is chosen on the test split {shown(folder)}; numbers measured "
              "on that split later are biased in its favour (recorded in checkpoint.pt and best.pt)")
    real = held.images[torch.randperm(len(held), generator=torch.Generator().manual_seed(FEATURE_SEED))[:MAX_IMAGES]]
    print(f"monitoring every {cfg.eval_every} steps against {len(real)} held-out images of {folder}")
    return Monitor(cfg.out, cfg.eval_every, real, lambda: sample_fn(len(real)), state_fn, loss_fields, device,
                   start_step, {"held_out_folder": str(folder), "test_split": on_test})
