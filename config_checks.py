"""The groups of a composed config, checked before anything is built for real or written.

``validate_config`` checks the scalar keys, then calls ``check_groups``, which
holds every group to what will be built from it:

- each argument of the loss (and of its time law), the model, the data set (and its
  augment pipe), the EMAs and the optimizer against the type annotation of the
  constructor that takes it (``check_arguments``): one mechanism for every key, so a
  new constructor argument is checked by its annotation alone;
- the optimizer's class: a ``torch.optim`` optimizer, built once on a dummy parameter so
  its own range checks run;
- the loss, built (its constructor's one-line ``ValueError`` names its keys);
- the model, built on the meta device (no memory, no time) and run on a meta batch of
  ``dataloaders.data_shape``: a model that cannot take the data is refused here;
- one sample of the data set's held-out split against ``dataloaders.data_shape``.

Every refusal is a ``RunError`` (or a constructor's ``ValueError``) of one line that
names the key and what it expects: exit status 2, before ``train.py`` claims a folder.
"""

import collections.abc
import inspect
import math
import re
import types
import typing

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from dataloaders.base_dataloaders import make_dataset
from models.unified_input import make_unified_flow_matching_input
from losses.base_loss import BaseLoss, build_loss, upgrade_loss_config
from losses.time_sampling import PAIR_SAMPLERS, TIME_SAMPLERS
from models.base_model import BaseModel
from runs.build import MODEL_PREFIXES, allowed_target, build_model
from runs.ema import EMASet
from runs.errors import RunError, one_line
from runs.layout import is_location

# What a config value can be, in words: (one, several).
NAMES: dict[type, tuple[str, str]] = {
    bool: ("true or false", "booleans"),
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
    type(None): ("null", "nulls"),
    dict: ("a mapping", "mappings"),
}
TIME_LAWS = TIME_SAMPLERS | PAIR_SAMPLERS  # what a loss's ``time: {name: ...}`` names
OPTIMIZERS = sorted(name for name, obj in vars(torch.optim).items()
                    if inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer)
# Optimizer options whose validity depends on the parameters' device: the dry run on a
# CPU parameter leaves them out (their type is still checked).
DEVICE_OPTIONS = ("fused", "foreach", "capturable")


# ---------------------------------------------------------------------------------
# Arguments against annotations
# ---------------------------------------------------------------------------------


def fits(value, annotation) -> bool:
    """Whether a plain config value (number, string, bool, null, list, mapping) is of
    the annotated type. A form this check does not know (a protocol, a type variable)
    is left to the constructor."""
    if annotation is inspect.Parameter.empty or annotation is typing.Any:
        return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, arg) for arg in args)
    if origin is typing.Literal:
        return value in args
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple, collections.abc.Sequence) or annotation in (list, tuple):
        if not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(fits(v, arg) for v, arg in zip(value, args))
        return not args or all(fits(v, args[0]) for v in value)
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if inspect.isclass(annotation):
        return isinstance(value, annotation)
    return True


def describe(annotation, plural: bool = False) -> str | None:
    """The annotated type in words (``a list of 2 numbers``); None for what a config
    cannot hold (a tensor), which is then not offered."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        words = [w for arg in args if (w := describe(arg, plural)) is not None]
        return " or ".join(dict.fromkeys(words)) or None
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    if annotation in NAMES:
        return NAMES[annotation][plural]
    if origin in (list, tuple, collections.abc.Sequence) or annotation in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            each = {describe(arg, plural=True) for arg in args}
            return f"a list of {len(args)} {each.pop()}" if len(each) == 1 else f"a list of {len(args)} values"
        each = describe(args[0], plural=True) if args else None
        return f"a list of {each}" if each else "a list"
    if origin is dict:
        return NAMES[dict][plural]
    return None


def check_arguments(call, kwargs: dict, key: str, skip: tuple[str, ...] = ()) -> None:
    """Refuse (one line naming ``key.argument``) an argument ``call`` does not take, one
    whose value does not fit its annotation, or a required one that is missing.
    ``skip``: the arguments the caller passes itself (``params``, ``split``)."""
    signature = inspect.signature(call)
    hints = typing.get_type_hints(call.__init__ if inspect.isclass(call) else call)
    where = f"{call.__module__}.{call.__qualname__}"
    params = {name: p for name, p in signature.parameters.items()
              if name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    open_ended = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    for name, value in kwargs.items():
        if name not in params:
            if open_ended:
                continue
            raise RunError(f"{key}.{name}: {where} takes no argument {name!r}; it takes {', '.join(params) or 'none'}")
        annotation = hints.get(name, inspect.Parameter.empty)
        if not fits(value, annotation):
            raise RunError(f"{key}.{name}={value!r}: expected {describe(annotation) or annotation} (an argument of {where})")
    missing = [name for name, p in params.items() if p.default is p.empty and name not in kwargs]
    if missing:
        raise RunError(f"{key}.{missing[0]} is required by {where}: pass {key}.{missing[0]}=VALUE")


def plain(node: DictConfig) -> dict:
    return OmegaConf.to_container(node, resolve=True)


# ---------------------------------------------------------------------------------
# The groups
# ---------------------------------------------------------------------------------


def check_optimizer(cfg: DictConfig) -> None:
    """A ``torch.optim`` class with arguments it takes, run once on a dummy parameter."""
    node = plain(cfg.optimizer)
    target = node.get("_target_")
    name = target.removeprefix("torch.optim.") if isinstance(target, str) and target.startswith("torch.optim.") else None
    if name not in OPTIMIZERS:
        raise RunError(f"optimizer._target_={target!r}: expected a torch.optim optimizer class: "
                       f"{', '.join('torch.optim.' + n for n in OPTIMIZERS)}")
    if node.get("_partial_") is not True:
        raise RunError(f"optimizer._partial_={node.get('_partial_')!r}: expected true (the loop passes the parameters)")
    cls = getattr(torch.optim, name)
    kwargs = {k: v for k, v in node.items() if not k.startswith("_")}
    check_arguments(cls, kwargs, "optimizer", skip=("params",))
    try:  # the class's own range checks (betas in [0, 1), eps >= 0, ...), on a 2-D parameter (Muon takes matrices only)
        cls([nn.Parameter(torch.zeros(1, 1))], **{k: v for k, v in kwargs.items() if k not in DEVICE_OPTIONS})
    except ValueError as err:
        raise RunError(f"optimizer ({target}): {err}") from None


def check_ema(cfg: DictConfig) -> None:
    """``ema.*`` are the arguments of ``EMASet``; every decay in [0, 1)."""
    ema = plain(cfg.ema)
    check_arguments(EMASet, ema, "ema", skip=("model",))
    if not 0.0 <= ema["decay"] < 1.0:
        raise RunError(f"ema.decay={ema['decay']}: expected a decay in [0, 1)")
    if not all(0.0 <= d < 1.0 for d in ema.get("decays") or []):
        raise RunError(f"ema.decays={ema['decays']}: expected decays in [0, 1), e.g. [0.9999, 0.99995]")
    if ema.get("halflife_samples", 0) < 0:
        raise RunError(f"ema.halflife_samples={ema['halflife_samples']}: expected >= 0 (0: use ema.decay)")


def check_loss(cfg: DictConfig) -> None:
    """The loss's arguments (and its time law's) against their annotations, then the
    loss itself (cheap: its constructor's one-line errors name ``loss.*``)."""
    node = upgrade_loss_config({k: v for k, v in plain(cfg.loss).items() if k != "name"})
    call = allowed_target(node.get("_target_"), ("losses.",), "loss", base=BaseLoss)
    kwargs = {k: v for k, v in node.items() if k != "_target_"}
    check_arguments(call, kwargs, "loss")
    time = kwargs.get("time")
    if isinstance(time, dict) and time.get("name") in TIME_LAWS:  # an unknown name: the loss's own error lists the laws
        check_arguments(TIME_LAWS[time["name"]], {k: v for k, v in time.items() if k != "name"}, "loss.time")
    build_loss(cfg.loss)


def check_model(cfg: DictConfig) -> None:
    """The model's arguments against their annotations, then the model built on the meta
    device and run on a meta batch of ``dataloaders.data_shape`` (with labels when it is
    conditional): it must give back the data's shape."""
    node = {k: v for k, v in plain(cfg.model).items() if k != "name"}
    call = allowed_target(node.get("_target_"), MODEL_PREFIXES, "model", base=BaseModel)
    check_arguments(call, {k: v for k, v in node.items() if k != "_target_"}, "model")
    shape = [int(n) for n in cfg.dataloaders.data_shape]
    what = f"model={cfg.model.name} ({node['_target_']})"
    with torch.device("meta"):
        model = build_model(cfg.model)
        z = make_unified_flow_matching_input(torch.empty(2, *shape), torch.empty(2), torch.empty(2))
        y = torch.zeros(2, dtype=torch.long) if model.num_classes > 0 else None
        try:  # shapes only: a meta tensor has no data
            out = model(z, y, cond=torch.zeros(2, model.num_conds) if model.num_conds > 0 else None)
        except (RuntimeError, ValueError, IndexError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RunError(f"{what} cannot take dataloaders.data_shape={shape} of {cfg.dataloaders.name} ({reason}): "
                           f"choose a model for {'images [C, H, W]' if len(shape) == 3 else 'dense data [D]'} "
                           "(configs/model/) or another data set") from None
    if list(out.shape) != [2, *shape]:
        raise RunError(f"{what} maps a batch of dataloaders.data_shape={shape} to shape {list(out.shape)[1:]}: "
                       "a velocity has the data's shape")


def check_data(cfg: DictConfig, read: bool = True) -> None:
    """The data set's arguments (and its augment pipe's) against their annotations, then
    (``read``) one sample of its held-out split against ``dataloaders.data_shape`` (in
    ``mode=images`` the model sees the VAE's latents instead, whose shape the encoder sets)."""
    data = cfg.dataloaders
    node = plain(data.dataset)
    call = allowed_target(node.get("_target_"), ("dataloaders.",), "dataset", functions=True)
    check_arguments(call, {k: v for k, v in node.items() if k != "_target_"}, "dataloaders.dataset", skip=("split",))
    if data.get("augment") is not None:
        augment = plain(data.augment)
        pipe = allowed_target(augment.get("_target_"), ("dataloaders.",), "augment")
        check_arguments(pipe, {k: v for k, v in augment.items() if k != "_target_"}, "dataloaders.augment")
    if data.get("mode") == "images" or not read:
        return
    dataset = make_dataset(data, "test")  # the loader's own one-line errors (a missing file, a bad array)
    if len(dataset) == 0:
        raise RunError(f"dataloaders={data.name}: the held-out split is empty")
    sample = list(torch.as_tensor(dataset[0][0]).shape)
    shape = [int(n) for n in data.data_shape]
    if sample != shape:
        raise RunError(f"dataloaders.data_shape={shape} but the samples of {data.name} have shape {sample}: "
                       f"set dataloaders.data_shape={sample}, or the data set's own size to give {shape}")


USES = ("train", "eval", "export")  # what a config is checked for
# The nodes every config has, and what they are (a stored or typed config may say otherwise).
STRUCTURE = {key: DictConfig for key in ("model", "loss", "solver", "optimizer", "ema", "eval", "eval.fid", "checkpoint",
                                         "trackio", "dataloaders", "dataloaders.dataset")} | {
    key: ListConfig for key in ("dataloaders.data_shape", "eval.meanflow_steps", "eval.consistency_steps", "ema.decays")}


def check_groups(cfg: DictConfig, use: str = "train") -> None:
    """The groups a config is used for (the scalar keys are checked before this): a run
    builds all of them; ``eval_checkpoint`` the loss, model and data (not the optimizer
    or the EMAs); an export also, but it reads no data (this machine may have none)."""
    if use == "train":
        check_optimizer(cfg)
        check_ema(cfg)
    check_loss(cfg)
    check_model(cfg)
    check_data(cfg, read=use != "export")


# ---------------------------------------------------------------------------------
# The whole config
# ---------------------------------------------------------------------------------


def validate_config(cfg, use: str | None = None) -> None:
    """Check a composed config once, before anything runs: what the user typed, and what
    a stored run's config holds (``evaluation/stored_config.py``). ``use`` is one of
    ``USES``; by default ``eval`` when ``eval_checkpoint`` is set, else ``train``. An
    export may leave the data locations unset (they are the evaluating machine's)."""
    use = use or ("eval" if cfg.eval_checkpoint else "train")
    from runs.layout import RUN_NAME_MAX
    from train import PRECISIONS

    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not (use == "export" and is_location(k)))
    if missing:
        raise RunError(f"{missing[0]} is required (the config leaves it as ???): pass {missing[0]}=VALUE")
    for key, kind in STRUCTURE.items():  # before any key below is read as one
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, kind):
            what = "a mapping of keys" if kind is DictConfig else "a list, e.g. [1, 2]"
            raise RunError(f"{key}={str(value)[:60]}: expected {what}")
    name = str(cfg.run_name)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+@=-]*", name) or ".." in name:
        raise RunError(f"run_name={name!r}: expected a plain name of letters, digits and . _ - + @ = "
                       "(no /, no .., not empty): it names folders under output_dir")
    if len(name) > RUN_NAME_MAX:
        raise RunError(f"run_name={name[:20]}... has {len(name)} characters: expected at most {RUN_NAME_MAX} "
                       "(it names files such as <run_name>_overwritten_YYYYmmdd-HHMMSS.pt, within the 255-byte limit of a file name)")
    if not isinstance(cfg.output_dir, str) or not cfg.output_dir.strip():
        raise RunError(f"output_dir={cfg.output_dir!r}: expected a folder (e.g. output_dir=outputs); empty would write into the current folder")
    project = cfg.trackio.project
    if not isinstance(project, str) or not re.fullmatch(rf"[A-Za-z0-9_-]{{1,{RUN_NAME_MAX}}}", project):
        raise RunError(f"trackio.project={project!r}: expected a name of letters, digits, _ and - (no /, not empty, at most "
                       f"{RUN_NAME_MAX}): trackio names its files after it and drops any other character")
    if cfg.trackio.enabled:  # names trackio reserves (registries, its sidecar files): refused at trackio.init, after the run folder
        from trackio.sqlite_storage import SQLiteStorage

        try:
            SQLiteStorage.validate_project_name(project)
        except ValueError as err:
            raise RunError(f"trackio.project={project!r}: {one_line(err)}") from None
    for key in ("seed", "epochs", "batch_size", "num_workers", "max_steps", "warmup_steps", "log_every_steps", "max_rollbacks",
                "eval.every_epochs", "eval.num_samples", "eval.repeats", "eval.steps", "eval.batch_size",
                "checkpoint.every_epochs", "checkpoint.every_steps", "checkpoint.archive_every_epochs"):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise RunError(f"{key}={value!r}: expected an integer")
    for key in ("resume", "overwrite", "compile", "tf32", "cudnn_benchmark", "ema.warmup", "eval.plot", "eval.raw_weights",
                "eval.fid.enabled", "trackio.enabled", "trackio.system_metrics"):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, bool):
            raise RunError(f"{key}={value!r}: expected true or false")
    for key in ("optimizer.lr", "min_lr_ratio", "grad_clip", "ema.decay", "ema.halflife_samples", "eval.guidance_scale"):
        value = OmegaConf.select(cfg, key)
        if (not isinstance(value, int | float) or isinstance(value, bool)) and not (key == "eval.guidance_scale" and value is None):
            raise RunError(f"{key}={value!r}: expected a number")
    interval = OmegaConf.select(cfg, "eval.guidance_interval")
    if interval is not None:
        bounds = list(interval) if isinstance(interval, ListConfig | list) else None
        if not (bounds and len(bounds) == 2 and all(isinstance(b, int | float) and not isinstance(b, bool) for b in bounds)
                and 0 <= bounds[0] <= bounds[1] <= 1):
            raise RunError(f"eval.guidance_interval={interval}: expected null or [lo, hi] with 0 <= lo <= hi <= 1 (times s, noise at 0)")
    shape = cfg.dataloaders.data_shape
    checks = [
        # torch seeds lie in [0, 2**64) and epoch e's data order is seeded with seed * 1_000_003 + e
        # (+ rank, + step on a DDP resume): 2**44 * 1_000_003 leaves ~8e17 of room below 2**64.
        (0 <= cfg.seed < 2**44, (f"seed={cfg.seed}: expected an integer in [0, 2**44) = [0, {2**44 - 1}] (torch seeds lie in "
                                 "[0, 2**64), and epoch e's data order is seeded with seed * 1_000_003 + e)")),
        (math.isfinite(cfg.optimizer.lr) and cfg.optimizer.lr > 0, f"optimizer.lr={cfg.optimizer.lr}: expected a finite number > 0"),
        (cfg.eval.guidance_scale is None or math.isfinite(cfg.eval.guidance_scale),
         f"eval.guidance_scale={cfg.eval.guidance_scale}: expected a finite number (1: no guidance) or null (the loss's own)"),
        (cfg.on_nonfinite in ("stop", "rollback"), f"on_nonfinite={cfg.on_nonfinite!r}: expected stop or rollback"),
        (cfg.max_rollbacks >= 1, f"max_rollbacks={cfg.max_rollbacks}: expected an integer >= 1"),
        (not (cfg.resume and cfg.overwrite), ("resume=true with overwrite=true: resume continues the run, overwrite starts it "
                                              "over (archiving its last.pt); drop one of them")),
        (isinstance(cfg.epochs, int) and cfg.epochs >= 1, f"epochs={cfg.epochs}: expected an integer >= 1"),
        (isinstance(cfg.batch_size, int) and cfg.batch_size >= 1, f"batch_size={cfg.batch_size}: expected an integer >= 1"),
        (cfg.precision in PRECISIONS, f"precision={cfg.precision}: expected one of {list(PRECISIONS)}"),
        (cfg.num_workers >= 0, f"num_workers={cfg.num_workers}: expected >= 0"),
        (cfg.max_steps >= 0, f"max_steps={cfg.max_steps}: expected >= 0 (0: no limit)"),
        (cfg.warmup_steps >= 0, f"warmup_steps={cfg.warmup_steps}: expected >= 0"),
        (cfg.lr_schedule in ("constant", "cosine"), f"lr_schedule={cfg.lr_schedule}: expected constant or cosine"),
        (0.0 <= cfg.min_lr_ratio <= 1.0, f"min_lr_ratio={cfg.min_lr_ratio}: expected a fraction in [0, 1]"),
        (cfg.grad_clip >= 0, f"grad_clip={cfg.grad_clip}: expected >= 0 (0 disables)"),
        (cfg.eval.every_epochs >= 1, f"eval.every_epochs={cfg.eval.every_epochs}: expected >= 1"),
        (cfg.eval.num_samples >= 2, f"eval.num_samples={cfg.eval.num_samples}: expected >= 2"),
        (cfg.eval.repeats >= 1, f"eval.repeats={cfg.eval.repeats}: expected >= 1"),
        (cfg.eval.steps >= 1, f"eval.steps={cfg.eval.steps}: expected >= 1"),
        (cfg.eval.batch_size >= 1, f"eval.batch_size={cfg.eval.batch_size}: expected an integer >= 1"),
        (cfg.checkpoint.every_epochs >= 1, f"checkpoint.every_epochs={cfg.checkpoint.every_epochs}: expected >= 1"),
        (cfg.checkpoint.every_steps >= 0, f"checkpoint.every_steps={cfg.checkpoint.every_steps}: expected >= 0 (0: off)"),
        (cfg.log_every_steps >= 0, f"log_every_steps={cfg.log_every_steps}: expected >= 0 (0: once per epoch)"),
        (not (cfg.init_from and cfg.resume), f"init_from={cfg.init_from} with resume=true: a resumed run keeps its own weights; drop one of them"),
        (cfg.checkpoint.archive_every_epochs >= 0, f"checkpoint.archive_every_epochs={cfg.checkpoint.archive_every_epochs}: expected >= 0"),
        (cfg.compile_mode in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
         f"compile_mode={cfg.compile_mode}: expected default, reduce-overhead, max-autotune or max-autotune-no-cudagraphs"),
        (len(shape) in (1, 3) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape),
         f"dataloaders.data_shape={list(shape)}: expected [D] or [C, H, W], integers >= 1"),
    ]
    fid = cfg.eval.fid
    if fid.enabled:
        checks += [
            (len(cfg.dataloaders.data_shape) == 3, f"eval.fid.enabled=true but {cfg.dataloaders.name} is not image data: FID needs images"),
            (fid.reference is not None, "FID needs a reference: set eval.fid.reference=/path/to/real/images, heldout, or a clean-fid dataset name such as cifar10"),
            (fid.feature_extractor in ("inception", "pooled"), f"eval.fid.feature_extractor={fid.feature_extractor}: expected inception or pooled"),
            (fid.num_samples >= 2, f"eval.fid.num_samples={fid.num_samples}: expected >= 2"),
        ]
    for ok, message in checks:
        if not ok:
            raise RunError(message)
    from solvers.runge_kutta import make_solver
    from solvers.sampling import few_step_grid

    for key in ("eval.meanflow_steps", "eval.consistency_steps"):
        grids = OmegaConf.select(cfg, key)  # a stored config from before consistency_steps has none
        for grid in OmegaConf.to_container(grids, resolve=True) if grids is not None else []:
            try:
                few_step_grid(grid, key)  # a step count, or a time list from 0 to 1
            except ValueError as err:
                raise RunError(str(err)) from None

    make_solver(cfg.solver.name, **{k: v for k, v in cfg.solver.items() if k != "name"})  # its own one-line error, now
    check_groups(cfg, use)
