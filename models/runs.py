"""A run on disk: where its files live, and the one error type a run raises.

Every path of a run is spelled here and nowhere else (DESIGN.md, "Checkpoints"):

    <output_dir>/ckpts/<arch>/<run>/last.pt                   live checkpoint
    <output_dir>/ckpts/<arch>/archive/<run>_epoch_XXXX.pt     archived copies
    <output_dir>/ckpts/<arch>/archive/<run>_overwritten_STAMP.pt   the last.pt that overwrite=true replaced
    <output_dir>/runs/<run>/plots/epoch_XXXX.png              sample plots and grids
    <output_dir>/eval/<run>/                                  eval_checkpoint results

``RunError`` carries its exit status; the launcher turns any of them into one line on
stderr and that status, in one place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


class RunError(RuntimeError):
    """Something the user can fix (a bad value, a missing file): one line, exit status 2."""

    exit_code = 2


class TrainingFailed(RunError):
    """A run that started and had to stop (a non-finite loss, ranks out of sync): exit status 1."""

    exit_code = 1


@dataclass(frozen=True)
class RunLayout:
    """The files of run ``run`` of architecture ``arch`` under ``output_dir``."""

    output_dir: Path
    arch: str
    run: str

    @classmethod
    def of(cls, cfg) -> RunLayout:
        """The layout of a composed (or checkpoint-embedded) config."""
        return cls(Path(cfg.output_dir), str(cfg.model.name), str(cfg.run_name))

    @property
    def ckpt_root(self) -> Path:
        return self.output_dir / "ckpts"

    @property
    def run_dir(self) -> Path:
        return self.ckpt_root / self.arch / self.run

    @property
    def last(self) -> Path:
        return self.run_dir / "last.pt"

    @property
    def archive_dir(self) -> Path:
        return self.ckpt_root / self.arch / "archive"

    def archive(self, epoch: int) -> Path:
        return self.archive_dir / f"{self.run}_epoch_{epoch:04d}.pt"

    def overwritten(self, stamp: str) -> Path:
        return self.archive_dir / f"{self.run}_overwritten_{stamp}.pt"

    def archived(self) -> list[tuple[int, Path]]:
        """``(epoch, path)`` of this run's archived epoch checkpoints, by epoch."""
        pattern = re.compile(rf"{re.escape(self.run)}_epoch_(\d{{4,}})\.pt")
        if not self.archive_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.archive_dir.iterdir() if (m := pattern.fullmatch(p.name))]
        return sorted(found)

    def files(self) -> list[Path]:
        """Every checkpoint file of the run: its folder and its archived copies."""
        own = [p for p in self.run_dir.rglob("*") if p.is_file()] if self.run_dir.is_dir() else []
        archived = list(self.archive_dir.glob(f"{self.run}_*.pt")) if self.archive_dir.is_dir() else []
        return own + archived

    @property
    def plots(self) -> Path:
        return self.output_dir / "runs" / self.run / "plots"

    def plot(self, epoch: int) -> Path:
        return self.plots / f"epoch_{epoch:04d}.png"

    @property
    def eval_dir(self) -> Path:
        return self.output_dir / "eval" / self.run


def find_runs(ckpt_root: Path) -> list[RunLayout]:
    """Every run with a ``<arch>/<run>/last.pt`` under ``ckpt_root``, newest first."""
    lasts = [p for p in ckpt_root.glob("*/*/last.pt") if p.parent.name != "archive"]
    lasts.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [RunLayout(ckpt_root.parent, p.parent.parent.name, p.parent.name) for p in lasts]
