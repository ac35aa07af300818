#!/usr/bin/env bash
# Debian's Chromium + ChromeDriver for the Gradio demo's browser test (tests/test_demo_browser.py).
# No-op when both are present; needs root or sudo otherwise.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
SUDO=""
[[ $(id -u) -ne 0 ]] && SUDO=sudo
echo "[install_browser] installing Debian chromium + chromium-driver"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
