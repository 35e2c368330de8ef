"""What a user can get wrong on the command line, run through ``launcher.py``.

Each case must end with one line on stderr that starts with ``error:`` and names the
bad value, no Python traceback, a non-zero exit status, and no change to any existing
checkpoint, plot or trackio record: every case runs against a copy of a finished run
whose files are hashed before and after.

Cases where the process matters (the missing run name in an empty folder, the config
error, hostile pickles, a diverging run) start a real ``python launcher.py``; the rest
call ``launcher.main(argv)`` in this process, which is the same code without the
seconds of importing torch again (an escaping exception fails the test just as a
traceback on stderr would).
"""

import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import launcher
from models.checkpoint import read_checkpoint
from tests.conftest import CONFIG_DIR, TINY_OVERRIDES, TrainedRun, last_line, launch, tree_hashes

pytestmark = pytest.mark.slow


@dataclass
class Workspace:
    """A private copy of the trained run: its outputs and its trackio store."""

    root: Path
    output_dir: Path
    trackio_dir: Path
    last: Path
    before: dict[str, str]
    capsys: pytest.CaptureFixture
    monkeypatch: pytest.MonkeyPatch

    def args(self, *extra: str, run_name: str = "straight") -> list[str]:
        """The trained run's settings (trackio on, so a stray log would show), then ``extra``."""
        base = [o for o in TINY_OVERRIDES if o != "trackio.enabled=false"]
        return [f"run_name={run_name}", *base, f"output_dir={self.output_dir}", *extra]

    def launch(self, *extra: str, run_name: str = "straight") -> subprocess.CompletedProcess[str]:
        """A real ``python launcher.py`` process."""
        return launch(self.args(*extra, run_name=run_name), cwd=self.root, trackio_dir=self.trackio_dir)

    def main(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        """``launcher.main(argv)`` in this process, trackio off (it may already be
        imported here with another TRACKIO_DIR), with its output captured."""
        self.monkeypatch.chdir(self.root)
        self.capsys.readouterr()
        code = launcher.main([*argv, "trackio.enabled=false"])
        out = self.capsys.readouterr()
        return subprocess.CompletedProcess(argv, code, out.out, out.err)

    def run(self, *extra: str, run_name: str = "straight") -> subprocess.CompletedProcess[str]:
        return self.main(self.args(*extra, run_name=run_name))

    def untouched(self) -> bool:
        return tree_hashes(self.output_dir, self.trackio_dir) == self.before


@pytest.fixture
def ws(trained_run: TrainedRun, tmp_path, capsys, monkeypatch) -> Workspace:
    output_dir, store = tmp_path / "outputs", tmp_path / "trackio"
    shutil.copytree(trained_run.output_dir, output_dir)
    shutil.copytree(trained_run.trackio_dir, store)
    last = output_dir / "ckpts" / "mlp" / "straight" / "last.pt"
    monkeypatch.delenv("DZ_TRACEBACK", raising=False)
    return Workspace(tmp_path, output_dir, store, last, tree_hashes(output_dir, store), capsys, monkeypatch)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str, code: int | None = None) -> str:
    line = last_line(result.stderr)
    assert result.returncode != 0, result.stdout[-1000:]
    if code is not None:
        assert result.returncode == code, (result.returncode, line)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert line.startswith("error:"), result.stderr[-2000:]
    for needle in needles:
        assert needle in line, (needle, line)
    return line


# ---------------------------------------------------------------------------------
# The command line itself
# ---------------------------------------------------------------------------------


def test_missing_run_name_creates_nothing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = launch(["epochs=1"], cwd=empty)
    assert_one_line_error(result, "run_name", code=2)
    assert list(empty.iterdir()) == []  # no outputs/, no trackio store


def test_unknown_choice_lists_the_choices(ws):
    line = assert_one_line_error(ws.launch("model=nope"), "model/nope", code=2)
    for choice in sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml")):
        assert choice in line, choice
    assert ws.untouched()


@pytest.mark.parametrize(
    "override,needle",
    [
        ("epochs=-1", "epochs=-1"),
        ("batch_size=0", "batch_size=0"),
        ("precision=fp8", "precision=fp8"),
        ("optimizer.lr=abc", "optimizer.lr='abc': expected a number"),
        ("seed=abc", "seed='abc': expected an integer"),
        ("ema.warmup=abc", "ema.warmup='abc': expected true or false"),
        ("eval.batch_size=0", "eval.batch_size=0"),
        ("checkpoint.every_steps=-1", "checkpoint.every_steps=-1"),
    ],
)
def test_bad_values_are_refused(ws, override, needle):
    assert_one_line_error(ws.run(override, run_name="fresh"), needle, code=2)
    assert ws.untouched()


@pytest.mark.parametrize("overrides,needle", [(["dataloaders=points"], "dataloaders.dataset.path is required"),
                                              (["model=cnn"], "use an image data set")])
def test_incomplete_or_mismatched_groups_are_one_line(ws, overrides, needle):
    assert_one_line_error(ws.main(["run_name=fresh", *overrides, "device=cpu", f"output_dir={ws.output_dir}"]), needle, code=2)
    assert ws.untouched()


@pytest.mark.parametrize("name", ["", "a/b", "..", "../escape"])
def test_run_names_that_would_leave_the_run_folder_are_refused(ws, name):
    assert_one_line_error(ws.run(run_name=name), "run_name=", "no /, no ..", code=2)
    assert ws.untouched()


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["model.activation=nope"], "unknown activation 'nope'"),
        (["loss=meanflow", "loss.time.ratio=2"], "loss.time: ratio"),
        (["optimizer.lr=-1"], "-1"),
        (["ema.decay=2"], "ema decay"),
        (["loss.time.name=beta"], "'beta'"),
    ],
    ids=["model", "loss", "optimizer", "ema", "time_sampler"],
)
def test_bad_constructor_arguments_are_refused(ws, overrides, needle):
    """A model's, loss's or optimizer's own ValueError, not Hydra's multi-line wrapper."""
    assert_one_line_error(ws.run(*overrides, run_name="fresh"), needle, code=2)
    assert ws.untouched()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA, so device=cuda is valid here")
def test_cuda_without_cuda_is_refused(ws):
    assert_one_line_error(ws.run("device=cuda", run_name="fresh"), "device=cuda", "device=cpu", code=2)
    assert ws.untouched()


# ---------------------------------------------------------------------------------
# Runs and checkpoints
# ---------------------------------------------------------------------------------


def test_resume_without_a_checkpoint_is_refused(ws):
    assert_one_line_error(ws.run("resume=true", "epochs=5", run_name="never_ran"), "never_ran", "resume=true", code=2)
    assert ws.untouched()


def test_existing_run_is_not_overwritten_without_resume(ws):
    assert_one_line_error(ws.run("epochs=5"), "straight", "resume=true", code=2)
    assert ws.untouched()
    assert read_checkpoint(ws.last)["epoch"] == 4


class RunsCode:
    """Unpickling this runs a shell command: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def eval_checkpoint_file(tmp_path: Path, kind: str, trained_last: Path) -> Path:
    path = tmp_path / f"{kind}.pt"
    if kind == "missing":
        return path
    if kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "truncated":
        data = trained_last.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "not_training":
        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "pickle_runs_code":
        path.write_bytes(pickle.dumps(RunsCode(tmp_path / "MARKER")))
    elif kind == "torch_save_runs_code":
        torch.save({"model": RunsCode(tmp_path / "MARKER")}, path)
    return path


@pytest.mark.parametrize(
    "kind,needle",
    [
        ("missing", "does not exist"),
        ("text", "not a readable torch checkpoint"),
        ("truncated", "truncated or corrupt"),
        ("not_training", "not a training checkpoint"),
        ("pickle_runs_code", "not a readable torch checkpoint"),  # a bare pickle is never unpickled
        ("torch_save_runs_code", "refused by the safe loader"),  # torch's zip format, refused by weights_only
    ],
)
def test_bad_eval_checkpoint_is_refused(ws, kind, needle):
    path = eval_checkpoint_file(ws.root, kind, ws.last)
    argv = [f"eval_checkpoint={path}", f"output_dir={ws.output_dir}", "device=cpu"]
    if kind.endswith("runs_code"):  # a real process: whatever the file runs, it would run there
        result = launch(argv, cwd=ws.root, trackio_dir=ws.trackio_dir)
    else:
        result = ws.main(argv)
    assert_one_line_error(result, str(path), needle, code=2)
    assert not (ws.root / "MARKER").exists(), "loading the checkpoint ran code"
    assert ws.untouched()


def test_the_hostile_pickle_really_runs_code_when_loaded_unsafely(tmp_path):
    """Control for the case above: the same file under a plain pickle.load does run code."""
    path = eval_checkpoint_file(tmp_path, "pickle_runs_code", Path())
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.load(open({str(path)!r}, 'rb'))"], check=True)
    assert (tmp_path / "MARKER").exists()


# ---------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content,needle",
    [
        (None, "does not exist"),
        (np.zeros(50, dtype=np.float32), "shape (50,)"),
        (np.zeros((50, 3), dtype=np.float32), "D=3"),
    ],
    ids=["missing", "one_dimensional", "wrong_dimension"],
)
def test_bad_points_file_is_refused(ws, content, needle):
    path = ws.root / "points.npy"
    if content is not None:
        np.save(path, content)
    result = ws.main(["run_name=points_run", "dataloaders=points", f"dataloaders.dataset.path={path}", "device=cpu",
                      f"output_dir={ws.output_dir}"])  # fmt: skip
    assert_one_line_error(result, str(path), needle, code=2)
    assert ws.untouched()


# ---------------------------------------------------------------------------------
# A loss that stops being finite
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("lr,value,process", [("1e18", "inf", True), ("1e38", "nan", False)])
def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(ws, lr, value, process):
    """Resume the finished run with a learning rate that wrecks the weights at the first
    new step (a resumed run may change its optimizer, not its data): the step after it
    fails, before anything is written."""
    extra = ["resume=true", "epochs=5", f"optimizer.lr={lr}", "grad_clip=0", "warmup_steps=0", "trackio.enabled=false"]
    result = ws.launch(*extra) if process else ws.run(*extra)
    line = assert_one_line_error(result, f"loss became {value}", "step 34", code=1)
    assert "last good checkpoint" in line
    assert ws.untouched()
    assert read_checkpoint(ws.last)["step"] == 32
