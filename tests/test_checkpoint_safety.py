"""Reading a checkpoint from someone else: nothing in the file runs, and damage is found.

Each hostile config below names something that has a side effect when called (it
writes a marker file, or re-loads a pickle unsafely, which then writes the marker);
``test_the_hostile_targets_really_write_when_called`` shows that they do. Loading a
checkpoint that carries one must refuse it in one line and leave no marker.
"""

import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from runs.build import build_model, instantiate_allowed
from runs.checkpoint import read_checkpoint, save_checkpoint
from runs.errors import CheckpointError, RunError
from runs.layout import ckpt_root
from runs.stored import load_model_from_checkpoint
from tests.conftest import TINY_OVERRIDES, compose_train, launch, run_layout


def tiny_state(seed: int = 0) -> dict:
    """A checkpoint as training writes it (the required keys), of the tiny MLP run."""
    cfg = compose_train(TINY_OVERRIDES)
    config = OmegaConf.to_container(cfg, resolve=True)
    torch.manual_seed(seed)
    model, ema = build_model(cfg.model), build_model(cfg.model)
    with torch.no_grad():
        for p, q in zip(model.parameters(), ema.parameters()):
            p.normal_(0.0, 0.3)  # the MLP zeroes its output layer; make every weight matter
            q.copy_(0.5 * p)
    return {"model": model.state_dict(), "ema": ema.state_dict(), "step": 24, "epoch": 3, "config": config,
            "metrics": {"eval/energy_distance": 0.5}}  # fmt: skip


class WritesMarker:
    """Unpickling this (with weights_only=False) writes a file: a stand-in for any code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def hostile_models(tmp_path: Path) -> dict[str, dict]:
    marker = tmp_path / "MARKER"
    unsafe_pickle = tmp_path / "payload.pkl"
    unsafe_pickle.write_bytes(pickle.dumps(WritesMarker(marker)))
    reload_unsafely = {"f": str(unsafe_pickle), "weights_only": False}
    mlp = {"name": "mlp", "_target_": "models.flow_matching.mlp.MLP", "data_dim": 2}
    return {
        "torch_load": {"_target_": "torch.load", **reload_unsafely},
        "through_an_import": {"_target_": "models.base_model.torch.load", **reload_unsafely},
        "project_function": {"_target_": "runs.checkpoint.save_checkpoint", "state": {}, "path": str(marker)},
        "not_a_model_class": {"_target_": "models.embeddings.TimestepEmbedder", "hidden_size": 4},
        "not_a_velocity_model": {"_target_": "models.vae.vae.SDVAE", "pretrained": "someone/else"},  # would download
        "abstract_base": {"_target_": "models.base_model.BaseModel"},
        "nested_target": {**mlp, "activation": {"_target_": "torch.load", **reload_unsafely}},
        "nested_in_a_list": {**mlp, "hidden": [{"_target_": "torch.load", **reload_unsafely}]},
        "partial": {"_target_": "torch.load", "_partial_": True, **reload_unsafely},
        "positional_args": {**mlp, "_args_": [str(unsafe_pickle)]},
        "interpolation": {**mlp, "activation": "${oc.env:HOME}"},
    }


NEEDLES = {
    "torch_load": "_target_='torch.load' is refused",
    "through_an_import": "_target_='models.base_model.torch.load' is refused",
    "project_function": "_target_='runs.checkpoint.save_checkpoint' is refused",
    "not_a_model_class": "_target_='models.embeddings.TimestepEmbedder' is refused",
    "not_a_velocity_model": "_target_='models.vae.vae.SDVAE' is refused",
    "abstract_base": "_target_='models.base_model.BaseModel' is refused",
    "nested_target": "model.activation._target_ is refused",
    "nested_in_a_list": "model.hidden[0]._target_ is refused",
    "partial": "_partial_",
    "positional_args": "model._args_ is refused",
    "interpolation": "is an interpolation",
}


def test_the_hostile_targets_really_write_when_called(tmp_path):
    """Control for the refusals below: each side effect is real."""
    models = hostile_models(tmp_path)
    with pytest.raises(RuntimeError, match="magic number"):  # the payload runs first, then torch finds no checkpoint
        torch.load(models["torch_load"]["f"], weights_only=False)
    assert (tmp_path / "MARKER").read_text() == "ran"
    (tmp_path / "MARKER").unlink()
    save_checkpoint({}, Path(models["project_function"]["path"]))
    assert (tmp_path / "MARKER").exists()


@pytest.mark.parametrize("kind", sorted(NEEDLES))
def test_a_hostile_model_config_is_refused_without_running_anything(tmp_path, kind):
    state = tiny_state()
    state["config"]["model"] = hostile_models(tmp_path)[kind]
    path = tmp_path / "hostile.pt"
    save_checkpoint(state, path)  # passes torch.load(weights_only=True): the config is plain data
    assert torch.load(path, weights_only=True)["config"]["model"] == state["config"]["model"]
    with pytest.raises(CheckpointError) as info:
        load_model_from_checkpoint(path)
    message = str(info.value)
    assert NEEDLES[kind] in message and "\n" not in message and len(message) < 400, message
    assert not (tmp_path / "MARKER").exists(), "rebuilding the model ran the config's target"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hostile", "directory"])
def test_the_launcher_refuses_with_one_line_and_exit_2(tmp_path, kind):
    path = tmp_path / "hostile.pt"
    if kind == "hostile":
        state = tiny_state()
        state["config"]["model"] = hostile_models(tmp_path)["torch_load"]
        save_checkpoint(state, path)
    else:
        path = ckpt_root(tmp_path)  # the folder of every run, given where a file is expected
        path.mkdir()
    result = launch([f"eval_checkpoint={path}", f"output_dir={tmp_path / 'out'}", "device=cpu"], cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    needle = "_target_='torch.load' is refused" if kind == "hostile" else "is a directory"
    assert result.returncode == 2 and len(lines) == 1 and needle in lines[0] and str(path) in lines[0], result.stderr
    assert not (tmp_path / "MARKER").exists()
    assert not (tmp_path / "out").exists()


def test_the_project_classes_still_build_from_composed_and_stored_configs(tmp_path):
    state = tiny_state()
    model, cfg, _ = load_model_from_checkpoint(saved(state, run_layout(tmp_path, "test").last))
    assert type(model).__name__ == "MLP" and cfg.model.hidden == 32
    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    expected = build_model(state["config"]["model"])
    expected.load_state_dict(state["ema"])
    torch.testing.assert_close(model(z), expected.eval()(z))
    # The generic form, as the losses use it: another prefix, the same rules.
    loss = compose_train(["loss=mse"]).loss
    built = instantiate_allowed({k: v for k, v in loss.items() if k != "name"}, ("losses.",), "loss")
    assert type(built).__module__.startswith("losses.")
    with pytest.raises(CheckpointError, match="a loss must be a class defined in this project under losses."):
        instantiate_allowed({"_target_": "models.flow_matching.mlp.MLP", "data_dim": 2}, ("losses.",), "loss")


def test_data_set_factories_from_a_stored_config(tmp_path):
    """Data sets are built by factory functions (``dataloaders.<name>.make_dataset``)
    with a split the caller adds; a stored config reaches nothing else."""
    node = dict(tiny_state()["config"]["dataloaders"]["dataset"])
    dataset = instantiate_allowed(node, ("dataloaders.",), "dataset", functions=True, extra={"split": "train"})
    assert len(dataset) > 0
    with pytest.raises(CheckpointError, match="a dataset must be a class defined"):  # factories only when asked for
        instantiate_allowed(node, ("dataloaders.",), "dataset", extra={"split": "train"})
    marker = tmp_path / "MARKER"
    for target in ("dataloaders.base_dataloaders.instantiate", "torch.load", "runs.checkpoint.save_checkpoint"):
        with pytest.raises(CheckpointError, match=f"_target_='{target}' is refused"):
            instantiate_allowed({"_target_": target, "path": str(marker)}, ("dataloaders.",), "dataset", functions=True)
    assert not marker.exists()


def test_wrong_arguments_and_weights_are_one_line(tmp_path):
    state = tiny_state()
    state["config"]["model"]["no_such_argument"] = 1
    with pytest.raises(CheckpointError, match="does not fit models.flow_matching.mlp.MLP.*no_such_argument"):
        load_model_from_checkpoint(saved(state, tmp_path / "a.pt"))
    state = tiny_state()
    state["config"]["model"]["hidden"] = 16  # the stored weights are 32 wide
    with pytest.raises(CheckpointError, match=r"has shape \(32, .*expects \(16, ") as info:
        load_model_from_checkpoint(saved(state, tmp_path / "b.pt"))
    assert "\n" not in str(info.value)


def saved(state: dict, path: Path) -> Path:
    save_checkpoint(state, path)
    return path


def test_checkpoint_error_is_a_run_error_with_exit_2():
    err = CheckpointError("x")
    assert isinstance(err, ValueError) and isinstance(err, RunError) and err.exit_code == 2


# ---------------------------------------------------------------------------------
# Damage and refusals
# ---------------------------------------------------------------------------------


def payload_offset(path: Path, member_suffix: str) -> tuple[str, int]:
    """The name and file offset of the first byte of a stored member's data."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(member_suffix))
    raw = path.read_bytes()
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    assert info.compress_type == zipfile.ZIP_STORED
    return info.filename, info.header_offset + 30 + name_len + extra_len


def test_a_flipped_byte_in_a_tensor_is_found(tmp_path):
    path = run_layout(tmp_path, "test").last
    save_checkpoint(tiny_state(), path)
    assert read_checkpoint(path)["step"] == 24  # intact: loads
    member, offset = payload_offset(path, "/data/0")
    raw = bytearray(path.read_bytes())
    raw[offset + 5] ^= 0x10
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(damaged)
    message = str(info.value)
    assert str(damaged) in message and repr(member) in message and "CRC" in message and "\n" not in message
    with pytest.raises(CheckpointError, match="CRC"):
        load_model_from_checkpoint(damaged)


class NotAllowed:
    """A class the safe unpickler does not know."""


def test_weights_only_refusals_are_one_short_line(tmp_path):
    marker = tmp_path / "MARKER"
    for payload, needle in ((NotAllowed(), f"{__name__}.NotAllowed"), (WritesMarker(marker), "exec")):
        path = tmp_path / "refused.pt"
        torch.save({"model": payload}, path)
        with pytest.raises(CheckpointError) as info:
            read_checkpoint(path)
        message = str(info.value)
        assert "refused by the safe loader" in message and needle in message, message
        assert "\n" not in message and "\x1b" not in message and len(message) < 300, message
        assert "weights_only` set to `False" not in message  # no advice to load it unsafely
    assert not marker.exists()


def test_a_directory_is_named_as_a_directory(tmp_path):
    for call in (read_checkpoint, load_model_from_checkpoint):
        with pytest.raises(CheckpointError) as info:
            call(tmp_path)
        assert "is a directory" in str(info.value) and "does not exist" not in str(info.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "absent.pt")


def test_a_damaged_central_directory_is_one_line(tmp_path):
    path = run_layout(tmp_path, "test").last
    save_checkpoint(tiny_state(), path)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        first = archive.infolist()[0]
    central = raw.rfind(b"PK\x01\x02", 0, len(raw) - 22)  # a central directory entry, before the end record
    assert central > first.header_offset
    raw[central : central + 4] = b"XXXX"
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        read_checkpoint(path)
    assert "\n" not in str(info.value)
