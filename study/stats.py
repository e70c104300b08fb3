"""The statistics of the augmentation study: does training on real + synthetic
images ("augmented") change test AUROC over training on real images only
("real-only"), and how sure can we be?

Every classifier of a study, for every training seed, is scored on the same
real test split. Two kinds of noise move a measured AUROC difference:
training noise (another seed trains another classifier) and test sampling
(another test split holds other patients). The first report resampled test
IMAGES only (classify.stratified_bootstrap_indices): it ignored training noise and the fact
that a patient's ~2.5 images are not independent, and a review found it
claiming an effect in 37-63% of simulated null studies (20% in the milder
simulation of tests/test_stats.py, over 80% where training noise dominates).
This module replaces it:

1. a stratified cluster bootstrap over patients (Davison and Hinkley 1997,
   Bootstrap Methods and their Application, sec. 3.8; for ROC curves of
   clustered data, Obuchowski 1997, Biometrics 53:567);
2. a two-level bootstrap of the paired difference, seeds then patients: Owen's
   (2007, Ann. Appl. Stat. 1:386) pigeonhole bootstrap for a crossed
   seeds x patients design, read against Student's t with Welch-Satterthwaite
   degrees of freedom, since 3-5 seeds are too few for a percentile interval;
3. Holm's (1979, Scand. J. Statist. 6:65) step-down adjustment across the
   generators compared;
4. the verdict rule: benefit, harm, equivalent within the margin, inconclusive;
5. a one-sided binomial test for the memorisation check.

AUROC is the Mann-Whitney statistic with ties counting one half, as in
classify.auroc; `batch_auroc` computes it for a whole batch of resamples at
once and is checked against classify.auroc and classify.bootstrap_aurocs in
tests/test_stats.py, where a simulation of null and true-effect studies also
measures the rule's false-claim rate and power.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

MARGIN = 0.02  # the smallest AUROC difference worth having: the equivalence margin
ALPHA = 0.05  # family-wise error rate across the generators compared
VERDICTS = ("benefit", "harm", "equivalent within the margin",
            "inconclusive (more seeds or a larger test set needed)")


# --------------------------------------------------------------------------- AUROC of a batch of resamples


def batch_auroc(scores, labels, counts) -> np.ndarray:
    """AUROC of each of B resamples of one run's test scores, a resample given by
    how many times it draws each image, counts (B, n). Mann-Whitney with ties
    counting one half, i.e. classify.auroc on the resample's images:

        AUROC_b = sum_{i pos, j neg} c_bi c_bj ([s_i > s_j] + [s_i = s_j] / 2) / (P_b N_b)

    with P_b, N_b the positives and negatives drawn. The negatives are sorted
    once; a positive beats the negatives below it and half of those tied with
    it, which is the mean of two cumulative counts (strictly below, and below
    or tied) read at its place in the sorted negatives: O(B n), no sort per
    resample. NaN where a resample lacks a class, as classify.auroc."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    c = np.asarray(counts)
    neg, pos = np.flatnonzero(~y), np.flatnonzero(y)
    neg = neg[np.argsort(s[neg], kind="stable")]
    below = np.cumsum(c[:, neg], axis=1)  # (B, N): negatives drawn up to the k-th smallest
    below = np.concatenate([np.zeros_like(below[:, :1]), below], axis=1)  # (B, N + 1), column k: below the k-th
    lo = np.searchsorted(s[neg], s[pos], "left")  # per positive: negatives strictly below it
    hi = np.searchsorted(s[neg], s[pos], "right")  # ... below it or tied with it
    c_pos = c[:, pos]  # (B, P)
    twice_wins = (c_pos * (below[:, lo] + below[:, hi])).sum(axis=1)  # exact in integers
    with np.errstate(invalid="ignore", divide="ignore"):
        return twice_wins / (2.0 * c_pos.sum(axis=1) * below[:, -1])


# --------------------------------------------------------------------------- cluster bootstrap over patients


def cluster_bootstrap_counts(labels, patients, n_boot: int, seed: int = 0) -> np.ndarray:
    """(B, n) how many times each test image is drawn by each of n_boot resamples
    of a stratified cluster bootstrap: PATIENTS are drawn with replacement, each
    with all of their images, since a patient's images share anatomy, scanner and
    disease and are not independent (Davison and Hinkley 1997, sec. 3.8).

    Strata: patients with at least one positive image, and patients with none;
    each resample draws as many patients from each stratum as it holds. So every
    resample has a positive and a negative image (its AUROC is defined) and the
    same number of "positive" patients, the analogue of classify.stratified_bootstrap_indices
    keeping the class counts. With one image per patient it IS that bootstrap,
    draw for draw: the same generator calls, positive stratum first, patients in
    the order of their first image."""
    y = np.asarray(labels).ravel().astype(bool)
    _, first, patient = np.unique(np.asarray(patients).ravel(), return_index=True, return_inverse=True)
    if patient.size != y.size:
        raise ValueError(f"{y.size} labels but {patient.size} patient ids")
    has_pos = np.bincount(patient, weights=y, minlength=first.size) > 0
    by_first = np.argsort(first, kind="stable")  # patients in the order of their first image
    strata = (by_first[has_pos[by_first]], by_first[~has_pos[by_first]])
    if min(s.size for s in strata) == 0:
        raise ValueError("the test split needs a patient with a positive image and a patient with none")
    rng = np.random.default_rng(seed)
    n_patients = first.size
    rows = np.arange(n_boot)[:, None] * n_patients  # one bincount for the whole batch
    per_patient = np.zeros((n_boot, n_patients), dtype=np.int64)
    for stratum in strata:
        drawn = stratum[rng.choice(stratum.size, (n_boot, stratum.size))]
        per_patient += np.bincount((drawn + rows).ravel(), minlength=n_boot * n_patients).reshape(n_boot, -1)
    return per_patient[:, patient]


# --------------------------------------------------------------------------- the paired difference: seeds, patients


@dataclass(frozen=True)
class PairedDifference:
    """AUROC(augmented) - AUROC(real-only), mean over seeds, and its noise."""

    diff: float  # mean over seeds of the per-seed paired difference, full test split
    se: float  # its standard error: SD of the two-level bootstrap replicates (test_sd with one seed)
    df: float  # degrees of freedom of se (Welch-Satterthwaite); inf with one seed
    seed_sd: float  # SD across seeds of the per-seed difference; NaN with one seed
    test_sd: float  # SD of the seed-mean difference over patient resamples, seeds fixed
    seeds: int

    def p_value(self) -> float:
        """Two-sided p-value of "difference = 0": t = diff / se against Student's t(df)."""
        if self.se == 0:
            return float(self.diff == 0)
        return float(2 * sps.t.sf(abs(self.diff) / self.se, self.df))

    def interval(self, alpha: float) -> tuple[float, float]:
        """(1 - alpha) interval diff -/+ t(df, 1 - alpha/2) se; it excludes 0 exactly when p < alpha."""
        half = float(sps.t.ppf(1 - alpha / 2, self.df)) * self.se
        return self.diff - half, self.diff + half


def welch_satterthwaite_df(u_seed: float, df_seed: int, u_test: float) -> float:
    """Degrees of freedom of a variance u_seed + u_test whose first part is
    estimated from df_seed degrees of freedom and whose second is taken as known
    (Satterthwaite 1946): (u_seed + u_test)^2 / (u_seed^2 / df_seed)."""
    return float("inf") if u_seed == 0 else (u_seed + u_test) ** 2 / (u_seed ** 2 / df_seed)


def paired_difference(real_scores, aug_scores, labels, counts, seed: int = 0) -> PairedDifference:
    """Two-level bootstrap of the seed-mean AUROC difference (augmented - real-only).

    real_scores, aug_scores: (S, n) test scores, row s of each from training seed s
    (the pair stays together: same seed, same real data, same test images);
    counts: (B, n) patient resamples from cluster_bootstrap_counts.

    Replicate b draws S seeds with replacement and takes patient resample b for
    all of them: the mean over drawn seeds of AUROC_aug - AUROC_real on resample b.
    Seeds and patients are crossed (every run scores every patient); resampling
    both independently is Owen's (2007) pigeonhole bootstrap, whose variance is
    about seed_sd^2 / S + test_sd^2 plus the seed x patient interaction counted
    once more: conservative where training noise varies image by image, as it
    does for real networks. Two small-sample corrections, both
    for the seed level, where only 3-5 values are resampled:
    (i) the per-seed deviations from the seed mean are inflated by sqrt(S / (S - 1)),
    so the seed level contributes seed_sd^2 / S: the bootstrap variance of a
    mean of S values is only (S - 1) / S of that, two thirds with 3 seeds;
    (ii) the interval and p-value read diff / se against Student's t, not the
    replicates' percentiles: a bootstrap mean of S values has near-normal tails,
    while the honest reference for S = 3 is t(2), whose 97.5% point is 4.30, not
    1.96. The degrees of freedom are Welch-Satterthwaite's: S - 1 for the seed
    component, infinite for the test one (hundreds of patients), so df runs from
    S - 1, when seed noise dominates, to infinity, when test sampling does.
    In simulated null studies where training noise dominates, percentile
    intervals claimed an effect in 22% (3 seeds) and 14% (5 seeds) of 1,000
    studies, this rule in 6-7% (tests/test_stats.py has the simulation).
    With one seed there is no seed level: se = test_sd, training noise left out."""
    real = np.atleast_2d(np.asarray(real_scores, dtype=np.float64))
    aug = np.atleast_2d(np.asarray(aug_scores, dtype=np.float64))
    if real.shape != aug.shape:
        raise ValueError(f"real-only scores {real.shape} but augmented {aug.shape}: pair the seeds")
    if real.shape[1] != np.asarray(labels).size:
        raise ValueError(f"{real.shape[1]} scores per run but {np.asarray(labels).size} test labels")
    n_seeds = real.shape[0]
    full = np.ones((1, real.shape[1]))
    per_seed = np.array([batch_auroc(a, labels, full)[0] - batch_auroc(r, labels, full)[0] for r, a in zip(real, aug)])
    boot = np.stack([batch_auroc(a, labels, counts) - batch_auroc(r, labels, counts)
                     for r, a in zip(real, aug)])  # (S, B): seed s on patient resample b
    seed_mean = boot.mean(axis=0)  # (B,) seeds fixed: test sampling only
    test_sd = float(seed_mean.std(ddof=1))
    if n_seeds == 1:
        return PairedDifference(float(per_seed[0]), test_sd, float("inf"), float("nan"), test_sd, 1)
    inflated = seed_mean + np.sqrt(n_seeds / (n_seeds - 1)) * (boot - seed_mean)
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, n_seeds, (n_seeds, boot.shape[1]))  # (S, B) seeds drawn for each replicate
    replicates = inflated[drawn, np.arange(boot.shape[1])].mean(axis=0)
    seed_sd = float(per_seed.std(ddof=1))
    df = welch_satterthwaite_df(seed_sd ** 2 / n_seeds, n_seeds - 1, test_sd ** 2)
    return PairedDifference(float(per_seed.mean()), float(replicates.std(ddof=1)), df, seed_sd, test_sd, n_seeds)


# --------------------------------------------------------------------------- several generators: Holm, then the verdict


def holm(p_values) -> np.ndarray:
    """Holm's (1979) step-down adjusted p-values: sort p ascending, multiply the
    k-th smallest (k = 1..m) by m - k + 1, carry the running maximum forward,
    cap at 1. Rejecting where adjusted p < alpha keeps the chance of any false
    claim among the m comparisons below alpha, whatever their dependence (the
    generators share one real-only baseline, so they are dependent)."""
    p = np.asarray(p_values, dtype=np.float64).ravel()
    order = np.argsort(p, kind="stable")
    stepped = np.minimum(1.0, (p.size - np.arange(p.size)) * p[order])
    adjusted = np.empty_like(p)
    adjusted[order] = np.maximum.accumulate(stepped)
    return adjusted


def verdict(ci_low: float, ci_high: float, p_adjusted: float, seeds: int,
            margin: float = MARGIN, alpha: float = ALPHA) -> str:
    """One of VERDICTS, for a comparison whose interval is [ci_low, ci_high] (at
    the level Holm tests it, see compare_generators), in this order:

    - seeds < 2: inconclusive, always: training noise is unmeasured, so the
      interval covers test sampling only;
    - "equivalent within the margin": -margin < ci_low and ci_high < margin. A
      (1 - a) interval inside the margin is Schuirmann's (1987) two one-sided
      tests at level a/2 each. Checked before benefit and harm: the margin is
      the smallest change worth having, so a change known to be smaller is
      reported as equivalent even where it is nonzero;
    - "benefit": p_adjusted < alpha and ci_low > 0;
    - "harm": p_adjusted < alpha and ci_high < 0;
    - otherwise inconclusive: more seeds or a larger test set needed."""
    if seeds < 2:
        return VERDICTS[3]
    if -margin < ci_low and ci_high < margin:
        return VERDICTS[2]
    if p_adjusted < alpha and ci_low > 0:
        return VERDICTS[0]
    if p_adjusted < alpha and ci_high < 0:
        return VERDICTS[1]
    return VERDICTS[3]


def compare_generators(runs: dict, labels, patients, margin: float = MARGIN, alpha: float = ALPHA,
                       n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """The study's answer, one dict per generator (the summary.json headline).

    runs: {generator: (real_scores, aug_scores)}, each (S, n) test scores with
    row s from seed s; labels, patients: (n,) test labels and patient ids.
    Every generator is scored on the same patient resamples and seed draws.

    Keys: generator; diff (seed-mean AUROC difference); ci_low, ci_high, ci_level
    (the interval at the level Holm tests it: 1 - alpha / (m - k + 1) for the
    k-th smallest p of m, so it excludes 0 exactly when Holm rejects at its
    step); p_value, p_adjusted (Holm); verdict; seeds; n_test_images;
    n_test_patients; seed_sd (None with one seed); test_sd."""
    counts = cluster_bootstrap_counts(labels, patients, n_boot, seed)
    names = list(runs)
    diffs = [paired_difference(*runs[g], labels, counts, seed=seed + 1) for g in names]
    p = np.array([d.p_value() for d in diffs])
    p_adj = holm(p)
    step = np.empty(len(names), dtype=int)
    step[np.argsort(p, kind="stable")] = np.arange(len(names))
    out = []
    for g, d, pi, pa, k in zip(names, diffs, p, p_adj, step):
        level = alpha / (len(names) - k)
        low, high = d.interval(level)
        out.append(dict(generator=g, diff=d.diff, ci_low=low, ci_high=high, ci_level=1 - level,
                        p_value=float(pi), p_adjusted=float(pa),
                        verdict=verdict(low, high, float(pa), d.seeds, margin, alpha),
                        seeds=d.seeds, n_test_images=int(np.asarray(labels).size),
                        n_test_patients=int(np.unique(np.asarray(patients)).size),
                        seed_sd=None if d.seeds < 2 else d.seed_sd, test_sd=d.test_sd))
    return out


# --------------------------------------------------------------------------- the memorisation check


def binomial_greater_p(k: int, n: int, p0: float) -> float:
    """One-sided exact binomial p-value P(X >= k), X ~ Binomial(n, p0): is the
    rate k / n of synthetic images flagged as near-copies of training images
    above the chance rate p0 (that of held-out real images)? scipy's binomtest,
    alternative="greater". Edge cases in closed form: k = 0 is no evidence
    (p = 1); with p0 = 0 chance flags nothing, so any k > 0 gives p = 0."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if not 0 <= p0 <= 1:
        raise ValueError(f"chance rate p0={p0} is not a probability")
    if k == 0 or p0 == 1:
        return 1.0
    if p0 == 0:
        return 0.0
    return float(sps.binomtest(k, n, p0, alternative="greater").pvalue)
