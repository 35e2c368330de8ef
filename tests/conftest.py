"""Shared fixtures: the composed training config shrunk to CPU-sized work, a private
trackio store, and a helper that runs ``launcher.py`` the way a user does.

Everything a test writes goes under pytest's temporary folders: ``output_dir`` points
there and ``TRACKIO_DIR`` is set before trackio is imported (trackio reads it once,
at import time, so runs that log to trackio happen in a subprocess).
"""

import hashlib
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from runs.layout import RunLayout

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
LAUNCHER = REPO / "launcher.py"

# The smallest run that still exercises every part of the loop: 8 steps per epoch
# (``epochs`` is left to each test),
# a 2 x 32 MLP, 200 evaluation samples through 10 solver steps. The EMA decay is low
# so that the evaluated weights move within a few steps.
TINY_OVERRIDES = [
    "device=cpu",
    "model.hidden=32",
    "model.depth=2",
    "dataloaders.dataset.num_samples=512",
    "batch_size=64",
    "eval.num_samples=200",
    "eval.steps=10",
    "warmup_steps=4",
    "ema.decay=0.9",
    "trackio.enabled=false",
]


def compose_train(overrides: list[str] | None = None) -> DictConfig:
    """``configs/train.yaml`` composed with Hydra's compose API, as the launcher does."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=["run_name=test", *(overrides or [])])


@pytest.fixture
def cfg_train(tmp_path) -> DictConfig:
    """The default training config shrunk for a CPU test, writing under ``tmp_path``."""
    cfg = compose_train()
    with open_dict(cfg):
        cfg.device = "cpu"
        cfg.output_dir = str(tmp_path / "outputs")
        cfg.epochs = 2
        cfg.batch_size = 64
        cfg.warmup_steps = 4
        cfg.model.hidden = 32
        cfg.model.depth = 2
        cfg.dataloaders.dataset.num_samples = 512
        cfg.eval.num_samples = 200
        cfg.eval.steps = 10
        cfg.ema.decay = 0.9
        cfg.trackio.enabled = False
    return cfg


@pytest.fixture
def trackio_dir(tmp_path, monkeypatch) -> Path:
    """A private, empty trackio store; subprocesses started by the test inherit it."""
    store = tmp_path / "trackio"
    store.mkdir()
    monkeypatch.setenv("TRACKIO_DIR", str(store))
    return store


def launcher_env(trackio_dir: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}  # one thread each: the CI box has 2 cores
    env.pop("DZ_TRACEBACK", None)
    if trackio_dir is not None:
        env["TRACKIO_DIR"] = str(trackio_dir)
    return env


def launch(args: list[str], cwd: Path, trackio_dir: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``python /abs/path/launcher.py ARGS`` from ``cwd`` and capture its output.

    Without ``trackio_dir`` the run must not log to trackio (pass trackio.enabled=false);
    TRACKIO_DIR then points at a folder inside ``cwd`` so nothing reaches the user's store.
    """
    store = trackio_dir if trackio_dir is not None else cwd / ".trackio-unused"
    return subprocess.run(
        [sys.executable, str(LAUNCHER), *args],
        cwd=cwd,
        env=launcher_env(store),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def last_line(stream: str) -> str:
    """The last non-empty line of a stream (progress bars rewrite lines with \\r)."""
    lines = [line.strip() for line in stream.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def tree_hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots``, keyed by path: a snapshot to compare."""
    return {
        str(path): hashlib.sha256(path.read_bytes()).hexdigest()
        for root in roots
        if root.exists()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def run_layout(output_dir: Path, run: str, arch: str = "mlp") -> RunLayout:
    """Where run ``run`` keeps its files under ``output_dir`` (tests ask ``runs.layout``, never spell a path)."""
    return RunLayout(Path(output_dir), arch, run)


@dataclass
class TrainedRun:
    """A finished 4-epoch tiny run: checkpoints, plots and a trackio record."""

    output_dir: Path
    trackio_dir: Path
    run_name: str
    overrides: list[str]  # what was passed besides run_name, epochs and output_dir
    stdout: str

    @property
    def layout(self) -> RunLayout:
        return run_layout(self.output_dir, self.run_name)

    @property
    def last(self) -> Path:
        return self.layout.last

    def archive(self, epoch: int) -> Path:
        return self.layout.archive(epoch)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> TrainedRun:
    """One real launcher run shared by the launcher and bad-input tests (read-only:
    tests that change files work on a copy)."""
    root = tmp_path_factory.mktemp("trained")
    output_dir, store = root / "outputs", root / "trackio"
    store.mkdir()
    overrides = [
        *TINY_OVERRIDES,
        "trackio.enabled=true",
        "eval.every_epochs=1",
        "checkpoint.every_epochs=1",
        "checkpoint.archive_every_epochs=2",
        # The learning-rate schedule's horizon is max_steps when set (else epochs x steps
        # per epoch): fixing it lets a 2-epoch run resumed to 4 follow the same schedule.
        "max_steps=32",
    ]
    result = launch(["run_name=straight", *overrides, "epochs=4", f"output_dir={output_dir}"], cwd=root, trackio_dir=store)
    assert result.returncode == 0, result.stderr[-3000:]
    return TrainedRun(output_dir, store, "straight", overrides, result.stdout)


# python -c GATED PAUSE_AT LAUNCHER ARGS...: the launcher, as `python launcher.py ARGS`,
# with Trainer.train_step wrapped to pause after optimizer step PAUSE_AT.
GATED = """
import runpy, sys
from pathlib import Path
pause_at, launcher = int(sys.argv[1]), sys.argv[2]
sys.argv = sys.argv[2:]
sys.path.insert(0, str(Path(launcher).parent))
import train

step = train.Trainer.train_step

def gated_step(self, batch):
    step(self, batch)
    if self.step == pause_at:
        print(f"paused at step {self.step}", flush=True)
        sys.stdin.readline()  # the test kills or signals the run here, then lets it go on

train.Trainer.train_step = gated_step
runpy.run_path(launcher, run_name="__main__")
"""
HANG_GUARD_S = 300  # kills a run that never reaches its pause (the test then fails, it does not hang)


class PausedLaunch:
    """``python launcher.py ARGS`` that stops after optimizer step ``pause_at`` until
    released: a test kills or signals a run at a step it names, never at whatever moment
    a timer lands on."""

    def __init__(self, args: list[str], pause_at: int, cwd: Path, stderr_path: Path, trackio_dir: Path | None = None) -> None:
        self.pause_at, self.stderr_path = pause_at, stderr_path
        with self.stderr_path.open("w") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", GATED, str(pause_at), str(LAUNCHER), *args],
                cwd=cwd, env=launcher_env(trackio_dir if trackio_dir is not None else cwd / ".trackio-unused"),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True)
        self.guard = threading.Timer(HANG_GUARD_S, self.proc.kill)
        self.guard.daemon = True
        self.guard.start()
        while (line := self.proc.stdout.readline()) != f"paused at step {pause_at}\n":
            assert line, f"the run ended before step {pause_at}: {self.stderr()[-2000:]}"

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def release(self) -> None:
        self.proc.stdin.write("\n")
        self.proc.stdin.close()

    def finish(self) -> int:
        if not self.proc.stdin.closed:
            self.proc.stdin.close()
        self.proc.stdout.read()  # the rest of its log, so it never waits on a full pipe
        self.proc.wait()
        self.guard.cancel()
        return self.proc.returncode


def labelled_batch(n: int, dim: int, num_classes: int, seed: int = 0):
    """A float64 batch of ``n`` labelled ``dim``-dimensional points for the reference comparisons."""
    import torch

    from dataloaders.base_dataloaders import make_base_item

    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n, dim, generator=g, dtype=torch.float64) * 2
    x0 = torch.randn(n, dim, generator=g, dtype=torch.float64)
    label = torch.randint(num_classes, (n,), generator=g)
    return make_base_item(x1, x0, torch.rand(n, generator=g, dtype=torch.float64), label)


def relative(a, b) -> float:
    """``|a - b| / |b|``: the relative error of ``a`` against the reference ``b``."""
    return float((a - b).norm() / b.norm())

