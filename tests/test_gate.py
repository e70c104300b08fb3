"""gate.py: the usability gate marks noise unusable, passes a cheat that copies
training images (which the memorisation check then flags), and its rule maps
intervals to verdicts exactly as the README states."""

import pytest
import torch

import data
import gate
import main


def _interval(a, lo, hi):
    return {"auroc": a, "ci_low": lo, "ci_high": hi, "n_test": 100}


def test_rule_maps_intervals_to_verdicts():
    fake, real_like = _interval(0.99, 0.97, 1.0), _interval(0.6, 0.5, 0.7)
    signal, none = _interval(0.8, 0.7, 0.9), _interval(0.5, 0.4, 0.6)
    r = gate.decide(fake, none, 1.0)
    assert not r.usable and "carry no class signal" in r.reason
    r = gate.decide(fake, signal, 1.0)
    assert r.usable and "trivially" in r.warnings[0]
    r = gate.decide(real_like, none, 1.0)
    assert r.usable and "little class signal" in r.warnings[0]
    r = gate.decide(real_like, signal, 1.0)
    assert r.usable and not r.warnings
    r = gate.decide(real_like, signal, 0.1)
    assert r.usable and "collapse" in r.warnings[0]
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
    import memorization

    tx, ty = real["train"]
    r = gate.check_generator(tx, ty, real, CFG)
    assert r.usable and r.detectability["ci_low"] < gate.FAKE_FLOOR, r
    assert r.tstr["ci_low"] > gate.CHANCE  # real images carry the class signal
    memo = memorization.memorization_check(tx, tx[:40], real["test"][0])
    assert memo["n_flagged"] == 40  # every copy is flagged
