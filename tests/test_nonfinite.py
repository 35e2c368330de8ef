"""A step whose loss (or gradient) is not finite. ``on_nonfinite=stop`` ends the run: exit 1,
one line, last.pt kept. ``on_nonfinite=rollback`` reloads last.pt, leaves the batch out
from then on (kept in every checkpoint, so a resumed run leaves it out too), says so in
one line and in trackio, and stops after ``max_rollbacks``.

The bad batch is real data: a points file with one row at 1e30 (finite, so the loader
takes it; its squared error overflows float32), placed with the run's own samplers at a
chosen batch of each epoch, away from the rows the evaluator draws. The tests assert the
category "non-finite" only: which of nan and inf the overflow gives differs by CPU.
"""

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import launcher
import train
from dataloaders.base_dataloaders import EpochSampler, make_dataset
from evaluation.evaluator import reference_sets
from runs.checkpoint import read_checkpoint
from tests.conftest import (
    LAUNCHER,
    REPO,
    TINY_OVERRIDES,
    TrainedRun,
    compose_train,
    last_line,
    launch,
    launcher_env,
    run_layout,
    tree_hashes,
)
from tests.test_trackio_rows import trackio_rows

pytestmark = pytest.mark.slow

BAD = 1e30
BATCH = 64  # 512 points, 461 for training: 7 batches an epoch (the 13 left over are dropped)
STEPS_PER_EPOCH = 7
# The tiny run of conftest on a points file instead of its k-means data.
POINTS = [o for o in TINY_OVERRIDES if not o.startswith("dataloaders.")] + [
    "dataloaders=points", "eval.every_epochs=1", "checkpoint.every_epochs=1", "checkpoint.archive_every_epochs=0",
]


def lines_starting(text: str, prefix: str) -> list[str]:
    return [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip().startswith(prefix)]


@dataclass
class Poisoned:
    path: Path  # the points file, one row at BAD
    batches: list[int | None]  # the batch position of that row in epoch 0, 1, ... (None: in the dropped tail)

    def args(self, out: Path, run: str, *extra: str) -> list[str]:
        return [*POINTS, f"dataloaders.dataset.path={self.path}", f"run_name={run}", f"output_dir={out}", *extra]


def poison(folder: Path, epochs: int, wanted, batch: int = BATCH, rank: int = 0, world: int = 1) -> Poisoned:
    """Write 512 clean 2-D points, then set to BAD the first training row of this rank's
    share that the evaluator never draws and whose batch positions (one per epoch) satisfy
    ``wanted``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "points.npy"
    clean = torch.randn(512, 2, generator=torch.Generator().manual_seed(11))
    np.save(path, clean.numpy())
    cfg = compose_train([*POINTS, f"dataloaders.dataset.path={path}"])
    file_row = {tuple(row.tolist()): i for i, row in enumerate(clean)}
    train_set = make_dataset(cfg.dataloaders, "train")
    reference = reference_sets(cfg, make_dataset(cfg.dataloaders, "test"), make_dataset(cfg.dataloaders, "reference"))[1]
    drawn = {file_row[tuple(row.tolist())] for row in reference}
    orders = [EpochSampler(len(train_set), batch, cfg.seed, epoch, rank, world).indices for epoch in range(epochs)]
    for j in range(len(train_set)):
        row = file_row[tuple(train_set.data[j].tolist())]
        batches = [order.index(j) // batch if j in order else None for order in orders]
        if row not in drawn and wanted(batches):
            poisoned = clean.clone()
            poisoned[row] = BAD
            np.save(path, poisoned.numpy())
            return Poisoned(path, batches)
    raise AssertionError("no training row fits")


def state_equal(a: dict, b: dict, key: str) -> None:
    for name, value in a[key].items():
        assert torch.equal(value, b[key][name]), f"{key}.{name} differs"


# ---------------------------------------------------------------------------------
# The sampler leaves batches out
# ---------------------------------------------------------------------------------


def test_epoch_sampler_leaves_out_the_skipped_batches_on_every_rank():
    whole = EpochSampler(100, 10, seed=3, epoch=2)
    skipped = EpochSampler(100, 10, seed=3, epoch=2, start_batch=2, skip={4, 7, 1})
    assert whole.positions == list(range(10)) and skipped.positions == [2, 3, 5, 6, 8, 9]
    assert skipped.indices == [i for b in skipped.positions for i in whole.indices[b * 10:(b + 1) * 10]]
    for rank in (0, 1):  # global batch 4 is left out of both shards, so the ranks stay in step
        shard = EpochSampler(100, 10, seed=0, epoch=0, rank=rank, world=2)
        cut = EpochSampler(100, 10, seed=0, epoch=0, rank=rank, world=2, skip={4})
        assert cut.positions == [0, 1, 2, 3] and cut.indices == shard.indices[:40]


# ---------------------------------------------------------------------------------
# stop
# ---------------------------------------------------------------------------------


@pytest.fixture
def straight_copy(trained_run: TrainedRun, tmp_path) -> tuple[Path, Path, dict[str, str]]:
    output_dir, store = tmp_path / "outputs", tmp_path / "trackio"
    shutil.copytree(trained_run.output_dir, output_dir)
    shutil.copytree(trained_run.trackio_dir, store)
    return output_dir, store, tree_hashes(output_dir, store)


@pytest.mark.parametrize("lr,process", [("1e18", True), ("1e38", False)])
def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(straight_copy, tmp_path, capsys, monkeypatch, lr, process):
    """Resume the finished run with a learning rate that wrecks the weights at the first
    new step (a resumed run may change its optimizer, not its data): the step after it
    fails, before anything is written."""
    output_dir, store, before = straight_copy
    base = [o for o in TINY_OVERRIDES if o != "trackio.enabled=false"]
    args = ["run_name=straight", *base, f"output_dir={output_dir}", "resume=true", "epochs=5", f"optimizer.lr={lr}",
            "grad_clip=0", "warmup_steps=0", "trackio.enabled=false"]
    monkeypatch.delenv("DZ_TRACEBACK", raising=False)
    if process:
        result = launch(args, cwd=tmp_path, trackio_dir=store)
        code, stderr = result.returncode, result.stderr
    else:
        monkeypatch.chdir(tmp_path)
        capsys.readouterr()
        code, stderr = launcher.main(args), capsys.readouterr().err
    line = last_line(stderr)
    assert code == 1 and "Traceback" not in stderr and line.startswith("error:"), stderr[-2000:]
    assert "became non-finite" in line and "step 34" in line and "last good checkpoint" in line, line
    assert tree_hashes(output_dir, store) == before
    assert read_checkpoint(run_layout(output_dir, "straight").last)["step"] == 32


def test_stop_names_the_bad_batch_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    bad = poison(tmp_path, 1, lambda b: b[0] == 4)
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DZ_TRACEBACK", raising=False)
    code = launcher.main(bad.args(out, "stop", "epochs=1", "checkpoint.every_steps=3"))
    captured = capsys.readouterr()
    line = last_line(captured.err)
    assert code == 1 and line.startswith("error: loss became non-finite at step 5 (epoch 1, batch 5)"), captured.err[-2000:]
    assert "last good checkpoint is kept" in line and "rollback" not in captured.out
    assert read_checkpoint(run_layout(out, "stop").last)["step"] == 3


# ---------------------------------------------------------------------------------
# rollback
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("every_steps", [3, 0])
def test_a_rollback_ends_with_the_weights_of_a_run_that_never_saw_the_batch(tmp_path, capsys, every_steps):
    """One epoch, the bad row in batch 5 (its 6th step). With step checkpoints every 3 the
    run goes back to step 3; with none, to the state written at the start. It then matches,
    bit for bit, a run told from the start to leave batch 5 out (same process, same data):
    the rollback restored the RNG streams and data position exactly, and nothing of the
    failed step reached the weights, the EMA or the optimizer."""
    bad = poison(tmp_path, 1, lambda b: b[0] == 5)
    out = tmp_path / "out"
    extra = ["epochs=1", f"checkpoint.every_steps={every_steps}"]
    rolled = compose_train(bad.args(out, "rolled", *extra, "on_nonfinite=rollback"))
    train.Trainer(rolled).fit()
    lines = lines_starting(capsys.readouterr().out, "rollback")
    assert len(lines) == 1 and lines[0].startswith(f"rollback 1/3: loss became non-finite at step 6 (epoch 1, batch 6); "
                                                   f"back to step {every_steps} of "), lines
    never = compose_train(bad.args(out, "never", *extra))
    trainer = train.Trainer(never)
    trainer.record.skipped = [[0, 5]]
    trainer.fit()

    a, b = (read_checkpoint(run_layout(out, run).last) for run in ("rolled", "never"))
    assert a["step"] == b["step"] == STEPS_PER_EPOCH - 1
    for key in ("model", "ema"):
        state_equal(a, b, key)
    for index, moments in b["optimizer"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(a["optimizer"]["state"][index][name], value), name
    assert a["metrics"] == b["metrics"]
    assert (a["skipped"], a["rollbacks"], b["rollbacks"]) == ([[0, 5]], 1, 0)
    event = [row for row in a["history"] if "train/rollbacks" in row]
    assert event == [{"step": 6, "epoch": 0, "train/rollbacks": 1, "train/rollback_to_step": every_steps}]


def test_max_rollbacks_stops_the_run_with_exit_1_and_one_line(tmp_path, capsys, monkeypatch):
    """The bad row comes back every epoch: with max_rollbacks=1 the second failure stops."""
    bad = poison(tmp_path, 2, lambda b: b[0] == 3 and b[1] is not None and b[1] >= 1)
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DZ_TRACEBACK", raising=False)
    code = launcher.main(bad.args(out, "bound", "epochs=2", "checkpoint.every_steps=2", "on_nonfinite=rollback",
                                  "max_rollbacks=1"))
    captured = capsys.readouterr()
    line = last_line(captured.err)
    step = STEPS_PER_EPOCH - 1 + bad.batches[1] + 1  # epoch 1 had one batch less
    assert code == 1 and "Traceback" not in captured.err and line.startswith("error:"), captured.err[-2000:]
    assert f"non-finite at step {step} (epoch 2, batch {bad.batches[1] + 1})" in line and "max_rollbacks=1" in line, line
    assert len(lines_starting(captured.out, "rollback")) == 1
    state = read_checkpoint(run_layout(out, "bound").last)
    assert state["skipped"] == [[0, 3]] and state["rollbacks"] == 1


# Two epochs, the bad row in both; the same run straight through and killed (SIGKILL,
# sent by the run to itself right after its first rollback) then resumed.
ROLLBACK_THEN_DIE = """
import os, signal, sys
import launcher, train

rollback = train.Trainer.rollback

def rollback_then_die(self, failure):
    rollback(self, failure)
    os.kill(os.getpid(), signal.SIGKILL)

train.Trainer.rollback = rollback_then_die
sys.exit(launcher.main(sys.argv[1:]))
"""


def rollback_args(bad: Poisoned, out: Path, run: str) -> list[str]:
    return bad.args(out, run, "epochs=2", "checkpoint.every_steps=3", "on_nonfinite=rollback", "trackio.enabled=true",
                    "trackio.system_metrics=false", "log_every_steps=2")


@dataclass
class Straight:
    bad: Poisoned
    last: Path
    store: Path
    result: subprocess.CompletedProcess

    @property
    def steps(self) -> list[int]:
        """The steps that fail: batch b of epoch 0, and of epoch 1 (after an epoch one batch short)."""
        return [self.bad.batches[0] + 1, STEPS_PER_EPOCH - 1 + self.bad.batches[1] + 1]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Straight:
    """Two epochs with the bad row in both (batch 4, then a later one), never interrupted."""
    root = tmp_path_factory.mktemp("rollbacks")
    bad = poison(root, 2, lambda b: b[0] == 4 and b[1] is not None and b[1] >= 2)
    out, store = root / "out", root / "trackio"
    store.mkdir()
    result = launch(rollback_args(bad, out, "rb"), cwd=root, trackio_dir=store)
    return Straight(bad, run_layout(out, "rb").last, store, result)


def assert_trackio_shows_the_rollbacks(store: Path, run: str, steps: list[int]) -> None:
    rows = trackio_rows(store, run)
    events = [(row["step"], row["train/rollbacks"], row["train/rollback_to_step"]) for row in rows if "train/rollbacks" in row]
    assert [(step, count) for step, count, _ in events] == [(steps[0], 1), (steps[1], 2)], events
    assert all(to < step for step, _, to in events)
    evaluations = sorted(row["step"] for row in rows if "eval/energy_distance" in row)
    assert evaluations == [STEPS_PER_EPOCH - 1, 2 * (STEPS_PER_EPOCH - 1)], rows
    keys = [(row["step"], tuple(sorted(k for k in row if k not in ("timestamp", "eval/samples")))) for row in rows]
    assert len(keys) == len(set(keys)), "a row reached trackio twice"


def test_rollbacks_leave_the_bad_batches_out_and_show_in_trackio(straight):
    result, bad = straight.result, straight.bad
    assert result.returncode == 0, result.stderr[-2000:]
    lines = lines_starting(result.stdout, "rollback")
    assert [line.split(":")[0] for line in lines] == ["rollback 1/3", "rollback 2/3"], lines
    assert all(f"non-finite at step {step}" in line for line, step in zip(lines, straight.steps)), lines
    state = read_checkpoint(straight.last)
    assert state["skipped"] == [[0, bad.batches[0]], [1, bad.batches[1]]] and state["rollbacks"] == 2
    assert state["step"] == 2 * (STEPS_PER_EPOCH - 1) and state["epoch"] == 2
    assert all(torch.isfinite(value).all() for value in state["model"].values())
    assert all(np.isfinite(v) for k, v in state["metrics"].items() if k.startswith("eval/"))
    assert_trackio_shows_the_rollbacks(straight.store, "rb", straight.steps)


def test_a_run_killed_after_a_rollback_resumes_without_the_bad_batch(straight, tmp_path):
    """The skip is in last.pt before the rollback's line is printed: the resumed run leaves
    the batch out (no second rollback for it) and ends bit-identical to the run that was
    never killed, with trackio holding each row once."""
    assert straight.result.returncode == 0, straight.result.stderr[-2000:]
    out, store = tmp_path / "out", tmp_path / "trackio"
    store.mkdir()
    args = rollback_args(straight.bad, out, "rk")
    env = launcher_env(store) | {"PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, "-c", ROLLBACK_THEN_DIE, *args], check=False, cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(lines_starting(killed.stdout, "rollback 1/3")) == 1
    last = run_layout(out, "rk").last
    assert read_checkpoint(last)["skipped"] == [[0, straight.bad.batches[0]]]

    result = launch([*args, "resume=true"], cwd=tmp_path, trackio_dir=store)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [line.split(":")[0] for line in lines_starting(result.stdout, "rollback")] == ["rollback 2/3"]
    resumed, uninterrupted = read_checkpoint(last), read_checkpoint(straight.last)
    assert resumed["skipped"] == uninterrupted["skipped"] and resumed["rollbacks"] == 2
    for key in ("model", "ema"):
        state_equal(resumed, uninterrupted, key)
    assert resumed["metrics"] == uninterrupted["metrics"]
    assert_trackio_shows_the_rollbacks(store, "rk", straight.steps)


def test_under_ddp_every_rank_rolls_back_together(tmp_path):
    """torchrun, two processes (gloo): the bad row is in one rank's share of a global batch;
    the flag is all-reduced, both ranks reload rank 0's last.pt and leave that batch out."""
    half = 32  # per rank: 461 // (32 x 2) = 7 global batches an epoch
    bad = poison(tmp_path, 1, lambda b: b[0] == 3, batch=half, rank=1, world=2)
    out = tmp_path / "out"
    args = bad.args(out, "ddp", f"batch_size={half}", "epochs=1", "checkpoint.every_steps=2", "on_nonfinite=rollback")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TRACKIO_DIR": str(tmp_path / ".trackio-unused")}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(LAUNCHER), *args], check=False, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = lines_starting(result.stdout, "rollback")
    assert len(lines) == 1 and "loss became non-finite on 1 of 2 ranks at step 4 (epoch 1, batch 4)" in lines[0], lines
    state = read_checkpoint(run_layout(out, "ddp").last)
    assert state["skipped"] == [[0, 3]] and state["step"] == 6 and state["epoch"] == 1 and state["rollbacks"] == 1
    assert all(torch.isfinite(value).all() for value in state["model"].values())
