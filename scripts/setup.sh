#!/usr/bin/env bash
# One-command, idempotent set-up: virtualenv, PocketFlow + test extras, Horovod built
# against the installed TensorFlow, offline datasets. A second run skips what is there.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${POCKETFLOW_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
log() { printf '[setup] %s\n' "$*"; }

# 1. virtualenv
if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
pip_q() { pip install --disable-pip-version-check -q "$@"; }

# 2. the package with its extras (TensorFlow first: Horovod compiles against it)
stamp="$VENV/.pocketflow-deps"
want="$(cat "$ROOT/pyproject.toml" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  log "installing PocketFlow and its dependencies"
  pip_q --upgrade pip wheel setuptools cmake
  pip_q -e "$ROOT[test,bench]"
  echo "$want" > "$stamp"
else
  log "dependencies up to date"
fi

# 3. Horovod 0.28.1 against the installed TensorFlow (Gloo, no MPI)
if ! python -c "import horovod.tensorflow" 2>/dev/null; then
  log "building Horovod 0.28.1 against TensorFlow $(python -c 'import tensorflow as tf; print(tf.__version__)' 2>/dev/null) (4-6 min)"
  CMAKE_POLICY_VERSION_MINIMUM=3.5 HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 \
  HOROVOD_WITHOUT_MPI=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
    pip install --disable-pip-version-check -q --no-build-isolation horovod==0.28.1
else
  log "Horovod already built"
fi
horovodrun --check-build

# 4. datasets, offline: Fashion-MNIST into the keras cache layout
KDS="${KERAS_HOME:-$HOME/.keras}/datasets"
mkdir -p "$KDS"
if [ ! -f "$KDS/fashion-mnist/train-images-idx3-ubyte.gz" ]; then
  src=""
  for d in "$ROOT/../shared/data/fashion-mnist" /usr/share/datasets/fashion-mnist; do
    [ -f "$d/train-images-idx3-ubyte.gz" ] && { src="$d"; break; }
  done
  if [ -z "$src" ] && command -v apt-get >/dev/null; then
    log "installing Debian package dataset-fashion-mnist"
    (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
     { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }) || true
    [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && src=/usr/share/datasets/fashion-mnist
  fi
  if [ -n "$src" ]; then
    mkdir -p "$KDS/fashion-mnist"
    for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
      cp -n "$src/$f" "$KDS/fashion-mnist/$f"
    done
    log "Fashion-MNIST available offline in $KDS/fashion-mnist (from $src)"
  else
    log "WARNING: Fashion-MNIST not found on this machine; the demo needs it"
  fi
fi
# MNIST as keras.datasets.mnist reads it
if [ ! -f "$KDS/mnist.npz" ] && [ -f "$ROOT/../shared/data/mnist.npz" ]; then
  cp "$ROOT/../shared/data/mnist.npz" "$KDS/mnist.npz"; log "MNIST available offline in $KDS/mnist.npz"
fi
log "done: source $VENV/bin/activate"
