"""Command line: ``python launcher.py [--backend local|modal] run_name=NAME key=value ...``.

Composes ``configs/train.yaml`` with Hydra's compose API (no Hydra run folder, no
change of working directory), checks ``run_name``, and hands the config to
``train.run`` (local) or to the Modal app. ``--from-config FILE`` trains a resolved
config saved to a file (what the Modal container runs). Every error the user should
see is one line on stderr and an exit status (``runs/errors.py``: 2 for what the user
typed, 1 for a run that failed while training, 128 + N for a run stopped by signal N
after writing its checkpoint). ``DZ_TRACEBACK=1`` shows the traceback.
"""

import sys
from pathlib import Path

from runs.errors import RunError, fail, input_errors, one_line, report

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


def validate_config(cfg) -> None:
    """``config_checks.validate_config``: every check of a composed config, before anything runs."""
    from config_checks import validate_config as validate

    validate(cfg)


def compose(overrides: list[str]):
    from evaluation.stored_config import compose as compose_train

    return compose_train(overrides)


def run_config(cfg) -> int:
    """Validate and train (or evaluate) a composed config; any error the user should see
    becomes one line and its exit status (``runs/errors.py``)."""
    import train

    try:
        validate_config(cfg)
        train.run(cfg)
    except (KeyboardInterrupt, RunError, *input_errors()) as err:
        return report(err)
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

    try:
        if any(o.startswith("eval_checkpoint=") for o in overrides):
            # The stored run's config, with this command line's eval.*, solver, seed and this
            # machine's file locations: a checkpoint never chooses where files are.
            cfg = eval_checkpoint_config(overrides)
        else:
            cfg = compose(overrides)
            OmegaConf.resolve(cfg)
    except RunError as err:
        return report(err)
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
