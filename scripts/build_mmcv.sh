#!/usr/bin/env bash
# Builds the full mmcv 2.1.0 (with compiled ops, which mmsegmentation needs) against the torch
# installed in $PYTHON's environment and prints the path of the wheel. The wheel is cached under
# $DENSEDINO_CACHE keyed by mmcv, torch, Python and CUDA, so later installs skip the ~20 min build.
#
# Why patch: mmcv 2.1.0 ships only as an sdist whose setup.py forces -std=c++14/-std=c++17, while
# torch >= 2.10 headers need C++20. Its setup.py also imports pkg_resources (setuptools < 70).
set -euo pipefail

PYTHON=${PYTHON:-.venv/bin/python}
CACHE=${DENSEDINO_CACHE:-$HOME/.cache/densedino}
MMCV_VERSION=2.1.0
MMCV_URL=https://files.pythonhosted.org/packages/a7/19/f97f0fd4d432113a232e75f965335be6b7bb6557ae9faf8051e9a012cadd/mmcv-2.1.0.tar.gz
MMCV_SHA256=d387bcab66b467479b6660310e23746cfc79c6e57acf04094680adb499a5cd3f

log() { echo "[build_mmcv] $*" >&2; }

# CUDA ops only where a GPU and a CUDA compiler are both present (or when forced by the caller).
if [[ -z "${FORCE_CUDA:-}" ]]; then
    if command -v nvcc >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        FORCE_CUDA=1
    else
        FORCE_CUDA=0
    fi
fi
export FORCE_CUDA

read -r torch_version py_tag < <("$PYTHON" -c \
    'import sys, torch; print(torch.__version__.split("+")[0], f"cp{sys.version_info[0]}{sys.version_info[1]}")')
if [[ "$FORCE_CUDA" == 1 ]]; then
    flavour=cu$("$PYTHON" -c 'import torch; print((torch.version.cuda or "none").replace(".", ""))')
else
    flavour=cpu
fi
key="mmcv-${MMCV_VERSION}-torch${torch_version}-${py_tag}-${flavour}"
dest="$CACHE/wheels/$key"

if compgen -G "$dest/mmcv-*.whl" >/dev/null; then
    log "cache hit: $dest"
    ls "$dest"/mmcv-*.whl | head -n 1
    exit 0
fi

log "cache miss ($key): building mmcv $MMCV_VERSION with ops (FORCE_CUDA=$FORCE_CUDA); ~20 min on 2 cores"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
curl -fsSL --retry 3 -o "$work/mmcv.tar.gz" "$MMCV_URL"
echo "$MMCV_SHA256  $work/mmcv.tar.gz" | sha256sum -c --quiet -
tar -xzf "$work/mmcv.tar.gz" -C "$work"
src="$work/mmcv-$MMCV_VERSION"
sed -i -e 's/-std=c++14/-std=c++20/g' -e 's/-std=c++17/-std=c++20/g' "$src/setup.py"

# The build runs in $PYTHON's environment (no isolation) so that it compiles against its torch.
"$PYTHON" -m pip install -q "setuptools<70" wheel ninja
start=$(date +%s)
MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    "$PYTHON" -m pip wheel --no-build-isolation --no-deps -w "$work/dist" "$src" >&2
log "built in $(( $(date +%s) - start )) s"

mkdir -p "$dest.tmp"
cp "$work"/dist/mmcv-*.whl "$dest.tmp/"
rm -rf "$dest" && mv "$dest.tmp" "$dest"   # appears whole or not at all
ls "$dest"/mmcv-*.whl | head -n 1
