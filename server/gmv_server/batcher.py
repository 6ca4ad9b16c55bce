"""Dynamic batching, as Triton's `dynamic_batching`: requests that arrive within
`max_queue_delay_s` of the first waiting one are run as one model batch, up to
`max_batch_size`, so the GPU sees batches instead of single images.

The queue is shared fairly: each request belongs to a flow (its tenant, and within the
tenant its stream or "unary"), and batches are filled round-robin over tenants, then over
each tenant's flows, so a tenant that floods waits behind its own requests while another
tenant's request goes into the next batch; and with two lanes or more, one tenant never
holds every lane. How many requests may be in progress at all is admission's to say
(admission.py). A request whose deadline passed or whose caller went away while it waited
is dropped, not computed. Batches run on the lanes' own threads, so the event loop keeps
accepting calls while the models work, and a batch never waits behind other thread work.

Lanes share the machine's cores, so a flood's batch would slow another tenant's batch that runs
beside it. A batch is *bulk* when one of its tenants has more requests in progress than the batch
holds (a backlog: queued, decoding, waiting for a place), and *interactive* otherwise; bulk lanes
pause between pipeline stages while an interactive batch runs (`LanePriority`), and while other
tenants share the server a bulk batch runs in small chunks, the requests of tenants without a
backlog in the first, each chunk answered as it ends. So a tenant under its fair share gets its
answer in about the time of an idle server, and a flood alone still runs at full speed.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable, Container, Sequence

from PIL import Image

from gmv_engine.credit import Attribution
from gmv_engine.errors import IndexUnavailableError

from .logs import generation_id, generation_ids
from .metrics import ServerMetrics

log = logging.getLogger("gmv.server.batcher")


class QueueFullError(Exception):
    """The batcher's queue, or the tenant's share of it, is full."""


class DeadlinePassedError(Exception):
    """The caller's deadline passed before its batch ran."""


class ShuttingDownError(Exception):
    """The server is stopping and will not run this request."""


# (items, top_ks, checkpoint) -> one result per item; an item is whatever the caller submitted
# (the attribution service submits (collection's attributor, image) pairs). The runner calls
# checkpoint() between its stages: where a bulk batch gives way to an interactive one.
RunBatch = Callable[[Sequence[object], Sequence[int], Callable[[], None]], list[Attribution]]


@dataclass
class _Pending:
    image: Image.Image
    top_k: int
    deadline: float | None  # time.monotonic() seconds
    future: asyncio.Future
    enqueued: float
    generation_id: str = ""  # for the log lines of its batch
    tenant: str = ""


Flow = tuple[str, str]  # (tenant, stream within the tenant)
UNARY = "unary"  # the flow of a tenant's unary calls


class FairQueue:
    """Waiting requests per flow, taken round-robin over tenants, then over a tenant's flows
    (policy "fair"); policy "fifo" puts every request in one flow (arrival order). Unbounded
    itself: admission (admission.py) bounds what reaches it."""

    def __init__(self, policy: str = "fair"):
        if policy not in ("fair", "fifo"):
            raise ValueError(f"queue policy must be fair or fifo, not {policy!r}")
        self.policy = policy
        self._tenants: OrderedDict[str, OrderedDict[str, deque]] = OrderedDict()  # round-robin order
        self._size = 0
        self._changed = asyncio.Event()  # set on every put, and when a lane frees a tenant

    def __len__(self) -> int:
        return self._size

    def put(self, flow: Flow, pending: "_Pending") -> None:
        tenant, stream = flow if self.policy == "fair" else ("", "")
        self._tenants.setdefault(tenant, OrderedDict()).setdefault(stream, deque()).append(pending)
        self._size += 1
        self.notify()

    def take(self, excluded: Container[str] = ()) -> "_Pending | None":
        """The next request in turn, skipping tenants in `excluded`; None when there is none."""
        for tenant, flows in self._tenants.items():
            if tenant in excluded:
                continue
            stream, waiting = next(iter(flows.items()))
            pending = waiting.popleft()
            # The flow goes to the back of its tenant's line, the tenant to the back of the queue's.
            if waiting:
                flows.move_to_end(stream)
            else:
                del flows[stream]
            if flows:
                self._tenants.move_to_end(tenant)
            else:
                del self._tenants[tenant]
            self._size -= 1
            return pending
        return None

    def waiting(self, tenant: str) -> int:
        """How many of the tenant's requests wait here (0 under the fifo policy, which has no tenants)."""
        return sum(len(waiting) for waiting in self._tenants.get(tenant, {}).values())

    def notify(self) -> None:
        self._changed.set()

    async def changed(self, timeout_s: float | None = None) -> None:
        """Wait until a request is put or a tenant freed (asyncio.TimeoutError after timeout_s)."""
        self._changed.clear()
        await asyncio.wait_for(self._changed.wait(), timeout_s)


def _settle(done: list[_Pending], outcomes: "list | BaseException") -> None:
    """Each caller's result or exception (outcomes: one per request, or one for all)."""
    each = [outcomes] * len(done) if isinstance(outcomes, BaseException) else outcomes
    for pending, outcome in zip(done, each):
        if pending.future.done():
            continue
        if isinstance(outcome, BaseException):
            pending.future.set_exception(outcome)
        else:
            pending.future.set_result(outcome)


class LanePriority:
    """Interactive batches before bulk ones, at stage granularity: while any lane runs an
    interactive batch, a bulk lane waits at its next checkpoint (between pipeline stages), for at
    most `max_pause_s` each time so that a stream of interactive batches cannot stop a bulk one."""

    def __init__(self, max_pause_s: float = 0.5):
        self.max_pause_s = max_pause_s
        self._interactive = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def interactive(self):
        with self._changed:
            self._interactive += 1
        try:
            yield
        finally:
            with self._changed:
                self._interactive -= 1
                self._changed.notify_all()

    def give_way(self) -> None:
        """A bulk lane's checkpoint: wait while an interactive batch runs."""
        with self._changed:
            self._changed.wait_for(lambda: not self._interactive, self.max_pause_s)


def _no_checkpoint() -> None:
    pass


class DynamicBatcher:
    """Batches from the fair queue, run on `lanes` worker threads at once (as Triton's model
    instances). With more than one lane, one tenant may occupy all lanes but one, so a flood
    leaves a lane on which another tenant's request runs at once instead of waiting for the
    flood's batch to finish, and the flood's lane gives way to it between stages."""

    def __init__(self, run_batch: RunBatch, metrics: ServerMetrics, max_batch_size: int = 32,
                 max_queue_delay_s: float = 0.005, max_queue_size: int = 256, max_tenant_queue_share: float = 1.0,
                 queue_policy: str = "fair", lanes: int = 1, bulk_chunk: int = 4,
                 max_tenant_line_bytes: int | None = None):
        if max_batch_size < 1 or max_queue_delay_s < 0 or lanes < 1:
            raise ValueError("max_batch_size and lanes must be >= 1 and max_queue_delay >= 0")
        from .admission import DEFAULT_LINE_BYTES, Admission  # admission raises this module's errors

        self.run_batch = run_batch
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.admission = Admission(max_queue_size, max_tenant_queue_share, metrics,
                                   DEFAULT_LINE_BYTES if max_tenant_line_bytes is None else max_tenant_line_bytes)
        self._queue = FairQueue(queue_policy)
        self.lanes = lanes
        self._max_lanes_per_tenant = lanes - 1 if lanes > 1 and queue_policy == "fair" else lanes
        self._lanes_of: dict[str, int] = {}  # tenant -> lanes running a batch with its requests
        self._tasks: list[asyncio.Task] = []
        self.priority = LanePriority()
        self.bulk_chunk = max(1, bulk_chunk)
        self._threads = ThreadPoolExecutor(lanes, thread_name_prefix="gmv-lane")

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run()) for _ in range(self.lanes)]

    async def submit(self, image: Image.Image, top_k: int, deadline: float | None, tenant: str = "",
                     flow: str = UNARY) -> Attribution:
        """The request's result, once its turn in the fair queue came and its batch ran."""
        future = asyncio.get_running_loop().create_future()
        self._queue.put((tenant, flow), _Pending(image, top_k, deadline, future, time.monotonic(), generation_id.get(),
                                                 tenant))
        self.metrics.queue_depth.set(len(self._queue))
        return await future

    def _busy_tenants(self, mine: set[str]) -> set[str]:
        return {t for t, n in self._lanes_of.items() if n >= self._max_lanes_per_tenant and t not in mine}

    def _take(self, mine: set[str]) -> _Pending | None:
        """The next request this lane may take. A tenant counts as holding the lane from its first
        request on, while the batch still fills, so two lanes filling at once never split one
        tenant's burst between them (nor hand a flood both lanes)."""
        pending = self._queue.take(self._busy_tenants(mine))
        if pending is not None and pending.tenant not in mine:
            mine.add(pending.tenant)
            self._lanes_of[pending.tenant] = self._lanes_of.get(pending.tenant, 0) + 1
        return pending

    def _release(self, mine: set[str]) -> None:
        for tenant in mine:
            self._lanes_of[tenant] -= 1
            if not self._lanes_of[tenant]:
                del self._lanes_of[tenant]
        self._queue.notify()  # its tenants may take a lane again

    async def _next_batch(self, mine: set[str]) -> list[_Pending]:
        while (first := self._take(mine)) is None:
            await self._queue.changed()
        batch = [first]
        closes = time.monotonic() + self.max_queue_delay_s
        while len(batch) < self.max_batch_size:
            pending = self._take(mine)
            if pending is not None:
                batch.append(pending)
                continue
            remaining = closes - time.monotonic()
            if remaining <= 0:
                break
            try:
                await self._queue.changed(remaining)
            except asyncio.TimeoutError:
                break
        self.metrics.queue_depth.set(len(self._queue))
        return batch

    def _backlogged(self, batch: list[_Pending]) -> set[str]:
        """The batch's tenants with more requests than the batch holds: queued, or in progress
        elsewhere (decoding, waiting for a place, in another lane). A flood's queue runs empty at
        moments while it still has a hundred requests on their way; a client that sends one
        request at a time has only the one."""
        held: dict[str, int] = {}
        for pending in batch:
            held[pending.tenant] = held.get(pending.tenant, 0) + 1
        return {tenant for tenant, count in held.items()
                if self._queue.waiting(tenant) or self.admission.in_progress(tenant) > count}

    async def _run(self) -> None:
        while True:
            mine: set[str] = set()  # the tenants in this lane's batch
            try:
                batch = await self._next_batch(mine)
                await self._run_batch(batch, self._backlogged(batch), mine)
            finally:
                self._release(mine)

    async def _run_batch(self, batch: list[_Pending], backlogged: set[str], mine: set[str]) -> None:
        """Run the batch on a lane's thread: *interactive* when none of its tenants is backlogged."""
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
            return
        interactive = not backlogged
        if backlogged:  # requests of tenants with no backlog go in the first chunk (stable: else in turn)
            live.sort(key=lambda pending: pending.tenant in backlogged)
        loop = asyncio.get_running_loop()

        def deliver(start: int, end: int, outcomes: list) -> None:  # on the lane's thread, as each chunk ends
            loop.call_soon_threadsafe(self._chunk_done, live[start:end], outcomes, live[end:], mine)

        started = time.perf_counter()
        ids = generation_ids.set(tuple(p.generation_id for p in live))  # lines logged while the batch runs
        try:
            context = contextvars.copy_context()
            await loop.run_in_executor(self._threads, context.run, self._run_prioritised, live, interactive, deliver)
        except BaseException as exc:
            _settle([p for p in live if not p.future.done()], exc)  # never leave a caller waiting
            raise
        finally:
            generation_ids.reset(ids)
        self.metrics.batch_executions.inc()
        self.metrics.batch_size.observe(len(live))
        self.metrics.compute_seconds.observe(time.perf_counter() - started)

    def _chunk_done(self, done: list[_Pending], outcomes: list, later: list[_Pending], mine: set[str]) -> None:
        """Answer a chunk's callers, and give up the lane for its tenants with nothing later in the
        batch: a client that sends its next request on the answer must not find its tenant still
        holding this lane (it would then wait for the rest of the batch, and again each time)."""
        _settle(done, outcomes)
        if not later:
            return  # the lane releases its tenants when the batch ends
        freed = {pending.tenant for pending in done} & mine - {pending.tenant for pending in later}
        if freed:
            mine -= freed
            self._release(freed)

    def _run_prioritised(self, live: list[_Pending], interactive: bool,
                         deliver: Callable[[int, int, list], None]) -> None:
        if interactive:
            with self.priority.interactive():
                deliver(0, len(live), self._run_isolating(live, _no_checkpoint))
            return
        # A bulk batch runs in chunks while other tenants share the server, so an interactive
        # batch that arrives waits for at most one chunk's stage, not the batch's; each chunk's
        # callers get their answers as it ends.
        position = 0
        while position < len(live):
            size = self.bulk_chunk if self.admission.shared() else len(live)
            chunk = live[position:position + size]
            deliver(position, position + len(chunk), self._run_isolating(chunk, self.priority.give_way))
            position += len(chunk)

    def _run_isolating(self, live: list[_Pending], checkpoint: Callable[[], None]) -> list:
        """One result per request, or the exception that request alone causes: when a batch fails,
        each of its requests runs on its own, so one bad item fails only its own caller."""
        try:
            return self.run_batch([p.image for p in live], [p.top_k for p in live], checkpoint)
        except Exception as exc:  # noqa: BLE001
            # Milvus down is every request's answer: running them one by one would only wait longer.
            if len(live) == 1 or isinstance(exc, IndexUnavailableError):
                return [exc] * len(live)
            log.warning("a batch of %d failed (%s: %s); running its requests one by one", len(live),
                        type(exc).__name__, exc)
        outcomes: list = []
        for pending in live:
            try:
                outcomes.extend(self.run_batch([pending.image], [pending.top_k], checkpoint))
            except Exception as exc:  # noqa: BLE001 - this request's own failure
                outcomes.append(exc)
        return outcomes

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        while (pending := self._queue.take()) is not None:
            if not pending.future.done():
                pending.future.set_exception(ShuttingDownError("the server is shutting down"))
        self._threads.shutdown(wait=False)
