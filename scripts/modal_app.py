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

``sync`` merges the remote trackio store into the local one (``$TRACKIO_DIR``) with
``scripts/trackio_merge.py``: local runs are never deleted or rewritten, a second sync
is a no-op, and a remote run whose name a different local run holds is imported as
``NAME@modal``.

``fetch`` refuses to overwrite: if any destination file exists, nothing is downloaded.
Without Modal credentials, or without the ``modal`` package, every command prints one
line and exits 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a file: imports are absolute from the repo root

from omegaconf import DictConfig, OmegaConf

from runs.errors import fail
from runs.layout import DEFAULT_OUTPUT_DIR, RunLayout, ckpt_root, find_runs, is_run_file, run_names
from scripts.trackio_merge import MergeError, merge_trackio

# The Modal client is needed only to reach Modal: without it --help still works, and
# every command (and launcher.py --backend modal) says in one line what to install.
MODAL_INSTALLED = importlib.util.find_spec("modal") is not None
if MODAL_INSTALLED:
    import modal

DEFAULTS = ROOT / "configs" / "modal" / "default.yaml"
VOLUME_MOUNT = "/vol"  # where the volume appears in the container
VOLUME_CKPTS = ckpt_root(DEFAULT_OUTPUT_DIR)  # the runs' checkpoints, relative to the volume (output_dir = /vol/outputs)
REMOTE_PROJECT = "/root/denoising_zoo"  # where the source tree appears in the container
NO_CREDENTIALS = "Modal credentials not found: run `modal token new` (or set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET)"
IGNORED_TOP = {".git", ".venv", "venv", "outputs", "data", "trackio", "wandb", "multirun"}  # never uploaded
IGNORED_ANY = {"__pycache__", ".pytest_cache", ".ruff_cache", ".ipynb_checkpoints", ".DS_Store"}


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


def modal_unavailable() -> str | None:
    """Why nothing can reach Modal from here (the one line to print), or None."""
    if not MODAL_INSTALLED:
        wanted = next(r for r in project_dependencies() if re.match(r"modal\b", r))
        return f"the Modal client is not installed: pip install '{wanted}' (one of the project's dependencies)"
    if not has_credentials():
        return NO_CREDENTIALS
    return None


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
    cfg.output_dir = str(root / DEFAULT_OUTPUT_DIR)
    trackio_dir = root / "trackio"
    trackio_dir.mkdir(parents=True, exist_ok=True)
    config_path = RunLayout.of(cfg).remote_config
    config_path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, config_path)
    in_container = not modal.is_local()
    if in_container:
        link_data(Path.cwd(), root)
    entry = [str(ROOT / "launcher.py"), "--from-config", str(config_path)]
    if gpu_count > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpu_count}", *entry]
    else:
        command = [sys.executable, *entry]
    env = os.environ | {"TRACKIO_DIR": str(trackio_dir), "PYTHONPATH": str(ROOT)}
    returncode = subprocess.run(command, env=env, cwd=ROOT).returncode
    if in_container:
        modal.Volume.from_name(volume_name).commit()  # make the checkpoints visible to list/fetch right away
    last = RunLayout.of(cfg).last
    return {"returncode": returncode, "checkpoint": str(last.relative_to(root)) if last.exists() else None}


def link_data(project: Path, volume_root: Path) -> None:
    """Point the container's ``data/`` (the configs' default data root) at the volume."""
    target = volume_root / "data"
    target.mkdir(parents=True, exist_ok=True)
    link = project / "data"
    if not link.exists():
        link.symlink_to(target, target_is_directory=True)


@dataclass
class RunSummary:
    name: str
    arch: str
    epoch: int
    step: int
    size_bytes: int  # last.pt and the run's archived checkpoints


def list_runs(root: Path) -> list[RunSummary]:
    """The runs under ``root/outputs/ckpts``: one per ``<arch>/<run>/last.pt``, by name."""
    from runs.checkpoint import read_checkpoint

    runs = []
    for run in sorted(find_runs(root / VOLUME_CKPTS), key=lambda r: r.run):
        state = read_checkpoint(run.last)  # checked like any file from elsewhere
        size = sum(p.stat().st_size for p in run.files())
        runs.append(RunSummary(run.run, run.arch, int(state["epoch"]), int(state["step"]), size))
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
    """Of ``outputs/ckpts/...`` paths, those of one run (``runs/layout.py::is_run_file``)."""
    return [path for path in paths if is_run_file(PurePosixPath(*PurePosixPath(path).parts[2:]), run_name)]


def fetch_run(volume: VolumeFiles, run_name: str, dest: Path) -> list[Path]:
    """Download a run's checkpoints to ``dest/<arch>/...``; refuses before downloading
    anything if one of the files is already there."""
    everything = volume.files(str(VOLUME_CKPTS))
    chosen = run_checkpoint_files(everything, run_name)
    if not chosen:
        known = run_names([PurePosixPath(*PurePosixPath(p).parts[2:]) for p in everything])
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
    if (reason := modal_unavailable()) is not None:
        return fail(reason)
    try:
        settings = modal_settings(cfg)
    except ModalAppError as err:
        return fail(str(err))
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
    fetch.add_argument("--dest", type=Path, default=ROOT / VOLUME_CKPTS, help=f"local ckpts folder (default {VOLUME_CKPTS})")
    args = parser.parse_args(argv)

    if (reason := modal_unavailable()) is not None:
        return fail(reason)
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
    except (ModalAppError, MergeError) as err:
        return fail(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
