"""Checkpoints: one ``torch.save`` dict, written atomically, read with ``weights_only=True``.

Keys (DESIGN.md): ``model`` and ``ema`` state dicts (un-compiled, un-wrapped),
``optimizer``, ``scheduler``, ``scaler``, ``step``, ``epoch``, ``rng`` and ``config``
(the resolved config as a plain dict), plus ``metrics`` (the last evaluation's
numbers). The model is rebuilt from ``config["model"]`` alone.

An export folder (``scripts/export.py``) holds one set of weights as
``model.safetensors`` (a format that cannot carry code) with ``epoch``, ``step`` and a
checksum of the tensors in its metadata, and the resolved config as ``config.yaml``.
``load_model_from_checkpoint`` takes either.

Files from elsewhere are untrusted, so reading one never runs code and never
instantiates anything but the project's own classes:

- the zip archive's CRC-32 of every member is checked before unpickling (``torch.load``
  does not check them: a flipped byte in a tensor would load as different weights);
- unpickling is ``weights_only=True`` (tensors and plain containers only);
- the embedded config must be plain data (numbers, strings, booleans, null, lists and
  mappings of them; no interpolations, since it was stored resolved);
- the model is built by ``instantiate_allowed``: its ``_target_`` must be a
  ``BaseModel`` subclass defined in a module of this repository under ``models.``,
  called with plain keyword arguments (no nested ``_target_``), so a config cannot
  reach e.g. ``torch.load(..., weights_only=False)``, ``os.system`` or the VAE's hub
  download.
"""

import hashlib
import importlib
import importlib.util
import inspect
import io
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from models.base_model import BaseModel
from models.runs import RunError

REQUIRED_KEYS = ("model", "ema", "step", "epoch", "config")
ROOT = Path(__file__).resolve().parents[1]  # the repository: the only place allowed classes live
MODEL_PREFIXES = ("models.",)
# Hydra's instantiation keys: any of them inside the arguments would build another object.
HYDRA_KEYS = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")
PLAIN = "plain values (numbers, strings, booleans, null, lists and mappings of them)"
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.yaml"
EXPORT_KINDS = ("ema", "raw")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class CheckpointError(ValueError, RunError):
    """A checkpoint path that cannot be used; the message is one line for the user (exit status 2)."""


# ---------------------------------------------------------------------------------
# Building objects from untrusted configs
# ---------------------------------------------------------------------------------


def plain_data(value, what: str, where: str, builders: bool = False, interpolations: bool = True):
    """``value`` as plain Python data, or a one-line ``CheckpointError`` naming ``where``.

    OmegaConf nodes are converted (interpolations resolved). ``builders=False`` refuses
    Hydra's keys (``_target_`` ...) at any depth; ``interpolations=False`` refuses
    strings holding ``${`` (a stored config is resolved, so one there is not ours).
    """
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        if not interpolations and "${" in value:
            raise CheckpointError(
                f"{what} config value {where}={value[:60]!r} is an interpolation: a stored config is resolved, "
                "so it must hold plain values only"
            )
        return value
    if isinstance(value, list | tuple):
        return [plain_data(v, what, f"{where}[{i}]", builders, interpolations) for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise CheckpointError(f"{what} config {where} has a key of type {type(key).__name__}: keys must be strings")
            if not builders and key in HYDRA_KEYS:
                raise CheckpointError(
                    f"{what} config key {where}.{key} is refused: arguments must be {PLAIN}, not nodes that build objects"
                )
            out[key] = plain_data(item, what, f"{where}.{key}", builders, interpolations)
        return out
    raise CheckpointError(f"{what} config value {where} is a {type(value).__name__}: a config holds {PLAIN} only")


def allowed_target(
    target: object, allowed_prefixes: tuple[str, ...], what: str, base: type | None = None, functions: bool = False
):
    """The class that ``target`` (a dotted path) names, if it is defined in a module of
    this repository under one of ``allowed_prefixes`` (and subclasses ``base``); with
    ``functions=True`` (and no ``base``) a function defined there too (a factory such as
    ``dataloaders.points.make_dataset``).

    The module is located as a file of the repository before anything is imported, so
    neither another package of the same name on ``sys.path`` nor an attribute chain
    through an import (``models.checkpoint.torch.load``) is reachable.
    """
    kind = f"a {base.__name__} subclass" if base is not None else "a class or function" if functions else "a class"
    refused = CheckpointError(
        f"{what} config _target_={str(target)[:80]!r} is refused: a {what} must be {kind} defined in this "
        f"project under {' or '.join(allowed_prefixes)} (as the configs/{what}/*.yaml files name them)"
    )
    if not isinstance(target, str) or not target.startswith(allowed_prefixes):
        raise refused
    parts = target.split(".")
    if len(parts) < 2 or not all(part.isidentifier() for part in parts):
        raise refused
    module_name, name = ".".join(parts[:-1]), parts[-1]
    source = ROOT.joinpath(*parts[:-1]).with_suffix(".py")
    if not source.is_file():
        raise refused
    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None or Path(spec.origin).resolve() != source.resolve():
        raise refused
    obj = vars(importlib.import_module(module_name)).get(name)
    # Defined there under that name (not imported into it), and a class (or, when
    # asked for, a plain function), never a method, builtin or module.
    callable_kind = inspect.isclass(obj) or (functions and base is None and inspect.isfunction(obj))
    if not (callable_kind and obj.__module__ == module_name and obj.__qualname__ == name):
        raise refused
    if inspect.isclass(obj) and (inspect.isabstract(obj) or (base is not None and not issubclass(obj, base))):
        raise refused
    return obj


def instantiate_allowed(
    node: DictConfig | dict,
    allowed_prefixes: tuple[str, ...],
    what: str,
    base: type | None = None,
    functions: bool = False,
    extra: dict | None = None,
) -> object:
    """Build ``node`` (``_target_`` plus keyword arguments) if its target is one of the
    project's own classes (``allowed_target``; factory functions too with
    ``functions=True``) and every argument is plain data.

    Replaces ``hydra.utils.instantiate`` for configs that may come from a file: nothing
    is imported or called before both checks pass, and the target is called directly,
    so a constructor's one-line ``ValueError`` reaches the user as itself. ``extra``
    holds arguments the caller adds (``split="train"``), not read from the config and
    not checked. Keys that are not arguments (a config group's ``name``) must be dropped
    by the caller.
    """
    call, kwargs = allowed_call(node, allowed_prefixes, what, base, functions, extra)
    return call(**kwargs)


def allowed_call(
    node: DictConfig | dict,
    allowed_prefixes: tuple[str, ...],
    what: str,
    base: type | None = None,
    functions: bool = False,
    extra: dict | None = None,
):
    """Every check of ``instantiate_allowed`` without the call: ``(the class or function,
    its keyword arguments)``."""
    kwargs = plain_data(node, what, what, builders=True)
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{what} config is a {type(kwargs).__name__}: expected a mapping with _target_ and arguments")
    if "_target_" not in kwargs:
        raise CheckpointError(f"{what} config has no _target_: expected e.g. the _target_ of a configs/{what}/*.yaml file")
    target = kwargs.pop("_target_")
    plain_data(kwargs, what, what)  # no other builder key (_partial_, a nested _target_ ...) at any depth
    call = allowed_target(target, allowed_prefixes, what, base, functions)
    kwargs |= extra or {}
    try:
        inspect.signature(call).bind(**kwargs)
    except TypeError as err:  # a missing or unknown argument: one line, not a traceback
        raise CheckpointError(f"{what} config does not fit {target}: {err}") from None
    return call, kwargs


def build_model(model_cfg: DictConfig | dict) -> BaseModel:
    """Instantiate a model from its config group node through the allowlist: a
    ``BaseModel`` subclass under ``models.`` (the ``name`` key names the architecture
    for checkpoint paths and is not a constructor argument)."""
    kwargs = {k: v for k, v in model_cfg.items() if k != "name"}
    return instantiate_allowed(kwargs, MODEL_PREFIXES, "model", base=BaseModel)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile's ``OptimizedModule`` and DDP."""
    while isinstance(model, (torch._dynamo.eval_frame.OptimizedModule, nn.parallel.DistributedDataParallel)):
        model = model._orig_mod if isinstance(model, torch._dynamo.eval_frame.OptimizedModule) else model.module
    return model


# ---------------------------------------------------------------------------------
# Training checkpoints (.pt)
# ---------------------------------------------------------------------------------


def save_checkpoint(state: dict, path: Path) -> None:
    """Write ``state`` to ``path`` atomically: serialise in memory, write a temporary
    file beside it, flush it to disk, then rename over the old file. A crash at any
    point leaves either the old or the new checkpoint, never a half-written one."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointWriteError(f"cannot create {path.parent} ({err.strerror or err}): choose a writable output_dir") from None
    buffer = io.BytesIO()
    torch.save(state, buffer)
    _write_atomic(path, buffer.getbuffer())


class CheckpointWriteError(RunError):
    """A file that could not be written (disk full, unwritable folder); what was there is intact."""

    exit_code = 1


def _write_atomic(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` beside ``path`` and rename it into place. When the write fails (disk
    full, a quota, an unwritable folder) the temporary file is removed, so it neither
    fills the disk nor lingers, and ``path`` keeps its old content: one line, exit 1."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        raise CheckpointWriteError(f"cannot write {path} ({err.strerror or err}); {kept}: free space or choose a "
                                   "writable output_dir") from None


def write_text_atomic(path: Path, text: str) -> None:
    """``path.write_text(text)``, atomically and with a one-line error (a result file, a config)."""
    _write_atomic(path, text.encode())


def _first_line(err: BaseException, limit: int = 200) -> str:
    lines = [line.strip() for line in ANSI.sub("", str(err)).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:limit]


def _refusal_reason(err: pickle.UnpicklingError) -> str:
    """The one fact in torch's weights_only refusal (a ~1000-character text with colour
    codes and advice to load unsafely): which object the file asked for."""
    text = ANSI.sub("", str(err))
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it asks for the Python object {found.group(1)}, and a checkpoint may hold only tensors and plain values"
    boilerplate = ("Weights only load failed", "(1)", "(2)", "Check the documentation")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(boilerplate)]
    return (lines[0].removeprefix("WeightsUnpickler error: ") if lines else _first_line(err))[:200]


def verify_archive(path: Path) -> None:
    """Check the CRC-32 of every member of the zip archive that ``torch.save`` wrote
    (``torch.load`` reads the members without checking them). Reads the file once."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile as err:  # the end record is there but the directory is not
        raise CheckpointError(f"checkpoint {str(path)!r} is not a readable torch checkpoint (truncated or corrupt?): {_first_line(err)}") from None
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt: member {bad!r} fails its CRC-32 check (changed bytes); "
            "use an intact copy, e.g. an archived epoch"
        )


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load and check a checkpoint; every failure is a one-line ``CheckpointError``."""
    path = Path(path).expanduser()
    if path.is_dir():
        hint = (
            "an export folder holds weights only: pass it to eval_checkpoint, or give the run's last.pt"
            if (path / EXPORT_WEIGHTS).is_file()
            else "expected a .pt file such as outputs/ckpts/mlp/RUN/last.pt"
        )
        raise CheckpointError(f"checkpoint {str(path)!r} is a directory, not a checkpoint file: {hint}")
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist: expected a .pt file written by training")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a regular file: expected a .pt file such as outputs/ckpts/mlp/RUN/last.pt")
    if not zipfile.is_zipfile(path):
        # torch.save writes a zip archive; anything else (a text file, a raw pickle, a
        # truncated copy that lost its central directory) is refused before unpickling,
        # where the safe unpickler could fail with arbitrary exception types.
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a readable torch checkpoint (truncated or corrupt?): "
            "expected the zip archive that torch.save writes"
        )
    verify_archive(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"checkpoint {str(path)!r} was refused by the safe loader (weights_only=True): {_refusal_reason(err)}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a readable torch checkpoint (truncated or corrupt?): {_first_line(err)}") from None
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        have = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} lacks the keys {list(REQUIRED_KEYS)} (has {have}): not a training checkpoint")
    return state


def stored_config(config: object, source: str) -> dict:
    """A config read from a file, checked to be plain resolved data with a model node."""
    config = plain_data(config, source, "config", builders=True, interpolations=False)
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{source}: its config has no model section: expected the resolved config that training stores")
    return config


def check_stored_model(config: dict, source: str) -> None:
    """``build_stored_model``'s refusals, without building the model."""
    try:
        allowed_call({k: v for k, v in config["model"].items() if k != "name"}, MODEL_PREFIXES, "model", base=BaseModel)
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err}") from None
    if not isinstance(config["model"].get("name"), str):
        raise CheckpointError(f"{source}: its model config has no name (the architecture that names checkpoint folders)")


def build_stored_model(config: dict, source: str) -> BaseModel:
    """``build_model`` for a config read from ``source``: every refusal, and a
    constructor's own ValueError, names the file it came from."""
    try:
        return build_model(config["model"])
    except ValueError as err:  # CheckpointError included
        raise CheckpointError(f"{source}: {err}") from None


def load_weights(model: nn.Module, weights: object, source: str) -> None:
    """``model.load_state_dict(weights)`` (strict), after a one-line check of names and shapes."""
    if not isinstance(weights, dict) or not all(isinstance(v, Tensor) for v in weights.values()):
        raise CheckpointError(f"{source}: its weights are not a mapping of names to tensors")
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: its weights do not fit the {type(model).__name__} its config builds: "
            f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}"
        )
    for name, tensor in expected.items():
        if weights[name].shape != tensor.shape:
            raise CheckpointError(
                f"{source}: weight {name} has shape {tuple(weights[name].shape)} but the {type(model).__name__} "
                f"its config builds expects {tuple(tensor.shape)}"
            )
    model.load_state_dict(weights)


def load_model_from_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True
) -> tuple[nn.Module, DictConfig, dict]:
    """Rebuild the model from the embedded config and load its (EMA) weights strictly.

    ``path`` is a training checkpoint (``.pt``) or an export folder (``scripts/export.py``;
    it holds one set of weights, whichever was exported, and ``use_ema`` is not asked).
    Returns ``(model in eval mode, the resolved config, the raw checkpoint dict)``; for
    an export folder the third element is its metadata (``epoch``, ``step``, ``weights``).
    """
    path = Path(path).expanduser()
    if path.is_dir() and (path / EXPORT_WEIGHTS).is_file():
        return load_model_from_export(path, device)
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {str(path)!r} is a directory without {EXPORT_WEIGHTS}: expected a .pt file such as "
            f"outputs/ckpts/mlp/RUN/last.pt, or an export folder written by scripts/export.py"
        )
    state = read_checkpoint(path)
    source = f"checkpoint {str(path)!r}"
    config = stored_config(state["config"], source)
    model = build_stored_model(config, source)
    load_weights(model, state["ema" if use_ema else "model"], source)
    return model.to(device).eval(), OmegaConf.create(config), state


# ---------------------------------------------------------------------------------
# Export folders (model.safetensors + config.yaml)
# ---------------------------------------------------------------------------------


def weights_digest(weights: dict[str, Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def write_export(state: dict, folder: Path, weights: str = "ema", source: str = "") -> None:
    """Write ``folder/model.safetensors`` (the ``weights`` set of ``state``: ``ema`` or
    ``raw``) and ``folder/config.yaml`` (the resolved config). Each file is written
    beside its place and moved in; the caller decides whether replacing is allowed."""
    if weights not in EXPORT_KINDS:
        raise ValueError(f"weights={weights!r}: expected one of {list(EXPORT_KINDS)}")
    config = stored_config(state["config"], source or "checkpoint")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state["ema" if weights == "ema" else "model"].items()}
    run_name = str(config.get("run_name", ""))
    header = f"# resolved config of run {run_name!r} at epoch {int(state['epoch'])}, step {int(state['step'])} (scripts/export.py)\n"
    config_bytes = (header + OmegaConf.to_yaml(OmegaConf.create(config))).encode()
    metadata = {
        "format": "pt",
        "epoch": str(int(state["epoch"])),
        "step": str(int(state["step"])),
        "weights": weights,
        "run_name": run_name,
        "source": source,
        "weights_sha256": weights_digest(tensors),
        "config_sha256": hashlib.sha256(config_bytes).hexdigest(),  # config.yaml is covered too: it rebuilds the model
    }
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointWriteError(f"cannot create {folder} ({err.strerror or err}): choose a writable --out") from None
    _write_atomic(folder / EXPORT_WEIGHTS, safetensors_bytes(tensors, metadata=metadata))
    _write_atomic(folder / EXPORT_CONFIG, config_bytes)


def read_export(folder: str | Path) -> tuple[dict, dict[str, Tensor], dict]:
    """Read an export folder: ``(config, tensors, info)`` after checking both checksums
    (the tensors' and ``config.yaml``'s, in the weights file's metadata) and that the
    config is plain data. ``info``: ``epoch``, ``step``, ``weights``, ``run_name``,
    ``source``, ``weights_sha256``."""
    folder = Path(folder).expanduser()
    source = f"export folder {str(folder)!r}"
    weights_path, config_path = folder / EXPORT_WEIGHTS, folder / EXPORT_CONFIG
    for needed in (weights_path, config_path):
        if not needed.is_file():
            raise CheckpointError(f"{source} has no {needed.name}: write one with python scripts/export.py RUN")
    try:
        with safe_open(weights_path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            names = list(f.keys())  # safe_open is not iterable
            tensors = {name: f.get_tensor(name) for name in names}
    except SafetensorError as err:
        raise CheckpointError(f"{source}: {EXPORT_WEIGHTS} is not a readable safetensors file (truncated or corrupt?): {_first_line(err)}") from None
    for key in ("epoch", "step"):
        if not metadata.get(key, "").isdigit():
            raise CheckpointError(f"{source}: {EXPORT_WEIGHTS} lacks the {key!r} metadata that scripts/export.py writes")
    if metadata.get("weights_sha256") != weights_digest(tensors):
        raise CheckpointError(
            f"{source}: {EXPORT_WEIGHTS} does not match the checksum in its metadata (changed bytes); export it again"
        )
    config_bytes = config_path.read_bytes()
    if "config_sha256" not in metadata:
        raise CheckpointError(f"{source}: {EXPORT_WEIGHTS} has no checksum of {EXPORT_CONFIG} (an export from an older "
                              "version): export it again with python scripts/export.py")
    if metadata["config_sha256"] != hashlib.sha256(config_bytes).hexdigest():
        raise CheckpointError(f"{source}: {EXPORT_CONFIG} does not match the checksum in {EXPORT_WEIGHTS} (changed after "
                              "export); export it again")
    try:
        loaded = OmegaConf.create(config_bytes.decode())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{source}: {EXPORT_CONFIG} is not valid YAML: {_first_line(err)}") from None
    if not isinstance(loaded, DictConfig):
        raise CheckpointError(f"{source}: {EXPORT_CONFIG} holds a {type(loaded).__name__}, not the mapping export writes")
    config = stored_config(OmegaConf.to_container(loaded, resolve=False), source)
    info = {
        "epoch": int(metadata["epoch"]),
        "step": int(metadata["step"]),
        "weights": metadata.get("weights", ""),
        "run_name": metadata.get("run_name", ""),
        "source": metadata.get("source", ""),
        "weights_sha256": metadata["weights_sha256"],  # names these weights (e.g. for eval output)
    }
    return config, tensors, info


def load_model_from_export(folder: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, DictConfig, dict]:
    """Rebuild the model of an export folder through the allowlist and load
    ``model.safetensors`` strictly (``read_export`` checks it first).

    Returns ``(model in eval mode, the config, info)`` (``info`` as ``read_export``'s).
    """
    config, tensors, info = read_export(folder)
    source = f"export folder {str(Path(folder).expanduser())!r}"
    model = build_stored_model(config, source)
    load_weights(model, tensors, source)
    return model.to(device).eval(), OmegaConf.create(config), info


def read_stored_config(path: str | Path) -> tuple[dict, str, str | None]:
    """The checked plain config stored in a checkpoint file or an export folder, the
    words that name it in messages, and for an export the weights it holds (else None)."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / EXPORT_WEIGHTS).is_file():
        config, _, info = read_export(path)
        return config, f"export folder {str(path)!r}", info["weights"]
    source = f"checkpoint {str(path)!r}"
    return stored_config(read_checkpoint(path)["config"], source), source, None


def build_vae(data_cfg: DictConfig | dict, device: torch.device) -> nn.Module | None:
    """The data set's VAE (latent data), through the allowlist since the config may come
    from a checkpoint; None for data sets that have none."""
    vae_cfg = data_cfg.get("vae")
    if vae_cfg is None:
        return None
    return instantiate_allowed(vae_cfg, MODEL_PREFIXES, "vae", base=nn.Module).to(device)
