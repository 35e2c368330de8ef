"""How a run's samples change over training: one frame per archived checkpoint.

    python -m visualizers.evolution --run-name NAME [--steps 50]

Reads ``<ckpt_root>/<arch>/archive/<run_name>_epoch_XXXX.pt`` (written every
``checkpoint.archive_every_epochs``) in epoch order and samples each one's EMA
model from the same noise, so what moves between frames is the training alone.
2-D runs: a scatter over the held-out data; image runs (1 or 3 channels in
[-1, 1]): a grid of ``--num-samples`` images (default 64). Flow-matching runs are
integrated with the run's solver in ``--steps`` steps (default 50); MeanFlow runs
take ``--steps`` MeanFlow steps (default 1, the one-step generator). Latent-space
runs are refused (their samples need the VAE decoder). Writes ``evolution.gif``
(and ``.mp4``) into ``--out`` (default ``outputs/vis/<run_name>``).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a file: imports are absolute from the repo root

import matplotlib.pyplot as plt
import numpy as np
import torch
from torchvision.utils import make_grid

from evaluation.sample import load_checkpoint_model, sample_flow, sample_meanflow
from visualizers.common import (
    DPI,
    RunInfo,
    ScatterPanel,
    VisError,
    add_common_args,
    check_common_args,
    figure_frame,
    find_run,
    noise_and_labels,
    output_dir,
    parse_steps,
    plot_limits,
    reference_data,
    require_kind,
    run_cli,
    to_uint8_images,
    write_animation,
)


def sample_checkpoint(path: Path, run: RunInfo, x0: torch.Tensor, labels: torch.Tensor | None, steps: int) -> torch.Tensor:
    model, cfg = load_checkpoint_model(str(path))
    if run.jumps:
        return sample_meanflow(model, x0, num_steps=steps, label=labels).samples
    return sample_flow(model, x0, solver=cfg.solver.name, num_steps=steps, label=labels, num_classes=cfg.model.num_classes,
                       solver_options={k: v for k, v in cfg.solver.items() if k != "name"}).samples


def scatter_frames(samples: list[tuple[int, np.ndarray]], data: np.ndarray | None, title: str) -> list[np.ndarray]:
    fig, ax = plt.subplots(figsize=(480 / DPI, 480 / DPI), dpi=DPI)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.92)
    # Fixed limits from the data (and the last, best-trained samples): early
    # checkpoints may scatter far, but the frame should not zoom around.
    panel = ScatterPanel(ax, data, plot_limits(data, samples[-1][1]), trails=False)
    frames = []
    for epoch, points in samples:
        panel.update(points, title=f"{title}   epoch {epoch}")
        frames.append(figure_frame(fig))
    plt.close(fig)
    return frames


def grid_frames(samples: list[tuple[int, torch.Tensor]], title: str) -> list[np.ndarray]:
    fig = plt.figure(figsize=(480 / DPI, 512 / DPI), dpi=DPI)  # 480 x 512: sides divisible by 16
    ax = fig.add_axes((0.02, 0.02, 0.96, 0.88))
    ax.set_axis_off()
    image = None
    frames = []
    for epoch, images in samples:
        nrow = math.ceil(math.sqrt(images.shape[0]))
        grid = make_grid(to_uint8_images(images), nrow=nrow, padding=1, pad_value=255).permute(1, 2, 0).numpy()
        if image is None:
            image = ax.imshow(grid, cmap="gray" if grid.shape[-1] == 1 else None, interpolation="nearest")
        else:
            image.set_data(grid)
        ax.set_title(f"{title}   epoch {epoch}", fontsize=10)
        frames.append(figure_frame(fig))
    plt.close(fig)
    return frames


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, "sampling steps (default 50; MeanFlow runs: 1)", None, num_samples_default=None, fps_default=3)
    args = parser.parse_args(argv)
    check_common_args(args)

    run = find_run(args.ckpt_root, args.run_name)
    require_kind(run, ("2d", "image"), "evolution")
    if args.steps is None:
        steps = 1 if run.jumps else 50
    else:
        counts = parse_steps(args.steps)
        if len(counts) != 1:
            raise VisError(f"--steps {args.steps!r}: evolution takes one step count")
        steps = counts[0]
    archived = run.archived()
    if not archived:
        raise VisError(
            f"run {run.name!r} has no archived checkpoints ({run.name}_epoch_XXXX.pt) in {str(run.archive_dir)!r}: "
            "train with checkpoint.archive_every_epochs > 0"
        )
    num_samples = args.num_samples or (500 if run.kind == "2d" else 64)
    x0, labels = noise_and_labels(run.cfg, num_samples, args.seed)
    samples = [(epoch, sample_checkpoint(path, run, x0, labels, steps)) for epoch, path in archived]
    how = f"MeanFlow {steps}-step" if run.jumps else f"{run.cfg.solver.name} {steps} steps"
    title = f"{run.name} · {how}"
    if run.kind == "2d":
        frames = scatter_frames([(e, s.numpy()) for e, s in samples], reference_data(run.cfg, 2000), title)
    else:
        frames = grid_frames(samples, title)
    return write_animation(frames, output_dir(args, run), "evolution", args.fps, mp4=not args.no_mp4)


if __name__ == "__main__":
    run_cli(main)
