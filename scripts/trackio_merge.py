"""Merge one trackio store (its SQLite files and media) into another.

``scripts/modal_app.py sync`` downloads the Modal volume's store and merges it here into
the local one, so ``trackio show`` lists remote runs beside local ones. The merge never
deletes or rewrites a local run: a remote run already imported (same trackio run id)
only gains the rows it does not have yet, so a second merge changes nothing; a remote
run whose name is taken by a different local run is imported as ``NAME@modal`` (then
``NAME@modal2``, ...). Metrics, configs, system metrics, alerts and media (sample
plots) are merged; traces and artifacts are not. trackio has no merge of its own, and
its API writes through a running server, so this works on the files directly.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

MODAL_SUFFIX = "@modal"  # a remote run whose name a different local run holds is imported as NAME@modal


class MergeError(ValueError):
    """A store that cannot be merged; the message is one line for the user."""


RUN_TABLES = ("metrics", "configs", "system_metrics", "alerts")  # run-scoped trackio tables that the merge copies




def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]


def _runs(conn: sqlite3.Connection) -> dict[str, str]:
    """run id -> run name, over every run-scoped table."""
    runs: dict[str, str] = {}
    for table in RUN_TABLES:
        if _columns(conn, table):
            for run_id, name in conn.execute(f"SELECT DISTINCT run_id, run_name FROM {table}"):
                runs.setdefault(run_id, name)
    return runs


def _create_like(remote: sqlite3.Connection, local: sqlite3.Connection) -> None:
    """An empty copy of the remote database's schema (and its schema version)."""
    for (sql,) in remote.execute("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%' "
                                 "ORDER BY type = 'index'"):
        local.execute(sql)
    local.execute(f"PRAGMA user_version = {remote.execute('PRAGMA user_version').fetchone()[0]}")


def _free_name(name: str, taken: set[str]) -> str:
    candidate, n = f"{name}{MODAL_SUFFIX}", 2
    while candidate in taken:
        candidate, n = f"{name}{MODAL_SUFFIX}{n}", n + 1
    return candidate


def _renamed_media(value, old_prefix: str, new_prefix: str):
    """trackio stores media as ``{"_type": "trackio.image", "file_path": "<project>/<run>/<step>/<file>"}``
    inside the metrics JSON; a renamed run's paths move with it."""
    if isinstance(value, dict):
        if str(value.get("_type", "")).startswith("trackio.") and str(value.get("file_path", "")).startswith(old_prefix):
            return value | {"file_path": new_prefix + value["file_path"][len(old_prefix):]}
        return {k: _renamed_media(v, old_prefix, new_prefix) for k, v in value.items()}
    if isinstance(value, list):
        return [_renamed_media(v, old_prefix, new_prefix) for v in value]
    return value


def _copy_media(src: Path, dst: Path) -> int:
    """Copy files that are not at the destination yet; existing files are kept."""
    copied = 0
    if not src.is_dir():
        return 0
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_file() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            copied += 1
    return copied


def merge_trackio(remote: Path, local: Path) -> list[str]:
    """Merge every project of the trackio store ``remote`` into the store ``local``.

    Returns one line per run that gained rows or files, e.g. ``denoising-zoo/a ->
    a@modal (12 rows, 1 media files)``; an empty list means nothing changed.
    """
    report = []
    for remote_db in sorted(remote.glob("*.db")):
        project = remote_db.stem  # trackio's canonical project name: also the media folder's name
        local.mkdir(parents=True, exist_ok=True)
        src = sqlite3.connect(remote_db)
        dst = sqlite3.connect(local / remote_db.name, timeout=30)
        try:
            with dst:
                for conn, where in ((src, f"remote {remote_db}"), (dst, f"local {local / remote_db.name}")):
                    if _columns(conn, "metrics") and "run_id" not in _columns(conn, "metrics"):
                        raise MergeError(f"trackio store {where} predates run ids: open it once with this trackio "
                                        "version (e.g. trackio show) so it migrates, then sync again")
                if not _columns(dst, "metrics"):
                    _create_like(src, dst)
                local_runs = _runs(dst)
                taken = set(local_runs.values())
                for run_id, name in sorted(_runs(src).items(), key=lambda item: item[1]):
                    if run_id in local_runs:
                        target = local_runs[run_id]  # imported before, possibly under a new name
                    else:
                        target = name if name not in taken else _free_name(name, taken)
                        taken.add(target)
                    rows = _merge_run(src, dst, project, run_id, name, target)
                    files = _copy_media(remote / "media" / project / name, local / "media" / project / target)
                    if rows or files:
                        report.append(f"{project}/{name} -> {target} ({rows} rows, {files} media files)")
        finally:
            src.close()
            dst.close()
    return report


def _merge_run(src: sqlite3.Connection, dst: sqlite3.Connection, project: str, run_id: str, name: str, target: str) -> int:
    """Insert the rows of one run that the local store lacks; returns how many."""
    inserted = 0
    old_prefix, new_prefix = f"{project}/{name}/", f"{project}/{target}/"
    for table in RUN_TABLES:
        local_cols = set(_columns(dst, table))
        cols = [c for c in _columns(src, table) if c != "id" and c in local_cols]
        if not cols:
            continue
        query = f"SELECT {', '.join(cols)} FROM {table} WHERE run_id = ?"
        have = {tuple(row) for row in dst.execute(query, (run_id,))}
        for row in src.execute(query, (run_id,)):
            record = dict(zip(cols, row, strict=True))
            record["run_name"] = target
            if "space_id" in record:
                record["space_id"] = None  # nothing to upload from here
            if table == "metrics" and target != name:
                renamed = _renamed_media(json.loads(record["metrics"]), old_prefix, new_prefix)
                record["metrics"] = json.dumps(renamed, separators=(",", ":")).encode()  # trackio's compact form
            values = tuple(record[c] for c in cols)
            if values in have or tuple(row) in have:
                continue
            cursor = dst.execute(f"INSERT OR IGNORE INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", values)
            inserted += cursor.rowcount
            have.add(values)
    return inserted
