"""Step budgets and monitoring during training (monitor.py): the budget is respected exactly, the
monitor logs one row per evaluation, best.pt is chosen on validation images only, and the bad
inputs (--eval-every larger than the run, no held-out images) are one line, not a crash."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main
from training import monitor
from plumbing.configs import DEFAULT_EPOCHS, RunConfig, total_steps
from plumbing.files import first_nonfinite, load_checkpoint, save_checkpoint, to_uint8

TINY_DDPM = ("--preset", "tiny", "--batch-size", "4", "--num-samples", "2", "--sample-steps", "2", "--lr", "1e-3",
             "--device", "cpu")
TINY_GAN = ("--size", "32", "--g-width", "8", "--d-width", "8", "--batch-size", "4", "--num-samples", "4",
            "--no-epoch-checkpoints", "--device", "cpu")


def _pngs(folder: Path, n: int, level: int, seed: int, size: int = 32) -> None:
    """n grey PNGs around one brightness `level`, with noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = np.clip(rng.normal(level, 20, (size, size)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Path:
    """An extract-like layout: 8 training images per class (2 steps per epoch at batch 4),
    bright validation images and dark test images."""
    root = tmp_path_factory.mktemp("layout")
    for k, cls in enumerate(("infiltration", "no_finding")):
        _pngs(root / "train_data" / cls, 8, 128, seed=k)
        _pngs(root / "validation_data" / cls, 6, 200, seed=10 + k)
        _pngs(root / "test_data" / cls, 6, 50, seed=20 + k)
    return root


def _rows(out: Path) -> list[dict]:
    with open(out / "loss.csv", newline="") as f:
        return list(csv.DictReader(f))


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- step budgets


@pytest.mark.parametrize("command,extra", [("ddpm", TINY_DDPM), ("gan", TINY_GAN)])
def test_max_steps_is_the_budget_and_wins_over_epochs(layout, tmp_path, capsys, command, extra):
    # 8 images of the class at batch 4: 2 steps per epoch, so --epochs 1 alone would stop at 2
    out = tmp_path / command
    code, stdout, _ = _run(capsys, command, "--data", layout / "train_data", "--class", "infiltration", "--out", out,
                           *extra, "--max-steps", 5, "--epochs", 1)
    assert code == 0 and "--max-steps 5 is the budget; --epochs 1 is ignored" in stdout
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 5
    assert [int(r["step"]) for r in _rows(out)] == [1, 2, 3, 4, 5]
    assert not (out / "best.pt").exists()  # no --eval-every: no monitoring


def test_epochs_are_the_budget_without_max_steps(layout, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(capsys, "ddpm", "--data", layout / "train_data", "--class", "infiltration", "--out", out, *TINY_DDPM,
                "--epochs", 3)[0] == 0
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 6 and len(_rows(out)) == 6
    cfg = RunConfig(data=layout, out=out, batch_size=4)
    assert total_steps(cfg, 8) == (DEFAULT_EPOCHS * 2, 2)


# --------------------------------------------------------------------------- monitoring


@pytest.mark.parametrize("command,extra", [("ddpm", TINY_DDPM), ("gan", TINY_GAN)])
def test_monitor_logs_one_row_per_evaluation_and_keeps_the_best(layout, tmp_path, capsys, command, extra):
    out = tmp_path / command
    code, stdout, _ = _run(capsys, command, "--data", layout / "train_data", "--class", "infiltration", "--out", out,
                           *extra, "--max-steps", 7, "--eval-every", 3)
    assert code == 0 and "against 6 held-out images" in stdout
    rows = _rows(out)
    assert [int(r["step"]) for r in rows] == list(range(1, 8))  # the loss of every step, as before
    evals = {int(r["step"]): float(r["kid"]) for r in rows if r["kid"]}
    assert list(evals) == [3, 6] and all(r["nn_accuracy"] for r in rows if r["kid"])
    assert all(0 <= float(r["nn_accuracy"]) <= 1 for r in rows if r["kid"])
    best = load_checkpoint(out / "best.pt")
    assert best["step"] == min(evals, key=evals.get) and best["monitor"]["kid"] == pytest.approx(min(evals.values()), rel=1e-5)  # loss.csv: 6 digits
    assert first_nonfinite(best) is None and (out / "curves.png").is_file()
    # a resumed run without monitoring reads the log with its extra columns and goes on
    assert _run(capsys, command, "--data", layout / "train_data", "--class", "infiltration", "--out", out, *extra,
                "--max-steps", 8, "--resume")[0] == 0
    assert [int(r["step"]) for r in _rows(out)] == list(range(1, 9))


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))


def _scripted_monitor(cfg: RunConfig, outputs: list[torch.Tensor]) -> tuple[monitor.Monitor, _Net]:
    """A monitor whose generator draws outputs[k] at its k-th evaluation and whose weight is the step."""
    net, calls = _Net(), iter(outputs)
    watch = monitor.setup(cfg, 32, 10, lambda n: next(calls)[:n], lambda: {"model": net.state_dict()},
                          ("loss",), torch.device("cpu"))
    return watch, net


def test_best_is_chosen_on_validation_images_never_test(layout, tmp_path):
    # At step 1 the generator draws bright images (like validation), at step 2 dark ones (like test):
    # on validation the best step is 1; had the test images been used, it would be 2.
    def loaded(split: str) -> torch.Tensor:
        import data

        return data.load_folder(layout / split, 32, "infiltration", progress=False).images

    outputs = [loaded("validation_data").flip(0), loaded("test_data").flip(0)]
    picks = {}
    for name, eval_data in (("default", None), ("test", layout / "test_data")):
        cfg = RunConfig(data=layout / "train_data", out=tmp_path / name, class_name="infiltration",
                               max_steps=10, eval_every=1, eval_data=eval_data, eval_on_test=name == "test")
        watch, net = _scripted_monitor(cfg, outputs)
        for step in (1, 2):
            net.w.data.fill_(step)
            row = watch(step)
            assert set(row) == set(monitor.FIELDS)
        best = load_checkpoint(tmp_path / name / "best.pt")
        assert best["model"]["w"].item() == best["step"]
        picks[name] = best["step"]
    assert picks == {"default": 1, "test": 2}  # the default held-out set is validation_data, never test_data


def test_nonfinite_weights_never_become_best(layout, tmp_path, capsys):
    cfg = RunConfig(data=layout / "train_data", out=tmp_path, class_name="infiltration", max_steps=10,
                           eval_every=1)
    images = torch.full((6, 32, 32), 200, dtype=torch.uint8)
    watch, net = _scripted_monitor(cfg, [images])
    net.w.data.fill_(math.nan)
    watch(1)
    assert "non-finite" in capsys.readouterr().out and not (tmp_path / "best.pt").exists()


def test_one_nn_accuracy_exact_cases():
    rng = np.random.default_rng(0)
    real = rng.normal(0, 1, (20, 5))
    assert monitor.one_nn_accuracy(real, real + 100) == 1.0  # trivially told apart
    assert monitor.one_nn_accuracy(real, real + 1e-6) == 0.0  # copies: every nearest neighbour is the twin


# --------------------------------------------------------------------------- bad input: one line, training goes on


@pytest.mark.parametrize("case", ["too_large", "plain_folder"])
def test_monitoring_bad_input_is_one_line_and_training_goes_on(layout, tmp_path, capsys, case):
    data_dir = {"too_large": layout / "train_data", "plain_folder": layout / "train_data" / "infiltration"}[case]
    out = tmp_path / "run"
    code, stdout, err = _run(capsys, "ddpm", "--data", data_dir, "--out", out, *TINY_DDPM, "--max-steps", 3,
                             "--eval-every", 5 if case == "too_large" else 1)
    notes = [line for line in stdout.splitlines() if "without monitoring" in line]
    assert code == 0 and len(notes) == 1 and "Traceback" not in err
    assert {"too_large": "larger than the run (3 steps)", "plain_folder": "plain folder"}[case] in notes[0]
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 3 and "kid" not in _rows(out)[0]
    assert not (out / "best.pt").exists()


def test_an_extract_root_trains_on_its_train_split_and_watches_its_validation_split(layout, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = _run(capsys, "ddpm", "--data", layout, "--out", out, *TINY_DDPM, "--max-steps", 2,
                             "--eval-every", 1)
    assert code == 0 and "Traceback" not in err, err
    assert f"using its train split {layout / 'train_data'} only" in stdout and "without monitoring" not in stdout
    assert len(_rows(out)) == 2 and all(row["kid"] for row in _rows(out))


def test_missing_eval_data_is_refused_in_one_line(layout, tmp_path, capsys):
    code, _, err = _run(capsys, "ddpm", "--data", layout / "train_data", "--out", tmp_path / "run", *TINY_DDPM,
                        "--max-steps", 2, "--eval-every", 1, "--eval-data", tmp_path / "nowhere")
    assert code != 0 and err.startswith("error: --eval-data") and len(err.strip().splitlines()) == 1


def test_the_study_samples_from_best_pt_when_it_exists(tmp_path):
    import dataclasses

    import dcgan
    from study import experiment as study

    net = dcgan.DCGANConfig(size=32, g_width=8, d_width=8)
    torch.manual_seed(0)
    last, best = ({"kind": "dcgan", "run": "r", "step": step, "config": dataclasses.asdict(net),
                   "generator": dcgan.Generator(net).state_dict()} for step in (2, 1))  # best.pt: the same run
    run = tmp_path / "generators" / "gan_infiltration_f1"
    run.mkdir(parents=True)
    save_checkpoint(last, run / "checkpoint.pt")
    cfg = study.StudyConfig(tmp_path / "data", tmp_path, gan=study.gan_recipe(size=32), generators=("gan",),
                            device="cpu")

    def drawn() -> np.ndarray:
        folder = study.sample_generator(cfg, "gan", "infiltration", 1.0, run / "checkpoint.pt", 3, fresh=True)
        return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("sample_*.png"))])

    def expected(ckpt: dict) -> np.ndarray:
        images = dcgan.generate(ckpt, 3, seed=study.noise_seed("gan", "infiltration", 1.0), device="cpu")
        return to_uint8(images.mean(dim=1, keepdim=True))

    assert np.array_equal(drawn(), expected(last))
    save_checkpoint(best, run / "best.pt")
    assert np.array_equal(drawn(), expected(best)) and not np.array_equal(expected(best), expected(last))
