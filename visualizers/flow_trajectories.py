"""Particles carried by a 2-D run's learned flow from noise (t = 0) to data (t = 1).

    python -m visualizers.flow_trajectories --run-name NAME [--steps 60] [--solver rk4]

Noise ``x_0 ~ N(0, I)`` is integrated along ``dx/dt = u(x, t, t)``, the model's
instantaneous velocity (docs/design.md), with the run's own solver unless ``--solver``
says otherwise; a MeanFlow run is drawn the same way (its few-step jumps are
``meanflow_steps``'s picture). One frame per solver step plus the noise
(``--steps`` + 1 frames); each particle leaves a faint trail of its path so far,
over the held-out data in grey. Writes ``flow_trajectories.gif`` (and ``.mp4``)
into ``--out`` (default ``outputs/vis/<run_name>``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a file: imports are absolute from the repo root

import matplotlib.pyplot as plt
import numpy as np
import torch

from evaluation.sample import load_checkpoint_model, sample_flow
from solvers.runge_kutta import SOLVERS
from visualizers.common import (
    DPI,
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
    write_animation,
)


def render_frames(trajectory: np.ndarray, data: np.ndarray | None, title: str) -> list[np.ndarray]:
    """trajectory (T + 1, N, 2), the states at each grid time -> T + 1 RGB frames."""
    num_frames = trajectory.shape[0]
    times = np.linspace(0.0, 1.0, num_frames)
    paths = trajectory.transpose(1, 0, 2)  # (N, T + 1, 2)
    fig, ax = plt.subplots(figsize=(480 / DPI, 480 / DPI), dpi=DPI)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.92)
    panel = ScatterPanel(ax, data, plot_limits(data, trajectory.reshape(-1, 2)), trails=True)
    frames = []
    for k in range(num_frames):
        panel.update(trajectory[k], paths[:, : k + 1], f"{title}   t = {times[k]:.2f}")
        frames.append(figure_frame(fig))
    plt.close(fig)
    return frames


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, "solver steps; the animation has steps + 1 frames (default 60)", 60)
    parser.add_argument("--solver", default=None, help=f"one of {sorted(SOLVERS)} (default: the run's solver)")
    args = parser.parse_args(argv)
    check_common_args(args)
    counts = parse_steps(args.steps)
    if len(counts) != 1:
        raise VisError(f"--steps {args.steps!r}: flow_trajectories takes one step count")
    steps = counts[0]
    if args.solver is not None and args.solver not in SOLVERS:
        raise VisError(f"--solver {args.solver!r}: expected one of {sorted(SOLVERS)}")

    run = find_run(args.ckpt_root, args.run_name)
    require_kind(run, ("2d",), "flow_trajectories")
    model, cfg = load_checkpoint_model(str(run.last))
    solver = args.solver or cfg.solver.name
    x0, labels = noise_and_labels(cfg, args.num_samples, args.seed)
    options = {k: v for k, v in cfg.solver.items() if k != "name"} if solver == cfg.solver.name else {}  # the run's tolerances
    result = sample_flow(model, x0, solver=solver, num_steps=steps, label=labels,
                         num_classes=cfg.model.num_classes, return_trajectory=True, solver_options=options)
    trajectory = torch.stack(result.trajectory).numpy()  # (steps + 1, N, 2)
    frames = render_frames(trajectory, reference_data(cfg, 2000), f"{run.name} · {solver} {steps} steps")
    return write_animation(frames, output_dir(args, run), "flow_trajectories", args.fps, mp4=not args.no_mp4)


if __name__ == "__main__":
    run_cli(main)
