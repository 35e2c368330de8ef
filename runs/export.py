"""Export folders (``scripts/export.py``): one set of weights as ``model.safetensors`` (a
format that cannot carry code) with ``epoch``, ``step`` and checksums of the tensors and
of ``config.yaml`` in its metadata, and the resolved config as ``config.yaml``. An export is
for sampling: a model's training-only part (iMF's auxiliary velocity head) stays behind."""

import hashlib
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from runs.checkpoint import _first_line, _write_atomic, build_stored_model, load_weights, stored_config
from runs.errors import CheckpointError, CheckpointWriteError
from runs.layout import EXPORT_CONFIG, EXPORT_WEIGHTS

EXPORT_KINDS = ("ema", "raw")


def weights_digest(weights: dict[str, Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def for_sampling(config: dict, tensors: dict[str, Tensor], source: str) -> tuple[dict, dict[str, Tensor]]:
    """The config and weights of the model sampling uses: a model with an auxiliary head
    (``model.aux_head``) loses its weights (``inference_state_dict`` names the rest) and its
    config turns it off (``inference_config``), so the export loads strictly into the plain
    model and gives the same ``u``. Other models pass unchanged."""
    with torch.device("meta"):  # names only: no memory, no initialisation
        model = build_stored_model(config, source)
    if not model.aux_head:
        return config, tensors
    kept = model.inference_state_dict().keys()
    return {**config, "model": model.inference_config(config["model"])}, {k: v for k, v in tensors.items() if k in kept}


def write_export(state: dict, folder: Path, weights: str = "ema", source: str = "") -> None:
    """Write ``folder/model.safetensors`` (the ``weights`` set of ``state``: ``ema`` or
    ``raw``, without an auxiliary head: ``for_sampling``) and ``folder/config.yaml`` (the
    resolved config, to match). Each file is written beside its place and moved in; the
    caller decides whether replacing is allowed."""
    if weights not in EXPORT_KINDS:
        raise ValueError(f"weights={weights!r}: expected one of {list(EXPORT_KINDS)}")
    where = source or "checkpoint"
    tensors = {k: v.detach().cpu().contiguous() for k, v in state["ema" if weights == "ema" else "model"].items()}
    config, tensors = for_sampling(stored_config(state["config"], where), tensors, where)
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
