"""What a user can get wrong on the command line, run through ``launcher.py``.

Each case must end with one line on stderr that starts with ``error:`` and names the
bad value, no Python traceback, a non-zero exit status, and no change to any existing
checkpoint, plot or trackio record: most cases run against a copy of a finished run
whose files are hashed before and after. The last section starts from nothing: each
mistake is refused with exit status 2 before a single folder (or trackio record) is
made, which is checked by finding the output folder, the working folder and the
trackio store as empty as they were.

Cases where the process matters (the missing run name in an empty folder, the config
error, hostile pickles, trackio's store read from the environment at import) start a
real ``python launcher.py``; the rest call ``launcher.main(argv)`` in this process,
which is the same code without the seconds of importing torch again (an escaping
exception fails the test just as a traceback on stderr would).
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
from config_checks import OPTIMIZERS, check_groups, check_loss, check_model, check_optimizer
from runs.checkpoint import read_checkpoint
from runs.layout import RUN_NAME_MAX
from tests.conftest import (
    CONFIG_DIR,
    TINY_OVERRIDES,
    TrainedRun,
    compose_train,
    last_line,
    launch,
    run_layout,
    tree_hashes,
)

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
    last = run_layout(output_dir, trained_run.run_name).last
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
        (["ema.decay=2"], "ema.decay=2"),
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
# Refused before anything is written: exit 2, one line naming the key, no folder
# ---------------------------------------------------------------------------------


@dataclass
class Empty:
    """A working folder, an output folder that does not exist yet and an empty trackio store."""

    root: Path
    cwd: Path
    output_dir: Path
    trackio_dir: Path
    capsys: pytest.CaptureFixture
    monkeypatch: pytest.MonkeyPatch

    def argv(self, overrides: list[str], run_name: str = "fresh") -> list[str]:
        given = {o.split("=", 1)[0] for o in overrides}
        base = ["device=cpu", *([] if "output_dir" in given else [f"output_dir={self.output_dir}"])]
        return [f"run_name={run_name}", *base, *(o.replace("{root}", str(self.root)) for o in overrides)]

    def main(self, overrides: list[str], run_name: str = "fresh") -> subprocess.CompletedProcess[str]:
        """``launcher.main`` in this process, trackio off (trackio reads its store's
        location once, at import; the cases that need it run in a process)."""
        self.monkeypatch.chdir(self.cwd)
        self.capsys.readouterr()
        argv = [*self.argv(overrides, run_name), "trackio.enabled=false"]
        code = launcher.main(argv)
        out = self.capsys.readouterr()
        return subprocess.CompletedProcess(argv, code, out.out, out.err)

    def nothing_written(self) -> bool:
        return not self.output_dir.exists() and not any(self.cwd.iterdir()) and not any(self.trackio_dir.iterdir())


@pytest.fixture
def empty(tmp_path, capsys, monkeypatch) -> Empty:
    cwd, store = tmp_path / "cwd", tmp_path / "trackio"
    cwd.mkdir()
    store.mkdir()
    monkeypatch.delenv("DZ_TRACEBACK", raising=False)
    return Empty(tmp_path, cwd, tmp_path / "outputs", store, capsys, monkeypatch)


def assert_refused(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Exit 2 and exactly one line on stderr, ``error: ...``, holding every needle."""
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-3000:]
    assert_one_line_error(result, *needles, code=2)


WRITE_DATA = {
    "empty": lambda path: path.write_bytes(b""),
    "strings": lambda path: np.save(path, np.array(["a", "b"])),
}
POINTS = ["dataloaders=points", "dataloaders.dataset.path={root}/points.npy"]
CONDITIONAL = "model.num_classes=${dataloaders.num_classes}"

REFUSED = {
    # group arguments, checked against the annotations of the constructors that take them
    "loss.p": (["loss=meanflow", "loss.p=abc"], ["loss.p='abc'", "a number"]),
    "loss.eps": (["loss=meanflow", "loss.eps=abc"], ["loss.eps='abc'", "a number"]),
    "loss.time.ratio": (["loss=meanflow", "loss.time.ratio=abc"], ["loss.time.ratio='abc'", "a number"]),
    "loss.time.ratio_imf": (["loss=imf", "loss.time.ratio=abc"], ["loss.time.ratio='abc'"]),
    "loss.time.mean_alphaflow": (["loss=alphaflow", "loss.time.mean=[1]"], ["loss.time.mean=[1]", "a number"]),
    "loss.time.std_mse": (["loss=mse", "loss.time.std=abc"], ["loss.time.std='abc'"]),
    "loss.cfg_interval": (["loss=meanflow", "loss.cfg_interval=[a,b]"], ["loss.cfg_interval=['a', 'b']", "2 numbers"]),
    "model.hidden": (["model.hidden=abc"], ["model.hidden='abc'", "an integer"]),
    "model.unknown": (["+model.width=3"], ["model.width", "takes no argument", "hidden"]),
    "model.time_scale_zero": (["dataloaders=digits", "model=cnn", "model.time_scale=0"], ["time_scale=0", "finite number > 0"]),
    "model.time_scale_nan": (["dataloaders=digits", "model=unet", "model.attention_resolutions=[4]", "model.time_scale=nan"], ["time_scale=nan", "finite number > 0"]),
    "model.time_scale_negative": (["dataloaders=digits", "model=dit_s", "model.time_scale=-1"], ["time_scale=-1", "finite number > 0"]),
    "optimizer._target_": (["optimizer._target_=torch.optim.Nope"], ["optimizer._target_='torch.optim.Nope'", "torch.optim.AdamW"]),
    "optimizer._target_outside": (["optimizer._target_=os.system"], ["optimizer._target_='os.system'", "torch.optim.SGD"]),
    "optimizer.unknown": (["optimizer._target_=torch.optim.SGD"], ["optimizer.betas", "takes no argument"]),
    "optimizer.betas": (["optimizer.betas=[0.9]"], ["optimizer.betas=[0.9]", "a list of 2 numbers"]),
    "optimizer.betas_range": (["optimizer.betas=[2.0,0.9]"], ["optimizer (torch.optim.Adam)", "beta"]),
    "optimizer.lr_inf": (["optimizer.lr=inf"], ["optimizer.lr=inf", "finite number > 0"]),
    "optimizer.lr_nan": (["optimizer.lr=nan"], ["optimizer.lr=nan", "finite number > 0"]),
    "optimizer.lr_zero": (["optimizer.lr=0"], ["optimizer.lr=0", "finite number > 0"]),
    "optimizer.lr_negative": (["optimizer.lr=-1e-3"], ["optimizer.lr=-0.001", "finite number > 0"]),
    "ema.decays": (["ema.decays=[abc]"], ["ema.decays=['abc']", "a list of numbers"]),
    "ema.decays_range": (["ema.decays=[0.99,1.5]"], ["ema.decays=[0.99, 1.5]", "[0, 1)"]),
    # the data: its files, and its shape against the data set and the model
    "points_empty": ([*POINTS, "+write=empty"], ["dataloaders.dataset.path=", "points.npy", "empty (0 bytes)"]),
    "points_strings": ([*POINTS, "+write=strings"], ["dataloaders.dataset.path=", "points.npy", "dtype <U1"]),
    "data_shape_vs_data_set": (["dataloaders.data_shape=[3]"], ["dataloaders.data_shape=[3]", "kmeans", "[2]"]),
    "data_shape_vs_model": (["dataloaders=digits"], ["model=mlp", "dataloaders.data_shape=[1, 8, 8]", "images [C, H, W]"]),
    "data_shape_not_integers": (["dataloaders.data_shape=[a]"], ["dataloaders.data_shape=['a']", "integers >= 1"]),
    # scalar keys
    "eval.guidance_scale": ([CONDITIONAL, "eval.guidance_scale=abc"], ["eval.guidance_scale='abc'", "a number"]),
    "eval.guidance_interval_order": (["eval.guidance_interval=[0.6,0.2]"], ["eval.guidance_interval=[0.6, 0.2]", "0 <= lo <= hi <= 1"]),
    "eval.guidance_interval_text": (["eval.guidance_interval=abc"], ["eval.guidance_interval=abc", "null or [lo, hi]"]),
    "eval.meanflow_steps_zero": (["eval.meanflow_steps=[0]"], ["eval.meanflow_steps entry 0", "a step count >= 1"]),
    "eval.consistency_steps_order": (["eval.consistency_steps=[[0,0.6,0.5,1]]"], ["eval.consistency_steps entry [0, 0.6, 0.5, 1]", "increase"]),
    "output_dir": (["output_dir="], ["output_dir=''", "current folder"]),
    "resume_and_overwrite": (["resume=true", "overwrite=true"], ["resume=true with overwrite=true", "drop one"]),
    "trackio.project_empty": (["trackio.project="], ["trackio.project=''", "not empty"]),
    "trackio.project_path": (["trackio.project=a/b"], ["trackio.project='a/b'", "no /"]),
    "seed": (["seed=1180591620717411303424"], ["seed=1180591620717411303424", "[0, 2**44)", "1_000_003"]),
    "seed_negative": (["seed=-1"], ["seed=-1", "[0, 2**44)"]),
    "on_nonfinite": (["on_nonfinite=skip"], ["on_nonfinite='skip'", "stop or rollback"]),
    "max_rollbacks_zero": (["on_nonfinite=rollback", "max_rollbacks=0"], ["max_rollbacks=0", ">= 1"]),
    "max_rollbacks_text": (["max_rollbacks=abc"], ["max_rollbacks='abc'", "an integer"]),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_before_anything_is_written(empty, case):
    overrides, needles = REFUSED[case]
    for write in [o.split("=", 1)[1] for o in overrides if o.startswith("+write=")]:
        WRITE_DATA[write](empty.root / "points.npy")
    result = empty.main([o for o in overrides if not o.startswith("+write=")])
    assert_refused(result, *needles)
    assert empty.nothing_written()


def test_a_run_name_too_long_for_its_file_names_is_refused(empty):
    result = empty.main([], run_name="a" * 300)
    assert_refused(result, "run_name=aaaa", "300 characters", f"at most {RUN_NAME_MAX}", "255")
    assert empty.nothing_written()
    launcher.validate_config(compose_train([f"run_name={'a' * RUN_NAME_MAX}"]))  # the longest allowed name passes


READ_ONLY_NEEDS_A_USER = pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")


@pytest.mark.parametrize("where", ["a_file", "under_a_file", pytest.param("read_only", marks=READ_ONLY_NEEDS_A_USER)])
def test_an_unusable_trackio_store_is_refused_before_the_run_folders(empty, where):
    """trackio's store is checked before the run's folders are made (a real process:
    trackio reads TRACKIO_DIR when it is imported)."""
    blocker = empty.root / "blocker"
    if where == "read_only":
        blocker.mkdir()
        blocker.chmod(0o555)
        store = blocker / "trackio"
    else:
        blocker.write_text("not a folder\n")
        store = blocker if where == "a_file" else blocker / "trackio"
    args = [*(o for o in TINY_OVERRIDES if o != "trackio.enabled=false"), "run_name=fresh", "epochs=1",
            f"output_dir={empty.output_dir}"]
    result = launch(args, cwd=empty.cwd, trackio_dir=store)
    assert_refused(result, f"TRACKIO_DIR={store}", "trackio.enabled=false")
    assert empty.nothing_written()
    assert blocker.read_text() == "not a folder\n" if blocker.is_file() else list(blocker.iterdir()) == []


# Controls: the checks refuse only what is wrong.


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")))
def test_every_preset_passes_the_group_checks(name):
    """The optimizer, loss and model of every preset (the model on the meta device, on
    its data's shape); the data sets themselves need files this machine lacks."""
    cfg = compose_train([f"experiment={name}"])
    check_optimizer(cfg)
    check_loss(cfg)
    check_model(cfg)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_torch_optimizer_is_accepted(optimizer):
    """Any torch.optim class, with the arguments it takes (SGD has no betas)."""
    cfg = compose_train([f"optimizer._target_=torch.optim.{optimizer}", "~optimizer.betas", "~optimizer.weight_decay"])
    check_optimizer(cfg)


def test_a_good_points_file_and_a_conditional_model_pass(tmp_path):
    path = tmp_path / "points.npy"
    np.save(path, np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32))
    check_groups(compose_train(["dataloaders=points", f"dataloaders.dataset.path={path}", "dataloaders.data_shape=[3]"]))
    check_groups(compose_train([CONDITIONAL, "loss=meanflow", "eval.guidance_scale=2.0"]))
    check_groups(compose_train(["dataloaders=digits", "model=cnn", CONDITIONAL]))
