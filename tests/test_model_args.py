"""The model options (--checkpoint --arch --which --device) mean the same in every command."""

from __future__ import annotations

import argparse

import pytest
import torch

from densedino.cli.model_args import add_model_arguments, random_arch, resolve_device
from densedino.evaluation.cli import build_parser as eval_parser
from densedino.evaluation.knn_cli import add_arguments as knn_arguments
from densedino.evaluation.seg.cli import add_arguments as seg_arguments
from densedino.serve.cli import build_parser as serve_parser
from densedino.serve.cli import main as serve_main


def _parsers() -> dict[str, tuple[argparse.ArgumentParser, list[str]]]:
    knn = knn_arguments(argparse.ArgumentParser())
    seg = seg_arguments(argparse.ArgumentParser())
    demo = argparse.ArgumentParser()
    add_model_arguments(demo, checkpoint_required=False, random_weights=True)
    return {
        "serve": (serve_parser(), ["--checkpoint", "c"]),
        "knn": (knn, ["--checkpoint", "c", "--data", "d"]),
        "seg": (seg, ["--checkpoint", "c", "--data", "d"]),
        "hbird": (eval_parser(), ["hbird", "--checkpoint", "c", "--data", "d"]),
        "demo": (demo, []),
    }


@pytest.mark.parametrize("command", ["serve", "knn", "seg", "hbird", "demo"])
def test_same_defaults_everywhere(command: str) -> None:
    parser, argv = _parsers()[command]
    args = parser.parse_args(argv)
    assert (args.arch, args.which) == (None, "teacher")
    assert getattr(args, "device", None) is None  # seg has no --device: mmengine places it
    assert random_arch(args) == "vit_small"
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "--arch", "vit_huge"])  # one list of architectures


def test_serve_needs_exactly_one_source(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([], ["--checkpoint", "c", "--random-weights"]):
        with pytest.raises(SystemExit) as exit_info:
            serve_main(argv)
        assert exit_info.value.code == 2
        assert "exactly one of --checkpoint and --random-weights" in capsys.readouterr().err


def test_device_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("cuda:3") == "cuda:3"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_device(None) == "cuda:2"
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device(None) == "cuda:0"
