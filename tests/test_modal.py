"""The Modal backend without the network: the app is built for real and inspected
through the definition modal would send; the training function's body runs through
``.local()`` on a tiny config, with a temporary folder standing in for the volume.

Reading the GPU string, the volumes and the image from ``Function._spec_`` and the
timeout and image layers from the loaders' closures uses modal's internals (modal
exposes no public read-back before deployment); if a modal upgrade moves them, these
helpers are the one place to follow.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict

import launcher
from runs.layout import DEFAULT_OUTPUT_DIR, RunLayout
from scripts import modal_app

ROOT = Path(__file__).resolve().parents[1]
# The modal package is needed only to reach Modal; these tests read its objects.
needs_modal = pytest.mark.skipif(not modal_app.MODAL_INSTALLED, reason="the modal package is not installed")
TINY = [
    "epochs=2", "model.hidden=32", "dataloaders.dataset.num_samples=512", "batch_size=64",
    "eval.num_samples=64", "eval.steps=4", "eval.plot=false", "device=cpu",
]


def compose(overrides: list[str]):
    cfg = launcher.compose(overrides)
    OmegaConf.resolve(cfg)
    return cfg


def closure(fn) -> dict:
    return dict(zip(fn.__code__.co_freevars, (cell.cell_contents for cell in fn.__closure__ or ()), strict=True))


def dockerfile_commands(image) -> list[str]:
    """Every layer's Dockerfile commands, base image first."""
    from modal._image import _Image
    from modal._utils.async_utils import synchronizer

    commands, layer = [], synchronizer._translate_in(image)
    while layer is not None:
        cells = closure(layer._load)
        if "dockerfile_function" in cells:
            commands = list(cells["dockerfile_function"]("2024.10").commands) + commands
        bases = [v for v in cells.values() if isinstance(v, _Image)] + list(cells.get("base_images", {}).values())
        layer = bases[0] if bases else None
    return commands


def function_definition(fn) -> dict:
    from modal._utils.async_utils import synchronizer

    return closure(synchronizer._translate_in(fn)._load)


@needs_modal
def test_app_is_built_from_the_config():
    cfg = compose(["run_name=m"])
    with open_dict(cfg):
        cfg.modal = {"gpu": "H100", "gpu_count": 2, "timeout": 3600, "volume": "dz-test-volume", "app_name": "dz-test",
                     "python_version": "3.12"}
    built = modal_app.build_app(cfg)
    assert built.app.name == "dz-test"
    train_fn = built.train_fn
    spec = train_fn._spec_
    assert spec.gpus == "H100:2"
    assert list(spec.volumes) == [modal_app.VOLUME_MOUNT]
    assert spec.volumes[modal_app.VOLUME_MOUNT].name == "dz-test-volume"
    definition = function_definition(train_fn)
    assert definition["timeout"] == 3600 and definition["gpu"] == "H100:2"

    commands = dockerfile_commands(spec.image)
    assert commands[0].startswith("FROM python:3.12"), commands[0]
    pip = [c for c in commands if "pip install" in c and "torch" in c]
    assert len(pip) == 1
    for requirement in modal_app.project_dependencies():
        assert f"'{requirement}'" in pip[0] or requirement in pip[0], requirement
    assert any(c.startswith("WORKDIR") and modal_app.REMOTE_PROJECT in c for c in commands)

    from modal._utils.async_utils import synchronizer

    mount = closure(synchronizer._translate_in(spec.image)._load)["mount"]
    (entry,) = mount._entries
    assert (entry.local_dir, str(entry.remote_path), entry.ignore) == (ROOT, modal_app.REMOTE_PROJECT, modal_app.ignored)

    list_fn = built.list_fn
    assert list_fn._spec_.gpus is None and list_fn._spec_.volumes[modal_app.VOLUME_MOUNT].name == "dz-test-volume"


def test_defaults_come_from_configs_modal_default_yaml():
    settings = modal_app.modal_settings(compose(["run_name=m"]))
    assert settings == modal_app.ModalSettings(**OmegaConf.to_container(OmegaConf.load(ROOT / "configs/modal/default.yaml")))
    assert settings.gpu_spec == settings.gpu  # one GPU: no ":1"
    cfg = compose(["run_name=m"])
    with open_dict(cfg):
        cfg.modal = {"gpu_count": 0}
    with pytest.raises(modal_app.ModalAppError, match="modal.gpu_count=0"):
        modal_app.modal_settings(cfg)


def test_source_upload_leaves_out_outputs_venv_git_and_data():
    for skipped in [RunLayout(DEFAULT_OUTPUT_DIR, "mlp", "a").last, ".venv/bin/python", ".git/HEAD",
                    "data/cifar-10-batches-py/data_batch_1", "models/__pycache__/ema.cpython-311.pyc", "train.pyc"]:
        assert modal_app.ignored(Path(skipped)), skipped
    for kept in ["train.py", "configs/train.yaml", "models/ema.py", "scripts/modal_app.py", "pyproject.toml", "dataloaders/cifar10.py"]:
        assert not modal_app.ignored(Path(kept)), kept


REMOTE_BODY = """
import json, sys
from omegaconf import OmegaConf
import launcher
from scripts import modal_app
overrides, volume, gpus = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
cfg = launcher.compose(overrides)
built = modal_app.build_app(cfg)
result = built.train_fn.local(OmegaConf.to_container(cfg, resolve=True), gpus, "unused", volume)
print("RESULT " + json.dumps(result))
"""


@needs_modal
@pytest.mark.slow
@pytest.mark.parametrize("gpus", [1, 2])
def test_remote_function_body_trains_into_the_volume(tmp_path, gpus):
    """One GPU runs python, two run torchrun (gloo on the CPU here); both write the
    checkpoint and the trackio run onto the stand-in volume, never into the repo."""
    import json

    volume = tmp_path / "vol"
    name = f"remote{gpus}"
    overrides = [f"run_name={name}", "trackio.enabled=true", *TINY]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_") and k not in ("TRACKIO_DIR", "RANK", "WORLD_SIZE")}
    env |= {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-c", REMOTE_BODY, json.dumps(overrides), str(volume), str(gpus)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    outcome = json.loads(line.removeprefix("RESULT "))
    assert outcome == {"returncode": 0, "checkpoint": str(RunLayout(DEFAULT_OUTPUT_DIR, "mlp", name).last)}
    state = torch.load(volume / outcome["checkpoint"], weights_only=True)
    assert state["epoch"] == 2 and state["step"] == 2 * 512 // (64 * gpus)
    assert state["config"]["output_dir"] == str(volume / "outputs")
    assert RunLayout(volume / DEFAULT_OUTPUT_DIR, "mlp", name).remote_config.is_file()

    read = textwrap.dedent(f"""
        from trackio.sqlite_storage import SQLiteStorage
        print(SQLiteStorage.get_runs("denoising-zoo"), SQLiteStorage.get_log_count("denoising-zoo", {name!r}))
    """)
    runs = subprocess.run([sys.executable, "-c", read], env=env | {"TRACKIO_DIR": str(volume / "trackio")},
                          capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    assert runs == f"['{name}'] 2", runs

    (summary,) = modal_app.list_runs(volume)
    assert (summary.name, summary.arch, summary.epoch, summary.step) == (name, "mlp", 2, state["step"])
    assert summary.size_bytes >= (volume / outcome["checkpoint"]).stat().st_size

    home = RunLayout(tmp_path / "home", "mlp", name)
    dest = home.ckpt_root
    fetched = modal_app.fetch_run(modal_app.FolderVolume(volume), name, dest)
    assert fetched == [home.last]
    assert torch.load(fetched[0], weights_only=True)["step"] == state["step"]
    with pytest.raises(modal_app.ModalAppError, match="already exists"):
        modal_app.fetch_run(modal_app.FolderVolume(volume), name, dest)


def test_fetch_picks_one_run_and_refuses_to_overwrite(tmp_path):
    volume = tmp_path / "vol"
    a, ab, unet_a = (RunLayout(volume / DEFAULT_OUTPUT_DIR, arch, run) for arch, run in (("mlp", "a"), ("mlp", "ab"), ("unet", "a")))
    files = [a.last, ab.last, a.archive(10), ab.archive(10), unet_a.last, a.plots / "x.png"]
    for i, f in enumerate(files):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(bytes([i]))
    local = RunLayout(tmp_path, "mlp", "a")
    dest = local.ckpt_root
    got = modal_app.fetch_run(modal_app.FolderVolume(volume), "a", dest)
    assert sorted(got) == sorted([local.last, local.archive(10), RunLayout(tmp_path, "unet", "a").last])
    assert local.last.read_bytes() == bytes([0])
    local.last.write_bytes(b"local")
    with pytest.raises(modal_app.ModalAppError, match="already exists"):
        modal_app.fetch_run(modal_app.FolderVolume(volume), "a", dest)
    assert local.last.read_bytes() == b"local"
    assert not RunLayout(tmp_path, "mlp", "ab").run_dir.exists()
    with pytest.raises(modal_app.ModalAppError, match=r"run 'zz' has no checkpoints on the volume \(runs there: a, ab\)"):
        modal_app.fetch_run(modal_app.FolderVolume(volume), "zz", dest)


COMMANDS = [["launcher.py", "--backend", "modal", "run_name=x"], ["scripts/modal_app.py", "list"],
            ["scripts/modal_app.py", "sync"], ["scripts/modal_app.py", "fetch", "x"]]


def user_env(home: Path) -> dict[str, str]:
    """No Modal credentials (no MODAL_* variables, an empty home) and no PYTHONPATH: the
    commands run as a user types them in the repository."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MODAL_") and k != "PYTHONPATH"} | {"HOME": str(home)}


@needs_modal
@pytest.mark.parametrize("command", COMMANDS)
def test_missing_credentials_is_one_line(tmp_path, command):
    result = subprocess.run([sys.executable, *command], cwd=ROOT, env=user_env(tmp_path), capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {modal_app.NO_CREDENTIALS}", result.stderr


@pytest.mark.parametrize("command", [*COMMANDS, ["scripts/modal_app.py", "--help"]])
def test_without_the_modal_package_each_command_says_what_to_install(tmp_path, command):
    """``modal`` made unimportable (a sitecustomize marks it missing): --help still
    prints the usage, every other command one line naming the requirement, exit 2."""
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['modal'] = None  # import modal: ModuleNotFoundError\n")
    env = user_env(tmp_path) | {"PYTHONPATH": str(blocker)}
    result = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                            check=False)
    if command[-1] == "--help":
        assert result.returncode == 0 and result.stdout.startswith("usage: modal_app.py"), result.stderr
        return
    requirement = next(r for r in modal_app.project_dependencies() if r.startswith("modal"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"error: the Modal client is not installed: pip install '{requirement}' (one of the " \
                                    "project's dependencies)", result.stderr
