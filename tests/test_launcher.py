"""End to end through ``launcher.py``: a short real run and what it leaves behind
(checkpoints, plots, the trackio record read back through trackio's own storage API),
exact resume, ``eval_checkpoint``, and checkpoints that survive an interrupted write.
"""

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from PIL import Image

import train
from runs.checkpoint import read_checkpoint, save_checkpoint
from runs.errors import CheckpointWriteError, RunError
from runs.layout import RunLayout
from runs.stored import load_model_from_checkpoint
from tests.conftest import REPO, TrainedRun, launch, launcher_env, run_layout, tree_hashes

pytestmark = pytest.mark.slow

READ_TRACKIO = """
import json, sys
from trackio.sqlite_storage import SQLiteStorage
project, run = sys.argv[1], sys.argv[2]
logs = SQLiteStorage.get_logs(project, run, scalar_only=True)
print(json.dumps({"runs": SQLiteStorage.get_runs(project), "logs": logs,
                  "config": SQLiteStorage.get_run_config(project, run)}, default=str))
"""


def read_trackio(store: Path, run: str, project: str = "denoising-zoo") -> dict:
    """The run's logged rows, through trackio's storage API in a process whose
    TRACKIO_DIR is ``store`` (trackio reads the variable at import time)."""
    out = subprocess.run(
        [sys.executable, "-c", READ_TRACKIO, project, run],
        env=launcher_env(store), capture_output=True, text=True, check=True, cwd=store,
    )
    return json.loads(out.stdout)


def by_epoch(logs: list[dict]) -> dict[int, dict]:
    return {int(row["epoch"]): row for row in logs if "epoch" in row}


def temporary(path: Path) -> Path:
    """Where a save writes ``path`` before renaming it into place (runs/checkpoint.py)."""
    return path.with_name(f".{path.name}.tmp")


# ---------------------------------------------------------------------------------
# A short real run
# ---------------------------------------------------------------------------------


def test_run_writes_checkpoints_and_plots(trained_run: TrainedRun):
    state = torch.load(trained_run.last, map_location="cpu", weights_only=True)
    for key in ("model", "ema", "optimizer", "scheduler", "scaler", "step", "epoch", "rng", "config", "metrics"):
        assert key in state, key
    assert state["epoch"] == 4 and state["step"] == 4 * 8  # 512 samples / batch 64 = 8 steps an epoch
    assert state["config"]["run_name"] == "straight" and isinstance(state["config"], dict)

    archives = sorted(trained_run.layout.archive_dir.iterdir())
    assert archives == [trained_run.archive(2), trained_run.archive(4)]  # archive_every_epochs=2
    assert read_checkpoint(trained_run.archive(2))["epoch"] == 2
    assert not list(trained_run.output_dir.rglob("*.tmp*")), "a temporary file was left behind"

    plots = sorted(trained_run.layout.plots.iterdir())
    assert plots == [trained_run.layout.plot(e) for e in (1, 2, 3, 4)]
    with Image.open(plots[-1]) as image:
        assert image.format == "PNG" and image.size[0] > 100

    model, cfg, _ = load_model_from_checkpoint(trained_run.last)  # rebuilt from the embedded config alone
    assert cfg.model.hidden == 32 and not model.training
    assert "epoch 4/4" in trained_run.stdout


def test_trackio_holds_the_run(trained_run: TrainedRun):
    record = read_trackio(trained_run.trackio_dir, "straight")
    assert record["runs"] == ["straight"]
    rows = by_epoch(record["logs"])
    assert sorted(rows) == [1, 2, 3, 4]
    assert [rows[e]["step"] for e in (1, 2, 3, 4)] == [8, 16, 24, 32]
    for row in rows.values():
        assert math.isfinite(row["train/loss"]) and row["train/loss"] > 0
        assert row["eval/energy_distance"] >= 0 and row["eval/energy_distance_floor"] >= 0
    assert record["config"]["run_name"] == "straight" and record["config"]["model"]["hidden"] == 32
    # the checkpoint's metrics are the ones logged at its epoch
    assert read_checkpoint(trained_run.last)["metrics"]["eval/energy_distance"] == rows[4]["eval/energy_distance"]


# ---------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------


def test_resume_is_bit_exact(trained_run: TrainedRun, tmp_path):
    """4 epochs straight == 2 epochs, then resume=true to 4: identical weights on the CPU."""
    out, store = tmp_path / "outputs", tmp_path / "trackio"
    store.mkdir()
    common = ["run_name=split", *trained_run.overrides, f"output_dir={out}"]
    first = launch([*common, "epochs=2"], cwd=tmp_path, trackio_dir=store)
    assert first.returncode == 0, first.stderr[-2000:]
    second = launch([*common, "epochs=4", "resume=true"], cwd=tmp_path, trackio_dir=store)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "epochs 3..4" in second.stdout

    straight = torch.load(trained_run.last, map_location="cpu", weights_only=True)
    resumed = torch.load(run_layout(out, "split").last, map_location="cpu", weights_only=True)
    assert (resumed["epoch"], resumed["step"]) == (straight["epoch"], straight["step"])
    for part in ("model", "ema"):
        assert straight[part].keys() == resumed[part].keys()
        for name, tensor in straight[part].items():
            assert torch.equal(tensor, resumed[part][name]), f"{part}.{name} differs after resume"
    for pid, moments in straight["optimizer"]["state"].items():
        assert torch.equal(moments["exp_avg_sq"], resumed["optimizer"]["state"][pid]["exp_avg_sq"])
    assert resumed["metrics"]["eval/energy_distance"] == straight["metrics"]["eval/energy_distance"]

    # the resumed run continues the same trackio run rather than starting a new one
    record = read_trackio(store, "split")
    assert record["runs"] == ["split"] and sorted(by_epoch(record["logs"])) == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------
# eval_checkpoint
# ---------------------------------------------------------------------------------


def test_eval_checkpoint_reproduces_the_logged_numbers(trained_run: TrainedRun, tmp_path):
    archive = trained_run.archive(2)
    before = tree_hashes(trained_run.output_dir)
    result = launch([f"eval_checkpoint={archive}", f"output_dir={tmp_path / 'out'}", "device=cpu"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert tree_hashes(trained_run.output_dir) == before  # evaluation writes only under its own output_dir

    (written_path,) = run_layout(tmp_path / "out", trained_run.run_name).eval_dir.glob("epoch_0002_*.json")
    written = json.loads(written_path.read_text())
    assert written["epoch"] == 2 and written["step"] == 16 and written["run_name"] == "straight"
    logged = by_epoch(read_trackio(trained_run.trackio_dir, "straight")["logs"])[2]
    stored = read_checkpoint(archive)["metrics"]
    for key in ("eval/energy_distance", "eval/energy_distance_floor"):
        assert written[key] == pytest.approx(logged[key], rel=1e-9, abs=1e-12), key
        assert written[key] == pytest.approx(stored[key], rel=1e-9, abs=1e-12), key
    assert f"eval/energy_distance: {written['eval/energy_distance']}" in result.stdout


# ---------------------------------------------------------------------------------
# In-process run of the composed config (lightning-hydra-template style)
# ---------------------------------------------------------------------------------


def test_train_run_in_process(cfg_train):
    metrics = train.run(cfg_train)
    assert metrics["epoch"] == 2 and math.isfinite(metrics["eval/energy_distance"])
    assert read_checkpoint(RunLayout.of(cfg_train).last)["step"] == 16


# ---------------------------------------------------------------------------------
# Checkpoints are never half-written
# ---------------------------------------------------------------------------------


def small_state(step: int) -> dict:
    return {"model": {"w": torch.full((1000,), float(step))}, "ema": {}, "step": step, "epoch": step, "config": {"run_name": "x"}}


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    last = run_layout(tmp_path, "run").last
    save_checkpoint(small_state(1), last)
    good = tree_hashes(last.parent)
    real_open = Path.open

    class HalfWriter:
        """A file that takes half of what it is given, then fails (a full disk, a kill)."""

        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(bytes(data)[: len(data) // 2])
            raise OSError(28, "No space left on device")

    def open_half(self, mode="r", *args, **kwargs):
        f = real_open(self, mode, *args, **kwargs)
        return HalfWriter(f) if "w" in mode else f

    monkeypatch.setattr(Path, "open", open_half)
    with pytest.raises(CheckpointWriteError, match=f"No space left on device.*the previous {last.name} is intact") as info:
        save_checkpoint(small_state(2), last)
    monkeypatch.undo()
    assert "\n" not in str(info.value) and info.value.exit_code == 1  # one line; training failed, not the input

    assert tree_hashes(last.parent) == good  # last.pt untouched, and the half-written temporary file removed
    assert read_checkpoint(last)["step"] == 1

    save_checkpoint(small_state(3), last)  # the next save goes through
    assert read_checkpoint(last)["step"] == 3
    assert list(last.parent.iterdir()) == [last]


KEEP_SAVING = """
import sys, torch
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from runs.checkpoint import save_checkpoint
path = Path(sys.argv[1])
for step in range(10**6):
    save_checkpoint({"model": {"w": torch.full((4_000_000,), float(step))}, "ema": {}, "step": step, "epoch": step,
                     "config": {}}, path)
    print(step, flush=True)
"""


def test_killed_writer_leaves_a_loadable_checkpoint(tmp_path):
    """SIGKILL a process that rewrites a 16 MB checkpoint in a loop, mid-write."""
    last = run_layout(tmp_path, "run").last
    proc = subprocess.Popen([sys.executable, "-c", KEEP_SAVING, str(last), str(REPO)], stdout=subprocess.PIPE, text=True)
    for _ in range(3):  # let it finish a few saves, then kill it while the next one is being written
        assert proc.stdout.readline(), "the writer died"
    while not temporary(last).exists():  # a save is under way (it writes 16 MB before the rename)
        assert proc.poll() is None, "the writer died"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = read_checkpoint(last)
    assert state["step"] >= 2 and torch.equal(state["model"]["w"], torch.full((4_000_000,), float(state["step"])))


def test_resume_ignores_a_stray_temp_file(cfg_train):
    """Only last.pt counts: a leftover temporary file is not resumed from."""
    last = RunLayout.of(cfg_train).last
    save_checkpoint(small_state(1), last)
    last.rename(temporary(last))
    with open_dict(cfg_train):
        cfg_train.resume = True
    with pytest.raises(RunError, match="has no checkpoint"):
        train.run(cfg_train)


@pytest.mark.parametrize("first_save", [True, False], ids=["killed_in_the_first_save", "killed_in_a_later_save"])
def test_claim_removes_the_temporary_files_of_killed_saves(tmp_path, first_save):
    """A save killed before its rename leaves ``.<file>.tmp``; the next launch removes
    this run's, once it holds the lock, and nobody else's."""
    layout, other = RunLayout(tmp_path, "mlp", "run"), RunLayout(tmp_path, "mlp", "run2")
    layout.run_dir.mkdir(parents=True)
    temporary(layout.last).write_bytes(b"half a checkpoint")
    layout.archive_dir.mkdir(parents=True)
    temporary(layout.archive(2)).write_bytes(b"half an archive")
    temporary(other.archive(2)).write_bytes(b"another run's save, under way")
    if not first_save:
        save_checkpoint(small_state(1), layout.last)
    handle = layout.claim(resume=not first_save, overwrite=False, trackio=False)
    try:
        assert sorted(layout.run_dir.iterdir()) == [layout.run_dir / ".lock", *([] if first_save else [layout.last])]
        assert list(layout.archive_dir.iterdir()) == [temporary(other.archive(2))]
    finally:
        layout.unlock(handle)
    assert not first_save or not layout.last.exists()


def test_claim_refused_under_the_lock_releases_it(tmp_path):
    """A run that another launch finished while this one was starting: refused, and the
    lock it took is released (no .lock left behind)."""
    layout = RunLayout(tmp_path, "mlp", "run")
    save_checkpoint(small_state(1), layout.last)
    with pytest.raises(RunError, match="already has"):
        layout.claim(resume=False, overwrite=False, trackio=False)
    assert list(layout.run_dir.iterdir()) == [layout.last]
    layout.unlock(layout.claim(resume=True, overwrite=False, trackio=False))  # and the run can be claimed again


@pytest.mark.parametrize("blocked", ["output_dir", "plots_root"])
def test_claim_on_an_unwritable_output_dir_leaves_no_folder(tmp_path, blocked):
    """A file where output_dir (or the folder of every run's plots, made after the
    checkpoint folders) should be: refused, and the folders made before the failure are
    removed again."""
    layout = RunLayout(tmp_path / "outputs", "mlp", "run")
    where = layout.output_dir if blocked == "output_dir" else layout.outputs.parent
    where.parent.mkdir(parents=True, exist_ok=True)
    where.write_text("a file where a folder should be\n")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(RunError, match="cannot write"):
        layout.claim(resume=False, overwrite=False, trackio=False)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
