"""The statistics of the augmentation study: does training on real + synthetic images
("augmented") change test AUROC over real-only, and how sure can we be?

A measured AUROC difference moves with three kinds of noise, in a nested-then-crossed
design: the generator's own training (K runs of one recipe, each with its own seed and
sampling noise), the classifier's training (seeds; seed i uses generator run i mod K) and
the test split's patients (every run scores every patient). The interval resamples them
in that order: generator runs with replacement (Davison and Hinkley 1997, Bootstrap
Methods and their Application, sec. 3.8), patients crossed with them (Owen 2007, Ann.
Appl. Stat. 1:386), read against Student's t; Holm (1979, Scand. J. Statist. 6:65)
adjusts across generators; `verdict` names the result. AUROC is the Mann-Whitney
statistic with ties counting one half, as classify.auroc. docs/experiment.md gives the
reasoning, the simulated error rates and the power.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import stats as sps

MARGIN = 0.02  # the smallest AUROC difference worth having: the equivalence margin
ALPHA = 0.05  # family-wise error rate across the generators compared
MIN_SEEDS = 3  # fewer classifier seeds: the verdict is inconclusive
MIN_GENERATOR_RUNS = 2  # fewer generator training runs: likewise
DF_BOUND = 0.25  # df are read from the top-level variance's upper 1 - DF_BOUND confidence bound
VERDICTS = ("benefit", "harm", "equivalent within the margin",
            "inconclusive (more seeds or a larger test set needed)")


# --------------------------------------------------------------------------- AUROC of a batch of resamples


def batch_auroc(scores, labels, counts) -> np.ndarray:
    """AUROC of each of B resamples of one run's test scores, resample b drawing
    image i counts[b, i] times (classify.auroc of the resample's images):

        AUROC_b = sum_{i pos, j neg} c_bi c_bj ([s_i > s_j] + [s_i = s_j] / 2) / (P_b N_b)

    O(B n): a positive's wins are read from cumulative counts of the sorted
    negatives. NaN where a resample lacks a class."""
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
    """(B, n) times each test image is drawn by each of n_boot resamples of a
    stratified cluster bootstrap: whole PATIENTS drawn with replacement (Davison
    and Hinkley 1997, sec. 3.8), as many from the patients with a positive image
    and from those without as each stratum holds. With one image per patient it
    is classify.stratified_bootstrap_indices, draw for draw."""
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


# --------------------------------------------------------------------------- the difference: runs, seeds, patients


def assign_runs(n_seeds: int, n_runs: int) -> np.ndarray:
    """The generator run each classifier seed trains with: seed i uses run i mod K."""
    return np.arange(n_seeds) % n_runs


@dataclass(frozen=True)
class Difference:
    """AUROC(augmented) - AUROC(real-only) and its noise; arrays over any leading axes."""

    diff: np.ndarray  # mean over generator runs of each run's mean over its seeds, full test split
    se: np.ndarray  # standard error: the SD of the nested bootstrap (nested_difference)
    df: np.ndarray  # degrees of freedom of se; inf where no level above the patients is measured
    generator_sd: np.ndarray  # SD across generator runs of the run means; NaN with one run
    seed_sd: np.ndarray  # SD across seeds of the per-seed difference; NaN with one seed
    test_sd: np.ndarray  # SD of diff over patient resamples, runs and seeds fixed
    seeds: int
    generator_runs: int

    def p_value(self) -> np.ndarray:
        """Two-sided p-value of "difference = 0": |diff| / se against Student's t(df)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.abs(self.diff) / self.se
        return np.where(self.se > 0, 2 * sps.t.sf(t, self.df), np.asarray(self.diff == 0, dtype=float))

    def interval(self, alpha) -> tuple[np.ndarray, np.ndarray]:
        """(1 - alpha) interval diff -/+ t(df, 1 - alpha / 2) se: it excludes 0 exactly when p < alpha."""
        half = sps.t.ppf(1 - np.asarray(alpha) / 2, self.df) * self.se
        return self.diff - half, self.diff + half


def welch_satterthwaite_df(u_top, df_top, u_test):
    """Satterthwaite (1946): (u_top + u_test)^2 / (u_top^2 / df_top), u_test taken as known."""
    u_top, u_test = np.asarray(u_top, dtype=np.float64), np.asarray(u_test, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(u_top > 0, (u_top + u_test) ** 2 / (u_top ** 2 / df_top), np.inf)


def nested_difference(per_seed, boot, runs=None) -> Difference:
    """The difference and its interval's parts from per-seed AUROC differences.

    per_seed (..., S): each classifier seed's difference on the full test split;
    boot (..., S, B): the same on B patient resamples (shared by every seed);
    runs (S,): the generator run of each seed, None for one run.

    The top level is the generator runs (the seeds with one run; none with one
    seed). The bootstrap draws U top-level units with replacement, each bringing
    the mean of its own seeds (not drawn again: their noise is already in the unit
    means), on patient resample b, deviations scaled by sqrt(U / (U - 1)) so the
    top level adds var(unit means) / U. se^2 is that bootstrap's variance, the
    unit draws taken in closed form (no Monte Carlo noise):

        se^2 = var_b(D_b) + mean_b var_k(unit_kb) / U,    D_b = mean_k unit_kb

    df: Welch-Satterthwaite, the top-level variance at its upper 1 - DF_BOUND
    chi-square bound: the plain estimate raises df exactly when it is small by chance."""
    per_seed, boot = np.asarray(per_seed, dtype=np.float64), np.asarray(boot, dtype=np.float64)
    n_seeds = boot.shape[-2]
    runs = np.zeros(n_seeds, int) if runs is None else np.unique(np.asarray(runs), return_inverse=True)[1]
    n_runs = int(runs.max()) + 1
    units = runs if n_runs > 1 else np.arange(n_seeds)
    n_units = int(units.max()) + 1
    weight = (units[:, None] == np.arange(n_units)) / np.bincount(units)  # (S, U): the mean over a unit's seeds
    unit_full = per_seed @ weight  # (..., U)
    unit_boot = np.einsum("...sb,su->...ub", boot, weight)  # (..., U, B)
    test_sd = unit_boot.mean(axis=-2).std(axis=-1, ddof=1)  # runs and seeds fixed, patients resampled
    nan = np.full(test_sd.shape, np.nan)
    parts = dict(diff=unit_full.mean(axis=-1), test_sd=test_sd, seeds=n_seeds, generator_runs=n_runs,
                 seed_sd=per_seed.std(axis=-1, ddof=1) if n_seeds > 1 else nan,
                 generator_sd=unit_full.std(axis=-1, ddof=1) if n_runs > 1 else nan)
    if n_units == 1:
        return Difference(se=test_sd, df=np.full(test_sd.shape, np.inf), **parts)
    se = np.sqrt(test_sd ** 2 + unit_boot.var(axis=-2, ddof=1).mean(axis=-1) / n_units)
    u_top = unit_full.var(axis=-1, ddof=1) / n_units * (n_units - 1) / sps.chi2.ppf(DF_BOUND, n_units - 1)
    return Difference(se=se, df=welch_satterthwaite_df(u_top, n_units - 1, test_sd ** 2), **parts)


def paired_difference(real_scores, aug_scores, labels, counts, runs=None) -> Difference:
    """nested_difference of one comparison from test scores: real_scores, aug_scores
    (S, n), row s of each from classifier seed s (same seed, same real data, same
    test images); counts (B, n) from cluster_bootstrap_counts; runs as there."""
    real = np.atleast_2d(np.asarray(real_scores, dtype=np.float64))
    aug = np.atleast_2d(np.asarray(aug_scores, dtype=np.float64))
    if real.shape != aug.shape:
        raise ValueError(f"real-only scores {real.shape} but augmented {aug.shape}: pair the seeds")
    if real.shape[1] != np.asarray(labels).size:
        raise ValueError(f"{real.shape[1]} scores per run but {np.asarray(labels).size} test labels")
    if runs is not None and len(runs) != real.shape[0]:
        raise ValueError(f"{len(runs)} generator runs given for {real.shape[0]} seeds")
    full = np.ones((1, real.shape[1]))
    per_seed = np.array([batch_auroc(a, labels, full)[0] - batch_auroc(r, labels, full)[0]
                         for r, a in zip(real, aug)])
    boot = np.stack([batch_auroc(a, labels, counts) - batch_auroc(r, labels, counts) for r, a in zip(real, aug)])
    d = nested_difference(per_seed, boot, runs)
    return replace(d, **{k: float(getattr(d, k)) for k in ("diff", "se", "df", "generator_sd", "seed_sd", "test_sd")})


# --------------------------------------------------------------------------- several generators: Holm, then the verdict


def holm(p_values) -> np.ndarray:
    """Holm's (1979) step-down adjusted p-values along the last axis: the k-th smallest
    of m times m - k + 1, the running maximum carried forward, capped at 1. It keeps
    the family-wise error below alpha whatever the dependence (a shared baseline)."""
    p = np.atleast_1d(np.asarray(p_values, dtype=np.float64))
    order = np.argsort(p, axis=-1, kind="stable")
    stepped = np.minimum(1.0, (p.shape[-1] - np.arange(p.shape[-1])) * np.take_along_axis(p, order, axis=-1))
    adjusted = np.empty_like(p)
    np.put_along_axis(adjusted, order, np.maximum.accumulate(stepped, axis=-1), axis=-1)
    return adjusted


def holm_levels(p_values, alpha: float = ALPHA) -> np.ndarray:
    """alpha / (m - k + 1) for the k-th smallest of m p-values (last axis): the level Holm tests it at."""
    p = np.atleast_1d(np.asarray(p_values, dtype=np.float64))
    rank = np.argsort(np.argsort(p, axis=-1, kind="stable"), axis=-1, kind="stable")
    return alpha / (p.shape[-1] - rank)


def inconclusive_reason(seeds: int, generator_runs: int) -> str | None:
    """Why a comparison can only be inconclusive, or None when it may be more."""
    if seeds < MIN_SEEDS:
        return (f"{seeds} classifier seed{'s' if seeds != 1 else ''}, fewer than {MIN_SEEDS}: the training noise "
                "is too poorly measured for a verdict")
    if generator_runs < MIN_GENERATOR_RUNS:
        return ("one generator run (or one given set of samples): the interval leaves out the generator's own "
                "training noise")
    return None


def verdict_index(ci_low, ci_high, p_adjusted, margin: float = MARGIN, alpha: float = ALPHA) -> np.ndarray:
    """The rule elementwise, an index into VERDICTS: equivalent (interval inside the margin: Schuirmann 1987)
    first, then benefit (p_adjusted < alpha, interval above 0), harm (below 0), else inconclusive."""
    low, high, p = np.broadcast_arrays(ci_low, ci_high, p_adjusted)
    return np.select([(-margin < low) & (high < margin), (p < alpha) & (low > 0), (p < alpha) & (high < 0)],
                     [2, 0, 1], 3)


def verdict(ci_low: float, ci_high: float, p_adjusted: float, seeds: int, generator_runs: int,
            margin: float = MARGIN, alpha: float = ALPHA) -> str:
    """One of VERDICTS: inconclusive whenever inconclusive_reason gives one, else verdict_index's."""
    if inconclusive_reason(seeds, generator_runs):
        return VERDICTS[3]
    return VERDICTS[int(verdict_index(ci_low, ci_high, p_adjusted, margin, alpha))]


def compare_generators(runs: dict, labels, patients, margin: float = MARGIN, alpha: float = ALPHA,
                       n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """The study's answer, one dict per generator (the summary.json headline).

    runs: {generator: (real_scores, aug_scores[, generator_run_of_each_seed])},
    scores (S, n) with row s from seed s; labels, patients: (n,) of the test split.
    Every generator sees the same patient resamples. The interval is
    at the level Holm tests it (ci_level), so it excludes 0 exactly when Holm
    rejects at its step. Keys: generator, diff, ci_low, ci_high, ci_level, p_value,
    p_adjusted, verdict, inconclusive_reason (None where a verdict may be more), seeds,
    generator_runs, n_test_images, n_test_patients, generator_sd, seed_sd (None where
    unmeasured), test_sd."""
    counts = cluster_bootstrap_counts(labels, patients, n_boot, seed)
    names = list(runs)
    diffs = [paired_difference(*runs[g][:2], labels, counts, runs=runs[g][2] if len(runs[g]) > 2 else None)
             for g in names]
    p = np.array([d.p_value() for d in diffs])
    out = []
    for g, d, pi, pa, level in zip(names, diffs, p, holm(p), holm_levels(p, alpha)):
        low, high = (float(x) for x in d.interval(level))
        out.append(dict(generator=g, diff=d.diff, ci_low=low, ci_high=high, ci_level=float(1 - level),
                        p_value=float(pi), p_adjusted=float(pa),
                        verdict=verdict(low, high, float(pa), d.seeds, d.generator_runs, margin, alpha),
                        inconclusive_reason=inconclusive_reason(d.seeds, d.generator_runs),
                        seeds=d.seeds, generator_runs=d.generator_runs, n_test_images=int(np.asarray(labels).size),
                        n_test_patients=int(np.unique(np.asarray(patients)).size),
                        generator_sd=None if d.generator_runs < 2 else d.generator_sd,
                        seed_sd=None if d.seeds < 2 else d.seed_sd, test_sd=d.test_sd))
    return out
