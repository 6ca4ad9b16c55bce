"""Group commit for the ledger: the records of requests that finish together (a batch's
callers all resume at once) are written in one transaction, so a batch of 32 costs one
fsync, not 32. A record's caller gets its credits only after that transaction commits."""
from __future__ import annotations

import asyncio
import time

from gmv_engine.errors import GenerationConflictError, GMVError
from gmv_engine.ledger import GenerationRecord, Ledger

from .metrics import ServerMetrics


class LedgerWriter:
    def __init__(self, ledger: Ledger, metrics: ServerMetrics, max_records: int = 256):
        self.ledger = ledger
        self.metrics = metrics
        self.max_records = max_records
        self._pending: list[tuple[GenerationRecord, asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None

    async def record(self, record: GenerationRecord) -> tuple[GenerationRecord, bool]:
        """(the stored record, True if new); raises GenerationConflictError or the ledger's error."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((record, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        # Runs until nothing is pending; records arriving during a write go in the next one.
        while self._pending:
            await asyncio.sleep(0)  # let the rest of a finishing batch queue up first
            group, self._pending = self._pending[:self.max_records], self._pending[self.max_records:]
            started = time.perf_counter()
            try:
                outcomes = await asyncio.to_thread(self.ledger.record_many, [record for record, _ in group])
            except Exception as exc:  # noqa: BLE001 - nothing of the group was kept; each caller hears why
                for record, _ in group:
                    self.metrics.ledger_writes.labels("error", record.collection).inc()
                for _, future in group:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.metrics.stage_seconds.labels("ledger_write").observe(time.perf_counter() - started)
            for (record, future), outcome in zip(group, outcomes):
                if isinstance(outcome, GMVError):
                    self.metrics.ledger_writes.labels("conflict" if isinstance(outcome, GenerationConflictError)
                                                      else "error", record.collection).inc()
                    if not future.done():
                        future.set_exception(outcome)
                    continue
                self.metrics.ledger_writes.labels("recorded" if outcome[1] else "replayed", record.collection).inc()
                if not future.done():
                    future.set_result(outcome)
