"""Building objects from configs that may come from a file: the allowlisted builder.

A stored config (a checkpoint's, an export's) is untrusted, so it never reaches
``hydra.utils.instantiate``. ``instantiate_allowed`` builds a node only if its
``_target_`` is a class (or, where asked, a function) defined in a module of this
repository under the prefixes the caller allows, and every argument is plain data:
a config cannot reach e.g. ``torch.load(..., weights_only=False)``, ``os.system`` or
the VAE's hub download (docs/design.md, "Files from elsewhere").
"""

import importlib
import importlib.util
import inspect
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from runs.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]  # the repository: the only place allowed classes live
MODEL_PREFIXES = ("models.",)
MODEL_BASE = "models.base_model.BaseModel"  # named, not imported: the run's room sits below the networks

# Hydra's instantiation keys: any of them inside the arguments would build another object.
HYDRA_KEYS = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")

PLAIN = "plain values (numbers, strings, booleans, null, lists and mappings of them)"


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
    target: object, allowed_prefixes: tuple[str, ...], what: str, base: type | str | None = None, functions: bool = False
):
    """The class that ``target`` (a dotted path) names, if it is defined in a module of
    this repository under one of ``allowed_prefixes`` (and subclasses ``base``); with
    ``functions=True`` (and no ``base``) a function defined there too (a factory such as
    ``dataloaders.points.make_dataset``).

    The module is located as a file of the repository before anything is imported, so
    neither another package of the same name on ``sys.path`` nor an attribute chain
    through an import (``runs.checkpoint.torch.load``) is reachable. ``base`` may be
    given by its dotted name (a class of a layer above this one).
    """
    if isinstance(base, str):
        module_name, _, name = base.rpartition(".")
        base = getattr(importlib.import_module(module_name), name)
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


def allowed_call(
    node: DictConfig | dict,
    allowed_prefixes: tuple[str, ...],
    what: str,
    base: type | str | None = None,
    functions: bool = False,
    extra: dict | None = None,
):
    """``(the class or function, its keyword arguments)`` for ``node`` (``_target_`` plus
    keyword arguments), if its target is one of the project's own classes
    (``allowed_target``; factory functions too with ``functions=True``) and every
    argument is plain data; nothing is imported or called before both checks pass.
    ``extra`` holds arguments the caller adds (``split="train"``), not read from the
    config and not checked. Keys that are not arguments (a config group's ``name``) must
    be dropped by the caller."""
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


def instantiate_allowed(node: DictConfig | dict, *args, **options) -> object:
    """Build ``node`` after every check of ``allowed_call`` (same arguments). It replaces
    ``hydra.utils.instantiate`` for configs that may come from a file; the target is
    called directly, so a constructor's one-line ``ValueError`` reaches the user as itself."""
    call, kwargs = allowed_call(node, *args, **options)
    return call(**kwargs)


def build_model(model_cfg: DictConfig | dict):
    """Instantiate a model from its config group node through the allowlist: a
    ``BaseModel`` subclass under ``models.`` (the ``name`` key names the architecture
    for checkpoint paths and is not a constructor argument)."""
    kwargs = {k: v for k, v in model_cfg.items() if k != "name"}
    return instantiate_allowed(kwargs, MODEL_PREFIXES, "model", base=MODEL_BASE)


def build_vae(data_cfg: DictConfig | dict, device: torch.device) -> nn.Module | None:
    """The data set's VAE (latent data), through the allowlist since the config may come
    from a checkpoint; None for data sets that have none."""
    vae_cfg = data_cfg.get("vae")
    if vae_cfg is None:
        return None
    return instantiate_allowed(vae_cfg, MODEL_PREFIXES, "vae", base=nn.Module).to(device)
