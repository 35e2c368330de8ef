"""Command line: ``python launcher.py [--backend local|modal] [-m] run_name=NAME key=value ...``.

A run composes ``configs/train.yaml`` with Hydra's compose API (no Hydra run folder, no
change of working directory), checks ``run_name``, and hands the config to ``train.run``
(local) or to the Modal app. ``--from-config FILE`` trains a resolved config saved to a file
(what the Modal container runs). Every error the user should see is one line on stderr and
an exit status (``runs/errors.py``: 2 for what the user typed, 1 for a run that failed while
training, 128 + N for a run stopped by signal N after writing its checkpoint).
``DZ_TRACEBACK=1`` shows the traceback.

A sweep (``-m``) is Hydra's multirun: each combination of the comma-separated values is a
job, started by the launcher ``hydra/launcher=`` names (Hydra's basic one, one job after
the other, by default; ``joblib``; ``submitit_slurm`` / ``submitit_local``). A job
(``sweep_job``) runs its own overrides through ``run``, the path a typed command takes; a
training job's run is named ``<run_name>_<key>-<value>_...`` after the keys the sweep
varies. Hydra's files go to ``hydra.sweep.dir`` (``<output_dir>/sweeps/<time>/<job>/``:
each job's config, overrides, log and ``outcome.json``). The sweep ends with one line per
failed job, and exit status 1 if any failed.

Preemption under submitit: its signal is set to SIGUSR1, on which ``train.py`` writes a
checkpoint at the next step and stops. The job then marks its folder (``preempted``) and
hands the signal back to submitit, which saves the job and requeues it. A job whose folder
is so marked resumes its run (``resume=true``): only the same job of the same sweep can be
requeued into that folder, so a new sweep still refuses to clobber a run unless
``overwrite=true``.
"""

import hashlib
import json
import os
import re
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from runs.errors import EXIT_FAILED, Preempted, RunError, fail, input_errors, one_line, report

ROOT = Path(__file__).resolve().parent
CONFIG_DIR = ROOT / "configs"
USAGE = ("usage: python launcher.py [--backend local|modal] [-m] run_name=NAME [key=value ...]   "
         "(e.g. python launcher.py run_name=demo epochs=5; a sweep: python launcher.py -m run_name=cmp seed=0,1,2)")
SWEEP_FLAGS = ("-m", "--multirun")
PREEMPTED = "preempted"  # in a job's folder: the job was stopped by a signal after writing its checkpoint
OUTCOME = "outcome.json"  # in a job's folder: its run, overrides, exit status and error line
BACKEND = "DZ_BACKEND"  # hydra.job.env_set key: the backend of a sweep's jobs (absent: local)


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


def override_key(override: str) -> str:
    from evaluation.stored_config import override_key as key

    return key(override)


def composed(overrides: list[str]):
    """The resolved config of a command line: ``train.yaml`` with the overrides, or for
    ``eval_checkpoint`` the stored run's config with this command line's eval.*, solver, seed
    and this machine's file locations (a checkpoint never chooses where files are)."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from evaluation.stored_config import eval_checkpoint_config

    try:
        if any(override_key(o) == "eval_checkpoint" for o in overrides):
            return eval_checkpoint_config(overrides)
        cfg = compose(overrides)
        OmegaConf.resolve(cfg)
        return cfg
    except (HydraException, OmegaConfBaseException) as err:
        message = one_line(err)
        if "Interpolation key 'dataloaders.data_shape." in message:  # an image model on dense data
            message = (f"the model reads the image shape [C, H, W] from dataloaders.data_shape, which this data set "
                       f"does not have ({message}): use an image data set (digits, cifar10, ...) or model=mlp")
        raise RunError(message) from err


def run(overrides: list[str], backend: str = "local") -> int:
    """Compose, check and train (or evaluate, or hand to Modal): what a typed command and a
    sweep job both do. Raises what the user should see; returns the exit status."""
    cfg = composed(overrides)
    if backend == "modal":
        from scripts.modal_app import launch_remote

        return launch_remote(cfg, overrides)
    import train

    validate_config(cfg)
    train.run(cfg)
    return 0


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


def names_a_run(overrides: list[str]) -> bool:
    return any(override_key(o) in ("run_name", "eval_checkpoint") for o in overrides)


# ---------------------------------------------------------------------------------
# Sweeps (-m)
# ---------------------------------------------------------------------------------


def job_run_name(overrides: list[str], swept: str) -> str:
    """``<run_name>_<key>-<value>_...``: the typed run_name and the keys the sweep varies
    (Hydra's ``hydra.job.override_dirname``, from which ``sweep`` excludes every fixed key),
    in characters that a run name holds and a Hydra override can spell (no ``=``, no ``/``)."""
    from runs.layout import RUN_NAME_MAX

    base = next(o.partition("=")[2] for o in reversed(overrides) if override_key(o) == "run_name")
    suffix = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9._+@-]+", "-", swept))
    name = f"{base}_{suffix}" if suffix else base
    if len(name) > RUN_NAME_MAX:  # a digest of the whole name keeps long ones apart
        name = f"{name[:RUN_NAME_MAX - 9]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return name


@contextmanager
def typed_as(overrides: list[str]) -> Iterator[None]:
    """``sys.argv`` as the command that reproduces one job alone (``python launcher.py
    <its overrides>``), which the run records (trackio's ``command``), not the sweep's line or a
    worker's own argv."""
    typed = sys.argv[0] if sys.argv and sys.argv[0].endswith("launcher.py") else "launcher.py"  # a worker's own is not
    sweep_argv, sys.argv = sys.argv, [typed, *overrides]
    try:
        yield
    finally:
        sys.argv = sweep_argv


@contextmanager
def compose_api_free() -> Iterator[None]:
    """Hydra's global instance set aside while a job composes its overrides as a typed command
    does: the compose API refuses to start while the sweep's instance is set."""
    global_hydra = GlobalHydra.instance()
    sweep_hydra, global_hydra.hydra = global_hydra.hydra, None
    try:
        yield
    finally:
        global_hydra.hydra = sweep_hydra


def hand_back(signum: int) -> str:
    """Hand a stop by ``signum`` to the handler the run replaced while it trained: submitit's
    saves the job, requeues it and ends this process. Returns why it was not requeued, if so."""
    from submitit.core.utils import UncompletedJobError

    handler = signal.getsignal(signum)
    if not callable(handler):  # no launcher took the signal (Hydra's basic one, joblib)
        return ""
    try:
        handler(signum, None)
    except UncompletedJobError as refused:  # e.g. timed out more often than hydra.launcher.max_num_timeout allows
        return f"; {one_line(refused)}"
    return ""


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def sweep_job(_: DictConfig) -> int:
    """One job of a sweep: its own overrides through ``run``, as if typed (the config Hydra
    composed for it is not used: ``run`` composes the same overrides). Writes its outcome
    to its folder and returns its exit status."""
    job = HydraConfig.get()
    folder = Path(job.runtime.output_dir)
    typed = list(job.overrides.task)
    overrides, run_name = typed, None
    if not any(override_key(o) == "eval_checkpoint" for o in typed):  # an evaluation keeps the stored run's name
        run_name = job_run_name(typed, job.job.override_dirname)
        overrides = [o for o in typed if override_key(o) != "run_name"] + [f"run_name={run_name}"]
        if (folder / PREEMPTED).exists():  # this job, requeued: it continues the run it checkpointed
            overrides = [o for o in overrides if override_key(o) not in ("resume", "overwrite")] + ["resume=true"]
    try:
        with compose_api_free(), typed_as(overrides):
            status, error = run(overrides, job.job.env_set.get(BACKEND, "local")), ""
    except Preempted as stop:
        status, error = report(stop), one_line(stop)
        (folder / PREEMPTED).write_text(error + "\n")
        error += hand_back(stop.exit_code - 128)
    except (RunError, *input_errors()) as err:
        status, error = report(err), one_line(err)
    outcome = {"job": job.job.num, "run_name": run_name, "overrides": typed, "exit_status": status, "error": error}
    (folder / OUTCOME).write_text(json.dumps(outcome) + "\n")
    return status


class SweepReport(Callback):
    """Hydra callback (``hydra.callbacks`` in train.yaml): after the last job, a line for the
    sweep and one per failed job, read from the jobs' outcomes; exit status 1 if any failed
    (Hydra itself ends a sweep with 0 whatever its jobs returned)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        folder = Path(config.hydra.sweep.dir)
        outcomes = sorted((json.loads(p.read_text()) for p in folder.rglob(OUTCOME)), key=lambda o: o["job"])
        failed = [o for o in outcomes if o["exit_status"] != 0]
        print(f"sweep: {len(outcomes) - len(failed)} of {len(outcomes)} jobs finished; each job's config, log "
              f"and outcome in {folder}", flush=True)
        for o in failed:
            what, why = o["run_name"] or " ".join(o["overrides"]), o["error"] or "see the job's output"
            print(f"error: job {o['job']} ({what}) exit {o['exit_status']}: {why}", file=sys.stderr)
        if failed:
            raise SystemExit(EXIT_FAILED)


def is_override(arg: str) -> bool:
    return "=" in arg and not arg.startswith("-")


def hydra_flags(args: list[str]) -> list[str]:
    """The arguments that are not overrides (Hydra's own: ``--cfg hydra``, ``--info``, ...), in
    order. Hydra's ``--cfg`` takes job, hydra or all; a bare ``--cfg`` (a run's form) shows the job's."""
    flags = [a for a in args if not is_override(a)]
    out = []
    for i, flag in enumerate(flags):
        out.append(flag)
        if flag in ("--cfg", "-c") and flags[i + 1:i + 2] not in (["job"], ["hydra"], ["all"]):
            out.append("job")
    return out


def sweep(backend: str, args: list[str]) -> int:
    """``-m``: Hydra's multirun of ``sweep_job`` over ``args``; returns the sweep's exit status.
    With ``--cfg`` or ``--info`` (which Hydra does not take with a multirun) Hydra shows the
    first job's config, launcher and sweep settings included."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides, flags = [a for a in args if is_override(a)], hydra_flags(args)
    if not names_a_run(overrides):
        return fail(f"run_name is required. {USAGE}")
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        return report(err)
    # A job's name holds the keys the sweep varies: run_name and every key with one value are left
    # out (of a key typed twice, the last counts, as for Hydra's sweeper).
    last = {o.key_or_group: o for o in parsed}
    fixed = sorted({key for key, o in last.items() if not o.is_sweep_override()} | {"run_name"})
    extra = [f"hydra.job.config.override_dirname.exclude_keys=[{','.join(json.dumps(k) for k in fixed)}]"]
    if backend != "local":
        extra.append(f"+hydra.job.env_set.{BACKEND}={backend}")
    if any(f.partition("=")[0] in ("--cfg", "-c", "--info", "-i") for f in flags):
        first = [f"{o.get_key_element()}={next(o.sweep_string_iterator())}" if o.is_sweep_override() else o.input_line for o in parsed]
        hydra_argv = [*flags, *first, "hydra.mode=MULTIRUN", *extra]
    else:
        hydra_argv = ["-m", *flags, *overrides, *extra]
    os.environ["SUBMITIT_PREEMPT_SIGNAL"] = "USR1"  # the signal train.py checkpoints on (submitit's default is USR2)
    # Processes that a launcher starts elsewhere (submitit's) import the project from its root.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its refusals instead of printing them: one line below
    typed, sys.argv = sys.argv, [sys.argv[0] if sys.argv else "launcher.py", *hydra_argv]
    try:
        sweep_job()
    except SystemExit as stop:  # argparse's usage errors, and SweepReport's verdict
        return stop.code if isinstance(stop.code, int) else EXIT_FAILED
    except (KeyboardInterrupt, HydraException, OmegaConfBaseException) as err:
        return report(err)
    finally:
        sys.argv = typed
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        print("config groups: dataloaders/, model/, loss/, solver/, experiment/ under configs/; print the composed config with --cfg")
        print("-m sweeps every combination of comma-separated values, one run each (hydra/launcher=joblib: side by side; "
              "submitit_slurm: on SLURM, requeued and resumed when preempted)")
        return 0
    if argv[:1] == ["--from-config"]:  # a resolved config saved to a file (what the Modal container trains)
        if len(argv) != 2:
            return fail("--from-config needs one path: python launcher.py --from-config RUN_CONFIG.yaml")
        from omegaconf import OmegaConf

        return run_config(OmegaConf.load(argv[1]))
    backend, overrides = split_backend(argv)
    if any(a in SWEEP_FLAGS for a in overrides):
        return sweep(backend, [a for a in overrides if a not in SWEEP_FLAGS])
    show_cfg = "--cfg" in overrides
    overrides = [o for o in overrides if o != "--cfg"]
    if not names_a_run(overrides):
        return fail(f"run_name is required. {USAGE}")
    try:
        if show_cfg:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(composed(overrides)))
            return 0
        return run(overrides, backend)
    except (KeyboardInterrupt, RunError, *input_errors()) as err:
        return report(err)


if __name__ == "__main__":
    sys.exit(main())
