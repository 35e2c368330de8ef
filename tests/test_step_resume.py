"""Checkpoints every N steps and on SIGTERM/SIGUSR1: a run killed mid-epoch (kill -9, or
a cluster's preemption signal) and resumed ends with weights bit-identical to a run
that was never interrupted (CPU), and its logged numbers are the same."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from models.checkpoint import read_checkpoint
from tests.conftest import LAUNCHER, TINY_OVERRIDES, launch, launcher_env

# 4096 samples / 64 = 64 steps per epoch, a step checkpoint every 5 steps (never at an
# epoch boundary before step 320), evaluation only at the end.
OVERRIDES = [*TINY_OVERRIDES, "dataloaders.dataset.num_samples=4096", "epochs=2", "checkpoint.every_steps=5",
             "eval.every_epochs=100", "checkpoint.archive_every_epochs=0"]


def last_pt(out: Path, run: str) -> Path:
    return out / "ckpts" / "mlp" / run / "last.pt"


def start(out: Path, run: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(LAUNCHER), *OVERRIDES, f"run_name={run}", f"output_dir={out}", *extra],
                            cwd=out.parent, env=launcher_env(out.parent / ".trackio-unused"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step_checkpoint(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before its first step checkpoint: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "no step checkpoint appeared"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("straight")
    result = launch([*OVERRIDES, "run_name=s", f"output_dir={root / 'out'}"], cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    return read_checkpoint(last_pt(root / "out", "s"))


def assert_same_run(resumed: dict, straight: dict) -> None:
    assert resumed["step"] == straight["step"] == 128 and resumed["epoch"] == straight["epoch"] == 2
    for key in ("model", "ema"):
        for name, value in straight[key].items():
            assert torch.equal(resumed[key][name], value), f"{key}.{name} differs from the uninterrupted run"
    assert resumed["metrics"] == straight["metrics"]


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_is_bit_identical(tmp_path, straight):
    out = tmp_path / "out"
    proc = start(out, "k")
    wait_for_step_checkpoint(last_pt(out, "k"), proc)
    proc.kill()  # SIGKILL: no handler runs, the last step checkpoint is what survives
    proc.communicate()
    state = read_checkpoint(last_pt(out, "k"))
    assert 0 < state["batch_in_epoch"] < 64 and state["step"] % 5 == 0, "the kill must land mid-epoch"
    assert (last_pt(out, "k").parent / ".lock").exists()  # the dead run's lock file is left, but not its lock
    result = launch([*OVERRIDES, "run_name=k", f"output_dir={out}", "resume=true"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_run(read_checkpoint(last_pt(out, "k")), straight)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_writes_a_checkpoint_then_resume_is_bit_identical(tmp_path, straight, signum):
    out = tmp_path / "out"
    proc = start(out, "p", "checkpoint.every_steps=1000")  # no step checkpoints: only the signal writes one
    deadline = time.monotonic() + 120
    while "epoch 1/2" not in (line := proc.stderr.readline()):  # tqdm's bar: training has started
        assert line or proc.poll() is None, "the run ended before training started"
        assert time.monotonic() < deadline
    os.kill(proc.pid, signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr[-2000:]
    assert f"stopped by {signal.Signals(signum).name} at step" in stderr and "resume=true" in stderr
    state = read_checkpoint(last_pt(out, "p"))
    assert 0 < state["step"] < 128
    result = launch([*OVERRIDES, "run_name=p", f"output_dir={out}", "resume=true"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_run(read_checkpoint(last_pt(out, "p")), straight)


@pytest.mark.slow
def test_a_second_launch_of_a_running_run_is_refused(tmp_path):
    """Two launches of one run_name (resume=true, or overwrite=true, would let the second
    one past the existing-checkpoint check): the one that trains holds the run folder."""
    out = tmp_path / "out"
    proc = start(out, "busy", "epochs=1000")  # long enough to still be training when the others start
    wait_for_step_checkpoint(last_pt(out, "busy"), proc)
    for extra in (["resume=true"], ["overwrite=true"]):
        second = launch([*OVERRIDES, "run_name=busy", f"output_dir={out}", "epochs=1000", *extra], cwd=tmp_path)
        assert second.returncode == 2, second.stderr[-2000:]
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert lines[-1].startswith("error: run 'busy' is being trained right now by pid") and "Traceback" not in second.stderr
    assert proc.poll() is None, "the first run must still be training for the check to mean anything"
    assert read_checkpoint(last_pt(out, "busy"))["config"]["run_name"] == "busy"  # nothing replaced its checkpoint
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert not (last_pt(out, "busy").parent / ".lock").exists()  # the folder is released on the way out
