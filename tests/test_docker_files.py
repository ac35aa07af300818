"""docker/: the Dockerfile's targets and install path, the compose files' services.

No Docker engine runs here, so the files are parsed (dockerfile-parse; PyYAML and the
compose-spec JSON schema that check-jsonschema ships) and checked for what the README promises.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
CHECKPOINT = "/ckpt/backbone.safetensors"
PORTS = {"api": 8000, "demo": 7860}


# -------------------------------------------------------------------------------- Dockerfile
def stages() -> dict[str, dict[str, Any]]:
    """Stage name -> {"image": resolved base image, "instructions": [(INSTRUCTION, value)]}."""
    with (DOCKER / "Dockerfile").open("rb") as f:
        parser = DockerfileParser(fileobj=f)
        structure, images = parser.structure, parser.parent_images
    found: dict[str, dict[str, Any]] = {}
    current: list[tuple[str, str]] | None = None
    for instruction in structure:
        if instruction["instruction"] == "FROM":
            match = re.fullmatch(r"\S+\s+AS\s+(\S+)", instruction["value"], re.IGNORECASE)
            assert match, f"every stage is named: {instruction['content'].strip()}"
            current = []
            found[match.group(1)] = {"image": images[len(found)], "instructions": current}
        elif current is not None:
            current.append((instruction["instruction"], instruction["value"]))
    return found


def values(stage: dict[str, Any], instruction: str) -> list[str]:
    return [value for name, value in stage["instructions"] if name == instruction]


def env(stage: dict[str, Any]) -> dict[str, str]:
    """ENV of a stage (KEY=value pairs, quotes removed)."""
    out = {}
    for value in values(stage, "ENV"):
        for key, val in re.findall(r'(\w+)=("[^"]*"|\S+)', value):
            out[key] = val.strip('"')
    return out


def resolved(stage: dict[str, Any], value: str) -> str:
    """``value`` with a ``${NAME}`` replaced by the default of the stage's ``ARG NAME=...``."""
    match = re.fullmatch(r"\$\{?(\w+)\}?", value)
    if not match:
        return value
    defaults = dict(a.split("=", 1) for a in values(stage, "ARG") if "=" in a)
    assert match.group(1) in defaults, f"{value} has no ARG default in the stage"
    return defaults[match.group(1)]


def build_stage_of(final: str) -> str:
    """The stage whose /app a runtime stage copies."""
    sources = [
        m.group(1)
        for v in values(stages()[final], "COPY")
        if (m := re.match(r"--from=(\S+)\s+/app\s+/app$", v))
    ]
    assert len(sources) == 1, f"{final} copies /app from exactly one build stage"
    return sources[0]


def test_dockerfile_has_cpu_and_cuda_targets_on_python_311() -> None:
    found = stages()
    assert {"cpu", "cuda"} <= set(found)
    assert re.fullmatch(r"python:3\.11-slim-\w+", found["cpu"]["image"])
    assert found["cuda"]["image"].startswith("nvidia/cuda:")
    cuda_build = found[build_stage_of("cuda")]
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-cudnn-devel-ubuntu[\d.]+", cuda_build["image"])
    assert env(cuda_build)["PYTHON_BIN"] == "python3.11"
    assert any("python3.11-venv" in run for run in values(cuda_build, "RUN"))
    for stage in found.values():
        image = stage["image"]
        assert "$" not in image and ":" in image and not image.endswith(":latest"), image


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_both_targets_install_with_the_readme_script(target: str) -> None:
    build = stages()[build_stage_of(target)]
    runs = values(build, "RUN")
    assert sum("scripts/install.sh" in run for run in runs) == 1
    assert resolved(build, env(build)["EXTRAS"]) == "all", "images skip the dev tools"
    assert ("COPY", ". .") in build["instructions"], "the whole repository is installed"
    assert (ROOT / "scripts" / "install.sh").is_file()
    assert os.access(ROOT / "scripts" / "install.sh", os.X_OK), "RUN calls it directly"


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_runtime_targets_run_the_commands_as_a_user(target: str) -> None:
    stage = stages()[target]
    assert env(stage)["PATH"].startswith("/app/.venv/bin:")
    assert values(stage, "USER") and values(stage, "USER")[-1] not in ("root", "0")
    exposed = {int(p) for v in values(stage, "EXPOSE") for p in v.split()}
    assert exposed == set(PORTS.values())
    assert not any("install.sh" in run for run in values(stage, "RUN")), "built, not rebuilt"
    command = json.loads(values(stage, "CMD")[-1])
    assert command[0] == "densedino-demo" and "0.0.0.0" in command


def test_apt_layers_are_lean() -> None:
    """hadolint's DL3015 and DL3009: no recommended packages, no apt lists left behind."""
    for name, stage in stages().items():
        for run in values(stage, "RUN"):
            for install in re.findall(r"apt-get install[^&]*", run):
                assert "--no-install-recommends" in install and "-y" in install, (name, install)
            if "apt-get update" in run:
                assert "rm -rf /var/lib/apt/lists/*" in run, name


def test_dockerignore_keeps_the_host_venv_out() -> None:
    ignored = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", "work_dirs"} <= set(ignored)


# ----------------------------------------------------------------------------------- compose
def compose(name: str) -> dict[str, Any]:
    document = yaml.safe_load((DOCKER / name).read_text())
    schema_file = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads((schema_file / "compose-spec.json").read_text())
    jsonschema.validate(document, schema)
    return document


def published(service: dict[str, Any]) -> set[int]:
    """Container ports published by a service (short syntax HOST_IP:HOST:CONTAINER)."""
    return {int(str(port).rsplit(":", 1)[-1]) for port in service["ports"]}


def test_compose_runs_api_and_demo_on_a_checkpoint_volume() -> None:
    services = compose("compose.yaml")["services"]
    assert set(services) == {"api", "demo"}
    for name, service in services.items():
        command = service["command"]
        assert command[0] == f"densedino-{'serve' if name == 'api' else 'demo'}"
        assert command[command.index("--checkpoint") + 1] == CHECKPOINT
        assert command[command.index("--host") + 1] == "0.0.0.0"
        assert int(command[command.index("--port") + 1]) == PORTS[name]
        assert published(service) == {PORTS[name]}
        (mount,) = service["volumes"]
        assert mount["target"] == os.path.dirname(CHECKPOINT) and mount["read_only"]
        build = service["build"]
        assert build["target"] == "cpu"
        context = DOCKER / build["context"]
        assert (context / build["dockerfile"]).resolve() == DOCKER / "Dockerfile"
        assert (context / "scripts" / "install.sh").is_file()


def test_compose_passes_the_api_key_and_binds_loopback_by_default() -> None:
    services = compose("compose.yaml")["services"]
    assert services["api"]["environment"]["DENSEDINO_API_KEY"] == "${DENSEDINO_API_KEY:-}"
    for service in services.values():
        assert all(str(p).startswith("${DENSEDINO_BIND:-127.0.0.1}:") for p in service["ports"])


def test_compose_health_checks_hit_the_services() -> None:
    services = compose("compose.yaml")["services"]
    urls = {"api": "http://127.0.0.1:8000/healthz", "demo": "http://127.0.0.1:7860/"}
    for name, service in services.items():
        check = service["healthcheck"]
        assert check["test"][0] == "CMD" and urls[name] in " ".join(check["test"])
        assert {"interval", "timeout", "retries", "start_period"} <= set(check)


def test_gpu_override_switches_to_cuda() -> None:
    services = compose("compose.gpu.yaml")["services"]
    assert set(services) == {"api", "demo"}
    for name, service in services.items():
        assert service["build"]["target"] == "cuda"
        command = service["command"]
        assert command[command.index("--device") + 1] == "cuda"
        assert int(command[command.index("--port") + 1]) == PORTS[name]
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
