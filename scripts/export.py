"""Export a run's weights to share: ``model.safetensors`` and the resolved ``config.yaml``.

    python scripts/export.py RUN                          # EMA weights of RUN's last.pt
    python scripts/export.py RUN --weights raw            # the trained (non-EMA) weights
    python scripts/export.py outputs/ckpts/mlp/archive/RUN_epoch_0040.pt --out shared/RUN_e40
    python scripts/export.py RUN --force                  # replace an earlier export

RUN is a run name, looked up as ``<output-dir>/ckpts/<arch>/RUN/last.pt``, a run folder,
or the path of a checkpoint file. The folder (default ``<output-dir>/export/<run name>/``,
or ``<run name>_epoch_XXXX/`` for an archived epoch) gets

- ``model.safetensors``: one set of weights (``--weights ema``, the default, or
  ``raw``), with ``epoch``, ``step``, which weights, the run name and a sha256 of the
  tensors in its metadata. safetensors holds tensors only, so the file cannot run code;
- ``config.yaml``: the checkpoint's resolved config, from which the model is rebuilt.

A model trained with an auxiliary head (``model.aux_head``, iMF's v head) is exported
without it: its weights stay behind and ``config.yaml`` says ``aux_head: false``, so the
export is the plain model that sampling uses, with the same ``u`` (``runs.export.for_sampling``).

Optimizer, scheduler and RNG states stay behind: an export is for sampling and
evaluation, not for resuming. ``eval_checkpoint=FOLDER``, ``evaluation.sample`` and
``runs.stored.load_model_from_checkpoint`` take the folder like a ``.pt`` file;
the model is rebuilt through the same allowlist and the weights are loaded strictly
after their checksum is verified. An existing export is never replaced without
``--force``. Every failure is one line on stderr and exit status 2 (1 when the disk refuses the write).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a file: imports are absolute from the repo root


from config_checks import validate_config
from evaluation.stored_config import stored_run_config
from runs.checkpoint import read_checkpoint, stored_config
from runs.errors import EXIT_FAILED, RunError, fail, input_errors, report
from runs.export import EXPORT_KINDS, write_export
from runs.layout import DEFAULT_OUTPUT_DIR, EXPORT_CONFIG, EXPORT_WEIGHTS, LAST, RunLayout, ckpt_root, find_runs


def find_checkpoint(run: str, output_dir: Path) -> Path:
    """``run`` as a checkpoint file, else as a run name under ``output_dir``."""
    as_path = Path(run).expanduser()
    if as_path.is_dir() and (as_path / LAST).is_file():
        return as_path / LAST  # a run folder, <output_dir>/ckpts/<arch>/<run>/
    if as_path.suffix == ".pt" or as_path.exists() or "/" in run:
        return as_path  # read_checkpoint names what is wrong with it
    root = ckpt_root(output_dir)
    runs = find_runs(root)
    matches = [layout.last for layout in runs if layout.run == run]
    if not matches:
        known = ", ".join(sorted({layout.run for layout in runs})) or "none"
        raise RunError(f"no run {run!r} under {root} (runs there: {known}): give a run name or a checkpoint path")
    if len(matches) > 1:
        raise RunError(f"run name {run!r} exists for several architectures ({', '.join(map(str, matches))}): give the checkpoint path")
    return matches[0]


def export(run: str, output_dir: Path, out: Path | None, weights: str, force: bool) -> Path:
    """Write the export folder of ``run`` and return it."""
    path = find_checkpoint(run, output_dir)
    state = read_checkpoint(path)
    # What evaluation would refuse is not exported: the stored config goes through the same
    # building and checks as eval_checkpoint's (the data itself is the evaluating machine's).
    source = f"checkpoint {str(path)!r}"
    cfg = stored_run_config(stored_config(state["config"], source), [f"eval_checkpoint={path}"], source, what="export")
    validate_config(cfg, use="export")
    if out is None:
        run_name = str(cfg.run_name)  # checked like a typed run name
        # An archived epoch gets its own folder beside the run's latest export.
        layout = RunLayout(output_dir, str(cfg.model.name), run_name)
        out = layout.export_dir(None if path.name == LAST else state["epoch"])
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {str(out)!r} is a file: expected a folder for {EXPORT_WEIGHTS} and {EXPORT_CONFIG}")
    taken = [name for name in (EXPORT_WEIGHTS, EXPORT_CONFIG) if (out / name).exists()]
    if taken and not force:
        raise RunError(f"{str(out)!r} already holds an export ({', '.join(taken)}): pass --force to replace it, or --out another folder")
    write_export(state, out, weights, source=str(path))
    print(f"exported {weights} weights of {str(path)!r} (epoch {int(state['epoch'])}, step {int(state['step'])}) to {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run name (its last.pt under --output-dir) or a checkpoint file")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR, help="where runs live (default: outputs)")
    parser.add_argument("--out", type=Path, default=None, help="export folder (default: OUTPUT_DIR/export/RUN_NAME)")
    parser.add_argument("--weights", choices=EXPORT_KINDS, default="ema", help="which weights to export (default: ema)")
    parser.add_argument("--force", action="store_true", help="replace an existing export in the folder")
    args = parser.parse_args(argv)
    try:
        export(args.run, args.output_dir, args.out, args.weights, args.force)
    except (RunError, *input_errors()) as err:  # a constructor's or the config's own refusal included
        return report(err)
    except OSError as err:  # an unwritable or full export folder
        return fail(f"cannot write the export: {err}", EXIT_FAILED)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
