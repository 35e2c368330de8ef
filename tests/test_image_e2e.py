"""The image path end to end through ``launcher.py``: the digits MeanFlow preset, shrunk to
a 2-epoch run of a tiny class-conditional UNet, writes a checkpoint, a sample grid PNG and
finite FIDs (checkpoint and trackio agree), and ``eval_checkpoint`` reproduces the FID."""

import json
import math

import pytest
import torch
from PIL import Image

from tests.conftest import launch, run_layout
from tests.test_launcher import by_epoch, read_trackio

pytestmark = pytest.mark.slow

RUN = "digits_e2e"
SAMPLES = 64  # eval samples per sampler: a full 8 x 8 grid
OVERRIDES = [
    "experiment=digits_meanflow",
    "epochs=2",
    "model.model_channels=16",
    "eval.every_epochs=2",
    f"eval.num_samples={SAMPLES}",
    f"eval.fid.num_samples={SAMPLES}",
    "eval.steps=4",  # the solver variant beside the 1- and 2-step samplers; few steps keep it fast
    "checkpoint.every_epochs=2",
    "checkpoint.archive_every_epochs=0",
]


def grid_size(num_variants: int, images: int, side: int, nrow: int = 8, pad: int = 1, gap: int = 4) -> tuple[int, int]:
    """(width, height) of train.save_grid's PNG: per sampler an ``nrow``-column grid with
    ``pad``-pixel borders (torchvision's make_grid), ``gap`` pixels to its right."""
    rows = math.ceil(images / nrow)
    return num_variants * (nrow * (side + pad) + pad + gap), rows * (side + pad) + pad


def test_digits_meanflow_run_writes_grid_and_fid(tmp_path) -> None:
    out, store = tmp_path / "outputs", tmp_path / "trackio"
    store.mkdir()
    result = launch([f"run_name={RUN}", *OVERRIDES, f"output_dir={out}"], cwd=tmp_path, trackio_dir=store, timeout=480)
    assert result.returncode == 0, result.stderr[-3000:]

    run = run_layout(out, RUN, arch="unet")
    last = run.last
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["epoch"] == 2 and state["step"] == 2 * (1437 // 128)  # 80% of 1797 digits, batch 128
    assert state["config"]["model"]["num_classes"] == 10 and state["config"]["loss"]["name"] == "meanflow"
    metrics = state["metrics"]
    for key in ("eval/fid_1step", "eval/fid_2step"):
        assert math.isfinite(metrics[key]) and metrics[key] > 0, (key, metrics[key])
    assert "eval/fid" not in metrics  # a MeanFlow run scores its k-step samplers, not the solver

    # One grid per sampler (euler4, meanflow1, meanflow2), 64 digits of 8 x 8 each.
    plot = run.plot(2)
    with Image.open(plot) as image:
        assert image.size == grid_size(3, SAMPLES, 8)
        assert image.mode == "RGB"

    logged = by_epoch(read_trackio(store, RUN)["logs"])[2]
    for key in ("eval/fid_1step", "eval/fid_2step", "eval/energy_distance_1step"):
        assert logged[key] == pytest.approx(metrics[key], rel=1e-9), key

    # eval_checkpoint rebuilds the UNet from the checkpoint's config alone; the fixed
    # noise generators make its numbers those of the run at that epoch.
    evaluated = launch([f"eval_checkpoint={last}", f"output_dir={tmp_path / 'eval_out'}", "device=cpu"], cwd=tmp_path, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    (written_path,) = run_layout(tmp_path / "eval_out", RUN, arch="unet").eval_dir.glob("epoch_0002_*.json")
    written = json.loads(written_path.read_text())
    for key in ("eval/fid_1step", "eval/fid_2step", "eval/energy_distance_1step", "eval/energy_distance_floor"):
        assert written[key] == pytest.approx(metrics[key], rel=1e-6), key
