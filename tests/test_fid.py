"""fid.py: closed forms, and parity with pytorch-fid (features, FID) and torch-fidelity (IS, KID).

The real Inception weights cannot be downloaded here, so the parity tests build
pytorch-fid's own network with random weights (its weight loader patched to hand
back a random state dict), calibrate its BatchNorm statistics so activations stay
in a realistic range, and save those weights as the .pth our loader reads.
"""

import json
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

import fid
import main
from study import distances

pfi = pytest.importorskip("pytorch_fid.inception")
fid_score = pytest.importorskip("pytorch_fid.fid_score")


# --------------------------------------------------------------------------- fixtures


def _reference_weights(seed: int = 0) -> dict:
    """A random state dict in pytorch-fid's key layout, with BatchNorm running
    statistics measured on random images (so each layer's output is ~unit scale)."""
    import torchvision

    torch.manual_seed(seed)
    tv = torchvision.models.inception_v3(weights=None, num_classes=1008, aux_logits=False, init_weights=True)
    built = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: tv.state_dict())
        original = pfi.fid_inception_v3
        mp.setattr(pfi, "fid_inception_v3", lambda: built.append(original()) or built[-1])
        ref = pfi.InceptionV3([3])
    net = built[0]
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=g) * 0.2
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration pass
    with torch.no_grad():
        ref.train()(torch.rand(2, 3, 299, 299, generator=g))
    for m in net.Mixed_7c.modules():  # real pool features are O(1); keep ours there too
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data *= 0.1
            m.bias.data *= 0.1
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.fixture(scope="session")
def ref_weights(tmp_path_factory):
    state = _reference_weights()
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture
def tiny_classifier(tmp_path):
    classify = pytest.importorskip("classify")
    cfg = classify.ClassifyConfig(size=16, width=4)
    torch.manual_seed(0)
    path = tmp_path / "classifier.pt"
    classify.save_classifier(classify.build_model(cfg), cfg, path)
    return path


def _reference_model(monkeypatch, state):
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: state)
    return pfi.InceptionV3([3]).eval()


def _png_folder(path, n, size, seed):
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        img = 120 + 60 * np.sin(xx / rng.uniform(3, 12)) * np.cos(yy / rng.uniform(3, 12))
        img += rng.normal(0, 25, (size, size))
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path / f"{i:03d}.png")
    return path


def _run(capsys, argv):
    code = main.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code, err, *needles):
    assert code == 2
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


# --------------------------------------------------------------------------- closed forms


def test_frechet_equal_covariances_is_squared_mean_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(8, 8))
    sigma = a @ a.T + 8 * np.eye(8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    assert fid.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), abs=1e-6)


def test_frechet_identical_sets_is_zero_and_singular_is_finite():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(200, 16))
    mu, sigma = fid.mean_and_covariance(f)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    few1, few2 = rng.normal(size=(10, 64)), rng.normal(size=(10, 64)) + 0.5  # 10 samples, 64 dims: rank 9
    d = fid.frechet_distance(*fid.mean_and_covariance(few1), *fid.mean_and_covariance(few2))
    assert np.isfinite(d) and d > 0
    ref = fid_score.calculate_frechet_distance(*fid.mean_and_covariance(few1), *fid.mean_and_covariance(few2))
    assert d == pytest.approx(ref, rel=1e-9)


def test_kid_kernel_formula_and_identical_distributions():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(5, 7)), rng.normal(size=(4, 7))
    expected = np.array([[(xi @ yj / 7 + 1) ** 3 for yj in y] for xi in x])
    np.testing.assert_allclose(fid.polynomial_kernel(x, y), expected, rtol=1e-12)
    a, b = rng.normal(size=(300, 32)), rng.normal(size=(300, 32))
    mean, std, m = fid.kid(a, b, subsets=20, subset_size=100)
    assert m == 100 and abs(mean) < 3 * std + 1e-3
    far, _, _ = fid.kid(a, b + 1.0, subsets=20, subset_size=100)
    assert far > 10 * abs(mean)


def test_kid_matches_torch_fidelity():
    from torch_fidelity.metric_kid import kid_features_to_metric

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(60, 16)), rng.normal(0.3, 1.2, size=(50, 16))
    ours = fid.kid(a, b, subsets=10, subset_size=40)
    theirs = kid_features_to_metric(torch.from_numpy(a), torch.from_numpy(b), kid_subsets=10, kid_subset_size=40,
                                    verbose=False, rng_seed=2020)
    assert ours[0] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-9)
    assert ours[1] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-9)
    assert fid.kid(a, b, subset_size=1000)[2] == 50  # clipped to the smaller set


def test_inception_score_matches_torch_fidelity_and_salimans():
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = np.random.default_rng(4).normal(0, 3, size=(57, 20))
    theirs = isc_features_to_metric(torch.from_numpy(logits), splits=10, shuffle=True, rng_seed=2020)
    mean, std = fid.inception_score(logits, splits=10)
    assert mean == pytest.approx(theirs["inception_score_mean"], rel=1e-9)
    assert std == pytest.approx(theirs["inception_score_std"], rel=1e-9)
    # Salimans' closed form: confident and uniformly spread over K classes -> IS = K; all alike -> 1.
    assert fid.inception_score(np.eye(6)[np.arange(60) % 6], splits=1, are_probs=True)[0] == pytest.approx(6.0)
    assert fid.inception_score(np.full((30, 6), 1 / 6), splits=3, are_probs=True)[0] == pytest.approx(1.0)


# --------------------------------------------------------------------------- parity with pytorch-fid


@pytest.mark.slow
def test_fid_matches_pytorch_fid(tmp_path, ref_weights, monkeypatch, capsys):
    # One scipy sqrtm of a 2048 x 2048 matrix costs 10-150 s on a busy 2-core CPU: this
    # test computes exactly two (ours and pytorch-fid's) and also covers the corrupt file.
    path, state = ref_weights
    real = _png_folder(tmp_path / "real", 8, 64, seed=0)
    fake = _png_folder(tmp_path / "fake", 8, 96, seed=1)
    good_real = sorted(real.glob("*.png"))
    (real / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")  # a counted skip
    with pytest.warns(UserWarning, match="below 2048 per side"):
        code, out, err = _run(capsys, ["fid", str(real), str(fake), "--inception-weights", str(path),
                                       "--batch-size", "4", "--device", "cpu", "--json"])
    assert code == 0 and "Traceback" not in err, err
    assert "skipped 1 unreadable image" in err
    res = json.loads(out.strip().splitlines()[-1])
    assert set(res) >= {"fid", "kid_mean", "kid_std", "is_mean", "is_std", "n_real", "n_fake"}
    assert (res["n_real"], res["n_fake"]) == (8, 8)

    ref = _reference_model(monkeypatch, state)
    acts = [fid_score.get_activations(files, ref, batch_size=4, device="cpu", num_workers=0)
            for files in (good_real, sorted(fake.glob("*.png")))]
    model = fid.load_inception(path)
    ours = [fid.inception_features(model, real, batch_size=4, progress=False)[0],
            fid.feature_statistics(fake, model, path, progress=False)["features"]]  # the fake set from the stats cache
    for a, o in zip(acts, ours):
        assert np.abs(a - o).max() < 1e-4
    theirs = fid_score.calculate_frechet_distance(*fid.mean_and_covariance(acts[0]), *fid.mean_and_covariance(acts[1]))
    assert res["fid"] == pytest.approx(theirs, rel=1e-3)
    assert res["is_mean"] == pytest.approx(fid.inception_score(ours[1] @ state["fc.weight"].double().numpy().T)[0],
                                           rel=1e-4)
    for key, value in fid.prdc(ours[0], ours[1], k=fid.PRDC_K).items():  # k = 3 by default, on the pool features
        assert res[key] == pytest.approx(value, abs=1e-6), key


def test_features_of_tensors_and_mixed_sizes_match_reference(tmp_path, ref_weights, monkeypatch):
    path, state = ref_weights
    rng = np.random.default_rng(5)
    small, large = (rng.integers(0, 256, (s, s), dtype=np.uint8) for s in (48, 80))
    (tmp_path / "mixed").mkdir()
    Image.fromarray(small).save(tmp_path / "mixed" / "a.png")
    Image.fromarray(large).save(tmp_path / "mixed" / "b.png")
    model = fid.load_inception(path)
    from_folder, logits, skipped = fid.inception_features(model, tmp_path / "mixed", batch_size=2, progress=False)
    assert skipped == [] and from_folder.shape == (2, 2048) and logits.shape == (2, 1008)
    ref = _reference_model(monkeypatch, state)
    for i, img in enumerate((small, large)):
        as_tensor = fid.inception_features(model, torch.from_numpy(img)[None], progress=False)[0]
        with torch.no_grad():
            theirs = ref(torch.from_numpy(img)[None, None].float().div(255).expand(-1, 3, -1, -1))[0].flatten(1)
        assert np.abs(as_tensor[0] - from_folder[i]).max() < 1e-5
        assert np.abs(theirs.double().numpy()[0] - from_folder[i]).max() < 1e-4
    # IS logits are the fc layer without its bias
    np.testing.assert_allclose(logits, from_folder @ state["fc.weight"].double().numpy().T, rtol=1e-4, atol=1e-4)


def test_npz_statistics_inputs(tmp_path, ref_weights, capsys):
    path, _ = ref_weights
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(30, 64)), rng.normal(0.1, 1, size=(30, 64))  # small: sqrtm at 2048 is slow
    np.savez(tmp_path / "a.npz", mu=a.mean(0), sigma=np.cov(a, rowvar=False))  # pytorch-fid's format
    np.savez(tmp_path / "b.npz", mu=b.mean(0), sigma=np.cov(b, rowvar=False))
    code, out, err = _run(capsys, ["fid", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--json"])
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["kid_mean"] is None and res["is_mean"] is None
    assert res["fid"] == pytest.approx(fid_score.calculate_frechet_distance(
        a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)), rel=1e-9)


def test_json_adds_precision_recall_density_coverage_with_pr_k(tmp_path, capsys):
    """.npz statistics with features need no network: the JSON's four numbers are prdc's at --pr-k."""
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(30, 16)), rng.normal(0.3, 1, size=(25, 16))
    for name, f in (("a", a), ("b", b)):
        np.savez(tmp_path / f"{name}.npz", mu=f.mean(0), sigma=np.cov(f, rowvar=False), features=f, n=len(f))
    for k in (None, 5):
        code, out, err = _run(capsys, ["fid", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--json"]
                              + (["--pr-k", str(k)] if k else []))
        assert code == 0, err
        res = json.loads(out.strip().splitlines()[-1])
        expected = fid.prdc(a, b, k or 3)
        assert {key: res[key] for key in fid.PRDC_KEYS} == pytest.approx(expected, abs=1e-12)
        assert f"Inception features, k = {k or 3}: precision {expected['precision']:.4f}" in out
        assert 0 < expected["recall"] < 1 and 0 < expected["coverage"] < 1
    for k, words in (("0", "--pr-k must be at least 1"),
                     ("25", "--pr-k 25 needs more than 25 images per side; the smaller set has 25")):
        _assert_one_line_error(*_run(capsys, ["fid", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"),
                                              "--pr-k", k])[::2], words)


# --------------------------------------------------------------------------- the classifier-feature distance


def test_classifier_feature_distance_through_a_features_seam():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten())  # (N, 1, S, S) -> (N, 32)

    def features(u8):
        with torch.no_grad():
            return net(u8[:, None].float() / 127.5 - 1).numpy()

    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (40, 16, 16), dtype=torch.uint8, generator=g)
    fake = (real.float() * 0.5).to(torch.uint8)
    res = distances.classifier_feature_distance(real, fake, None, features_fn=features, size=16)
    direct = distances.feature_distance(features(real), features(fake))
    assert res["cxr_fd"] == pytest.approx(direct["cxr_fd"]) and res["cxr_fd"] > 0
    assert res["cxr_n_real"] == res["cxr_n_fake"] == 40 and res["cxr_dim"] == 32
    assert abs(distances.classifier_feature_distance(real, real, None, features_fn=features, size=16)["cxr_fd"]) < 1e-6


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_give_one_line_errors(tmp_path, ref_weights, tiny_classifier, capsys, monkeypatch):
    path, state = ref_weights
    good = _png_folder(tmp_path / "good", 3, 32, seed=2)
    one = _png_folder(tmp_path / "one", 1, 32, seed=3)
    empty = tmp_path / "empty"
    empty.mkdir()
    w = ["--inception-weights", str(path), "--device", "cpu", "--batch-size", "4"]

    _assert_one_line_error(*_run(capsys, ["fid", str(good), str(one)] + w)[::2], "1 image", "at least 2")
    _assert_one_line_error(*_run(capsys, ["fid", str(good), str(empty)] + w)[::2], "no images")
    _assert_one_line_error(*_run(capsys, ["fid", str(good), str(tmp_path / "nope")] + w)[::2], "not found")
    _assert_one_line_error(*_run(capsys, ["fid", str(good), str(good), "--pr-k", "3"] + w)[::2],
                           "--pr-k 3 needs more than 3 images per side; the smaller set has 3")

    bad = dict(state)
    bad["Mixed_6b.branch1x1.conv.wieght"] = bad.pop("Mixed_6b.branch1x1.conv.weight")
    torch.save(bad, tmp_path / "bad.pth")
    _assert_one_line_error(*_run(capsys, ["fid", str(good), str(good), "--inception-weights",
                                          str(tmp_path / "bad.pth")])[::2], "Mixed_6b.branch1x1.conv.weight")

    # No weights on disk, no network: one message naming the file and where to put it.
    monkeypatch.setattr(fid, "default_weights_path", lambda: tmp_path / "models" / fid.WEIGHTS_FILE)

    def offline(*a, **k):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(fid.urllib.request, "urlopen", offline)
    code, _, err = _run(capsys, ["fid", str(good), str(good)])
    _assert_one_line_error(code, err, fid.WEIGHTS_FILE, str(tmp_path / "models"), "--inception-weights")
    with pytest.raises(fid.InceptionWeightsMissing):
        fid.resolve_weights(None)
    # ... and with --classifier the X-ray feature distance is still reported.
    code, out, err = _run(capsys, ["fid", str(good), str(good), "--classifier", str(tiny_classifier), "--json"])
    assert code == 0 and "Traceback" not in err and fid.WEIGHTS_FILE in err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["fid"] is None and abs(res["cxr_fd"]) < 1e-4 and res["n_real"] == 3
    # the default k = 3 on sets of 3: not computed, with a note; a k that fits: the same images cover each other
    assert res["precision"] is res["cxr_precision"] is None and "not computed" in err
    code, out, err = _run(capsys, ["fid", str(good), str(good), "--classifier", str(tiny_classifier), "--json",
                                   "--pr-k", "2"])
    res = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and res["precision"] is None and res["cxr_precision"] == res["cxr_recall"] == 1.0
    assert res["cxr_coverage"] == 1.0 and "classifier features, k = 2" in out
