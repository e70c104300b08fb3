"""gate.py: the usability gate marks noise unusable, passes a cheat that copies
training images (which the memorisation check then flags) or held-out images
(which the study's content guard refuses), its rule maps intervals to verdicts
exactly as the README states, and the study's gate cache is reused only for the
same inputs."""

import json
from types import SimpleNamespace

import pytest
import torch

import data
from study import gate
import main
from study import memorization


def _interval(a, lo, hi, p=0.001):
    return {"auroc": a, "ci_low": lo, "ci_high": hi, "n_test": 100, "separation": 0.9, "separation_p": p}


def test_rule_maps_intervals_to_verdicts():
    fake, real_like = _interval(0.99, 0.97, 1.0), _interval(0.6, 0.5, 0.7)
    signal, none = _interval(0.8, 0.7, 0.9), _interval(0.5, 0.4, 0.6)
    r = gate.decide(fake, none, 1.0)
    assert not r.usable and "no class signal is shown (TSTR interval includes 0.5" in r.reason
    r = gate.decide(fake, signal, 1.0)
    assert r.usable and "trivially" in r.warnings[0]
    r = gate.decide(real_like, none, 1.0)
    assert r.usable and "no class signal is shown" in r.warnings[0] and r.reason.endswith("no class signal shown")
    r = gate.decide(real_like, signal, 1.0)
    assert r.usable and not r.warnings
    r = gate.decide(real_like, signal, 0.1)
    assert r.usable and "collapse" in r.warnings[0]
    # TSTR above chance is not enough: the generator's own classes must differ on held-out samples
    r = gate.decide(fake, _interval(0.8, 0.7, 0.9, p=0.2), 1.0)
    assert not r.usable and "no class signal is shown (held-out classes not apart" in r.reason
    # the boundary belongs to "not trivially fake": the interval must lie strictly above the floor
    assert gate.decide(_interval(0.97, gate.FAKE_FLOOR, 1.0), none, 1.0).usable


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate") / "ph"
    assert main.main(["extract", "--phantoms", "240", "--out", str(root), "--size", "32", "--seed", "0"]) == 0
    splits = {s: data.load_split(root, s, 32) for s in data.SPLITS}
    return {s: (v.images, v.labels) for s, v in splits.items()}


CFG = gate.GateConfig(size=32, epochs=4, patience=2, device="cpu")


def test_pure_noise_is_unusable(real):
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (150, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.arange(150) % 2
    r = gate.check_generator(noise, labels, real, CFG)
    assert not r.usable, r
    assert r.detectability["ci_low"] > gate.FAKE_FLOOR


def test_a_cheat_that_copies_training_images_passes_but_is_flagged_as_memorised(real):
    tx, ty = real["train"]
    r = gate.check_generator(tx, ty, real, CFG)
    assert r.usable and r.detectability["ci_low"] < gate.FAKE_FLOOR, r
    assert gate.has_class_signal(r.tstr)  # real images carry the class signal, and their classes differ
    memo = memorization.memorization_check(tx, tx[:40], real["test"][0])
    assert memo["n_flagged"] == 40  # every copy is flagged


def test_a_cheat_that_returns_held_out_images_passes_the_gate_but_not_the_content_guard(real):
    # The gate cannot see a copy of held-out images: they look real (and TSTR would test on its
    # own training images). The study refuses such a set before any work
    # (data.check_no_heldout_copies; tests/test_study.py runs it end to end).
    (vx, vy), (ex, ey) = real["validation"], real["test"]
    cheat, labels = torch.cat([vx, ex]), torch.cat([vy, ey])
    r = gate.check_generator(cheat, labels, real, CFG)
    assert r.usable and r.detectability["ci_low"] < gate.FAKE_FLOOR, r
    assert data.find_copy(cheat, ex) is not None


def test_noise_claims_a_class_signal_at_most_as_often_as_the_rule_says(real):
    """The rule's false "class-bearing" rate, simulated: 40 generators whose two classes are the same
    noise distribution. TSTR's interval alone lies above chance for about 15% of them on phantoms (3 of 20
    measured); with the held-out separation test the rule claims a signal with probability at most
    SEPARATION_P = 0.05, so 6 or more claims in 40 would happen 1.4% of the time under a correct rule.
    The separation p-values must look uniform (a leak of held-out samples into training drives them to 0)."""
    claims, ps = 0, []
    for r in range(40):
        g = torch.Generator().manual_seed(1000 + r)
        noise = torch.randint(0, 256, (96, 32, 32), generator=g, dtype=torch.uint8)
        t = gate.train_on_synthetic(noise, torch.arange(96) % 2, real["validation"], real["test"],
                                    gate.GateConfig(size=32, epochs=4, device="cpu", seed=r))
        assert t["n_held_out"] == 32  # a third of each class, at most tstr_holdout
        claims += gate.has_class_signal(t)
        ps.append(t["separation_p"])
    assert claims <= 5, claims
    assert 0.35 < sum(ps) / len(ps) < 0.65  # uniform p-values: mean 0.5, SD of the mean 0.046


def test_too_few_samples_are_not_measured(real):
    r = gate.check_generator(real["train"][0][:10], real["train"][1][:10], real, CFG)
    assert r.usable is None and "not measured" in r.reason and not r.detectability


def test_diversity_is_one_for_real_images_and_zero_for_one_image(real):
    tx = real["train"][0]
    assert gate.diversity(tx, tx) == pytest.approx(1.0)
    assert gate.diversity(tx[:1].expand(40, -1, -1), tx) == 0.0
    assert gate.COLLAPSE_FLOOR == gate.gan_run.DIVERSITY_FLOOR  # one floor for the GAN monitor and the gate


def test_study_gate_is_cached_by_its_inputs(tmp_path, monkeypatch):
    calls = []

    def fake_check(samples, labels, splits, cfg):
        calls.append(int(samples[0, 0, 0]))
        return gate.GateResult(bool(samples[0, 0, 0]), "reason", [], {"auroc": 1.0}, {}, 1.0)
    monkeypatch.setattr(gate, "check_generator", fake_check)
    x, y = torch.zeros(4, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1])
    real = SimpleNamespace(train_x=x, train_y=y, val_x=x, val_y=y, test_x=x, test_y=y)

    def pool(value: int):
        return SimpleNamespace(images=torch.full((4, 8, 8), value, dtype=torch.uint8), labels=y, digest=str(value))
    cfg = SimpleNamespace(gate=gate.GateConfig(), size=8, device="cpu", out=tmp_path, real_fractions=(1.0, 0.5),
                          external={"ext": tmp_path})
    pools = {"ddpm": {1.0: pool(0), 0.5: pool(1)}, "ext": {1.0: pool(2), 0.5: pool(2)}}
    first = gate.check_pools(cfg, real, pools)
    assert list(first) == ["ddpm", "ddpm@f0.5", "ext"] and calls == [0, 1, 2]  # an external set once
    assert [r.usable for r in first.values()] == [False, True, True]
    assert set(json.loads((tmp_path / "gate.json").read_text())) == set(first)
    assert gate.check_pools(cfg, real, pools) == first and calls == [0, 1, 2]  # same inputs: reused
    pools["ddpm"][1.0] = pool(3)  # new samples
    gate.check_pools(cfg, real, pools)
    assert calls == [0, 1, 2, 3]
    real.test_x = torch.ones_like(x)  # other real images: everything again
    gate.check_pools(cfg, real, pools)
    assert calls == [0, 1, 2, 3, 3, 1, 2]
    cfg.gate = gate.GateConfig(epochs=3)  # other settings: everything again
    gate.check_pools(cfg, real, pools)
    assert len(calls) == 10
