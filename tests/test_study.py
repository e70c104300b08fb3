"""The augmentation study: memorisation check, resumable grid, split hygiene,
the paired statistics of the report, the quick demo end to end, CLI errors."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dcgan
import ddpm
import main
import memorization
import report
import study
from phantoms import make_phantom

ROOT = Path(__file__).resolve().parents[1]


def phantoms(seed: int, n: int, size: int = 32) -> torch.Tensor:
    """n phantom X-rays (alternating classes) as uint8 (n, size, size)."""
    return torch.from_numpy(np.stack([make_phantom(np.random.default_rng([seed, i]), size, i % 2 == 0)
                                      for i in range(n)]))


# --------------------------------------------------------------------------- memorisation


def test_memorization_flags_planted_copies_and_not_fresh_samples():
    train, reference, fresh = phantoms(0, 150), phantoms(1, 100), phantoms(2, 80)
    noise = torch.randint(-2, 3, (12, 32, 32), generator=torch.Generator().manual_seed(0))
    copies = (train[:12].int() + noise).clamp(0, 255).to(torch.uint8)  # training images, barely disturbed
    res_copies = memorization.memorization_check(train, copies, reference)
    res_fresh = memorization.memorization_check(train, fresh, reference)
    assert res_copies["n_flagged"] == 12 and res_copies["flagged_fraction"] == 1.0
    assert res_fresh["flagged_fraction"] <= 0.06  # ~1% expected by construction of the threshold
    # The nearest training image of a planted copy is its source.
    assert (res_copies["_pixel_index"] == np.arange(12)).all()
    # With a feature space too, both spaces are reported and the copies are still all flagged.
    pool = lambda u8: torch.nn.functional.avg_pool2d(u8.float().unsqueeze(1), 4).flatten(1)  # noqa: E731
    both = memorization.memorization_check(train, torch.cat([copies, fresh]), reference, embed=pool)
    assert both["feature"]["n_flagged"] >= 12 and both["pixel"]["n_flagged"] >= 12
    assert set(np.flatnonzero(both["_pixel_distance"] < both["pixel"]["threshold"])) >= set(range(12))


def test_memorization_command_json_on_a_plain_folder(tmp_path, capsys):
    train_dir, syn_dir = tmp_path / "train", tmp_path / "syn"
    for d, imgs in ((train_dir, phantoms(0, 60)), (syn_dir, torch.cat([phantoms(0, 5), phantoms(3, 15)]))):
        d.mkdir()
        for i, im in enumerate(imgs):
            Image.fromarray(im.numpy()).save(d / f"{i:03d}.png")
    rc = main.main(["memorization", "--train", str(train_dir), "--synthetic", str(syn_dir), "--json",
                    "--out", str(tmp_path / "memo")])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n_synthetic"] == 20 and {"n_flagged", "flagged_fraction", "pixel"} <= set(res)
    # 80% of the folder is the training set: most of the 5 planted copies sit in it and are flagged.
    assert res["n_flagged"] >= 2 and res["flagged_fraction"] < 0.5
    assert (tmp_path / "memo" / "closest_pairs.png").is_file() and (tmp_path / "memo" / "memorization.json").is_file()


# --------------------------------------------------------------------------- subsets and paired statistics


def test_real_subset_is_stratified_and_a_function_of_seed_and_fraction():
    labels = np.array([1] * 40 + [0] * 60)
    a = study.real_subset(labels, 0.25, seed=3)
    assert (labels[a] == 1).sum() == 10 and (labels[a] == 0).sum() == 15
    assert np.array_equal(a, study.real_subset(labels, 0.25, seed=3))
    assert not np.array_equal(a, study.real_subset(labels, 0.25, seed=4))
    assert len(study.real_subset(labels, 1.0, seed=0)) == 100


def test_bootstrap_auroc_matches_classify_auroc():
    import classify

    rng = np.random.default_rng(0)
    labels = np.array([1] * 30 + [0] * 50)
    scores = rng.normal(size=80) + labels
    scores[:5] = scores[30:35]  # ties across the classes
    idx = classify.stratified_bootstrap_indices(labels, 20)
    boot = classify.bootstrap_aurocs(scores, idx, 30)
    for b in range(3):
        assert boot[b] == pytest.approx(classify.auroc(scores[idx[b]], labels[idx[b]]))
    identity = np.arange(80)[None]  # positives first, as stratified_bootstrap_indices orders them
    assert classify.bootstrap_aurocs(scores, identity, 30)[0] == pytest.approx(classify.auroc(scores, labels))


def _setting(gen, diff, lo, hi):
    return report.Setting("aug", gen, 1.0, 1.0, [0, 1, 2], 0.8, 0.7, 0.9, 0.01, 100, 100, diff, lo, hi)


def test_headline_wording_follows_the_intervals():
    none = report.headline([_setting("ddpm", 0.01, -0.01, 0.03), _setting("gan", -0.002, -0.02, 0.01)])
    assert "+0.010 (95% CI -0.010 to +0.030) for the DDPM" in none and "no clear benefit or harm" in none
    assert none.count(".") - none.count("0.") <= 1  # one sentence
    good = report.headline([_setting("ddpm", 0.03, 0.01, 0.05), _setting("gan", -0.04, -0.07, -0.01)])
    assert "clear benefit from the DDPM" in good and "clear harm from the GAN" in good


# --------------------------------------------------------------------------- the quick demo, end to end


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main.main(["demo", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    return out


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_demo_writes_report_results_and_plots(demo_dir):
    report = (demo_dir / "report.md").read_text().splitlines()
    assert report[0].startswith("On this data") and "changed test AUROC over real-only" in report[0]
    cfg, _ = study.demo_config(demo_dir, quick=True, device="cpu")
    rows = _rows(demo_dir)
    assert sorted(r["run"] for r in rows) == sorted(r.name for r in study.plan_runs(cfg))
    assert all(0 <= float(r["auroc"]) <= 1 for r in rows)
    for name in ("auroc_vs_ratio.png", "distances.png", "samples_infiltration.png", "samples_no_finding.png",
                 "closest_pairs_ddpm.png", "closest_pairs_gan.png", "memorization.json"):
        assert (demo_dir / name).is_file(), name
    assert "Inception FID, KID and IS: **not computed**" in "\n".join(report)  # said, not silently dropped
    for r in rows:
        assert (demo_dir / "scores" / f"{r['run']}.npy").is_file()


def test_synthetic_images_never_reach_validation_or_test(demo_dir):
    with open(demo_dir / "data" / "manifest.csv", newline="") as f:
        split_of = {str((demo_dir / "data" / r["image"]).resolve()): r["split"] for r in csv.DictReader(f)}
    splits = json.loads((demo_dir / "splits.json").read_text())
    for name in ("validation", "test"):
        assert splits[name], name
        assert all(split_of[str(Path(p).resolve())] == name for p in splits[name])  # manifest agrees
    synthetic = sorted((demo_dir / "synthetic").rglob("*.png"))
    assert synthetic and not any(str(p.resolve()) in split_of for p in synthetic)
    held_out = {np.asarray(Image.open(p)).tobytes() for p in splits["validation"] + splits["test"]}
    assert not any(np.asarray(Image.open(p)).tobytes() in held_out for p in synthetic)
    # Every run was scored on the same test images, with the synthetic ones only counted as training.
    rows = _rows(demo_dir)
    assert len({r["test_set"] for r in rows}) == 1 and len({r["n_test"] for r in rows}) == 1
    assert all(int(r["n_synthetic"]) == 0 for r in rows if r["mode"] == "real")


def test_rerun_skips_finished_work(demo_dir, monkeypatch):
    import classify

    before = _rows(demo_dir)
    calls = []
    real_train = classify.train_and_evaluate

    def counting(*args, **kwargs):
        calls.append(1)
        return real_train(*args, **kwargs)

    def no_generator(*args, **kwargs):
        raise AssertionError("re-run trained or sampled a generator again")

    monkeypatch.setattr(classify, "train_and_evaluate", counting)
    for module in (ddpm, dcgan):
        monkeypatch.setattr(module, "train", no_generator)
        monkeypatch.setattr(module, "generate", no_generator)
    study.run_demo(demo_dir, quick=True, device="cpu")  # everything done: nothing trains
    assert calls == [] and [r["finished_at"] for r in _rows(demo_dir)] == [r["finished_at"] for r in before]

    dropped = before[-1]["run"]
    study.write_results(demo_dir / "results.csv", before[:-1])  # as if interrupted during the last run
    study.run_demo(demo_dir, quick=True, device="cpu")
    after = _rows(demo_dir)
    assert len(calls) == 1 and {r["run"] for r in after} == {r["run"] for r in before}
    assert [r["finished_at"] for r in after if r["run"] != dropped] == [r["finished_at"] for r in before[:-1]]


def test_memorization_command_on_an_extract_root_with_classifier_features(demo_dir, capsys):
    rc = main.main(["memorization", "--train", str(demo_dir / "data"), "--synthetic", str(demo_dir / "synthetic"),
                    "--classifier", str(demo_dir / "classifiers" / "reference.pt"), "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n_synthetic"] == len(list((demo_dir / "synthetic").rglob("*.png")))
    assert "feature" in res and res["train"].startswith("train split")


# --------------------------------------------------------------------------- command-line errors


@pytest.mark.parametrize("argv, message", [
    (["experiment", "--data", "/nonexistent/x", "--out", "o"], "--data: folder not found"),
    (["experiment", "--data", ".", "--out", "o", "--ratios", "0,a"], "--ratios must be comma-separated numbers"),
    (["experiment", "--data", ".", "--out", "o", "--ratios", "1,2"], "include 0"),
    (["experiment", "--data", ".", "--out", "o", "--real-fractions", "0,1"], "(0, 1]"),
    (["experiment", "--data", ".", "--out", "o", "--generators", "vae"], "--generators: unknown"),
    (["experiment", "--data", ".", "--out", "o", "--ddpm-finetune"], "needs --pretrained"),
    (["experiment", "--data", ".", "--out", "o"], "not in the extract layout"),
    (["memorization", "--train", "/nonexistent/t", "--synthetic", "/nonexistent/s"], "not found"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys, tmp_path):
    argv = [str(tmp_path / "o") if a == "o" else a for a in argv]
    assert main.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_cli_error_has_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, "main.py", "memorization", "--train", str(tmp_path), "--synthetic",
                        str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.startswith("error:")
