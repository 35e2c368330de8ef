"""Command line: ``python launcher.py [--backend local|modal] run_name=NAME key=value ...``.

Composes ``configs/train.yaml`` with Hydra's compose API (no Hydra run folder, no
change of working directory), checks ``run_name``, and hands the config to
``train.run`` (local) or to the Modal app. Errors in what the user typed are one
line on stderr and exit status 2; a run that fails while training exits 1. Set
``DZ_TRACEBACK=1`` to see the full traceback instead.
"""

import os
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


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="denoising_zoo"):
        return hydra_compose(config_name="train", overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        print("config groups: dataloaders/, model/, loss/, solver/, experiment/ under configs/; print the composed config with --cfg")
        return 0
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

    try:
        if not any(o.startswith("run_name=") for o in overrides):
            overrides = [*overrides, "run_name=eval"]  # eval_checkpoint needs no run name of its own
        cfg = compose(overrides)
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        return fail(one_line(err))
    if show_cfg:
        print(OmegaConf.to_yaml(cfg))
        return 0
    if backend == "modal":
        from scripts.modal_app import launch_remote

        return launch_remote(cfg, overrides)

    import train
    from models.checkpoint import CheckpointError

    try:
        train.run(cfg)
    except (CheckpointError, FileNotFoundError, ValueError, OmegaConfBaseException) as err:
        if os.environ.get("DZ_TRACEBACK"):
            raise
        return fail(one_line(err))
    except train.TrainingFailed as err:
        if os.environ.get("DZ_TRACEBACK"):
            raise
        return fail(one_line(err), code=1)
    except train.RunError as err:
        if os.environ.get("DZ_TRACEBACK"):
            raise
        return fail(one_line(err))
    except KeyboardInterrupt:
        return fail("interrupted; the last checkpoint written is kept", code=130)
    return 0


if __name__ == "__main__":
    sys.exit(main())
