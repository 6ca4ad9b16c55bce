"""Dynamic batching, as Triton's `dynamic_batching`: requests that arrive within
`max_queue_delay_s` of the first waiting one are run as one model batch, up to
`max_batch_size`, so the GPU sees batches instead of single images.

The queue is bounded (a full queue is refused at once: RESOURCE_EXHAUSTED), and a request
whose deadline passed while it waited is dropped, not computed. Batches run one at a time
on a worker thread, so the event loop keeps accepting calls while the models work.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from PIL import Image

from gmv_engine.credit import Attribution
from gmv_engine.errors import IndexUnavailableError

from .logs import generation_id, generation_ids
from .metrics import ServerMetrics

log = logging.getLogger("gmv.server.batcher")


class QueueFullError(Exception):
    """The batcher's queue is at max_queue_size."""


class DeadlinePassedError(Exception):
    """The caller's deadline passed before its batch ran."""


class ShuttingDownError(Exception):
    """The server is stopping and will not run this request."""


# (items, top_ks) -> one result per item; an item is whatever the caller submitted (the
# attribution service submits (collection's attributor, image) pairs).
RunBatch = Callable[[Sequence[object], Sequence[int]], list[Attribution]]


@dataclass
class _Pending:
    image: Image.Image
    top_k: int
    deadline: float | None  # time.monotonic() seconds
    future: asyncio.Future
    enqueued: float
    generation_id: str = ""  # for the log lines of its batch


class DynamicBatcher:
    def __init__(self, run_batch: RunBatch, metrics: ServerMetrics, max_batch_size: int = 32,
                 max_queue_delay_s: float = 0.005, max_queue_size: int = 256):
        if max_batch_size < 1 or max_queue_size < 1 or max_queue_delay_s < 0:
            raise ValueError("max_batch_size and max_queue_size must be >= 1 and max_queue_delay >= 0")
        self.run_batch = run_batch
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=max_queue_size)
        self._task: asyncio.Task | None = None
        metrics.queue_capacity.set(max_queue_size)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, image: Image.Image, top_k: int, deadline: float | None) -> Attribution:
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Pending(image, top_k, deadline, future, time.monotonic(), generation_id.get()))
        except asyncio.QueueFull:
            raise QueueFullError(f"the server's queue is full ({self._queue.maxsize} waiting); retry with backoff") from None
        self.metrics.queue_depth.set(self._queue.qsize())
        return await future

    async def _next_batch(self) -> list[_Pending]:
        batch = [await self._queue.get()]
        closes = time.monotonic() + self.max_queue_delay_s
        while len(batch) < self.max_batch_size:
            remaining = closes - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        self.metrics.queue_depth.set(self._queue.qsize())
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            now = time.monotonic()
            live = []
            for pending in batch:
                if pending.future.done():  # the caller went away (cancelled, or its stream ended)
                    self.metrics.cancelled_drops.inc()
                    continue
                if pending.deadline is not None and now >= pending.deadline:
                    self.metrics.deadline_drops.inc()
                    pending.future.set_exception(DeadlinePassedError("the deadline passed while the request was queued"))
                    continue
                self.metrics.queue_seconds.observe(now - pending.enqueued)
                live.append(pending)
            if not live:
                continue
            started = time.perf_counter()
            ids = generation_ids.set(tuple(p.generation_id for p in live))  # lines logged while the batch runs
            try:
                results = await asyncio.to_thread(self._run_isolating, live)
            finally:
                generation_ids.reset(ids)
            self.metrics.batch_executions.inc()
            self.metrics.batch_size.observe(len(live))
            self.metrics.compute_seconds.observe(time.perf_counter() - started)
            for pending, result in zip(live, results):
                if pending.future.done():
                    continue
                if isinstance(result, Exception):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result(result)

    def _run_isolating(self, live: list[_Pending]) -> list:
        """One result per request, or the exception that request alone causes: when a batch fails,
        each of its requests runs on its own, so one bad item fails only its own caller."""
        try:
            return self.run_batch([p.image for p in live], [p.top_k for p in live])
        except Exception as exc:  # noqa: BLE001
            # Milvus down is every request's answer: running them one by one would only wait longer.
            if len(live) == 1 or isinstance(exc, IndexUnavailableError):
                return [exc] * len(live)
            log.warning("a batch of %d failed (%s: %s); running its requests one by one", len(live),
                        type(exc).__name__, exc)
        outcomes: list = []
        for pending in live:
            try:
                outcomes.extend(self.run_batch([pending.image], [pending.top_k]))
            except Exception as exc:  # noqa: BLE001 - this request's own failure
                outcomes.append(exc)
        return outcomes

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(ShuttingDownError("the server is shutting down"))
