"""The report of the augmentation experiment (study/experiment.py): the verdicts, the
held-out image distances, the figures, report.md and summary.json.

Every classifier run of a study is scored on the same real test images. Each augmented
cell is compared with the real-only run of the same seed and real subset by
stats.compare_generators: generator runs, classifier seeds and test PATIENTS resampled
(the interval covers this recipe's K training runs, not one trained generator), Holm over
the generators of a cell, and the verdict rule with the --margin; only the pre-declared
cell gets a verdict, the others are exploratory. A generator that failed the usability
gate (study/gate.py) is named in the report's first lines and gets no verdict.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import classify
import data
import ddpm
import fid
from study import gate
from study import memorization
from study import stats
from plumbing.files import atomic_path
from plumbing.runtime import pick_device

HEADLINE_KEYS = ("generator", "ratio", "real_fraction", "diff", "ci_low", "ci_high", "ci_level", "p_adjusted",
                 "verdict", "inconclusive_reason", "seeds", "generator_runs", "n_test_images", "n_test_patients",
                 "generator_sd", "seed_sd", "test_sd")
DISTANCE_KEYS = ("reference", "n_real", "n_fake", "fid", "kid_mean", "kid_std", "is_mean", "is_std", "feature_fd",
                 "feature_kid_mean", "feature_kid_std")
MEMORIZATION_KEYS = ("flagged_fraction", "chance_fraction", "p_value", "false_positive_rate")
# what a trained generator's rows would be read as evidence on
FAMILY = {"ddpm": "diffusion models", "gan": "GANs", "ddpm-cfg": "class-conditional diffusion models"}


# --------------------------------------------------------------------------- held-out distances and memorisation


def _scores(f_real: np.ndarray, f_fake: np.ndarray, logits: np.ndarray | None = None) -> dict:
    """Frechet distance, KID, and precision / recall / density / coverage (k = fid.PRDC_K, where both
    sets have more than k images) of two feature sets (N, D), and IS of the fake logits."""
    out = {"fd": fid.frechet_distance(*fid.mean_and_covariance(f_real), *fid.mean_and_covariance(f_fake))}
    out["kid_mean"], out["kid_std"], _ = fid.kid(f_real, f_fake)
    if min(len(f_real), len(f_fake)) > fid.PRDC_K:
        out.update(fid.prdc(f_real, f_fake, fid.PRDC_K))
    if logits is not None:
        out["is_mean"], out["is_std"] = fid.inception_score(logits)
    return out


def distances(cfg, real, pools: dict, model) -> dict:
    """Per generator (the samples of all runs at its largest real fraction) and class, and over
    both classes: Inception FID/KID/IS when its weights can be had, and always the
    Frechet distance and KID on the real-only reference classifier's features.
    Every generator is scored against the SAME test images (the validation split chose
    checkpoints and guidance scales, so it is no neutral reference), with the same
    number of its own samples. Cached in OUT/distances.json by what went in.
    cfg: study.StudyConfig; real: study.RealData; pools: {generator: {fraction: study.Pool}}."""
    frac = max(cfg.real_fractions)
    hx, hy = real.test_x, real.test_y
    sets = {"heldout": (hx, hy)} | {g: (p[frac].images, p[frac].labels) for g, p in pools.items()}
    picks = {}  # (set, class) -> indices: a fixed random n of each, n equal across the sets
    for c in (0, 1):
        n = min([cfg.fid_max_images] + [int((y == c).sum()) for _, y in sets.values()])
        for g, (_, y) in sets.items():
            picks[g, c] = np.sort(np.random.default_rng(0).permutation(np.flatnonzero(y.numpy() == c))[:n])
    key = data.digest(*(data.pixel_hashes(sets[g][0][i]) for (g, _), i in picks.items()),
                              cfg.inception, model is None, "prdc",  # "prdc": older caches lack it
                              fid.default_weights_path().is_file())  # weights put there since: computed now
    path = cfg.out / "distances.json"
    if path.is_file() and json.loads(path.read_text()).get("key") == key:
        return json.loads(path.read_text())
    feats = {"feature": lambda u8: (np.asarray(classify.embed(model, u8), np.float64), None)} if model else {}
    note = None if cfg.inception else "not attempted in this configuration"
    if cfg.inception:
        try:  # from disk only: the study tried to download them once, before any work (experiment.fetch_inception)
            net = fid.load_inception(fid.default_weights_path(), pick_device(cfg.device))
            feats["inception"] = lambda u8: fid.inception_features(net, u8, progress=False)[:2]
        except fid.InceptionWeightsMissing as e:
            note = str(e)
    f = {(g, c): {s: fn(sets[g][0][i]) for s, fn in feats.items()} for (g, c), i in picks.items()}
    out = {"key": key, "inception_missing": note, "reference": "heldout (test split)",
           "reference_images": data.digest(*(data.pixel_hashes(hx[picks["heldout", c]])
                                                     for c in (0, 1))),
           "generators": {}}
    for g in pools:
        entry = {"reference": "heldout", "classes": {}}
        for part, classes in [(cls, [data.LABELS[cls]]) for cls in data.CLASSES] + [("all", [1, 0])]:
            e = {"n_real": sum(len(picks["heldout", c]) for c in classes),
                 "n_fake": sum(len(picks[g, c]) for c in classes)}
            for s in feats:
                logits = np.concatenate([f[g, c][s][1] for c in classes]) if s == "inception" else None
                e[s] = _scores(np.concatenate([f["heldout", c][s][0] for c in classes]),
                               np.concatenate([f[g, c][s][0] for c in classes]), logits)
            if part == "all":  # both classes pooled: the generator's headline figures
                entry.update(e)
            else:
                entry["classes"][part] = e
        out["generators"][g] = entry
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(out, indent=1, default=float))
    return out


def memorisation(cfg, real, pools: dict, model) -> dict:
    """memorization_check of every synthetic pool (all its runs) against ALL real training images,
    with the test split as the yardstick; closest-pair grids for the largest fraction."""
    embed = (lambda u8: classify.embed(model, u8)) if model is not None else None  # noqa: E731
    heldout, top, memo = real.test_x, max(cfg.real_fractions), {}
    for gen, by_frac in pools.items():
        for frac, pool in by_frac.items():
            if gen in cfg.external and frac != top:
                continue  # one set of samples
            res = memorization.memorization_check(real.train_x, pool.images, heldout, embed)
            name = gen if frac == top else f"{gen}@f{frac:g}"
            if frac == top:
                memorization.save_closest_pairs(real.train_x, pool.images, res, cfg.out / f"closest_pairs_{gen}.png")
            memo[name] = {**memorization.public(res), "real_fraction": frac}
    with atomic_path(cfg.out / "memorization.json") as tmp:
        tmp.write_text(json.dumps(memo, indent=1))
    return memo


def evaluate_and_write(cfg, real, pools: dict, gates: dict, rows: list[dict], elapsed: float) -> Path:
    """After the grid: the memorisation check and the held-out distances in the
    real-only reference classifier's features (seed 0: a chest X-ray feature
    space), then report.md and summary.json. Returns report.md's path."""
    ref = cfg.out / "classifiers" / "reference.pt"
    model = classify.load_classifier(ref)[0] if ref.is_file() else None
    print("\n== memorisation check and held-out image distances", flush=True)
    memo = memorisation(cfg, real, pools, model)
    with warnings.catch_warnings():  # FID's small-N warnings: the report states the counts and the caveat
        warnings.simplefilter("ignore")
        dist = distances(cfg, real, pools, model)
    return write_report(cfg, real, pools, memo, dist, gates, rows, elapsed)


# --------------------------------------------------------------------------- the verdicts


@dataclass
class Setting:
    """One cell of the grid, summarised over its seeds."""

    mode: str
    generator: str
    ratio: float
    fraction: float
    seeds: list[int]
    auroc: float  # mean over seeds
    low: float  # 95% interval of the seed-mean AUROC over test-patient resamples (test sampling only)
    high: float
    seed_sd: float  # SD of the AUROC across seeds: training noise
    n_train: float
    n_synthetic: float
    steps: float
    comparison: dict | None = None  # stats.compare_generators' row against the real-only baseline


def summarise(rows: list[dict], scores_dir: Path, patients: np.ndarray, n_boot: int, margin: float) -> list[Setting]:
    """The grid's settings, each augmented and TSTR one with its comparison to
    real-only: per real fraction and ratio, one compare_generators call over the
    generators of that cell (Holm within it); TSTR against real-only at the largest
    fraction (the same number of training images), one generator at a time (no Holm:
    TSTR gets a gap and its 95% interval, never a verdict). Each seed's generator run
    is read from results.csv."""
    labels = np.load(scores_dir / "test_labels.npy")
    counts = stats.cluster_bootstrap_counts(labels, patients, n_boot)
    groups: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        key = (r["mode"], r["generator"], float(r["ratio"]), float(r["real_fraction"]))
        groups.setdefault(key, {})[int(r["seed"])] = r
    scores = {key: {s: np.load(scores_dir / f"{r['run']}.npy") for s, r in rs.items()} for key, rs in groups.items()}
    settings = {}
    for key, rs in groups.items():
        seeds = sorted(rs)
        point = np.array([float(rs[s]["auroc"]) for s in seeds])
        boot = np.mean([stats.batch_auroc(scores[key][s], labels, counts) for s in seeds], axis=0)
        mean = lambda f: float(np.mean([float(rs[s].get(f) or 0) for s in seeds]))  # noqa: E731
        settings[key] = Setting(*key, seeds, float(point.mean()), *np.percentile(boot, [2.5, 97.5]),
                                float(point.std(ddof=1)) if len(seeds) > 1 else float("nan"),
                                mean("n_train"), mean("n_synthetic"), mean("steps"))
    top = max(k[3] for k in groups)
    cells: dict[tuple, list[tuple]] = {}
    for key in groups:
        if key[0] != "real":
            cells.setdefault((key[0], key[2], key[3]), []).append(key)
    for (mode, _, frac), keys in cells.items():
        base = ("real", "none", 0.0, frac if mode == "aug" else top)
        runs = {}
        for key in keys:
            common = sorted(set(scores[key]) & set(scores.get(base, {})))
            if common:
                runs[key] = (np.stack([scores[base][s] for s in common]), np.stack([scores[key][s] for s in common]),
                             np.array([int(groups[key][s].get("generator_run") or 0) for s in common]))
        for family in ([runs] if mode == "aug" else [{k: v} for k, v in runs.items()]):
            for key, row in zip(family, stats.compare_generators(family, labels, patients, margin, n_boot=n_boot)):
                settings[key].comparison = {**row, "generator": key[1], "ratio": key[2], "real_fraction": key[3]}
    order = {"real": 0, "aug": 1, "tstr": 2}
    return sorted(settings.values(), key=lambda s: (order[s.mode], -s.fraction, s.generator, s.ratio))


def primary(settings: list[Setting]) -> list[dict]:
    """The pre-declared comparison, per generator: ratio 1 (or the ratio nearest 1)
    at the largest real fraction. Fixing it in advance avoids picking the luckiest cell."""
    aug = [s for s in settings if s.mode == "aug" and s.comparison]
    if not aug:
        return []
    frac = max(s.fraction for s in aug)
    ratio = min({s.ratio for s in aug if s.fraction == frac}, key=lambda r: (abs(r - 1), r))
    return [s.comparison for s in aug if s.fraction == frac and s.ratio == ratio]


def covers(row: dict) -> str:
    """What a comparison's interval covers, in words."""
    runs = row.get("generator_runs", 1)
    return f"this recipe, {runs} training runs" if runs > 1 else "one trained generator or one set of samples"


def headline(rows: list[dict], unusable: frozenset = frozenset()) -> str:
    """The answer in one sentence, from the primary comparison's rows; a generator
    in `unusable` (it failed the gate) gets its numbers but no verdict."""
    if not rows:
        return "No augmented run has finished yet, so there is no answer yet."
    r0 = rows[0]
    share = "all" if r0["real_fraction"] == 1 else f"{r0['real_fraction']:.0%} of the"
    parts = [f"{r['diff']:+.3f} for the {r['generator'].upper()} ({100 * r['ci_level']:.3g}% CI {r['ci_low']:+.3f} "
             f"to {r['ci_high']:+.3f} for {covers(r)}, Holm-adjusted p = {r['p_adjusted']:.2g}: "
             + ("no verdict, its generator failed the usability gate" if r["generator"] in unusable else r["verdict"])
             + ")" for r in rows]
    text = (f"On this data ({r0['seeds']} classifier seed{'s' if r0['seeds'] > 1 else ''}, {share} real training "
            f"images, {r0['n_test_images']} test images of {r0['n_test_patients']} patients), the estimated change in "
            f"test AUROC from adding synthetic images at ratio {r0['ratio']:g} over real-only is {' and '.join(parts)}")
    reasons = sorted({r["inconclusive_reason"] for r in rows if r.get("inconclusive_reason")})
    if reasons:
        text += f"; the verdict can only be inconclusive: {'; '.join(reasons)}"
    return text + "."


def _finite(v):
    """JSON has no NaN: a non-finite number becomes null."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    return v.item() if isinstance(v, np.generic) else v


def gate_lines(gates: dict, memo: dict) -> list[str]:
    """The report's first lines: each set of samples the gate found unusable (its
    rows say nothing about its model family), each usable one with a warning, and
    each generator whose samples the memorisation check flags (permutation p below
    memorization.FALSE_POSITIVE_RATE). gates: {name: gate.GateResult}, named as
    memorization.json names its entries."""
    lines = []
    for name, r in gates.items():
        gen, _, frac = name.partition("@f")
        what = gen.upper() + (f" (the generators of real fraction {frac})" if frac else "")
        if r.usable is None:
            lines.append(f"Gate not measured, {what}: {r.reason}.")
        elif not r.usable:
            family = FAMILY.get(gen, f"the model that made the {gen} samples")
            lines.append(f"**Unusable generator: {what}.** Its {r.reason}. The {gen.upper()} never learned to draw "
                         f"these images, so its rows say nothing about {family}; they stay in the tables, marked "
                         "unusable.")
        elif r.warnings:
            lines.append(f"Gate warning, {what}: {'; '.join(r.warnings)}.")
    for g, m in memo.items():
        if "@" not in g and m["p_value"] < m["false_positive_rate"]:
            lines.append(f"**Memorisation, {g.upper()}**: {m['flagged_fraction']:.0%} of its samples are flagged as "
                         f"near-copies of training images, against {m['chance_fraction']:.0%} of the held-out real "
                         f"images (permutation p = {m['p_value']:.2g}; a generator that copies nothing is flagged at "
                         f"most {m['false_positive_rate']:.0%} of the time): its rows may partly measure copied real "
                         "images rather than generation.")
    return lines


def summary(head: list[dict], dist: dict, memo: dict, gates: dict | None = None) -> dict:
    """summary.json: the headline rows (each with its generator's gate verdict; verdict null where unusable), the
    held-out distances, the memorisation check per generator (the samples of its
    largest real fraction) and the gate's verdict and measurements per set of samples."""
    gates = gates or {}
    dists = {}
    for g, e in dist["generators"].items():
        inc, feat = e.get("inception", {}), e.get("feature", {})
        dists[g] = dict(zip(DISTANCE_KEYS, (e["reference"], e["n_real"], e["n_fake"], inc.get("fd"),
                                            inc.get("kid_mean"), inc.get("kid_std"), inc.get("is_mean"),
                                            inc.get("is_std"), feat.get("fd"), feat.get("kid_mean"),
                                            feat.get("kid_std"))))
    usable = {r["generator"]: gates[r["generator"]].usable if r["generator"] in gates else None for r in head}
    return _finite({"headline": [{**{k: r[k] for k in HEADLINE_KEYS}, "usable": usable[r["generator"]],
                                  "verdict": None if usable[r["generator"]] is False else r["verdict"]}
                                 for r in head], "distances": dists,
                    "memorization": {g: {k: m[k] for k in MEMORIZATION_KEYS} for g, m in memo.items() if "@" not in g},
                    "gate": {name: r.to_json() for name, r in gates.items()}})


# --------------------------------------------------------------------------- the report: figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    plt = _pyplot()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_auroc(settings: list[Setting], path: Path) -> None:
    """AUROC against synthetic ratio, one panel per real fraction, one line per generator."""
    plt = _pyplot()
    fracs = sorted({s.fraction for s in settings if s.mode != "tstr"}, reverse=True)
    gens = sorted({s.generator for s in settings if s.mode == "aug"})
    fig, axes = plt.subplots(1, len(fracs), figsize=(4.2 * len(fracs), 3.6), sharey=True, squeeze=False)
    for ax, frac in zip(axes[0], fracs):
        base = [s for s in settings if s.mode == "real" and s.fraction == frac]
        for g in gens:
            pts = base + sorted((s for s in settings if s.mode == "aug" and s.generator == g and s.fraction == frac),
                                key=lambda s: s.ratio)
            err = [[s.auroc - s.low for s in pts], [s.high - s.auroc for s in pts]]
            ax.errorbar([s.ratio for s in pts], [s.auroc for s in pts], yerr=err, marker="o", capsize=3,
                        label=g.upper())
        ax.set_title(f"real fraction {frac:g}")
        ax.set_xlabel("synthetic : real ratio (0 = real only)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test AUROC (95% CI, test patients)")
    axes[0][-1].legend()
    _save(fig, path)


def plot_distances(dist: dict, path: Path) -> None:
    """Bar charts of the held-out distances per generator and class."""
    plt = _pyplot()
    gens = dist["generators"]
    spaces = [s for s in ("inception", "feature") if any(s in e for e in gens.values())]
    if not gens or not spaces:
        return
    panels = [(s, k) for s in spaces for k in ("fd", "kid_mean")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    width = 0.8 / len(gens)
    for ax, (space, k) in zip(axes[0], panels):
        for j, (g, e) in enumerate(gens.items()):
            vals = [e["classes"][c][space][k] for c in data.CLASSES]
            ax.bar(np.arange(len(data.CLASSES)) + j * width, vals, width, label=g.upper())
        ax.set_xticks(np.arange(len(data.CLASSES)) + width * (len(gens) - 1) / 2, data.CLASSES)
        ax.set_title(f"{'Inception' if space == 'inception' else 'classifier-feature'} "
                     f"{'FD' if k == 'fd' else 'KID'} (lower is closer)", fontsize=9)
    axes[0][0].legend()
    _save(fig, path)


def read_guidance(cfg) -> dict | None:
    """generators.choose_guidance's table for the ddpm-cfg of the largest real fraction (its first training run),
    if the study has one."""
    path = cfg.out / "generators" / f"ddpm-cfg_f{max(cfg.real_fractions):g}_g0" / "guidance.json"
    return json.loads(path.read_text()) if "ddpm-cfg" in cfg.generators and path.is_file() else None


def plot_guidance(table: dict, path: Path) -> None:
    """The conditional DDPM's class separation (95% interval) against its guidance scale w, the chosen w marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.4, 3.2))
    ws = [float(w) for w in table["separation"]]
    sep = [table["separation"][f"{w:g}"] for w in ws]
    ci = np.array([table["separation_ci"][f"{w:g}"] for w in ws]).T  # (2, K)
    ax.errorbar(ws, sep, yerr=np.abs(ci - np.array(sep)), fmt="o-", color="k", capsize=3)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.axvline(table["chosen"], color="grey", lw=0.8)
    ax.set(xlabel="guidance scale w", ylabel="AUROC between the two classes' samples")
    ax.set_title("DDPM-CFG: class separation of its samples\n(a classifier trained on real images)", fontsize=9)
    _save(fig, path)


def plot_samples(real, pools: dict, frac: float, cls: str, path: Path, n: int = 36) -> None:
    """Real training images and each generator's samples of one class, side by side."""
    from torchvision.utils import make_grid

    plt = _pyplot()
    label = data.LABELS[cls]
    panels = [("real (train)", real.train_x[real.train_y == label])]
    panels += [(g.upper(), p[frac].images[p[frac].labels == label]) for g, p in pools.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.6), squeeze=False)
    for ax, (title, x) in zip(axes[0], panels):
        grid = make_grid(x[:n].unsqueeze(1).float() / 255, nrow=6, padding=1, pad_value=1.0)  # (3, H, W)
        ax.imshow(grid.permute(1, 2, 0).numpy())
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle(cls)
    _save(fig, path)


# --------------------------------------------------------------------------- the report: report.md


def _prdc(scores: dict) -> str:
    """precision / recall / density / coverage, or - where not computed."""
    return " / ".join(_num(scores.get(k), ".2f") for k in fid.PRDC_KEYS)


def _num(v, fmt: str = ".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _ci(lo, hi, signed=False) -> str:
    return f"{lo:+.3f} to {hi:+.3f}" if signed else f"{lo:.3f}-{hi:.3f}"


def _sds(c: dict) -> str:
    """generator / seed / test SD of a comparison, - where unmeasured."""
    return f"{_num(c['generator_sd'])} / {_num(c['seed_sd'])} / {c['test_sd']:.3f}"


def _vs(c: dict | None, verdict: str | None) -> str:
    """The comparison columns of a table row: estimated change, interval, Holm p, SDs, and `verdict`
    (None: the comparison's own; other cells than the pre-declared one pass "exploratory")."""
    if c is None:
        return "(baseline) | | | | |"
    return (f"{c['diff']:+.3f} | {_ci(c['ci_low'], c['ci_high'], True)} | {c['p_adjusted']:.2g} | "
            f"{_sds(c)} | {verdict or c['verdict']} |")


def _gate_table(gates: dict) -> list[str]:
    """The gate's section of report.md: the rule, then one row per set of samples."""
    L = ["## Is each generator usable? The gate", "",
         "Measured before the grid, on real images no generator trained on. *Detectability*: test AUROC of a small "
         "classifier trained to tell the samples from real training images (0.5: indistinguishable, 1: trivially "
         "fake). *TSTR*: test AUROC of the Infiltration classifier trained on the samples alone; they carry the "
         "class when its interval lies above 0.5 AND the same classifier tells the generator's two classes apart "
         f"on held-out samples (*apart*: that AUROC, one-sided Mann-Whitney p < {gate.SEPARATION_P:g}; without it a "
         "classifier of noise passes by luck); otherwise no class signal is shown, which is an absence of evidence, "
         "not evidence of absence. *Diversity*: the samples' mean pairwise distance over the real images'; below "
         f"{gate.COLLAPSE_FLOOR:g} it adds a collapse warning and never by itself makes a generator unusable. Each "
         "generator is measured on the samples of all its training runs together. The rule: **unusable** when the "
         "detectability interval lies above "
         f"{gate.FAKE_FLOOR:g} AND no class signal is shown (trivially fake and no class "
         "signal shown); trivially fake but class-bearing, or realistic with no class signal shown, or collapsed: "
         "usable "
         "with a warning (on small real data the real-only classifier is weak too, so TSTR alone never condemns a "
         "generator). 95% intervals: bootstrap over test images.", "",
         "| samples | usable | detectability (95% CI) | TSTR (95% CI) | apart (p) | diversity | reason; warnings |",
         "|---|---|---|---|---|---|---|"]

    def auroc(m: dict) -> str:
        return f"{m['auroc']:.3f} ({_ci(m['ci_low'], m['ci_high'])})" if m else "-"
    for name, r in gates.items():
        usable = {True: "yes", False: "**no**", None: "not measured"}[r.usable]
        apart = f"{r.tstr['separation']:.3f} ({r.tstr['separation_p']:.2g})" if r.tstr.get("separation") is not None else "-"
        L.append(f"| {name.upper()} | {usable} | {auroc(r.detectability)} | {auroc(r.tstr)} | {apart} | {r.diversity:.2f} | "
                 f"{'; '.join([r.reason, *r.warnings])} |")
    return L + [""]


def write_report(cfg, real, pools: dict, memo: dict, dist: dict, gates: dict, rows: list[dict],
                 elapsed: float) -> Path:
    """OUT/report.md, OUT/summary.json and the figures. cfg is study.StudyConfig,
    real study.RealData, pools study.make_pools' result, gates gate.check_pools',
    rows the grid's rows of results.csv."""
    settings = summarise(rows, cfg.out / "scores", real.test_patients, cfg.bootstrap, cfg.margin)
    head = primary(settings)
    with atomic_path(cfg.out / "summary.json") as tmp:
        guidance = read_guidance(cfg)  # the ddpm-cfg's scale and whether the rule chose it or fell back to the default
        chose = {k: guidance[k] for k in ("chosen", "best", "default", "decision")} if guidance else None
        tmp.write_text(json.dumps({**summary(head, dist, memo, gates), "guidance": chose}, indent=1, allow_nan=False))
    top = max(cfg.real_fractions)
    unusable = frozenset(n for n, r in gates.items() if r.usable is False)

    def name(gen: str, frac: float) -> str:  # a table's generator cell, marked when its samples failed the gate
        key = gen if frac == top or gen in cfg.external else f"{gen}@f{frac:g}"
        return gen.upper() + (" (unusable)" if key in unusable else "")
    plot_auroc(settings, cfg.out / "auroc_vs_ratio.png")
    plot_distances(dist, cfg.out / "distances.png")
    for cls in data.CLASSES:
        plot_samples(real, pools, top, cls, cfg.out / f"samples_{cls}.png")
    sampler = {"ddpm": "ancestral sampling", "ddim": "DDIM", "dpmpp": "DPM-Solver++(2M)"}[cfg.sampler]
    steps = cfg.sample_steps or ddpm.DEFAULT_STEPS[cfg.sampler]
    made = [f"{sampler} with {steps} steps for the DDPMs"] if {"ddpm", "ddpm-cfg"} & set(cfg.generators) else []
    made += [f"GAN samples made at {cfg.gan.network().size} px and resized to {cfg.size} px"] if cfg.gan else []
    n_test, n_pat = len(real.test_y), len(set(real.test_patients))
    per_class = [g.upper() for g in cfg.generators if g != "ddpm-cfg"]  # ddpm, gan: one model per class
    kinds = ([f"{', '.join(per_class)}: one per class and real fraction"] if per_class else []) + (
        ["DDPM-CFG: one class-conditional DDPM per real fraction for both classes, with classifier-free guidance "
         "at the scale chosen on the validation split (below)"] if "ddpm-cfg" in cfg.generators else [])
    first = gate_lines(gates, memo)
    L = [*first, *([""] if first else []), headline(head, unusable), "",
         f"# Does synthetic data help? Report of {cfg.title}", ""]
    L += [f"Data: `{cfg.data}` ({len(real.train_y)} train, {len(real.val_y)} validation, {n_test} test images; "
          f"{int(real.test_y.sum())} test images show infiltration; {n_pat} test patients, {real.patients_note}). "
          f"Classifier: `{cfg.classifier}` at {cfg.size}x{cfg.size} px; model and threshold chosen on the real "
          "validation split. **Equal budget**: every run of a real fraction takes the optimiser steps of its "
          f"real-only run ({cfg.classifier_epochs} epochs of the real images; the *steps* column), with validation "
          "at the same cadence and no early stopping, so a ratio changes what the batches hold, not how long the "
          "network trains. Real fractions are nested subsets of the train split "
          f"({', '.join(f'{f:g}' for f in cfg.real_fractions)}), the same for every seed. "
          + (f"Generators {', '.join(g.upper() for g in cfg.generators)}, each trained only on the real images of "
             f"its cell ({'; '.join(made)}): {'; '.join(kinds)}. " if cfg.generators else "")
          + (f"External samples ({', '.join(cfg.external)}): the same set at every real fraction, so they cannot "
             "take part in the matched-fraction cells (at a fraction below 1 they may carry the rest of the data). "
             if cfg.external else "")
          + f"{cfg.seeds} classifier seed(s)"
          + (f", {cfg.generator_runs} training runs of each generator per cell, each with its own seed and sampling "
             "noise (classifier seed i trains with run i mod "
             f"{cfg.generator_runs})" if cfg.generators else "")
          + f"; {len(rows)} classifier runs; this invocation took {elapsed / 60:.1f} min.", ""]
    L += _gate_table(gates) if gates else []
    L += ["## The verdict", "",
          "The pre-declared comparison: ratio nearest 1 at the largest real fraction. *Estimated change*: "
          "AUROC(augmented) - AUROC(real-only), paired by seed, averaged within each generator run and then over the "
          "runs. *CI*: a bootstrap over generator runs (the top level), the classifier seeds within them and test "
          f"patients ({cfg.bootstrap} resamples, stratified by class), read against Student's t, at the level Holm's "
          "step-down adjustment over the generators tests it: it covers this recipe over its training runs, not one "
          "trained generator (with one run, or a given set of samples, it covers that one only). *Generator SD*: "
          "of the run means (the generator's training noise, with its seeds' noise averaged in); *seed SD*: of the "
          "per-seed change (classifier training noise); *test SD*: test sampling, runs and seeds fixed. "
          f"Margin: {cfg.margin:g} AUROC, the smallest difference worth having (published augmentation gains on chest "
          "X-rays are about +0.02).", "",
          "| generator | estimated change | CI | covers | Holm p | generator SD | seed SD | test SD | verdict |",
          "|---|---|---|---|---|---|---|---|---|"]
    L += [f"| {name(r['generator'], top)} | {r['diff']:+.3f} | {_ci(r['ci_low'], r['ci_high'], True)} "
          f"({100 * r['ci_level']:.3g}%) | {covers(r)} | {r['p_adjusted']:.2g} | {_num(r['generator_sd'])} | "
          f"{_num(r['seed_sd'])} | {r['test_sd']:.3f} | "
          f"{'no verdict (unusable)' if r['generator'] in unusable else r['verdict']} |" for r in head]
    L += ["", "Verdicts: **benefit** / **harm**: Holm-adjusted p < 0.05 and the interval above / below zero; "
          f"**equivalent within the margin**: the interval inside (-{cfg.margin:g}, +{cfg.margin:g}); otherwise "
          f"**inconclusive (more seeds or a larger test set needed)**, always so with fewer than {stats.MIN_SEEDS} "
          f"classifier seeds or fewer than {stats.MIN_GENERATOR_RUNS} generator runs."]
    reasons = sorted({r["inconclusive_reason"] for r in head if r.get("inconclusive_reason")})
    if reasons:
        L += ["", f"**The verdict can only be inconclusive here**: {'; '.join(reasons)}."]
    L += ["", "## Test AUROC per setting", "",
          "Mean over seeds; *95% CI*: of the seed-mean AUROC over test-patient resamples (test sampling only); "
          "*seed SD*: of the AUROC across seeds. The comparison columns are computed as for the verdict, per cell "
          "(Holm over the generators of the cell), but only the pre-declared cell gets a verdict: the other cells "
          "are exploratory, and their intervals are not corrected for the number of cells looked at.", "",
          "| setting | generator | ratio | real fraction | AUROC | 95% CI | seed SD | steps | estimated change | CI | "
          "Holm p | generator / seed / test SD | verdict | real / synthetic train images |", "|" + "---|" * 14]
    primary_keys = {(r["generator"], r["ratio"], r["real_fraction"]) for r in head}
    for s in settings:
        if s.mode != "tstr":
            pre = (s.generator, s.ratio, s.fraction) in primary_keys
            verdict = ("no verdict (unusable)" if pre and s.generator in unusable else None) if pre else "exploratory"
            L.append(f"| {'real only' if s.mode == 'real' else 'real + synthetic'} | "
                     f"{name(s.generator, s.fraction) if s.mode != 'real' else '-'} | {s.ratio:g} | {s.fraction:g} | "
                     f"{s.auroc:.3f} | {_ci(s.low, s.high)} | {_num(s.seed_sd)} | {s.steps:.0f} | "
                     f"{_vs(s.comparison, verdict)} {s.n_train:.0f} / {s.n_synthetic:.0f} |")
    tstr = [s for s in settings if s.mode == "tstr"]
    if tstr:
        L += ["", "## Train on synthetic, test on real (TSTR)", "",
              "A classifier trained only on synthetic images (as many per class as the largest real fraction has, "
              "with its step budget), validated and tested on real images. It is not an augmentation, so it gets no "
              "benefit or harm: its row gives the gap to the real-only classifier of the same seeds, with its 95% "
              "interval (generator runs, seeds and test patients, as above; no Holm). A TSTR interval that includes "
              "0.5 shows no class signal (an absence of evidence, not evidence of absence).", "",
              "| generator | TSTR AUROC | 95% CI | class signal | gap to real-only | 95% CI of the gap | "
              "generator / seed / test SD |", "|---|---|---|---|---|---|---|"]
        L += [f"| {name(s.generator, s.fraction)} | {s.auroc:.3f} | {_ci(s.low, s.high)} | "
              f"{'shown (interval above 0.5)' if s.low > 0.5 else 'none shown (TSTR interval includes 0.5)'} | "
              + (f"{s.comparison['diff']:+.3f} | {_ci(s.comparison['ci_low'], s.comparison['ci_high'], True)} | "
                 f"{_sds(s.comparison)} |" if s.comparison else "- | - | - |") for s in tstr]
    L += ["", "![AUROC against synthetic ratio](auroc_vs_ratio.png)", "", "## How close are the synthetic images?", ""]
    ns = sorted({(e["n_real"], e["n_fake"]) for e in dist["generators"].values()})
    counts = " / ".join(f"{a} real, {b} synthetic" for a, b in ns)
    small = bool(ns) and min(map(min, ns)) < fid.FID_MIN_IMAGES
    L += [f"Every generator's samples (all its training runs at its largest real fraction) against the same "
          "held-out real images, the test split (patients no generator trained on; the validation split chose "
          "checkpoints and guidance scales, so it is left out): "
          f"{counts} images over both classes, the same counts for every generator, the per-class counts in the "
          "table. "
          + (f"These counts are below {fid.FID_MIN_IMAGES:,}: Inception FID is biased upwards at this N (compare only "
             "at equal counts); KID, which is unbiased, is given beside it. " if small else "")
          + "The classifier-feature distances use the real-only reference classifier (seed 0, trained on the train "
          "split only); they are comparable between the generators of this report, not with published FIDs.", ""]
    if dist.get("inception_missing"):
        L += [f"Inception FID, KID and IS: **not computed** ({dist['inception_missing']}).", ""]
    L += [f"*P / R / D / C*: precision, recall, density and coverage (k = {fid.PRDC_K} nearest neighbours; "
          "Kynkaanniemi et al. 2019, Naeem et al. 2020): precision and density measure fidelity (samples inside "
          "the real images' manifold), recall and coverage diversity (real images the samples reach); a collapsed "
          "generator has high precision and low recall.", "",
          "| generator | class | n real / synthetic | Inception FID | Inception KID | IS | Inception P / R / D / C | "
          "feature FD | feature KID | feature P / R / D / C |", "|---|---|---|---|---|---|---|---|---|---|"]
    for g, e in dist["generators"].items():
        for part, v in [*e["classes"].items(), ("both", e)]:
            inc, ft = v.get("inception", {}), v.get("feature", {})
            L.append(f"| {g.upper()} | {part} | {v['n_real']} / {v['n_fake']} | {_num(inc.get('fd'), '.1f')} | "
                     f"{_num(inc.get('kid_mean'), '.4f')} | {_num(inc.get('is_mean'), '.2f')} | {_prdc(inc)} | "
                     f"{_num(ft.get('fd'), '.4g')} | {_num(ft.get('kid_mean'), '.4g')} | {_prdc(ft)} |")
    L += ["", "![image distances](distances.png)", ""]
    guidance = read_guidance(cfg)
    if guidance:
        plot_guidance(guidance, cfg.out / "guidance.png")
        L += ["## The conditional DDPM's guidance scale", "",
              f"DDPM-CFG samples with w = **{guidance['chosen']:g}** ({guidance['decision']}), "
              f"eps(x, none) + w (eps(x, y) - eps(x, none)), of the grid {', '.join(f'{w:g}' for w in guidance['grid'])}. "
              f"Each w drew {guidance['n_samples']} samples of each class (the same noise for every w) and a classifier "
              f"trained on the real training images (validation AUROC {guidance['classifier_val_auroc']:.3f}) scored "
              "them: the class separation is its AUROC between the two classes' samples (0.5: the class is not "
              f"drawn). The default w = {guidance['default']:g} is kept unless the best w's separation beats it in a "
              f"paired permutation test at one-sided p <= {guidance['level']:.3g} (5% over the default's rivals); "
              f"here the best was w = {guidance['best']:g} (p {guidance['p_best_over_default']:.3g}). The test split "
              "is never read.", "",
              "| w | class separation | 95% interval |", "|---|---|---|"]
        L += [f"| {w}{' (chosen)' if float(w) == guidance['chosen'] else ''} | {v:.3f} | "
              f"{guidance['separation_ci'][w][0]:.3f} to {guidance['separation_ci'][w][1]:.3f} |"
              for w, v in guidance["separation"].items()]
        L += ["", "![guidance scale against class separation](guidance.png)", ""]
    L += ["## Samples", ""]
    L += [f"![{c}: real and synthetic](samples_{c}.png)" for c in data.CLASSES]
    warned = [(p.parent.name, line.strip()) for p in sorted((cfg.out / "generators").glob("*/warnings.log"))
              for line in p.read_text().splitlines() if line.strip()]  # e.g. the GAN's collapse check
    if warned:
        L += ["", "Warnings raised while training the generators:", ""] + [f"- `{n}`: {w}" for n, w in warned]
    spread = [(p.parent.name, p.read_text().strip()) for p in sorted((cfg.out / "generators").glob("*/diversity.txt"))]
    if spread:  # the GAN monitor's end state, with the worst point of the run beside it
        L += ["", "Sample diversity while training (the end decides; the worst point is shown beside it):", ""]
        L += [f"- `{n}`: {line}" for n, line in spread]
    p = memorization.ordinal(memorization.PERCENTILE)
    L += ["", "## Memorisation", "",
          "Every synthetic image against ALL real training images: its nearest one by RMS pixel difference at "
          f"{cfg.size} px, and by cosine distance between reference-classifier features. Flagged in a space when "
          f"closer than the {p} percentile of the same distance for the held-out images (the test split: other "
          "patients, which chose nothing), or an exact copy of a training image (identical pixels) whatever the "
          "threshold; *combined*: flagged in either space. *Chance*: the rate at which the held-out images "
          "themselves are flagged by the same rule (each judged against a threshold made without it). *p*: a "
          "permutation test (held-out and synthetic distances pooled and re-split "
          f"{memorization.N_PERMUTATIONS} times, threshold and flagged share recomputed): a generator that copies "
          f"nothing is flagged at p < {memorization.FALSE_POSITIVE_RATE:g} at most "
          f"{memorization.FALSE_POSITIVE_RATE:.0%} of the time.", "",
          "| samples | real fraction | synthetic images | exact copies | pixel flagged / chance | "
          "feature flagged / chance | combined flagged / chance | p |", "|---|---|---|---|---|---|---|---|"]
    for g, m in memo.items():
        px, ft = m["pixel"], m.get("feature")
        feat = f"{ft['flagged_fraction']:.3f} / {ft['chance_fraction']:.3f}" if ft else "-"
        L.append(f"| {g.split('@')[0].upper()} | {m['real_fraction']:g} | {m['n_synthetic']} | {m['n_exact_copies']} | "
                 f"{px['flagged_fraction']:.3f} / {px['chance_fraction']:.3f} | {feat} | "
                 f"{m['flagged_fraction']:.3f} / {m['chance_fraction']:.3f} | {m['p_value']:.2g} |")
    L += [""] + [f"Closest pairs, {g.upper()} (top: synthetic, bottom: its nearest training image):\n"
                 f"![closest pairs {g}](closest_pairs_{g}.png)\n" for g in memo if "@" not in g]
    L += ["## What this does not show", "",
          f"The intervals cover the generators' training runs ({cfg.generator_runs} per cell; given sample sets: "
          f"one), classifier seeds and the sampling of {n_pat} test patients, not a new real subset (fixed across "
          "seeds and runs) or another hospital: there is no external test set. Everything ran at "
          f"{cfg.size} px, far below clinical resolution, so the result says nothing about "
          "fine findings that only show at full size. The labels are mined from reports by NLP (Wang et al. 2017) "
          "and are noisy. One classifier and one training recipe were tried. AUROC measures ranking, not "
          "calibration. A clean memorisation check means no synthetic image is closer to a training image than "
          "real images of other patients are; it is not a privacy guarantee. If the data are the embedded phantoms "
          "(`demo`), the numbers test the pipeline, not medicine.", ""]
    path = cfg.out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(L))
    return path
