"""Checkpoints every N steps and on SIGTERM/SIGUSR1: a run killed mid-epoch (kill -9, or
a cluster's preemption signal) and resumed ends with weights bit-identical to a run
that was never interrupted (CPU), and its logged numbers are the same.

The interrupted runs are real launcher processes that pause after an optimizer step
they report ("paused at step K") until the test writes a line to their stdin: the test
kills or signals them at that step, not at whatever moment a timer lands on.
"""

import signal
from pathlib import Path

import pytest
import torch

from runs.checkpoint import read_checkpoint
from tests.conftest import TINY_OVERRIDES, PausedLaunch, launch, run_layout

# 4096 samples / 64 = 64 steps per epoch, a step checkpoint every 5 steps (never at an
# epoch boundary before step 320), evaluation only at the end.
OVERRIDES = [*TINY_OVERRIDES, "dataloaders.dataset.num_samples=4096", "epochs=2", "checkpoint.every_steps=5",
             "eval.every_epochs=100", "checkpoint.archive_every_epochs=0"]
STEPS = 128


def last_pt(out: Path, run: str) -> Path:
    return run_layout(out, run).last


def paused_run(out: Path, run: str, pause_at: int, *extra: str) -> PausedLaunch:
    """A launcher run of OVERRIDES that stops after step ``pause_at`` until released."""
    return PausedLaunch([*OVERRIDES, f"run_name={run}", f"output_dir={out}", *extra], pause_at, cwd=out.parent,
                        stderr_path=out.parent / f"{run}.stderr")


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("straight")
    result = launch([*OVERRIDES, "run_name=s", f"output_dir={root / 'out'}"], cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    return read_checkpoint(last_pt(root / "out", "s"))


def assert_same_run(resumed: dict, straight: dict) -> None:
    assert resumed["step"] == straight["step"] == STEPS and resumed["epoch"] == straight["epoch"] == 2
    for key in ("model", "ema"):
        for name, value in straight[key].items():
            assert torch.equal(resumed[key][name], value), f"{key}.{name} differs from the uninterrupted run"
    assert resumed["metrics"] == straight["metrics"]  # the same code path twice: bit-identical, not just close


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_is_bit_identical(tmp_path, straight):
    out = tmp_path / "out"
    run = paused_run(out, "k", pause_at=12)
    run.proc.kill()  # SIGKILL at step 12: no handler runs, the step checkpoint of step 10 is what survives
    run.finish()
    state = read_checkpoint(last_pt(out, "k"))
    assert (state["epoch"], state["step"], state["batch_in_epoch"]) == (0, 10, 10)
    assert (last_pt(out, "k").parent / ".lock").exists()  # the dead run's lock file is left, but not its lock
    result = launch([*OVERRIDES, "run_name=k", f"output_dir={out}", "resume=true"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_run(read_checkpoint(last_pt(out, "k")), straight)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_writes_a_checkpoint_then_resume_is_bit_identical(tmp_path, straight, signum):
    out = tmp_path / "out"
    run = paused_run(out, "p", 37, "checkpoint.every_steps=1000")  # no step checkpoints: only the signal writes one
    run.proc.send_signal(signum)  # handled while the run waits; acted on at the next step boundary
    run.release()
    assert run.finish() == 128 + signum, run.stderr()[-2000:]
    stderr = run.stderr()
    assert f"stopped by {signal.Signals(signum).name} at step 37" in stderr and "resume=true" in stderr
    state = read_checkpoint(last_pt(out, "p"))
    assert (state["epoch"], state["step"], state["batch_in_epoch"]) == (0, 37, 37)
    result = launch([*OVERRIDES, "run_name=p", f"output_dir={out}", "resume=true"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_run(read_checkpoint(last_pt(out, "p")), straight)


@pytest.mark.slow
def test_a_second_launch_of_a_running_run_is_refused(tmp_path):
    """Two launches of one run_name (resume=true, or overwrite=true, would let the second
    one past the existing-checkpoint check): the one that trains holds the run folder."""
    out = tmp_path / "out"
    run = paused_run(out, "busy", pause_at=7)  # holds its lock, paused after the step checkpoint of step 5
    written = last_pt(out, "busy").read_bytes()
    for extra in (["resume=true"], ["overwrite=true"]):
        second = launch([*OVERRIDES, "run_name=busy", f"output_dir={out}", *extra], cwd=tmp_path)
        assert second.returncode == 2, second.stderr[-2000:]
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert lines[-1].startswith("error: run 'busy' is being trained right now by pid") and "Traceback" not in second.stderr
    assert run.proc.poll() is None
    assert last_pt(out, "busy").read_bytes() == written  # nothing replaced its checkpoint
    run.proc.send_signal(signal.SIGTERM)
    run.release()
    assert run.finish() == 128 + signal.SIGTERM, run.stderr()[-2000:]
    assert read_checkpoint(last_pt(out, "busy"))["step"] == 7
    assert not (last_pt(out, "busy").parent / ".lock").exists()  # the folder is released on the way out
