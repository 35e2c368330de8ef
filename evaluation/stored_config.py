"""The config a stored run is used with: what the checkpoint says about the model and its
training, and what this machine and this command line say about where files are.

A checkpoint (or an export folder) embeds the resolved config of its run. It describes a
model and how it was trained; it never decides where this program reads, writes or
downloads, since a file from someone else could point a data loader at a folder of its
choosing. So ``eval_checkpoint``, ``scripts/export.py`` and the visualizers use

    this machine's ``configs/train.yaml``, composed with the run's data set (and model
    and loss, where this machine has those configs) and the command line's overrides,
    overlaid by the stored config (whose data set and VAE must be built by the classes
    this machine's configs name) everywhere except
      - where files are: the data locations, ``download`` and the VAE's weights
        (``LOCATION_KEYS``, at any depth of ``dataloaders``), a FID reference other than
        ``heldout``, and the keys of ``THIS_MACHINE`` (``output_dir``, ``device``, ...);
      - what the command line sets for this evaluation: ``eval.*``, ``solver``, ``seed``
        and ``run_name``, when typed.

The stored run name then goes through the same check as a typed one
(``config_checks.validate_config``), so it cannot name a folder outside ``output_dir``.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from runs.checkpoint import check_stored_model
from runs.errors import CheckpointError, RunError
from runs.layout import LOCATION_KEYS, is_location

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

# Top-level keys that are about this machine and this invocation, never the stored run's.
THIS_MACHINE = ("device", "output_dir", "eval_checkpoint", "init_from", "resume", "overwrite", "num_workers",
                "trackio", "compile", "compile_mode", "precision", "tf32", "cudnn_benchmark")
# What a command line may set when it re-uses a stored run (besides THIS_MACHINE and data locations).
TYPED_FOR_EVALUATION = ("eval", "solver", "seed", "run_name")
# Nodes built into objects: a key the stored run lacks keeps the constructor's default, which is
# what the run had (this machine's yaml may have changed the default since).
BUILT_WITH_DEFAULTS = ("model", "loss")


def compose(overrides: list[str]) -> DictConfig:
    """``configs/train.yaml`` with ``overrides``, through Hydra's compose API (no run
    folder, no change of working directory); not yet resolved."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="denoising_zoo"):
        return hydra_compose(config_name="train", overrides=overrides)


def override_key(override: str) -> str:
    """``eval.steps`` of ``eval.steps=2`` (and of ``+eval.steps=2`` / ``~eval.steps``)."""
    return override.split("=", 1)[0].lstrip("+~")


def check_overrides(overrides: list[str], data_name: str, what: str) -> None:
    """Refuse (one line) an override that would change the stored run rather than how it is used."""
    for override in overrides:
        key = override_key(override)
        top = key.split(".")[0]
        if key == "dataloaders":
            if override.partition("=")[2] != data_name:
                raise RunError(f"{override}: {what} uses its own data set ({data_name}); "
                               "set where its files are with dataloaders.root=... / dataloaders.dataset.path=...")
            continue
        if top in THIS_MACHINE or top in TYPED_FOR_EVALUATION or is_location(key):
            continue
        raise RunError(f"{key}: {what} takes the model, loss, data set and training settings from the checkpoint; "
                       f"the command line sets only {', '.join(TYPED_FOR_EVALUATION)}, data locations (dataloaders.root, "
                       f"dataloaders.dataset.path, dataloaders.vae.pretrained, ...) and {', '.join(THIS_MACHINE[:2])}")


def _config_choice(group: str, node: object) -> str | None:
    """The config file of ``group`` that this machine has for the stored node's ``name``."""
    name = node.get("name") if isinstance(node, dict) else None
    if isinstance(name, str) and name.isidentifier() and (CONFIG_DIR / group / f"{name}.yaml").is_file():
        return name
    return None


def _stored_data(stored: dict, machine: dict, source: str, where: str = "dataloaders") -> dict:
    """The stored data config with every location replaced by this machine's (or dropped);
    where this machine's config builds something (``_target_``), the stored one must name
    the same class or function."""
    merged = {}
    for key, value in stored.items():
        here = f"{where}.{key}"
        if key in LOCATION_KEYS:
            if key in machine:
                merged[key] = machine[key]
        elif key == "_target_" and machine.get("_target_") not in (None, value):
            raise CheckpointError(f"{source}: its {here}={str(value)[:80]!r} is not what this machine's configs build there "
                                  f"({machine['_target_']!r}): it cannot be evaluated here")
        elif isinstance(value, dict):
            merged[key] = _stored_data(value, machine.get(key) if isinstance(machine.get(key), dict) else {}, source, here)
        else:
            merged[key] = value
    for key, value in machine.items():  # this machine's keys the stored run lacks (its locations, new options)
        merged.setdefault(key, value)
    return merged


def _with_new_options(stored: dict, machine: object) -> dict:
    """``stored`` with the keys it lacks taken from this machine's node (options added since the run)."""
    if not isinstance(machine, dict):
        return stored
    merged = {k: _with_new_options(v, machine.get(k)) if isinstance(v, dict) else v for k, v in stored.items()}
    return merged | {k: v for k, v in machine.items() if k not in merged}


def stored_run_config(stored: dict, overrides: list[str], source: str, what: str = "eval_checkpoint") -> DictConfig:
    """The config to use a stored run with (see the module docstring).

    Args:
        stored: the run's resolved config, checked plain data (``runs.checkpoint.stored_config``).
        overrides: the command line's Hydra overrides.
        source: names the file in messages.
        what: names the command in messages.
    """
    check_stored_model(stored, source)  # the model first: a refused target is named as such
    data = stored.get("dataloaders")
    data_name = _config_choice("dataloaders", data)
    if data_name is None:
        have = sorted(p.stem for p in (CONFIG_DIR / "dataloaders").glob("*.yaml"))
        name = data.get("name") if isinstance(data, dict) else None
        raise CheckpointError(f"{source}: its data set {name!r} is not one of this machine's configs/dataloaders "
                              f"({', '.join(have)}): it cannot be evaluated here")
    check_overrides(overrides, data_name, what)
    choices = [f"dataloaders={data_name}"]
    for group in ("model", "loss"):  # so this machine's defaults resolve against the run's shapes
        if (choice := _config_choice(group, stored.get(group))) is not None:
            choices.append(f"{group}={choice}")
    typed = [o for o in overrides if override_key(o) != "dataloaders"]
    composed = compose([*choices, *typed])
    if not any(override_key(o) == "run_name" for o in typed):
        composed.run_name = "stored"  # replaced by the stored name below; resolving needs a value
    OmegaConf.resolve(composed)
    machine = OmegaConf.to_container(composed)
    config = dict(machine)
    for key, value in stored.items():
        if key in THIS_MACHINE:
            continue
        if key == "dataloaders":
            config[key] = _stored_data(value, machine["dataloaders"], source)
        elif key in BUILT_WITH_DEFAULTS or not isinstance(value, dict):
            config[key] = value
        else:  # a node the run stored before an option existed gets this machine's default for it
            config[key] = _with_new_options(value, machine.get(key))
    cfg = OmegaConf.create(config)
    reference = OmegaConf.select(cfg, "eval.fid.reference")
    if reference is not None and reference != "heldout":  # a folder, a statistics file or a download: this machine's
        OmegaConf.update(cfg, "eval.fid.reference", OmegaConf.select(composed, "eval.fid.reference"), merge=False)
    for override in typed:  # what this command line sets for this use of the run
        key = override_key(override)
        if key.split(".")[0] in TYPED_FOR_EVALUATION:
            OmegaConf.update(cfg, key, OmegaConf.select(composed, key), merge=False)
    return cfg


def eval_checkpoint_config(overrides: list[str]) -> DictConfig:
    """The resolved config of ``python launcher.py eval_checkpoint=PATH [overrides]``."""
    from runs.stored import read_stored_config

    paths = [o.partition("=")[2] for o in overrides if override_key(o) == "eval_checkpoint"]
    stored, source, held = read_stored_config(paths[-1])
    cfg = stored_run_config(stored, overrides, source)
    if held is not None and not any(override_key(o) == "eval.weights" for o in overrides):
        cfg.eval.weights = held  # an export folder holds one set of weights: evaluate (and name) those
    return cfg
