"""The continuous batcher: no wait for an idle model, batching under load, order, limits.

Each test drives ``MicroBatcher`` with a fake ``run_batch`` that records its batches and can hold
the worker "busy" on a threading.Event, so that what queues meanwhile is known exactly: the
assertions are on batch contents and order, not on timings.
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import threading
from collections.abc import Awaitable, Callable, Hashable

import httpx
import pytest
import torch
from PIL import Image

from densedino.models.vit import build_backbone
from densedino.serve.app import ServeSettings, create_app
from densedino.serve.batcher import BatcherClosedError, MicroBatcher, QueueFullError
from densedino.serve.live import serve_in_thread

HOUR = 3600.0
TIMEOUT_S = 30.0  # generous bound for "finishes": a batching window of HOUR would exceed it


class Worker:
    """A fake model: records (key, payloads) per batch; ``hold()`` keeps the next batch busy."""

    def __init__(self) -> None:
        self.batches: list[tuple[Hashable, list[int]]] = []
        self.started = threading.Event()
        self._release = threading.Event()
        self._release.set()

    def hold(self) -> None:
        self._release.clear()

    def release(self) -> None:
        self._release.set()

    def __call__(self, key: Hashable, payloads: list[int]) -> list[int]:
        self.batches.append((key, list(payloads)))
        self.started.set()
        assert self._release.wait(TIMEOUT_S), "the test never released the worker"
        return [p * 10 for p in payloads]


def run_with(worker: Worker, body: Callable[[MicroBatcher], Awaitable[None]], **kw: float) -> None:
    """Run ``body(batcher)`` on a fresh event loop with a started batcher, then stop it."""

    async def main() -> None:
        options = {"max_batch": 16, "max_delay_s": HOUR, "max_queue": 64, **kw}
        batcher: MicroBatcher = MicroBatcher(worker, **options)  # type: ignore[arg-type]
        batcher.start()
        try:
            await asyncio.wait_for(body(batcher), TIMEOUT_S)
        finally:
            worker.release()
            await batcher.stop()

    asyncio.run(main())


async def busy_with_first(batcher: MicroBatcher, worker: Worker, key: Hashable) -> asyncio.Future:
    """Submit one item and return once the worker is running it (and held there)."""
    worker.hold()
    (future,) = batcher.submit([(key, 0)])
    assert await asyncio.to_thread(worker.started.wait, TIMEOUT_S)
    return future


def test_lone_request_runs_without_waiting_for_the_window():
    """An hour-long max_delay_s must not delay a lone item: it runs alone, at once."""
    worker = Worker()

    async def body(batcher: MicroBatcher) -> None:
        assert await batcher.run([("a", 7)]) == [70]
        assert await batcher.run([("a", 8)]) == [80]

    run_with(worker, body)
    assert worker.batches == [("a", [7]), ("a", [8])]


def test_items_queued_while_busy_form_the_next_batch():
    """While the worker runs one item, five arrive; they run together as soon as it is free."""
    worker = Worker()

    async def body(batcher: MicroBatcher) -> None:
        first = await busy_with_first(batcher, worker, "a")
        futures = batcher.submit([("a", i) for i in range(1, 6)])
        assert batcher.queued == 5
        worker.release()
        assert await asyncio.gather(first, *futures) == [0, 10, 20, 30, 40, 50]

    run_with(worker, body)
    assert worker.batches == [("a", [0]), ("a", [1, 2, 3, 4, 5])]


def test_batches_are_capped_at_max_batch_in_arrival_order():
    worker = Worker()

    async def body(batcher: MicroBatcher) -> None:
        first = await busy_with_first(batcher, worker, "a")
        futures = batcher.submit([("a", i) for i in range(1, 11)])
        worker.release()
        assert await asyncio.gather(first, *futures) == [10 * i for i in range(11)]

    run_with(worker, body, max_batch=4)
    assert [payloads for _, payloads in worker.batches] == [
        [0],
        [1, 2, 3, 4],
        [5, 6, 7, 8],
        [9, 10],
    ]


@pytest.mark.parametrize(
    ("max_delay_s", "order"),
    [
        (HOUR, ["a", "a", "b"]),  # the fuller group "a" goes first, "b" has not waited an hour
        (0.0, ["a", "b", "a"]),  # first come, first served: "b" arrived before "a"'s second lot
    ],
)
def test_max_delay_bounds_how_long_a_group_is_passed_over(max_delay_s, order):
    worker = Worker()

    async def body(batcher: MicroBatcher) -> None:
        first = await busy_with_first(batcher, worker, "a")
        futures = batcher.submit([("b", 1)]) + batcher.submit([("a", 2), ("a", 3)])
        worker.release()
        await asyncio.gather(first, *futures)

    run_with(worker, body, max_delay_s=max_delay_s)
    assert [key for key, _ in worker.batches] == order


def test_first_come_first_served_by_head_item_across_groups():
    """With max_delay_s 0 the group whose head waited longest runs next, also after a group
    was partly drained (its remaining head is then younger than another group's)."""
    worker = Worker()

    async def body(batcher: MicroBatcher) -> None:
        first = await busy_with_first(batcher, worker, "a")
        futures = [
            *batcher.submit([("a", 1), ("a", 2)]),
            *batcher.submit([("b", 3)]),
            *batcher.submit([("a", 4)]),
        ]
        worker.release()
        await asyncio.gather(first, *futures)

    run_with(worker, body, max_delay_s=0.0, max_batch=2)
    assert worker.batches == [("a", [0]), ("a", [1, 2]), ("b", [3]), ("a", [4])]


def test_full_queue_refuses_all_or_nothing_and_stop_fails_waiting_items():
    worker = Worker()

    async def body(batcher: MicroBatcher) -> None:
        first = await busy_with_first(batcher, worker, "a")
        waiting = batcher.submit([("a", 1), ("a", 2)])
        with pytest.raises(QueueFullError):
            batcher.submit([("a", 3), ("a", 4)])  # 2 queued + 2 > max_queue 3
        assert batcher.queued == 2
        await batcher.stop()
        for future in [first, *waiting]:
            with pytest.raises(BatcherClosedError):
                await future
        with pytest.raises(BatcherClosedError):
            batcher.submit([("a", 5)])

    run_with(worker, body, max_queue=3)
    assert worker.batches == [("a", [0])]


def test_a_failing_batch_fails_only_its_items():
    calls: list[list[int]] = []

    def run_batch(key: str, payloads: list[int]) -> list[int]:
        calls.append(payloads)
        if 13 in payloads:
            raise ValueError("unlucky")
        return payloads

    async def main() -> None:
        batcher: MicroBatcher = MicroBatcher(run_batch, max_batch=4, max_delay_s=0, max_queue=8)
        batcher.start()
        try:
            with pytest.raises(ValueError, match="unlucky"):
                await batcher.run([("a", 13)])
            assert await batcher.run([("a", 1)]) == [1]
        finally:
            await batcher.stop()

    asyncio.run(main())
    assert calls == [[13], [1]]


def test_server_answers_a_lone_request_despite_a_huge_max_delay():
    """The app end to end: --max-delay-ms of an hour, one request, one batch of one."""
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", 16, depth=1, img_size=32).eval()
    settings = ServeSettings(max_batch=16, max_delay_ms=HOUR * 1000, max_queue=32)
    app = create_app(model, settings=settings)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=TIMEOUT_S) as http:
        for _ in range(600):
            if http.get("/readyz").status_code == 200:
                break
            threading.Event().wait(0.05)
        png = io.BytesIO()
        Image.new("RGB", (32, 32), (90, 120, 150)).save(png, "PNG")
        body = {"images": [base64.b64encode(png.getvalue()).decode()], "output": "cls"}
        response = http.post("/v1/features", json=body)
        assert response.status_code == 200, response.text
        metrics = http.get("/metrics").text
    assert re.search(r"^densedino_batch_size_count 1(\.0)?$", metrics, re.MULTILINE), metrics
