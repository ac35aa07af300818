#!/usr/bin/env bash
# Makes a local Debian bookworm base image with Python 3.11 for docker/Dockerfile, for machines
# that reach a Debian mirror and PyPI but not Docker Hub (python:3.11-slim-bookworm cannot be
# pulled). Runs as root on a Debian/Ubuntu host with debootstrap and a Docker engine:
#
#   sudo docker/build_local_base.sh                       # -> image densedino-base:bookworm
#   docker build -f docker/Dockerfile --target cpu \
#       --build-arg PYTHON_IMAGE=densedino-base:bookworm -t densedino:cpu .
#
# Environment: BASE_TAG (image tag, default densedino-base:bookworm), MIRROR (Debian mirror,
# default deb.debian.org), SUITE (default bookworm). The image holds a minbase root filesystem
# with python3, python3-venv and ca-certificates: what the Dockerfile's stages expect of
# python:3.11-slim-bookworm (apt-get, python3, a venv module). `python` is linked to python3.
set -euo pipefail

BASE_TAG=${BASE_TAG:-densedino-base:bookworm}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
log() { echo "[build_local_base] $*" >&2; }

[[ $EUID -eq 0 ]] || { log "run as root (debootstrap needs it)"; exit 1; }
for tool in debootstrap docker; do
    command -v "$tool" >/dev/null || { log "$tool not found (apt-get install debootstrap docker.io)"; exit 1; }
done

root=$(mktemp -d /tmp/densedino-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
start=$(date +%s)
log "debootstrap $SUITE (minbase) into $root from $MIRROR"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$root" "$MIRROR" >&2
# What python:*-slim images also do: keep apt lean, no caches in layers, `python` on PATH.
ln -sf python3 "$root/usr/bin/python"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
cat > "$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Install-Recommends "false";
EOF

log "docker import -> $BASE_TAG"
tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$BASE_TAG" >/dev/null
docker run --rm "$BASE_TAG" python --version >&2
log "done in $(($(date +%s) - start)) s: $(docker image inspect -f '{{.Size}}' "$BASE_TAG") bytes"
