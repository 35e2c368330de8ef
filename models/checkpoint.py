"""Checkpoints: one ``torch.save`` dict, written atomically, read with ``weights_only=True``.

Keys (DESIGN.md): ``model`` and ``ema`` state dicts (un-compiled, un-wrapped),
``optimizer``, ``scheduler``, ``scaler``, ``step``, ``epoch``, ``rng`` and ``config``
(the resolved config as a plain dict), plus ``metrics`` (the last evaluation's
numbers). The model is rebuilt from ``config["model"]`` alone.
"""

import io
import os
import pickle
import zipfile
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

REQUIRED_KEYS = ("model", "ema", "step", "epoch", "config")


class CheckpointError(ValueError):
    """A checkpoint path that cannot be used; the message is one line for the user."""


def build_model(model_cfg: DictConfig | dict) -> nn.Module:
    """Instantiate a model from its config group node (the ``name`` key names the
    architecture for checkpoint paths and is not a constructor argument)."""
    node = OmegaConf.create(model_cfg) if isinstance(model_cfg, dict) else model_cfg
    kwargs = {k: v for k, v in node.items() if k != "name"}
    # A partial, then the call: a constructor's one-line ValueError reaches the user
    # as itself rather than wrapped in Hydra's InstantiationException.
    return instantiate(kwargs, _partial_=True, _convert_="all")()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile's ``OptimizedModule`` and DDP."""
    while isinstance(model, (torch._dynamo.eval_frame.OptimizedModule, nn.parallel.DistributedDataParallel)):
        model = model._orig_mod if isinstance(model, torch._dynamo.eval_frame.OptimizedModule) else model.module
    return model


def save_checkpoint(state: dict, path: Path) -> None:
    """Write ``state`` to ``path`` atomically: serialise in memory, write a temporary
    file beside it, flush it to disk, then rename over the old file. A crash at any
    point leaves either the old or the new checkpoint, never a half-written one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(buffer.getbuffer())
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load and check a checkpoint; every failure is a one-line ``CheckpointError``."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist: expected a .pt file written by training")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a file: expected a .pt file such as outputs/ckpts/mlp/RUN/last.pt")
    if not zipfile.is_zipfile(path):
        # torch.save writes a zip archive; anything else (a text file, a raw pickle, a
        # truncated copy that lost its central directory) is refused before unpickling,
        # where the safe unpickler could fail with arbitrary exception types.
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a readable torch checkpoint (truncated or corrupt?): "
            "expected the zip archive that torch.save writes"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "unpickling refused"
        raise CheckpointError(f"checkpoint {str(path)!r} was refused by the safe loader (weights_only=True): {first}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} is not a readable torch checkpoint (truncated or corrupt?): {first}") from None
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        have = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} lacks the keys {list(REQUIRED_KEYS)} (has {have}): not a training checkpoint")
    return state


def load_model_from_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True
) -> tuple[nn.Module, DictConfig, dict]:
    """Rebuild the model from the embedded config and load its (EMA) weights strictly.

    Returns ``(model in eval mode, the resolved config, the raw checkpoint dict)``.
    """
    state = read_checkpoint(path)
    cfg = OmegaConf.create(state["config"])
    model = build_model(cfg.model)
    model.load_state_dict(state["ema" if use_ema else "model"])
    return model.to(device).eval(), cfg, state
