"""The augmentation study: memorisation check, content guard, nested subsets,
equal step budgets, independent sampling noise, held-out distances, the
resumable grid and its input fingerprint, summary.json, the usability gate in
the report, the quick demo end to end, CLI errors. (The verdict rule itself is
proved in tests/test_stats.py; the gate's rule in tests/test_gate.py.)"""

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dcgan
import ddpm
import classify
import data
from training import ddpm_run, gan_run
from study import generators
import main
from study import memorization
from study import report
from study import stats
from study import experiment as study
from tools.phantoms import make_phantom
from clitools import cli
from training.harness import run_lock

ROOT = Path(__file__).resolve().parents[1]
NIH64 = ROOT.parent / "shared" / "data" / "nih-64px" / "images"


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


def save_pngs(folder: Path, images, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{start + i:03d}.png" for i in range(len(images))]
    for p, im in zip(paths, images):
        Image.fromarray(np.asarray(im)).save(p)
    return paths


def test_memorization_flags_every_exact_copy_in_a_plain_folder(tmp_path, capsys):
    # Issue 11 case 7: with a plain folder, 10 byte-identical copies among 20 synthetic images
    # were flagged 8 times, because a random 20% of the folder left the searched set.
    train = phantoms(0, 60)
    train_dir, syn_dir = tmp_path / "train", tmp_path / "syn"
    originals = save_pngs(train_dir, train)
    syn_dir.mkdir()
    for i in range(0, 60, 6):  # 10 byte-identical copies, spread over the whole folder
        shutil.copyfile(originals[i], syn_dir / f"copy_{i:03d}.png")
    save_pngs(syn_dir, phantoms(3, 10), start=100)  # 10 fresh images
    rc = main.main(["memorization", "--train", str(train_dir), "--synthetic", str(syn_dir), "--json",
                    "--out", str(tmp_path / "memo")])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n_synthetic"] == 20 and res["n_exact_copies"] == 10 and res["n_flagged"] >= 10
    assert res["yardstick"] == "leave-one-out" and res["n_train"] == 60  # nothing left the searched set
    assert res["p_value"] == 1 / (1 + memorization.N_PERMUTATIONS)  # no re-split flags as many: the smallest p
    assert 0 < res["chance_fraction"] < 0.2
    assert (tmp_path / "memo" / "closest_pairs.png").is_file() and (tmp_path / "memo" / "memorization.json").is_file()
    # In the check itself: each copy is flagged, even under a threshold of zero (percentile 0).
    syn = torch.cat([train[::6], phantoms(3, 10)])
    res = memorization.memorization_check(train, syn, None, percentile=0)
    assert res["n_exact_copies"] == 10 and res["pixel"]["n_flagged"] >= 10 and res["n_flagged"] >= 10


def test_memorization_reports_spaces_separately_and_a_chance_rate():
    train, heldout = phantoms(0, 150), phantoms(1, 100)
    pool = lambda u8: torch.nn.functional.avg_pool2d(u8.float().unsqueeze(1), 4).flatten(1)  # noqa: E731
    res = memorization.memorization_check(train, phantoms(2, 80), heldout, embed=pool)
    both = res["pixel"]["n_flagged"] + res["feature"]["n_flagged"]
    assert max(res["pixel"]["n_flagged"], res["feature"]["n_flagged"]) <= res["n_flagged"] <= both
    # The chance rate is measured, per space and combined (either space): about 1% per space here.
    assert 0 < res["pixel"]["chance_fraction"] <= 0.03 and res["chance_fraction"] <= 0.06
    assert res["test"] == "permutation" and res["false_positive_rate"] == memorization.FALSE_POSITIVE_RATE
    assert res["p_value"] * (1 + memorization.N_PERMUTATIONS) == pytest.approx(
        round(res["p_value"] * (1 + memorization.N_PERMUTATIONS)))  # (1 + k) / (1 + n_perm)
    assert res["p_value"] > 0.05  # fresh phantoms are no closer to the training images than held-out ones


def test_leave_one_out_percentile_and_ordinals():
    rng = np.random.default_rng(0)
    for n in (3, 40, 201):
        d = rng.random(n)
        d[:3] = d[3 % n]  # ties
        for p in (0, 1, 2.5, 50, 100):
            want = [np.percentile(np.delete(d, i), p) for i in range(n)]
            np.testing.assert_allclose(memorization.leave_one_out_percentile(d, p), want)
    assert [memorization.ordinal(p) for p in (1, 2, 3, 4, 11, 12, 13, 21, 22, 0.5, 5.0)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "0.5th", "5th"]


@pytest.mark.parametrize("n_synthetic, n_cases", [(300, 1000), (2000, 300)])
def test_memorisation_permutation_test_flags_at_most_5_percent_of_non_copying_generators(n_synthetic, n_cases,
                                                                                          capsys):
    """Null cases simulated as distances (no images): a generator that copies nothing has nearest-training
    distances exchangeable with those of 174 held-out real images, in two correlated spaces (pixel,
    feature), no exact copies. The binomial test this replaced flagged 12-27% of such cases (one random
    threshold shared by every synthetic image); the permutation test must flag at most 5%. With 99
    re-splits here (the study uses 999) p < 0.05 means at most 3 of 99 re-splits flag as many, which
    happens with probability at most 4/100 under exchangeability. A rule at the old 12% would pass at
    1,000 cases with probability binom.cdf(50, 1000, 0.12) < 1e-15, at 300 binom.cdf(15, 300, 0.12) = 3e-5."""
    rng = np.random.default_rng(n_synthetic)
    flags = 0
    for k in range(n_cases):
        pixel = rng.gamma(4.0, size=174 + n_synthetic)
        d = np.stack([pixel, 0.5 * pixel + rng.gamma(2.0, size=pixel.size)], axis=1)  # (n, spaces)
        p = memorization.permutation_p(d[:174], d[174:], np.zeros(174, bool), np.zeros(n_synthetic, bool),
                                       n_perm=99, seed=k)
        flags += p < memorization.FALSE_POSITIVE_RATE
    with capsys.disabled():
        print(f"\nmemorisation, {n_synthetic} synthetic vs 174 held-out, no copying: flagged in {flags} of {n_cases} "
              f"cases ({flags / n_cases:.1%})")
    assert flags / n_cases <= memorization.FALSE_POSITIVE_RATE


def test_memorisation_permutation_test_finds_a_few_percent_of_copies():
    # 5% of 2,000 synthetic images are copies (distance 0): in a re-split they land among the yardstick
    # too and pull its threshold to 0, so the observed share (copies + 1% by chance) is rarely reached.
    rng = np.random.default_rng(0)
    d = rng.gamma(4.0, size=(174 + 2000, 1))
    exact = np.zeros(2000, bool)
    exact[:100] = True
    d[174:274] = 0.0
    p = memorization.permutation_p(d[:174], d[174:], np.zeros(174, bool), exact, n_perm=199)
    assert p < memorization.FALSE_POSITIVE_RATE and memorization.flagged_fraction(d[:174], d[174:], exact, 1.0) > 0.05
    # Ties count against the claim: a synthetic set equal to the yardstick is not flagged.
    same = np.tile(d[:174], (2, 1))
    assert memorization.permutation_p(d[:174], same, np.zeros(174, bool), np.zeros(348, bool), n_perm=99) > 0.05


# --------------------------------------------------------------------------- the content-based leakage guard


def jpeg(u8: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("L"))


def test_guard_finds_copies_but_not_distinct_images():
    a, b = phantoms(0, 200), phantoms(1, 200)
    assert data.find_copy(a, b) is None  # phantoms are alike, but none is a copy of another
    re_encoded = torch.from_numpy(np.stack([jpeg(x, 75) for x in b[:20].numpy()]))
    assert data.find_copy(torch.cat([a[:5], b[7:8]]), b)[:2] == (5, 7)
    hit = data.find_copy(torch.cat([a[:5], re_encoded[3:4]]), b)
    assert hit[:2] == (5, 3) and "near-copy" in hit[2]
    assert all(data.find_copy(re_encoded[i:i + 1], b)[1] == i for i in range(20))


def test_guard_is_silent_on_distinct_real_images():
    if not NIH64.is_dir():
        pytest.skip(f"NIH 64 px sample not found at {NIH64}")
    import data

    x = data.load_folder(NIH64, 32, progress=False).images  # 1,000 real images, several per patient
    assert data.find_copy(x[::2], x[1::2]) is None


@pytest.fixture
def phantom_data(tmp_path):
    root = tmp_path / "data"
    assert main.main(["extract", "--phantoms", "40", "--out", str(root), "--size", "32", "--seed", "0"]) == 0
    return root


@pytest.mark.parametrize("copy", ["renamed", "re-encoded"])
def test_classify_refuses_a_synthetic_copy_of_a_test_image(phantom_data, tmp_path, capsys, copy):
    syn = tmp_path / "syn"
    save_pngs(syn / "infiltration", phantoms(5, 4))
    save_pngs(syn / "no_finding", phantoms(6, 4))
    test_image = sorted((phantom_data / "test_data" / "no_finding").glob("*.png"))[0]
    target = syn / "no_finding" / "zz_innocent.png"
    if copy == "renamed":
        shutil.copyfile(test_image, target)
    else:
        Image.fromarray(jpeg(np.asarray(Image.open(test_image)), 90)).save(target.with_suffix(".jpg"))
        target = target.with_suffix(".jpg")
    rc = main.main(["classify", "--data", str(phantom_data), "--synthetic", str(syn), "--size", "32", "--epochs", "1",
                    "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: --synthetic")
    assert str(target) in err[0] and test_image.name in err[0] and "the test image" in err[0]


# --------------------------------------------------------------------------- subsets and paired statistics


def test_real_subset_is_stratified_and_a_function_of_seed_and_fraction():
    labels = np.array([1] * 40 + [0] * 60)
    a = study.real_subset(labels, 0.25, seed=3)
    assert (labels[a] == 1).sum() == 10 and (labels[a] == 0).sum() == 15
    assert np.array_equal(a, study.real_subset(labels, 0.25, seed=3))
    assert not np.array_equal(a, study.real_subset(labels, 0.25, seed=4))
    assert len(study.real_subset(labels, 1.0, seed=0)) == 100


def test_subsets_are_nested():
    labels = np.array([1] * 37 + [0] * 63)
    full, quarter, tenth = (set(study.real_subset(labels, f)) for f in (1.0, 0.25, 0.1))
    assert tenth < quarter < full == set(range(100))
    pool = np.array([1, 0] * 150)
    picks = [set(study.synthetic_subset(pool, {1: round(r * 9), 0: round(r * 16)}, seed=2, salt=5))
             for r in (0.5, 1, 2)]
    assert picks[0] < picks[1] < picks[2] and len(picks[2]) == 50
    assert (pool[list(picks[1])] == 1).sum() == 9


def test_steps_mode_trains_exactly_the_budget():
    x = phantoms(0, 64)
    y = torch.tensor([1, 0] * 32)
    cfg = classify.ClassifyConfig(model="small", width=8, size=32, epochs=3, steps=7, batch_size=16, device="cpu")
    metrics, _ = classify.train_and_evaluate(x, y, x[:16], y[:16], x[:16], y[:16], cfg, progress=False)
    assert metrics["steps"] == 7 and metrics["epochs_run"] == 3  # validation after steps 3, 6 and 7
    more = classify.train_and_evaluate(x, y, x[:16], y[:16], x[:16], y[:16], cfg, synthetic_x=x, synthetic_y=y,
                                       progress=False)[0]
    assert more["steps"] == 7 and more["n_synthetic"] == 64


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


def _row(gen, diff, lo, hi, verdict, seeds=5, runs=3):
    return dict(generator=gen, ratio=1.0, real_fraction=1.0, diff=diff, ci_low=lo, ci_high=hi, ci_level=0.975,
                p_adjusted=0.01, verdict=verdict, seeds=seeds, generator_runs=runs, n_test_images=300,
                n_test_patients=120, inconclusive_reason=stats.inconclusive_reason(seeds, runs))


def test_headline_gives_each_verdict_in_one_sentence():
    text = report.headline([_row("ddpm", 0.03, 0.01, 0.05, "benefit"), _row("gan", -0.04, -0.07, -0.01, "harm")])
    assert text.startswith("On this data (5 classifier seeds, all real training images, 300 test images of 120 "
                           "patients), the estimated change in test AUROC from adding synthetic images at ratio 1")
    assert ("+0.030 for the DDPM (97.5% CI +0.010 to +0.050 for this recipe, 3 training runs, Holm-adjusted "
            "p = 0.01: benefit)") in text
    assert "for the GAN" in text and ": harm)" in text and text.count(". ") == 0
    one = report.headline([_row("ddpm", 0.03, 0.01, 0.05, stats.VERDICTS[3], seeds=1)])
    assert "1 classifier seed," in one and "can only be inconclusive: 1 classifier seed, fewer than 3" in one
    run = report.headline([_row("ddpm", 0.03, 0.01, 0.05, stats.VERDICTS[3], runs=1)])
    assert "for one trained generator or one set of samples" in run and "one generator run" in run
    assert "changed" not in text + one + run  # the estimate is an estimate


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
    answer = next(i for i, line in enumerate(report) if line.startswith("On this data"))
    assert "the estimated change in test AUROC" in report[answer] and "for this recipe, 2 training runs" in report[
        answer] and "can only be inconclusive: 2 classifier seeds" in report[answer]  # the quick demo: a smoke test
    gates = json.loads((demo_dir / "summary.json").read_text())["gate"]
    failed = [g for g, r in gates.items() if r["usable"] is False]
    # The first lines, before the answer, name every generator the gate found unusable, and nothing else precedes.
    for g in failed:
        assert any(line.startswith(f"**Unusable generator: {g.split('@')[0].upper()}") for line in report[:answer])
    assert all(line == "" or line.startswith(("**Unusable", "Gate ", "**Memorisation")) for line in report[:answer])
    cfg, _ = study.demo_config(demo_dir, quick=True, device="cpu")
    rows = _rows(demo_dir)
    assert sorted(r["run"] for r in rows) == sorted(r.name for r in study.plan_runs(cfg))
    assert all(0 <= float(r["auroc"]) <= 1 for r in rows)
    for name in ("auroc_vs_ratio.png", "distances.png", "samples_infiltration.png", "samples_no_finding.png",
                 "closest_pairs_ddpm.png", "closest_pairs_gan.png", "closest_pairs_ddpm-cfg.png", "guidance.png",
                 "memorization.json"):
        assert (demo_dir / name).is_file(), name
    assert "Inception FID, KID and IS: **not computed**" in "\n".join(report)  # said, not silently dropped
    for r in rows:
        assert (demo_dir / "scores" / f"{r['run']}.npy").is_file()


def test_summary_json_has_the_issue_keys(demo_dir):
    summary = json.loads((demo_dir / "summary.json").read_text())
    assert set(summary) == {"headline", "distances", "memorization", "gate", "guidance"}
    assert [r["generator"] for r in summary["headline"]] == sorted(generators.GENERATORS)
    assert set(summary["gate"]) == {g + f for g in generators.GENERATORS for f in ("", "@f0.5")}  # every pool
    for g in summary["gate"].values():
        assert set(g) == {"usable", "reason", "warnings", "detectability", "tstr", "diversity"} and g["reason"]
        assert set(g["detectability"]) == {"auroc", "ci_low", "ci_high", "n_test"}
        assert set(g["tstr"]) == {"auroc", "ci_low", "ci_high", "n_test", "separation", "separation_p", "n_held_out"}
        assert g["detectability"]["ci_low"] <= g["detectability"]["auroc"] <= g["detectability"]["ci_high"]
    for r in summary["headline"]:
        assert set(r) == {*report.HEADLINE_KEYS, "usable"} and r["usable"] == summary["gate"][r["generator"]]["usable"]
        # an unusable generator has no verdict at all; two seeds can only be inconclusive
        assert r["verdict"] == (None if r["usable"] is False else stats.VERDICTS[3])
        assert r["seeds"] == 2 and r["generator_runs"] == 2 and r["ratio"] == 1 and r["real_fraction"] == 1
        assert "2 classifier seeds" in r["inconclusive_reason"] and r["generator_sd"] >= 0 and r["seed_sd"] >= 0
        assert r["ci_low"] <= r["diff"] <= r["ci_high"] and r["n_test_images"] == r["n_test_patients"] == 24
    for g in generators.GENERATORS:
        d = summary["distances"][g]
        assert set(d) == set(report.DISTANCE_KEYS) and d["reference"] == "heldout"
        assert d["fid"] is None and d["feature_fd"] > 0  # Inception not attempted in --quick: null, said in the report
        assert set(summary["memorization"][g]) == set(report.MEMORIZATION_KEYS)
        assert summary["memorization"][g]["false_positive_rate"] == memorization.FALSE_POSITIVE_RATE
    text = (demo_dir / "report.md").read_text()
    assert "below 2,048" in text and "KID, which is unbiased" in text


def test_every_run_of_a_real_fraction_takes_the_same_steps(demo_dir):
    rows = _rows(demo_dir)
    for frac in ("1.0", "0.5"):
        steps = {r["steps"] for r in rows if r["real_fraction"] == frac}
        assert len(steps) == 1, (frac, steps)  # ratios 0 and 1, both generators, TSTR at fraction 1
    assert {r["steps"] for r in rows if r["real_fraction"] == "1.0"} != {r["steps"] for r in rows
                                                                           if r["real_fraction"] == "0.5"}


def test_generators_are_matched_to_the_real_fraction(demo_dir):
    import data

    real = study.load_real(demo_dir / "data", 32)
    half = {Path(real.paths["train"][i]).name for i in study.real_subset(real.train_y.numpy(), 0.5)}
    copied = {p.name for p in data.list_images(demo_dir / "real_subsets" / "f0.5")}
    assert copied == half and len(half) == len(real.train_y) // 2
    for gen in ("ddpm", "gan"):
        for cls in ("infiltration", "no_finding"):
            for run in (0, 1):  # two training runs of each recipe, each with its own seed
                done = demo_dir / "generators" / f"{gen}_{cls}_f0.5_g{run}" / "done.json"
                used = json.loads(done.read_text())["config"]
                assert Path(used["data"]) == demo_dir / "real_subsets" / "f0.5" and used["class_name"] == cls
                assert used["max_steps"] == 4 and used["seed"] == run  # half the images, half of the 8 steps
    used = json.loads((demo_dir / "generators" / "ddpm-cfg_f0.5_g1" / "done.json").read_text())["config"]
    assert Path(used["data"]) == demo_dir / "real_subsets" / "f0.5" and used["class_name"] is None
    assert used["conditional"] and used["max_steps"] == 8  # one model of both classes: half of its 16 steps
    # Each run's samples in their own folder; classifier seed i trains with run i mod 2 (results.csv says which).
    for run in (0, 1):
        assert len(list((demo_dir / "synthetic" / "gan" / "f1" / f"g{run}" / "infiltration").glob("*.png"))) > 0
    rows = [r for r in _rows(demo_dir) if r["mode"] != "real"]
    assert rows and all(int(r["generator_run"]) == int(r["seed"]) % 2 for r in rows)
    assert len({r["synthetic_set"] for r in rows if r["run"].startswith("gan_r1_f1_")}) == 2  # two pools, two runs


def test_guidance_scale_is_chosen_on_validation_and_reported(demo_dir):
    for frac in ("1", "0.5"):
        table = json.loads((demo_dir / "generators" / f"ddpm-cfg_f{frac}_g0" / "guidance.json").read_text())
        assert table["grid"] == list(generators.GUIDANCE_GRID) and set(table["separation"]) == {"1", "1.5", "2", "3"}
        assert table["rule"] == generators.GUIDANCE_RULE and table["n_samples"] == generators.GUIDANCE_SAMPLES
        # the rule's choice: the best w when it beats the default, else the default (tests/test_guidance.py)
        sep = {float(w): v for w, v in table["separation"].items()}
        assert table["best"] == max(sep, key=lambda w: (sep[w], -w)) and table["default"] == generators.DEFAULT_GUIDANCE
        assert table["chosen"] == (table["best"] if table["decision"] == "the best w beats the default"
                                   else table["default"])
    chosen = json.loads((demo_dir / "generators" / "ddpm-cfg_f1_g0" / "guidance.json").read_text())["chosen"]
    text = (demo_dir / "report.md").read_text()
    assert f"DDPM-CFG samples with w = **{chosen:g}**" in text and (demo_dir / "guidance.png").is_file()
    assert json.loads((demo_dir / "summary.json").read_text())["guidance"]["chosen"] == chosen  # and which rule chose
    assert "| DDPM-CFG | infiltration |" in text  # held-out distances per generator and class


def test_held_out_reference_set_is_the_same_for_every_generator(demo_dir):
    dist = json.loads((demo_dir / "distances.json").read_text())
    assert dist["reference"].startswith("heldout")
    counts = {g: {c: (e["classes"][c]["n_real"], e["classes"][c]["n_fake"]) for c in e["classes"]}
              for g, e in dist["generators"].items()}
    # the test split only (12 a class; validation chose checkpoints and guidance), every generator the same
    assert counts["ddpm"] == counts["gan"] == counts["ddpm-cfg"] and counts["ddpm"]["infiltration"] == (12, 12)


def test_distances_embed_one_reference_for_all_generators(monkeypatch, tmp_path):
    seen = []

    def embed(model, u8):  # a stand-in feature space: 8 pixels plus noise (full rank for the covariance)
        seen.append(u8.clone())
        noise = torch.rand(len(u8), 8, generator=torch.Generator().manual_seed(len(seen)))
        return u8.reshape(len(u8), -1)[:, :8].double() + noise
    monkeypatch.setattr(classify, "embed", embed)
    val, test = phantoms(0, 20), phantoms(1, 30)
    real = study.RealData(None, None, val, torch.tensor([1, 0] * 10), test, torch.tensor([1, 0] * 15), {}, None, "")
    pools = {g: {1.0: study.Pool(phantoms(k, n), torch.tensor([1, 0] * (n // 2)), g)}
             for k, (g, n) in enumerate((("a", 40), ("b", 60), ("c", 22)), start=2)}
    cfg = study.StudyConfig(tmp_path, tmp_path, generators=(), real_fractions=(1.0,), fid_max_images=1000,
                            inception=False)
    dist = report.distances(cfg, real, pools, model=object())
    heldout = torch.cat([val, test])
    ref = [x for x in seen if any(torch.equal(x[0], h) for h in heldout)]
    assert len(ref) == 2 and len(seen) == 2 * (1 + len(pools))  # held-out images embedded once per class, for all
    for g in pools:
        assert dist["generators"][g]["n_real"] == dist["generators"][g]["n_fake"] == 22  # the smallest set, each side
    e = dist["generators"]["a"]["classes"]["infiltration"]["feature"]  # precision ... coverage beside FD and KID
    assert 0 <= e["precision"] <= 1 and 0 <= e["recall"] <= 1 and e["density"] >= 0 and 0 <= e["coverage"] <= 1
    assert report._prdc(e) == " / ".join(f"{e[k]:.2f}" for k in ("precision", "recall", "density", "coverage"))
    assert report._prdc({}) == "- / - / - / -"

    # With Inception weights (a stand-in network here): FID, KID and IS per generator, in summary.json's keys.
    import fid

    monkeypatch.setattr(fid, "load_inception", lambda weights, device: None)
    monkeypatch.setattr(fid, "inception_features", lambda net, u8, progress: (embed(None, u8), torch.rand(len(u8), 5)))
    cfg.inception = True
    dist = report.distances(cfg, real, pools, model=None)
    summary = report.summary([], dist, {})
    assert dist["inception_missing"] is None and set(summary["distances"]) == set(pools)
    assert all(v["fid"] > 0 and v["kid_mean"] is not None and v["is_mean"] >= 1 and v["feature_fd"] is None
               for v in summary["distances"].values())


def test_sampler_settings_are_checked_before_any_generator_trains(tmp_path):
    with pytest.raises(study.CLIError, match="--sample-steps must be in 1..999 for --sampler dpmpp"):
        study.StudyConfig(tmp_path, tmp_path, generators=(), sampler="dpmpp", sample_steps=1000)
    with pytest.raises(study.CLIError, match="unknown sampler 'plms'"):
        study.StudyConfig(tmp_path, tmp_path, generators=(), sampler="plms")


def test_sampling_noise_differs_per_class_and_generator(monkeypatch, tmp_path):
    seeds = {(g, c, f, k): study.noise_seed(g, c, f, k) for g in ("ddpm", "gan", "ext")
             for c in ("infiltration", "no_finding") for f in (1.0, 0.25, 0.1) for k in (0, 1, 2)}
    assert len(set(seeds.values())) == len(seeds)  # every generator run samples its own noise too
    used = []

    def fake_generate(ckpt, n, *, seed, **kw):
        used.append(seed)
        return torch.zeros(n, 1, 8, 8)
    monkeypatch.setattr(ddpm, "generate", fake_generate)
    monkeypatch.setattr(generators, "load_checkpoint", lambda path: {})
    cfg = study.StudyConfig(tmp_path, tmp_path, generators=())
    for cls in ("infiltration", "no_finding"):
        study.sample_generator(cfg, "ddpm", cls, 1.0, tmp_path / "ckpt.pt", 2, fresh=True)
    study.sample_generator(cfg, "ddpm", "no_finding", 1.0, tmp_path / "ckpt.pt", 2, fresh=True, run=2)
    assert used == [seeds["ddpm", "infiltration", 1.0, 0], seeds["ddpm", "no_finding", 1.0, 0],
                    seeds["ddpm", "no_finding", 1.0, 2]]
    assert (tmp_path / "synthetic" / "ddpm" / "f1" / "g2" / "no_finding").is_dir()


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
    for module in (ddpm_run, gan_run):
        monkeypatch.setattr(module, "train", no_generator)
    for module in (ddpm, dcgan):
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
    (["experiment", "--data", "D", "--out", "o", "--margin", "-1"], "--margin must be at least 0"),
    (["experiment", "--data", "D", "--out", "o", "--synthetic", "ldm=half"], "no no_finding/ subfolder"),
    (["experiment", "--data", "D", "--out", "o", "--synthetic", "ldm"], "expected NAME=DIR"),
    (["experiment", "--data", "D", "--out", "o", "--synthetic", "gan=half"], "not ddpm, gan"),
    (["experiment", "--data", "D", "--out", "o", "--synthetic", "x=D/test_data"], "overlaps the test split"),
    (["experiment", "--data", "D", "--out", "file"], "is a file, not a folder"),
    (["experiment", "--data", "D", "--out", "D/train_data/run"], "inside a split folder"),
    (["experiment", "--data", "D", "--out", "o", "--generator-runs", "0"], "--generator-runs must be at least 1"),
    (["experiment", "--data", "D", "--out", "o", "--generator-runs", "-2"], "--generator-runs must be at least 1"),
    (["experiment", "--data", "D", "--out", "o", "--generator-runs", "1.5"], "argument --generator-runs: not a whole"),
    (["experiment", "--data", "D", "--out", "o", "--generators", "gan", "--seeds", "2"],
     "--generator-runs 3 is more than --seeds 2: every generator run needs a classifier seed"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys, tmp_path):
    for d in ("half/infiltration", "D/train_data", "D/validation_data", "D/test_data/infiltration",
              "D/test_data/no_finding"):
        (tmp_path / d).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / d / "a.png")
    (tmp_path / "file").write_text("mine")
    def place(a: str) -> str:  # o, file, half and D name paths under tmp_path
        if a in ("o", "file"):
            return str(tmp_path / a)
        return a if a.startswith("-") else a.replace("half", str(tmp_path / "half")).replace("D", str(tmp_path / "D"))
    argv = [place(a) for a in argv]
    code, _, err = cli(capsys, *argv)  # argparse's own refusals (a non-integer) exit through SystemExit
    err = err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_cli_error_has_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, "main.py", "memorization", "--train", str(tmp_path), "--synthetic",
                        str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.startswith("error:")


# --------------------------------------------------------------------------- external samples and changed inputs


def _experiment(data_dir: Path, out: Path, *extra) -> list[str]:
    return ["experiment", "--data", str(data_dir), "--out", str(out), "--generators", "", "--ratios", "0,1",
            "--real-fractions", "1", "--seeds", "1", "--classifier", "small", "--epochs", "1", "--no-tstr",
            "--bootstrap", "100", "--device", "cpu", *extra]


def test_external_samples_guard_and_changed_data(phantom_data, tmp_path, capsys):
    ext = tmp_path / "ldm"
    save_pngs(ext / "infiltration", phantoms(5, 16))
    save_pngs(ext / "no_finding", phantoms(6, 16))
    out = tmp_path / "study"
    # A copy of a held-out image among the external samples: refused before any work.
    leaked = sorted((phantom_data / "validation_data" / "infiltration").glob("*.png"))[0]
    shutil.copyfile(leaked, ext / "infiltration" / "leak.png")
    assert main.main(_experiment(phantom_data, out, "--synthetic", f"ldm={ext}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "leak.png is a copy" in err[0] and leaked.name in err[0]
    assert not (out / "results.csv").exists() and not (out / "generators").exists()
    (ext / "infiltration" / "leak.png").unlink()

    # The external generator goes through the protocol and the report like a trained one.
    assert main.main(_experiment(phantom_data, out, "--synthetic", f"ldm={ext}")) == 0
    capsys.readouterr()
    rows = _rows(out)
    assert sorted(r["run"] for r in rows) == ["ldm_r1_f1_s0", "real_f1_s0"]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["generator"] for r in summary["headline"]] == ["ldm"] and set(summary["memorization"]) == {"ldm"}
    assert summary["headline"][0]["verdict"].startswith("inconclusive")  # one seed
    assert "cannot take part in the matched-fraction cells" in (out / "report.md").read_text()
    assert summary["headline"][0]["generator_runs"] == 1 and summary["headline"][0]["generator_sd"] is None

    # The study records its generator runs per cell: another number is refused in one line, nothing mixed.
    before = (out / "results.csv").read_bytes()
    assert main.main(_experiment(phantom_data, out, "--synthetic", f"ldm={ext}", "--generator-runs", "2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "of 3 generator run(s) per cell, not 2" in err[0] and "--generator-runs 3" in err[0]
    assert (out / "results.csv").read_bytes() == before

    # Issue 10 case 1: the data changes under the study (same names, new pixels): refused, nothing redone.
    before = (out / "results.csv").read_bytes()
    victim = sorted((phantom_data / "test_data" / "infiltration").glob("*.png"))[0]
    Image.fromarray(phantoms(9, 1)[0].numpy()).save(victim)
    assert main.main(_experiment(phantom_data, out, "--synthetic", f"ldm={ext}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the test split changed" in err[0]
    assert (out / "results.csv").read_bytes() == before


def test_a_second_study_in_the_same_folder_is_refused(phantom_data, tmp_path, capsys):

    out = tmp_path / "study"
    with run_lock(out, "study"):
        assert main.main(_experiment(phantom_data, out, "--synthetic", f"x={phantom_data / 'train_data'}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in use by another study" in err[0]


def test_gate_marks_noise_unusable_and_memorisation_flags_a_copying_cheat(tmp_path, capsys):
    root = tmp_path / "data"
    assert main.main(["extract", "--phantoms", "120", "--out", str(root), "--size", "32", "--seed", "0"]) == 0
    g = torch.Generator().manual_seed(0)
    noise = tmp_path / "noise"
    for cls in ("infiltration", "no_finding"):
        save_pngs(noise / cls, torch.randint(0, 256, (20, 32, 32), generator=g, dtype=torch.uint8))
    out = tmp_path / "study"
    # "cheat": the real training images themselves, a generator that copies (copies of held-out
    # images are refused outright: test_external_samples_guard_and_changed_data).
    assert main.main(_experiment(root, out, "--synthetic", f"noise={noise}", "--synthetic",
                                 f"cheat={root / 'train_data'}")) == 0
    capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["gate"]["noise"]["usable"] is False and "no class signal" in summary["gate"]["noise"]["reason"]
    assert summary["gate"]["cheat"]["usable"] is True  # real images pass the gate...
    assert summary["memorization"]["cheat"]["flagged_fraction"] == 1.0  # ...and the memorisation check flags them
    assert {r["generator"]: r["usable"] for r in summary["headline"]} == {"noise": False, "cheat": True}
    assert {r["generator"]: r["verdict"] for r in summary["headline"]}["noise"] is None  # unusable: no verdict
    assert summary["memorization"]["cheat"]["p_value"] < summary["memorization"]["cheat"]["false_positive_rate"]
    lines = (out / "report.md").read_text().splitlines()
    assert lines[0].startswith("**Unusable generator: NOISE.**") and "say nothing about the model" in lines[0]
    assert lines[1].startswith("**Memorisation, CHEAT**")
    answer = next(line for line in lines if line.startswith("On this data"))
    assert "NOISE (" in answer and "no verdict, its generator failed the usability gate" in answer
    assert "| NOISE (unusable) |" in "\n".join(lines)  # kept in the tables, marked
    cached = json.loads((out / "gate.json").read_text())
    assert set(cached) == {"noise", "cheat"} and all(e["seconds"] >= 0 for e in cached.values())
