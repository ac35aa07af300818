"""Continuous batching of concurrent requests: a bounded queue grouped by key, one worker thread.

Items whose keys are equal (same task and input size) can share a forward pass. A batch starts
as soon as the worker is free and takes up to ``max_batch`` items of one group, whatever has
queued meanwhile: nothing waits for a batch to fill, so a lone request goes straight to the
model, and under load the items that arrive while the worker is busy form the next batch by
themselves (the dynamic batching of TorchServe and Triton with no queue delay).

When the worker frees up and several groups wait, the fullest one runs first (more images per
forward pass) unless the oldest waiting item has waited ``max_delay_s`` or longer, in which case
its group runs: ``max_delay_s`` bounds how long an item may be passed over for a fuller batch of
another key, and 0 means first come, first served. The model runs in the single worker thread,
off the event loop, which therefore keeps answering health checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
P = TypeVar("P")
R = TypeVar("R")


class QueueFullError(RuntimeError):
    """The queue holds ``max_queue`` items: the caller should retry later."""


class BatcherClosedError(RuntimeError):
    """The batcher is not running (not started yet, or stopped)."""


@dataclass
class _Item(Generic[P, R]):
    payload: P
    future: asyncio.Future[R]
    arrival: float  # loop time: how long it has waited
    seq: int  # arrival order (loop times of one tick can be equal on coarse clocks)


class MicroBatcher(Generic[K, P, R]):
    """Groups payloads by key into batches for ``run_batch(key, payloads) -> results``."""

    def __init__(
        self,
        run_batch: Callable[[K, list[P]], Sequence[R]],
        *,
        max_batch: int,
        max_delay_s: float,
        max_queue: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_delay_s < 0:
            raise ValueError(
                f"need max_batch >= 1, max_queue >= 1, max_delay_s >= 0; got {max_batch}, "
                f"{max_queue}, {max_delay_s}"
            )
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._pending: OrderedDict[K, deque[_Item[P, R]]] = OrderedDict()
        self._size = 0
        self._seq = itertools.count()
        self._in_flight: list[_Item[P, R]] = []
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def queued(self) -> int:
        """Items waiting for the worker (not counting the batch it is running)."""
        return self._size

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the worker thread (between batches), e.g. a warm-up pass."""
        if self._executor is None:
            raise BatcherClosedError("the batcher is not running")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def start(self) -> None:
        """Start the dispatcher on the running event loop and the worker thread."""
        if self.running:
            return
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="densedino-model")
        self._task = asyncio.get_running_loop().create_task(self._dispatch())

    async def stop(self) -> None:
        """Stop dispatching; waiting and in-flight items fail with BatcherClosedError."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        closed = BatcherClosedError("the server is shutting down")
        for items in [*self._pending.values(), self._in_flight]:
            for item in items:
                if not item.future.done():
                    item.future.set_exception(closed)
        self._pending.clear()
        self._in_flight = []
        self._size = 0
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def submit(self, items: Sequence[tuple[K, P]]) -> list[asyncio.Future[R]]:
        """Queue all items or none (QueueFullError); one future per item, in order."""
        if not self.running or self._arrived is None:
            raise BatcherClosedError("the batcher is not running")
        if self._size + len(items) > self.max_queue:
            raise QueueFullError(
                f"the queue holds {self._size} of {self.max_queue} items; retry later"
            )
        loop = asyncio.get_running_loop()
        futures = []
        for key, payload in items:
            item: _Item[P, R] = _Item(payload, loop.create_future(), loop.time(), next(self._seq))
            self._pending.setdefault(key, deque()).append(item)
            futures.append(item.future)
        self._size += len(items)
        self._arrived.set()
        return futures

    async def run(self, items: Sequence[tuple[K, P]]) -> list[R]:
        """Queue the items and wait for all of their results (the first error is raised)."""
        futures = self.submit(items)
        results = await asyncio.gather(*futures, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results  # type: ignore[return-value]

    async def _dispatch(self) -> None:
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        while True:
            # The worker is free here: wait only if nothing is queued at all.
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            key = self._pick_group(loop.time())
            group = self._pending[key]
            batch = [group.popleft() for _ in range(min(self.max_batch, len(group)))]
            if not group:
                del self._pending[key]
            self._size -= len(batch)
            batch = [item for item in batch if not item.future.done()]  # caller gone
            if batch:
                await self._execute(loop, key, batch)

    def _pick_group(self, now: float) -> K:
        """The key of the next batch: the fullest group, or the oldest item's once it is due.

        Each group is in arrival order, so its head is its oldest item; the groups are few (one
        per task and input size), so scanning them is cheap.
        """
        pending = self._pending
        oldest_key = min(pending, key=lambda k: pending[k][0].seq)
        if len(pending) == 1 or now - pending[oldest_key][0].arrival >= self.max_delay_s:
            return oldest_key
        # Ties go to the group with the older head item.
        return max(
            pending, key=lambda k: (min(len(pending[k]), self.max_batch), -pending[k][0].seq)
        )

    async def _execute(
        self, loop: asyncio.AbstractEventLoop, key: K, batch: list[_Item[P, R]]
    ) -> None:
        assert self._executor is not None
        if self._on_batch is not None:
            self._on_batch(len(batch))
        self._in_flight = batch  # failed by stop() if cancelled while the worker runs it
        try:
            results = await loop.run_in_executor(
                self._executor, self._run_batch, key, [item.payload for item in batch]
            )
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)}")
        except Exception as exc:
            self._in_flight = []
            log.exception("batch of %d failed (key %r)", len(batch), key)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        self._in_flight = []
        for item, result in zip(batch, results, strict=True):
            if not item.future.done():
                item.future.set_result(result)
