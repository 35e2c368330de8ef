"""What every visualizer shares: finding a run's checkpoints, checking the run suits
the picture, drawing frames with matplotlib and writing them as GIF (and MP4).

Run the visualizers as modules from the repository root (they import the project
absolutely): ``python -m visualizers.flow_trajectories --run-name NAME``, or all of
them with ``visualizers/vis_all.sh``.

Output: ``<out>/<visualizer>.gif`` always (Pillow, through imageio), and
``<out>/<visualizer>.mp4`` (H.264) with the ffmpeg binary that the imageio-ffmpeg
package ships, so no system ffmpeg is needed; where that package has no binary
for the platform, or with ``--no-mp4``, only the GIF is written. Files are written
to a temporary name and moved into place, after all input has been checked, so a
bad call never overwrites an earlier picture.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a file: imports are absolute from the repo root

import imageio.v2 as imageio
import imageio_ffmpeg
import matplotlib
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

matplotlib.use("Agg")  # files only: no display needed, and no GUI backend on a server
import matplotlib.pyplot as plt

from dataloaders.base_dataloaders import make_dataset, stack_targets
from evaluation.sample import renoise_seed
from evaluation.stored_config import stored_run_config
from losses.base_loss import build_loss
from runs.errors import CheckpointError
from runs.layout import DEFAULT_OUTPUT_DIR, RunLayout, ckpt_root, find_runs
from runs.stored import read_stored_config
from solvers.sampling import DiagonalSampler, JumpSampler, Sampler

DEFAULT_CKPT_ROOT = str(ckpt_root(DEFAULT_OUTPUT_DIR))
DEFAULT_VIS_ROOT = Path("outputs/vis")
DPI = 96  # with the figure sizes below, frame sides are multiples of 16 (what H.264 wants)


class VisError(ValueError):
    """Bad input to a visualizer; the message is one line for the user."""


@dataclass
class RunInfo:
    """A trained run on disk: its layout (``runs/layout.py``) and resolved config."""

    layout: RunLayout
    cfg: DictConfig

    @property
    def name(self) -> str:
        return self.layout.run

    @property
    def last(self) -> Path:
        return self.layout.last

    @property
    def archive_dir(self) -> Path:
        return self.layout.archive_dir

    def archived(self) -> list[tuple[int, Path]]:
        """``(epoch, path)`` of the run's archived epoch checkpoints, by epoch."""
        return self.layout.archived()

    @property
    def kind(self) -> str:
        """2d (dense, D = 2), dense (D != 2), image (1 or 3 channels) or latent."""
        shape = list(self.cfg.dataloaders.data_shape)
        if len(shape) == 1:
            return "2d" if shape[0] == 2 else "dense"
        return "image" if shape[0] in (1, 3) else "latent"

    def samplers(self, solver: str | None = None, **eval_settings) -> dict[str, Sampler]:
        """How the run's loss samples its model, as the evaluator does (guidance included),
        with ``eval_settings`` (``steps=``, ``meanflow_steps=``) in place of the run's ``eval.*``
        and the solver ``solver`` (with its default options) in place of the run's."""
        eval_cfg = OmegaConf.merge(self.cfg.eval, eval_settings)
        solver_cfg = self.cfg.solver if solver in (None, self.cfg.solver.name) else OmegaConf.create({"name": solver})
        return build_loss(self.cfg.loss).samplers(eval_cfg, solver_cfg, self.cfg.model.num_classes)

    @property
    def jumps(self) -> bool:
        """Whether the run's model samples in mean-flow jumps (the one-step family)."""
        return any(isinstance(s, JumpSampler) for s in self.samplers().values())

    def diagonal_sampler(self, steps: int, solver: str | None = None) -> Sampler:
        """The run's solver on the diagonal ``u(x, t, t)``, ``steps`` steps of ``solver``."""
        found = [s for s in self.samplers(solver, steps=steps).values() if isinstance(s, DiagonalSampler)]
        if not found:
            raise VisError(f"run {self.name!r}: its loss {self.cfg.loss.name} samples with no solver on the diagonal")
        return found[0]

    def jump_samplers(self, counts: list[int]) -> list[Sampler]:
        """The run's mean-flow jump chains of ``counts`` uniform steps, in that order."""
        by_steps = {s.steps: s for s in self.samplers(meanflow_steps=counts).values() if isinstance(s, JumpSampler)}
        return [by_steps[k] for k in counts]


def find_run(ckpt_root: str | Path, run_name: str | None) -> RunInfo:
    """The named run, or the most recently written one when ``run_name`` is None."""
    root = Path(ckpt_root)
    if not root.is_dir():
        raise VisError(f"checkpoint root {str(root)!r} is not a folder: expected outputs/ckpts (see --ckpt-root)")
    runs = find_runs(root)
    if run_name is None:
        if not runs:
            raise VisError(f"no run under {str(root)!r}: expected <arch>/<run_name>/last.pt files")
        run = runs[0]
    else:
        matches = [r for r in runs if r.run == run_name]
        if not matches:
            names = ", ".join(sorted({r.run for r in runs})) or "none"
            raise VisError(f"no run {run_name!r} under {str(root)!r} (runs there: {names})")
        run = matches[0]
    # The stored config describes the model; where data is read comes from this machine's configs.
    stored, source, _ = read_stored_config(run.last)
    return RunInfo(layout=run, cfg=stored_run_config(stored, [], source, what="a visualizer"))


def draw(sampler: Sampler, model: torch.nn.Module, x0: torch.Tensor, labels: torch.Tensor | None, seed: int,
         keep_trajectory: bool = False) -> torch.Tensor:
    """``sampler``'s samples from ``x0`` (drawn with ``seed``), its own noise restarted as the
    evaluator restarts it; with ``keep_trajectory`` the states at its grid times are left in
    ``sampler.trajectory``."""
    sampler.keep_trajectory = keep_trajectory
    sampler.reseed(renoise_seed(seed))
    return sampler(model, x0, labels)


def require_kind(run: RunInfo, kinds: tuple[str, ...], visualizer: str) -> None:
    if run.kind not in kinds:
        shape = list(run.cfg.dataloaders.data_shape)
        raise VisError(
            f"{visualizer} draws {' or '.join(kinds)} runs; run {run.name!r} has {run.kind} data of shape {shape}"
        )


def reference_data(cfg: DictConfig, n: int) -> np.ndarray | None:
    """Up to ``n`` held-out data points to draw behind the samples (None if the
    data file of a points run is gone: the picture is still worth drawing)."""
    missing = OmegaConf.missing_keys(cfg.dataloaders)
    if missing:  # a points run: its file is this machine's to name, and a checkpoint does not name it
        print(f"note: dataloaders.{min(missing)} is not set on this machine; drawing samples without the data behind them",
              file=sys.stderr)
        return None
    try:
        dataset = make_dataset(cfg.dataloaders, "test")  # through the allowlist: the config came from a file
    except FileNotFoundError as err:
        print(f"note: data set not found ({err}); drawing samples without the data behind them", file=sys.stderr)
        return None
    pick = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[: min(n, len(dataset))]
    return stack_targets(dataset, pick.tolist())[0].float().numpy()


def plot_limits(*clouds: np.ndarray | None) -> float:
    """A square half-width holding 99.5% of every point cloud, plus a margin."""
    values = np.concatenate([np.abs(c[:, :2]).ravel() for c in clouds if c is not None])
    return float(np.quantile(values, 0.995)) * 1.15


class ScatterPanel:
    """One square 2-D panel: data in light grey, particles on top, faint trails behind.

    The artists are made once and updated per frame, which keeps a few hundred frames
    of a few thousand particles fast enough for a laptop.
    """

    def __init__(self, ax: plt.Axes, data: np.ndarray | None, limit: float, trails: bool) -> None:
        from matplotlib.collections import LineCollection

        self.ax = ax
        if data is not None:
            ax.scatter(data[:, 0], data[:, 1], s=2, c="#c8c8c8", linewidths=0, label="data")
        self.trails = LineCollection([], colors="tab:blue", linewidths=0.6, alpha=0.25) if trails else None
        if self.trails is not None:
            ax.add_collection(self.trails)
        self.points = ax.scatter([], [], s=5, c="tab:blue", linewidths=0, label="samples")
        ax.set(xlim=(-limit, limit), ylim=(-limit, limit), aspect="equal", xticks=[], yticks=[])

    def update(self, points: np.ndarray, paths: np.ndarray | None = None, title: str = "") -> None:
        """points (N, 2); paths (N, T, 2): each particle's track so far."""
        self.points.set_offsets(points[:, :2])
        if self.trails is not None and paths is not None:
            self.trails.set_segments(list(paths[:, :, :2]))
        self.ax.set_title(title, fontsize=10)


def figure_frame(fig: plt.Figure) -> np.ndarray:
    """The figure as an (H, W, 3) uint8 image."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def square_figure() -> tuple[plt.Figure, plt.Axes]:
    """A 480 x 480 figure of one panel, with room above it for a title."""
    fig, ax = plt.subplots(figsize=(480 / DPI, 480 / DPI), dpi=DPI)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.92)
    return fig, ax


def make_parser(
    doc: str,
    steps_help: str,
    steps_default: str | int | None,
    num_samples_default: int | None = 500,
    fps_default: int = 12,
) -> argparse.ArgumentParser:
    """A visualizer's command line: the first paragraph of its ``doc`` and the options every visualizer takes."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--run-name", default=None, help="run to draw (default: the newest last.pt under --ckpt-root)")
    parser.add_argument("--ckpt-root", default=DEFAULT_CKPT_ROOT, help="root of <arch>/<run>/last.pt and <arch>/archive/")
    parser.add_argument("--out", default=None, help="output folder (default outputs/vis/<run_name>)")
    parser.add_argument("--num-samples", type=int, default=num_samples_default, help="particles / samples drawn")
    parser.add_argument("--steps", type=str, default=steps_default, help=steps_help)
    parser.add_argument("--fps", type=int, default=fps_default, help=f"frames per second (default {fps_default})")
    parser.add_argument("--seed", type=int, default=0, help="seeds the noise, so reruns draw the same particles")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="eval.guidance_scale for this picture (default: the run's)")
    parser.add_argument("--guidance-interval", default=None, metavar="LO,HI",
                        help="eval.guidance_interval for this picture, the s (noise at 0) where a model trained with "
                             "guidance conditions is guided (default: the run's)")
    parser.add_argument("--no-mp4", action="store_true", help="write the GIF only")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv`` and check the options every visualizer takes."""
    args = parser.parse_args(argv)
    if args.num_samples is not None and args.num_samples < 1:
        raise VisError(f"--num-samples {args.num_samples}: expected >= 1")
    if args.fps < 1:
        raise VisError(f"--fps {args.fps}: expected >= 1")
    if args.guidance_scale is not None and not math.isfinite(args.guidance_scale):
        raise VisError(f"--guidance-scale {args.guidance_scale}: expected a finite number")
    if args.guidance_interval is not None:
        parts = args.guidance_interval.split(",")
        try:
            lo, hi = (float(p) for p in parts)
        except ValueError:
            lo = hi = math.nan
        if not 0.0 <= lo <= hi <= 1.0:
            raise VisError(f"--guidance-interval {args.guidance_interval!r}: expected LO,HI with 0 <= LO <= HI <= 1, "
                           "such as 0.35,0.6")
        args.guidance_interval = [lo, hi]
    return args


def parse_steps(text: str | int) -> list[int]:
    """``--steps``: one count or a comma list, each >= 1."""
    counts = []
    for part in str(text).split(","):
        if not part.strip().isdigit() or int(part) < 1:
            raise VisError(f"--steps {text!r}: expected a positive integer or a comma list such as 1,2,4")
        counts.append(int(part))
    return counts


def one_step_count(text: str | int, visualizer: str) -> int:
    counts = parse_steps(text)
    if len(counts) != 1:
        raise VisError(f"--steps {text!r}: {visualizer} takes one step count")
    return counts[0]


def open_run(args: argparse.Namespace, kinds: tuple[str, ...], visualizer: str) -> RunInfo:
    """The run ``--run-name`` names (or the newest), refused unless it has data of one of
    ``kinds``, with ``--guidance-scale`` and ``--guidance-interval`` as its evaluation settings."""
    run = find_run(args.ckpt_root, args.run_name)
    require_kind(run, kinds, visualizer)
    for key in ("guidance_scale", "guidance_interval"):
        if getattr(args, key) is not None:
            OmegaConf.update(run.cfg, f"eval.{key}", getattr(args, key), merge=False)
    return run


def ffmpeg_available() -> bool:
    try:
        imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError:  # imageio-ffmpeg ships no binary for this platform
        return False
    return True


def write_animation(
    frames: list[np.ndarray], out_dir: Path, stem: str, fps: int, mp4: bool, hold_s: float = 1.5
) -> list[Path]:
    """``<out_dir>/<stem>.gif`` (looping) and, if asked and possible, ``<stem>.mp4``.

    The last frame stays ``hold_s`` seconds longer, so a loop does not jump straight
    from the result back to the noise: in the GIF as a longer frame duration (the
    frame count stays one per state), in the MP4 as repeated frames.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    gif = out_dir / f"{stem}.gif"
    tmp = out_dir / f".{stem}.tmp.gif"
    durations = [1000.0 / fps] * len(frames)  # ms per frame
    durations[-1] += 1000.0 * hold_s
    imageio.mimsave(tmp, frames, format="GIF", duration=durations, loop=0)
    tmp.replace(gif)
    written.append(gif)
    if mp4 and ffmpeg_available():
        mp4_path = out_dir / f"{stem}.mp4"
        tmp = out_dir / f".{stem}.tmp.mp4"
        # yuv420p: the pixel format every player decodes; frame sides are multiples of 16
        with imageio.get_writer(tmp, format="FFMPEG", fps=fps, codec="libx264", pixelformat="yuv420p",
                                macro_block_size=16, ffmpeg_log_level="error") as writer:
            for frame in frames + [frames[-1]] * round(hold_s * fps):
                writer.append_data(frame)
        tmp.replace(mp4_path)
        written.append(mp4_path)
    elif mp4:
        print("note: imageio-ffmpeg has no ffmpeg binary here; wrote the GIF only", file=sys.stderr)
    return written


def save_animation(frames: list[np.ndarray], args: argparse.Namespace, run: RunInfo, stem: str) -> list[Path]:
    """``write_animation`` into ``--out`` (default ``outputs/vis/<run_name>``) with ``--fps`` and ``--no-mp4``."""
    out_dir = Path(args.out) if args.out is not None else DEFAULT_VIS_ROOT / run.name
    return write_animation(frames, out_dir, stem, args.fps, mp4=not args.no_mp4)


def run_cli(main) -> None:
    """Run a visualizer's ``main``; bad input is one line on stderr and exit 2."""
    try:
        written = main()
    except (VisError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    for path in written:
        print(path)
