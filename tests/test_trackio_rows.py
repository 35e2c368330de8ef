"""trackio ends a killed and resumed run with every row once: rows are told apart by
their step and their metric names, so the train row and the epoch-end (evaluation) row
of an epoch's last step are two rows, and a kill between them loses neither."""

import json
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from evaluation.tracking import RunRecord, row_key
from runs.checkpoint import read_checkpoint
from tests.conftest import REPO, TINY_OVERRIDES, launch, launcher_env, run_layout

# A real launcher run whose evaluation of epoch 1 kills the process (SIGKILL, no handler
# runs) once trackio has stored the train row of the same step: the point where a run
# resumed from its step checkpoint used to take that step for logged and drop the
# epoch-end row. The wait is for a condition in the killed process itself, not a timer.
KILLED_IN_EVALUATION = """
import os, signal, sys, time
from trackio.sqlite_storage import SQLiteStorage
import launcher, train

run, evaluate = sys.argv[1], train.Trainer.evaluate

def evaluate_then_die(self):
    if self.epoch == 1:
        deadline = time.monotonic() + 120
        while not any(int(row["step"]) == self.step and "train/loss" in row
                      for row in SQLiteStorage.get_logs("denoising-zoo", run)):
            if time.monotonic() > deadline:
                sys.exit("trackio never stored the train row of the epoch's last step")
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGKILL)
    return evaluate(self)

train.Trainer.evaluate = evaluate_then_die
sys.exit(launcher.main(sys.argv[2:]))
"""

READ_ROWS = """
import json, sys
from trackio.sqlite_storage import SQLiteStorage
rows = SQLiteStorage.get_logs("denoising-zoo", sys.argv[1])
print(json.dumps([{k: v for k, v in row.items() if isinstance(v, (int, float)) or k == "eval/samples"} for row in rows],
                 default=str))
"""


def trackio_rows(store: Path, run: str) -> list[dict]:
    out = subprocess.run([sys.executable, "-c", READ_ROWS, run], env=launcher_env(store), cwd=store,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


class FakeTrackio:
    """What RunRecord needs of the trackio module: log (recorded) and Image."""

    def __init__(self) -> None:
        self.logged: list[dict] = []

    def log(self, metrics: dict, step: int) -> None:
        self.logged.append({"step": step, **metrics})

    def Image(self, path: str, caption: str) -> str:  # trackio's name
        return f"image {path}"


def record_with(history: list[dict], held: list[dict]) -> tuple[RunRecord, FakeTrackio]:
    record, fake = RunRecord(), FakeTrackio()
    record.restore({"history": history, "totals": {}, "skipped": [], "rollbacks": 0})
    record.trackio = fake
    record.catch_up(held)
    return record, fake


TRAIN_4 = {"step": 4, "epoch": 0, "train/loss": 1.0, "train/lr": 1e-3}
TRAIN_8 = {"step": 8, "epoch": 0, "train/loss": 0.9, "train/lr": 1e-3}
END_8 = {"step": 8, "epoch": 1, "train/lr": 1e-3, "eval/energy_distance": 0.5}


def test_the_epoch_end_row_is_sent_though_trackio_holds_a_row_at_its_step():
    """The checkpoint (step 6) holds the row of step 4; trackio holds steps 4 and 8 (train).
    The resumed run redoes step 8: the train row is not sent again, the epoch-end row is."""
    stored = {"timestamp": "2026-01-01T00:00:00"}  # trackio's rows carry a timestamp, not part of the identity
    record, fake = record_with([TRAIN_4], [TRAIN_4 | stored, TRAIN_8 | stored])
    assert fake.logged == []
    record.log(dict(TRAIN_8))
    record.log(dict(END_8), picture=Path("epoch_0001.png"))
    assert [(row["step"], row["epoch"]) for row in fake.logged] == [(8, 1)]
    assert fake.logged[0]["eval/samples"] == "image epoch_0001.png"
    assert [row["step"] for row in record.history] == [4, 8, 8]


def test_rows_lost_before_the_flush_are_sent_once_and_repeated_rows_are_counted():
    """trackio lost every row (a kill before its first flush): the history is sent. Two rows
    with one identity (two rollbacks reported at one step) are two rows, not one."""
    rollback = {"step": 9, "epoch": 1, "train/rollbacks": 1.0, "train/rollback_to_step": 6}
    record, fake = record_with([TRAIN_4, rollback], [])
    assert [row["step"] for row in fake.logged] == [4, 9]
    record.log(rollback | {"train/rollbacks": 2.0})
    assert [row.get("train/rollbacks") for row in fake.logged] == [None, 1.0, 2.0]
    _, again = record_with([TRAIN_4, rollback, rollback | {"train/rollbacks": 2.0}], [TRAIN_4, rollback])
    assert [row["train/rollbacks"] for row in again.logged] == [2.0]  # the second of the two, not a duplicate
    assert row_key(TRAIN_8) != row_key(END_8) and row_key(TRAIN_8) == row_key(TRAIN_8 | {"timestamp": "t"})


@pytest.mark.slow
def test_a_kill_during_the_epoch_end_evaluation_loses_no_row(tmp_path):
    """8 steps an epoch, train rows every 4 steps, step checkpoints every 3, evaluation every
    epoch: the kill in epoch 1's evaluation leaves last.pt at step 6 and trackio holding the
    train row of step 8. After resume=true, each train and each evaluation row is there once."""
    store, out = tmp_path / "trackio", tmp_path / "out"
    store.mkdir()
    args = [*TINY_OVERRIDES, "trackio.enabled=true", "trackio.system_metrics=false", "log_every_steps=4",
            "checkpoint.every_steps=3", "eval.every_epochs=1", "checkpoint.archive_every_epochs=0", "epochs=2",
            "run_name=kv", f"output_dir={out}"]
    env = launcher_env(store) | {"PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, "-c", KILLED_IN_EVALUATION, "kv", *args], check=False, cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    last = run_layout(out, "kv").last
    assert read_checkpoint(last)["step"] == 6, "the kill must come after the step checkpoint at 6, before the epoch's at 8"
    before = trackio_rows(store, "kv")
    assert [(row["step"], "train/loss" in row) for row in before] == [(4, True), (8, True)], before

    result = launch([*args, "resume=true"], cwd=tmp_path, trackio_dir=store)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = trackio_rows(store, "kv")
    evaluations = [row["step"] for row in rows if "eval/energy_distance" in row]
    trains = [row["step"] for row in rows if "train/loss" in row and "eval/energy_distance" not in row]
    assert sorted(evaluations) == [8, 16], rows  # the epoch-end row of step 8 is there, once
    assert sorted(trains) == [4, 8, 12, 16], rows
    assert all(row.get("eval/samples") for row in rows if "eval/energy_distance" in row)  # the picture came with it
    history = read_checkpoint(last)["history"]
    identities = Counter(row_key(row) for row in rows)
    assert identities == Counter(row_key(row) for row in history), "trackio must hold exactly the rows the run logged"
    assert set(identities.values()) == {1}
    assert run_layout(out, "kv").plot(1).exists()
