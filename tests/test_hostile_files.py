"""Files from someone else: a checkpoint or an export folder describes a model and how it
was trained, never where this program reads, writes or downloads; a data folder cannot
run code; a full disk loses nothing.

Each hostile file here carries a payload that writes ``MARKER`` when it runs;
``test_the_payload_runs_under_plain_pickle`` shows that it does.
"""

import json
import pickle
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import launcher
from dataloaders import cifar10
from evaluation.stored_config import compose, stored_run_config
from runs.build import build_model
from runs.checkpoint import save_checkpoint
from runs.errors import CheckpointError
from runs.export import write_export
from runs.layout import LOCATION_KEYS
from scripts.export import main as export_main
from tests.conftest import LAUNCHER, TINY_OVERRIDES, compose_train, launch, launcher_env, run_layout, tree_hashes
from tests.test_checkpoint_safety import WritesMarker, tiny_state
from tests.test_image_data import write_cifar


@pytest.fixture
def run(capsys, monkeypatch):
    """``python launcher.py ARGV`` (or ``python scripts/export.py ARGV`` with ``export=True``)
    in this process, from folder ``cwd``: the same code a user's command runs, without
    a new interpreter for each of the many refusals below."""

    def call(argv: list[str], cwd: Path, export: bool = False) -> subprocess.CompletedProcess[str]:
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        code = export_main([str(a) for a in argv]) if export else launcher.main([*argv, "trackio.enabled=false"])
        out = capsys.readouterr()
        return subprocess.CompletedProcess(argv, code, out.out, out.err)

    return call


def malicious_cifar(root: Path, marker: Path) -> Path:
    """A CIFAR-10 folder whose every batch runs code when unpickled."""
    folder = root / cifar10.BATCH_FOLDER
    folder.mkdir(parents=True)
    for name in (*cifar10.TRAIN_FILES, *cifar10.TEST_FILES):
        (folder / name).write_bytes(pickle.dumps(WritesMarker(marker), protocol=2))
    return root


def cnn_cifar_state(attacker_root: Path) -> dict:
    """A SmallCNN checkpoint of a CIFAR-10 run whose stored config reads (and downloads)
    its data at ``attacker_root``; its evaluation settings are tiny."""
    cfg = compose_train(["dataloaders=cifar10", "model=cnn", "device=cpu", "trackio.enabled=false"])
    OmegaConf.resolve(cfg)
    config = OmegaConf.to_container(cfg)
    config["dataloaders"]["root"] = config["dataloaders"]["dataset"]["root"] = str(attacker_root)
    config["dataloaders"]["download"] = config["dataloaders"]["dataset"]["download"] = True
    config["eval"] |= {"num_samples": 8, "repeats": 1, "steps": 2, "batch_size": 8, "plot": False}
    config["run_name"] = "shared"
    model = build_model(cfg.model)
    return {"model": model.state_dict(), "ema": model.state_dict(), "step": 5, "epoch": 1, "config": config}


def test_the_payload_runs_under_plain_pickle(tmp_path):
    """Control: the batches below are live; a plain ``pickle.load`` runs them."""
    root = malicious_cifar(tmp_path / "evil", tmp_path / "MARKER")
    with (root / cifar10.BATCH_FOLDER / "test_batch").open("rb") as f:
        pickle.load(f, encoding="bytes")
    assert (tmp_path / "MARKER").read_text() == "ran"


def test_a_malicious_batch_is_refused_in_one_line(tmp_path):
    root = malicious_cifar(tmp_path / "evil", tmp_path / "MARKER")
    with pytest.raises(ValueError, match=r"refused: it asks for the Python object (__builtin__|builtins)\.exec") as info:
        cifar10.make_dataset(str(root), split="test")
    assert "\n" not in str(info.value) and not (tmp_path / "MARKER").exists()


@pytest.mark.parametrize("protocol", [2, 4, pickle.HIGHEST_PROTOCOL])
def test_genuine_batches_load_in_every_protocol(tmp_path, protocol):
    """The official files are protocol-2 pickles of numpy arrays; a re-pickled copy may use any protocol."""
    folder = tmp_path / cifar10.BATCH_FOLDER
    folder.mkdir()
    data = np.arange(2 * 3072, dtype=np.int64).reshape(2, 3072).astype(np.uint8)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": data, b"labels": [3, 9], b"filenames": [b"a", b"b"]},
                                                     protocol=protocol))
    test = cifar10.make_dataset(str(tmp_path), split="test", flip=False)
    assert torch.equal(test.data.reshape(2, 3072), torch.from_numpy(data)) and test.labels.tolist() == [3, 9]


def test_a_truncated_batch_is_one_line(tmp_path):
    write_cifar(tmp_path)
    batch = tmp_path / cifar10.BATCH_FOLDER / "test_batch"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable CIFAR-10 batch") as info:
        cifar10.make_dataset(str(tmp_path), split="test")
    assert "\n" not in str(info.value)


def test_every_location_key_of_the_data_configs_is_taken_from_this_machine():
    """A new data config whose path key is not in LOCATION_KEYS would let a checkpoint choose it."""
    unlisted = []
    for config in sorted((Path(LAUNCHER).parent / "configs" / "dataloaders").glob("*.yaml")):
        overrides = [f"dataloaders={config.stem}", "run_name=x", "dataloaders.dataset.path=p.npy"] if config.stem == "points" \
            else [f"dataloaders={config.stem}", "run_name=x"]
        node = OmegaConf.to_container(compose(overrides).dataloaders, resolve=True)
        stack = [("dataloaders", node)]
        while stack:
            where, item = stack.pop()
            for key, value in item.items():
                if isinstance(value, dict):
                    stack.append((f"{where}.{key}", value))
                elif key not in LOCATION_KEYS and (key.endswith(("dir", "root", "path", "file")) or
                                                   (isinstance(value, str) and "/" in value)):
                    unlisted.append(f"{where}.{key}")
    assert not unlisted, unlisted


# ---------------------------------------------------------------------------------
# A shared checkpoint that points its data at a malicious folder
# ---------------------------------------------------------------------------------


@pytest.fixture
def shared(tmp_path):
    """``tmp_path/evil``: an attacker's CIFAR-10 folder; ``tmp_path/shared.pt``: a checkpoint
    whose config reads it (with download on); ``tmp_path/user``: where the user works."""
    evil = malicious_cifar(tmp_path / "evil", tmp_path / "MARKER")
    path = tmp_path / "shared.pt"
    save_checkpoint(cnn_cifar_state(evil), path)
    (tmp_path / "user").mkdir()
    return path


def test_the_checkpoint_cannot_choose_the_data_folder(tmp_path, shared, run):
    before = tree_hashes(tmp_path / "evil")
    result = run([f"eval_checkpoint={shared}", f"output_dir={tmp_path / 'out'}", "device=cpu"], tmp_path / "user")
    lines = result.stderr.strip().splitlines()
    # This machine's configs/dataloaders/cifar10.yaml reads ./data and does not download.
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "CIFAR-10 not found: expected data/cifar-10-batches-py" in lines[0], lines[0]
    assert not (tmp_path / "MARKER").exists() and not (tmp_path / "out").exists() and not (tmp_path / "user" / "data").exists()
    assert tree_hashes(tmp_path / "evil") == before  # no download into it


def test_a_data_folder_the_user_names_still_cannot_run_code(tmp_path, shared, run):
    result = run([f"eval_checkpoint={shared}", f"output_dir={tmp_path / 'out'}", "device=cpu",
                     f"dataloaders.root={tmp_path / 'evil'}"], tmp_path / "user")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "exec, and a CIFAR-10 batch holds only" in lines[0], result.stderr
    assert not (tmp_path / "MARKER").exists() and not (tmp_path / "out").exists()


def test_the_checkpoint_is_evaluated_on_this_machines_data(tmp_path, shared, run):
    write_cifar(tmp_path / "user" / "data", per_batch=10)
    result = run([f"eval_checkpoint={shared}", f"output_dir={tmp_path / 'out'}", "device=cpu"], tmp_path / "user")
    assert result.returncode == 0, result.stderr
    (written,) = run_layout(tmp_path / "out", "shared", arch="cnn").eval_dir.glob("*.json")
    assert json.loads(written.read_text())["eval/nfe"] == 2.0  # the stored evaluation settings
    assert not (tmp_path / "MARKER").exists()


def test_a_malicious_export_folder_is_refused_the_same_way(tmp_path, run):
    """An export whose config.yaml and checksum were both written by the attacker."""
    evil = malicious_cifar(tmp_path / "evil", tmp_path / "MARKER")
    write_export(cnn_cifar_state(evil), tmp_path / "export")
    (tmp_path / "user").mkdir()
    result = run([f"eval_checkpoint={tmp_path / 'export'}", f"output_dir={tmp_path / 'out'}", "device=cpu"], tmp_path / "user")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "CIFAR-10 not found" in lines[0], result.stderr
    assert not (tmp_path / "MARKER").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("run_name", ["../../../escaped", "/tmp/escaped-absolute", "a/b", ".."])
def test_a_stored_run_name_cannot_name_a_folder(tmp_path, run_name, run):
    state = tiny_state()
    state["config"]["run_name"] = run_name
    save_checkpoint(state, tmp_path / "shared.pt")
    out = tmp_path / "deep" / "er" / "out"
    result = run([f"eval_checkpoint={tmp_path / 'shared.pt'}", f"output_dir={out}", "device=cpu"], tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "run_name=" in lines[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.pt"]
    assert not Path("/tmp/escaped-absolute").exists()


def test_a_stored_data_set_this_machine_does_not_build_so_is_refused(tmp_path, run):
    state = tiny_state()
    state["config"]["dataloaders"]["dataset"]["_target_"] = "dataloaders.cifar10.make_dataset"  # kmeans by name
    save_checkpoint(state, tmp_path / "a.pt")
    result = run([f"eval_checkpoint={tmp_path / 'a.pt'}", f"output_dir={tmp_path / 'out'}"], tmp_path)
    assert result.returncode == 2 and "dataloaders.dataset._target_='dataloaders.cifar10.make_dataset'" in result.stderr
    state["config"]["dataloaders"]["name"] = "mine"
    save_checkpoint(state, tmp_path / "b.pt")
    result = run([f"eval_checkpoint={tmp_path / 'b.pt'}", f"output_dir={tmp_path / 'out'}"], tmp_path)
    assert result.returncode == 2 and "'mine' is not one of this machine's configs/dataloaders" in result.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------
# eval_checkpoint takes this command line's evaluation settings
# ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    path = run_layout(tmp_path_factory.mktemp("small"), "test").last
    state = tiny_state()
    state["config"]["eval"] |= {"num_samples": 100, "repeats": 2, "steps": 10, "plot": False}
    save_checkpoint(state, path)
    return path


def evaluate(run, path: Path, out: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    before = set(out.rglob("*.json")) if out.exists() else set()
    result = run([f"eval_checkpoint={path}", f"output_dir={out}", "device=cpu", *overrides], path.parent)
    new = sorted(set(out.rglob("*.json")) - before) if out.exists() else []
    return result, json.loads(new[0].read_text()) if len(new) == 1 else None


def test_eval_checkpoint_applies_typed_settings_and_names_the_result_by_them(small_checkpoint, tmp_path, run):
    out = tmp_path / "out"
    stored, stored_json = evaluate(run, small_checkpoint, out)
    assert stored.returncode == 0 and stored_json["eval/nfe"] == 10.0 and stored_json["settings"]["seed"] == 0
    two, two_json = evaluate(run, small_checkpoint, out, "eval.steps=2")
    assert two.returncode == 0 and two_json["eval/nfe"] == 2.0, two.stderr
    heun, heun_json = evaluate(run, small_checkpoint, out, "solver=heun", "eval.steps=3")
    assert heun.returncode == 0 and heun_json["eval/nfe"] == 6.0 and heun_json["settings"]["solver"]["name"] == "heun"
    seeded, seeded_json = evaluate(run, small_checkpoint, out, "seed=7")
    assert seeded.returncode == 0 and seeded_json["settings"]["seed"] == 7
    assert seeded_json["eval/energy_distance"] != stored_json["eval/energy_distance"]  # other noise, other samples
    assert len(list(out.rglob("*.json"))) == 4  # one file per setting, side by side
    _, again_json = evaluate(run, small_checkpoint, out)
    assert again_json is None and len(list(out.rglob("*.json"))) == 4  # same settings: the same file


@pytest.mark.parametrize("override,needle", [
    ("model.hidden=3", "model.hidden: eval_checkpoint takes the model"),
    ("loss=meanflow", "loss: eval_checkpoint takes the model"),
    ("dataloaders=digits", "uses its own data set (kmeans)"),
    ("eval.steps=abc", "eval.steps"),
    ("eval.steps=0", "eval.steps"),
])
def test_eval_checkpoint_refuses_what_would_change_the_run(small_checkpoint, tmp_path, override, needle, run):
    result, _ = evaluate(run, small_checkpoint, tmp_path / "out", override)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and needle in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_eval_into_an_unwritable_folder_stops_before_sampling(small_checkpoint, tmp_path, run):
    (tmp_path / "a-file").write_text("")
    result, _ = evaluate(run, small_checkpoint, tmp_path / "a-file" / "out")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "cannot write" in lines[0], result.stderr
    assert "energy_distance" not in result.stdout


# ---------------------------------------------------------------------------------
# A full disk during a save
# ---------------------------------------------------------------------------------


def limit_file_size(limit: int):
    def apply() -> None:  # in the child, before exec: writes past `limit` bytes fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_save_that_cannot_be_written_keeps_last_pt_and_leaves_no_temporary_file(tmp_path):
    out = tmp_path / "out"
    args = [*TINY_OVERRIDES, "model.hidden=256", "eval.plot=false", "run_name=full", f"output_dir={out}"]
    first = launch([*args, "epochs=1"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    last = run_layout(out, "full").last
    before = last.read_bytes()
    # The resumed run's save is larger than the limit: as a full disk, the write fails.
    result = subprocess.run([sys.executable, str(LAUNCHER), *args, "epochs=2", "resume=true"], cwd=tmp_path,
                            env=launcher_env(tmp_path / "trackio"), capture_output=True, text=True, timeout=300, check=False,
                            preexec_fn=limit_file_size(len(before) // 2))
    lines = result.stderr.replace("\r", "\n").strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert lines[-1].startswith("error: cannot write") and "the previous last.pt is intact" in lines[-1], lines[-1]
    assert last.read_bytes() == before
    assert sorted(p.name for p in last.parent.iterdir() if p.name != ".lock") == [last.name]


# ---------------------------------------------------------------------------------
# scripts/export.py refuses what evaluation refuses
# ---------------------------------------------------------------------------------


HOSTILE_KINDS = ["traversal_run_name", "absolute_run_name", "data_built_by_another_loader", "unknown_data_set",
                 "interpolation", "bad_eval_setting", "refused_model"]


def hostile_configs(tmp_path: Path) -> dict[str, dict]:
    """Stored configs that evaluation refuses, each changed in one place from a good one."""
    changes = {
        "traversal_run_name": ("run_name", "../../../escaped"),
        "absolute_run_name": ("run_name", "/tmp/escaped-absolute"),
        "data_built_by_another_loader": ("dataloaders.dataset._target_", "dataloaders.cifar10.make_dataset"),
        "unknown_data_set": ("dataloaders.name", "someone_elses"),
        "interpolation": ("dataloaders.dataset.seed", "${oc.env:HOME}"),
        "bad_eval_setting": ("eval.steps", -1),
        "refused_model": ("model._target_", "os.system"),
    }
    configs = {}
    for kind, (key, value) in changes.items():
        config = tiny_state()["config"]
        node = config
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
        configs[kind] = config
    return configs


@pytest.mark.parametrize("kind", HOSTILE_KINDS)
def test_export_refuses_what_evaluation_refuses(tmp_path, kind, run):
    state = tiny_state()
    state["config"] = hostile_configs(tmp_path)[kind]
    save_checkpoint(state, tmp_path / "shared.pt")
    evaluated = run([f"eval_checkpoint={tmp_path / 'shared.pt'}", f"output_dir={tmp_path / 'out'}", "device=cpu"], tmp_path)
    exported = run([tmp_path / "shared.pt", "--output-dir", tmp_path / "out"], tmp_path, export=True)
    for result in (evaluated, exported):
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (kind, result.stderr)
    assert not (tmp_path / "out").exists() and not (tmp_path / "MARKER").exists()
    assert not Path("/tmp/escaped-absolute").exists()


def test_export_of_a_good_run_still_works_and_leaves_data_locations_to_the_evaluator(tmp_path, run):
    """A points run's file is the evaluating machine's to name: exported without it, then
    evaluated with the path on the command line."""
    points = tmp_path / "pts.npy"
    np.save(points, np.random.default_rng(0).normal(size=(600, 2)).astype(np.float32))
    out = tmp_path / "out"
    tiny = [o for o in TINY_OVERRIDES if not o.startswith("dataloaders.")]
    trained = run(["run_name=pts", "dataloaders=points", f"dataloaders.dataset.path={points}", *tiny,
                   "epochs=1", f"output_dir={out}", "eval.plot=false"], tmp_path)
    assert trained.returncode == 0, trained.stderr
    exported = run(["pts", "--output-dir", out], tmp_path, export=True)
    assert exported.returncode == 0, exported.stderr
    folder = run_layout(out, "pts").export_dir()
    without = run([f"eval_checkpoint={folder}", f"output_dir={out}", "device=cpu"], tmp_path)
    assert without.returncode == 2 and "dataloaders.dataset.path is required" in without.stderr, without.stderr
    evaluated = run([f"eval_checkpoint={folder}", f"output_dir={out}", "device=cpu", f"dataloaders.dataset.path={points}"],
                    tmp_path)
    assert evaluated.returncode == 0 and "eval/energy_distance" in evaluated.stdout, evaluated.stderr


@pytest.mark.parametrize("key,value", [("solver", "x"), ("solver", None), ("loss", [1, 2]), ("dataloaders.data_shape", 7),
                                       ("eval.meanflow_steps", 7), ("ema.decays", True), ("eval.fid", 1e300)])
def test_a_stored_node_of_the_wrong_kind_is_one_line(tmp_path, run, key, value):
    state = tiny_state()
    node = state["config"]
    *parents, last = key.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    save_checkpoint(state, tmp_path / "odd.pt")
    result = run([f"eval_checkpoint={tmp_path / 'odd.pt'}", f"output_dir={tmp_path / 'out'}", "device=cpu"], tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and key in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_the_vae_weights_are_this_machines_and_the_rest_of_the_vae_the_runs():
    """A stored VAE cannot name a hub repository or folder to load from; its latent scale
    (part of what the model learned) stays the run's."""
    state = tiny_state()
    cfg = compose(["dataloaders=imagenet", "run_name=x"])
    OmegaConf.resolve(cfg)
    state["config"]["dataloaders"] = OmegaConf.to_container(cfg.dataloaders)
    vae = state["config"]["dataloaders"]["vae"]
    vae |= {"pretrained": "someone/evil-vae", "subfolder": "x", "local_files_only": False, "scaling_factor": 0.5}
    used = stored_run_config(state["config"], ["eval_checkpoint=x.pt"], "checkpoint 'x.pt'")
    assert used.dataloaders.vae.pretrained == cfg.dataloaders.vae.pretrained != "someone/evil-vae"
    assert used.dataloaders.vae.subfolder is None and used.dataloaders.vae.local_files_only is None
    assert used.dataloaders.vae.scaling_factor == 0.5
    vae["_target_"] = "models.dit.dit.DiT"
    with pytest.raises(CheckpointError, match=r"dataloaders.vae._target_='models.dit.dit.DiT' is not what"):
        stored_run_config(state["config"], ["eval_checkpoint=x.pt"], "checkpoint 'x.pt'")
