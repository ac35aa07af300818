"""The CPU image for real: build, `compose up` on a checkpoint, health checks, API, demo page.

Opt-in (``DENSEDINO_DOCKER=1``): it needs a Docker engine with BuildKit, a compose (the v2
plugin ``docker compose`` or the v1 ``docker-compose``), network access for the build, and takes
minutes (a cold build compiles mmcv). The client is ``DENSEDINO_DOCKER_CLI`` (default
``docker``); extra ``docker build`` options come from ``DENSEDINO_DOCKER_BUILD_ARGS``, e.g. for a
local base image behind a TLS-intercepting proxy, serving image only::

    DENSEDINO_DOCKER=1 DENSEDINO_DOCKER_CLI=/usr/bin/docker DENSEDINO_DOCKER_BUILD_ARGS="\
        --network host --build-arg PYTHON_IMAGE=densedino-base:bookworm \
        --build-arg TORCH_INDEX_URL= --build-arg EXTRAS=serve \
        --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt" pytest tests/test_docker_image.py

The page check drives headless Chromium like tests/test_demo_browser.py (skipped without it).
Timings (build, time to healthy) are printed, not asserted.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from densedino.models.vit import build_backbone
from densedino.weights import save_backbone

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker" / "compose.yaml"
IMAGE = "densedino:cpu"
# The docker client; e.g. /usr/bin/docker (Debian's 20.10, BuildKit built in) where the one on
# PATH is a newer client without the buildx plugin that its BuildKit builds need.
DOCKER = os.environ.get("DENSEDINO_DOCKER_CLI", "docker")
PROJECT = "densedino-test"
BUILD_TIMEOUT_S = 3 * 3600  # a cold build downloads torch and compiles mmcv
HEALTHY_TIMEOUT_S = 600

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(BUILD_TIMEOUT_S + 1800),
    pytest.mark.skipif(
        os.environ.get("DENSEDINO_DOCKER") != "1",
        reason="builds and runs the Docker image: opt in with DENSEDINO_DOCKER=1",
    ),
]


def compose_command() -> list[str]:
    """``docker compose`` (v2 plugin) where it works, else ``docker-compose`` (v1)."""
    probe = subprocess.run([DOCKER, "compose", "version"], capture_output=True)
    if probe.returncode == 0:
        return [DOCKER, "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("DENSEDINO_DOCKER=1 but neither `docker compose` nor `docker-compose` runs")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(command: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )
    assert result.returncode == 0, f"{shlex.join(command)} failed:\n{result.stderr[-4000:]}"
    return result.stdout


def build_image() -> float:
    """``docker build`` of the cpu target (BuildKit); returns the seconds it took."""
    if shutil.which(DOCKER) is None:
        pytest.fail(f"DENSEDINO_DOCKER=1 but there is no docker client ({DOCKER})")
    extra = shlex.split(os.environ.get("DENSEDINO_DOCKER_BUILD_ARGS", ""))
    command = [DOCKER, "build", "-f", "docker/Dockerfile", "--target", "cpu", "-t", IMAGE]
    start = time.monotonic()
    run([*command, *extra, "."], BUILD_TIMEOUT_S, {**os.environ, "DOCKER_BUILDKIT": "1"})
    return time.monotonic() - start


def png(width: int = 96, height: int = 64) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The compose stack up and healthy on a fresh checkpoint: {"api": url, "demo": url}."""
    build_s = build_image()
    size = int(run([DOCKER, "image", "inspect", "-f", "{{.Size}}", IMAGE], 60))
    print(f"\nbuild {build_s:.0f} s, image {size / 1e9:.2f} GB")

    checkpoint_dir = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", 16, depth=2, img_size=64).eval()
    save_backbone(model, checkpoint_dir / "backbone.safetensors")
    checkpoint_dir.chmod(0o755)  # the container's user (uid 1000) reads it
    (checkpoint_dir / "backbone.safetensors").chmod(0o644)

    ports = {"api": free_port(), "demo": free_port()}
    env = {
        **os.environ,
        "DENSEDINO_CHECKPOINT_DIR": str(checkpoint_dir),
        "DENSEDINO_API_PORT": str(ports["api"]),
        "DENSEDINO_DEMO_PORT": str(ports["demo"]),
        "DENSEDINO_API_KEY": "",
    }
    compose = [*compose_command(), "-f", str(COMPOSE_FILE), "-p", PROJECT]
    try:
        start = time.monotonic()
        run([*compose, "up", "-d", "--no-build"], 300, env)
        wait_healthy(compose, env, start)
        print(f"time to healthy (both services): {time.monotonic() - start:.0f} s")
        yield {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    finally:
        subprocess.run([*compose, "logs", "--no-color", "--tail", "30"], cwd=ROOT, env=env)
        subprocess.run([*compose, "down", "--volumes", "--timeout", "20"], cwd=ROOT, env=env)


def wait_healthy(compose: list[str], env: dict[str, str], start: float) -> None:
    """Poll both containers' Docker health status until healthy (fail if one turns unhealthy)."""
    ids = run([*compose, "ps", "-q"], 60, env).split()
    assert len(ids) == 2, f"expected the api and demo containers, got {ids}"
    while True:
        states = [
            json.loads(run([DOCKER, "inspect", "-f", "{{json .State}}", cid], 60)) for cid in ids
        ]
        health = [s.get("Health", {}).get("Status", "none") for s in states]
        if all(h == "healthy" for h in health):
            return
        assert "unhealthy" not in health and all(s["Running"] for s in states), states
        assert time.monotonic() - start < HEALTHY_TIMEOUT_S, f"not healthy in time: {health}"
        time.sleep(2)


def test_api_answers_features_and_attention(stack: dict[str, str]) -> None:
    with httpx.Client(base_url=stack["api"], timeout=120) as http:
        deadline = time.monotonic() + 300  # healthz is up before the warm-up pass ends
        while http.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the API never became ready"
            time.sleep(1)
        model = http.get("/v1/model").json()
        assert model["embed_dim"] == 192 and model["patch_size"] == 16, model

        image = png()
        features = http.post(
            "/v1/features",
            files=[("images", ("a.png", image))],
            data={"size": "64", "output": "both"},
        )
        assert features.status_code == 200, features.text
        (result,) = features.json()["results"]
        assert result["cls"]["shape"] == [192] and result["patch"]["shape"] == [4, 4, 192]

        attention = http.post(
            "/v1/attention", json={"image": base64.b64encode(image).decode(), "size": 64}
        )
        assert attention.status_code == 200, attention.text
        assert attention.json()["cls_attention"]["shape"] == [3, 4, 4]

        bad = http.post("/v1/features", files=[("images", ("x.png", b"not an image"))])
        assert bad.status_code == 415, bad.text  # checked by content, not by name


def test_demo_page_loads_in_chromium(stack: dict[str, str]) -> None:
    from test_demo_browser import CHROMIUM_FLAGS, WAIT_S, browser_or_skip

    chromium, driver_path = browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(stack["demo"] + "/")
        label = WebDriverWait(driver, WAIT_S).until(
            lambda d: d.find_element(By.ID, "weights-label")
        )
        assert "backbone.safetensors" in label.text, label.text  # the mounted checkpoint
        assert "RANDOM WEIGHTS" not in label.text
    finally:
        driver.quit()
