#!/usr/bin/env bash
# Installs the upstream Flyte SDK (PyPI `flyte`) into its own virtual environment, for the
# interoperability tests and benchmarks only. Our packages never import it.
set -euo pipefail
venv="${FLYTE_UPSTREAM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/flyte-checkpoint/upstream-venv}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import flyte" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet "flyte>=2.0"
fi
"$venv/bin/python" -c "import flyte, importlib.metadata as m; print('upstream flyte', m.version('flyte'), 'at', '$venv')"
