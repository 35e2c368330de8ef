"""Particles carried by a 2-D run's learned flow from noise (t = 0) to data (t = 1).

    python -m visualizers.flow_trajectories --run-name NAME [--steps 60] [--solver rk4]

Noise ``x_0 ~ N(0, I)`` is integrated along ``dx/dt = u(x, t, t)``, the model's
instantaneous velocity (docs/design.md), with the run's own solver unless ``--solver``
says otherwise, through the sampler its loss gives the evaluator (so with the run's
guidance, or ``--guidance-scale`` / ``--guidance-interval``); a MeanFlow run is drawn the same way (its few-step jumps are
``meanflow_steps``'s picture). One frame per solver step plus the noise
(``--steps`` + 1 frames); each particle leaves a faint trail of its path so far,
over the held-out data in grey. Writes ``flow_trajectories.gif`` (and ``.mp4``)
into ``--out`` (default ``outputs/vis/<run_name>``).
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a file: imports are absolute from the repo root

import matplotlib.pyplot as plt
import numpy as np
import torch

from evaluation.sample import fixed_noise, load_checkpoint_model
from solvers.runge_kutta import SOLVERS
from visualizers import common


def render_frames(trajectory: np.ndarray, data: np.ndarray | None, title: str) -> list[np.ndarray]:
    """trajectory (T + 1, N, 2), the states at each grid time -> T + 1 RGB frames."""
    num_frames = trajectory.shape[0]
    times = np.linspace(0.0, 1.0, num_frames)
    paths = trajectory.transpose(1, 0, 2)  # (N, T + 1, 2)
    fig, ax = common.square_figure()
    panel = common.ScatterPanel(ax, data, common.plot_limits(data, trajectory.reshape(-1, 2)), trails=True)
    frames = []
    for k in range(num_frames):
        panel.update(trajectory[k], paths[:, : k + 1], f"{title}   t = {times[k]:.2f}")
        frames.append(common.figure_frame(fig))
    plt.close(fig)
    return frames


def main(argv: list[str] | None = None) -> list[Path]:
    parser = common.make_parser(__doc__, "solver steps; the animation has steps + 1 frames (default 60)", 60)
    parser.add_argument("--solver", default=None, help=f"one of {sorted(SOLVERS)} (default: the run's solver)")
    args = common.parse_args(parser, argv)
    steps = common.one_step_count(args.steps, "flow_trajectories")
    if args.solver is not None and args.solver not in SOLVERS:
        raise common.VisError(f"--solver {args.solver!r}: expected one of {sorted(SOLVERS)}")

    run = common.open_run(args, ("2d",), "flow_trajectories")
    model, cfg = load_checkpoint_model(str(run.last))
    solver = args.solver or cfg.solver.name
    x0, labels = fixed_noise(cfg, args.num_samples, args.seed)
    sampler = run.diagonal_sampler(steps, solver)  # the run's guidance; its tolerances when its own solver
    common.draw(sampler, model, x0, labels, args.seed, keep_trajectory=True)
    trajectory = torch.stack(sampler.trajectory).numpy()  # (steps + 1, N, 2)
    frames = render_frames(trajectory, common.reference_data(cfg, 2000), f"{run.name} · {solver} {steps} steps")
    return common.save_animation(frames, args, run, "flow_trajectories")


if __name__ == "__main__":
    common.run_cli(main)
