"""How a run's samples change over training: one frame per archived checkpoint.

    python -m visualizers.evolution --run-name NAME [--steps 50]

Reads ``<ckpt_root>/<arch>/archive/<run_name>_epoch_XXXX.pt`` (written every
``checkpoint.archive_every_epochs``) in epoch order and samples each one's EMA
model from the same noise, so what moves between frames is the training alone.
2-D runs: a scatter over the held-out data; image runs (1 or 3 channels in
[-1, 1]): a grid of ``--num-samples`` images (default 64). Flow-matching runs are
integrated with the run's solver in ``--steps`` steps (default 50); MeanFlow runs
take ``--steps`` MeanFlow steps (default 1, the one-step generator); either through the
sampler the run's loss gives the evaluator (guidance included). Latent-space
runs are refused (their samples need the VAE decoder). Writes ``evolution.gif``
(and ``.mp4``) into ``--out`` (default ``outputs/vis/<run_name>``).
"""

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

from dataloaders.images import to_uint8
from evaluation.sample import fixed_noise, load_checkpoint_model
from solvers.sampling import Sampler
from visualizers import common


def sample_checkpoint(path: Path, sampler: Sampler, x0: torch.Tensor, labels: torch.Tensor | None, seed: int) -> torch.Tensor:
    model, _ = load_checkpoint_model(str(path))
    return common.draw(sampler, model, x0, labels, seed)


def scatter_frames(samples: list[tuple[int, np.ndarray]], data: np.ndarray | None, title: str) -> list[np.ndarray]:
    fig, ax = common.square_figure()
    # Fixed limits from the data (and the last, best-trained samples): early
    # checkpoints may scatter far, but the frame should not zoom around.
    panel = common.ScatterPanel(ax, data, common.plot_limits(data, samples[-1][1]), trails=False)
    frames = []
    for epoch, points in samples:
        panel.update(points, title=f"{title}   epoch {epoch}")
        frames.append(common.figure_frame(fig))
    plt.close(fig)
    return frames


def grid_frames(samples: list[tuple[int, torch.Tensor]], title: str) -> list[np.ndarray]:
    fig = plt.figure(figsize=(480 / common.DPI, 512 / common.DPI), dpi=common.DPI)  # 480 x 512: sides divisible by 16
    ax = fig.add_axes((0.02, 0.02, 0.96, 0.88))
    ax.set_axis_off()
    image = None
    frames = []
    for epoch, images in samples:
        nrow = math.ceil(math.sqrt(images.shape[0]))
        grid = make_grid(to_uint8(images), nrow=nrow, padding=1, pad_value=255).permute(1, 2, 0).numpy()
        if image is None:
            image = ax.imshow(grid, cmap="gray" if grid.shape[-1] == 1 else None, interpolation="nearest")
        else:
            image.set_data(grid)
        ax.set_title(f"{title}   epoch {epoch}", fontsize=10)
        frames.append(common.figure_frame(fig))
    plt.close(fig)
    return frames


def main(argv: list[str] | None = None) -> list[Path]:
    parser = common.make_parser(__doc__, "sampling steps (default 50; MeanFlow runs: 1)", None, num_samples_default=None,
                                fps_default=3)
    args = common.parse_args(parser, argv)

    run = common.open_run(args, ("2d", "image"), "evolution")
    if args.steps is None:
        steps = 1 if run.jumps else 50
    else:
        steps = common.one_step_count(args.steps, "evolution")
    archived = run.archived()
    if not archived:
        raise common.VisError(
            f"run {run.name!r} has no archived checkpoints ({run.name}_epoch_XXXX.pt) in {str(run.archive_dir)!r}: "
            "train with checkpoint.archive_every_epochs > 0"
        )
    num_samples = args.num_samples or (500 if run.kind == "2d" else 64)
    x0, labels = fixed_noise(run.cfg, num_samples, args.seed)
    sampler = run.jump_samplers([steps])[0] if run.jumps else run.diagonal_sampler(steps)
    samples = [(epoch, sample_checkpoint(path, sampler, x0, labels, args.seed)) for epoch, path in archived]
    how = f"MeanFlow {steps}-step" if run.jumps else f"{run.cfg.solver.name} {steps} steps"
    title = f"{run.name} · {how}"
    if run.kind == "2d":
        frames = scatter_frames([(e, s.numpy()) for e, s in samples], common.reference_data(run.cfg, 2000), title)
    else:
        frames = grid_frames(samples, title)
    return common.save_animation(frames, args, run, "evolution")


if __name__ == "__main__":
    common.run_cli(main)
