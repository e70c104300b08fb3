"""The shared plumbing: atomic files, checkpoints, EMA, and the training loop's
resume, NaN and logging behaviour, on a model small enough to reason about."""

import csv
from pathlib import Path
import pickle

import pytest
import torch
from plumbing.configs import CLIError, RunConfig
from plumbing.files import atomic_path, first_nonfinite, load_checkpoint, remove_stale_temporaries, save_checkpoint, save_png
from plumbing.runtime import epoch_order, pick_device
from training.harness import DistInfo, EMA, rng_state, run_lock, set_rng_state, train_loop



def test_atomic_path_keeps_old_file_when_block_fails(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temporary left behind


def test_checkpoint_round_trip_and_refuses_code(tmp_path):
    state = {"kind": "x", "w": torch.arange(3.0), "rng": rng_state()}
    save_checkpoint(state, tmp_path / "c.pt")
    back = load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(back["w"], state["w"])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CLIError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(CLIError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_pick_device_errors():
    assert pick_device("cpu").type == "cpu"
    with pytest.raises(CLIError):
        pick_device("not-a-device")
    if not torch.cuda.is_available():
        with pytest.raises(CLIError, match="CUDA is not available"):
            pick_device("cuda")


def test_ema_is_polyak_average():
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    assert torch.allclose(ema.model.weight, torch.full((1, 2), 0.1))


def _run(out, max_steps, resume=False, data=None, nan_at=None):
    """Linear regression trained by train_loop: returns the final weights."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    start = 0
    if resume:
        ckpt = load_checkpoint(out / "checkpoint.pt")
        set_rng_state(ckpt["rng"])
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start = ckpt["step"]
    calls = []

    def step(batch):
        x, y = batch[:, :4], batch[:, 4:]
        loss = ((model(x) + 0.01 * torch.randn_like(y) - y) ** 2).mean()  # uses the RNG on purpose
        opt.zero_grad()
        loss.backward()
        opt.step()
        calls.append(1)
        return {"loss": float("nan") if nan_at == len(calls) else loss.item()}

    cfg = RunConfig(data=out, out=out, epochs=3, batch_size=4, max_steps=max_steps, seed=1)
    train_loop(data, step, lambda: {"model": model.state_dict(), "optimizer": opt.state_dict()},
                      cfg, DistInfo(), start_step=start)
    return model.weight.detach().clone()


def test_train_loop_resume_is_bit_exact_and_log_has_each_step_once(tmp_path):
    data = torch.randn(10, 5)  # 2 steps per epoch (last partial batch dropped)
    straight = _run(tmp_path / "a", 5, data=data)
    _run(tmp_path / "b", 3, data=data)
    resumed = _run(tmp_path / "b", 5, resume=True, data=data)
    assert torch.equal(straight, resumed)
    with open(tmp_path / "b" / "loss.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == [1, 2, 3, 4, 5]
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 5


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    data = torch.randn(8, 5)  # 2 steps per epoch: a checkpoint after step 2
    with pytest.raises(CLIError, match="loss became nan at step 3"):
        _run(tmp_path, None, data=data, nan_at=3)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2


def test_epoch_order_depends_on_seed_and_epoch_only():
    assert torch.equal(epoch_order(7, 1, 2), epoch_order(7, 1, 2))
    assert not torch.equal(epoch_order(50, 1, 2), epoch_order(50, 1, 3))


def test_ctrl_c_finishes_the_step_saves_and_stops(tmp_path):
    import os
    import signal

    model = torch.nn.Linear(5, 1)
    steps = []

    def step(batch):
        steps.append(1)
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends, mid-step
        return {"loss": 1.0}

    cfg = RunConfig(data=tmp_path, out=tmp_path, epochs=10, batch_size=2, seed=0)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN under `nohup ... &`
    with pytest.raises(CLIError, match="interrupted at step 3"):
        train_loop(torch.randn(8, 5), step, lambda: {"model": model.state_dict()}, cfg, DistInfo())
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3  # the finished step is kept
    assert len(steps) == 3 and signal.getsignal(signal.SIGINT) is before  # the handler is given back


# --------------------------------------------------------------------------- reliability (issue 10)


def test_atomic_files_get_the_umask_mode_not_0600(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        save_checkpoint({"a": torch.zeros(1)}, tmp_path / "c.pt")
        save_png(torch.zeros(4, 4, dtype=torch.uint8).numpy(), tmp_path / "x.png")
    finally:
        os.umask(old)
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "x.png").stat().st_mode & 0o777 == 0o644


def test_disk_full_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch):
    import errno
    import os

    (tmp_path / "checkpoint.pt").write_bytes(b"old")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(CLIError, match="no space left on the device holding .* while writing checkpoint.pt"):
        save_checkpoint({"a": torch.zeros(1)}, tmp_path / "checkpoint.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"old"


def test_stale_temporaries_are_removed_but_nothing_else(tmp_path):
    for name in (".checkpoint.pt.ab12cd_9.pt", ".loss.csv.zzzzzzzz.csv"):  # what a SIGKILL leaves
        (tmp_path / name).write_bytes(b"x")
    keep = [".hidden", ".notes.txt", "checkpoint.pt", ".checkpoint.pt.short.pt", ".a.b.abcdefgh.png"]
    for name in keep:
        (tmp_path / name).write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


def test_run_lock_refuses_a_second_run_and_is_released(tmp_path):
    with run_lock(tmp_path, "ddpm run"):
        with pytest.raises(CLIError, match=r"in use by another ddpm run \(pid \d+\)"):
            with run_lock(tmp_path, "ddpm run"):
                pass
    with run_lock(tmp_path):  # released on exit
        pass


def test_run_lock_of_a_killed_process_is_not_in_the_way(tmp_path):
    import subprocess
    import sys

    code = "import os; from training.harness import run_lock; l = run_lock(r'%s'); l.__enter__(); os._exit(0)" % tmp_path
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
    with run_lock(tmp_path):  # the dead holder's lock went with its process
        pass


def test_first_nonfinite_names_the_tensor():
    assert first_nonfinite({"model": {"w": torch.ones(2)}, "step": 3}) is None
    state = {"model": {"w": torch.ones(2), "b": torch.tensor([float("inf")])}, "opt": [torch.zeros(1)]}
    assert first_nonfinite(state) == "model.b"


def test_nonfinite_weights_are_never_saved_even_with_a_finite_loss(tmp_path):
    model = torch.nn.Linear(5, 1)

    def step(batch):
        with torch.no_grad():
            model.weight.fill_(float("nan"))  # diverged weights, yet the loss it returned was finite
        return {"loss": 1.0}

    cfg = RunConfig(data=tmp_path, out=tmp_path, epochs=1, batch_size=2, max_steps=1, seed=0)
    with pytest.raises(CLIError, match="model.weight became non-finite by step 1; stopped, no checkpoint was written"):
        train_loop(torch.randn(8, 5), step, lambda: {"model": model.state_dict()}, cfg, DistInfo())
    assert not (tmp_path / "checkpoint.pt").exists()


def test_ctrl_c_on_an_epochs_last_step_still_writes_its_pictures(tmp_path):
    import os
    import signal

    model = torch.nn.Linear(5, 1)
    steps, pictures = [], []

    def step(batch):
        steps.append(1)
        if len(steps) == 4:  # the last step of epoch 0 (8 rows, batch 2)
            os.kill(os.getpid(), signal.SIGINT)
        return {"loss": 1.0}

    cfg = RunConfig(data=tmp_path, out=tmp_path, epochs=10, batch_size=2, seed=0)
    with pytest.raises(CLIError, match="interrupted at step 4"):
        train_loop(torch.randn(8, 5), step, lambda: {"model": model.state_dict()}, cfg, DistInfo(),
                          on_epoch_end=pictures.append, keep_epoch_checkpoints=True)
    assert pictures == [0] and (tmp_path / "checkpoint_epoch001.pt").is_file()


def test_pick_device_refuses_missing_mps():
    if not torch.backends.mps.is_available():
        with pytest.raises(CLIError, match="MPS"):
            pick_device("mps")


def test_disk_full_before_the_temporary_exists_is_one_line_too(tmp_path, monkeypatch):
    import errno
    import tempfile

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "mkstemp", full)
    with pytest.raises(CLIError, match="no space left"):
        save_checkpoint({"a": torch.zeros(1)}, tmp_path / "checkpoint.pt")
