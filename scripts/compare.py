"""Compare the runs of a sweep: each setting's scores by NFE, mean and 95% interval over seeds.

    python scripts/compare.py 'cmp*' --out reports/cmp          # every run whose name matches
    python scripts/compare.py mf_s0 mf_s1 imf_s0 imf_s1 --metric fid --output-dir /data/outputs

RUN is a run name or a glob pattern of run names (quote it: ``'cmp*'`` for a prefix), looked
up as ``<output-dir>/ckpts/<arch>/RUN/last.pt``. The runs are grouped by every config key on
which they differ, except ``seed``, ``run_name``, where a run ran (output_dir, device,
num_workers, trackio, modal, data locations ...) and how it was launched (``NOT_SETTINGS``).
A group's label names the keys that tell the groups apart, group choices first (``loss=imf``),
leaving out a key whose value the keys before it fix; report.md lists every differing key.

Source: each run's ``last.pt``, read through the checksummed safe reader. Its ``metrics``
are the last evaluation (of the main EMA, at the run's final step), its ``history`` every
row the run logged (train, eval and device rows, the same rows trackio got). trackio holds
those rows too, but may be disabled or on another machine; ``eval_checkpoint``'s JSON files
are re-evaluations with settings of their own. An unfinished run is refused.

A table cell is the mean over the group's seeds and the half-width of its 95% interval,
t(0.975, n - 1) * s / sqrt(n) (Student t, s the sample standard deviation); a group of
one run shows its value and ``n=1``. Columns: the k-step samplers of uniform grids (``NFE k``;
``NFE k consistency`` for ``eval.consistency_steps``; time-list grids are left out), the solver
on the diagonal and its NFE, the data floor (energy distance), throughput and peak memory.
``--out DIR`` writes report.md, score_vs_nfe.png and, when the runs evaluated at several
steps, score_vs_step.png. Every failure is one line on stderr and a non-zero exit status
(runs/errors.py: 2 for what was typed or read, 1 for a report that could not be written).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a file: imports are absolute from the repo root

from scipy.stats import t as student_t

from runs.checkpoint import read_checkpoint, write_text_atomic
from runs.errors import RunError, report
from runs.layout import DEFAULT_OUTPUT_DIR, _flat, ckpt_root, find_runs, is_location

METRICS = ("energy_distance", "fid")
FLOOR = "eval/energy_distance_floor"
CONSISTENCY = "consistency"  # the metric suffix of consistency sampling (solvers/sampling.py, ConsistencySampler)
THROUGHPUT = "train/samples_per_sec"
MEMORY_KEYS = ("cuda/peak_mb", "mps/driver_mb", "proc/rss_mb")  # runs/device_metrics.py; the first every run records
# Where a run ran, not what it is, and how it was launched (a command line names its seed; the
# settings it chose are in the config themselves): never a reason to put two runs in different groups.
NOT_SETTINGS = ("seed", "run_name", "output_dir", "device", "num_workers", "resume", "overwrite", "eval_checkpoint",
                "trackio", "modal", "command", "overrides", "hydra")


@dataclass
class Run:
    """One run's config (flat, dotted keys), last evaluation and logged rows."""

    name: str
    path: Path
    config: dict[str, object]
    metrics: dict[str, float]
    history: list[dict]

    @property
    def seed(self) -> int:
        return int(self.config["seed"])


@dataclass
class Column:
    """A table column: its heading and the value it takes from a run (None: not recorded)."""

    heading: str
    key: str  # a metric of the last evaluation, or a summary of the rows (THROUGHPUT, a memory key)
    spread: bool = True  # mean and interval; False: the mean alone (the solver's NFE)

    def value(self, run: Run) -> float | None:
        if self.key == THROUGHPUT:  # the median row: the first epoch's warm-up (compilation) is one row of many
            rows = [row[THROUGHPUT] for row in run.history if THROUGHPUT in row]
            return statistics.median(rows) if rows else None
        if self.key in MEMORY_KEYS:
            rows = [row[self.key] for row in run.history if self.key in row]
            return max(rows) if rows else None
        return run.metrics.get(self.key)


@dataclass
class Group:
    label: str
    settings: list[str]  # every differing key, as key=value
    runs: list[Run]


def is_setting(key: str) -> bool:
    return key.split(".")[0] not in NOT_SETTINGS and not is_location(key)


def interval(values: list[float]) -> tuple[float, float | None]:
    """The mean and the half-width of its 95% Student-t interval (None for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, None
    return mean, float(student_t.ppf(0.975, n - 1)) * statistics.stdev(values) / math.sqrt(n)


# --- reading the runs ----------------------------------------------------------------


def find_checkpoints(patterns: list[str], output_dir: Path) -> list[tuple[str, Path]]:
    """(run name, last.pt) of every run matching one of ``patterns``; each must match one."""
    root = ckpt_root(output_dir)
    layouts = find_runs(root)
    found: dict[Path, str] = {}
    for pattern in patterns:
        matched = [layout for layout in layouts if layout.run == pattern or fnmatch.fnmatchcase(layout.run, pattern)]
        if not matched:
            known = ", ".join(sorted({layout.run for layout in layouts})[:20]) or "none"
            raise RunError(f"no run matches {pattern!r} under {root} (runs there: {known}): give run names or a "
                           "quoted pattern such as 'cmp*', and --output-dir where the runs live")
        found |= {layout.last: layout.run for layout in matched}
    return sorted(((run, path) for path, run in found.items()), key=lambda item: (item[0], str(item[1])))


def numbers(node: object, what: str) -> dict[str, float]:
    """The numeric entries of a stored metrics row (step, epoch and scores); anything else is refused."""
    if not isinstance(node, dict):
        raise RunError(f"{what} is a {type(node).__name__}: expected a mapping of metric names to numbers, as training writes")
    bad = [key for key, value in node.items() if not isinstance(value, int | float) or isinstance(value, bool)]
    if bad:
        raise RunError(f"{what}[{bad[0]!r}]={node[bad[0]]!r} is not a number: expected the numbers training stores")
    return {str(key): float(value) for key, value in node.items()}


def read_run(name: str, path: Path) -> Run:
    # One line for a missing, corrupt or hostile file; an older file comes upgraded (a format-1
    # file without rows has an empty history: final numbers only).
    state = read_checkpoint(path)
    config = state["config"]
    if not all(isinstance(config.get(k), int) for k in ("seed", "epochs", "max_steps")):
        raise RunError(f"checkpoint {str(path)!r} stores no config with integer seed, epochs and max_steps: "
                       "expected a last.pt written by training")
    config = _flat(config)
    history = [numbers(row, f"checkpoint {str(path)!r} history row {i}") for i, row in enumerate(state["history"])]
    metrics = numbers(state["metrics"], f"checkpoint {str(path)!r} metrics")
    epochs, max_steps, step, epoch = config["epochs"], config["max_steps"], int(state["step"]), int(state["epoch"])
    if not (epoch >= epochs or (max_steps and step >= max_steps)):
        raise RunError(f"run {name!r} is unfinished (epoch {epoch} of epochs={epochs}, {path}): finish it with "
                       "resume=true, or leave it out of the runs compared")
    if metrics.get("step") != step:
        last = f"step {int(metrics['step'])}" if "step" in metrics else "none"
        raise RunError(f"run {name!r} holds no evaluation of its final weights (step {step}; last evaluation: {last}; "
                       f"{path}): evaluate them with eval_checkpoint=PATH, or leave the run out")
    return Run(name, path, config, metrics, history)


# --- grouping ----------------------------------------------------------------------


def identity(run: Run, key: str) -> str:
    """A key's value as text to compare; an absent key differs from every value, null included."""
    return json.dumps(run.config[key]) if key in run.config else "absent"


def shown(run: Run, key: str) -> str:
    """``key=value`` as an override is typed (``~key``: absent); a group choice ``loss.name`` shows as ``loss=``."""
    if key not in run.config:
        return f"~{key}"
    value = run.config[key]
    return f"{key.removesuffix('.name')}={value if isinstance(value, str) else json.dumps(value, separators=(',', ':'))}"


def label_keys(runs: list[Run], differing: list[str]) -> list[str]:
    """The differing keys a label needs: group choices (``*.name``, ``experiment``) first, then
    the rest in order, each kept only if the keys kept before it leave its value open."""
    order = sorted(differing, key=lambda k: (not (k == "experiment" or k.endswith(".name")), k))
    kept: list[str] = []
    for key in order:
        value_of: dict[tuple[str, ...], str] = {}
        if any(value_of.setdefault(tuple(identity(r, k) for k in kept), identity(r, key)) != identity(r, key) for r in runs):
            kept.append(key)
    return kept


def group_runs(runs: list[Run]) -> list[Group]:
    """The runs by every setting on which they differ (NOT_SETTINGS aside), in label order."""
    keys = sorted({key for run in runs for key in run.config if is_setting(key)})
    differing = [k for k in keys if len({identity(run, k) for run in runs}) > 1]
    label = label_keys(runs, differing)
    groups: dict[tuple[str, ...], Group] = {}
    for run in runs:
        name = " ".join(shown(run, k) for k in label) or "all runs"
        group = groups.setdefault(tuple(identity(run, k) for k in differing), Group(name, [shown(run, k) for k in differing], []))
        twin = next((other for other in group.runs if other.seed == run.seed), None)
        if twin is not None:
            raise RunError(f"runs {twin.name!r} and {run.name!r} share every setting and seed={run.seed}: the interval "
                           "needs independent seeds; leave one of them out")
        group.runs.append(run)
    return sorted(groups.values(), key=lambda g: g.label)


def columns(runs: list[Run], metric: str) -> list[Column]:
    """The table's columns: the k-step scores, the solver's, then what every run records."""
    def counts(suffix: str) -> list[int]:  # k of the k-step samplers (``_{k}step``, ``_{k}step_consistency``)
        return sorted({int(middle) for run in runs for key in run.metrics if key.startswith(f"eval/{metric}_")
                       and key.endswith(suffix) and (middle := key[len(f"eval/{metric}_"):-len(suffix)]).isdigit()})

    out = [Column(f"NFE {k}", f"eval/{metric}_{k}step") for k in counts("step")]
    out += [Column(f"NFE {k} {CONSISTENCY}", f"eval/{metric}_{k}step_{CONSISTENCY}") for k in counts(f"step_{CONSISTENCY}")]
    if any(f"eval/{metric}" in run.metrics for run in runs):
        out += [Column("solver", f"eval/{metric}"), Column("solver NFE", "eval/nfe", spread=False)]
    if not out:
        raise RunError(f"run {runs[0].name!r} records no eval/{metric} score ({runs[0].path} has {', '.join(sorted(runs[0].metrics))}): "
                       f"choose --metric among {', '.join(METRICS)} for what the runs evaluated")
    if metric == "energy_distance":
        out.append(Column("floor", FLOOR))
    if all(Column("", THROUGHPUT).value(run) is not None for run in runs):
        out.append(Column("samples/s", THROUGHPUT))
    memory = next((key for key in MEMORY_KEYS if all(Column("", key).value(run) is not None for run in runs)), None)
    if memory is not None:
        out.append(Column("peak MiB", memory))
    return out


def cell_values(group: Group, column: Column) -> list[float] | None:
    """The column's value for every run of the group; None if the group records none."""
    values = [column.value(run) for run in group.runs]
    if all(v is None for v in values):
        return None
    missing = next((run for run, v in zip(group.runs, values) if v is None), None)
    if missing is not None:
        raise RunError(f"run {missing.name!r} lacks {column.key}, which the other runs of group {group.label!r} record "
                       f"({missing.path}): re-run it with the group's settings, or leave it out")
    return values


# --- the report --------------------------------------------------------------------


def cell(values: list[float] | None, spread: bool) -> str:
    if values is None:
        return "—"
    mean, half = interval(values)
    if not spread:
        return f"{mean:.4g}"
    return f"{mean:.4g} (n=1)" if half is None else f"{mean:.4g} ± {half:.2g}"


def table(groups: list[Group], cols: list[Column]) -> str:
    lines = ["| group | n | " + " | ".join(c.heading for c in cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for group in groups:
        cells = [cell(cell_values(group, c), c.spread) for c in cols]
        lines.append(f"| {group.label} | {len(group.runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curves(group: Group, key: str) -> tuple[list[int], list[tuple[float, float | None]]]:
    """The steps at which every run of the group logged ``key``, and the mean and interval there."""
    per_run = [{int(row["step"]): row[key] for row in run.history if key in row} for run in group.runs]
    steps = sorted(set.intersection(*(set(r) for r in per_run)))
    return steps, [interval([r[s] for r in per_run]) for s in steps]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def set_yscale(ax, values: list[float]) -> None:
    """Log where the scores span a decade or more (a few steps against many), else linear."""
    ax.set_yscale("log" if min(values) > 0 and max(values) >= 10 * min(values) else "linear")


def save_figure(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.png")  # a half-written PNG never sits where a person looks
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    tmp.replace(path)
    pyplot().close(fig)


def plot_nfe(groups: list[Group], cols: list[Column], metric: str, path: Path) -> None:
    """The score against NFE: the k-step samplers joined, the solver a square, each group's floor dashed."""
    fig, ax = pyplot().subplots(figsize=(6.5, 4))
    jump_cols = [c for c in cols if c.heading.startswith("NFE ") and not c.heading.endswith(CONSISTENCY)]
    consistency_cols = [c for c in cols if c.heading.startswith("NFE ") and c.heading.endswith(CONSISTENCY)]
    solver = next((c for c in cols if c.heading == "solver"), None)
    plotted: list[float] = []
    for i, group in enumerate(groups):
        style = {"color": f"C{i % 10}", "capsize": 3}
        label = f"{group.label} (n={len(group.runs)})"
        jumps = [(int(c.heading.removeprefix("NFE ")), interval(v)) for c in jump_cols if (v := cell_values(group, c))]
        if jumps:
            ax.errorbar([k for k, _ in jumps], [m for _, (m, _) in jumps], yerr=[h or 0 for _, (_, h) in jumps],
                        marker="o", label=label, **style)
            plotted += [m for _, (m, _) in jumps]
        if chain := [(int(c.heading.split()[1]), interval(v)) for c in consistency_cols if (v := cell_values(group, c))]:
            ax.errorbar([k * 1.1 for k, _ in chain], [m for _, (m, _) in chain],  # beside the jump chain's point yerr=[h or 0 for _, (_, h) in chain],
                        marker="^", linestyle=":", label=None if jumps else label, **style)
            plotted += [m for _, (m, _) in chain]
        if solver is not None and (values := cell_values(group, solver)):
            (mean, half), (nfe, _) = interval(values), interval(cell_values(group, Column("", "eval/nfe")))
            ax.errorbar([nfe], [mean], yerr=[half or 0], marker="s", linestyle="none", label=None if jumps else label, **style)
            plotted.append(mean)
        if metric == "energy_distance" and (floors := cell_values(group, Column("", FLOOR))):
            floor = interval(floors)[0]
            ax.axhline(floor, color=style["color"], linestyle="--", linewidth=0.8)
            plotted.append(floor)
    ax.set_xscale("log", base=2)
    set_yscale(ax, plotted)
    what = metric.replace("_", " ")
    ax.set(xlabel="network evaluations per sample (NFE; squares: the solver; triangles: consistency sampling)", ylabel=what,
           title=f"{what}: mean, 95% interval over seeds" + ("; dashed: data floor" if metric == "energy_distance" else ""))
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_steps(groups: list[Group], cols: list[Column], metric: str, path: Path) -> bool:
    """The score against training step, a panel per sampler; False (nothing written) when no
    group has evaluations at two steps."""
    scores = [c for c in cols if c.heading.startswith("NFE ") or c.heading == "solver"]
    if not any(len(curves(g, c.key)[0]) > 1 for g in groups for c in scores):
        return False
    fig, axes = pyplot().subplots(1, len(scores), figsize=(4 * len(scores), 3.6), squeeze=False, sharey=True)
    plotted: list[float] = []
    for ax, column in zip(axes[0], scores):
        for i, group in enumerate(groups):
            steps, stats = curves(group, column.key)
            mean, half = [m for m, _ in stats], [h or 0 for _, h in stats]
            ax.plot(steps, mean, color=f"C{i % 10}", marker=".", label=group.label)
            ax.fill_between(steps, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)],
                            color=f"C{i % 10}", alpha=0.2)
            plotted += mean
        ax.set(xlabel="training step", title=column.heading)
    set_yscale(axes[0][0], plotted)
    axes[0][0].set_ylabel(metric.replace("_", " "))
    axes[0][0].legend(fontsize=8)
    fig.suptitle("mean over seeds, band: 95% interval", y=1.03)
    save_figure(fig, path)
    return True


def compare(patterns: list[str], output_dir: Path, metric: str, out: Path | None) -> str:
    """The report (markdown) of the runs matching ``patterns``; with ``out``, also written there with its figures."""
    runs = [read_run(name, path) for name, path in find_checkpoints(patterns, output_dir)]
    groups = group_runs(runs)
    cols = columns(runs, metric)
    notes = [(f"{metric.replace('_', ' ')} of the EMA weights at each run's final step; a cell is the mean over seeds "
              "± the half-width of its 95% interval (Student t, n − 1 degrees of freedom); n=1: one run, no interval."),
             "Source: each run's last.pt (its last evaluation, and its logged rows for the throughput and memory)."]
    notes += [f"samples/s: the median {c.key} of a run's rows (the global batch per second)." for c in cols if c.key == THROUGHPUT]
    notes += [f"peak MiB: the largest {c.key} of a run's rows." for c in cols if c.key in MEMORY_KEYS]
    listing = [f"- `{g.label}`: runs {', '.join(f'{r.name} (seed {r.seed})' for r in sorted(g.runs, key=lambda r: r.seed))}"
               + (f"; settings `{' '.join(g.settings)}`" if g.settings else "") for g in groups]
    parts = [f"# {len(runs)} runs in {len(groups)} groups", table(groups, cols),
             "\n".join(f"- {note}" for note in notes), "## Groups\n\n" + "\n".join(listing)]
    if out is None:
        return "\n\n".join(parts) + "\n"
    try:
        out.mkdir(parents=True, exist_ok=True)
        plot_nfe(groups, cols, metric, out / "score_vs_nfe.png")
        parts.append("![score against NFE](score_vs_nfe.png)")
        if plot_steps(groups, cols, metric, out / "score_vs_step.png"):
            parts.append("![score against training step](score_vs_step.png)")
        else:
            parts.append("No figure of the score against training step: every run holds its evaluation at one step at most "
                         "(eval.every_epochs >= epochs, or a checkpoint that stores final numbers only).")
        text = "\n\n".join(parts) + "\n"
        write_text_atomic(out / "report.md", text)
    except OSError as err:
        raise RunError(f"--out {str(out)!r}: cannot write the report ({err.strerror or err}): choose a writable folder") from None
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run name or quoted glob pattern of run names ('cmp*')")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR, help=f"where runs live (default: {DEFAULT_OUTPUT_DIR})")
    parser.add_argument("--metric", choices=METRICS, default="energy_distance", help="the score (default: energy_distance)")
    parser.add_argument("--out", type=Path, default=None, help="folder for report.md and the figures (default: print only)")
    args = parser.parse_args(argv)
    try:
        print(compare(args.runs, args.output_dir, args.metric, args.out), end="")
    except RunError as err:
        return report(err)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
