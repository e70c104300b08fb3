"""The report of the augmentation experiment (study.py): paired bootstrap
intervals, the one-sentence answer, the figures and report.md.

Every classifier run of a study is scored on the same real test images, so
the report resamples those images once (a stratified bootstrap) and scores
every run on the same resamples: the AUROC difference between an augmented
run and the real-only run of the same seed is then a paired difference, and
its interval is that of the difference itself (Efron and Tibshirani 1993,
ch. 13).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import classify
import data
from common import atomic_path


# --------------------------------------------------------------------------- the report: paired bootstrap


@dataclass
class Setting:
    """One cell of the grid, summarised over its seeds."""

    mode: str
    generator: str
    ratio: float
    fraction: float
    seeds: list[int]
    auroc: float  # mean over seeds
    low: float  # 95% interval of the seed-mean AUROC (bootstrap over test images)
    high: float
    seed_sd: float
    n_train: float
    n_synthetic: float
    diff: float | None = None  # paired difference to the real-only baseline (same seeds, same real subset)
    diff_low: float | None = None
    diff_high: float | None = None


def summarise(rows: list[dict], scores_dir: Path, n_boot: int) -> list[Setting]:
    labels = np.load(scores_dir / "test_labels.npy")
    idx = classify.stratified_bootstrap_indices(labels, n_boot)  # one set of resamples scores every run
    n_pos = int((labels == 1).sum())
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["mode"], r["generator"], float(r["ratio"]), float(r["real_fraction"])), []).append(r)
    boots: dict[tuple, dict[int, np.ndarray]] = {
        key: {int(r["seed"]): classify.bootstrap_aurocs(np.load(scores_dir / f"{r['run']}.npy"), idx, n_pos)
              for r in rs}
        for key, rs in groups.items()}
    fractions = sorted({k[3] for k in groups})
    settings = []
    for key, rs in sorted(groups.items(), key=lambda kv: ({"real": 0, "aug": 1, "tstr": 2}[kv[0][0]], -kv[0][3],
                                                          kv[0][1], kv[0][2])):
        seeds = sorted(boots[key])
        point = np.array([float(r["auroc"]) for r in sorted(rs, key=lambda r: int(r["seed"]))])
        boot = np.mean([boots[key][s] for s in seeds], axis=0)
        st = Setting(key[0], key[1], key[2], key[3], seeds, float(point.mean()), *np.percentile(boot, [2.5, 97.5]),
                     float(point.std(ddof=1)) if len(point) > 1 else float("nan"),
                     float(np.mean([float(r["n_train"] or 0) for r in rs])),
                     float(np.mean([float(r["n_synthetic"] or 0) for r in rs])))
        # TSTR is compared with real-only at the largest fraction: the same number of training images.
        base_key = ("real", "none", 0.0, key[3] if key[0] == "aug" else max(fractions))
        if key[0] != "real" and base_key in boots:
            common = [s for s in seeds if s in boots[base_key]]
            if common:
                base_point = {int(r["seed"]): float(r["auroc"]) for r in groups[base_key]}
                own_point = {int(r["seed"]): float(r["auroc"]) for r in rs}
                st.diff = float(np.mean([own_point[s] - base_point[s] for s in common]))
                d = np.mean([boots[key][s] - boots[base_key][s] for s in common], axis=0)
                st.diff_low, st.diff_high = (float(v) for v in np.percentile(d, [2.5, 97.5]))
        settings.append(st)
    return settings


def headline(settings: list[Setting]) -> str:
    """The answer in one sentence, for the pre-declared primary comparison:
    ratio 1 (or the ratio nearest 1) at the largest real fraction, per generator.
    Fixing the comparison in advance avoids picking the luckiest cell of the grid."""
    aug = [s for s in settings if s.mode == "aug" and s.diff is not None]
    if not aug:
        return "No augmented run has finished yet, so there is no answer yet."
    frac = max(s.fraction for s in aug)
    ratio = min({s.ratio for s in aug if s.fraction == frac}, key=lambda r: (abs(r - 1), r))
    main = [s for s in aug if s.fraction == frac and s.ratio == ratio]
    parts = [f"{s.diff:+.3f} (95% CI {s.diff_low:+.3f} to {s.diff_high:+.3f}) for the {s.generator.upper()}"
             for s in main]
    better = [s.generator.upper() for s in main if s.diff_low > 0]
    worse = [s.generator.upper() for s in main if s.diff_high < 0]
    if not better and not worse:
        verdict = ("no clear benefit or harm, since every interval includes zero" if len(main) > 1
                   else "no clear benefit or harm, since the interval includes zero")
    else:
        verdict = "; ".join(([f"a clear benefit from the {' and '.join(better)}"] if better else [])
                            + ([f"clear harm from the {' and '.join(worse)}"] if worse else []))
    n_seeds = len(main[0].seeds)
    if (better or worse) and n_seeds < 3:  # the interval covers the test images, not training noise
        verdict += f" (from {n_seeds} seed{'s' if n_seeds > 1 else ''}: training noise is not in the interval)"
    share = "all" if frac == 1 else f"{frac:.0%} of the"
    return (f"On this data ({n_seeds} seed{'s' if n_seeds > 1 else ''}, {share} real training images), adding "
            f"synthetic images at ratio {ratio:g} changed test AUROC over real-only by {' and '.join(parts)}: "
            f"{verdict}.")


# --------------------------------------------------------------------------- the report: figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


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
            x = [s.ratio for s in pts]
            y = [s.auroc for s in pts]
            err = [[s.auroc - s.low for s in pts], [s.high - s.auroc for s in pts]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=g.upper())
        ax.set_title(f"real fraction {frac:g}")
        ax.set_xlabel("synthetic : real ratio (0 = real only)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test AUROC (95% CI)")
    axes[0][-1].legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_distances(dist: dict, path: Path) -> None:
    """Bar charts of the image distances per generator and class."""
    plt = _pyplot()
    keys = [k for k in dist if "/" in k]
    panels = []
    if any("inception" in dist[k] for k in keys):
        panels += [("Inception FID", lambda e: e.get("inception", {}).get("fid")),
                   ("Inception KID", lambda e: e.get("inception", {}).get("kid_mean"))]
    if any("classifier" in dist[k] for k in keys):
        panels += [("classifier-feature FD", lambda e: e.get("classifier", {}).get("fd")),
                   ("classifier-feature KID", lambda e: e.get("classifier", {}).get("kid_mean"))]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    gens = sorted({k.split("/")[0] for k in keys})
    classes = sorted({k.split("/")[1] for k in keys})
    width = 0.8 / max(1, len(gens))
    for ax, (title, get) in zip(axes[0], panels):
        for j, g in enumerate(gens):
            vals = [get(dist.get(f"{g}/{c}", {})) or 0.0 for c in classes]
            ax.bar(np.arange(len(classes)) + j * width, vals, width, label=g.upper())
        ax.set_xticks(np.arange(len(classes)) + width * (len(gens) - 1) / 2, classes)
        ax.set_title(f"{title} (lower is closer)")
    axes[0][0].legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_samples(real, synth: dict, cls: str, label: int, path: Path, n: int = 36) -> None:
    """Real training images (real: study.RealData) and each generator's samples of one class, side by side."""
    from torchvision.utils import make_grid

    plt = _pyplot()
    panels = [("real (train)", real.train_x[real.train_y == label])]
    panels += [(g.upper(), s_x[s_y == label]) for g, (s_x, s_y) in synth.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.6), squeeze=False)
    for ax, (title, x) in zip(axes[0], panels):
        grid = make_grid(x[:n].unsqueeze(1).float() / 255, nrow=6, padding=1, pad_value=1.0)  # (3, H, W)
        ax.imshow(grid.permute(1, 2, 0).numpy())
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle(cls)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


# --------------------------------------------------------------------------- the report: report.md


def _num(v, fmt: str = ".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _ci(lo, hi, signed=False) -> str:
    if lo is None:
        return ""
    return f"{lo:+.3f} to {hi:+.3f}" if signed else f"{lo:.3f}-{hi:.3f}"


def write_report(cfg, real, synth: dict, memo: dict, dist: dict, rows: list[dict], elapsed: float,
                 memorization_percentile: float) -> Path:
    """OUT/report.md and its figures. cfg is study.StudyConfig, real study.RealData,
    rows the rows of results.csv."""
    settings = summarise(rows, cfg.out / "scores", cfg.bootstrap)
    plot_auroc(settings, cfg.out / "auroc_vs_ratio.png")
    plot_distances(dist, cfg.out / "distances.png")
    for cls in data.CLASSES:
        plot_samples(real, synth, cls, data.LABELS[cls], cfg.out / f"samples_{cls}.png")
    n_seeds = cfg.seeds
    made = []  # how each generator's samples were made
    if "ddpm" in cfg.generators:
        made.append(f"{cfg.sampler.upper()} with {cfg.sample_steps} steps for the DDPM")
    if "gan" in cfg.generators:
        made.append(f"GAN samples made at {cfg.gan.network().size} px and resized to {cfg.size} px")
    L = [headline(settings), "", f"# Does synthetic data help? Report of {cfg.title}", ""]
    L += [f"Data: `{cfg.data}` ({len(real.train_y)} train, {len(real.val_y)} validation, {len(real.test_y)} test "
          f"images; {int(real.test_y.sum())} of the test images show infiltration). Classifier: `{cfg.classifier}` "
          f"at {cfg.size}x{cfg.size} px, {cfg.classifier_epochs} epochs at most, model and threshold chosen on the "
          f"real validation split. Generators: {', '.join(g.upper() for g in cfg.generators)}, one per class, "
          f"trained on the train split only; {synth[cfg.generators[0]][0].shape[0] // 2} samples per class "
          f"({'; '.join(made)}). {n_seeds} seed(s); {len(rows)} classifier runs; "
          f"this invocation took {elapsed / 60:.1f} min.", ""]
    L += ["## Test AUROC per setting", "",
          "Mean over seeds. *95% CI*: percentile interval of the seed-mean AUROC over "
          f"{cfg.bootstrap} stratified bootstrap resamples of the test images. *vs real-only*: the paired difference "
          "to the real-only run of the same seed and real subset, bootstrapped on the same resamples. The seed SD "
          "shows the training noise that the test-image bootstrap does not cover.", "",
          "| setting | generator | ratio | real fraction | AUROC | 95% CI | seed SD | vs real-only | 95% CI of difference | real / synthetic train images |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for s in settings:
        if s.mode == "tstr":
            continue
        name = "real only" if s.mode == "real" else "real + synthetic"
        diff = f"{s.diff:+.3f}" if s.diff is not None else "(baseline)"
        L.append(f"| {name} | {s.generator.upper() if s.mode != 'real' else '-'} | {s.ratio:g} | {s.fraction:g} | "
                 f"{s.auroc:.3f} | {_ci(s.low, s.high)} | {_num(s.seed_sd)} | {diff} | "
                 f"{_ci(s.diff_low, s.diff_high, signed=True)} | {s.n_train:.0f} / {s.n_synthetic:.0f} |")
    tstr = [s for s in settings if s.mode == "tstr"]
    if tstr:
        L += ["", "## Train on synthetic, test on real (TSTR)", "",
              "A classifier trained only on synthetic images (as many per class as the full real training set), "
              "validated and tested on real images. Near the real-only AUROC: the generator carries the class "
              "signal; near 0.5: it does not.", "",
              "| generator | AUROC | 95% CI | vs real-only (all real images) | 95% CI of difference |", "|---|---|---|---|---|"]
        for s in tstr:
            L.append(f"| {s.generator.upper()} | {s.auroc:.3f} | {_ci(s.low, s.high)} | "
                     f"{'' if s.diff is None else f'{s.diff:+.3f}'} | {_ci(s.diff_low, s.diff_high, signed=True)} |")
    L += ["", "![AUROC against synthetic ratio](auroc_vs_ratio.png)", "", "## How close are the synthetic images?", ""]
    if dist.get("inception_missing"):
        L += [f"Inception FID, KID and IS: **not computed** ({dist['inception_missing']}). "
              "The distances below use the real-only classifier's features alone.", ""]
    L += ["Real training images of a class against that class's samples (lower is closer). The classifier-feature "
          "distances use the penultimate layer of the real-only reference classifier (seed 0, all real images); "
          "they are comparable between the generators of this report, not with published FIDs.", "",
          "| generator | class | n real / fake | Inception FID | Inception KID | IS | feature FD | feature KID |",
          "|---|---|---|---|---|---|---|---|"]
    for key in sorted(k for k in dist if "/" in k):
        e = dist[key]
        inc, clf = e.get("inception", {}), e.get("classifier", {})
        L.append(f"| {key.split('/')[0].upper()} | {key.split('/')[1]} | {e['n_real']} / {e['n_fake']} | "
                 f"{_num(inc.get('fid'), '.1f')} | {_num(inc.get('kid_mean'), '.4f')} | {_num(inc.get('is_mean'), '.2f')} | "
                 f"{_num(clf.get('fd'), '.4g')} | {_num(clf.get('kid_mean'), '.4g')} |")
    L += ["", "![image distances](distances.png)", "", "## Samples", ""]
    L += [f"![{c}: real and synthetic](samples_{c}.png)" for c in data.CLASSES]
    # training warnings (the GAN's collapse check) belong next to the pictures they explain
    warned = [(p.parent.name, line.strip()) for p in sorted((cfg.out / "generators").glob("*/warnings.log"))
              for line in p.read_text().splitlines() if line.strip()]
    if warned:
        L += ["", "Warnings raised while training the generators:", ""]
        L += [f"- `{name}`: {line}" for name, line in warned]
    L += ["", "## Memorisation", "",
          "For every synthetic image, the distance to its nearest training image: RMS pixel difference at "
          f"{cfg.size} px, and cosine distance between reference-classifier features. Yardstick: the same distance "
          "for the real test images (other patients). A synthetic image closer to a training image than the "
          f"{memorization_percentile:g}st percentile of the test images' distances is flagged (in either space); "
          f"about {memorization_percentile:g}% of fresh images would be flagged by chance.", "",
          "| generator | synthetic images | flagged | flagged fraction | pixel: median synthetic / test NN distance | feature: median synthetic / test NN distance |",
          "|---|---|---|---|---|---|"]
    for g, m in memo.items():
        px, ft = m["pixel"], m.get("feature")
        feat = f"{ft['synthetic_median']:.3g} / {ft['reference_median']:.3g}" if ft else "-"
        L.append(f"| {g.upper()} | {m['n_synthetic']} | {m['n_flagged']} | {m['flagged_fraction']:.3f} | "
                 f"{px['synthetic_median']:.4f} / {px['reference_median']:.4f} | {feat} |")
    L += [""] + [f"Closest pairs, {g.upper()} (top: synthetic, bottom: its nearest training image):\n"
                 f"![closest pairs {g}](closest_pairs_{g}.png)\n" for g in memo]
    L += ["## What this does not show", "",
          f"The intervals cover the sampling of {len(real.test_y)} test images, not a new training set or a new "
          f"generator: {n_seeds} seed(s) are too few to estimate the training noise well (the seed SD column), and "
          "each generator was trained once. Everything ran at "
          f"{cfg.size} px, far below clinical resolution, so the result says nothing about fine findings that only "
          "show at full size. One classifier and one training recipe were tried; a stronger or pretrained "
          "classifier may gain less (or more) from synthetic data. AUROC measures ranking, not calibration or "
          "the failure modes a radiologist cares about. A clean memorisation check means no synthetic image is "
          "closer to a training image than real images of other patients are; it is not a privacy guarantee. "
          "If the data are the embedded phantoms (`demo`), the numbers test the pipeline, not medicine.", ""]
    path = cfg.out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(L))
    return path
