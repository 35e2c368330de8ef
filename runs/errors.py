"""The run's error family and its exit statuses (docs/design.md, "Errors").

Every error a user should see is one line on stderr (``report``) and one of these
exit statuses, decided in ``exit_status`` alone:

    2      the input: a value, a file, a command line; fix it and run again
    1      a run that started and had to stop (a non-finite loss, a full disk)
    128+N  stopped by signal N after writing its checkpoint
    130    interrupted (Ctrl-C); the last checkpoint written is kept
"""

import os
import sys

EXIT_INPUT, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130


class RunError(RuntimeError):
    """Something the user can fix (a bad value, a missing file): one line, exit status 2."""

    exit_code = EXIT_INPUT


class TrainingFailed(RunError):
    """A run that started and had to stop (a non-finite loss, ranks out of sync): exit status 1."""

    exit_code = EXIT_FAILED


class Preempted(RunError):
    """Stopped by a signal after writing a checkpoint; exit status 128 + the signal number."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class CheckpointError(ValueError, RunError):
    """A checkpoint or export that cannot be used (exit status 2)."""


class CheckpointWriteError(RunError):
    """A file that could not be written (disk full, unwritable folder); what was there is intact."""

    exit_code = EXIT_FAILED


def input_errors() -> tuple[type[BaseException], ...]:
    """What else is the user's input when it escapes: a constructor's or a loader's own
    ``ValueError``, a missing file, and Hydra's and OmegaConf's refusals of a config."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return ValueError, FileNotFoundError, NotADirectoryError, HydraException, OmegaConfBaseException


def exit_status(err: BaseException) -> int:
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return err.exit_code if isinstance(err, RunError) else EXIT_INPUT


def one_line(err: BaseException) -> str:
    """The message on one line (Hydra's multi-line ones, e.g. the list of choices, folded)."""
    if isinstance(err, KeyboardInterrupt):
        return "interrupted; the last checkpoint written is kept"
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if "Config search path:" in lines:  # Hydra appends its search path: noise for the user
        lines = lines[: lines.index("Config search path:")]
    head, rest = lines[0], lines[1:]
    if rest and rest[0].endswith(":"):  # "Available options in 'model':" followed by the options
        return f"{head} {rest[0]} {', '.join(rest[1:])}"
    return " ".join(lines)


def fail(message: str, code: int = EXIT_INPUT) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def report(err: BaseException) -> int:
    """Print ``err`` as one line and return its exit status; with ``DZ_TRACEBACK=1`` re-raise it."""
    if os.environ.get("DZ_TRACEBACK"):
        raise err
    return fail(one_line(err), exit_status(err))
