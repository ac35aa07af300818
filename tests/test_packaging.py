"""The installed environment: imports, package mapping, wheel contents and console scripts."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCRIPTS = [
    "densedino-train",
    "densedino-eval",
    "densedino-serve",
    "densedino-demo",
    "densedino-data",
]
# Source folder -> installed package name (pyproject's package-dir mapping).
MAPPING = {
    "densedino": "densedino",
    "evaluation": "densedino.evaluation",
    "serve": "densedino.serve",
}


def repo_packages() -> set[str]:
    """Every package in the source tree, under the name it must be installed as."""
    found = set()
    for folder, name in MAPPING.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *rel)))
    return found


@pytest.mark.parametrize(
    "module",
    [
        "densedino",
        "densedino.evaluation",
        "densedino.serve",
        "mmseg.models",
        "mmcv.ops",
        "faiss",
        "timm",
    ],
)
def test_stack_imports(module: str) -> None:
    importlib.import_module(module)


def test_editable_install_maps_evaluation_and_serve() -> None:
    import densedino.evaluation
    import densedino.serve

    assert Path(densedino.evaluation.__file__).parent == ROOT / "evaluation"
    assert Path(densedino.serve.__file__).parent == ROOT / "serve"


@pytest.mark.parametrize("script", SCRIPTS)
def test_console_script_help(script: str) -> None:
    out = subprocess.run([BIN / script, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout


@pytest.mark.slow
def test_wheel_ships_mapped_packages_only(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("densedino-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {
        Path(n).parent.as_posix().replace("/", ".") for n in names if n.endswith("__init__.py")
    }
    assert shipped == repo_packages()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"densedino"}, "no generic top-level names (serve, evaluation) may ship"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert all(s in text for s in SCRIPTS)

    # The wheel's own files import (found before the editable finder via PYTHONPATH).
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        timeout=300,
    )
    code = "import densedino.evaluation as e, densedino.serve as s; print(e.__file__, s.__file__)"
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
        timeout=120,
    )
    assert all(p.startswith(str(target)) for p in out.stdout.split()), out.stdout
