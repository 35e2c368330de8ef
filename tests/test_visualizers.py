"""Visualizers render short animations from tiny runs written in the real checkpoint
format (configs composed from configs/, models built from them, saved with the
training loop's own ``save_checkpoint``); GIFs are read back for frame count and size."""

import os
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from runs.build import build_model
from runs.checkpoint import save_checkpoint
from runs.layout import ckpt_root as ckpts_under
from tests.conftest import run_layout
from tests.test_evaluator import IMF_CONDITIONED, RecordingModel, assert_guided_as
from visualizers import evolution, flow_trajectories, meanflow_steps, render_all
from visualizers.common import run_cli

REPO = Path(__file__).resolve().parents[1]
TINY_2D = ["dataloaders.dataset.num_samples=400", "model.hidden=16", "model.depth=1", "model.time_embed_dim=4"]
TINY_IMAGE = ["dataloaders=digits", "model=cnn", "model.hidden_channels=8", "model.channel_mult=[1]",
              "model.emb_dim=8", "model.num_groups=4"]


def write_run(root: Path, run_name: str, overrides: list[str], epochs: list[int], mtime: float) -> None:
    """A run as training leaves it: archived checkpoints per epoch and last.pt."""
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"run_name={run_name}", f"output_dir={root}", *overrides])
    config = OmegaConf.to_container(cfg, resolve=True)
    layout = run_layout(root, run_name, arch=config["model"]["name"])
    state = None
    for epoch in [*epochs, epochs[-1] if epochs else 1]:
        torch.manual_seed(epoch)  # different weights per checkpoint, as training would give
        weights = build_model(config["model"]).state_dict()
        state = {"model": weights, "ema": weights, "optimizer": {}, "scheduler": {}, "scaler": {},
                 "step": 10 * epoch, "epoch": epoch, "rng": {}, "config": config}
        if epoch in epochs:
            save_checkpoint(state, layout.archive(epoch))
    save_checkpoint(state, layout.last)
    os.utime(layout.last, (mtime, mtime))


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    write_run(root, "ring_fm", TINY_2D, [1, 2, 3], mtime=1_000)
    write_run(root, "ring_fm_noarchive", TINY_2D, [], mtime=2_000)
    write_run(root, "digits_fm", TINY_IMAGE, [2, 4], mtime=3_000)
    write_run(root, "ring_mf", [*TINY_2D, "loss=meanflow"], [5, 10], mtime=4_000)  # the newest
    return ckpts_under(root)


def gif_frames(path: Path) -> tuple[int, tuple[int, int]]:
    with Image.open(path) as gif:
        return gif.n_frames, gif.size  # size is (width, height)


def test_flow_trajectories_one_frame_per_step(ckpt_root, tmp_path):
    out = tmp_path / "vis"
    written = flow_trajectories.main(["--run-name", "ring_fm", "--ckpt-root", str(ckpt_root), "--out", str(out),
                                      "--steps", "6", "--num-samples", "40", "--no-mp4"])
    assert written == [out / "flow_trajectories.gif"]
    assert gif_frames(written[0]) == (7, (480, 480))
    frames = imageio.mimread(written[0])
    assert frames[0].shape[:2] == (480, 480) and (frames[0] != frames[-1]).any()  # particles moved


def test_flow_trajectories_writes_mp4_with_bundled_ffmpeg(ckpt_root, tmp_path):
    written = flow_trajectories.main(["--run-name", "ring_mf", "--ckpt-root", str(ckpt_root), "--out", str(tmp_path),
                                      "--steps", "3", "--num-samples", "20", "--solver", "midpoint", "--fps", "4"])
    assert [p.name for p in written] == ["flow_trajectories.gif", "flow_trajectories.mp4"]
    with imageio.get_reader(written[1], format="FFMPEG") as reader:
        assert reader.get_data(0).shape == (480, 480, 3)
        assert reader.count_frames() == 4 + round(1.5 * 4)  # frames + the held last frame


def test_evolution_2d_one_frame_per_archived_checkpoint(ckpt_root, tmp_path):
    written = evolution.main(["--run-name", "ring_fm", "--ckpt-root", str(ckpt_root), "--out", str(tmp_path),
                              "--steps", "4", "--num-samples", "40", "--no-mp4"])
    assert gif_frames(written[0]) == (3, (480, 480))


def test_evolution_image_grid_per_checkpoint(ckpt_root, tmp_path):
    written = evolution.main(["--run-name", "digits_fm", "--ckpt-root", str(ckpt_root), "--out", str(tmp_path),
                              "--steps", "2", "--num-samples", "9", "--no-mp4"])
    assert gif_frames(written[0]) == (2, (480, 512))


def test_meanflow_steps_panels_side_by_side(ckpt_root, tmp_path):
    written = meanflow_steps.main(["--run-name", "ring_mf", "--ckpt-root", str(ckpt_root), "--out", str(tmp_path),
                                   "--steps", "1,2", "--frames", "5", "--num-samples", "40", "--no-mp4"])
    assert gif_frames(written[0]) == (5, (960, 480))


def test_meanflow_interpolation_follows_the_jumps():
    grid = torch.tensor([[[0.0, 0.0]], [[1.0, 2.0]], [[3.0, 2.0]]]).numpy()  # 2 steps, 1 particle
    now, paths = meanflow_steps.states_at(grid, 0.25)
    assert now.tolist() == [[0.5, 1.0]] and paths.shape == (1, 2, 2)
    now, paths = meanflow_steps.states_at(grid, 1.0)
    assert now.tolist() == [[3.0, 2.0]] and paths.shape == (1, 3, 2)


@pytest.fixture(scope="module")
def imf_root(tmp_path_factory) -> Path:
    """A 2-D iMF run whose model takes guidance as conditions (and has the auxiliary head),
    evaluated at ω = 2 on [0.3, 0.7]."""
    root = tmp_path_factory.mktemp("imf_runs")
    overrides = [*IMF_CONDITIONED, "model.hidden=16", "model.depth=1", "model.time_embed_dim=4", "eval.guidance_scale=2",
                 "eval.guidance_interval=[0.3,0.7]"]
    write_run(root, "ring_imf", overrides, [1, 2], mtime=1_000)
    return ckpts_under(root)


@pytest.mark.parametrize(("visualizer", "args", "kinds"), [
    (meanflow_steps, ["--steps", "1,2", "--frames", "2"], "jumps"),
    (flow_trajectories, ["--steps", "8"], "diagonal"),
    (evolution, ["--steps", "2"], "jumps"),
])
@pytest.mark.parametrize(("guidance", "expected"), [([], (2.0, 0.3, 0.7)),
                                                    (["--guidance-scale", "4", "--guidance-interval", "0.4,0.65"], (4.0, 0.4, 0.65))])
def test_the_runs_guidance_reaches_the_model(imf_root, tmp_path, monkeypatch, visualizer, args, kinds, guidance, expected):
    """The visualizers sample through the run's loss's samplers: the model is given the run's
    guidance conditions (or the command line's), never asked for its auxiliary head."""
    recorded: list[RecordingModel] = []
    load = visualizer.load_checkpoint_model

    def recording_load(path):
        model, cfg = load(path)
        recorded.append(RecordingModel(model))
        return recorded[-1], cfg

    monkeypatch.setattr(visualizer, "load_checkpoint_model", recording_load)
    visualizer.main(["--run-name", "ring_imf", "--ckpt-root", str(imf_root), "--out", str(tmp_path), "--num-samples", "20",
                     "--no-mp4", *args, *guidance])
    for model in recorded:
        jumps, diagonal = assert_guided_as(model.calls, *expected)
        assert (jumps > 0, diagonal > 0) == (kinds == "jumps", kinds == "diagonal")


@pytest.mark.parametrize(
    ("visualizer", "args", "message"),
    [
        (flow_trajectories, ["--run-name", "no_such_run"], "no run 'no_such_run'"),
        (evolution, ["--run-name", "ring_fm_noarchive"], "has no archived checkpoints"),
        (flow_trajectories, ["--run-name", "digits_fm"], "draws 2d runs"),
        (meanflow_steps, ["--run-name", "digits_fm"], "draws 2d runs"),
        (meanflow_steps, ["--run-name", "ring_fm"], "samples in mean-flow jumps"),
        (flow_trajectories, ["--run-name", "ring_fm", "--steps", "0"], "--steps '0'"),
        (flow_trajectories, ["--run-name", "ring_fm", "--guidance-interval", "0.7,0.2"], "--guidance-interval '0.7,0.2'"),
        (meanflow_steps, ["--run-name", "ring_mf", "--guidance-interval", "0.5"], "expected LO,HI with 0 <= LO <= HI <= 1"),
        (evolution, ["--run-name", "ring_fm", "--guidance-scale", "nan"], "--guidance-scale nan: expected a finite number"),
    ],
)
def test_bad_input_is_one_line_and_overwrites_nothing(ckpt_root, tmp_path, capsys, visualizer, args, message):
    out = tmp_path / "vis"
    out.mkdir()
    for name in ("flow_trajectories.gif", "evolution.gif", "meanflow_steps.gif"):
        (out / name).write_bytes(b"earlier picture")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: visualizer.main([*args, "--ckpt-root", str(ckpt_root), "--out", str(out), "--no-mp4"]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert sorted(p.name for p in out.iterdir()) == ["evolution.gif", "flow_trajectories.gif", "meanflow_steps.gif"]
    assert all(p.read_bytes() == b"earlier picture" for p in out.iterdir())


def test_render_all_picks_what_applies(ckpt_root, tmp_path):
    written = render_all.main(["digits_fm", "--ckpt-root", str(ckpt_root), "--out-root", str(tmp_path),
                               "--num-samples", "4", "--no-mp4"])
    assert [p.name for p in written] == ["evolution.gif"]  # an image run: no 2-D pictures
    assert written[0].parent == tmp_path / "digits_fm"


@pytest.mark.slow
def test_vis_all_script_draws_the_newest_run(ckpt_root, tmp_path):
    # Run from inside visualizers/, as documented; relative paths are from the repo root.
    result = subprocess.run(
        ["./vis_all.sh", "--ckpt-root", str(ckpt_root), "--out-root", str(tmp_path), "--num-samples", "20",
         "--no-mp4"],
        cwd=REPO / "visualizers", capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable},
    )
    assert result.returncode == 0, result.stderr
    out = tmp_path / "ring_mf"  # newest last.pt
    assert sorted(p.name for p in out.iterdir()) == ["evolution.gif", "flow_trajectories.gif", "meanflow_steps.gif"]
    assert f"wrote 3 file(s) to {out}" in result.stdout
    assert gif_frames(out / "evolution.gif")[0] == 2
