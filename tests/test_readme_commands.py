"""Every command of README.md's and CLAUDE.md's ```bash blocks, run as a user types it.

The commands are read from the files, so a command added to the docs runs here with no
edit. They run in a fresh copy of the repository (the docs' relative paths, outputs/
included, resolve there), with this environment's python first on PATH (what activating
.venv does), no PYTHONPATH, and TRACKIO_DIR beside the copy. Training runs get overrides
appended that shrink them (one epoch cut at a few steps, a small evaluation); they run
in the order the docs give, which is the order their outputs are needed in.

A command that cannot run offline or within the suite's time is listed in NOT_RUN with
the reason, and its cheap form runs instead: the launcher's ``--cfg`` (the same
overrides composed and printed), a script's ``--help``, pytest's collection. So are the
synopsis lines (``[optional]`` parts, ``...``). Every file of scripts/ and visualizers/
also runs as a file from a folder outside the repository.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from runs.layout import EXPORT_CONFIG, EXPORT_WEIGHTS, RunLayout, ckpt_root, run_names
from tests.conftest import REPO, last_line

pytestmark = pytest.mark.slow

DOCS = ("README.md", "CLAUDE.md")

# Commands not run as shown, first match wins: (pattern searched in the command, why).
NOT_RUN: list[tuple[str, str]] = [
    (r"^python3? -m venv ", "creates the virtual environment this suite already runs in"),
    (r"^(\.|source) \S*activate$", "activates the environment this suite already runs in (PATH below does the same)"),
    (r"^pip install ", "installs packages from the network"),
    (r"^python -m pytest$", "the suite this test is part of"),
    (r"^python -m pytest ", "a part of the suite, which runs it anyway; its collection runs (an empty selection fails)"),
    (r"^bash \.ci/run$", "makes a fresh virtual environment and pip-installs into it (network); its syntax is checked"),
    (r"^python scripts/benchmark\.py\b", "benchmarks for minutes; tests/test_benchmark.py runs its quick mode"),
    (r"^python scripts/compare\.py ", "needs a finished sweep; tests/test_compare.py runs it"),
    (r"^python launcher\.py -m run_name=", "a sweep of several runs, or on a SLURM cluster; tests/test_sweeps.py runs sweeps "
     "with the basic, joblib and submitit launchers"),
    (r"^torchrun ", "several GPUs or machines"),
    (r" --backend modal\b", "trains on Modal: credentials and the network"),
    (r"^python scripts/modal_app\.py ", "reads a Modal volume: credentials and the network (tests/test_modal.py runs it without them)"),
    (r" device=cuda\b", "needs a CUDA GPU"),
    (r" experiment=digits_", "minutes on a CPU; tests/test_image_e2e.py trains an image run"),
]

# Placeholders of the docs, as whole words: the run the quick start trains.
PLACEHOLDER = re.compile(r"(?<![\w.])(RUN_NAME|NAME|RUN|X)(?![\w.])")
PLACEHOLDER_RUN = "demo"

# A command whose input another command writes, where the docs list them the other way round.
RUN_AFTER: dict[str, str] = {}

# Commands that end in a one-line refusal in this workspace, with the line's start.
REFUSED = {"python scripts/trackio_delete.py 'tune_.*' --dry-run": (2, "error: no run in project 'denoising-zoo' matches")}

# Files the docs' commands read that a user brings along.
USER_FILES: dict[str, Callable[[Path], None]] = {
    # dataloaders=points with dataloaders.data_shape=[3]: an (N, 3) array
    "pts.npy": lambda path: np.save(path, np.random.default_rng(0).normal(size=(1024, 3)).astype(np.float32)),
}

EVAL_SMALL = ["eval.num_samples=200", "eval.repeats=1"]
TIMEOUT = 300


@dataclass(frozen=True)
class Command:
    source: str  # "README.md:17"
    argv: tuple[str, ...]
    kind: str  # run | cfg | help | collect | syntax
    cwd: str = "."  # inside the working copy
    env: tuple[tuple[str, str], ...] = ()
    why: str = ""  # a cheap form: why the command itself is not run

    @property
    def text(self) -> str:
        words = [f"{k}={v}" for k, v in self.env] + [shlex.quote(a) for a in self.argv]
        return " ".join(words) if self.cwd == "." else f"cd {self.cwd} && {' '.join(words)}"

    @property
    def is_launcher(self) -> bool:
        return self.argv[:2] == ("python", "launcher.py")


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    created: set[Path] = field(default_factory=set)  # files that appeared under outputs/, relative to it
    present: set[Path] = field(default_factory=set)  # every file under outputs/ afterwards


def doc_lines() -> list[tuple[str, str]]:
    """(``FILE:LINE``, command) of every line of the docs' bash blocks; ``\\`` joins lines."""
    found = []
    for name in DOCS:
        in_block, pending, start = False, "", 0
        for number, line in enumerate((REPO / name).read_text().splitlines(), 1):
            if line.strip().startswith("```"):
                in_block = not in_block and line.strip() == "```bash"
                continue
            if not in_block or not line.strip():
                continue
            start = start if pending else number
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            found.append((f"{name}:{start}", pending + line))
            pending = ""
    return found


def is_optional(token: str) -> bool:
    """A synopsis token: ``[--quick]``, ``[key=value``, ``...]``, ``...``, ``{0|1}``."""
    return token.startswith("[") or token.endswith("]") and "[" not in token or "..." in token or "{" in token and "|" in token


def cheap_form(tokens: list[str]) -> tuple[tuple[str, ...], str] | None:
    """What runs for a command that is not run: (argv, kind); None where nothing stands in
    (environment set-up, the whole suite)."""
    if tokens[0] in ("python", "python3") and tokens[1:2] == ["launcher.py"] or tokens[0] == "torchrun":
        args = tokens[tokens.index("launcher.py") + 1:]
        kept = [a for a in drop_optional(args) if a != "--cfg"]
        return ("python", "launcher.py", *kept, "--cfg"), "cfg"
    if tokens[0] in ("python", "python3") and tokens[1:3] == ["-m", "pytest"]:
        return (("python", *tokens[1:], "--collect-only", "-q"), "collect") if tokens[3:] else None
    if tokens[0] in ("python", "python3") and tokens[1].endswith(".py"):
        return ("python", tokens[1], "--help"), "help"
    if tokens[0].startswith("./") and tokens[0].endswith(".sh"):
        return (tokens[0], "--help"), "help"
    if tokens[0] == "bash":
        return ("bash", "-n", *tokens[1:]), "syntax"
    return None


def drop_optional(tokens: list[str]) -> list[str]:
    kept, depth = [], 0
    for token in tokens:
        if token.startswith("["):
            depth += 1
        if depth == 0 and not is_optional(token):
            kept.append(token)
        if token.endswith("]") and depth:
            depth -= 1
    return kept


def shrunk(args: list[str]) -> list[str]:
    """A launcher run made small; an evaluation takes only eval.* (and a few others)."""
    if "--cfg" in args:
        return args
    if any(a.startswith("eval_checkpoint=") for a in args):
        return [*args, *EVAL_SMALL]
    if "resume=true" in args:  # continues the shrunk run past its end
        return [*args, "epochs=2", "max_steps=8", *EVAL_SMALL]
    return [*args, "epochs=1", "max_steps=4", *EVAL_SMALL]


def split_and(tokens: list[str]) -> list[list[str]]:
    parts = [[]]
    for token in tokens:
        parts.append([]) if token == "&&" else parts[-1].append(token)
    return parts


def plan() -> tuple[list[Command], list[tuple[str, str, str]]]:
    """The commands to run, in order; and the doc commands that nothing stands in for
    (environment set-up), as (source, text, why)."""
    commands: dict[tuple, Command] = {}
    unrun: list[tuple[str, str, str]] = []
    for source, line in doc_lines():
        cwd = "."
        for words in split_and([PLACEHOLDER.sub(PLACEHOLDER_RUN, t) for t in shlex.split(line, comments=True)]):
            if words[0] == "cd":  # cd DIR && COMMAND: the command runs in DIR
                cwd = words[1]
                continue
            env = tuple(tuple(w.split("=", 1)) for w in words if re.fullmatch(r"[A-Z_]+=\S*", w))
            words = words[len(env):]
            text = " ".join(shlex.quote(w) for w in words)
            why = next((reason for pattern, reason in NOT_RUN if re.search(pattern, text)), None)
            if why is None and any(map(is_optional, words)):
                why = "a synopsis: the options in [ ] are the user's to choose"
            if why is None:
                program = ("python", *words[1:]) if words[0] == "python3" else tuple(words)
                if program[:2] == ("python", "launcher.py"):
                    program = (*program[:2], *shrunk(list(program[2:])))
                command = Command(source, program, "run", cwd, env)
            elif (cheap := cheap_form(words)) is None:
                unrun.append((source, text, why))
                continue
            else:
                command = Command(source, cheap[0], cheap[1], cwd, env, why)
            commands.setdefault((command.argv, command.cwd, command.env), command)
    ordered = list(commands.values())
    for needs, given in RUN_AFTER.items():
        first = next(i for i, c in enumerate(ordered) if needs in c.text)
        prerequisite = next(i for i, c in enumerate(ordered) if given in c.text)
        if first < prerequisite:
            ordered.insert(prerequisite, ordered.pop(first))
    return ordered, unrun


COMMANDS, UNRUN = plan()
SCRIPTS = sorted(p.relative_to(REPO).as_posix() for folder in ("scripts", "visualizers") for p in (REPO / folder).glob("*.py"))


def copy_ignores(folder: str, names: list[str]) -> set[str]:
    """What a fresh checkout lacks: the environment, results and data at the top, caches anywhere."""
    top = {".git", ".venv", "venv", "outputs", "data", "trackio"} if Path(folder) == REPO else set()
    return {n for n in names if n in top or n in ("__pycache__", ".pytest_cache", ".ruff_cache") or n.endswith(".egg-info")}


def user_env(workspace: Path) -> dict[str, str]:
    """An activated environment: a ``python`` that is this interpreter first on PATH."""
    shims = workspace.parent / "bin"
    shims.mkdir(exist_ok=True)
    for name in ("python", "python3"):
        shim = shims / name
        shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
        shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DZ_TRACEBACK")}
    return env | {"PATH": f"{shims}{os.pathsep}{env.get('PATH', '')}", "TRACKIO_DIR": str(workspace.parent / "trackio"),
                  "OMP_NUM_THREADS": "1"}  # one thread a process: two run at a time on a 2-core box


def outputs(workspace: Path) -> set[Path]:
    root = workspace / "outputs"
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def relative_layout(run: str) -> RunLayout:
    """Run ``run``'s files relative to its output folder, as ``outputs`` lists them (the
    architecture names no folder of an evaluation, a plot or an export)."""
    return RunLayout(Path(), "mlp", run)


def execute(command: Command, workspace: Path, env: dict[str, str], cwd: Path | None = None) -> Outcome:
    before = outputs(workspace)
    try:  # no terminal to answer a prompt; a command that never ends is a failure of its own test
        result = subprocess.run(list(command.argv), cwd=cwd or workspace / command.cwd, env=env | dict(command.env),
                                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        return Outcome(-1, "", f"still running after {TIMEOUT} s (killed): shrink it, or list it in NOT_RUN")
    after = outputs(workspace)
    return Outcome(result.returncode, result.stdout, result.stderr, after - before, after)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, Outcome]:
    """Runs everything once: the doc runs in order in one lane, the cheap forms and the
    scripts-as-files in the other (nothing of theirs writes into the copy)."""
    root = tmp_path_factory.mktemp("readme")
    workspace = root / "repo"
    shutil.copytree(REPO, workspace, ignore=copy_ignores)
    for name, write in USER_FILES.items():
        write(workspace / name)
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    env = user_env(workspace)
    results: dict[str, Outcome] = {}
    lock = threading.Lock()

    def run_in_order() -> None:
        for command in COMMANDS:
            if command.kind == "run":
                outcome = execute(command, workspace, env)
                with lock:
                    results[command.text] = outcome

    def run_one(key: str, command: Command, cwd: Path | None = None) -> None:
        outcome = execute(command, workspace, env, cwd)
        with lock:
            results[key] = outcome

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(run_in_order)]
        futures += [pool.submit(run_one, c.text, c) for c in COMMANDS if c.kind != "run"]
        futures += [pool.submit(run_one, f"file:{s}", Command("", ("python", str(REPO / s), "--help"), "help"), elsewhere)
                    for s in SCRIPTS]
        for future in futures:
            future.result()
    return results


def check_clean(outcome: Outcome) -> None:
    assert "Traceback" not in outcome.stderr, outcome.stderr[-3000:]


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.source} {c.text}" for c in COMMANDS])
def test_doc_command(command: Command, outcomes: dict[str, Outcome]) -> None:
    outcome = outcomes[command.text]
    check_clean(outcome)
    if command.kind == "run" and command.text in REFUSED:
        code, start = REFUSED[command.text]
        assert (outcome.returncode, last_line(outcome.stderr)[:len(start)]) == (code, start), outcome.stderr
        return
    assert outcome.returncode == 0, f"exit {outcome.returncode}\n{outcome.stdout[-2000:]}\n{outcome.stderr[-3000:]}"
    if command.kind == "cfg":
        assert re.search(r"^run_name: \S", outcome.stdout, re.MULTILINE), outcome.stdout[:2000]
    elif command.kind == "help":
        assert "usage:" in outcome.stdout, outcome.stdout
    elif command.kind == "collect":
        assert re.search(r"^tests/\S+\.py", outcome.stdout, re.MULTILINE), outcome.stdout[-2000:]  # pytest exits 5 with none
    elif command.is_launcher and any(a.startswith("eval_checkpoint=") for a in command.argv):
        assert [f for f in outcome.created if f.suffix == ".json" and f.parent == relative_layout(f.parent.name).eval_dir], \
            sorted(outcome.created)
    elif command.is_launcher:  # a training run: its last epoch's line, and its checkpoint
        run = next(a.partition("=")[2] for a in command.argv if a.startswith("run_name="))
        assert re.search(r"^epoch (\d+)/\1 step \d+ ", outcome.stdout, re.MULTILINE), outcome.stdout[-2000:]
        ckpts = ckpt_root(Path())  # relative to the output folder, as outcome.present
        assert run in run_names([f.relative_to(ckpts) for f in outcome.present if f.is_relative_to(ckpts)]), sorted(outcome.present)
    elif command.argv[:2] == ("python", "scripts/export.py"):
        run = command.argv[2]
        folder = relative_layout(run).export_dir()
        assert {folder / EXPORT_WEIGHTS, folder / EXPORT_CONFIG} <= outcome.created, sorted(outcome.created)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_runs_as_a_file_from_another_folder(script: str, outcomes: dict[str, Outcome]) -> None:
    """``python /path/to/repo/scripts/X.py --help`` from outside the repository: the
    script's own folder, not the repo root, is what Python puts on sys.path."""
    outcome = outcomes[f"file:{script}"]
    check_clean(outcome)
    assert outcome.returncode == 0, outcome.stderr[-3000:]
    if "__main__" in (REPO / script).read_text():  # a command line: its usage; a module only imports
        assert "usage:" in outcome.stdout, outcome.stdout


def test_the_docs_were_read_and_every_exception_still_applies() -> None:
    """The parser found the quick start; each NOT_RUN entry, RUN_AFTER pair and REFUSED
    command still matches a command of the docs (a stale entry would hide a new one)."""
    texts = [c.text for c in COMMANDS] + [text for _, text, _ in UNRUN]
    assert "python launcher.py run_name=demo epochs=1 max_steps=4 " + " ".join(EVAL_SMALL) in texts
    applied = {c.why for c in COMMANDS} | {why for _, _, why in UNRUN}
    for pattern, why in NOT_RUN:
        assert why in applied, f"NOT_RUN entry {pattern!r} matches no command of {DOCS}: remove it"
    for needs, given in RUN_AFTER.items():
        assert any(needs in t for t in texts) and any(given in t for t in texts), (needs, given)
    assert set(REFUSED) <= {c.text for c in COMMANDS if c.kind == "run"}, sorted(REFUSED)
