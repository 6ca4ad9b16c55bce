"""Admission control: how many requests may be in progress at once, in all and per tenant.

A request is admitted before any work is done for it (the ledger lookup, the decode, its
place in the batcher's queue) and holds its place until it is answered, so a refused request
costs almost nothing and a flood cannot fill the thread pool or the queue ahead of others. A
tenant may hold `tenant_share` of the places. A unary call past either bound is refused at
once (RESOURCE_EXHAUSTED, the caller backs off); a stream's item waits for a place instead,
so a stream is read no faster than it is served.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from typing import AsyncIterator

from .batcher import DeadlinePassedError, QueueFullError
from .metrics import ServerMetrics


class Admission:
    def __init__(self, max_requests: int, tenant_share: float, metrics: ServerMetrics):
        if max_requests < 1 or not 0 < tenant_share <= 1:
            raise ValueError("max_requests must be >= 1 and tenant_share in (0, 1]")
        self.max_requests = max_requests
        self.max_per_tenant = max(1, int(max_requests * tenant_share))
        self.metrics = metrics
        self._per_tenant: dict[str, int] = {}
        self._total = 0
        self._released = asyncio.Condition()
        metrics.queue_capacity.set(max_requests)

    def refusal(self, tenant: str) -> str:
        """'' when the tenant may start one more request, else why not."""
        if self._total >= self.max_requests:
            return f"the server has {self.max_requests} requests in progress (max_queue_size); retry with backoff"
        if self._per_tenant.get(tenant, 0) >= self.max_per_tenant:
            return (f"tenant '{tenant}' has {self.max_per_tenant} requests in progress, its share of the server "
                    "(max_tenant_queue_share); retry with backoff")
        return ""

    @contextlib.asynccontextmanager
    async def admit(self, tenant: str, wait: bool = False, deadline: float | None = None) -> AsyncIterator[None]:
        if reason := self.refusal(tenant):
            if not wait:
                self.metrics.queue_rejections.labels(reason="tenant" if reason.startswith("tenant") else "queue").inc()
                raise QueueFullError(reason)
            async with self._released:
                while self.refusal(tenant):
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise DeadlinePassedError("the deadline passed while the request waited for a place")
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._released.wait(), remaining)
        self._per_tenant[tenant] = self._per_tenant.get(tenant, 0) + 1
        self._total += 1
        try:
            yield
        finally:
            self._total -= 1
            self._per_tenant[tenant] -= 1
            if not self._per_tenant[tenant]:
                del self._per_tenant[tenant]
            async with self._released:
                self._released.notify_all()
