"""Draft an EXPERIMENT_LOG.md entry for one run from what trackio recorded.

    python scripts/experiment_log.py RUN_NAME [--project denoising-zoo] >> EXPERIMENT_LOG.md

Prints Markdown with the log's sections: a ``## <date> <run_name>`` heading, then
``### Config`` (the resolved config the run passed to ``trackio.init``, as YAML),
``### Command`` (``config["command"]``, the exact command line, when recorded;
otherwise rebuilt from ``config["overrides"]``), ``### Expected outcome`` (left
for the researcher), ``### Results`` (one row per logged epoch: ``epoch``,
``train/loss`` and every ``eval/*`` metric, the last row in bold) and
``### Observations`` (left for the researcher).

If several runs share the name (a name reused), the newest is used. The store is
trackio's own: ``$TRACKIO_DIR``. An unknown run or project prints one line and
exits 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf
from trackio.sqlite_storage import SQLiteStorage
from trackio.utils import TRACKIO_DIR

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a file: imports are absolute from the repo root

from runs import errors  # noqa: E402

DEFAULT_PROJECT = "denoising-zoo"
TODO = "_To be written by the researcher._"


def fail(message: str) -> None:
    """One line on stderr and the input's exit status (``runs/errors.py``)."""
    raise SystemExit(errors.fail(message))


def format_value(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def command_of(config: dict, run_name: str) -> str:
    """The command that started the run, as well as the config tells it."""
    if config.get("command"):
        return str(config["command"])
    if config.get("overrides"):
        overrides = [str(item) for item in config["overrides"]]
        if not any(item.startswith("run_name=") for item in overrides):
            overrides.insert(0, f"run_name={run_name}")
        return "python launcher.py " + " ".join(overrides) + "  # rebuilt from config.overrides"
    return f"python launcher.py run_name={run_name} ...  # the run's config holds no command or overrides"


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def select_rows(logs: list[dict], max_rows: int) -> tuple[list[str], list[dict], int]:
    """The columns to show, the logged entries that carry epoch/eval values, and
    how many such entries there were before more than ``max_rows`` were thinned
    evenly (first and last kept)."""
    eval_keys = sorted(
        {key for entry in logs for key, value in entry.items() if key.startswith("eval/") and is_number(value)}
    )  # media (eval/samples images) are dicts in the log: not table cells
    columns = ["epoch", "step", "train/loss", *eval_keys]
    rows = [entry for entry in logs if "epoch" in entry or any(key in entry for key in eval_keys)]
    total = len(rows)
    if total > max_rows:
        last = total - 1
        keep = sorted({round(i * last / (max_rows - 1)) for i in range(max_rows)})
        rows = [rows[i] for i in keep]
    return columns, rows, total


def results_table(columns: list[str], rows: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for index, row in enumerate(rows):
        cells = [format_value(row.get(column)) if is_number(row.get(column)) else "" for column in columns]
        if index == len(rows) - 1:  # the final numbers are the ones a reader looks for
            cells = [f"**{cell}**" if cell else cell for cell in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render(project: str, run_name: str, max_rows: int) -> str:
    if not SQLiteStorage.get_project_db_path(project).exists():
        known = ", ".join(SQLiteStorage.get_projects()) or "none"
        fail(f"no trackio project {project!r} in {TRACKIO_DIR} (projects there: {known})")
    record = SQLiteStorage.get_latest_run_record_by_name(project, run_name)
    if record is None:
        names = ", ".join(SQLiteStorage.get_runs(project)) or "none"
        fail(f"no run {run_name!r} in trackio project {project!r} (runs: {names})")
    run_id = record["id"]
    stored = SQLiteStorage.get_run_config(project, run_id=run_id) or {}
    config = {key: value for key, value in stored.items() if not key.startswith("_")}  # drop trackio's own _Created...
    logs = SQLiteStorage.get_logs(project, run_id=run_id)
    columns, rows, total = select_rows(logs, max_rows)

    date = (record["created_at"] or "")[:10]
    out = [f"## {date} {run_name}".replace("  ", " "), ""]
    out += [f"trackio project `{project}`, run id `{run_id}`.", ""]
    out += ["### Config", "", "```yaml", OmegaConf.to_yaml(OmegaConf.create(config)).rstrip() or "{}", "```", ""]
    out += ["### Command", "", "```bash", command_of(config, run_name), "```", ""]
    out += ["### Expected outcome", "", TODO, ""]
    out += ["### Results", ""]
    if rows:
        shown = f"{len(rows)} of {total} logged epochs" if len(rows) < total else f"all {total} logged epochs"
        out += [f"{shown.capitalize()}; last row in bold.", "", *results_table(columns, rows), ""]
    else:
        out += ["_No epochs logged._", ""]
    out += ["### Observations", "", TODO, ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_name", help="the run's name (run_name=... at launch)")
    parser.add_argument("--project", default=DEFAULT_PROJECT, help=f"trackio project (default {DEFAULT_PROJECT})")
    parser.add_argument("--max-rows", type=int, default=40, help="thin the results table to this many rows")
    args = parser.parse_args(argv)
    if args.max_rows < 2:
        parser.error(f"--max-rows must be at least 2, got {args.max_rows}")
    print(render(args.project, args.run_name, args.max_rows))


if __name__ == "__main__":
    main()
