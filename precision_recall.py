"""Precision, recall, density and coverage of generated samples: k-nearest-neighbour
estimates of how much of the real distribution the fakes cover and how much of
the fakes lies on it.

- precision and recall: Kynkaanniemi et al., "Improved Precision and Recall
  Metric for Assessing Generative Models", NeurIPS 2019;
- density and coverage: Naeem et al., "Reliable Fidelity and Diversity Metrics
  for Generative Models", ICML 2020.

Features come from any network (fid.py's Inception, the chest X-ray classifier).
Checked against prdc 0.2 (all four) and torch-fidelity 0.4.0 (precision, recall)
in tests/test_prdc.py; fid.py re-exports `prdc` and `knn_radii`.
"""

from __future__ import annotations

import numpy as np
import torch

from common import CLIError, pick_device

PRDC_K = 3  # Kynkaanniemi et al. 2019 use k = 3; Naeem et al. 2020 recommend k = 5 for density and coverage
PRDC_CHUNK = 2048  # rows and columns of one distance block: 2048^2 float64 = 32 MiB, whatever N and M
PRDC_KEYS = ("precision", "recall", "density", "coverage")  # what prdc returns, in this order


def _prdc_features(x, device: torch.device) -> torch.Tensor:
    x = x if torch.is_tensor(x) else torch.from_numpy(np.asarray(x))
    return x.to(device=device, dtype=torch.float64)


def knn_radii(x: torch.Tensor, k: int = PRDC_K, chunk: int = PRDC_CHUNK) -> torch.Tensor:
    """NND_k(x_i) = |x_i - NN_k(x_i)|: distance from each point to its k-th nearest OTHER
    point of the same set, the radius of its k-NN ball (Kynkaanniemi et al. 2019, Eq. 1).

    prdc and torch-fidelity take the (k+1)-th smallest distance with the point's own zero
    included; leaving the point out and taking the k-th is the same number, and does not
    depend on cdist's rounding giving an exact zero on the diagonal. Distances are
    computed in chunk x chunk blocks, of which only the k smallest per row are kept."""
    n = len(x)
    radii = torch.empty(n, dtype=x.dtype, device=x.device)
    for i in range(0, n, chunk):
        rows = x[i:i + chunk]
        nearest = rows.new_empty(len(rows), 0)  # (rows, <= k) running k smallest
        for j in range(0, n, chunk):
            d = torch.cdist(rows, x[j:j + chunk])  # (rows, cols)
            if i == j:  # the diagonal block: a point is not its own neighbour
                d.fill_diagonal_(float("inf"))
            d = d.topk(min(k, d.shape[1]), dim=1, largest=False).values
            both = torch.cat([nearest, d], dim=1)
            nearest = both.topk(min(k, both.shape[1]), dim=1, largest=False).values
        radii[i:i + chunk] = nearest.max(dim=1).values  # the k-th smallest: n > k fills all k slots
    return radii


def prdc(real_features, fake_features, k: int = PRDC_K, *, chunk: int = PRDC_CHUNK, closed: bool = False,
         device: str | torch.device | None = "cpu") -> dict:
    """Precision, recall, density and coverage of N real and M fake features (N, D), (M, D),
    from k-NN balls B(x, NND_k(x)) (see knn_radii):

      precision = 1/M sum_j 1{fake_j in some real ball}          (Kynkaanniemi et al. 2019, Eq. 2)
      recall    = 1/N sum_i 1{real_i in some fake ball}          (Kynkaanniemi et al. 2019, Eq. 2)
      density   = 1/(kM) sum_j sum_i 1{fake_j in B(real_i)}      (Naeem et al. 2020)
      coverage  = 1/N sum_i 1{some fake_j in B(real_i)}          (Naeem et al. 2020)

    Density counts how many real balls hold each fake sample, so it can exceed 1 and one
    large ball around a real outlier adds little; coverage, unlike recall, uses only real
    balls, so large balls around fake outliers cannot inflate it. Distances are float64 on
    `device` ('auto': CUDA when present), in blocks of at most chunk x chunk.

    closed=False uses open balls, d < NND_k, as Naeem et al.'s prdc package does; closed=True
    uses closed balls, d <= NND_k, as Kynkaanniemi et al.'s Eq. 1 and torch-fidelity's prc do.
    The two differ only when a distance equals a radius exactly, which continuous features
    almost never produce but integer-valued ones (raw pixels, duplicated images) can."""
    device = device if isinstance(device, torch.device) else pick_device(device)
    real, fake = _prdc_features(real_features, device), _prdc_features(fake_features, device)
    if real.ndim != 2 or fake.ndim != 2:
        raise CLIError(f"PRDC needs features of shape (N, D); got {tuple(real.shape)} and {tuple(fake.shape)}")
    if real.shape[1] != fake.shape[1]:
        raise CLIError(f"PRDC: real and fake features differ in dimension ({real.shape[1]} vs {fake.shape[1]})")
    n, m = len(real), len(fake)
    if k < 1:
        raise CLIError(f"PRDC: k must be at least 1 (got {k})")
    if k >= min(n, m):  # the k-th neighbour of a point needs k others
        raise CLIError(f"PRDC with k = {k} needs more than {k} samples per side (got {n} real and {m} fake)")
    if chunk < 1:
        raise CLIError(f"PRDC: chunk must be at least 1 (got {chunk})")

    r_real, r_fake = knn_radii(real, k, chunk), knn_radii(fake, k, chunk)
    # Patch: prdc counts d < NND_k, torch-fidelity (after Kynkaanniemi Eq. 1) d <= NND_k.
    inside = torch.le if closed else torch.lt
    balls_per_fake = torch.zeros(m, dtype=torch.int64, device=device)  # real balls holding fake_j
    real_in_fake_ball = torch.zeros(n, dtype=torch.bool, device=device)
    real_ball_covered = torch.zeros(n, dtype=torch.bool, device=device)
    for i in range(0, n, chunk):
        for j in range(0, m, chunk):
            d = torch.cdist(real[i:i + chunk], fake[j:j + chunk])  # (real rows, fake cols)
            in_real_ball = inside(d, r_real[i:i + chunk, None])
            balls_per_fake[j:j + chunk] += in_real_ball.sum(dim=0)
            real_ball_covered[i:i + chunk] |= in_real_ball.any(dim=1)
            real_in_fake_ball[i:i + chunk] |= inside(d, r_fake[None, j:j + chunk]).any(dim=1)
    return dict(precision=(balls_per_fake > 0).double().mean().item(),
                recall=real_in_fake_ball.double().mean().item(),
                density=balls_per_fake.sum().item() / (k * m),
                coverage=real_ball_covered.double().mean().item())
