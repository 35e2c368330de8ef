"""Train on Modal, and bring the results home.

    python launcher.py --backend modal run_name=NAME [key=value ...]   # train on a Modal GPU; logs stream here
    python scripts/modal_app.py list                                   # runs on the volume: name, last epoch, size
    python scripts/modal_app.py sync                                   # merge the volume's trackio runs into the local store
    python scripts/modal_app.py fetch RUN_NAME [--dest outputs/ckpts]  # download a run's checkpoints

Settings (GPU type and count, timeout, volume, app name, Python version) come from
``cfg.modal`` when the config has that group, else from ``configs/modal/default.yaml``.
The image is Debian slim with the dependencies of ``pyproject.toml`` and the source
tree (without outputs/, data/, .venv/, .git/). The volume, mounted at ``/vol``, holds::

    /vol/outputs/ckpts/<arch>/<run>/last.pt      checkpoints (output_dir = /vol/outputs)
    /vol/outputs/ckpts/<arch>/archive/...        archived epochs
    /vol/trackio/                                TRACKIO_DIR of the remote runs
    /vol/data/                                   data sets: the container's data/ points here
                                                 (upload with: modal volume put denoising-zoo data/celeba data/celeba)

``sync`` merges the remote trackio store into the local one (``$TRACKIO_DIR``) so that
``trackio show`` lists remote runs beside local ones. It never deletes or rewrites a
local run: a remote run already imported (same trackio run id) only gains the rows it
does not have yet, so a second sync changes nothing; a remote run whose name is taken
by a different local run is imported as ``NAME@modal`` (then ``NAME@modal2``, ...).
Metrics, configs, system metrics, alerts and media (sample plots) are merged; traces
and artifacts are not.

``fetch`` refuses to overwrite: if any destination file exists, nothing is downloaded.
Without Modal credentials every command prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import tomllib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import modal
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = ROOT / "configs" / "modal" / "default.yaml"
VOLUME_MOUNT = "/vol"  # where the volume appears in the container
REMOTE_PROJECT = "/root/denoising_zoo"  # where the source tree appears in the container
MODAL_SUFFIX = "@modal"  # a remote run whose name a different local run holds is imported as NAME@modal
NO_CREDENTIALS = "Modal credentials not found: run `modal token new` (or set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET)"
IGNORED_TOP = {".git", ".venv", "venv", "outputs", "data", "trackio", "wandb", "multirun"}  # never uploaded
IGNORED_ANY = {"__pycache__", ".pytest_cache", ".ruff_cache", ".ipynb_checkpoints", ".DS_Store"}
RUN_TABLES = ("metrics", "configs", "system_metrics", "alerts")  # run-scoped trackio tables that sync merges


class ModalAppError(ValueError):
    """A command that cannot go on; the message is one line for the user."""


# ---------------------------------------------------------------------------------
# Settings, credentials, the app
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModalSettings:
    app_name: str
    gpu: str
    gpu_count: int
    timeout: int
    volume: str
    python_version: str

    @property
    def gpu_spec(self) -> str:
        """Modal's GPU string: ``A100-80GB`` or ``A100-80GB:4``."""
        return self.gpu if self.gpu_count == 1 else f"{self.gpu}:{self.gpu_count}"


def modal_settings(cfg: DictConfig | None = None) -> ModalSettings:
    """``configs/modal/default.yaml``, overridden by ``cfg.modal`` where the config has it."""
    merged = OmegaConf.load(DEFAULTS)
    if cfg is not None and cfg.get("modal") is not None:
        merged = OmegaConf.merge(merged, cfg.modal)
    s = ModalSettings(**{k: merged[k] for k in ModalSettings.__dataclass_fields__})
    if not isinstance(s.gpu_count, int) or s.gpu_count < 1:
        raise ModalAppError(f"modal.gpu_count={s.gpu_count}: expected an integer >= 1")
    if not isinstance(s.timeout, int) or not 10 <= s.timeout <= 86400:
        raise ModalAppError(f"modal.timeout={s.timeout}: expected seconds in 10..86400 (Modal's limit is 24 h)")
    return s


def has_credentials() -> bool:
    """What the Modal client would authenticate with, read without a network call: a
    token pair (MODAL_TOKEN_ID/SECRET or ~/.modal.toml) or injected OAuth settings."""
    get = modal.config.config.get
    return bool(get("token_id") and get("token_secret")) or bool(get("oauth_refresh_token"))


def project_dependencies() -> list[str]:
    """The ``[project] dependencies`` of pyproject.toml: what the image installs."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def ignored(path: Path) -> bool:
    """Files of the source tree that are not uploaded (``path`` relative to the repo root)."""
    parts = path.parts
    return bool(parts) and (parts[0] in IGNORED_TOP or any(p in IGNORED_ANY for p in parts) or path.suffix == ".pyc")


def function_options(settings: ModalSettings) -> dict:
    """Keyword arguments of the training function (the GPU string, timeout, volume)."""
    volume = modal.Volume.from_name(settings.volume, create_if_missing=True)
    return {"gpu": settings.gpu_spec, "timeout": settings.timeout, "volumes": {VOLUME_MOUNT: volume}}


def build_image(settings: ModalSettings) -> modal.Image:
    return (
        modal.Image.debian_slim(python_version=settings.python_version)
        .pip_install(*project_dependencies())
        .env({"PYTHONPATH": REMOTE_PROJECT})
        .workdir(REMOTE_PROJECT)
        .add_local_dir(ROOT, REMOTE_PROJECT, ignore=ignored)  # last: mounted at start-up, not baked into a layer
    )


@dataclass(frozen=True)
class BuiltApp:
    app: modal.App
    train_fn: modal.Function  # remote_train on the GPU(s)
    list_fn: modal.Function  # remote_list, CPU only


def build_app(cfg: DictConfig | None = None) -> BuiltApp:
    """The app with two functions, both with the volume at /vol: ``remote_train`` (GPU)
    and ``remote_list`` (CPU). Building it makes no network call."""
    settings = modal_settings(cfg)
    app = modal.App(settings.app_name, image=build_image(settings))
    options = function_options(settings)
    train_fn = app.function(**options, serialized=True)(remote_train)
    list_fn = app.function(timeout=600, volumes=options["volumes"], serialized=True)(remote_list)
    return BuiltApp(app, train_fn, list_fn)


# ---------------------------------------------------------------------------------
# What runs in the container
# ---------------------------------------------------------------------------------


def remote_train(cfg_dict: dict, gpu_count: int = 1, volume_name: str = "", volume_root: str = VOLUME_MOUNT) -> dict:
    """Train ``cfg_dict`` with outputs and trackio on the volume; returns the exit status
    and where the checkpoint is. One GPU runs ``python``, several run ``torchrun``; both
    are subprocesses so TRACKIO_DIR is set before trackio is imported and logs stream."""
    root = Path(volume_root)
    cfg = OmegaConf.create(cfg_dict)
    cfg.output_dir = str(root / "outputs")
    trackio_dir = root / "trackio"
    trackio_dir.mkdir(parents=True, exist_ok=True)
    config_path = root / "outputs" / "runs" / cfg.run_name / "modal_config.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, config_path)
    in_container = not modal.is_local()
    if in_container:
        link_data(Path.cwd(), root)
    entry = [str(ROOT / "scripts" / "modal_app.py"), "train-config", str(config_path)]
    if gpu_count > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpu_count}", *entry]
    else:
        command = [sys.executable, *entry]
    env = os.environ | {"TRACKIO_DIR": str(trackio_dir), "PYTHONPATH": str(ROOT)}
    returncode = subprocess.run(command, env=env, cwd=ROOT).returncode
    if in_container:
        modal.Volume.from_name(volume_name).commit()  # make the checkpoints visible to list/fetch right away
    last = root / "outputs" / "ckpts" / cfg.model.name / cfg.run_name / "last.pt"
    return {"returncode": returncode, "checkpoint": str(last.relative_to(root)) if last.exists() else None}


def link_data(project: Path, volume_root: Path) -> None:
    """Point the container's ``data/`` (the configs' default data root) at the volume."""
    target = volume_root / "data"
    target.mkdir(parents=True, exist_ok=True)
    link = project / "data"
    if not link.exists():
        link.symlink_to(target, target_is_directory=True)


def train_config(path: Path) -> int:
    """``train-config PATH``: train a saved resolved config (what remote_train starts,
    under torchrun or not). Errors are one line, as in the launcher."""
    import launcher
    import train
    from models.checkpoint import CheckpointError

    try:
        train.run(OmegaConf.load(path))
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        return launcher.fail(launcher.one_line(err))
    except train.RunError as err:
        return launcher.fail(launcher.one_line(err), code=1 if "at step" in str(err) else 2)
    return 0


@dataclass
class RunSummary:
    name: str
    arch: str
    epoch: int
    step: int
    size_bytes: int  # last.pt and the run's archived checkpoints


def list_runs(root: Path) -> list[RunSummary]:
    """The runs under ``root/outputs/ckpts``: one per ``<arch>/<run>/last.pt``."""
    import torch

    runs = []
    for last in sorted((root / "outputs" / "ckpts").glob("*/*/last.pt")):
        arch_dir, name = last.parents[1], last.parent.name
        if name == "archive":
            continue
        state = torch.load(last, map_location="cpu", weights_only=True)
        files = [p for p in last.parent.rglob("*") if p.is_file()] + list((arch_dir / "archive").glob(f"{name}_*.pt"))
        runs.append(RunSummary(name, arch_dir.name, int(state["epoch"]), int(state["step"]), sum(p.stat().st_size for p in files)))
    return runs


def remote_list(volume_root: str = VOLUME_MOUNT) -> list[dict]:
    return [vars(run) for run in list_runs(Path(volume_root))]


# ---------------------------------------------------------------------------------
# The volume seen from here: a thin layer over modal.Volume, and a folder for tests
# ---------------------------------------------------------------------------------


class VolumeFiles(ABC):
    """Read access to a volume's files; paths are relative and '/'-separated."""

    @abstractmethod
    def files(self, prefix: str) -> list[str]:
        """Every file under ``prefix`` (recursively); [] if there is none."""

    @abstractmethod
    def download(self, path: str, dest: Path) -> None:
        """Copy the file ``path`` to ``dest`` (whose folder exists)."""


class FolderVolume(VolumeFiles):
    """A local folder standing in for the volume (tests, or the volume mounted at /vol)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def files(self, prefix: str) -> list[str]:
        base = self.root / prefix
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file()) if base.is_dir() else []

    def download(self, path: str, dest: Path) -> None:
        shutil.copyfile(self.root / path, dest)


class ModalVolume(VolumeFiles):
    def __init__(self, name: str) -> None:
        self.volume = modal.Volume.from_name(name)

    def files(self, prefix: str) -> list[str]:
        try:
            entries = self.volume.listdir(prefix, recursive=True)
        except modal.exception.NotFoundError:
            return []
        return sorted(e.path.lstrip("/") for e in entries if e.type == modal.volume.FileEntryType.FILE)

    def download(self, path: str, dest: Path) -> None:
        with dest.open("wb") as f:
            self.volume.read_file_into_fileobj(path, f)


# ---------------------------------------------------------------------------------
# fetch
# ---------------------------------------------------------------------------------


def run_checkpoint_files(paths: list[str], run_name: str) -> list[str]:
    """Of ``outputs/ckpts/...`` paths, those of one run: ``<arch>/<run>/*`` and
    ``<arch>/archive/<run>_epoch_XXXX.pt`` (the archive of epochs)."""
    chosen = []
    for path in paths:
        parts = PurePosixPath(path).parts[2:]  # drop outputs/ckpts
        if len(parts) >= 3 and parts[1] == run_name:
            chosen.append(path)
        elif len(parts) == 3 and parts[1] == "archive" and parts[2].startswith(f"{run_name}_epoch_"):
            chosen.append(path)
    return chosen


def fetch_run(volume: VolumeFiles, run_name: str, dest: Path) -> list[Path]:
    """Download a run's checkpoints to ``dest/<arch>/...``; refuses before downloading
    anything if one of the files is already there."""
    everything = volume.files("outputs/ckpts")
    chosen = run_checkpoint_files(everything, run_name)
    if not chosen:
        known = sorted({p.split("/")[3] for p in everything if p.endswith("/last.pt") and p.count("/") == 4})
        raise ModalAppError(f"run {run_name!r} has no checkpoints on the volume (runs there: {', '.join(known) or 'none'})")
    targets = {path: dest.joinpath(*PurePosixPath(path).parts[2:]) for path in chosen}
    existing = [str(t) for t in targets.values() if t.exists()]
    if existing:
        raise ModalAppError(f"{existing[0]} already exists ({len(existing)} of {len(targets)} files): "
                            "move it away or pass another --dest; nothing was downloaded")
    for path, target in targets.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part")
        volume.download(path, tmp)
        tmp.replace(target)
    return list(targets.values())


# ---------------------------------------------------------------------------------
# sync: merge a trackio store into another
# ---------------------------------------------------------------------------------


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
                        raise ModalAppError(f"trackio store {where} predates run ids: open it once with this trackio "
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


def sync_trackio(volume: VolumeFiles, local: Path) -> list[str]:
    """Download the volume's ``trackio/`` and merge it into the local store."""
    with tempfile.TemporaryDirectory(prefix="dz_trackio_") as tmp:
        remote = Path(tmp)
        for path in volume.files("trackio"):
            target = remote.joinpath(*PurePosixPath(path).parts[1:])
            target.parent.mkdir(parents=True, exist_ok=True)
            volume.download(path, target)
        return merge_trackio(remote, local)


# ---------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------


def launch_remote(cfg: DictConfig, overrides: list[str]) -> int:
    """``launcher.py --backend modal``: run ``cfg`` on Modal and stream its logs here."""
    if not has_credentials():
        print(f"error: {NO_CREDENTIALS}", file=sys.stderr)
        return 2
    try:
        settings = modal_settings(cfg)
    except ModalAppError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    built = build_app(cfg)
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    print(f"Modal: app {settings.app_name}, {settings.gpu_spec}, volume {settings.volume}, timeout {settings.timeout}s "
          f"(overrides: {' '.join(overrides)})", flush=True)
    with modal.enable_output(), built.app.run():
        result = built.train_fn.remote(cfg_dict, settings.gpu_count, settings.volume)
    if result["checkpoint"]:
        print(f"checkpoint on volume {settings.volume}: {result['checkpoint']}; "
              f"download with: python scripts/modal_app.py fetch {cfg.run_name}")
    return int(result["returncode"])


def local_trackio_dir() -> Path:
    from trackio.utils import TRACKIO_DIR

    return Path(TRACKIO_DIR)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Runs on the Modal volume: list, sync trackio, fetch checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="runs on the volume: name, architecture, last epoch, size")
    sub.add_parser("sync", help="merge the volume's trackio runs into the local trackio store")
    fetch = sub.add_parser("fetch", help="download a run's checkpoints (never overwrites)")
    fetch.add_argument("run_name")
    fetch.add_argument("--dest", type=Path, default=ROOT / "outputs" / "ckpts", help="local ckpts folder (default outputs/ckpts)")
    train_cfg = sub.add_parser("train-config", help=argparse.SUPPRESS)
    train_cfg.add_argument("path", type=Path)
    args = parser.parse_args(argv)

    if args.command == "train-config":
        return train_config(args.path)
    if not has_credentials():
        print(f"error: {NO_CREDENTIALS}", file=sys.stderr)
        return 2
    settings = modal_settings()
    try:
        if args.command == "list":
            built = build_app()
            with built.app.run():
                runs = built.list_fn.remote()
            print(f"{'run':<32} {'arch':<10} {'epoch':>6} {'step':>9} {'size':>10}")
            for run in runs:
                print(f"{run['name']:<32} {run['arch']:<10} {run['epoch']:>6} {run['step']:>9} {run['size_bytes'] / 2**20:>8.1f}MB")
            if not runs:
                print(f"(no runs on volume {settings.volume})")
        elif args.command == "fetch":
            for path in fetch_run(ModalVolume(settings.volume), args.run_name, args.dest):
                print(path)
        else:
            store = local_trackio_dir()
            lines = sync_trackio(ModalVolume(settings.volume), store)
            print("\n".join(lines) if lines else f"nothing new: {store} already has every run of volume {settings.volume}")
    except ModalAppError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
