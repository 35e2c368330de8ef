"""scripts/benchmark.py runs as a file in its quick mode and prints well-formed tables.

The timings depend on the machine and its load, so nothing is asserted about their size
beyond being positive numbers; the CPU memory column must hold what the steps allocate.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def parse_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """Markdown tables by the ``## `` heading above them, each as a list of row dicts."""
    tables: dict[str, list[dict[str, str]]] = {}
    heading, header, rows = None, None, None
    for line in text.splitlines():
        if line.startswith("#"):
            heading, header = line.lstrip("#").strip(), None
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header, rows = cells, []
                tables[heading] = rows
            elif not all(set(c) <= {"-", " "} for c in cells):
                assert len(cells) == len(header), f"ragged row under {heading!r}: {line}"
                rows.append(dict(zip(header, cells)))
        else:
            header = None
    return tables


@pytest.mark.slow
def test_quick_benchmark_tables(tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    cmd = [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--quick", "--models", "mlp", "--repeats", "2",
           "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tables = parse_tables(out.read_text())

    steps = tables["Training step"]
    assert {r["loss"] for r in steps} == {"mse", "meanflow-fused", "meanflow-separate"}
    for r in steps:
        assert float(r["median ms/step"]) > 0 and float(r["samples/s"]) > 0
        # The probed steps allocate the gradients and Adam's two moments after the baseline
        # is read, in fresh pages (the probe's glibc unmaps freed blocks): three fp32 copies
        # of the weights at least.
        weights_mib = float(r["params"].removesuffix("M")) * 1e6 * 4 / 2**20
        assert float(r["peak MiB (RSS growth)"]) >= 3 * weights_mib, r

    (ratio,) = tables["MeanFlow over flow matching"]
    for key in ("fused / FM (IQR)", "separate / FM (IQR)"):
        median, spread = ratio[key].split(" ")  # "<median>x (<q1>-<q3>)"
        lo, hi = (float(v) for v in spread.strip("()").split("-"))
        assert 0 < lo <= float(median.removesuffix("x")) <= hi
    for key in ("fused best / FM best", "separate best / FM best", "fused memory / FM", "separate memory / FM"):
        assert float(ratio[key].removesuffix("x")) > 0

    sampling = tables["Sampling"]
    assert {r["sampler"] for r in sampling} == {"euler", "midpoint", "heun", "rk4", "meanflow"}
    assert {r["precision"] for r in steps} == {"fp32"}
    for r in sampling:
        assert float(r["median ms"]) > 0
        assert int(r["NFE"]) >= int(r["steps"])


def test_cuda_preset_refuses_to_run_without_a_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the preset would run")
    cmd = [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--device", "cuda", "--preset", "cuda"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "CUDA is not available here" in proc.stderr


def test_cuda_preset_covers_the_gpu_table() -> None:
    from scripts.benchmark import parse_args

    args = parse_args(["--preset", "cuda"])  # the device check only runs for --device cuda
    assert args.models == ["unet_cifar", "dit_b2"] and args.compile and args.precision == ["fp32", "bf16"]
    assert args.time_limit > 0


def test_imf_over_meanflow_rounds_and_table() -> None:
    """The iMF step with its head and MeanFlow's on the same trunk, one each per round."""
    from scripts.benchmark import bench_imf, imf_table, imf_variants

    result = bench_imf("mlp", imf_variants("mlp")[0], torch.device("cpu"), "fp32", repeats=2, block_s=0.0)
    assert result.params[1] > result.params[0]  # the head's own output layer
    assert len(result.times[0]) == len(result.times[1]) == 2 and min(min(t) for t in result.times) > 0
    (row,) = parse_tables("## t\n" + imf_table([result]))["t"]
    median, spread = row["iMF / MeanFlow (IQR)"].split(" ")
    lo, hi = (float(v) for v in spread.strip("()").split("-"))
    assert 0 < lo <= float(median.removesuffix("x")) <= hi and row["auxiliary head"] == "second output layer"


def test_imf_variants_split_a_dit_as_the_reference_does() -> None:
    from scripts.benchmark import imf_variants

    assert imf_variants("unet_cifar") == [("second output layer", {"aux_head": True})]
    assert imf_variants("dit_s2")[1] == ("4 shared + 8 u + 8 v blocks", {"aux_head": True, "aux_depth": 8})  # iMF's B/2 split
