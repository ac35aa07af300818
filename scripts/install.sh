#!/usr/bin/env bash
# Installs the project into .venv at the repository root with the pinned versions of
# constraints.txt. Idempotent: a second run only checks. Shared by the Makefile, CI and Docker.
#
#   scripts/install.sh                 # everything: training, evaluation, serving, dev tools
#   EXTRAS=all scripts/install.sh      # without dev tools (Docker images)
#   DENSEDINO_CACHE=DIR                # where the built mmcv wheel is cached (~/.cache/densedino)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON_BIN=${PYTHON_BIN:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-all,dev}
PY="$VENV/bin/python"
start=$(date +%s)
log() { echo "[install] $*"; }
# pip.conf on some machines lists local indexes that do not exist; pip warns once per package.
pip_install() {
    "$PY" -m pip install --quiet --constraint constraints.txt "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}

if [[ ! -x "$PY" ]]; then
    log "creating $VENV with $($PYTHON_BIN --version)"
    "$PYTHON_BIN" -m venv "$VENV"
fi

# torch first: mmcv compiles against it.
log "torch + torchvision"
pip_install torch torchvision

if ! "$PY" -c 'import mmcv.ops' >/dev/null 2>&1; then
    log "mmcv (full, with ops)"
    # mmcv's setup.py imports pkg_resources, gone from setuptools >= 70.
    pip_install "setuptools<70" wheel ninja mmengine
    wheel=$(PYTHON="$PY" scripts/build_mmcv.sh)
    pip_install "$wheel"
fi
# torch declares setuptools >= 77 (cpp_extension); the old one was only for mmcv's build.
pip_install "setuptools>=77"

log "densedino[$EXTRAS] (editable)"
pip_install -e ".[$EXTRAS]"
"$PY" -c 'import densedino, densedino.evaluation, densedino.serve, mmseg.models, mmcv.ops, faiss, timm'
log "done in $(( $(date +%s) - start )) s"
