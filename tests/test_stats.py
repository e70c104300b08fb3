"""The study's statistics (stats.py): the batch AUROC against classify.auroc,
the patient cluster bootstrap against report's image bootstrap, Holm on a
textbook example, the verdict rule's cases, the binomial helper, and a
simulation of whole studies that measures the rule's false-claim rate when
augmentation does nothing and its power when it adds 0.05 AUROC.

The measured rates are printed on every run (capture is switched off for them)."""

from dataclasses import dataclass, replace

import numpy as np
import pytest
from scipy.stats import binomtest

import classify
from study import stats

N_BOOT = 300  # per simulated study: enough for a standard error, fast enough for 200 studies


# --------------------------------------------------------------------------- a simulated study


@dataclass(frozen=True)
class StudyModel:
    """Scores of one classifier run on a test split of clustered patients:

        score_i = (signal + training_sd * z_run) * label_i + patient_j + image_i + run_noise_sd * e_run,i

    A run's learned signal and its per-image noise change with the seed (training
    noise, test AUROC SD ~0.02 across seeds); patient and image effects do not
    (every run sees the same hard and easy cases). Augmentation adds `shift` to
    the signal of the augmented runs; with shift 0 an augmented run is just
    another training run."""

    patients: int = 120  # 2-3 images each: ~300 test images
    positive_prone: float = 0.4  # share of patients whose images are mostly positive
    signal: float = 1.2  # AUROC ~0.83
    patient_sd: float = 0.7
    image_sd: float = 0.5
    training_sd: float = 0.07
    run_noise_sd: float = 0.45


def simulate_study(model: StudyModel, rng: np.random.Generator, n_seeds: int, shift: float = 0.0):
    """(real (S, n), augmented (S, n), labels (n,), patients (n,)) for one study."""
    patients = np.repeat(np.arange(model.patients), rng.integers(2, 4, model.patients))
    prone = rng.random(model.patients) < model.positive_prone
    labels = (rng.random(patients.size) < np.where(prone, 0.75, 0.1)[patients]).astype(int)
    shared = model.patient_sd * rng.standard_normal(model.patients)[patients] + model.image_sd * rng.standard_normal(
        patients.size)

    def run(signal):
        learned = signal + model.training_sd * rng.standard_normal()
        return learned * labels + shared + model.run_noise_sd * rng.standard_normal(patients.size)

    real = np.stack([run(model.signal) for _ in range(n_seeds)])
    aug = np.stack([run(model.signal + shift) for _ in range(n_seeds)])
    return real, aug, labels, patients


def claims(verdict: str) -> bool:
    return verdict in ("benefit", "harm")


def image_bootstrap_claims(real, aug, labels, seed) -> bool:
    """The first report's rule: the seed-mean difference's 95% percentile interval
    over an image bootstrap (patients ignored, seeds fixed) excludes 0."""
    counts = stats.cluster_bootstrap_counts(labels, np.arange(labels.size), N_BOOT, seed)
    boot = np.mean([stats.batch_auroc(a, labels, counts) - stats.batch_auroc(r, labels, counts)
                    for r, a in zip(real, aug)], axis=0)
    low, high = np.percentile(boot, [2.5, 97.5])
    return bool(low > 0 or high < 0)


def run_studies(n_studies: int, n_seeds: int, shift: float, model: StudyModel = StudyModel()):
    """Verdicts of the rule, and whether the old rule claimed an effect, per study."""
    verdicts, old = [], []
    for k in range(n_studies):
        real, aug, labels, patients = simulate_study(model, np.random.default_rng([n_seeds, k]), n_seeds, shift)
        (row,) = stats.compare_generators({"ddpm": (real, aug)}, labels, patients, n_boot=N_BOOT, seed=k)
        verdicts.append(row["verdict"])
        old.append(image_bootstrap_claims(real, aug, labels, seed=k))
    return verdicts, np.mean(old)


def true_effect(model: StudyModel, shift: float) -> float:
    """Expected AUROC(augmented) - AUROC(real-only), from one very large study."""
    real, aug, labels, _ = simulate_study(replace(model, patients=4000), np.random.default_rng(123), 100, shift)
    return float(np.mean([classify.auroc(a, labels) - classify.auroc(r, labels) for r, a in zip(real, aug)]))


# --------------------------------------------------------------------------- AUROC of a batch of resamples


def test_batch_auroc_is_classify_auroc_of_each_resample():
    rng = np.random.default_rng(0)
    labels = (rng.random(80) < 0.4).astype(int)
    scores = np.round(rng.standard_normal(80) + labels, 1)  # rounded: many ties, across classes too
    patients = np.repeat(np.arange(40), 2)
    counts = stats.cluster_bootstrap_counts(labels, patients, 25, seed=1)
    got = stats.batch_auroc(scores, labels, counts)
    for b in range(25):
        want = classify.auroc(np.repeat(scores, counts[b]), np.repeat(labels, counts[b]))
        assert got[b] == pytest.approx(want, abs=1e-12)
    assert stats.batch_auroc(scores, labels, np.ones((1, 80), int))[0] == pytest.approx(
        classify.auroc(scores, labels), abs=1e-12)


def test_batch_auroc_is_nan_without_a_class():
    counts = np.array([[1, 1, 0, 0], [0, 0, 2, 1]])  # first resample: positives only
    got = stats.batch_auroc([0.9, 0.8, 0.1, 0.5], [1, 1, 0, 0], counts)
    assert np.isnan(got[0]) and np.isnan(got[1])


# --------------------------------------------------------------------------- cluster bootstrap over patients


def test_cluster_bootstrap_is_the_image_bootstrap_with_one_image_per_patient():
    # One image per patient: the patient bootstrap draws exactly classify.stratified_bootstrap_indices' images.
    rng = np.random.default_rng(2)
    labels = (rng.random(60) < 0.3).astype(int)
    scores = rng.standard_normal(60) + labels
    patients = np.array([f"p{i:03d}" for i in rng.permutation(60)])  # ids in no particular order
    counts = stats.cluster_bootstrap_counts(labels, patients, 200, seed=7)
    idx = classify.stratified_bootstrap_indices(labels, 200, seed=7)
    assert (counts == np.stack([np.bincount(i, minlength=60) for i in idx])).all()
    np.testing.assert_allclose(stats.batch_auroc(scores, labels, counts),
                               classify.bootstrap_aurocs(scores, idx, int(labels.sum())), atol=1e-12)


def test_cluster_bootstrap_draws_whole_patients_within_strata():
    rng = np.random.default_rng(3)
    patients = np.repeat(np.arange(50), rng.integers(1, 5, 50))
    labels = (rng.random(patients.size) < 0.3).astype(int)
    counts = stats.cluster_bootstrap_counts(labels, patients, 100, seed=0)
    first = np.unique(patients, return_index=True)[1]
    drawn = counts[:, first]  # (B, patients): times each patient is drawn
    assert (counts == drawn[:, patients]).all()  # all of a drawn patient's images, as often as the patient
    has_pos = np.bincount(patients, weights=labels) > 0
    assert (drawn[:, has_pos].sum(axis=1) == has_pos.sum()).all()  # stratum sizes kept
    assert (drawn[:, ~has_pos].sum(axis=1) == (~has_pos).sum()).all()
    assert not np.isnan(stats.batch_auroc(rng.random(patients.size), labels, counts)).any()


def test_cluster_bootstrap_needs_both_strata():
    with pytest.raises(ValueError, match="positive image"):
        stats.cluster_bootstrap_counts([1, 0, 1, 0], [0, 0, 1, 1], 10)  # every patient has a positive


# --------------------------------------------------------------------------- the paired difference


def test_paired_difference_components_and_consistency():
    real, aug, labels, patients = simulate_study(StudyModel(), np.random.default_rng(4), 5)
    d = stats.paired_difference(real, aug, labels, stats.cluster_bootstrap_counts(labels, patients, 2000), seed=1)
    per_seed = [classify.auroc(a, labels) - classify.auroc(r, labels) for r, a in zip(real, aug)]
    assert d.diff == pytest.approx(np.mean(per_seed), abs=1e-12)
    assert d.seed_sd == pytest.approx(np.std(per_seed, ddof=1), abs=1e-12)
    # The two-level variance adds the components, seed_sd^2 / S + test_sd^2, and counts the
    # seed x patient interaction once more (Owen's pigeonhole bootstrap is conservative).
    assert 0.95 < d.se ** 2 / (d.seed_sd ** 2 / 5 + d.test_sd ** 2) < 1.5
    assert 4 <= d.df < np.inf
    # The interval at level 1 - p just reaches 0: the p-value and the interval agree.
    low, high = d.interval(d.p_value())
    assert min(abs(low), abs(high)) == pytest.approx(0, abs=1e-9)


def test_one_seed_never_claims_an_effect():
    real, aug, labels, patients = simulate_study(StudyModel(), np.random.default_rng(5), 1, shift=2.0)
    (row,) = stats.compare_generators({"gan": (real, aug)}, labels, patients, n_boot=N_BOOT)
    assert row["ci_low"] > 0.05  # the test split alone resolves the effect...
    assert row["verdict"].startswith("inconclusive")  # ...but training noise is unmeasured
    assert row["seeds"] == 1 and row["seed_sd"] is None


def test_clear_effects_and_a_clear_zero():
    model = StudyModel()
    real, aug, labels, patients = simulate_study(model, np.random.default_rng(6), 5, shift=1.0)
    rows = stats.compare_generators({"ddpm": (real, aug), "gan": (aug, real)}, labels, patients, n_boot=N_BOOT)
    assert [r["verdict"] for r in rows] == ["benefit", "harm"]
    quiet = replace(model, training_sd=0.002, run_noise_sd=0.02)  # every run nearly the same classifier
    real, aug, labels, patients = simulate_study(quiet, np.random.default_rng(7), 10)
    (row,) = stats.compare_generators({"ddpm": (real, aug)}, labels, patients, n_boot=N_BOOT)
    assert row["verdict"] == "equivalent within the margin", row


# --------------------------------------------------------------------------- Holm, the verdict, the headline rows


def test_holm_textbook_example():
    # Four hypotheses, p = 0.01, 0.04, 0.03, 0.005 (Wikipedia, "Holm-Bonferroni method"):
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max.
    np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    assert (stats.holm([0.01, 0.04, 0.03, 0.005]) < 0.05).tolist() == [True, False, False, True]
    np.testing.assert_allclose(stats.holm([0.2]), [0.2])  # one comparison: nothing to adjust
    np.testing.assert_allclose(stats.holm([0.6, 0.3]), [0.6, 0.6])  # capped at 1 only when needed


def test_verdict_categories():
    v = stats.verdict
    assert v(0.03, 0.08, 0.001, seeds=5) == "benefit"
    assert v(-0.08, -0.03, 0.001, seeds=5) == "harm"
    assert v(-0.01, 0.015, 0.7, seeds=5) == "equivalent within the margin"
    assert v(0.005, 0.015, 0.001, seeds=5) == "equivalent within the margin"  # real but not worth having
    assert v(-0.01, 0.05, 0.3, seeds=5) == "inconclusive (more seeds or a larger test set needed)"
    assert v(0.01, 0.05, 0.06, seeds=5).startswith("inconclusive")  # Holm did not reject
    assert v(0.03, 0.08, 0.001, seeds=1).startswith("inconclusive")
    assert v(-0.01, 0.01, 0.9, seeds=1).startswith("inconclusive")


def test_compare_generators_rows():
    real, aug, labels, patients = simulate_study(StudyModel(), np.random.default_rng(8), 3)
    big = simulate_study(StudyModel(), np.random.default_rng(8), 3, shift=1.0)[1]
    rows = stats.compare_generators({"ddpm": (real, aug), "gan": (real, big)}, labels, patients, n_boot=N_BOOT)
    assert {k for r in rows for k in r} == {
        "generator", "diff", "ci_low", "ci_high", "ci_level", "p_value", "p_adjusted", "verdict", "seeds",
        "n_test_images", "n_test_patients", "seed_sd", "test_sd"}
    assert [r["generator"] for r in rows] == ["ddpm", "gan"]
    np.testing.assert_allclose([r["p_adjusted"] for r in rows], stats.holm([r["p_value"] for r in rows]))
    assert [r["ci_level"] for r in rows] == pytest.approx([0.95, 0.975])  # gan's p is the smaller: tested first
    assert rows[0]["n_test_images"] == labels.size and rows[0]["n_test_patients"] == np.unique(patients).size


# --------------------------------------------------------------------------- the memorisation check


def test_binomial_greater_p():
    want = binomtest(7, 200, 0.01, alternative="greater").pvalue
    assert stats.binomial_greater_p(7, 200, 0.01) == pytest.approx(want)
    assert stats.binomial_greater_p(10, 10, 0.3) == pytest.approx(0.3 ** 10)  # P(X >= n) = p0^n
    assert stats.binomial_greater_p(0, 50, 0.1) == 1.0  # nothing flagged: no evidence
    assert stats.binomial_greater_p(0, 50, 0.0) == 1.0
    assert stats.binomial_greater_p(1, 50, 0.0) == 0.0  # chance flags nothing, one was flagged
    assert stats.binomial_greater_p(3, 50, 1.0) == 1.0
    with pytest.raises(ValueError):
        stats.binomial_greater_p(5, 4, 0.1)


# --------------------------------------------------------------------------- the rule, proved by simulation


def test_simulated_training_noise_is_as_specified():
    real, _, labels, _ = simulate_study(StudyModel(), np.random.default_rng(9), 200)
    sd = np.std([classify.auroc(r, labels) for r in real], ddof=1)
    assert 0.015 < sd < 0.025, sd


@pytest.mark.parametrize("n_seeds", [3, 5])
def test_null_studies_rarely_claim_an_effect(n_seeds, capsys):
    verdicts, old_rate = run_studies(200, n_seeds, shift=0.0)
    rate = np.mean([claims(v) for v in verdicts])
    with capsys.disabled():
        print(f"\nnull, {n_seeds} seeds: the rule claims benefit/harm in {rate:.1%} of 200 studies "
              f"(image bootstrap: {old_rate:.1%})")
    assert rate <= 0.07
    assert old_rate > 0.10  # the simulation is hard enough to catch the first report's rule


def test_power_for_a_true_effect_of_005(capsys):
    shift = 0.29  # measured below: +0.050 AUROC
    effect = true_effect(StudyModel(), shift)
    assert 0.045 < effect < 0.055, effect
    verdicts, _ = run_studies(200, 5, shift)
    power = np.mean([v == "benefit" for v in verdicts])
    with capsys.disabled():
        print(f"\ntrue effect {effect:+.3f} AUROC, 5 seeds: the rule finds benefit in {power:.1%} of 200 studies "
              f"(harm in {np.mean([v == 'harm' for v in verdicts]):.1%})")
    assert power > 0.5
