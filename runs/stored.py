"""A stored run, from either kind of file: a training checkpoint (``.pt``) or an export folder."""

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from runs.checkpoint import build_stored_model, load_weights, read_checkpoint, stored_config
from runs.errors import CheckpointError
from runs.export import EXPORT_WEIGHTS, load_model_from_export, read_export


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


def read_stored_config(path: str | Path) -> tuple[dict, str, str | None]:
    """The checked plain config stored in a checkpoint file or an export folder, the
    words that name it in messages, and for an export the weights it holds (else None)."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / EXPORT_WEIGHTS).is_file():
        config, _, info = read_export(path)
        return config, f"export folder {str(path)!r}", info["weights"]
    source = f"checkpoint {str(path)!r}"
    return stored_config(read_checkpoint(path)["config"], source), source, None
