"""scripts/experiment_log.py on a real, temporary trackio store (written by
``trackio.init / log / finish`` in a subprocess, TRACKIO_DIR set before import)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMAND = "python launcher.py run_name=mlp_moons model=mlp dataloaders=moons epochs=3"

MAKE_STORE = f"""
import trackio
config = {{"run_name": "mlp_moons", "model": {{"name": "mlp", "hidden": 64}}, "loss": {{"name": "mse"}},
           "optimizer": {{"lr": 0.001}}, "command": {COMMAND!r}}}
import numpy as np
from PIL import Image
Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save("samples.png")
trackio.init(project="denoising-zoo", name="mlp_moons", config=config)
for epoch in range(3):
    trackio.log({{"epoch": epoch, "train/loss": 1.0 / (epoch + 1), "train/lr": 1e-3,
                 "eval/energy_distance": 0.5 / (epoch + 1), "eval/energy_distance_floor": 0.0021,
                 "eval/samples": trackio.Image("samples.png")}})  # media, as train.py logs plots
trackio.finish()
trackio.init(project="denoising-zoo", name="mlp_overrides",
             config={{"run_name": "mlp_overrides", "overrides": ["model=mlp", "epochs=2"]}})
for epoch in range(30):
    trackio.log({{"epoch": epoch, "train/loss": 1.0}})
trackio.finish()
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("trackio")
    env = {**os.environ, "TRACKIO_DIR": str(store)}
    subprocess.run([sys.executable, "-c", MAKE_STORE], env=env, check=True, capture_output=True, cwd=store)
    return store


def experiment_log(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "experiment_log.py"), *args],
        env={**os.environ, "TRACKIO_DIR": str(store)},
        capture_output=True,
        text=True,
        cwd=REPO,
    )


def section(markdown: str, heading: str) -> str:
    return markdown.split(f"### {heading}\n", 1)[1].split("\n### ", 1)[0]


def test_entry_has_the_log_sections_config_command_and_results(store):
    result = experiment_log(store, "mlp_moons")
    assert result.returncode == 0, result.stderr
    md = result.stdout
    assert md.startswith("## ") and "mlp_moons" in md.splitlines()[0]
    headings = [line for line in md.splitlines() if line.startswith("### ")]
    assert headings == ["### Config", "### Command", "### Expected outcome", "### Results", "### Observations"]

    config = section(md, "Config")
    assert "hidden: 64" in config and "lr: 0.001" in config and "_Created" not in config
    assert COMMAND in section(md, "Command")

    table = [line for line in section(md, "Results").splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header == ["epoch", "step", "train/loss", "eval/energy_distance", "eval/energy_distance_floor"]
    assert len(table) == 2 + 3  # header, rule, one row per epoch
    assert table[2].split("|")[1].strip() == "0" and "0.5" in table[2]
    last = [cell.strip() for cell in table[-1].strip("|").split("|")]
    assert last == ["**2**", "**2**", "**0.3333**", "**0.1667**", "**0.0021**"]


def test_command_rebuilt_from_overrides_and_long_runs_thinned(store):
    result = experiment_log(store, "mlp_overrides", "--max-rows", "5")
    assert result.returncode == 0, result.stderr
    assert "python launcher.py run_name=mlp_overrides model=mlp epochs=2" in section(result.stdout, "Command")
    rows = [line for line in section(result.stdout, "Results").splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 5
    assert rows[0].startswith("| 0 |") and rows[-1].startswith("| **29** |")
    assert "5 of 30 logged epochs" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [(["no_such_run"], "no run 'no_such_run'"), (["mlp_moons", "--project", "nope"], "no trackio project 'nope'")],
)
def test_unknown_run_or_project_is_one_line_error(store, args, message):
    result = experiment_log(store, *args)
    assert result.returncode == 2
    assert result.stdout == "" and result.stderr.count("\n") == 1 and message in result.stderr
