"""List and delete runs from the local trackio store.

    python scripts/trackio_delete.py --list                 # runs, their sizes, last step
    python scripts/trackio_delete.py 'ablation_'            # runs whose name contains it
    python scripts/trackio_delete.py '^mlp_lr\\d+$' --dry-run  # show what would go
    python scripts/trackio_delete.py --full-match 'debug'   # exactly the run named debug
    python scripts/trackio_delete.py 'tmp' --yes            # no confirmation prompt

PATTERN is a Python regular expression matched against run names with
``re.search`` (anywhere in the name), or with ``re.fullmatch`` (the whole name)
under ``--full-match``. The matching runs are printed and a ``[y/N]`` prompt asks
before anything is deleted (Enter, anything but y/yes, or a closed stdin mean no).

The store is the one trackio itself uses: ``$TRACKIO_DIR`` (default
``~/.cache/huggingface/trackio``), one SQLite file per project. Deletion goes
through trackio's own API, ``trackio.Api().runs(project)`` then ``Run.delete()``
(which is ``SQLiteStorage.delete_run``): it removes the run's metrics, config,
system metrics, alerts and traces and detaches its artifact links. Two runs may
share a name (a name reused after a crash); each is its own run id here, listed
and deleted separately. trackio's delete leaves the media a run logged (the
training loop's sample plots) in ``$TRACKIO_DIR/media/<project>/<run name>/``;
this script removes that folder too, once no run of that name is left.

A missing project, a project with no runs, an invalid pattern or a pattern that
matches nothing prints one line and exits 2 with nothing deleted; declining the
prompt exits 1.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

from trackio.api import Api, Run
from trackio.sqlite_storage import SQLiteStorage
from trackio.utils import TRACKIO_DIR, project_media_dir

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a file: imports are absolute from the repo root

from runs import errors  # noqa: E402

DEFAULT_PROJECT = "denoising-zoo"


def fail(message: str) -> None:
    """One line on stderr and the input's exit status (``runs/errors.py``)."""
    raise SystemExit(errors.fail(message))


def load_runs(project: str) -> list[Run]:
    if not SQLiteStorage.get_project_db_path(project).exists():
        known = ", ".join(SQLiteStorage.get_projects()) or "none"
        fail(f"no trackio project {project!r} in {TRACKIO_DIR} (projects there: {known})")
    runs = list(Api().runs(project))
    if not runs:
        fail(f"trackio project {project!r} in {TRACKIO_DIR} has no runs")
    return runs


def media_dir(project: str, run_name: str) -> Path:
    """Where trackio keeps a run's media: one folder per run name (see trackio.media)."""
    return project_media_dir(project) / run_name


def folder_size(folder: Path) -> str:
    if not folder.is_dir():
        return "-"
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    return f"{size / 2**20:.1f} MB" if size >= 2**20 else f"{size / 2**10:.0f} kB"


def print_table(project: str, runs: list[Run]) -> None:
    """One row per run: name, short id, creation time, logged entries, last step,
    and the size of the run name's media folder."""
    created = {record["id"]: record["created_at"] for record in SQLiteStorage.get_run_records(project)}
    rows = [("run", "id", "created", "entries", "last step", "media")]
    for run in runs:
        last_step = SQLiteStorage.get_last_step(project, run_id=run.id)
        rows.append(
            (
                run.name,
                run.id[:8],
                (created.get(run.id) or "")[:19].replace("T", " "),
                str(SQLiteStorage.get_log_count(project, run_id=run.id)),
                "-" if last_step is None else str(last_step),
                folder_size(media_dir(project, run.name)),
            )
        )
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def confirm(prompt: str) -> bool:
    try:
        answer = input(prompt)
    except EOFError:  # no terminal (a pipe, a cron job): the default, no
        print()
        return False
    return answer.strip().lower() in ("y", "yes")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pattern", nargs="?", help="Python regex over run names (re.search; see --full-match)")
    parser.add_argument("--list", action="store_true", help="list the project's runs and exit")
    parser.add_argument("--project", default=DEFAULT_PROJECT, help=f"trackio project (default {DEFAULT_PROJECT})")
    parser.add_argument("--full-match", action="store_true", help="the pattern must match the whole run name")
    parser.add_argument("--dry-run", action="store_true", help="show the matching runs, delete nothing")
    parser.add_argument("--yes", "-y", action="store_true", help="delete without the confirmation prompt")
    args = parser.parse_args(argv)
    if args.list == (args.pattern is not None):
        parser.error("give either --list or a PATTERN")

    if args.list:
        runs = load_runs(args.project)
        print(f"{len(runs)} run(s) in trackio project {args.project!r} ({TRACKIO_DIR}):")
        print_table(args.project, runs)
        return

    try:
        regex = re.compile(args.pattern)
    except re.error as err:
        fail(f"invalid regular expression {args.pattern!r}: {err}")
    match = regex.fullmatch if args.full_match else regex.search
    runs = load_runs(args.project)
    chosen = [run for run in runs if match(run.name)]
    if not chosen:
        how = "fully matches" if args.full_match else "matches"
        names = ", ".join(sorted({run.name for run in runs}))
        fail(f"no run in project {args.project!r} {how} {args.pattern!r} (runs: {names})")

    verb = "would delete" if args.dry_run else "will delete"
    print(f"{verb} {len(chosen)} of {len(runs)} run(s) in trackio project {args.project!r}:")
    print_table(args.project, chosen)
    if args.dry_run:
        print("dry run: nothing deleted")
        return
    if not args.yes and not confirm(f"Delete these {len(chosen)} run(s)? [y/N] "):
        print("aborted: nothing deleted")
        raise SystemExit(errors.EXIT_FAILED)
    for run in chosen:
        if not run.delete():
            fail(f"trackio could not delete run {run.name!r} (id {run.id}); later matches were kept")
        print(f"deleted {run.name} ({run.id[:8]})")
    remaining = {run.name for run in runs if run not in chosen}
    for name in sorted({run.name for run in chosen} - remaining):
        folder = media_dir(args.project, name)
        if folder.is_dir():
            shutil.rmtree(folder)
            print(f"removed media folder {folder}")


if __name__ == "__main__":
    main()
