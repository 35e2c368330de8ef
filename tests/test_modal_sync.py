"""``scripts/modal_app.py sync``: merging the volume's trackio store into the local one.

Both stores are written by real ``trackio.init / log / finish`` calls in subprocesses
(trackio reads TRACKIO_DIR at import, so each store needs its own process) and read
back through trackio's own storage API, the one ``trackio show`` lists runs with.
A folder stands in for the volume (``<volume>/trackio`` is the remote TRACKIO_DIR).
"""

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.modal_app import FolderVolume, sync_trackio

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "denoising-zoo"

WRITE = """
import json, sys
import numpy as np
import trackio
from PIL import Image
for project, name, logs, resume in json.loads(sys.argv[1]):
    Image.fromarray(np.full((8, 8, 3), len(name) * 20, dtype=np.uint8)).save("plot.png")
    trackio.init(project=project, name=name, config={"run_name": name, "lr": 1e-3}, resume="must" if resume else "never",
                 embed=False, auto_log_gpu=False, auto_log_cpu=False)
    first = 100 if resume else 0
    for step in range(first, first + logs):
        trackio.log({"train/loss": 1.0 / (step + 1), "epoch": step}, step=step)
    trackio.log({"eval/samples": trackio.Image("plot.png", caption=name)}, step=first + logs)
    trackio.finish()
"""

READ = """
import json, sys
from trackio.sqlite_storage import SQLiteStorage
out = {}
for project in SQLiteStorage.get_projects():
    out[project] = {run: SQLiteStorage.get_log_count(project, run) for run in SQLiteStorage.get_runs(project)}
print(json.dumps(out))
"""


def trackio_env(store: Path) -> dict[str, str]:
    return {**os.environ, "TRACKIO_DIR": str(store)}


def write_store(store: Path, runs: list[tuple[str, str, int, bool]]) -> None:
    store.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", WRITE, json.dumps(runs)], env=trackio_env(store), cwd=store, check=True,
                   capture_output=True, timeout=120)


def read_store(store: Path) -> dict[str, dict[str, int]]:
    result = subprocess.run([sys.executable, "-c", READ], env=trackio_env(store), check=True, capture_output=True,
                            text=True, timeout=60)
    return json.loads(result.stdout.strip().splitlines()[-1])


def dump(store: Path) -> dict:
    """Every row of every table and every media file: what 'changes nothing' compares."""
    tables = {}
    for db in sorted(store.glob("*.db")):
        conn = sqlite3.connect(db)
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        tables[db.name] = {n: sorted(map(repr, conn.execute(f"SELECT * FROM {n}"))) for n in names}
        conn.close()
    media = {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted((store / "media").rglob("*")) if p.is_file()}
    return {"tables": tables, "media": media}


def rows_of(store: Path, run_name: str) -> list:
    conn = sqlite3.connect(store / f"{PROJECT}.db")
    rows = sorted(map(repr, conn.execute("SELECT * FROM metrics WHERE run_name = ?", (run_name,))))
    rows += sorted(map(repr, conn.execute("SELECT * FROM configs WHERE run_name = ?", (run_name,))))
    conn.close()
    return rows


def image_paths(store: Path, run_name: str) -> list[str]:
    conn = sqlite3.connect(store / f"{PROJECT}.db")
    paths = []
    for (blob,) in conn.execute("SELECT metrics FROM metrics WHERE run_name = ?", (run_name,)):
        value = json.loads(blob).get("eval/samples")
        if value is not None:
            paths.append(value["file_path"])
    conn.close()
    return paths


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("sync")
    volume, local = base / "vol", base / "local"
    write_store(volume / "trackio", [(PROJECT, "a", 3, False), (PROJECT, "shared", 2, False), ("other-project", "b", 1, False)])
    write_store(local, [(PROJECT, "shared", 4, False), (PROJECT, "local_only", 1, False)])
    return volume, local


def test_sync_merges_remote_runs_beside_local_ones(stores):
    volume, local = stores
    before = {name: rows_of(local, name) for name in ("shared", "local_only")}
    local_media = dump(local)["media"]

    report = sync_trackio(FolderVolume(volume), local)
    assert sorted(report) == [
        "denoising-zoo/a -> a (5 rows, 1 media files)",
        "denoising-zoo/shared -> shared@modal (4 rows, 1 media files)",
        "other-project/b -> b (3 rows, 1 media files)",
    ]
    assert read_store(local) == {
        PROJECT: {"shared": 5, "local_only": 2, "a": 4, "shared@modal": 3},
        "other-project": {"b": 2},
    }
    # Local runs are untouched: same rows (ids included), same media files.
    assert {name: rows_of(local, name) for name in ("shared", "local_only")} == before
    after_media = dump(local)["media"]
    assert all(after_media[k] == v for k, v in local_media.items())

    # The renamed run's plot moved with it, and points at a file that exists.
    (path,) = image_paths(local, "shared@modal")
    assert path.startswith(f"{PROJECT}/shared@modal/")
    remote_file = volume / "trackio" / "media" / PROJECT / "shared" / path.split("/", 2)[2]
    assert (local / "media" / path).read_bytes() == remote_file.read_bytes()
    assert image_paths(local, "shared")[0].startswith(f"{PROJECT}/shared/")

    # A second sync is a no-op.
    snapshot = dump(local)
    assert sync_trackio(FolderVolume(volume), local) == []
    assert dump(local) == snapshot


def test_a_resumed_remote_run_brings_only_its_new_rows(stores):
    volume, local = stores
    sync_trackio(FolderVolume(volume), local)  # whatever the order of the tests: start from a synced store
    write_store(volume / "trackio", [(PROJECT, "shared", 2, True)])  # the remote run goes on
    report = sync_trackio(FolderVolume(volume), local)
    assert report == ["denoising-zoo/shared -> shared@modal (3 rows, 1 media files)"]
    counts = read_store(local)[PROJECT]
    assert counts["shared@modal"] == 6 and counts["shared"] == 5
    assert sync_trackio(FolderVolume(volume), local) == []


def test_sync_into_an_empty_store_copies_everything(stores, tmp_path):
    volume, _ = stores
    empty = tmp_path / "fresh"
    sync_trackio(FolderVolume(volume), empty)
    remote = read_store(volume / "trackio")
    assert read_store(empty) == remote
    assert sync_trackio(FolderVolume(volume), empty) == []
