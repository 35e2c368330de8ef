"""scripts/export.py: a run's weights as model.safetensors + config.yaml, loaded back like a checkpoint."""

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

import launcher
from evaluation.sample import load_checkpoint_model
from models.unified_input import make_unified_flow_matching_input
from runs.build import build_model
from runs.checkpoint import read_checkpoint, save_checkpoint
from runs.errors import CheckpointError
from runs.export import load_model_from_export, weights_digest
from runs.layout import EXPORT_CONFIG, EXPORT_WEIGHTS, RunLayout
from runs.stored import load_model_from_checkpoint
from scripts.export import main as export_main
from tests.conftest import REPO, TINY_OVERRIDES, compose_train, launch
from tests.test_checkpoint_safety import hostile_models, tiny_state


@pytest.fixture
def run(tmp_path) -> RunLayout:
    """A tiny run's last.pt at its place in the layout (run name ``test``)."""
    layout = RunLayout(tmp_path / "outputs", "mlp", "test")
    state = tiny_state()
    state["config"]["output_dir"] = str(layout.output_dir)
    save_checkpoint(state, layout.last)
    return layout


def export(capsys, *argv: str) -> tuple[int, str, str]:
    code = export_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def outputs(model: torch.nn.Module) -> torch.Tensor:
    z = torch.randn(16, 4, generator=torch.Generator().manual_seed(2))
    return model(z)


def test_export_reloads_the_ema_model(run, capsys):
    code, out, _ = export(capsys, "test", "--output-dir", run.output_dir)
    folder = run.export_dir()
    assert code == 0 and str(folder) in out
    assert sorted(folder.iterdir()) == sorted([folder / EXPORT_CONFIG, folder / EXPORT_WEIGHTS])
    exported, cfg, info = load_model_from_checkpoint(folder)
    original, saved_cfg, state = load_model_from_checkpoint(run.last)
    for name, tensor in original.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor), name  # a byte-for-byte copy of the EMA weights
    torch.testing.assert_close(outputs(exported), outputs(original))
    assert info["epoch"] == state["epoch"] == 3 and info["step"] == state["step"] == 24 and info["weights"] == "ema"
    assert info["weights_sha256"] == weights_digest(state["ema"])
    assert OmegaConf.to_container(cfg) == OmegaConf.to_container(saved_cfg)
    with safe_open(folder / EXPORT_WEIGHTS, framework="pt") as f:
        assert f.metadata()["run_name"] == "test" and f.metadata()["source"] == str(run.last)
    # The samplers' loader takes the folder too.
    sampler_model, _ = load_checkpoint_model(str(folder))
    torch.testing.assert_close(outputs(sampler_model), outputs(original))


def test_raw_weights_and_a_checkpoint_path(run, tmp_path, capsys):
    folder = tmp_path / "shared"
    code, _, _ = export(capsys, run.last, "--out", folder, "--weights", "raw")
    assert code == 0
    model, _, info = load_model_from_export(folder)
    raw = read_checkpoint(run.last)["model"]
    assert info["weights"] == "raw" and all(torch.equal(model.state_dict()[k], v) for k, v in raw.items())


def test_archived_epochs_and_run_folders(run, capsys):
    archive = run.archive(3)
    archive.parent.mkdir(parents=True)
    archive.write_bytes(run.last.read_bytes())
    assert export(capsys, archive, "--output-dir", run.output_dir)[0] == 0
    assert load_model_from_export(run.export_dir(3))[2]["epoch"] == 3
    assert export(capsys, run.run_dir, "--output-dir", run.output_dir)[0] == 0  # the folder of last.pt
    assert (run.export_dir() / EXPORT_WEIGHTS).is_file()


def test_an_export_is_never_replaced_without_force(run, capsys):
    assert export(capsys, "test", "--output-dir", run.output_dir)[0] == 0
    weights = run.export_dir() / EXPORT_WEIGHTS
    before = weights.read_bytes()
    code, _, err = export(capsys, "test", "--output-dir", run.output_dir, "--weights", "raw")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--force" in err, err
    assert weights.read_bytes() == before
    assert export(capsys, "test", "--output-dir", run.output_dir, "--weights", "raw", "--force")[0] == 0
    assert weights.read_bytes() != before
    assert load_model_from_export(weights.parent)[2]["weights"] == "raw"


def test_unknown_runs_and_bad_paths_are_one_line(run, tmp_path, capsys):
    code, _, err = export(capsys, "nope", "--output-dir", run.output_dir)
    assert code == 2 and "no run 'nope'" in err and "runs there: test" in err and len(err.strip().splitlines()) == 1
    code, _, err = export(capsys, tmp_path / "absent.pt")
    assert code == 2 and "does not exist" in err
    assert not run.export_dir().parent.exists()


def write_config_and_checksum(folder: Path, text: str) -> None:
    """Replace an export's config.yaml and the checksum that covers it, as someone who
    knows the format can: the checksum finds accidents, the allowlist stops intent."""
    with safe_open(folder / EXPORT_WEIGHTS, framework="pt") as f:
        metadata, tensors = f.metadata(), {name: f.get_tensor(name) for name in list(f.keys())}
    (folder / EXPORT_CONFIG).write_text(text)
    metadata["config_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    save_file(tensors, folder / EXPORT_WEIGHTS, metadata=metadata)


def test_a_tampered_export_is_refused(run, tmp_path, capsys):
    folder = tmp_path / "export"
    assert export(capsys, run.last, "--out", folder)[0] == 0
    config_text = (folder / EXPORT_CONFIG).read_text()

    # config.yaml changed after export: its checksum no longer matches.
    (folder / EXPORT_CONFIG).write_text(config_text.replace("hidden: 32", "hidden: 33"))
    with pytest.raises(CheckpointError, match="config.yaml does not match the checksum") as info:
        load_model_from_checkpoint(folder)
    assert "\n" not in str(info.value)

    # A config that names code to run, with a matching checksum: refused before anything
    # is imported or called.
    hostile = OmegaConf.create(config_text)
    hostile.model = hostile_models(tmp_path)["torch_load"]
    write_config_and_checksum(folder, OmegaConf.to_yaml(hostile))
    with pytest.raises(CheckpointError, match="_target_='torch.load' is refused") as info:
        load_model_from_checkpoint(folder)
    assert "\n" not in str(info.value) and not (tmp_path / "MARKER").exists()

    # A config for another architecture: the strict load names the first misfit.
    write_config_and_checksum(folder, config_text.replace("hidden: 32", "hidden: 16"))
    with pytest.raises(CheckpointError, match=r"has shape \(32, .*expects \(16, "):
        load_model_from_checkpoint(folder)

    # Changed weight bytes: the checksum in the metadata no longer matches.
    write_config_and_checksum(folder, config_text)
    assert load_model_from_checkpoint(folder)[2]["step"] == 24
    raw = bytearray((folder / EXPORT_WEIGHTS).read_bytes())
    raw[-3] ^= 0x01  # the last tensor's bytes
    (folder / EXPORT_WEIGHTS).write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum"):
        load_model_from_checkpoint(folder)

    # Not safetensors at all, and a folder with only one of the two files.
    (folder / EXPORT_WEIGHTS).write_bytes(b"\x00" * 40)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model_from_checkpoint(folder)
    (folder / EXPORT_CONFIG).unlink()
    with pytest.raises(CheckpointError, match="has no config.yaml"):
        load_model_from_checkpoint(folder)


@pytest.mark.slow
def test_export_script_and_eval_checkpoint_on_the_folder(run, tmp_path):
    script = [sys.executable, str(REPO / "scripts" / "export.py"), "test", "--output-dir", str(run.output_dir)]
    result = subprocess.run(script, check=False, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    folder = run.export_dir()
    evaluated = launch([f"eval_checkpoint={folder}", f"output_dir={tmp_path / 'eval_out'}", "device=cpu"], cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "energy_distance" in evaluated.stdout


def test_eval_of_an_export_evaluates_and_names_the_weights_it_holds(run, tmp_path, capsys, monkeypatch):
    assert export(capsys, "test", "--output-dir", run.output_dir, "--weights", "raw", "--out", tmp_path / "raw")[0] == 0
    monkeypatch.chdir(tmp_path)
    args = [f"eval_checkpoint={tmp_path / 'raw'}", f"output_dir={tmp_path / 'out'}", "device=cpu", "eval.num_samples=100"]
    assert launcher.main(args) == 0
    out = capsys.readouterr().out
    (written,) = RunLayout(tmp_path / "out", run.arch, run.run).eval_dir.glob("*.json")
    assert written.name.startswith("epoch_0003_raw_") and "weights: raw" in out
    assert launcher.main([*args, "eval.weights=ema"]) == 2
    assert "is an export of the raw weights only" in capsys.readouterr().err


DENSE = [o for o in TINY_OVERRIDES if not o.startswith(("model.", "dataloaders."))]
AUX_MODELS = {
    "mlp": [*TINY_OVERRIDES, "model.aux_head=true"],
    "dit": [*DENSE, "dataloaders=digits", "model=dit_s", "model.hidden_size=32", "model.depth=3", "model.num_heads=2",
            "model.frequency_dim=16", "model.aux_head=true", "model.aux_depth=2"],  # shared block 1, heads of 2 blocks each
}


@pytest.mark.parametrize("arch", sorted(AUX_MODELS))
def test_an_export_leaves_the_auxiliary_head_behind(arch, tmp_path, capsys):
    """The v head is for training: the export holds the u path alone, its config says
    aux_head false, it loads strictly into the plain model and gives the same u."""
    cfg = compose_train([*AUX_MODELS[arch], f"output_dir={tmp_path / 'outputs'}"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)  # zero-initialised output layers would hide a wrong head
    layout = RunLayout(tmp_path / "outputs", str(cfg.model.name), "test")
    save_checkpoint({"model": model.state_dict(), "ema": model.state_dict(), "step": 8, "epoch": 1,
                     "config": OmegaConf.to_container(cfg, resolve=True), "metrics": {}}, layout.last)
    assert export(capsys, layout.last, "--out", tmp_path / "export")[0] == 0
    with safe_open(tmp_path / "export" / EXPORT_WEIGHTS, framework="pt") as f:
        names = set(f.keys())
    assert names == set(model.inference_state_dict()) and not any(n.startswith("aux_") for n in names)
    assert len(names) < len(model.state_dict())
    exported, exported_cfg, _ = load_model_from_checkpoint(tmp_path / "export")  # rebuilt from config.yaml, loaded strictly
    assert exported_cfg.model.aux_head is False and not exported.aux_head
    trained, shipped = OmegaConf.to_container(cfg.model, resolve=True), OmegaConf.to_container(exported_cfg.model)
    changed = {k: v for k, v in shipped.items() if trained[k] != v}
    assert set(shipped) == set(trained) and changed == {"aux_head": False, **({"aux_depth": 0} if arch == "dit" else {})}
    x = torch.randn(5, *cfg.dataloaders.data_shape, generator=torch.Generator().manual_seed(1))
    z = make_unified_flow_matching_input(x, torch.rand(5), torch.ones(5))
    torch.testing.assert_close(exported(z), model(z), rtol=0, atol=0)
