"""Checkpoints written before the schema (format 1) still load, evaluate and resume.

A format-1 file is made the way the previous version wrote it: a real checkpoint of a
tiny run (cut at the end of epoch 1), without "format" and without the keys that version
did not write yet, saved with plain ``torch.save``. It reads as format 2 with SCHEMA's
defaults, ``eval_checkpoint`` evaluates it to the numbers the run logged, and
``resume=true`` continues it to weights bit-identical (CPU) to a run never cut. What
this version cannot read is refused in one line: a newer format, a key of the wrong
type, and (for resuming only) a file of weights alone.

The runs go through ``launcher.main`` in this process: the same code as the command
line, without an interpreter start per run.
"""

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import launcher
from runs.checkpoint import FORMAT, SCHEMA, read_checkpoint
from runs.errors import CheckpointError
from tests.conftest import TINY_OVERRIDES, run_layout, tree_hashes

pytestmark = pytest.mark.slow

# 512 samples / 64 = 8 steps an epoch; max_steps fixes the schedule's horizon, so the run
# cut after epoch 1 and resumed to 2 follows the schedule of the uncut one.
RUN = [*TINY_OVERRIDES, "run_name=old", "max_steps=16", "eval.every_epochs=1", "checkpoint.archive_every_epochs=0",
       "eval.plot=false"]
LACKED_BY_FORMAT_1 = ("batch_in_epoch", "loss", "emas", "metrics", "totals", "history", "skipped", "rollbacks")


def train(output_dir: Path, *extra: str) -> dict:
    assert launcher.main([*RUN, f"output_dir={output_dir}", *extra]) == 0
    return read_checkpoint(run_layout(output_dir, "old").last)


@dataclass
class Runs:
    straight: dict  # the uncut run (2 epochs), read
    cut: dict  # the run cut after epoch 1, read
    written: dict  # the cut run's file as this version wrote it (torch.load, no upgrade)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    root = tmp_path_factory.mktemp("format")
    straight, cut = train(root / "straight", "epochs=2"), train(root / "cut", "epochs=1")
    return Runs(straight, cut, torch.load(run_layout(root / "cut", "old").last, weights_only=True))


def placed(state: dict, output_dir: Path) -> Path:
    """``state`` saved (plain torch.save, no schema) as run ``old``'s last.pt under ``output_dir``."""
    path = run_layout(output_dir, "old").last
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return path


@pytest.fixture
def format_1(runs) -> dict:
    """The cut run's checkpoint as format 1 wrote it: no "format", none of the later keys."""
    return {key: value for key, value in runs.written.items() if key not in ("format", *LACKED_BY_FORMAT_1)}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_a_format_1_file_reads_as_format_2_with_the_schemas_defaults(runs, format_1, tmp_path):
    assert runs.written["format"] == FORMAT and set(LACKED_BY_FORMAT_1) <= set(runs.written)  # what was dropped was there
    state = read_checkpoint(placed(format_1, tmp_path))
    assert state["format"] == FORMAT == 2
    for key in LACKED_BY_FORMAT_1:
        assert state[key] == SCHEMA[key].default(), key
    assert (state["batch_in_epoch"], state["history"], state["metrics"], state["rollbacks"]) == (0, [], {}, 0)
    for key in ("step", "epoch", "config"):
        assert state[key] == format_1[key], key
    for name, tensor in format_1["model"].items():
        assert torch.equal(state["model"][name], tensor), name


def test_a_format_1_file_evaluates_to_the_numbers_its_run_logged(runs, format_1, tmp_path, monkeypatch):
    path = placed(format_1, tmp_path / "shared")
    monkeypatch.chdir(tmp_path)
    assert launcher.main([f"eval_checkpoint={path}", f"output_dir={tmp_path / 'out'}", "device=cpu"]) == 0
    (written,) = run_layout(tmp_path / "out", "old").eval_dir.glob("epoch_0001_*.json")
    logged = runs.cut["metrics"]
    assert logged["epoch"] == 1
    for key in ("eval/energy_distance", "eval/energy_distance_floor"):
        assert json.loads(written.read_text())[key] == pytest.approx(logged[key], rel=1e-9, abs=1e-12), key


def test_a_config_stored_before_an_option_existed_evaluates_with_its_default(runs, format_1, tmp_path, monkeypatch):
    """A run stored before ``eval.consistency_steps`` and ``eval.guidance_interval`` existed
    evaluates with this machine's defaults for them, to the numbers its run logged."""
    old = copy.deepcopy(format_1)
    for key in ("consistency_steps", "guidance_interval"):
        assert key in old["config"]["eval"]  # the run had them: drop them as an older version never wrote them
        del old["config"]["eval"][key]
    path = placed(old, tmp_path / "shared")
    monkeypatch.chdir(tmp_path)
    assert launcher.main([f"eval_checkpoint={path}", f"output_dir={tmp_path / 'out'}", "device=cpu"]) == 0
    (written,) = run_layout(tmp_path / "out", "old").eval_dir.glob("epoch_0001_*.json")
    result = json.loads(written.read_text())
    assert result["settings"]["eval"]["consistency_steps"] == [] and result["settings"]["eval"]["guidance_interval"] is None
    assert result["eval/energy_distance"] == pytest.approx(runs.cut["metrics"]["eval/energy_distance"], rel=1e-9, abs=1e-12)


def test_a_format_1_file_resumes_to_the_weights_of_the_uncut_run(runs, format_1, tmp_path):
    placed(format_1, tmp_path / "out")
    resumed = train(tmp_path / "out", "epochs=2", "resume=true")
    straight = runs.straight
    assert (resumed["epoch"], resumed["step"]) == (straight["epoch"], straight["step"]) == (2, 16)
    for part in ("model", "ema"):
        assert straight[part].keys() == resumed[part].keys()
        for name, tensor in straight[part].items():
            assert torch.equal(resumed[part][name], tensor), f"{part}.{name} differs from the uncut run"
    assert resumed["metrics"]["eval/energy_distance"] == straight["metrics"]["eval/energy_distance"]
    assert resumed["format"] == FORMAT


def test_a_newer_format_is_refused_in_one_line(runs, tmp_path, capsys):
    path = placed(runs.written | {"format": FORMAT + 1}, tmp_path / "out")
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert f"format {FORMAT + 1}" in message and "newer" in message and "\n" not in message, message
    assert launcher.main([f"eval_checkpoint={path}", f"output_dir={tmp_path / 'eval'}", "device=cpu"]) == 2
    assert f"format {FORMAT + 1}" in one_line_error(capsys)
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("key,value", [("step", "8"), ("epoch", 1.0), ("history", {}), ("metrics", [0.5]),
                                       ("format", "1"), ("model", [])])
def test_a_key_of_the_wrong_type_is_refused_in_one_line_naming_it(runs, tmp_path, key, value):
    path = placed(runs.written | {key: value}, tmp_path / "out")
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert f"{key!r}" in message and type(value).__name__ in message and "\n" not in message, message


def test_a_file_of_weights_alone_evaluates_but_is_not_resumed(runs, tmp_path, capsys, monkeypatch):
    weights_only = {key: value for key, value in runs.written.items() if not SCHEMA[key].resume_only}
    assert "optimizer" not in weights_only and "model" in weights_only
    out = tmp_path / "out"
    path = placed(weights_only, out)
    before = tree_hashes(out)
    with pytest.raises(CheckpointError, match="cannot be resumed"):
        read_checkpoint(path, resume=True)
    assert launcher.main([*RUN, f"output_dir={out}", "epochs=2", "resume=true"]) == 2
    line = one_line_error(capsys)
    assert "optimizer" in line and "cannot be resumed" in line, line
    assert tree_hashes(out) == before

    monkeypatch.chdir(tmp_path)
    assert launcher.main([f"eval_checkpoint={path}", f"output_dir={tmp_path / 'eval'}", "device=cpu"]) == 0
    (written,) = run_layout(tmp_path / "eval", "old").eval_dir.glob("epoch_0001_*.json")
    assert json.loads(written.read_text())["eval/energy_distance"] == pytest.approx(
        runs.cut["metrics"]["eval/energy_distance"], rel=1e-9, abs=1e-12)


def test_a_model_stored_before_time_scale_existed_is_rebuilt_as_it_was_trained():
    """Time embeddings scaled times by 1000 before ``model.time_scale`` existed (now 1, as the
    one-step references): a stored config without the key, in a checkpoint or an export, means
    1000, so its weights give the outputs they were trained to give."""
    from models.unified_input import make_unified_flow_matching_input
    from runs.build import build_model
    from runs.checkpoint import build_stored_model, stored_config, upgrade

    cfg = {"_target_": "models.flow_matching.cnn.SmallCNN", "name": "cnn", "in_channels": 1, "image_size": 8,
           "hidden_channels": 8, "emb_dim": 16, "num_groups": 4}
    trained = build_model({**cfg, "time_scale": 1000.0})
    with torch.no_grad():
        for p in trained.parameters():  # the zero-initialised output layer would make every model agree
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    z = make_unified_flow_matching_input(torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.6]), torch.tensor([0.5, 0.9]))
    old_file = {"format": 2, "config": {"model": cfg}, "model": trained.state_dict(), "ema": {}, "step": 0, "epoch": 0}
    for stored in (upgrade(copy.deepcopy(old_file), "old checkpoint")["config"], stored_config({"model": cfg}, "old export")):
        assert stored["model"]["time_scale"] == 1000.0
        rebuilt = build_stored_model(stored, "old file")
        rebuilt.load_state_dict(trained.state_dict())
        torch.testing.assert_close(rebuilt(z), trained(z), rtol=0, atol=0)
    as_now = build_stored_model({"model": {**cfg, "time_scale": 1.0}}, "new file")
    as_now.load_state_dict(trained.state_dict())
    assert not torch.allclose(as_now(z), trained(z))  # the key matters: read as today's default, the outputs differ
    mlp = {"_target_": "models.flow_matching.mlp.MLP", "name": "mlp"}
    assert "time_scale" not in stored_config({"model": mlp}, "mlp file")["model"]  # its own Fourier band, no such option


def test_the_models_read_with_a_time_scale_are_those_that_have_one():
    import importlib
    import inspect

    from omegaconf import OmegaConf

    from runs.checkpoint import TIME_EMBEDDING_MODELS
    from tests.conftest import CONFIG_DIR

    targets = {OmegaConf.load(path)["_target_"] for path in (CONFIG_DIR / "model").glob("*.yaml")}
    having = set()
    for target in targets:
        module, _, name = target.rpartition(".")
        if "time_scale" in inspect.signature(getattr(importlib.import_module(module), name)).parameters:
            having.add(target)
    assert having == set(TIME_EMBEDDING_MODELS)
