"""Admission control: how many requests may be in progress at once, in all and per tenant.

A request is admitted before any work is done for it (the ledger lookup, the decode, its
place in the batcher's queue) and holds its place until it is answered, so a flood cannot fill
the thread pool or the queue ahead of others. A tenant may hold `tenant_share` of the places.
Past its share, a tenant's request waits in the tenant's own line, first come first served, for
one of the tenant's places to free; a unary call is refused at once (RESOURCE_EXHAUSTED, the
caller backs off) when the server is full or the tenant's line already holds `line_bytes` (its
requests' images, and a fixed overhead each), and a stream's item always waits, so a stream is
read no faster than it is served. Waiting costs a parked task and the request's bytes, which the
server holds anyway once it has received them; a refusal costs a round trip and a retry for
each attempt, so under a flood a long line is far cheaper than refusals. A place that frees
wakes one waiter, not every one.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import AsyncIterator

from gmv_engine.settings import DEFAULTS

from .batcher import DeadlinePassedError, QueueFullError
from .metrics import ServerMetrics

DEFAULT_LINE_BYTES = int(DEFAULTS.max_tenant_line_mb * 1024 * 1024)
REQUEST_OVERHEAD_BYTES = 16 * 1024  # what a waiting request holds besides its image (message, task)
# Tenants count as sharing the server this long after two last had requests in progress: one that
# sends a request at a time is back within milliseconds, and a flood must still give way to it.
RECENT_S = 1.0


class Admission:
    def __init__(self, max_requests: int, tenant_share: float, metrics: ServerMetrics,
                 line_bytes: int = DEFAULT_LINE_BYTES, recent_s: float = RECENT_S):
        if max_requests < 1 or not 0 < tenant_share <= 1:
            raise ValueError("max_requests must be >= 1 and tenant_share in (0, 1]")
        self.max_requests = max_requests
        self.max_per_tenant = max(1, int(max_requests * tenant_share))
        self.metrics = metrics
        self._per_tenant: dict[str, int] = {}
        self.recent_s = recent_s
        self._shared_until = 0.0  # time.monotonic() until which the server counts as shared
        self._total = 0
        self.line_bytes = line_bytes
        self._lines: dict[str, deque[asyncio.Future]] = {}  # tenant -> waiters, oldest first
        self._line_held: dict[str, int] = {}  # tenant -> bytes its waiters hold
        metrics.queue_capacity.set(max_requests)

    def in_progress(self, tenant: str) -> int:
        """The tenant's requests admitted and not yet answered."""
        return self._per_tenant.get(tenant, 0)

    def shared(self) -> bool:
        """Whether more than one tenant has requests in progress, or had in the last `recent_s`
        (a client that sends one request at a time has none in progress between them). Read from
        the lanes' threads: two reads of values the event loop replaces whole."""
        return len(self._per_tenant) > 1 or time.monotonic() < self._shared_until

    def _note_sharing(self) -> None:
        if len(self._per_tenant) > 1:
            self._shared_until = time.monotonic() + self.recent_s

    def refusal(self, tenant: str) -> str:
        """'' when the tenant may start one more request, else why not."""
        if self._total >= self.max_requests:
            return f"the server has {self.max_requests} requests in progress (max_queue_size); retry with backoff"
        if self._per_tenant.get(tenant, 0) >= self.max_per_tenant:
            return (f"tenant '{tenant}' has {self.max_per_tenant} requests in progress, its share of the server "
                    "(max_tenant_queue_share), and its line of waiting requests is full (max_tenant_line_mb); "
                    "retry with backoff")
        return ""

    @contextlib.asynccontextmanager
    async def admit(self, tenant: str, wait: bool = False, deadline: float | None = None,
                    size: int = 0) -> AsyncIterator[None]:
        """Hold one place of `tenant` for the block. wait: a stream's item, which waits however long
        the line; size: the request's bytes, which it holds while it waits."""
        if (reason := self.refusal(tenant)) or self._lines.get(tenant):
            server_full = self._total >= self.max_requests
            cost = size + REQUEST_OVERHEAD_BYTES
            if not wait and (server_full or self._line_held.get(tenant, 0) + cost > self.line_bytes):
                self.metrics.queue_rejections.labels(reason="queue" if server_full else "tenant").inc()
                raise QueueFullError(reason or self.refusal(tenant) or
                                     f"tenant '{tenant}' has a full line of waiting requests (max_tenant_line_mb); "
                                     "retry with backoff")
            self._line_held[tenant] = self._line_held.get(tenant, 0) + cost
            try:
                await self._wait_in_line(tenant, deadline)
            finally:
                self._line_held[tenant] -= cost
                if not self._line_held[tenant]:
                    del self._line_held[tenant]
        self._per_tenant[tenant] = self._per_tenant.get(tenant, 0) + 1
        self._total += 1
        self._note_sharing()
        try:
            yield
        finally:
            self._note_sharing()
            self._total -= 1
            self._per_tenant[tenant] -= 1
            if not self._per_tenant[tenant]:
                del self._per_tenant[tenant]
            self._wake(tenant)

    async def _wait_in_line(self, tenant: str, deadline: float | None) -> None:
        line = self._lines.setdefault(tenant, deque())
        turn = asyncio.get_running_loop().create_future()
        line.append(turn)
        try:
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise DeadlinePassedError("the deadline passed while the request waited for a place")
                if line[0] is turn and not self.refusal(tenant):
                    return
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(turn), remaining)
                turn = self._renew(line, turn)
        finally:
            line.remove(turn)
            if not line:
                del self._lines[tenant]
            self._wake(tenant)  # the next in this line may go, if there is a place

    @staticmethod
    def _renew(line: deque, turn: asyncio.Future) -> asyncio.Future:
        """A fresh, unset future in the same place of the line (a woken waiter that must wait again)."""
        if not turn.done():
            return turn
        fresh = turn.get_loop().create_future()
        line[line.index(turn)] = fresh
        return fresh

    def _wake(self, tenant: str) -> None:
        """A place freed: the first waiter of this tenant, and, when the server was full, the
        first waiter of every line, may try again."""
        for name, line in self._lines.items():
            if (name == tenant or self._total == self.max_requests - 1) and line and not line[0].done():
                line[0].set_result(None)


class TenantSlots:
    """At most `per_tenant` of one tenant's requests at a time in a shared, first-come-first-served
    stage (the thread pool that looks up replays and decodes images): a flood's backlog there
    would otherwise sit in front of every other tenant's request."""

    def __init__(self, per_tenant: int):
        if per_tenant < 1:
            raise ValueError("per_tenant must be >= 1")
        self.per_tenant = per_tenant
        self._slots: dict[str, tuple[asyncio.Semaphore, int]] = {}  # tenant -> (slots, users)

    @contextlib.asynccontextmanager
    async def slot(self, tenant: str) -> AsyncIterator[None]:
        semaphore, users = self._slots.get(tenant) or (asyncio.Semaphore(self.per_tenant), 0)
        self._slots[tenant] = (semaphore, users + 1)
        try:
            async with semaphore:
                yield
        finally:
            semaphore, users = self._slots[tenant]
            if users == 1:
                del self._slots[tenant]  # no entry per tenant ever seen
            else:
                self._slots[tenant] = (semaphore, users - 1)


class TenantLimits:
    """A tenant's contract, apart from fairness: at most `rate_per_s` requests a second (a token
    bucket holding one second's worth, so short bursts pass) and `max_in_flight` requests in
    progress; 0 turns either off. Past a limit a unary call is refused (RESOURCE_EXHAUSTED,
    counted as reason "rate" or "in_flight"); a stream's item waits, within its deadline."""

    POLL_S = 0.005  # a waiting stream item looks again this often for a freed place

    def __init__(self, rate_per_s: float, max_in_flight: int, metrics: ServerMetrics, clock=time.monotonic):
        self.rate_per_s = rate_per_s
        self.max_in_flight = max_in_flight
        self.metrics = metrics
        self.clock = clock
        self._tokens: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, when counted)
        self._in_flight: dict[str, int] = {}

    def _wait_for_token(self, tenant: str) -> float:
        """Take a token now (0.0), or say how long until one is there (nothing taken)."""
        burst = max(1.0, self.rate_per_s)
        now = self.clock()
        tokens, then = self._tokens.get(tenant, (burst, now))
        tokens = min(burst, tokens + (now - then) * self.rate_per_s)
        if tokens >= 1.0:
            self._tokens[tenant] = (tokens - 1.0, now)
            return 0.0
        self._tokens[tenant] = (tokens, now)
        return (1.0 - tokens) / self.rate_per_s

    def _refuse_or_wait(self, tenant: str, reason: str, wait: bool, deadline: float | None, delay_s: float) -> float:
        if not wait:
            self.metrics.queue_rejections.labels(reason=reason).inc()
            limit = f"{self.rate_per_s:g} requests/s" if reason == "rate" else f"{self.max_in_flight} in flight"
            raise QueueFullError(f"tenant '{tenant}' is at its limit of {limit}; retry with backoff")
        if deadline is not None and time.monotonic() + delay_s > deadline:
            raise DeadlinePassedError(f"tenant '{tenant}' stayed at its {reason} limit until the deadline")
        return delay_s

    @contextlib.asynccontextmanager
    async def hold(self, tenant: str, wait: bool, deadline: float | None) -> AsyncIterator[None]:
        if self.rate_per_s > 0:
            while (delay := self._wait_for_token(tenant)) > 0:
                await asyncio.sleep(self._refuse_or_wait(tenant, "rate", wait, deadline, delay))
        if self.max_in_flight > 0:
            while self._in_flight.get(tenant, 0) >= self.max_in_flight:
                await asyncio.sleep(self._refuse_or_wait(tenant, "in_flight", wait, deadline, self.POLL_S))
        self._in_flight[tenant] = self._in_flight.get(tenant, 0) + 1
        try:
            yield
        finally:
            left = self._in_flight[tenant] - 1
            if left:
                self._in_flight[tenant] = left
            else:
                del self._in_flight[tenant]
