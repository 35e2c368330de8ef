"""Training checkpoints: one ``torch.save`` dict, written atomically, read with
``weights_only=True``, its keys and their types checked and old files upgraded
(``SCHEMA``, ``FORMAT``, ``upgrade``; docs/design.md, "Checkpoints").

Files from elsewhere are untrusted, so reading one never runs code:

- the zip archive's CRC-32 of every member is checked before unpickling (``torch.load``
  does not check them: a flipped byte in a tensor would load as different weights);
- unpickling is ``weights_only=True`` (tensors and plain containers only);
- the embedded config must be plain data (numbers, strings, booleans, null, lists and
  mappings of them; no interpolations, since it was stored resolved);
- the model is built through the allowlist (``runs/build.py``).
"""

import io
import os
import pickle
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from runs.build import MODEL_BASE, MODEL_PREFIXES, allowed_call, build_model, plain_data
from runs.errors import CheckpointError, CheckpointWriteError
from runs.layout import EXPORT_WEIGHTS

ANSI = re.compile(r"\x1b\[[0-9;]*m")
FORMAT = 2  # the layout written now; a file without "format" is format 1 (written before the schema)


@dataclass(frozen=True)
class Entry:
    """One key of a checkpoint: its type, what a format-1 file that lacks it means
    (``default``; None: every file has it), and whether only resuming needs it."""

    kind: type
    default: Callable[[], object] | None = None
    resume_only: bool = False


SCHEMA = {
    "format": Entry(int, lambda: 1),
    "config": Entry(dict),  # the resolved config; the model is rebuilt from config["model"] alone
    "model": Entry(dict),  # state dicts of the un-compiled, un-wrapped module
    "ema": Entry(dict),  # the main EMA (ema.decay or ema.halflife_samples)
    "emas": Entry(dict, dict),  # the other EMAs (ema.decays), by decay
    "step": Entry(int),
    "epoch": Entry(int),  # epochs finished
    "batch_in_epoch": Entry(int, int),  # batches of the next epoch behind (format 1 saved at epoch ends only)
    "metrics": Entry(dict, dict),  # the last evaluation's numbers
    "optimizer": Entry(dict, resume_only=True),
    "scheduler": Entry(dict, resume_only=True),
    "scaler": Entry(dict, resume_only=True),
    "rng": Entry(dict, resume_only=True),  # evaluation/tracking.py and runs/machine.py hold the rest
    "loss": Entry(dict, dict),  # the state of losses that keep one (AlphaFlow's schedule)
    "totals": Entry(dict, dict),  # the train metrics since the last logged row
    "history": Entry(list, list),  # every row logged
    "skipped": Entry(list, list),  # [epoch, batch] left out after a rollback
    "rollbacks": Entry(int, int),
}


def upgrade(state: object, source: str) -> dict:
    """``state`` checked against ``SCHEMA`` and brought to ``FORMAT``: a key a format-1 file
    lacks takes the value that meant then. Refuses a newer format, a missing key and a
    value of the wrong type, in one line naming the key."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{source} holds a {type(state).__name__}, not the dict that training saves")
    missing = [key for key, entry in SCHEMA.items() if key not in state and entry.default is None and not entry.resume_only]
    if missing:
        raise CheckpointError(f"{source} lacks the keys {missing} (has {sorted(map(str, state))}): not a training checkpoint")
    state = {key: entry.default() for key, entry in SCHEMA.items() if entry.default is not None and key not in state} | state
    for key, entry in SCHEMA.items():
        if key in state and not isinstance(state[key], entry.kind):
            raise CheckpointError(f"{source}: its {key!r} is a {type(state[key]).__name__}, expected a {entry.kind.__name__}")
    if state["format"] > FORMAT:
        raise CheckpointError(f"{source} has format {state['format']}, newer than this version reads ({FORMAT}): update DenoisingZoo")
    state["format"] = FORMAT
    state["config"] = with_time_scale(state["config"])
    return state


# The models whose times (and conditions) pass through the sinusoidal embedding of
# models/embeddings.py. Their configs gained ``time_scale`` when its default became 1 (the
# one-step references); a stored config without it was trained with times scaled by 1000.
TIME_EMBEDDING_MODELS = ("models.unet.unet.UNet", "models.flow_matching.cnn.SmallCNN", "models.dit.dit.DiT")
SCALE_BEFORE_THE_OPTION = 1000.0


def with_time_scale(config: dict) -> dict:
    """``config`` with the time scale its model was trained with spelled out (a file written
    before ``model.time_scale`` existed: 1000)."""
    model = config.get("model")
    if not isinstance(model, dict) or model.get("_target_") not in TIME_EMBEDDING_MODELS or "time_scale" in model:
        return config
    return {**config, "model": {**model, "time_scale": SCALE_BEFORE_THE_OPTION}}


def require_resume(state: dict, source: str) -> None:
    """Refuse to resume from a file without the optimizer, scheduler, scaler or RNG state."""
    missing = [key for key, entry in SCHEMA.items() if entry.resume_only and key not in state]
    if missing:
        raise CheckpointError(f"{source} lacks {missing}: it holds weights only, so it cannot be resumed (init_from=PATH starts from its weights)")


def save_checkpoint(state: dict, path: Path) -> None:
    """Write ``state`` (``SCHEMA``'s keys) to ``path`` atomically: serialise in memory, write a temporary
    file beside it, flush it to disk, then rename over the old file. A crash at any
    point leaves either the old or the new checkpoint, never a half-written one."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointWriteError(f"cannot create {path.parent} ({err.strerror or err}): choose a writable output_dir") from None
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    _write_atomic(path, buffer.getbuffer())


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


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", resume: bool = False) -> dict:
    """Load, check and upgrade a checkpoint (``SCHEMA``); with ``resume``, refuse one that
    lacks what resuming needs. Every failure is a one-line ``CheckpointError``."""
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
    state = upgrade(state, f"checkpoint {str(path)!r}")
    if resume:
        require_resume(state, f"checkpoint {str(path)!r}")
    return state


def stored_config(config: object, source: str) -> dict:
    """A config read from a file, checked to be plain resolved data with a model node, its
    time scale spelled out (``with_time_scale``: an export's config reaches it only here)."""
    config = plain_data(config, source, "config", builders=True, interpolations=False)
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{source}: its config has no model section: expected the resolved config that training stores")
    return with_time_scale(config)


def check_stored_model(config: dict, source: str) -> None:
    """``build_stored_model``'s refusals, without building the model."""
    try:
        allowed_call({k: v for k, v in config["model"].items() if k != "name"}, MODEL_PREFIXES, "model", base=MODEL_BASE)
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err}") from None
    if not isinstance(config["model"].get("name"), str):
        raise CheckpointError(f"{source}: its model config has no name (the architecture that names checkpoint folders)")


def build_stored_model(config: dict, source: str) -> nn.Module:
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
