"""What a run records besides its weights, kept in every checkpoint: the sums of its train
metrics since the last row, the rows it logged (printed, kept, sent to trackio) and the
batches that rollbacks left out.

A run that is killed and resumed redoes the steps after its checkpoint, and trackio may
hold more (rows logged after the checkpoint) or less (rows lost before trackio's flush)
than the checkpoint's history. On resume the rows trackio holds are read back and
counted by identity, a row's step and metric names: a redone row that trackio holds is
not sent again, a row it lacks is, so trackio ends with every row exactly once. The
names matter: at an epoch's last step a ``log_every_steps`` train row and the epoch-end
row (with the evaluation) share the step, and a kill during that evaluation must not
lose the second. A rollback redoes steps too, and is handled the same way.
"""

import shlex
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

SAMPLES = "eval/samples"  # the sample picture: sent to trackio, never kept in the history
NOT_METRICS = ("step", "timestamp", SAMPLES)  # what trackio's rows hold besides the logged metrics


def command_line() -> str:
    """The command that started this run, as a shell reads it back (a sweep job's is its own
    overrides: ``launcher.typed_as``); empty when the launcher did not start it."""
    return shlex.join(["python", *sys.argv]) if sys.argv and sys.argv[0].endswith("launcher.py") else ""


def row_key(row: dict) -> tuple[int, tuple[str, ...]]:
    """A row's identity: its step and its metric names (trackio's rows add a timestamp)."""
    return int(row["step"]), tuple(sorted(k for k in row if k not in NOT_METRICS))


class RunRecord:
    """The run's train metrics, logged rows and skipped batches (only rank 0 logs rows)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}  # sums of the train metrics since the last row, and their count
        self.history: list[dict[str, float]] = []  # {"step": n, metric: value, ...}, in the order logged
        self.kept: Counter = Counter()  # row_key -> rows of the history with that key
        self.sent: Counter = Counter()  # row_key -> rows trackio holds with that key
        self.skipped: list[list[int]] = []  # [epoch, batch] of each batch left out after a rollback
        self.rollbacks = 0  # in the whole run, resumes included (max_rollbacks bounds it)
        self.trackio = None

    def state(self) -> dict:
        return {"totals": self.totals, "history": self.history, "skipped": self.skipped, "rollbacks": self.rollbacks}

    def restore(self, state: dict, rows_only: bool = False) -> None:
        """A checkpoint's record, on resume (all of it) or on a rollback (its train metrics and
        rows; the run's skips and count are newer). What trackio holds is kept."""
        self.totals = dict(state["totals"])
        self.history = [dict(row) for row in state["history"]]
        self.kept = Counter(row_key(row) for row in self.history)
        if not rows_only:
            self.skipped = [[int(epoch), int(batch)] for epoch, batch in state["skipped"]]
            self.rollbacks = state["rollbacks"]

    def add(self, metrics: dict[str, torch.Tensor | float]) -> None:
        """One step's train metrics."""
        for key, value in metrics.items():
            self.totals[key] = self.totals.get(key, 0.0) + float(value)
        self.totals["_count"] = self.totals.get("_count", 0.0) + 1

    def train_means(self, device: torch.device, world: int) -> dict[str, float]:
        """The train metrics since the last call: means over their steps and, under DDP, the
        ranks (every rank calls this: all-reduced)."""
        count = self.totals.pop("_count", 0.0)
        names = sorted(self.totals)
        values = torch.tensor([self.totals[k] for k in names] + [count], dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(values)
        self.totals = {}
        return {f"train/{k}": float(v) / max(float(values[-1]), 1.0) for k, v in zip(names, values)}

    def skipped_in(self, epoch: int) -> set[int]:
        return {batch for e, batch in self.skipped if e == epoch}

    def start(self, cfg: DictConfig) -> None:
        """Open the trackio run; a resumed run sends the rows of its history that trackio lacks."""
        import trackio
        from trackio.sqlite_storage import SQLiteStorage

        config, system = OmegaConf.to_container(cfg, resolve=True), cfg.trackio.system_metrics
        config["command"] = command_line()
        trackio.init(project=cfg.trackio.project, name=cfg.run_name, config=config,
                     resume="allow" if cfg.resume else "never", embed=False,  # allow: a kill may precede its first flush
                     auto_log_gpu=None if system else False, auto_log_cpu=None if system else False)  # None: trackio detects
        self.trackio = trackio
        self.catch_up(SQLiteStorage.get_logs(cfg.trackio.project, cfg.run_name) if cfg.resume else [])

    def catch_up(self, held: list[dict]) -> None:
        """Count the rows trackio ``held`` (its ``get_logs``), and send those of the history it lacks."""
        self.sent = Counter(row_key(row) for row in held)
        seen: Counter = Counter()
        for row in self.history:
            seen[row_key(row)] += 1
            if seen[row_key(row)] > self.sent[row_key(row)]:  # trackio holds fewer rows with this key than the history
                self._send(row)

    def log(self, row: dict[str, float], heading: str | None = None, picture: Path | None = None) -> None:
        """Print ``heading`` and the row's train/eval numbers (unless None), keep ``row`` (with
        its ``step``) and send it to trackio unless trackio already holds it (a redone step)."""
        if heading is not None:
            summary = "  ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in row.items()
                                if k.split("/")[0] in ("train", "eval") and "/nfe" not in k)
            print(f"{heading}  {summary}", flush=True)
        self.history.append(row)
        self.kept[row_key(row)] += 1
        if self.trackio is not None and self.kept[row_key(row)] > self.sent[row_key(row)]:
            self._send(row, picture)

    def _send(self, row: dict[str, float], picture: Path | None = None) -> None:
        metrics = {k: v for k, v in row.items() if k != "step"}
        if picture is not None:
            metrics[SAMPLES] = self.trackio.Image(str(picture), caption=f"epoch {row['epoch']}")
        self.trackio.log(metrics, step=int(row["step"]))
        self.sent[row_key(row)] += 1

    def finish(self) -> None:
        if self.trackio is not None:
            self.trackio.finish()
