"""The classifier: AUROC against its pairwise definition, bootstrap intervals,
the threshold rule, the protocol (synthetic images reach training only), training
on phantoms and on real 64 px NIH images, checkpoints, and the command line."""

import csv
import gzip
import json
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

import classify
import data
import main
from classify import ClassifyConfig
from plumbing.configs import CLIError
from plumbing.files import save_png

TINY = dict(model="small", width=8, epochs=2, batch_size=32, patience=0, device="cpu")


# --------------------------------------------------------------------------- helpers


def brute_force_auroc(scores, labels):
    """The definition: the fraction of (positive, negative) pairs ordered correctly, ties 1/2."""
    s, y = np.asarray(scores, float), np.asarray(labels).astype(bool)
    diff = s[y][:, None] - s[~y][None, :]
    return ((diff > 0) + 0.5 * (diff == 0)).mean()


def blob_images(n, size, seed, pos_fraction=0.4):
    """Noisy grey discs; class 1 has a bright blob. Learnable in a few epochs."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < pos_fraction).long()
    y[:2] = torch.tensor([0, 1])  # both classes present, whatever n
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    x = 110 + 60 * torch.exp(-2 * (xx ** 2 + yy ** 2)) + 20 * torch.randn(n, size, size, generator=g)
    centres = torch.rand(n, 2, generator=g) * 1.0 - 0.5
    blob = torch.exp(-((xx - centres[:, 0, None, None]) ** 2 + (yy - centres[:, 1, None, None]) ** 2) / 0.04)
    x = x + 60 * blob * y[:, None, None]
    return x.clamp(0, 255).to(torch.uint8), y


def write_layout(root, splits):
    """Write {split: (images, labels)} as the extract layout of PNGs."""
    for split, (x, y) in splits.items():
        for i, (img, lab) in enumerate(zip(x, y.tolist())):
            cls = "infiltration" if lab == 1 else "no_finding"
            save_png(img.numpy(), Path(root) / data.SPLIT_DIRS[split] / cls / f"{split}_{i:04d}.png")
    return Path(root)


def run_cli(args, capsys):
    code = main.main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    """Phantom X-rays from `main.py extract --phantoms` in the extract layout."""
    out = tmp_path_factory.mktemp("phantoms") / "ph"
    assert main.main(["extract", "--phantoms", "240", "--out", str(out), "--size", "64", "--seed", "0"]) == 0
    return out


# --------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_pairwise_definition_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 50 + 30 * seed
    labels = rng.random(n) < 0.3
    labels[:2] = [True, False]
    scores = rng.integers(0, 6, n) + labels * rng.integers(0, 3, n)  # few distinct values: many ties
    assert classify.auroc(scores, labels) == pytest.approx(brute_force_auroc(scores, labels), abs=1e-12)
    cont = rng.normal(size=n) + labels
    assert classify.auroc(cont, labels) == pytest.approx(brute_force_auroc(cont, labels), abs=1e-12)


def test_auroc_edge_cases():
    y = [0, 0, 1, 1]
    assert classify.auroc([0.1, 0.2, 0.3, 0.4], y) == 1.0
    assert classify.auroc([0.4, 0.3, 0.2, 0.1], y) == 0.0
    assert classify.auroc([0.5] * 4, y) == 0.5
    assert np.isnan(classify.auroc([0.1, 0.2], [1, 1]))


def test_bootstrap_interval_contains_estimate_and_is_reproducible():
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.3
    s = rng.normal(size=300) + 1.0 * y
    est = classify.auroc(s, y)
    low, high = classify.bootstrap_auroc_ci(s, y, n_boot=1000, seed=0)
    assert low < est < high
    assert 0.02 < high - low < 0.3
    assert classify.bootstrap_auroc_ci(s, y, n_boot=1000, seed=0) == (low, high)


def test_paired_difference_of_a_model_with_itself_is_zero_and_sign_is_right():
    rng = np.random.default_rng(1)
    y = rng.random(200) < 0.4
    s = rng.normal(size=200) + y
    assert classify.paired_bootstrap_diff(s, s, y, n_boot=200) == (0.0, 0.0, 0.0)
    better = s + 2.0 * y  # a model that separates the classes further
    diff, low, high = classify.paired_bootstrap_diff(better, s, y, n_boot=200)
    assert diff == pytest.approx(classify.auroc(better, y) - classify.auroc(s, y))
    assert 0 < low <= diff <= high


def test_youden_threshold_and_threshold_metrics():
    s = np.array([0.1, 0.2, 0.35, 0.4, 0.6, 0.8])
    y = np.array([0, 0, 1, 0, 1, 1])
    t = classify.youden_threshold(s, y)
    assert t == 0.6  # >= 0.35: sens 1, spec 2/3 (J 2/3); >= 0.6: sens 2/3, spec 1 (J 2/3); ties go high
    t = classify.youden_threshold([0.1, 0.2, 0.35, 0.4, 0.6, 0.8], [0, 0, 0, 1, 1, 1])
    assert t == 0.4
    assert classify.threshold_metrics(s, y, 0.6) == {"accuracy": 5 / 6, "sensitivity": 2 / 3, "specificity": 1.0}


# --------------------------------------------------------------------------- augmentation and models


def test_augment_is_small_reproducible_and_in_range():
    x = data.to_unit_range(blob_images(8, 32, 0)[0])
    a = classify.augment(x, torch.Generator().manual_seed(3))
    b = classify.augment(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape
    assert a.min() >= -1 and a.max() <= 1
    # a light warp: far closer to the image than to its mirror image (no flips)
    assert (a - x).abs().mean() < 0.5 * (a - x.flip(-1)).abs().mean() + 0.1


def test_pretrained_key_map_averages_conv1(monkeypatch):
    from torchvision.models import resnet18

    fake = resnet18(weights=None).state_dict()  # stands in for the ImageNet download
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", lambda *a, **k: fake)
    model = classify.build_model(ClassifyConfig(model="resnet18", size=32, pretrained=True))
    got = model.net.state_dict()
    assert torch.equal(got["conv1.weight"], fake["conv1.weight"].mean(1, keepdim=True))
    assert torch.equal(got["layer4.1.bn2.running_var"], fake["layer4.1.bn2.running_var"])
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2,)


def test_pretrained_offline_is_one_clear_error(monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(CLIError, match=r"resnet18-f37072fd\.pth"):
        classify.build_model(ClassifyConfig(model="resnet18", pretrained=True))


# --------------------------------------------------------------------------- training protocol


@pytest.fixture(scope="module")
def tiny_splits():
    return blob_images(160, 32, 1), blob_images(60, 32, 2), blob_images(60, 32, 3)


def test_synthetic_images_reach_training_only(tiny_splits, monkeypatch):
    (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = tiny_splits
    syn_x = torch.full((40, 32, 32), 7, dtype=torch.uint8)  # marked: a flat value no real image has
    syn_x[:, 0, :] = 251
    syn_y = torch.arange(40) % 2
    seen, trained_on = [], []
    real_predict, real_training_set = classify.predict, classify._training_set
    monkeypatch.setattr(classify, "predict", lambda m, x, *a, **k: seen.append(x) or real_predict(m, x, *a, **k))
    monkeypatch.setattr(classify, "_training_set",
                        lambda *a: trained_on.append(real_training_set(*a)) or trained_on[-1])
    cfg = ClassifyConfig(size=32, **TINY)
    metrics, _ = classify.train_and_evaluate(tr_x, tr_y, va_x, va_y, te_x, te_y, cfg,
                                             synthetic_x=syn_x, synthetic_y=syn_y, progress=False)
    assert (metrics["n_train"], metrics["n_synthetic"], metrics["n_val"], metrics["n_test"]) == (160, 40, 60, 60)
    # every image scored (validation each epoch, then validation and test) is real validation or test
    assert seen and all(x is va_x or x is te_x for x in seen)
    assert any(x is te_x for x in seen)
    marked = lambda x: ((x[:, 0, :] == 251).all(1) & (x[:, 5, :] == 7).all(1)).sum().item()  # noqa: E731
    assert marked(va_x) == marked(te_x) == 0
    # the training set is the real one followed by the synthetic one
    (x, y), = trained_on
    assert torch.equal(x, torch.cat([tr_x, syn_x])) and torch.equal(y, torch.cat([tr_y, syn_y])) and marked(x) == 40


def test_training_is_deterministic_and_checkpoint_round_trips(tiny_splits, tmp_path):
    (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = tiny_splits
    cfg = ClassifyConfig(size=32, **TINY)
    m1, model = classify.train_and_evaluate(tr_x, tr_y, va_x, va_y, te_x, te_y, cfg, progress=False)
    m2, _ = classify.train_and_evaluate(tr_x, tr_y, va_x, va_y, te_x, te_y, cfg, progress=False)
    m1.pop("train_seconds"), m2.pop("train_seconds")
    assert m1 == m2
    assert 0 <= m1["auroc_ci_low"] <= m1["auroc"] <= m1["auroc_ci_high"] <= 1
    assert 1 <= m1["best_epoch"] <= 2
    # the returned model is the selected one: its test AUROC is the reported one
    assert classify.auroc(classify.predict(model, te_x), te_y) == pytest.approx(m1["auroc"])

    classify.save_classifier(model, cfg, tmp_path / "clf.pt", m1)
    back, config = classify.load_classifier(tmp_path / "clf.pt")
    assert config["model"] == "small" and config["size"] == 32
    assert np.array_equal(classify.predict(back, te_x), classify.predict(model, te_x))
    feats = classify.embed(back, te_x)
    assert feats.shape == (60, 64) and feats.dtype == np.float32  # 8 * width
    assert classify.embed(back, torch.zeros(3, 64, 64, dtype=torch.uint8)).shape == (3, 64)  # resized to 32
    with pytest.raises(CLIError, match="not a classifier"):
        torch.save({"kind": "ddpm"}, tmp_path / "other.pt")
        classify.load_classifier(tmp_path / "other.pt")


def test_resnet18_trains_one_epoch(tiny_splits):
    (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = tiny_splits
    cfg = ClassifyConfig(model="resnet18", size=32, epochs=1, batch_size=16, device="cpu")
    metrics, model = classify.train_and_evaluate(tr_x[:32], tr_y[:32], va_x[:20], va_y[:20], te_x[:20], te_y[:20],
                                                 cfg, progress=False)
    assert 0 <= metrics["auroc"] <= 1 and classify.embed(model, te_x[:4]).shape == (4, 512)


def test_train_on_synthetic_only(tiny_splits):
    (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = tiny_splits
    empty_x, empty_y = tr_x[:0], tr_y[:0]
    metrics, _ = classify.train_and_evaluate(empty_x, empty_y, va_x, va_y, te_x, te_y,
                                             ClassifyConfig(size=32, **{**TINY, "epochs": 1}),
                                             synthetic_x=tr_x, synthetic_y=tr_y, progress=False)
    assert metrics["n_train"] == 0 and metrics["n_synthetic"] == 160


# --------------------------------------------------------------------------- phantoms and the command line


def test_phantoms_reach_auroc_above_0_9(phantom_dir, capsys, tmp_path):
    code, out, err = run_cli(["classify", "--data", str(phantom_dir), "--size", "32", "--epochs", "8",
                              "--json", "--device", "cpu", "--save", str(tmp_path / "c.pt")], capsys)
    assert code == 0, err
    m = json.loads(out.strip().splitlines()[-1])
    print(f"phantom AUROC {m['auroc']:.4f} [{m['auroc_ci_low']:.4f}, {m['auroc_ci_high']:.4f}]")
    assert m["auroc"] > 0.9
    assert m["auroc_ci_low"] <= m["auroc"] <= m["auroc_ci_high"]
    for key in ("accuracy", "sensitivity", "specificity"):
        assert 0 <= m[key] <= 1
    n_files = {s: len(data.list_images(phantom_dir / data.SPLIT_DIRS[s])) for s in data.SPLITS}
    assert (m["n_train"], m["n_val"], m["n_test"], m["n_synthetic"]) == (
        n_files["train"], n_files["validation"], n_files["test"], 0)
    assert (tmp_path / "c.pt").is_file()


def test_cli_synthetic_folder_goes_to_training_only(tmp_path, capsys):
    root = write_layout(tmp_path / "d", {"train": blob_images(40, 32, 4), "validation": blob_images(20, 32, 5),
                                         "test": blob_images(24, 32, 6)})
    syn = tmp_path / "syn"
    for i, (img, lab) in enumerate(zip(*blob_images(10, 32, 7))):
        save_png(img.numpy(), syn / ("infiltration" if lab else "no_finding") / f"s{i}.png")
    code, out, err = run_cli(["classify", "--data", str(root), "--synthetic", str(syn), "--size", "32",
                              "--epochs", "1", "--json", "--device", "cpu"], capsys)
    assert code == 0, err
    m = json.loads(out.strip().splitlines()[-1])
    assert (m["n_train"], m["n_synthetic"], m["n_val"], m["n_test"]) == (40, 10, 20, 24)

    code, _, err = run_cli(["classify", "--data", str(root), "--synthetic", str(root / "test_data"),
                            "--size", "32", "--epochs", "1"], capsys)
    assert code == 2 and "overlaps the test split" in err


def test_cli_errors_are_one_line(tmp_path, capsys):
    root = write_layout(tmp_path / "d", {"train": blob_images(20, 32, 4), "validation": blob_images(10, 32, 5)})
    cases = [
        (["--data", str(root)], "test_data"),  # missing split folder
        (["--data", str(tmp_path / "nowhere")], "not found"),
        (["--data", str(root), "--size", "8"], "--size"),
        (["--data", str(root), "--epochs", "0"], "--epochs"),
        (["--data", str(root), "--pretrained"], "resnet18"),
    ]
    write_layout(tmp_path / "one", {"train": blob_images(20, 32, 4), "validation": blob_images(10, 32, 5),
                                    "test": (blob_images(6, 32, 6)[0], torch.zeros(6, dtype=torch.long))})
    cases.append((["--data", str(tmp_path / "one")], "both classes"))
    unlabelled = tmp_path / "unlabelled"
    save_png(np.zeros((32, 32), np.uint8), unlabelled / "x.png")
    cases.append((["--data", str(tmp_path / "one"), "--synthetic", str(unlabelled)], "no class folder"))
    for args, needle in cases:
        # the case's own arguments come last, so they override the small defaults in front
        code, _, err = run_cli(["classify", "--size", "32", "--epochs", "1", *args], capsys)
        assert code == 2, (args, err)
        assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (args, err)


# --------------------------------------------------------------------------- real data


def nih_labels(csv_gz):
    """Image Index -> (label, patient): 1 Infiltration anywhere, 0 exactly "No Finding"."""
    out = {}
    with gzip.open(csv_gz, "rt", newline="") as f:
        rows = csv.reader(f)
        next(rows)  # the header has 9 names for 11 fields; columns 0, 1, 3 are what we need
        for r in rows:
            labels = r[1].split("|")
            if "Infiltration" in labels:
                out[r[0]] = (1, r[3])
            elif r[1] == "No Finding":
                out[r[0]] = (0, r[3])
    return out


def test_real_nih_64px_trains_end_to_end_on_a_patient_disjoint_split(nih64_dir, nih_dir):
    meta = nih_labels(nih_dir / "Data_Entry_2017_v2020.csv.gz")
    s = data.load_folder(nih64_dir / "images", 64, progress=False)
    keep = [i for i, p in enumerate(s.paths) if Path(p).name in meta]
    names = [Path(s.paths[i]).name for i in keep]
    x = s.images[keep]
    y = torch.tensor([meta[n][0] for n in names])
    patients = np.array([meta[n][1] for n in names])
    # patient-disjoint 60/20/20 split: shuffle patients, not images
    unique = np.random.default_rng(0).permutation(np.unique(patients))
    cut = np.cumsum([int(0.6 * len(unique)), int(0.2 * len(unique))])
    groups = np.split(unique, cut)
    idx = [torch.from_numpy(np.flatnonzero(np.isin(patients, g))) for g in groups]
    assert not set(patients[idx[0]]) & set(patients[idx[2]]) and not set(patients[idx[1]]) & set(patients[idx[2]])
    cfg = ClassifyConfig(model="small", size=64, width=16, epochs=6, patience=3, device="cpu")
    metrics, _ = classify.train_and_evaluate(x[idx[0]], y[idx[0]], x[idx[1]], y[idx[1]], x[idx[2]], y[idx[2]],
                                             cfg, progress=False)
    print("nih-64px:", json.dumps(metrics))
    assert metrics["n_train"] + metrics["n_val"] + metrics["n_test"] == len(names) == 661
    assert 0 <= metrics["auroc_ci_low"] <= metrics["auroc"] <= metrics["auroc_ci_high"] <= 1
    for key in ("accuracy", "sensitivity", "specificity"):
        assert 0 <= metrics[key] <= 1
