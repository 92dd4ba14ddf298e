#!/usr/bin/env bash
# Installs the upstream Flyte SDK (PyPI `flyte`) into two virtual environments of its own,
# for the tests and benchmarks that run it; our packages never import it at module level.
#   upstream-venv  upstream alone: the interoperability tests ("a fleet without us").
#   task-venv      upstream + CPU PyTorch, Lightning, Transformers and s3fs: the in-task and
#                  integration tests install our wheels into it beside upstream and run real
#                  task programs (upstream's local mode, or our retry runner).
# Idempotent: a venv that already imports what it needs is kept.
set -euo pipefail
cache="${XDG_CACHE_HOME:-$HOME/.cache}/flyte-checkpoint"
upstream="flyte>=2.6,<3"

venv="${FLYTE_UPSTREAM_VENV:-$cache/upstream-venv}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import flyte" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet "$upstream"
fi
"$venv/bin/python" -c "import importlib.metadata as m; print('upstream flyte', m.version('flyte'), 'at', '$venv')"

task="${CHECKPOINT_TASK_VENV:-$cache/task-venv}"
if [ ! -x "$task/bin/python" ] || ! "$task/bin/python" -c "import flyte, torch, lightning, transformers, accelerate" 2>/dev/null; then
    python3 -m venv "$task"
    "$task/bin/python" -m pip install --quiet --upgrade pip
    # torch first, pinned: 2.13.0 is the CPU build these machines hold on disk; a bare `torch`
    # (or a package asking for a newer one) would pull a CUDA build of several GB.
    "$task/bin/python" -m pip install --quiet torch==2.13.0
    "$task/bin/python" -m pip install --quiet "$upstream" lightning "transformers[torch]" "torch==2.13.0"
fi
# s3fs: a task image with flyte-checkpoint[s3], for the tests that reach S3 through
# upstream's storage settings. Added on its own so that an existing venv is kept.
if ! "$task/bin/python" -c "import s3fs" 2>/dev/null; then
    "$task/bin/python" -m pip install --quiet s3fs
fi
"$task/bin/python" -c "import importlib.metadata as m; print('task venv: flyte', m.version('flyte'), 'torch', m.version('torch'), 'lightning', m.version('lightning'), 'transformers', m.version('transformers'), 'at', '$task')"
