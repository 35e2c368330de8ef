"""Render every visualizer that applies to a run (what ``vis_all.sh`` runs).

    python -m visualizers.render_all [RUN_NAME] [--ckpt-root outputs/ckpts] [--out-root outputs/vis]
                                     [--num-samples N] [--seed S] [--fps F] [--no-mp4]

Without RUN_NAME the run with the newest ``last.pt`` is drawn. What applies:

| run | flow_trajectories | evolution | meanflow_steps |
| --- | --- | --- | --- |
| 2-D, flow matching | yes | if archived checkpoints exist | no |
| 2-D, MeanFlow | yes | if archived checkpoints exist | yes |
| images (1 or 3 channels) | no | if archived checkpoints exist | no |
| latents, D != 2 | nothing to draw (an error) | | |

Each visualizer keeps its own defaults for steps; the options given here are
passed to all of them. Everything is written into ``<out-root>/<run_name>/`` and
the folder is printed at the end. All run in one process, so the libraries load once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a file: imports are absolute from the repo root

from visualizers import evolution, flow_trajectories, meanflow_steps
from visualizers.common import DEFAULT_CKPT_ROOT, DEFAULT_VIS_ROOT, VisError, find_run, run_cli


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_name", nargs="?", default=None, help="default: the run with the newest last.pt")
    parser.add_argument("--ckpt-root", default=DEFAULT_CKPT_ROOT, help="root of <arch>/<run>/last.pt")
    parser.add_argument("--out-root", default=str(DEFAULT_VIS_ROOT), help="pictures go to <out-root>/<run_name>/")
    parser.add_argument("--num-samples", type=int, default=None, help="particles / samples (default: each visualizer's)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed")
    parser.add_argument("--fps", type=int, default=None, help="frames per second (default: each visualizer's)")
    parser.add_argument("--no-mp4", action="store_true", help="write GIFs only")
    args = parser.parse_args(argv)

    run = find_run(args.ckpt_root, args.run_name)
    out = Path(args.out_root) / run.name
    common = ["--run-name", run.name, "--ckpt-root", args.ckpt_root, "--out", str(out), "--seed", str(args.seed)]
    if args.num_samples is not None:
        common += ["--num-samples", str(args.num_samples)]
    if args.fps is not None:
        common += ["--fps", str(args.fps)]
    if args.no_mp4:
        common.append("--no-mp4")

    jobs = []
    if run.kind == "2d":
        jobs.append(("flow_trajectories", flow_trajectories.main))
    if run.kind in ("2d", "image") and run.archived():
        jobs.append(("evolution", evolution.main))
    if run.kind == "2d" and run.jumps:
        jobs.append(("meanflow_steps", meanflow_steps.main))
    if not jobs:
        raise VisError(
            f"nothing to draw for run {run.name!r} ({run.kind} data, shape {list(run.cfg.dataloaders.data_shape)}): "
            "the visualizers draw 2-D runs, and image runs that have archived checkpoints"
        )
    written = []
    for name, visualize in jobs:
        print(f"{name} ...", flush=True)
        written += visualize(common)
    skipped = {"flow_trajectories", "evolution", "meanflow_steps"} - {name for name, _ in jobs}
    print(f"run {run.name}: wrote {len(written)} file(s) to {out}" + (f" (not applicable: {', '.join(sorted(skipped))})" if skipped else ""))
    return written


if __name__ == "__main__":
    run_cli(main)
