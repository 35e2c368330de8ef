"""What a resumed or shared run may and may not do: a new learning rate is applied and
said, a new model, loss or data set refused; unwritable outputs found before the first
step; trackio's history continues without duplicates or holes after a kill."""

import subprocess

import pytest
import torch

from runs.checkpoint import read_checkpoint
from tests.conftest import TINY_OVERRIDES, PausedLaunch, last_line, launch, run_layout, tree_hashes
from tests.test_launcher import read_trackio

CONSTANT = [*TINY_OVERRIDES, "lr_schedule=constant", "warmup_steps=0", "trackio.enabled=false"]


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_rules")
    result = launch([*CONSTANT, "run_name=r", "epochs=2", f"output_dir={root / 'out'}"], cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    return root


@pytest.mark.slow
def test_resume_applies_a_new_learning_rate_and_says_so(two_epochs, tmp_path):
    out = tmp_path / "out"
    subprocess.run(["cp", "-r", str(two_epochs / "out"), str(out)], check=True)
    result = launch([*CONSTANT, "run_name=r", "epochs=3", "optimizer.lr=5e-4", "resume=true", f"output_dir={out}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resume: epochs 2 -> 3" in result.stdout and "resume: optimizer.lr 0.001 -> 0.0005" in result.stdout
    state = read_checkpoint(run_layout(out, "r").last)
    assert state["config"]["optimizer"]["lr"] == 5e-4  # what is recorded ...
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [5e-4]  # ... is what was used
    assert state["scheduler"]["base_lrs"] == [5e-4]


@pytest.mark.slow
@pytest.mark.parametrize("change,key", [("loss=meanflow", "loss"), ("model.hidden=64", "model.hidden"),
                                        ("dataloaders.dataset.num_clusters=4", "dataloaders.")])
def test_resume_refuses_another_model_loss_or_data(two_epochs, change, key):
    before = tree_hashes(two_epochs / "out")
    result = launch([*CONSTANT, "run_name=r", "epochs=3", "resume=true", change, f"output_dir={two_epochs / 'out'}"], cwd=two_epochs)
    line = last_line(result.stderr)
    assert result.returncode == 2 and line.startswith(f"error: resume=true cannot change {key}"), line
    assert tree_hashes(two_epochs / "out") == before


@pytest.mark.slow
def test_unwritable_outputs_are_found_before_the_first_step(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    result = launch([*CONSTANT, "run_name=w", "epochs=1", f"output_dir={blocker}"], cwd=tmp_path)
    assert result.returncode == 2 and last_line(result.stderr).startswith(f"error: output_dir={blocker}: cannot write")
    store = tmp_path / "store_file"
    store.write_text("not a folder either\n")
    result = launch([*TINY_OVERRIDES, "run_name=w", "epochs=1", "trackio.enabled=true", f"output_dir={tmp_path / 'out'}"],
                    cwd=tmp_path, trackio_dir=store)
    assert result.returncode == 2 and last_line(result.stderr).startswith(f"error: TRACKIO_DIR={store} is not writable")
    assert not run_layout(tmp_path / "out", "w").last.exists()
    assert blocker.read_text() == "not a folder\n"


@pytest.mark.slow
def test_trackio_history_after_a_kill_has_no_duplicates_and_no_holes(tmp_path):
    """Evaluate and log every epoch, checkpoint every 3: a kill -9 at the first step of epoch 5 leaves trackio
    ahead of the checkpoint (epoch 4 logged, or in trackio's buffer; checkpoint at 3). The resumed run
    redoes them; each epoch must appear exactly once."""
    store, out = tmp_path / "trackio", tmp_path / "out"
    store.mkdir()
    args = [*TINY_OVERRIDES, "trackio.enabled=true", "trackio.system_metrics=false", "dataloaders.dataset.num_samples=4096",
            "eval.every_epochs=1", "checkpoint.every_epochs=3", "checkpoint.archive_every_epochs=0", "epochs=8",
            "run_name=h", f"output_dir={out}"]
    run = PausedLaunch(args, pause_at=4 * 64 + 1, cwd=tmp_path, stderr_path=tmp_path / "h.stderr", trackio_dir=store)
    run.proc.kill()  # SIGKILL at the first step of epoch 5: epoch 4 was logged, the checkpoint is epoch 3's
    run.finish()
    assert read_checkpoint(run_layout(out, "h").last)["epoch"] == 3
    result = launch([*args, "resume=true"], cwd=tmp_path, trackio_dir=store)
    assert result.returncode == 0, result.stderr[-2000:]
    steps = [int(row["step"]) for row in read_trackio(store, "h")["logs"] if "epoch" in row]
    assert steps == [64 * e for e in range(1, 9)], steps  # one row per epoch, in order, none missing
    final = read_checkpoint(run_layout(out, "h").last)
    assert torch.isfinite(torch.tensor(final["metrics"]["eval/energy_distance"]))


def test_a_resumed_run_may_find_its_data_elsewhere():
    """Where the data lies is the machine's: a moved data folder is a change, not a refusal;
    the data set itself stays fixed."""
    from runs.errors import RunError
    from runs.layout import resume_changes

    saved = {"dataloaders": {"name": "cifar10", "root": "data", "dataset": {"root": "data", "download": False, "flip": True}}}
    moved = {"dataloaders": {"name": "cifar10", "root": "/scratch/c10", "dataset": {"root": "/scratch/c10", "download": True,
                                                                                   "flip": True}}}
    assert resume_changes(saved, moved) == {"dataloaders.dataset.download": (False, True),
                                            "dataloaders.dataset.root": ("data", "/scratch/c10"),
                                            "dataloaders.root": ("data", "/scratch/c10")}
    flipped = {"dataloaders": {**moved["dataloaders"], "dataset": {**moved["dataloaders"]["dataset"], "flip": False}}}
    with pytest.raises(RunError, match="cannot change dataloaders.dataset.flip"):
        resume_changes(saved, flipped)
