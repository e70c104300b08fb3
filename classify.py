"""The downstream classifier: Infiltration (1) vs No Finding (0) on grey chest X-rays.

The yardstick of the project: synthetic images count only if adding them to the
training set raises this classifier's AUROC on REAL test images. Synthetic images
enter the training set only (`_training_set`); early stopping, model selection and
the decision threshold use the validation split; the test split is scored once.

Networks: ResNet-18 (He et al. 2016, torchvision's layout) with a one-channel stem,
optionally from ImageNet weights, and a small CNN cheap enough for a CPU at 32-64 px.
AUROC is the Mann-Whitney U statistic over n_pos * n_neg (Hanley and McNeil 1982),
mid-ranks for ties; its stratified bootstrap is shared with study/report.py.
The protocol, its reasons and reference numbers: docs/evaluation.md.

`run(RunConfig)` is the `classify` command: load the splits, train, test, save.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from plumbing.configs import check_config, CLIError, first_line, flag
from plumbing.files import check_output, first_nonfinite, load_checkpoint, require_keys, save_checkpoint
from plumbing.runtime import epoch_order, pick_device, seed_everything

MODELS = ("small", "resnet18")
DEFAULT_LR = {"small": 1e-3, "resnet18": 3e-4}


@dataclass
class ClassifyConfig:
    """The classifier and how it is trained. Fields with help are `classify` options."""

    model: str = flag("small", "small CNN (CPU) or ResNet-18", choices=MODELS)
    size: int = flag(64, "image size in pixels (real and synthetic alike)")
    epochs: int = flag(20, "maximum epochs (early stopping on validation AUROC)", min=1)
    steps: int | None = flag(None, "train exactly this many optimiser steps instead, checking validation every "
                             "ceil(steps / epochs) steps, with no early stopping (equal budgets across runs)", min=1)
    batch_size: int = flag(64, "training images per step", min=2)
    lr: float | None = flag(None, "AdamW learning rate (default 1e-3 small, 3e-4 resnet18)", above=0)
    weight_decay: float = 1e-2  # AdamW's decoupled weight decay (Loshchilov and Hutter 2019)
    patience: int = flag(5, "epochs without validation improvement before stopping; 0 = never", min=0)
    seed: int = flag(0, "seed of the initial weights, the batch order and the augmentation")
    device: str = flag("auto", "auto, cpu, cuda, cuda:1, ...")
    pretrained: bool = flag(False, "resnet18: start from ImageNet weights (downloads once)")
    width: int = 32  # small CNN: channels of the first stage (doubled per stage)
    augment: bool = True  # light random affine + brightness/contrast on training batches
    balance: bool = True  # class-balanced loss: each class contributes half of the loss

    def __post_init__(self):
        check_config(self)
        if not 16 <= self.size <= 1024:
            raise CLIError(f"--size must be between 16 and 1024, got {self.size}")
        if self.pretrained and self.model != "resnet18":
            raise CLIError("--pretrained needs --model resnet18")

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.model]


@dataclass(kw_only=True)
class RunConfig(ClassifyConfig):
    """The `classify` command: a ClassifyConfig plus where the images come from and go."""

    data: Path = flag(MISSING, "folder in the extract layout (train_data/, validation_data/, test_data/)")
    synthetic: Path | None = flag(None, "folder of synthetic images in infiltration/ and no_finding/ subfolders, "
                                  "added to training only")
    save: Path | None = flag(None, "write the selected model to this checkpoint")
    json: bool = flag(False, "print the metrics as one JSON object on the last line")

    def classifier(self) -> ClassifyConfig:
        """The classifier's own settings, as a checkpoint stores them."""
        return ClassifyConfig(**{f.name: getattr(self, f.name) for f in fields(ClassifyConfig)})


# --------------------------------------------------------------------------- networks


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Four stages of conv-BN-ReLU + 2x2 max pool, global average pool, one logit.

    About 390 k parameters at width 32; any input size >= 16 works because the
    global average pool removes the spatial dimensions. One convolution per
    stage keeps it cheap enough to train many times on a CPU.
    """

    def __init__(self, width: int = 32, image_size: int = 64):
        super().__init__()
        self.image_size = image_size  # what embed()/predict() resize to
        chans = [1, width, 2 * width, 4 * width, 8 * width]
        # each stage: (B, c_in, H, W) -> (B, c_out, H/2, W/2)
        self.stages = nn.Sequential(*[nn.Sequential(_conv_bn_relu(c_in, c_out), nn.MaxPool2d(2))
                                      for c_in, c_out in zip(chans[:-1], chans[1:])])
        self.feature_dim = chans[-1]
        self.head = nn.Linear(self.feature_dim, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) in [-1, 1] -> (B, D) penultimate features."""
        return self.stages(x).mean(dim=(2, 3))  # (B, 8w, S/16, S/16) -> (B, 8w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).squeeze(1)  # (B,) logits


# ImageNet's per-channel normalisation averaged over RGB, because conv1's weights
# are averaged over RGB too: a grey image then looks like an R = G = B image.
IMAGENET_GREY_MEAN, IMAGENET_GREY_STD = 0.449, 0.226  # mean of (0.485, 0.456, 0.406), of (0.229, 0.224, 0.225)


class ResNet18Grey(nn.Module):
    """torchvision's ResNet-18 with a one-channel stem and a one-logit head.

    `net` is torchvision's model with fc replaced by Identity, so `net(x)` is the
    512-d pooled feature; `head` is the new classification layer.
    """

    def __init__(self, image_size: int = 64):
        super().__init__()
        from torchvision.models import resnet18

        self.image_size = image_size
        self.net = resnet18(weights=None)
        self.net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.net.fc = nn.Identity()
        self.feature_dim = 512
        self.head = nn.Linear(512, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) in [-1, 1] -> (B, 512)."""
        x = ((x + 1) / 2 - IMAGENET_GREY_MEAN) / IMAGENET_GREY_STD  # the input statistics ImageNet weights expect
        return self.net(x)  # (B, 1, S, S) -> (B, 64, S/4, S/4) -> ... -> (B, 512, S/32, S/32) -> (B, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).squeeze(1)

    def load_imagenet(self) -> None:
        """Copy torchvision's ImageNet weights in with an explicit key map:
        conv1 (64, 3, 7, 7) is averaged over RGB to (64, 1, 7, 7); fc (1000 classes)
        is dropped; every other tensor must match its shape exactly."""
        from torchvision.models import ResNet18_Weights

        weights = ResNet18_Weights.IMAGENET1K_V1
        file = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        try:
            imagenet = weights.get_state_dict(progress=False, weights_only=True)
        except (OSError, RuntimeError) as e:  # no network (URLError is an OSError), truncated or bad file
            raise CLIError(f"--pretrained: cannot get the ImageNet ResNet-18 weights ({type(e).__name__}); "
                           f"download {weights.url} to {file}, or leave out --pretrained to train from scratch") from e
        ours = self.net.state_dict()
        for key, value in imagenet.items():
            if key.startswith("fc."):
                continue
            if key == "conv1.weight":
                value = value.mean(dim=1, keepdim=True)  # (64, 3, 7, 7) -> (64, 1, 7, 7)
            if key not in ours:
                raise CLIError(f"--pretrained: {file} has an unexpected tensor {key}")
            if ours[key].shape != value.shape:
                raise CLIError(f"--pretrained: {key} has shape {tuple(value.shape)} in {file}, "
                               f"the model expects {tuple(ours[key].shape)}")
            ours[key] = value
        missing = set(ours) - {k for k in imagenet if not k.startswith("fc.")}
        if missing:
            raise CLIError(f"--pretrained: {file} lacks {sorted(missing)[0]}")
        self.net.load_state_dict(ours)


def build_model(cfg: ClassifyConfig) -> nn.Module:
    if cfg.model == "small":
        return SmallCNN(cfg.width, cfg.size)
    if cfg.model == "resnet18":
        model = ResNet18Grey(cfg.size)
        if cfg.pretrained:
            model.load_imagenet()
        return model
    raise CLIError(f"unknown classifier model {cfg.model!r} (choose from {', '.join(MODELS)})")


# --------------------------------------------------------------------------- metrics


def _as_binary(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    return s, y.astype(bool)


def auroc(scores, labels) -> float:
    """Area under the ROC curve = P(score of a random positive > score of a random negative),
    ties counting one half. Mann-Whitney form with mid-ranks r_i (1-based, ties averaged):

        AUROC = (sum_{i positive} r_i - n_pos (n_pos + 1) / 2) / (n_pos * n_neg)

    NaN when a class is absent (the area is undefined)."""
    s, y = _as_binary(scores, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # 1-based rank of the last member of each group of equal scores
    midrank = last - (counts - 1) / 2.0  # the average of the ranks a tied group occupies
    rank_sum = midrank[inverse][y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def stratified_bootstrap_indices(labels, n_boot: int, seed: int = 0) -> np.ndarray:
    """(B, n) stratified bootstrap indices (pROC's default): positives first, then
    negatives, each class resampled within itself, so AUROC is always defined.
    Models scored on the same resamples give paired differences."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    return np.concatenate([rng.choice(pos, (n_boot, len(pos))), rng.choice(neg, (n_boot, len(neg)))], axis=1)


def bootstrap_aurocs(scores, idx: np.ndarray, n_pos: int) -> np.ndarray:
    """AUROC of each resample (B,) of stratified_bootstrap_indices, whose first n_pos
    columns are positives: the rank formula of `auroc`, all resamples at once."""
    from scipy.stats import rankdata

    ranks = rankdata(np.asarray(scores, dtype=np.float64)[idx], axis=1)  # (B, n), ties averaged
    n_neg = idx.shape[1] - n_pos
    return (ranks[:, :n_pos].sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def bootstrap_auroc_ci(scores, labels, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of the AUROC: resample the test
    cases (stratified by class) n_boot times, take the alpha/2 and 1 - alpha/2
    quantiles of the resampled AUROCs. Fixed seed: the same interval every run."""
    s, y = _as_binary(scores, labels)
    if y.all() or not y.any():
        return float("nan"), float("nan")
    stats = bootstrap_aurocs(s, stratified_bootstrap_indices(y, n_boot, seed), int(y.sum()))
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def paired_bootstrap_diff(scores_a, scores_b, labels, n_boot: int = 1000, seed: int = 0,
                          alpha: float = 0.05) -> tuple[float, float, float]:
    """AUROC(a) - AUROC(b) for two models scored on the SAME test cases, with a
    paired percentile bootstrap interval: each resample draws one set of cases and
    scores both models on it, so case difficulty cancels out of the difference.
    An interval that excludes 0 is a difference the test set can resolve."""
    a, y = _as_binary(scores_a, labels)
    b, _ = _as_binary(scores_b, labels)
    diff = auroc(a, y) - auroc(b, y)
    if y.all() or not y.any():
        return float("nan"), float("nan"), float("nan")
    idx, n_pos = stratified_bootstrap_indices(y, n_boot, seed), int(y.sum())
    stats = bootstrap_aurocs(a, idx, n_pos) - bootstrap_aurocs(b, idx, n_pos)
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(diff), float(low), float(high)


def youden_threshold(scores, labels) -> float:
    """The threshold t maximising Youden's J = sensitivity + specificity - 1 for the
    rule `score >= t`; candidates are the observed scores. Ties go to the highest t."""
    s, y = _as_binary(scores, labels)
    cand = np.unique(s)  # ascending
    pos, neg = np.sort(s[y]), np.sort(s[~y])
    sens = (pos.size - np.searchsorted(pos, cand, side="left")) / max(pos.size, 1)  # P(score >= t | positive)
    spec = np.searchsorted(neg, cand, side="left") / max(neg.size, 1)  # P(score < t | negative)
    j = sens + spec - 1
    return float(cand[np.flatnonzero(j == j.max())[-1]])


def threshold_metrics(scores, labels, threshold: float) -> dict:
    """Accuracy, sensitivity (recall of infiltration) and specificity of `score >= threshold`."""
    s, y = _as_binary(scores, labels)
    pred = s >= threshold
    return {"accuracy": float((pred == y).mean()),
            "sensitivity": float(pred[y].mean()) if y.any() else float("nan"),
            "specificity": float((~pred[~y]).mean()) if (~y).any() else float("nan")}


# --------------------------------------------------------------------------- augmentation

# Light and anatomy-preserving: a patient is positioned slightly differently each
# time, but never mirrored. NO horizontal flip: the heart is on the left of the
# patient (the right of the image), and a flipped X-ray is an anatomy no test
# image shows (dextrocardia is rare), so a flip would teach the network a
# distribution it never sees, not an invariance it needs.
MAX_ROTATION_DEG = 7.0
MAX_TRANSLATE = 0.05  # fraction of the image width / height
SCALE_RANGE = (0.95, 1.05)
MAX_BRIGHTNESS = 0.05  # fraction of the intensity range (2 in [-1, 1] units)
CONTRAST_RANGE = (0.9, 1.1)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, 1, S, S) in [-1, 1] -> same shape: a random small affine warp per image
    (rotation, translation, isotropic scale via affine_grid/grid_sample) and a small
    brightness/contrast change. The random numbers come from `generator` on the CPU,
    so a run is reproducible on any device."""
    b = x.shape[0]

    def uniform(lo, hi):
        return (torch.rand(b, generator=generator) * (hi - lo) + lo).to(x.device)

    angle = uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG) * math.pi / 180
    scale = uniform(*SCALE_RANGE)
    # affine_grid works in [-1, 1] coordinates, where the image is 2 units wide.
    tx, ty = uniform(-2 * MAX_TRANSLATE, 2 * MAX_TRANSLATE), uniform(-2 * MAX_TRANSLATE, 2 * MAX_TRANSLATE)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale  # the grid maps output -> input: inverse scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    contrast = uniform(*CONTRAST_RANGE).view(b, 1, 1, 1)
    brightness = uniform(-2 * MAX_BRIGHTNESS, 2 * MAX_BRIGHTNESS).view(b, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean + brightness).clamp(-1, 1)


# --------------------------------------------------------------------------- inference


def _to_model_input(images: torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W) -> float (B, 1, size, size) in [-1, 1] on device."""
    x = data.to_unit_range(images.to(device))
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def predict(model: nn.Module, x_uint8: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """uint8 (N, H, W) -> (N,) float64 probabilities of infiltration (sigmoid of the
    logit, in float64 so that confident scores do not collapse into ties at 1.0)."""
    model.eval()
    device = _device_of(model)
    out = []
    for i in range(0, x_uint8.shape[0], batch_size):
        logits = model(_to_model_input(x_uint8[i:i + batch_size], model.image_size, device))
        out.append(torch.sigmoid(logits.double()).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


@torch.inference_mode()
def embed(model: nn.Module, images_uint8: torch.Tensor, size: int | None = None, batch_size: int = 256) -> np.ndarray:
    """uint8 (N, H, W) -> (N, D) float32 penultimate features (after global average
    pooling), resized to `size` (default: the size the model was trained at). A
    chest X-ray feature space for fid.py's distance and the memorisation check."""
    model.eval()
    device, size = _device_of(model), size or model.image_size
    out = [model.features(_to_model_input(images_uint8[i:i + batch_size], size, device)).float().cpu()
           for i in range(0, images_uint8.shape[0], batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, model.feature_dim), np.float32)


# --------------------------------------------------------------------------- training


def _check_split(name: str, x: torch.Tensor, y: torch.Tensor, size: int, need_both: bool) -> None:
    if x.dtype != torch.uint8 or x.dim() != 3 or tuple(x.shape[1:]) != (size, size):
        raise CLIError(f"{name} images must be uint8 (N, {size}, {size}), got {x.dtype} {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise CLIError(f"{name}: {x.shape[0]} images but {tuple(y.shape)} labels")
    if not torch.isin(y, torch.tensor([0, 1])).all():
        raise CLIError(f"{name}: labels must be 0 (no_finding) or 1 (infiltration); found {sorted(set(y.tolist()))}")
    if need_both and (y.sum() == 0 or y.sum() == len(y)):
        raise CLIError(f"{name} split needs images of both classes (AUROC is undefined otherwise); "
                       f"it has {int(y.sum())} infiltration and {int(len(y) - y.sum())} no_finding")


def _training_set(train_x, train_y, synthetic_x, synthetic_y) -> tuple[torch.Tensor, torch.Tensor]:
    """Real training images followed by synthetic ones. The ONLY place synthetic
    images are used: validation and test never pass through here."""
    if synthetic_x is None or synthetic_x.shape[0] == 0:
        return train_x, train_y
    return torch.cat([train_x, synthetic_x]), torch.cat([train_y, synthetic_y])


def _batches(n: int, batch: int, seed: int):
    """Shuffled batches of indices, epoch after epoch without end (epoch_order: a pure function of seed, epoch)."""
    for epoch in itertools.count():
        order = epoch_order(n, seed, epoch)
        for i in range(n // batch):
            yield order[i * batch:(i + 1) * batch]


def _class_weights(y: torch.Tensor) -> torch.Tensor:
    """Per-class loss weights N / (2 n_c): each class contributes half of the loss,
    whatever the imbalance (NIH has about 3 No Finding images per Infiltration one)."""
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    return torch.tensor([len(y) / (2 * n_neg), len(y) / (2 * n_pos)])


def train_and_evaluate(train_x, train_y, val_x, val_y, test_x, test_y, cfg: ClassifyConfig,
                       synthetic_x=None, synthetic_y=None, progress: bool = True) -> tuple[dict, nn.Module]:
    """Train on real (+ synthetic) training images, select on validation, report on test.

    x: uint8 (N, S, S) at cfg.size; y: int64 (N,) with 1 = infiltration. The real
    training set may be empty (train-on-synthetic, test-on-real) as long as the
    combined training set has both classes. Returns (metrics, best model in eval mode);
    metrics holds plain floats and ints (a CSV row).
    """
    if cfg.model not in MODELS:
        raise CLIError(f"unknown classifier model {cfg.model!r} (choose from {', '.join(MODELS)})")
    if (synthetic_x is None) != (synthetic_y is None):
        raise CLIError("synthetic images and synthetic labels must be given together")
    _check_split("train", train_x, train_y, cfg.size, need_both=False)
    _check_split("validation", val_x, val_y, cfg.size, need_both=True)
    _check_split("test", test_x, test_y, cfg.size, need_both=True)
    if synthetic_x is not None:
        _check_split("synthetic", synthetic_x, synthetic_y, cfg.size, need_both=False)
    x, y = _training_set(train_x, train_y, synthetic_x, synthetic_y)
    _check_split("training (real + synthetic)", x, y, cfg.size, need_both=True)
    n_synthetic = 0 if synthetic_x is None else int(synthetic_x.shape[0])
    assert x.shape[0] == train_x.shape[0] + n_synthetic  # synthetic images went to training, and only there

    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    model = build_model(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate(), weight_decay=cfg.weight_decay)
    weights = (_class_weights(y) if cfg.balance else torch.ones(2)).to(device)
    aug_gen = torch.Generator().manual_seed(cfg.seed + 1)
    x_dev, y_dev = x.to(device), y.to(device)  # uint8 images are small: keep them on the device

    n = x.shape[0]
    batch = min(cfg.batch_size, n)
    per_epoch = n // batch  # drop the ragged last batch: BatchNorm needs more than one image
    # Epochs: validate after each epoch, stop after `patience` checks without improvement. Steps:
    # exactly cfg.steps updates, validation every ceil(steps / epochs) and at the end, no early
    # stopping, so that runs given the same steps differ only in what their batches contain.
    total = cfg.steps or cfg.epochs * per_epoch
    every = math.ceil(cfg.steps / cfg.epochs) if cfg.steps else per_epoch
    best_auroc, best_state, best_check, checks, stale, t0 = -1.0, None, 0, 0, 0, time.perf_counter()
    running, since = 0.0, 0
    model.train()
    for step, idx in enumerate(itertools.islice(_batches(n, batch, cfg.seed), total), 1):
        idx = idx.to(device)
        xb = _to_model_input(x_dev[idx], cfg.size, device)  # (B, 1, S, S)
        if cfg.augment:
            xb = augment(xb, aug_gen)
        yb = y_dev[idx]
        loss = F.binary_cross_entropy_with_logits(model(xb), yb.float(), weight=weights[yb])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running, since = running + loss.item(), since + 1
        if step % every and step < total:
            continue
        if not math.isfinite(running):
            raise CLIError(f"classifier loss became {running} by step {step} (try a lower learning rate)")
        checks += 1
        val_auroc = auroc(predict(model, val_x), val_y.numpy())
        model.train()
        improved = val_auroc > best_auroc
        if improved:  # keep the best weights in memory: selection on validation AUROC only
            best_auroc, best_check, stale = val_auroc, checks, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
        if progress:
            print(f"step {step:5d}/{total}  loss {running / since:.4f}  val AUROC {val_auroc:.4f}"
                  f"{'  *' if improved else ''}", file=sys.stderr, flush=True)
        running, since = 0.0, 0
        if not cfg.steps and cfg.patience and stale >= cfg.patience:
            break
    model.load_state_dict(best_state)
    model.eval()

    # The threshold is chosen on validation, then applied unchanged to test.
    val_scores = predict(model, val_x)
    threshold = youden_threshold(val_scores, val_y.numpy())
    test_scores, test_labels = predict(model, test_x), test_y.numpy()
    low, high = bootstrap_auroc_ci(test_scores, test_labels, n_boot=1000, seed=0)
    metrics = {"auroc": auroc(test_scores, test_labels), "auroc_ci_low": low, "auroc_ci_high": high,
               **threshold_metrics(test_scores, test_labels, threshold), "threshold": threshold,
               "best_epoch": best_check, "epochs_run": checks, "steps": step, "val_auroc": best_auroc,
               "n_train": int(train_x.shape[0]), "n_synthetic": n_synthetic,
               "n_val": int(val_x.shape[0]), "n_test": int(test_x.shape[0]),
               "train_seconds": round(time.perf_counter() - t0, 2)}
    return metrics, model


# --------------------------------------------------------------------------- checkpoints


def save_classifier(model: nn.Module, cfg: ClassifyConfig, path, metrics: dict | None = None) -> None:
    """Write {"kind": "classifier", "config", "model", "metrics"} atomically."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_checkpoint({"kind": "classifier", "config": asdict(cfg), "model": state, "metrics": dict(metrics or {})}, path)


def load_classifier(path) -> tuple[nn.Module, dict]:
    """Rebuild a classifier saved by save_classifier, on the CPU, in eval mode; a damaged one is one line."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "classifier":
        raise CLIError(f"{path} is not a classifier checkpoint of this project "
                       f"(kind={ckpt.get('kind') if isinstance(ckpt, dict) else None!r})")
    require_keys(ckpt, ("config", "model"), str(path))
    known = {f.name for f in fields(ClassifyConfig)} - {"pretrained"}  # the checkpoint holds the weights: no download
    try:
        cfg = ClassifyConfig(**{k: v for k, v in ckpt["config"].items() if k in known})
    except (AttributeError, TypeError, ValueError) as e:
        raise CLIError(f"{path}: its 'config' is not a classifier's ({first_line(e)})") from e
    model = build_model(cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CLIError(f"{path}: weights do not fit a {cfg.model} classifier ({first_line(e)})") from e
    if first_nonfinite(ckpt["model"]):
        raise CLIError(f"{path}: the weight {first_nonfinite(ckpt['model'])} is non-finite (NaN or infinity)")
    return model.eval(), asdict(cfg)


# --------------------------------------------------------------------------- the `classify` command


def _load_split(root: Path, split: str, size: int):
    """One split of the extract layout as (images, labels), every image in a class folder."""
    s = data.load_split(root, split, size)  # a missing or empty split is a CLIError there
    _check_labelled(s, f"{split} split of {root}")
    return s.images, s.labels


def _check_labelled(s, what: str) -> None:
    unlabelled = [p for p, lab in zip(s.paths, s.labels.tolist()) if lab < 0]
    if unlabelled:
        raise CLIError(f"{len(unlabelled)} image(s) in the {what} are in no class folder "
                       f"(infiltration/ or no_finding/), e.g. {unlabelled[0]}")


def _inside(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents or a in b.parents


def run(cfg: RunConfig) -> dict:
    """Train on cfg.data's train split (+ cfg.synthetic), select on validation, test
    once, save to cfg.save if given. Returns model, size, seed and the test metrics."""
    if not cfg.data.is_dir():
        raise CLIError(f"data folder not found: {cfg.data}")
    pick_device(cfg.device)  # a bad --device fails before any image is decoded
    if cfg.save is not None:  # and a --save that cannot be written fails before training, not after
        check_output(cfg.save, "--save", folder=False)
        if cfg.save.exists():  # replace only a classifier checkpoint, never another file
            try:
                load_classifier(cfg.save)
            except CLIError:
                raise CLIError(f"--save {cfg.save} exists and is not a classifier checkpoint of this project; "
                               f"it is left alone: choose another file name") from None
    splits = {s: _load_split(cfg.data, s, cfg.size) for s in ("train", "validation", "test")}
    syn_x = syn_y = None
    if cfg.synthetic is not None:
        for split in ("validation", "test"):
            if _inside(cfg.synthetic, cfg.data / data.SPLIT_DIRS[split]):
                raise CLIError(f"--synthetic {cfg.synthetic} overlaps the {split} split; "
                               "synthetic images may only train")
        syn = data.load_folder(cfg.synthetic, cfg.size, progress=not cfg.json)
        _check_labelled(syn, f"synthetic folder {cfg.synthetic}")
        syn_x, syn_y = syn.images, syn.labels
        heldout = {s: (splits[s][0], data.load_split(cfg.data, s, cfg.size).paths) for s in ("validation", "test")}
        data.check_no_heldout_copies(syn_x, syn.paths, heldout, "--synthetic")  # a renamed copy, say
    for split in ("validation", "test"):  # as train_and_evaluate checks, but saying how to get a usable split
        n_pos, n = int(splits[split][1].sum()), len(splits[split][1])
        if n_pos in (0, n):
            raise CLIError(f"the {split} split of {cfg.data} needs images of both classes (AUROC is undefined "
                           f"otherwise); it has {n_pos} infiltration and {n - n_pos} no_finding"
                           f"{data.split_hint(cfg.data)}")
    model_cfg = cfg.classifier()
    metrics, model = train_and_evaluate(*splits["train"], *splits["validation"], *splits["test"], model_cfg,
                                        synthetic_x=syn_x, synthetic_y=syn_y, progress=True)
    if cfg.save is not None:
        save_classifier(model, model_cfg, cfg.save, metrics)
    return {"model": cfg.model, "size": cfg.size, "seed": cfg.seed, **metrics}
