#!/usr/bin/env bash
# Render every visualizer that applies to a run into outputs/vis/<run_name>/.
#
#   cd visualizers && ./vis_all.sh [RUN_NAME] [options]     # or, from the repo root:
#   visualizers/vis_all.sh [RUN_NAME] [options]
#
# Without RUN_NAME the run with the newest last.pt under outputs/ckpts is drawn.
# Options (passed to python -m visualizers.render_all; see its --help):
#   --ckpt-root DIR  --out-root DIR  --num-samples N  --seed S  --fps F  --no-mp4
# Relative paths in options are taken from the repo root (the script runs there).
# The interpreter is $PYTHON, else the repo's .venv/bin/python, else python.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"  # relative paths (outputs/...) and the absolute imports are from the root

if [[ -n "${PYTHON:-}" ]]; then
    py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
    py=.venv/bin/python
else
    py=python
fi

exec "$py" -m visualizers.render_all "$@"
