"""A 2-D MeanFlow run's one-step and multi-step samplers, side by side.

    python -m visualizers.meanflow_steps --run-name NAME [--steps 1,2,4] [--frames 30]

One panel per step count k in ``--steps``; all panels start from the same noise.
A k-step sampler jumps along the grid ``t_j = j / k`` with
``x_{j+1} = x_j + (t_{j+1} - t_j) u(x_j, t_j, t_{j+1})`` (docs/design.md); the animation
shows each jump being travelled at constant speed over ``--frames`` frames of
time tau in [0, 1], i.e. the state ``x_j + (tau - t_j) u(x_j, t_j, t_{j+1})``, with
a faint trail of the straight pieces so far. The jumps are the samplers the run's loss
gives the evaluator (its guidance, or ``--guidance-scale`` / ``--guidance-interval``).
A panel's title gives k and the
energy distance of its final samples to held-out data (lower is better), so the
price of fewer steps reads off the picture. Writes ``meanflow_steps.gif`` (and
``.mp4``) into ``--out`` (default ``outputs/vis/<run_name>``).
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a file: imports are absolute from the repo root

import matplotlib.pyplot as plt
import numpy as np
import torch

from evaluation.energy_distance import energy_distance
from evaluation.sample import fixed_noise, load_checkpoint_model
from visualizers import common


def states_at(grid_states: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Where a k-step sampler's particles are at time ``tau``, and their paths so far.

    grid_states (k + 1, N, 2): the states at ``t_j = j / k``. Between grid times the
    particle moves on the straight jump, so its state is the linear interpolation.
    Returns (N, 2) positions and (N, J + 2, 2) paths (grid states passed, then now).
    """
    k = grid_states.shape[0] - 1
    j = min(int(tau * k), k - 1)  # the jump under way
    frac = tau * k - j
    now = grid_states[j] + frac * (grid_states[j + 1] - grid_states[j])
    paths = np.concatenate([grid_states[: j + 1], now[None]], axis=0).transpose(1, 0, 2)
    return now, paths


def main(argv: list[str] | None = None) -> list[Path]:
    parser = common.make_parser(__doc__, "comma list of MeanFlow step counts, one panel each (default 1,2,4)", "1,2,4")
    parser.add_argument("--frames", type=int, default=30, help="animation frames over t in [0, 1] (default 30)")
    args = common.parse_args(parser, argv)
    step_counts = common.parse_steps(args.steps)
    if args.frames < 2:
        raise common.VisError(f"--frames {args.frames}: expected >= 2")

    run = common.open_run(args, ("2d",), "meanflow_steps")
    if not run.jumps:
        raise common.VisError(f"meanflow_steps draws runs whose loss samples in mean-flow jumps (meanflow, imf, alphaflow); run {run.name!r} was trained with loss {run.cfg.loss.name}")
    model, cfg = load_checkpoint_model(str(run.last))
    x0, labels = fixed_noise(cfg, args.num_samples, args.seed)
    data = common.reference_data(cfg, 2000)
    results = []
    for k, sampler in zip(step_counts, run.jump_samplers(step_counts), strict=True):
        common.draw(sampler, model, x0, labels, args.seed, keep_trajectory=True)
        states = torch.stack(sampler.trajectory)
        distance = energy_distance(states[-1], torch.from_numpy(data)) if data is not None else float("nan")
        results.append((k, states.numpy(), distance))

    side = 480 / common.DPI  # inches of a 480-pixel panel
    fig, axes = plt.subplots(1, len(results), figsize=(side * len(results), side), dpi=common.DPI, squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.86, wspace=0.04)
    limit = common.plot_limits(data, *[states[-1] for _, states, _ in results])
    panels = [common.ScatterPanel(ax, data, limit, trails=True) for ax in axes[0]]
    frames = []
    for tau in np.linspace(0.0, 1.0, args.frames):
        for panel, (k, states, distance) in zip(panels, results, strict=True):
            now, paths = states_at(states, float(tau))
            label = f"{k} step{'s' if k > 1 else ''} (NFE {k})"
            panel.update(now, paths, f"{label}   ED {distance:.3g}")
        fig.suptitle(f"{run.name} · MeanFlow   t = {tau:.2f}", fontsize=11)
        frames.append(common.figure_frame(fig))
    plt.close(fig)
    return common.save_animation(frames, args, run, "meanflow_steps")


if __name__ == "__main__":
    common.run_cli(main)
