"""scripts/trackio_delete.py against a real, temporary trackio store.

The store is written once by real ``trackio.init / log / finish`` calls in a
subprocess (TRACKIO_DIR must be set before trackio is imported: it reads it at
import time) and copied for each test; the script also runs as a subprocess."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT = "denoising-zoo"
RUNS = {"mlp_lr1": 3, "mlp_lr2": 2, "unet_base": 4}  # name -> number of logged epochs

MAKE_STORE = f"""
import numpy as np
import trackio
from PIL import Image
Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save("plot.png")
for name, epochs in {RUNS!r}.items():
    trackio.init(project={PROJECT!r}, name=name, config={{"run_name": name}})
    for epoch in range(epochs):
        trackio.log({{"epoch": epoch, "train/loss": 1.0 / (epoch + 1), "eval/samples": trackio.Image("plot.png")}})
    trackio.finish()
trackio.init(project="other-project", name="mlp_elsewhere")
trackio.log({{"epoch": 0}})
trackio.finish()
"""

READ_STORE = f"""
import json
from trackio.sqlite_storage import SQLiteStorage
print(json.dumps({{run: SQLiteStorage.get_log_count({PROJECT!r}, run) for run in SQLiteStorage.get_runs({PROJECT!r})}}))
"""


def env_for(store: Path) -> dict[str, str]:
    return {**os.environ, "TRACKIO_DIR": str(store)}


@pytest.fixture(scope="module")
def template_store(tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("trackio_template")
    subprocess.run([sys.executable, "-c", MAKE_STORE], env=env_for(store), check=True, capture_output=True, cwd=store)
    return store


@pytest.fixture
def store(template_store, tmp_path) -> Path:
    copy = tmp_path / "trackio"
    shutil.copytree(template_store, copy)
    return copy


def run_script(store: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "trackio_delete.py"), *args],
        env=env_for(store),
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
    )


def runs_left(store: Path) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", READ_STORE], env=env_for(store), check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_list_shows_runs_sizes_and_last_step(store):
    result = run_script(store, "--list")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[2:]}
    assert set(rows) == set(RUNS)
    for name, epochs in RUNS.items():
        # name, id, date, time, entries, last step, media size
        assert rows[name][4:6] == [str(epochs), str(epochs - 1)]
        assert rows[name][7] == "kB"


def test_dry_run_deletes_nothing(store):
    result = run_script(store, "^mlp", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "mlp_lr1" in result.stdout and "mlp_lr2" in result.stdout and "unet_base" not in result.stdout
    assert "nothing deleted" in result.stdout
    assert runs_left(store) == RUNS


@pytest.mark.parametrize("answer", ["", "n\n", "no\n", "whatever\n"])
def test_declined_or_default_answer_deletes_nothing(store, answer):
    result = run_script(store, "mlp", stdin=answer)
    assert result.returncode == 1
    assert "[y/N]" in result.stdout and "nothing deleted" in result.stdout
    assert runs_left(store) == RUNS


def test_confirmed_deletion_removes_exactly_the_matches(store):
    result = run_script(store, "lr\\d$", stdin="y\n")
    assert result.returncode == 0, result.stderr
    assert runs_left(store) == {"unet_base": 4}
    media = store / "media" / PROJECT
    assert sorted(p.name for p in media.iterdir()) == ["unet_base"]  # trackio leaves media; the script removes it
    # the other project's run named like a match is untouched
    other = run_script(store, "--list", "--project", "other-project")
    assert "mlp_elsewhere" in other.stdout


def test_full_match_and_yes(store):
    result = run_script(store, "mlp_lr", "--full-match", "--yes")
    assert result.returncode == 2  # a prefix is not the whole name
    result = run_script(store, "mlp_lr1", "--full-match", "--yes")
    assert result.returncode == 0, result.stderr
    assert "[y/N]" not in result.stdout
    assert runs_left(store) == {"mlp_lr2": 2, "unet_base": 4}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["mlp_(lr"], "invalid regular expression"),
        (["^resnet"], "no run in project"),
        (["mlp", "--project", "missing-project"], "no trackio project 'missing-project'"),
    ],
)
def test_bad_input_is_one_line_and_deletes_nothing(store, args, message):
    result = run_script(store, *args, "--yes")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr
    assert runs_left(store) == RUNS


def test_project_with_no_runs(store):
    assert run_script(store, ".", "--yes").returncode == 0  # empty the project
    result = run_script(store, "--list")
    assert result.returncode == 2 and "has no runs" in result.stderr
