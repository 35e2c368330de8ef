"""Command line: ``python launcher.py [--backend local|modal] run_name=NAME key=value ...``.

Composes ``configs/train.yaml`` with Hydra's compose API (no Hydra run folder, no
change of working directory), checks ``run_name``, and hands the config to
``train.run`` (local) or to the Modal app. ``--from-config FILE`` trains a resolved
config saved to a file (what the Modal container runs). Every error the user should
see is one line on stderr and an exit status, mapped in ``run_config`` alone: 2 for
what the user typed, 1 for a run that failed while training, 128 + N for a run stopped
by signal N after writing its checkpoint. ``DZ_TRACEBACK=1`` shows the traceback.
"""

import math
import os
import re
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
USAGE = "usage: python launcher.py [--backend local|modal] run_name=NAME [key=value ...]   (e.g. python launcher.py run_name=demo epochs=5)"


def split_backend(argv: list[str]) -> tuple[str, list[str]]:
    """Remove ``--backend X`` / ``--backend=X`` from argv before Hydra sees it."""
    backend, rest, i = "local", [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--backend":
            if i + 1 >= len(argv):
                raise SystemExit(fail("--backend needs a value: local or modal"))
            backend, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--backend="):
            backend = arg.partition("=")[2]
        else:
            rest.append(arg)
        i += 1
    if backend not in ("local", "modal"):
        raise SystemExit(fail(f"--backend {backend!r}: expected local or modal"))
    return backend, rest


def fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def one_line(err: BaseException) -> str:
    """Hydra's multi-line messages (e.g. the list of choices) folded onto one line."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if "Config search path:" in lines:  # Hydra appends its search path: noise for the user
        lines = lines[: lines.index("Config search path:")]
    head, rest = lines[0], lines[1:]
    if rest and rest[0].endswith(":"):  # "Available options in 'model':" followed by the options
        return f"{head} {rest[0]} {', '.join(rest[1:])}"
    return " ".join(lines)


def validate_config(cfg) -> None:
    """Check the values a user types on the command line, once, before anything runs."""
    from omegaconf import OmegaConf

    from config_checks import check_groups
    from models.runs import RUN_NAME_MAX, RunError
    from train import PRECISIONS

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise RunError(f"{missing[0]} is required (the config leaves it as ???): pass {missing[0]}=VALUE")
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
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise RunError(f"{key}={value!r}: expected a number")
    shape = cfg.dataloaders.data_shape
    checks = [
        # torch seeds lie in [0, 2**64) and epoch e's data order is seeded with seed * 1_000_003 + e
        # (+ rank, + step on a DDP resume): 2**44 * 1_000_003 leaves ~8e17 of room below 2**64.
        (0 <= cfg.seed < 2**44, (f"seed={cfg.seed}: expected an integer in [0, 2**44) = [0, {2**44 - 1}] (torch seeds lie in "
                                 "[0, 2**64), and epoch e's data order is seeded with seed * 1_000_003 + e)")),
        (math.isfinite(cfg.optimizer.lr) and cfg.optimizer.lr > 0, f"optimizer.lr={cfg.optimizer.lr}: expected a finite number > 0"),
        (math.isfinite(cfg.eval.guidance_scale), f"eval.guidance_scale={cfg.eval.guidance_scale}: expected a finite number (1: no guidance)"),
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
        (all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in cfg.eval.meanflow_steps),
         f"eval.meanflow_steps={list(cfg.eval.meanflow_steps)}: expected a list of integers >= 1"),
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

    make_solver(cfg.solver.name, **{k: v for k, v in cfg.solver.items() if k != "name"})  # its own one-line error, now
    if not cfg.eval_checkpoint:  # evaluation rebuilds the checkpoint's own model (models/checkpoint.py checks it)
        check_groups(cfg)  # loss, model, data, EMAs, optimizer: what the run builds from them



def compose(overrides: list[str]):
    from evaluation.stored_config import compose as compose_train

    return compose_train(overrides)


def run_config(cfg) -> int:
    """Validate and train (or evaluate) a composed config. Every error the user should see
    becomes one line on stderr and its exit status here, and nowhere else: ``RunError``
    carries its own (2: fix the input; 1: training failed; 128 + N: stopped by signal N);
    a constructor's or a loader's ``ValueError`` / ``FileNotFoundError`` and an OmegaConf
    error (a bad interpolation, a missing key) are input errors (2)."""
    from omegaconf.errors import OmegaConfBaseException

    import train
    from models.runs import RunError

    try:
        validate_config(cfg)
        train.run(cfg)
    except KeyboardInterrupt:
        return fail("interrupted; the last checkpoint written is kept", code=130)
    except (RunError, ValueError, FileNotFoundError, NotADirectoryError, OmegaConfBaseException) as err:
        if os.environ.get("DZ_TRACEBACK"):
            raise
        return fail(one_line(err), err.exit_code if isinstance(err, RunError) else 2)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        print("config groups: dataloaders/, model/, loss/, solver/, experiment/ under configs/; print the composed config with --cfg")
        return 0
    if argv[:1] == ["--from-config"]:  # a resolved config saved to a file (what the Modal container trains)
        if len(argv) != 2:
            return fail("--from-config needs one path: python launcher.py --from-config RUN_CONFIG.yaml")
        from omegaconf import OmegaConf

        return run_config(OmegaConf.load(argv[1]))
    backend, overrides = split_backend(argv)
    show_cfg = "--cfg" in overrides
    overrides = [o for o in overrides if o != "--cfg"]
    if not any(o.split("=", 1)[0].lstrip("+~") == "run_name" for o in overrides) and not any(
        o.startswith("eval_checkpoint=") for o in overrides
    ):
        return fail(f"run_name is required. {USAGE}")

    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from evaluation.stored_config import eval_checkpoint_config
    from models.runs import RunError

    try:
        if any(o.startswith("eval_checkpoint=") for o in overrides):
            # The stored run's config, with this command line's eval.*, solver, seed and this
            # machine's file locations: a checkpoint never chooses where files are.
            cfg = eval_checkpoint_config(overrides)
        else:
            cfg = compose(overrides)
            OmegaConf.resolve(cfg)
    except RunError as err:
        if os.environ.get("DZ_TRACEBACK"):
            raise
        return fail(one_line(err), err.exit_code)
    except (HydraException, OmegaConfBaseException) as err:
        message = one_line(err)
        if "Interpolation key 'dataloaders.data_shape." in message:  # an image model on dense data
            message = (f"the model reads the image shape [C, H, W] from dataloaders.data_shape, which this data set "
                       f"does not have ({message}): use an image data set (digits, cifar10, ...) or model=mlp")
        return fail(message)
    if show_cfg:
        print(OmegaConf.to_yaml(cfg))
        return 0
    if backend == "modal":
        from scripts.modal_app import launch_remote

        return launch_remote(cfg, overrides)
    return run_config(cfg)


if __name__ == "__main__":
    sys.exit(main())
