"""fid.prdc: closed forms, and parity with prdc 0.2 (Naeem et al.'s code, all four
metrics) and torch-fidelity 0.4.0 (its prc metric: precision and recall).

Conventions checked here: both references take a point's k-NN radius as the
(k+1)-th smallest distance with its own zero included, which is our k-th nearest
other point. prdc counts a point as inside a ball when d < radius (open ball);
torch-fidelity when d <= radius (closed ball, as Kynkaanniemi et al. Eq. 1), which
we match with closed=True. On continuous features no distance equals a radius, so
both conventions give the same numbers; test_ball_boundary shows where they part.
"""

import contextlib
import io

import numpy as np
import pytest
import torch
from PIL import Image

import fid
from plumbing.configs import CLIError

prdc_ref = pytest.importorskip("prdc")
metric_prc = pytest.importorskip("torch_fidelity.metric_prc")

TOL = 1e-6
KEYS = ("precision", "recall", "density", "coverage")


def reference_prdc(real, fake, k):
    with contextlib.redirect_stdout(io.StringIO()):  # compute_prdc prints the set sizes
        return prdc_ref.compute_prdc(real, fake, k)


def reference_precision_recall(real, fake, k):
    # torch-fidelity's argument order: features_1 is GENERATED, features_2 is REAL.
    return metric_prc.calculate_precision_recall_part(torch.from_numpy(fake), torch.from_numpy(real), k, 10000)


def random_features(n, m, dim, seed):
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(n, dim))
    fake = 1.2 * rng.normal(size=(m, dim)) + 0.3  # wider and shifted, so no metric sits at 0 or 1
    return real, fake


# --------------------------------------------------------------------------- closed forms


def test_knn_radii_on_a_line():
    # Points 0, 1, ..., 9: the 2nd nearest other point is 2 away at the ends, 1 inside.
    x = torch.arange(10, dtype=torch.float64)[:, None]
    expected = torch.tensor([2.0] + [1.0] * 8 + [2.0], dtype=torch.float64)
    for chunk in (1, 3, 10):
        assert torch.equal(fid.knn_radii(x, k=2, chunk=chunk), expected)


def test_identical_sets_are_fully_precise_and_covered():
    # Each fake sample sits on a real one (distance 0 < its radius) and vice versa.
    x, _ = random_features(60, 1, 8, seed=1)
    out = fid.prdc(x, x.copy(), k=3, chunk=16)
    assert out["precision"] == out["recall"] == out["coverage"] == 1.0
    assert out["density"] >= 1.0 / 3  # its own ball at least


def test_ball_boundary():
    # k = 1. Real 0, 1, 100, 101 all have radius 1; fake 2, 50, 52 have radii 48, 2, 2.
    # Fake 2 lies exactly on the boundary of real 1's ball: outside an open ball, inside
    # a closed one. (prdc needs k + 2 points per side: it argpartitions at index k + 1.)
    real = np.array([[0.0], [1.0], [100.0], [101.0]])
    fake = np.array([[2.0], [50.0], [52.0]])
    open_, closed = fid.prdc(real, fake, k=1), fid.prdc(real, fake, k=1, closed=True)
    assert open_ == pytest.approx(dict(precision=0, recall=1 / 2, density=0, coverage=0), abs=1e-15)
    assert closed == pytest.approx(dict(precision=1 / 3, recall=1 / 2, density=1 / 3, coverage=1 / 4), abs=1e-15)
    assert dict(reference_prdc(real, fake, 1)) == pytest.approx(open_, abs=1e-15)
    precision, recall = reference_precision_recall(real, fake, 1)  # float32 means
    assert (precision, recall) == pytest.approx((closed["precision"], closed["recall"]), abs=TOL)


# --------------------------------------------------------------------------- parity with prdc and torch-fidelity


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("n, m, dim", [(40, 55, 5), (200, 150, 32), (301, 299, 64)])
def test_matches_prdc_on_random_features(n, m, dim, k):
    real, fake = random_features(n, m, dim, seed=n + k)
    ref = reference_prdc(real, fake, k)
    out = fid.prdc(real, fake, k, chunk=37)  # a chunk that divides nothing: ragged blocks everywhere
    for key in KEYS:
        assert abs(out[key] - ref[key]) < TOL, key


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("n, m, dim", [(40, 55, 5), (200, 150, 32), (301, 299, 64)])
def test_matches_torch_fidelity_on_random_features(n, m, dim, k):
    real, fake = random_features(n, m, dim, seed=n + k)
    precision, recall = reference_precision_recall(real, fake, k)
    for closed in (True, False):  # no ties on continuous features, so both conventions agree
        out = fid.prdc(real, fake, k, chunk=37, closed=closed)
        assert abs(out["precision"] - precision) < TOL
        assert abs(out["recall"] - recall) < TOL


def xray_pixels(nih64_dir, count=200, size=16):
    """Flattened grey pixels (0..255 as float64) of the first `count` 64 px chest X-rays,
    resized to size x size: a deterministic stand-in for features of real images."""
    files = sorted((nih64_dir / "images").glob("*.png"))[:count]
    if len(files) < count:
        pytest.skip(f"need {count} images in {nih64_dir / 'images'}, found {len(files)}")
    return np.stack([np.asarray(Image.open(f).convert("L").resize((size, size), Image.BILINEAR),
                                dtype=np.float64).ravel() for f in files])


@pytest.mark.parametrize("k", [3, 5])
def test_matches_references_on_xray_pixels(nih64_dir, k):
    x = xray_pixels(nih64_dir)
    real, fake = x[:100], x[100:]
    ref = reference_prdc(real, fake, k)
    out = fid.prdc(real, fake, k, chunk=37)
    for key in KEYS:
        assert abs(out[key] - ref[key]) < TOL, key
    precision, recall = reference_precision_recall(real, fake, k)
    closed = fid.prdc(real, fake, k, chunk=37, closed=True)
    assert abs(closed["precision"] - precision) < TOL
    assert abs(closed["recall"] - recall) < TOL


# --------------------------------------------------------------------------- chunking and bad input


def test_accepts_tensors_and_upcasts():
    real, fake = random_features(50, 40, 8, seed=2)
    real32, fake32 = real.astype(np.float32), fake.astype(np.float32)
    assert fid.prdc(torch.from_numpy(real32), torch.from_numpy(fake32), chunk=16) == \
        fid.prdc(real32.astype(np.float64), fake32.astype(np.float64), chunk=16)


@pytest.mark.slow
def test_chunk_size_does_not_change_the_result():
    real, fake = random_features(3000, 3000, 64, seed=3)
    small = fid.prdc(real, fake, k=3, chunk=256)  # 12 blocks a side, the last one ragged
    big = fid.prdc(real, fake, k=3, chunk=4096)  # one block: the whole distance matrix
    for key in KEYS:
        assert abs(small[key] - big[key]) <= 1e-12, key


@pytest.mark.parametrize("k, n_fake, dim, match", [
    (0, 10, 4, "at least 1"),
    (-1, 10, 4, "at least 1"),
    (5, 5, 4, "more than 5 samples"),  # k = n: the k-th other neighbour does not exist
    (6, 5, 4, "more than 6 samples"),
    (3, 10, 5, "differ in dimension"),
])
def test_bad_input(k, n_fake, dim, match):
    real = np.zeros((10, 4))
    fake = np.zeros((n_fake, dim))
    with pytest.raises(CLIError, match=match) as info:
        fid.prdc(real, fake, k)
    assert "\n" not in str(info.value)


def test_bad_chunk():
    with pytest.raises(CLIError, match="chunk"):
        fid.prdc(np.zeros((10, 4)), np.zeros((10, 4)), 3, chunk=0)
