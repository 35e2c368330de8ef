"""scripts/compare.py on a real sweep: two settings (experiment=demo_meanflow, demo_imf) x two
seeds of tiny runs trained by the launcher, compared against numbers read from the
checkpoints here; the interval against printed Student-t quantiles; one-line refusals."""

import math
import shutil
import statistics
from pathlib import Path

import pytest
import torch
from PIL import Image

import launcher
from scripts.compare import Run, columns, group_runs, interval, main
from tests.conftest import TINY_OVERRIDES, run_layout

# t(0.975, dof) from a printed table (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2).
T975 = {1: 12.706, 2: 4.303, 4: 2.776}
SETTINGS = {"demo_meanflow": "loss=meanflow", "demo_imf": "loss=imf"}
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """The output folder of four finished runs, evaluated at both of their epochs."""
    output_dir = tmp_path_factory.mktemp("sweep") / "outputs"
    for experiment in SETTINGS:
        for seed in SEEDS:
            args = [f"run_name=cmp_{experiment}_s{seed}", f"experiment={experiment}", f"seed={seed}", *TINY_OVERRIDES,
                    "epochs=2", "eval.every_epochs=1", "eval.plot=false", f"output_dir={output_dir}"]
            assert launcher.main(args) == 0
    return output_dir


def stored(output_dir: Path, run: str) -> dict:
    return torch.load(run_layout(output_dir, run).last, weights_only=True)


def table_rows(text: str) -> dict[str, dict[str, str]]:
    """The markdown table's rows: group label -> {heading: cell}."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    headings = [h.strip() for h in lines[0].strip("|").split("|")]
    rows = [dict(zip(headings, (c.strip() for c in line.strip("|").split("|")))) for line in lines[1:]]
    return {row["group"]: row for row in rows}


def run_compare(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_interval_matches_printed_t_quantiles():
    for values in ([1.0, 2.0], [1.0, 2.0, 4.0], [0.3, 0.1, 0.4, 0.1, 0.5]):
        n = len(values)
        mean, half = interval(values)
        s = math.sqrt(sum((v - sum(values) / n) ** 2 for v in values) / (n - 1))
        assert mean == pytest.approx(sum(values) / n)
        assert half == pytest.approx(T975[n - 1] * s / math.sqrt(n), rel=1e-3)
    assert interval([0.7]) == (0.7, None)


def test_label_names_the_fewest_keys_that_tell_groups_apart():
    def run(name: str, seed: int, **config) -> Run:
        return Run(name, Path(name), {"seed": seed, "run_name": name, "output_dir": f"/o/{seed}", **config}, {}, [])

    mf = {"loss.name": "meanflow", "loss._target_": "losses.meanflow_loss.MeanFlowLoss", "eval.repeats": 16}
    imf = {"loss.name": "imf", "loss._target_": "losses.imf_loss.IMFLoss", "eval.repeats": 4}
    runs = [run("a", 0, **mf, **{"loss.p": 0.5}), run("b", 1, **mf, **{"loss.p": 0.5}),
            run("c", 0, **mf, **{"loss.p": 1.0}), run("d", 0, **imf, **{"loss.p": 1.0})]
    groups = group_runs(runs)
    assert [(g.label, [r.name for r in g.runs]) for g in groups] == [
        ("loss=imf loss.p=1.0", ["d"]), ("loss=meanflow loss.p=0.5", ["a", "b"]), ("loss=meanflow loss.p=1.0", ["c"])]
    assert groups[0].settings == ["eval.repeats=4", "loss._target_=losses.imf_loss.IMFLoss", "loss=imf", "loss.p=1.0"]


def test_consistency_sampling_has_columns_of_its_own():
    """``eval.consistency_steps`` scores (``..._{k}step_consistency``) are columns beside the jump
    chain's, each with its own value; time-list grids (not a step count) are not taken for one."""
    metrics = {"eval/energy_distance_1step": 0.3, "eval/energy_distance_2step": 0.2,
               "eval/energy_distance_2step_consistency": 0.1, "eval/energy_distance_2step_t0-0.45-1": 0.4,
               "eval/energy_distance_2step_t0-0.45-1_consistency": 0.4,
               "eval/energy_distance": 0.05, "eval/nfe": 100.0, "eval/energy_distance_floor": 0.01}
    run = Run("a", Path("a"), {"seed": 0}, metrics, [])
    cols = columns([run], "energy_distance")
    assert [(c.heading, c.value(run)) for c in cols] == [
        ("NFE 1", 0.3), ("NFE 2", 0.2), ("NFE 2 consistency", 0.1), ("solver", 0.05), ("solver NFE", 100.0),
        ("floor", 0.01)]


def test_table_and_figures_match_the_stored_numbers(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    code, text, err = run_compare(capsys, "cmp_*", "--output-dir", sweep, "--out", out)
    assert code == 0, err
    assert (out / "report.md").read_text() == text
    rows = table_rows(text)
    assert set(rows) == set(SETTINGS.values())
    for experiment, label in SETTINGS.items():
        row = rows[label]
        assert row["n"] == str(len(SEEDS))
        states = [stored(sweep, f"cmp_{experiment}_s{seed}") for seed in SEEDS]
        assert all(s["metrics"]["step"] == s["step"] == 16 for s in states)
        columns = {"NFE 1": "eval/energy_distance_1step", "NFE 2": "eval/energy_distance_2step",
                   "solver": "eval/energy_distance", "floor": "eval/energy_distance_floor"}
        for heading, key in columns.items():
            values = [s["metrics"][key] for s in states]
            mean, half = (float(part) for part in row[heading].split(" ± "))
            assert mean == pytest.approx(statistics.mean(values), rel=1e-3)
            assert half == pytest.approx(T975[1] * statistics.stdev(values) / math.sqrt(2), rel=0.06)
        assert row["solver NFE"] == "10"  # euler, eval.steps=10
        assert float(row["peak MiB"].split(" ± ")[0]) > 0 and float(row["samples/s"].split(" ± ")[0]) > 0
    assert rows["loss=meanflow"]["NFE 4"] == "—" and " ± " in rows["loss=imf"]["NFE 4"]  # demo_imf adds 4 steps
    for figure in ("score_vs_nfe.png", "score_vs_step.png"):  # evaluated at epochs 1 and 2: a curve over steps
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(out / figure) as image:
            image.verify()


def test_one_run_shows_its_value_and_n1(sweep, capsys):
    code, text, err = run_compare(capsys, "cmp_demo_imf_s1", "--output-dir", sweep)
    assert code == 0, err
    (row,) = table_rows(text).values()
    value = stored(sweep, "cmp_demo_imf_s1")["metrics"]["eval/energy_distance_1step"]
    assert row["n"] == "1" and row["NFE 1"].endswith(" (n=1)")
    assert float(row["NFE 1"].removesuffix(" (n=1)")) == pytest.approx(value, rel=1e-3)


def copy_run(sweep: Path, root: Path, run: str, name: str) -> Path:
    target = run_layout(root, name).last
    target.parent.mkdir(parents=True)
    shutil.copy(run_layout(sweep, run).last, target)
    return target


def test_refusals_are_one_line(sweep, tmp_path, capsys):
    def refused(*argv) -> str:
        code, out, err = run_compare(capsys, *argv)
        assert code == 2 and out == "" and len(err.splitlines()) == 1 and err.startswith("error: "), (code, out, err)
        return err

    assert "no run matches 'nope*'" in refused("nope*", "--output-dir", sweep)
    assert "records no eval/fid score" in refused("cmp_*", "--output-dir", sweep, "--metric", "fid")
    broken = tmp_path / "broken"
    copy_run(sweep, broken, "cmp_demo_imf_s0", "cut").write_bytes(b"not a checkpoint")
    assert "is not a readable torch checkpoint" in refused("cut", "--output-dir", broken)
    twin = tmp_path / "twin"
    for name in ("a", "b"):
        copy_run(sweep, twin, "cmp_demo_imf_s0", name)
    assert "share every setting and seed=0" in refused("a", "b", "--output-dir", twin)
    unfinished = tmp_path / "unfinished"
    path = copy_run(sweep, unfinished, "cmp_demo_imf_s0", "half")
    state = torch.load(path, weights_only=True)
    torch.save(state | {"epoch": 1, "step": 8}, path)
    assert "run 'half' is unfinished (epoch 1 of epochs=2" in refused("half", "--output-dir", unfinished)
