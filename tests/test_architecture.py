"""The house's rooms: imports only run down the layers, and a new loss is one file and
one yaml (the loop and the evaluator need no edit for it)."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runs.layout import ARCHIVE, CKPTS, EXPORTS, LAST
from tests.conftest import LAUNCHER, REPO, TINY_OVERRIDES, launcher_env, run_layout

# Lower layers never import higher ones; a package may import itself.
LAYERS = {
    "runs": 0,
    "models": 1,
    "dataloaders": 2,
    "helpers_cfg": 3,
    "solvers": 4,
    "losses": 5,
    "evaluation": 6,
    "train": 7,
    "scripts": 8,
    "visualizers": 8,
    "config_checks": 8,
    "launcher": 9,
}


def project_imports() -> dict[str, set[str]]:
    """Module name (``losses.base_loss``) -> the project modules it imports, at any depth
    of the file (function-level imports count: they run back up the layers just the same)."""
    graph = {}
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO)
        if rel.parts[0] not in LAYERS and rel.stem not in LAYERS:
            continue
        name = ".".join(rel.with_suffix("").parts)
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
        graph[name] = {m for m in found if m.split(".")[0] in LAYERS}
    return graph


def test_imports_run_down_the_layers_only():
    graph = project_imports()
    assert "train" in graph and "losses.base_loss" in graph and "launcher" in graph
    upward = [
        f"{module} imports {target}"
        for module, targets in graph.items()
        for target in targets
        if LAYERS[target.split(".")[0]] > LAYERS[module.split(".")[0]]
    ]
    assert not upward, upward


def test_no_import_cycles():
    graph = project_imports()
    known = {m: {t for t in ts if t in graph} for m, ts in graph.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in known[module]:
            if state.get(target) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(target):], target]))
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in known:
        if module not in state:
            visit(module, [module])


def test_train_py_is_a_loop_only():
    """Under 350 lines, and its code (not its comments) names no loss, model or data set."""
    source = (REPO / "train.py").read_text()
    assert len(source.splitlines()) < 350
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node) is not None}
    words = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
             and id(node) not in docstrings]
    words += [node.id for node in ast.walk(tree) if isinstance(node, ast.Name)]
    words += [node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)]
    tokens = {token for w in words for token in re.split(r"[^a-z0-9]+", w.lower())}
    named = tokens & {"meanflow", "mse", "kmeans", "digits", "cifar10", "imagenet", "mlp", "unet", "dit"}
    assert not named, f"train.py's code names {sorted(named)}"


TOY_LOSS = '''
"""A toy loss for a test: flow matching with t ~ U[0.1, 0.9], sampled on its own
non-uniform Euler grid (denser near the data)."""

import torch

from losses.base_loss import BaseLoss
from solvers.sampling import Sampler


class DenseNearDataEuler(Sampler):
    metric = "toy"

    def __init__(self, steps: int) -> None:
        self.grid = torch.linspace(0, 1, steps + 1) ** 0.5
        self.nfe = steps

    def __call__(self, model, x0, label):
        x = x0
        for a, b in zip(self.grid[:-1], self.grid[1:]):
            t = torch.full((x.shape[0],), float(a))
            z = torch.cat([x, t[:, None], t[:, None]], dim=1)
            x = x + (b - a) * model(z, label)
        return x


class ToyLoss(BaseLoss):
    def __init__(self, lo: float, hi: float, steps: int) -> None:
        super().__init__()
        self.lo, self.hi, self.steps = lo, hi, steps

    def forward(self, model, batch):
        t = self.lo + (self.hi - self.lo) * torch.rand(len(batch))
        item = batch.at_time(t)
        error = (model(item.unified_input) - item.target).pow(2)
        self.metrics = {"worst": error.detach().flatten(1).sum(1).max()}
        return error.mean()

    def samplers(self, eval_cfg, solver_cfg, num_classes):
        return {"toy": DenseNearDataEuler(self.steps)}
'''


@pytest.mark.slow
def test_a_new_loss_is_one_file_and_one_yaml(tmp_path):
    """The test adds a loss file to ``losses/`` and its yaml to ``configs/loss/`` (and
    removes them afterwards), as a researcher would; nothing else changes. The run
    trains, evaluates with the loss's own sampler and logs the loss's own metric."""
    module, config = REPO / "losses" / "toy_test_loss.py", REPO / "configs" / "loss" / "toy_test.yaml"
    assert not module.exists() and not config.exists()
    module.write_text(TOY_LOSS)
    config.write_text("name: toy\n_target_: losses.toy_test_loss.ToyLoss\nlo: 0.1\nhi: 0.9\nsteps: 12\n")
    try:
        out = tmp_path / "outputs"
        args = [*TINY_OVERRIDES, "run_name=toy", "loss=toy_test", "epochs=2", f"output_dir={out}"]
        result = subprocess.run([sys.executable, str(LAUNCHER), *args], cwd=tmp_path, env=launcher_env(),
                                capture_output=True, text=True, timeout=300)
    finally:
        module.unlink()
        config.unlink()
    assert result.returncode == 0, result.stderr[-2000:]
    state = torch.load(run_layout(out, "toy").last, weights_only=True)
    metrics = state["metrics"]
    assert metrics["eval/nfe_toy"] == 12 and metrics["eval/energy_distance_toy"] > 0
    assert "eval/energy_distance" not in metrics  # only the samplers the loss names
    assert "worst=" in result.stdout  # the loss's own metric reaches the log
    assert state["config"]["loss"] == {"name": "toy", "_target_": "losses.toy_test_loss.ToyLoss", "lo": 0.1, "hi": 0.9, "steps": 12}


def code_strings(path: Path) -> list[str]:
    """The string constants of a file's code, its docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node) is not None}
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_models_hold_networks_only():
    """``models/`` defines no error type or exit status and reads or writes no file: the
    run's machinery lives in ``runs/``."""
    found = []
    for path in sorted((REPO / "models").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any(isinstance(b, ast.Name) and b.id.endswith(("Error", "Exception")) for b in node.bases):
                found.append(f"{path.name}: class {node.name}")
            if isinstance(node, ast.Attribute) and node.attr in ("save", "load", "exit_code") and getattr(node.value, "id", "") in ("torch", "self", "err"):
                found.append(f"{path.name}: {node.value.id}.{node.attr}")
            if isinstance(node, ast.Name) and node.id in ("open", "exit"):
                found.append(f"{path.name}: {node.id}")
    assert not found, found


FOLDER_NAMES = (CKPTS, ARCHIVE, LAST)  # alone in a string: a path segment (``export`` and ``plots`` are also words)
LAYOUT_WORDS = re.compile(rf"(^|/)({'|'.join(map(re.escape, (*FOLDER_NAMES, EXPORTS, 'plots')))})(/|$)")


def test_one_file_spells_the_run_layout():
    """Only ``runs/layout.py`` names the run's folders and files in code; every script,
    visualizer and test asks it (``RunLayout``, ``ckpt_root``). Docstrings and help texts
    that show a user a path are documentation, not code, and may."""
    spelled = []
    for path in sorted(REPO.rglob("*.py")):
        rel = path.relative_to(REPO)
        if rel.parts[0] in (".venv", "venv") or rel == Path("runs/layout.py"):
            continue
        for text in code_strings(path):
            if " " not in text and (text in FOLDER_NAMES or ("/" in text and LAYOUT_WORDS.search(text))):  # a path, not a sentence
                spelled.append(f"{rel}: {text!r}")
    assert not spelled, spelled
