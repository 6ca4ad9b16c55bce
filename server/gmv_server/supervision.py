"""`gmv serve`'s watch over Milvus: health follows whether Milvus answers, and an embedded
Milvus that died is restarted with backoff, so a crash needs no operator.

Each tick probes Milvus with a short timeout. While it cannot be reached, health (the
server's and the service's) is NOT_SERVING, so load balancers and Kubernetes' readiness
probe send traffic elsewhere; the calls that still arrive get UNAVAILABLE from the index
and the SDK retries them. When a probe succeeds again, health returns to SERVING.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from gmv_engine.errors import GMVError
from gmv_engine.milvus.index import TrainingIndex

from .metrics import ServerMetrics

log = logging.getLogger("gmv.server")

RESTART_BACKOFF_S = (1.0, 60.0)  # first wait after a failed restart, and the cap; doubling between


class MilvusSupervisor:
    def __init__(self, index: TrainingIndex, collection: str, metrics: ServerMetrics,
                 set_serving: Callable[[bool], None], probe_s: float, watch: Callable[[], None] | None = None):
        self.index = index
        self.collection = collection
        self.metrics = metrics
        self.set_serving = set_serving
        self.probe_s = probe_s  # also each probe's timeout: one slower than the interval counts as down
        self.down_since: float | None = None
        self._last_tick = time.monotonic()
        self._restart_wait_s = RESTART_BACKOFF_S[0]
        self.watch = watch  # run after each probe that found Milvus up: collection changes (removals)

    async def run(self) -> None:
        while True:
            await self.tick()
            await asyncio.sleep(self.probe_s)

    async def tick(self) -> None:
        embedded = self.index.embedded
        if embedded is not None and embedded.exited():
            self._mark(False, "the embedded Milvus exited")
            await self._restart(embedded)
        try:
            up = await asyncio.to_thread(self.index.ping, self.collection, self.probe_s)
            reason = "" if up else f"collection '{self.collection}' is gone"
        except GMVError as exc:  # counted by the call observer
            up, reason = False, str(exc)
        self._mark(up, reason)
        if up and self.watch is not None:
            try:
                await asyncio.to_thread(self.watch)
            except GMVError as exc:  # the next probe tries again
                log.warning("could not read the collections' removals: %s", exc)

    def _mark(self, up: bool, reason: str) -> None:
        now = time.monotonic()
        if self.down_since is not None:
            self.metrics.milvus_down_seconds.inc(now - max(self.down_since, self._last_tick))
        self._last_tick = now
        if up and self.down_since is not None:
            log.info("Milvus is reachable again after %.1f s: SERVING", now - self.down_since)
            self.down_since = None
            self.set_serving(True)
        elif not up and self.down_since is None:
            log.warning("Milvus cannot be reached (%s): NOT_SERVING until it answers again", reason)
            self.down_since = now
            self.set_serving(False)

    async def _restart(self, embedded) -> None:
        log.warning("restarting the embedded Milvus on %s", embedded.data_dir)
        started = time.monotonic()
        try:
            await asyncio.to_thread(embedded.restart)
        except GMVError as exc:
            self.metrics.milvus_restarts.labels(outcome="failed").inc()
            log.error("the embedded Milvus did not restart (%s); trying again in %.0f s", exc, self._restart_wait_s)
            await asyncio.sleep(self._restart_wait_s)
            self._restart_wait_s = min(self._restart_wait_s * 2, RESTART_BACKOFF_S[1])
            return
        self.metrics.milvus_restarts.labels(outcome="ok").inc()
        self._restart_wait_s = RESTART_BACKOFF_S[0]
        log.info("the embedded Milvus restarted in %.1f s", time.monotonic() - started)
