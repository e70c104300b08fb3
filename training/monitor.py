"""Watching a generator learn: every --eval-every steps, its samples are compared with
held-out real images of the class it draws, as lucidrains' denoising-diffusion-pytorch
Trainer does with FID. The measures join loss.csv (new columns on the evaluation's row),
the weights that scored best so far are kept as best.pt, and curves.png plots the loss
and the measures against steps.

Held-out means the validation split of an extract (validation_data beside the training
folder, or --eval-data): never the test split, which only the study's final numbers read,
and never an image the generator trains on.

Two measures, both cheap enough to run every hundred steps on a CPU:
  * KID (Binkowski et al. 2018, Sec. 3; fid.kid): the unbiased MMD^2 with the cubic
    polynomial kernel (unbiased at any sample size, unlike FID), on the pooled pixels
    (16x16 at 32 px). best.pt is chosen by it.
  * nn_accuracy, a training-free stand-in for gate.detectability: the leave-one-out
    1-nearest-neighbour accuracy of "real or sample" on the pooled sets (the classifier
    two-sample test of Lopez-Paz and Oquab, ICLR 2017, with the 1-NN classifier that
    Xu et al. 2018, "An empirical study on evaluation metrics of GANs", single out), on
    the features of a randomly initialised small CNN (classify.SmallCNN, fixed seed).
    0.5: this many samples cannot be told from real; 1.0: every image's nearest
    neighbour is of its own kind, trivially fake; well below 0.5: copies.

Why not the measures the study's gate uses: gate.detectability trains a classifier for
several epochs per call and reads the test split; Inception (fid.py) needs 100 MB of
weights and ~1 s per image on a CPU, and sees ImageNet objects, not X-rays; a trained
X-ray classifier (classify.embed) does not exist yet while the study's generators train.
Naeem et al. (ICML 2020, "Reliable fidelity and diversity metrics for generative models")
advise the embeddings of a randomly initialised network where ImageNet features do not
fit the domain. Measured on the 518-image NIH extract at 32 px (22 validation images of a
class against 22 others): real vs real gave pixel KID 0.4-3.2, smooth random blobs 11.4
and static 10.4, while KID on the random CNN features rated the blobs (2.3) as closer
than some real images (up to 20.7), hence pixels for KID; the random CNN's 1-NN accuracy
gave 0.52-0.86 for real, 0.95 for blobs and 1.0 for static, hence it for detectability.
The numbers compare the steps of one run, not runs on other data.
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
from plumbing.configs import CLIError, RunConfig
from plumbing.files import atomic_path, first_nonfinite, save_checkpoint

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


class Monitor:
    """Called by train_loop after every step; every `every` steps it samples, measures, logs,
    keeps best.pt (lower KID; finite weights only, written atomically) and redraws curves.png.

    sample_fn() -> uint8 (n, S, S) samples from fixed noise (the same every time, so steps compare);
    state_fn() -> the model's checkpoint entries, as train_loop saves them."""

    def __init__(self, out: Path, every: int, real: torch.Tensor, sample_fn: Callable[[], torch.Tensor],
                 state_fn: Callable[[], dict], loss_fields: tuple[str, ...], device: torch.device,
                 start_step: int = 0):
        self.out, self.every, self.sample_fn, self.state_fn = Path(out), every, sample_fn, state_fn
        self.loss_fields = loss_fields
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
                state.update(step=step, monitor={**row, "held_out": self.n_real})
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
          start_step: int = 0) -> Monitor | None:
    """The monitor of a run, or None (with one line saying why) when --eval-every is not given, is larger
    than the run, or there are no held-out images. sample_fn(n) draws n samples as uint8 (n, S, S)."""
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
        real = data.load_folder(folder, size, cfg.class_name, progress=False).images if folder else None
    except CLIError as e:  # a validation folder without this class, or without images
        real, why = None, str(e)
    if real is not None and len(real) < 2:
        real, why = None, f"{folder} holds {len(real)} image(s) of the class; KID needs 2"
    if real is None:
        print(f"note: --eval-every: {why}; training without monitoring")
        return None
    real = real[torch.randperm(len(real), generator=torch.Generator().manual_seed(FEATURE_SEED))[:MAX_IMAGES]]
    print(f"monitoring every {cfg.eval_every} steps against {len(real)} held-out images of {folder}")
    return Monitor(cfg.out, cfg.eval_every, real, lambda: sample_fn(len(real)), state_fn, loss_fields, device,
                   start_step)
