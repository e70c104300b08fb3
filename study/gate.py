"""Is a generator usable? The gate a generator's samples pass before they enter the study's grid
(one that never learned to draw an X-ray would otherwise read as evidence about its model family).
Measured on real images the generator never saw, with 95% bootstrap intervals:
  * detectability: test AUROC of a small classifier telling samples (1) from real images (0), its
    epoch chosen on real validation images; 0.5 indistinguishable, 1.0 trivially fake (a classifier
    two-sample test, Lopez-Paz and Oquab, ICLR 2017);
  * train-on-synthetic, test-on-real (TSTR): test AUROC of the Infiltration classifier trained on the
    samples alone; a class signal needs its interval above 0.5 AND held-out samples of the two classes
    ranked apart (one-sided Mann-Whitney, p < SEPARATION_P);
  * diversity: a warning below COLLAPSE_FLOOR.
The rule (decide): unusable when the detectability interval lies above FAKE_FLOOR with no class signal;
a warning when trivially fake but class-bearing, realistic with no class signal, or low in diversity.
The gate reads the test split; no classifier of the grid is selected or trained with it. Why, and the
simulation bounding the false "class-bearing" rate at 5%: docs/experiment.md. check_pools caches it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch

import classify
import data
from plumbing.files import atomic_path
from training import gan_run

FAKE_FLOOR = 0.95  # detectability interval entirely above this: a classifier tells every sample from real
CHANCE = 0.5
SEPARATION_P = 0.05  # held-out samples of the two classes told apart at this one-sided level
MIN_SAMPLES = 30  # ten per third: fewer leave the detectability classifier nothing to train, select or test on
COLLAPSE_FLOOR = gan_run.DIVERSITY_FLOOR  # spread below 1/4 of the real images': collapsed (one floor for all)


@dataclass
class GateConfig:
    size: int = 32  # the study's common resolution
    classifier: str = "small"
    epochs: int = 8
    # At most this many training images, so that the gate's cost stays fixed however many samples a study
    # draws (docs/performance.md, "The usability gate"):
    detect_train: int = 64  # real and generated each for detectability: TRIVIALLY fake samples show in a few dozen
    tstr_train: int = 128  # generated per class for TSTR: the grid's TSTR budget in the demo (8 epochs of 256)
    tstr_holdout: int = 32  # generated per class held out of TSTR's training (at most a third): do the classes differ?
    batch_size: int = 32
    patience: int = 3
    seed: int = 0
    device: str = "auto"

    def classify_config(self) -> classify.ClassifyConfig:
        return classify.ClassifyConfig(model=self.classifier, size=self.size, epochs=self.epochs,
                                       batch_size=self.batch_size, patience=self.patience, seed=self.seed,
                                       device=self.device)


# --------------------------------------------------------------------------- the two measurements


def _split_three(n: int, seed: int) -> list[np.ndarray]:
    """Three disjoint index sets of about n / 3 each: train, validation, test samples."""
    order = np.random.default_rng([seed, 7]).permutation(n)
    return np.array_split(order, 3)


def _pick(n: int, k: int, seed: int, salt: int) -> np.ndarray:
    """k of n indices at random, fixed by (seed, salt): the split folders are sorted by class."""
    return np.sort(np.random.default_rng([seed, salt]).permutation(n)[:k])


def detectability(real_train: torch.Tensor, real_val: torch.Tensor, real_test: torch.Tensor,
                  fakes: torch.Tensor, cfg: GateConfig) -> dict:
    """Test AUROC (with its 95% interval) of real (0) vs generated (1).

    real_*: uint8 (N, S, S) real images of the three splits; fakes: uint8 (M, S, S)
    samples, split into three disjoint thirds so that the evaluated samples are
    fresh to the classifier. Each side is capped at the smaller count so that
    the classes are balanced, and the training pair at cfg.detect_train a side."""
    parts = [fakes[torch.from_numpy(i)] for i in _split_three(len(fakes), cfg.seed)]

    def pair(real: torch.Tensor, fake: torch.Tensor, salt: int, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = min(len(real), len(fake), cap)
        x = torch.cat([real[torch.from_numpy(_pick(len(real), k, cfg.seed, salt))], fake[:k]])  # fake: shuffled
        return x, torch.cat([torch.zeros(k, dtype=torch.long), torch.ones(k, dtype=torch.long)])

    (tx, ty), (vx, vy), (ex, ey) = (pair(real_train, parts[0], 0, cfg.detect_train),
                                    pair(real_val, parts[1], 1, len(fakes)), pair(real_test, parts[2], 2, len(fakes)))
    metrics, _ = classify.train_and_evaluate(tx, ty, vx, vy, ex, ey, cfg.classify_config(), progress=False)
    return {"auroc": metrics["auroc"], "ci_low": metrics["auroc_ci_low"], "ci_high": metrics["auroc_ci_high"],
            "n_test": int(len(ey))}


def train_on_synthetic(fake_x: torch.Tensor, fake_y: torch.Tensor, real_val: tuple, real_test: tuple,
                       cfg: GateConfig) -> dict:
    """TSTR: the Infiltration classifier trained on samples alone (at most cfg.tstr_train of each
    class) for cfg.epochs epochs; AUROC on real test images. Up to cfg.tstr_holdout samples of each
    class (at most a third) are held out: "separation" is the classifier's AUROC on them, with the
    one-sided Mann-Whitney p-value (scipy) that the two classes it draws differ. No epoch is chosen
    on real validation images: for a classifier trained on noise that picks its luckiest epoch
    (docs/experiment.md, "The usability gate")."""
    from scipy.stats import mannwhitneyu

    held, train = [], []
    for c in (0, 1):
        i = np.flatnonzero(fake_y.numpy() == c)
        order = np.random.default_rng([cfg.seed, 3 + c]).permutation(i)  # pools are sorted: a random order
        k = min(cfg.tstr_holdout, len(i) // 3)
        held.append(order[:k])
        train.append(order[k:k + cfg.tstr_train])
    held, train = (torch.from_numpy(np.concatenate(p)) for p in (held, train))
    steps = cfg.epochs * max(1, len(train) // min(cfg.batch_size, len(train)))
    no_selection = replace(cfg.classify_config(), epochs=1, steps=steps)  # validation once, after the last step
    metrics, model = classify.train_and_evaluate(fake_x[:0], fake_y[:0], *real_val, *real_test, no_selection,
                                                 synthetic_x=fake_x[train], synthetic_y=fake_y[train], progress=False)
    scores, y = classify.predict(model, fake_x[held]), fake_y[held].numpy()
    both = len(set(y.tolist())) == 2  # a class of under 3 samples holds none out: no test, no signal
    separation = classify.auroc(scores, y) if both else None
    p = float(mannwhitneyu(scores[y == 1], scores[y == 0], alternative="greater").pvalue) if both else 1.0
    return {"auroc": metrics["auroc"], "ci_low": metrics["auroc_ci_low"], "ci_high": metrics["auroc_ci_high"],
            "n_test": metrics["n_test"], "separation": separation, "separation_p": p, "n_held_out": int(len(held))}


def diversity(samples: torch.Tensor, real: torch.Tensor, n: int = 64) -> float:
    """Mean pairwise RMS distance of up to n samples over that of up to n real
    images (gan_run.mean_pairwise_distance, the GAN monitor's measure): about 1 for
    a generator as varied as the data, near 0 when collapsed."""
    def spread(x: torch.Tensor) -> float:
        pick = torch.from_numpy(_pick(len(x), n, 0, 9))  # pools are sorted by class: not the first n
        return gan_run.mean_pairwise_distance(x[pick].double()) if len(x) > 1 else 0.0
    return spread(samples) / max(spread(real), 1e-12)


# --------------------------------------------------------------------------- the rule


@dataclass
class GateResult:
    usable: bool | None  # None: not measured (too few samples)
    reason: str  # one sentence a reader can act on
    warnings: list
    detectability: dict
    tstr: dict
    diversity: float

    def to_json(self) -> dict:
        return asdict(self)


def has_class_signal(tstr: dict) -> bool:
    """TSTR's interval above chance AND the generator's held-out classes told apart (module docstring)."""
    return tstr["ci_low"] > CHANCE and tstr.get("separation_p", 1.0) < SEPARATION_P


def decide(detect: dict, tstr: dict, spread: float) -> GateResult:
    """The rule in the module docstring, applied to measured intervals."""
    fake = detect["ci_low"] > FAKE_FLOOR
    signal = has_class_signal(tstr)
    d = f"detectability AUROC {detect['auroc']:.3f} [{detect['ci_low']:.3f}, {detect['ci_high']:.3f}]"
    t = f"TSTR AUROC {tstr['auroc']:.3f} [{tstr['ci_low']:.3f}, {tstr['ci_high']:.3f}]"
    t += f", held-out classes apart {tstr['separation']:.3f} (p {tstr['separation_p']:.2g})" if tstr.get("separation") is not None else ""
    why = ("TSTR interval includes 0.5" if tstr["ci_low"] <= CHANCE
           else f"held-out classes not apart at p < {SEPARATION_P:g}")
    warnings = []
    if spread < COLLAPSE_FLOOR:  # a warning only: diversity never makes a generator unusable by itself
        warnings.append(f"low diversity: samples spread {spread:.2f} of the real images' (mode collapse)")
    if fake and not signal:
        return GateResult(False, f"samples are trivially told apart from real X-rays ({d}) and no class signal is "
                                 f"shown ({why}; {t})", warnings, detect, tstr, spread)
    if fake:
        warnings.append(f"samples are trivially told apart from real X-rays ({d}) but carry the class signal ({t})")
        reason = "usable with a warning: trivially fake, but class-bearing"
    elif not signal:
        warnings.append(f"samples are not trivially fake ({d}) but no class signal is shown ({why}; {t})")
        reason = "usable with a warning: realistic, no class signal shown"
    else:
        reason = f"usable: {d}, {t}"
    return GateResult(True, reason, warnings, detect, tstr, spread)


def check_generator(samples: torch.Tensor, labels: torch.Tensor, real: dict, cfg: GateConfig) -> GateResult:
    """The whole gate for one generator. samples: uint8 (M, S, S) with labels (M,)
    (1 = infiltration); real: {"train": (x, y), "validation": (x, y), "test": (x, y)},
    uint8 images at cfg.size. Detectability pools both classes."""
    (tx, _), (vx, vy), (ex, ey) = real["train"], real["validation"], real["test"]
    if len(samples) < MIN_SAMPLES or set(labels.tolist()) != {0, 1}:
        return GateResult(None, f"not measured: {len(samples)} samples of {len(set(labels.tolist()))} class(es); the "
                                f"gate needs {MIN_SAMPLES} of both classes", [], {}, {}, diversity(samples, tx))
    detect = detectability(tx, vx, ex, samples, cfg)
    tstr = train_on_synthetic(samples, labels, (vx, vy), (ex, ey), cfg)
    return decide(detect, tstr, diversity(samples, tx))


# --------------------------------------------------------------------------- the gate in the study: every pool, cached


def _verdict(r: GateResult) -> str:
    return ("UNUSABLE: " if r.usable is False else "") + r.reason + "".join(f"; warning: {w}" for w in r.warnings)


def check_pools(cfg, real, pools: dict) -> dict[str, GateResult]:
    """The gate for every synthetic pool of a study, before its grid: each trained
    generator's samples at each real fraction (named GEN at the largest, GEN@f<frac>
    below it, as memorization.json names them) and each external set once (it is
    the same at every fraction). The gate's size and device are the study's.

    Cached in OUT/gate.json, each entry under a key of everything it read: the
    pool's pixels and labels, the real images and labels of the three splits and
    the gate's settings; an entry whose key differs is measured again, never reused.
    cfg: study.StudyConfig; real: study.RealData; pools: {generator: {fraction: study.Pool}}."""
    gcfg = replace(cfg.gate, size=cfg.size, device=cfg.device)
    splits = {"train": (real.train_x, real.train_y), "validation": (real.val_x, real.val_y),
              "test": (real.test_x, real.test_y)}
    real_key = data.digest(*(h for x, y in splits.values() for h in (*data.pixel_hashes(x), *y.tolist())))
    print("\n== the usability gate: detectability, train-on-synthetic and diversity on real images", flush=True)
    path, top, results = cfg.out / "gate.json", max(cfg.real_fractions), {}
    cache = json.loads(path.read_text()) if path.is_file() else {}
    for gen, by_frac in pools.items():
        for frac, pool in sorted(by_frac.items(), reverse=True):
            if gen in cfg.external and frac != top:
                continue
            name = gen if frac == top else f"{gen}@f{frac:g}"
            key = data.digest(real_key, pool.digest, json.dumps(asdict(gcfg), sort_keys=True))
            old = cache.get(name, {})
            if old.get("key") == key and set(old.get("result", {})) == {f.name for f in fields(GateResult)}:
                results[name] = GateResult(**old["result"])
                print(f"gate {name} (measured before): {_verdict(results[name])}", flush=True)
                continue
            t0 = time.time()
            results[name] = check_generator(pool.images, pool.labels, splits, gcfg)
            cache[name] = {"key": key, "seconds": round(time.time() - t0, 1), "result": results[name].to_json()}
            with atomic_path(path) as tmp:  # after each: an interruption loses at most one measurement
                tmp.write_text(json.dumps(cache, indent=1))
            print(f"gate {name} ({time.time() - t0:.0f}s): {_verdict(results[name])}", flush=True)
    return results
