"""torchrun entry points: a failing rank reports and leaves instead of waiting in a barrier."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from densedino import dist as dd


@pytest.fixture
def fake_group(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    return calls


def test_a_finished_rank_waits_for_the_others(fake_group: list[str]) -> None:
    assert dd.finishes_process_group(lambda: 3)() == 3
    assert fake_group == ["barrier", "destroy"]


def test_a_failing_rank_prints_and_skips_the_barrier(fake_group, capsys) -> None:
    def entry() -> None:
        raise FileNotFoundError("no tensorboard")

    with pytest.raises(FileNotFoundError):
        dd.finishes_process_group(entry)()
    assert fake_group == []
    err = capsys.readouterr().err
    assert "[rank 1] failed" in err and "no tensorboard" in err
