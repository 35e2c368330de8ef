"""Where a run's files live, and the lock that keeps two launches of one run apart.

Every path of a run is spelled here and nowhere else (docs/design.md, "Run files"):

    <output_dir>/ckpts/<arch>/<run>/last.pt                   live checkpoint
    <output_dir>/ckpts/<arch>/archive/<run>_epoch_XXXX.pt     archived copies
    <output_dir>/ckpts/<arch>/archive/<run>_overwritten_STAMP.pt   the last.pt that overwrite=true replaced
    <output_dir>/runs/<run>/plots/epoch_XXXX.png              sample plots and grids
    <output_dir>/runs/<run>/modal_config.yaml                 the config a Modal launch trains
    <output_dir>/eval/<run>/                                  eval_checkpoint results
    <output_dir>/export/<run>[_epoch_XXXX]/                   export folders (scripts/export.py)
    <output_dir>/sweeps/<date_time>/<job>/                    a sweep's Hydra files (configs/train.yaml hydra.sweep.dir)
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from runs.errors import RunError

DEFAULT_OUTPUT_DIR = Path("outputs")
CKPTS, ARCHIVE, EXPORTS, LAST = "ckpts", "archive", "export", "last.pt"
EXPORT_WEIGHTS, EXPORT_CONFIG = "model.safetensors", "config.yaml"  # an export folder's two files

# A run name is a folder and the stem of file names: the longest, an archived
# ``<run>_overwritten_YYYYmmdd-HHMMSS.pt``, adds 31 bytes (a save's temporary
# ``.<file>.tmp`` adds 5); 200 keeps every one under the 255-byte limit of a file name,
# with room for epoch counters past 9999.
RUN_NAME_MAX = 200


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
        return ckpt_root(self.output_dir)

    @property
    def run_dir(self) -> Path:
        return self.ckpt_root / self.arch / self.run

    @property
    def last(self) -> Path:
        return self.run_dir / LAST

    @property
    def archive_dir(self) -> Path:
        return self.ckpt_root / self.arch / ARCHIVE

    def archive(self, epoch: int) -> Path:
        return self.archive_dir / f"{self.run}_epoch_{epoch:04d}.pt"

    def overwritten(self, stamp: str) -> Path:
        return self.archive_dir / f"{self.run}_overwritten_{stamp}.pt"

    def start(self, resume: bool, overwrite: bool) -> Path | None:
        """Check that the run may start: the ``last.pt`` to resume from, or None for a fresh
        run; refuses to clobber an existing run unless ``overwrite``."""
        if resume:
            if not self.last.exists():
                raise RunError(f"resume=true but run {self.run!r} has no checkpoint at {self.last}: drop resume=true to start it")
            return self.last
        if self.last.exists() and not overwrite:
            raise RunError(f"run {self.run!r} already has {self.last}: pass resume=true to continue it, "
                           "overwrite=true to start over (the old last.pt is archived), or choose another run_name")
        return None

    def check_writable(self) -> None:
        """Create the run's folders now, so an unwritable ``output_dir`` (or a file in its
        place) is one line before the first step, not a traceback at the first save. On
        failure the folders this call created are removed again: a refused run leaves
        nothing behind."""
        folders = (self.run_dir, self.archive_dir, self.plots)
        new = sorted({p for folder in folders for p in (folder, *folder.parents) if not p.exists()}, key=lambda p: -len(p.parts))
        for folder in folders:
            if (err := write_error(folder)) is not None:
                for made in (p for p in new if p.is_dir()):  # deepest first, so each is empty when its turn comes
                    made.rmdir()
                raise RunError(f"output_dir={self.output_dir}: cannot write {folder} ({err}): choose a writable output_dir")

    def lock(self) -> IO[str]:
        """Hold the run folder until the returned file is closed (or the process ends): a
        second launch of the same run is refused meanwhile. An ``flock`` is released by
        the kernel when its process ends however it ends (kill -9 included), so a crashed
        run never leaves its lock stuck."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / ".lock"
        handle = path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # ``unlock`` removes the file: a launch that opened it just before that holds a
            # lock on a file no longer there, which a later launch would not see. Only a
            # lock on the file at the path counts.
            if not path.exists() or os.stat(path).st_ino != os.fstat(handle.fileno()).st_ino:
                raise BlockingIOError
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunError(f"run {self.run!r} is being trained right now by {holder} (lock {self.run_dir / '.lock'}): "
                           "wait for it to finish, or choose another run_name") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        return handle

    def claim(self, resume: bool, overwrite: bool, trackio: bool) -> IO[str]:
        """Check that trackio's store and the run's outputs are writable (the store first:
        it creates none of the run's folders), lock the run folder, check again under the
        lock that the run may start (no other launch got in between), and remove the
        temporary files of saves that were killed; returns the lock to ``unlock`` at the end."""
        if trackio:
            check_trackio_dir()
        self.check_writable()
        handle = self.lock()
        try:
            self.start(resume, overwrite)
        except RunError:
            self.unlock(handle)
            raise
        self.remove_stale_temporaries()
        return handle

    def remove_stale_temporaries(self) -> None:
        """Delete the half-written ``.<name>.tmp`` files of this run (a save killed before
        its rename; a kill during the very first save leaves only ``.last.pt.tmp``). Call
        it with the lock held: no save of this run is under way then."""
        archived = re.compile(rf"\.{re.escape(self.run)}_epoch_\d{{4,}}\.pt\.tmp")  # this run's archive copies only
        stale = list(self.run_dir.glob(".*.tmp"))
        if self.archive_dir.is_dir():
            stale += [p for p in self.archive_dir.iterdir() if archived.fullmatch(p.name)]
        for path in stale:
            path.unlink(missing_ok=True)

    def unlock(self, handle: IO[str]) -> None:
        """Release the run folder (the lock file goes too: a finished run leaves none)."""
        (self.run_dir / ".lock").unlink(missing_ok=True)
        handle.close()

    def archive_last(self) -> None:
        """Move ``last.pt`` (if any) to ``archive/<run>_overwritten_<time>.pt``."""
        if self.last.exists():
            self.archive_dir.mkdir(parents=True, exist_ok=True)
            self.last.replace(self.overwritten(time.strftime("%Y%m%d-%H%M%S")))

    def archived(self) -> list[tuple[int, Path]]:
        """``(epoch, path)`` of this run's archived epoch checkpoints, by epoch."""
        pattern = re.compile(rf"{re.escape(self.run)}_epoch_(\d{{4,}})\.pt")
        if not self.archive_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.archive_dir.iterdir() if (m := pattern.fullmatch(p.name))]
        return sorted(found)

    def files(self) -> list[Path]:
        """Every checkpoint file of the run: its folder and its archived copies."""
        own = [p for p in self.run_dir.rglob("*") if p.is_file() and not p.name.startswith(".")] if self.run_dir.is_dir() else []
        archived = list(self.archive_dir.glob(f"{self.run}_*.pt")) if self.archive_dir.is_dir() else []
        return own + archived

    @property
    def outputs(self) -> Path:
        """The run's files other than checkpoints (plots, the config a remote launch trains)."""
        return self.output_dir / "runs" / self.run

    @property
    def plots(self) -> Path:
        return self.outputs / "plots"

    @property
    def remote_config(self) -> Path:
        """The resolved config a Modal launch hands to ``launcher.py --from-config``."""
        return self.outputs / "modal_config.yaml"

    def plot(self, epoch: int) -> Path:
        return self.plots / f"epoch_{epoch:04d}.png"

    @property
    def eval_dir(self) -> Path:
        return self.output_dir / "eval" / self.run

    def export_dir(self, epoch: int | None = None) -> Path:
        """Where ``scripts/export.py`` writes the run's weights: ``last.pt``'s, or an archived epoch's."""
        return self.output_dir / EXPORTS / (self.run if epoch is None else f"{self.run}_epoch_{epoch:04d}")


def ckpt_root(output_dir: Path) -> Path:
    """The folder of every run's checkpoints: ``<output_dir>/ckpts``."""
    return Path(output_dir) / CKPTS

# What a resumed run must share with its checkpoint (the state would not fit or mean the
# same), and what is free to differ without being worth a line (where the run runs).
FIXED_ON_RESUME = ("model", "loss", "dataloaders", "batch_size", "seed", "optimizer._target_")

# Keys of a data config (the VAE's included) that say where files are read from, or
# whether and what to download: the machine's, not the run's. A resumed run may move its
# data; a stored run never chooses them (evaluation/stored_config.py).
# tests/test_hostile_files.py checks that every path-like key of configs/dataloaders/ is here.
LOCATION_KEYS = ("root", "path", "latent_dir", "image_dir", "val_latent_dir", "val_image_dir", "download",
                 "pretrained", "subfolder", "local_files_only")


def is_location(key: str) -> bool:
    """Whether a dotted key names where data is read (``dataloaders.dataset.root``, ``dataloaders.vae.pretrained``)."""
    parts = key.split(".")
    return parts[0] == "dataloaders" and len(parts) > 1 and parts[-1] in LOCATION_KEYS

FREE_ON_RESUME = ("resume", "overwrite", "device", "output_dir", "num_workers", "eval_checkpoint", "init_from")


def _flat(node: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_changes(saved: dict, current: dict) -> dict[str, tuple]:
    """The settings a resumed run changes, ``{key: (checkpoint's, this run's)}``; refuses
    (one line) a change to what the checkpoint's state depends on."""
    old, new = _flat(saved), _flat(current)
    changed = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
    for key, (was, now) in changed.items():
        if (key.split(".")[0] in FIXED_ON_RESUME or key in FIXED_ON_RESUME) and not is_location(key):
            raise RunError(f"resume=true cannot change {key} (checkpoint: {was}, now: {now}): resume with the checkpoint's "
                           "value, or start a new run (init_from=PATH starts from its weights)")
    return {k: v for k, v in changed.items() if k.split(".")[0] not in FREE_ON_RESUME and k != "command"}


def write_error(folder: Path) -> str | None:
    """Why ``folder`` cannot be created and written to, or None if it can."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        return err.strerror or str(err)
    return None


def check_trackio_dir() -> None:
    """trackio's store must be writable before the first step (else every metric is lost
    and the run cannot be resumed with its history)."""
    from trackio.utils import TRACKIO_DIR

    store = Path(TRACKIO_DIR)
    if (err := write_error(store)) is not None:
        raise RunError(f"TRACKIO_DIR={store} is not writable ({err}): set TRACKIO_DIR to a writable folder "
                       "or pass trackio.enabled=false")


def is_run_file(relative: PurePosixPath, run: str) -> bool:
    """Whether a path relative to the checkpoint root (``<arch>/...``) is one of run
    ``run``'s files: under ``<arch>/<run>/`` or ``<arch>/archive/<run>_epoch_XXXX.pt``."""
    parts = relative.parts
    if parts and parts[-1].startswith("."):  # a lock or a half-written temporary file
        return False
    if len(parts) >= 3 and parts[1] == run:
        return True
    return len(parts) == 3 and parts[1] == ARCHIVE and re.fullmatch(rf"{re.escape(run)}_epoch_\d{{4,}}\.pt", parts[2]) is not None


def run_names(relative: list[PurePosixPath]) -> list[str]:
    """The runs that have a ``<arch>/<run>/last.pt`` among paths relative to the checkpoint root."""
    return sorted({p.parts[1] for p in relative if len(p.parts) == 3 and p.parts[2] == LAST and p.parts[1] != ARCHIVE})


def find_runs(root: Path) -> list[RunLayout]:
    """Every run with a ``<arch>/<run>/last.pt`` under the checkpoint root ``root``, newest first."""
    lasts = [p for p in root.glob(f"*/*/{LAST}") if p.parent.name != ARCHIVE]
    lasts.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [RunLayout(root.parent, p.parent.parent.name, p.parent.name) for p in lasts]
