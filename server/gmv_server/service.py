"""gmv.v1.AttributionService: decode and validate each request, hand it to the dynamic
batcher, and turn engine errors into the gRPC status codes the .proto documents."""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import AsyncIterator

import grpc

from gmv.v1 import attribution_pb2 as pb
from gmv.v1 import attribution_pb2_grpc as pb_grpc
from gmv_engine.decode import decode_image
from gmv_engine.errors import (
    CollectionNotFoundError,
    GenerationConflictError,
    IncompatibleCollectionError,
    IndexUnavailableError,
    InvalidArgumentError,
    InvalidImageError,
    LedgerUnavailableError,
    MissingWeightsError,
)
from gmv_engine.ledger import CreditRow, GenerationRecord, Ledger, Window, image_sha256, settings_hash
from gmv_engine.pipeline import Attribution, Attributor, Credit

from .batcher import DeadlinePassedError, DynamicBatcher, QueueFullError, ShuttingDownError
from .ledger_writer import LedgerWriter
from .logs import generation_id as current_generation_id
from .metrics import ServerMetrics

log = logging.getLogger("gmv.server.requests")


class WarmingUpError(Exception):
    """The models are still loading (the health service says NOT_SERVING meanwhile)."""


STATUS_OF = [
    ((InvalidImageError, InvalidArgumentError), grpc.StatusCode.INVALID_ARGUMENT),
    ((CollectionNotFoundError,), grpc.StatusCode.NOT_FOUND),
    ((GenerationConflictError,), grpc.StatusCode.ALREADY_EXISTS),
    ((IncompatibleCollectionError, MissingWeightsError), grpc.StatusCode.FAILED_PRECONDITION),
    ((QueueFullError,), grpc.StatusCode.RESOURCE_EXHAUSTED),
    ((DeadlinePassedError,), grpc.StatusCode.DEADLINE_EXCEEDED),
    ((IndexUnavailableError, LedgerUnavailableError, ShuttingDownError, WarmingUpError), grpc.StatusCode.UNAVAILABLE),
]


def status_for(exc: BaseException) -> grpc.StatusCode:
    for types, code in STATUS_OF:
        if isinstance(exc, types):
            return code
    return grpc.StatusCode.INTERNAL


def observed(attribute):
    """Wraps `_attribute` (one generation, whichever way it is answered): its generation_id on
    every log line it causes, and its end-to-end time when it succeeds."""

    @functools.wraps(attribute)
    async def wrapper(self, request, context):
        current_generation_id.set(request.generation_id)  # the calling task's context: _fail's lines too
        started = time.perf_counter()
        result = await attribute(self, request, context)
        elapsed = time.perf_counter() - started
        self.metrics.generation_seconds.observe(elapsed)
        log.debug("attributed in %.1f ms", elapsed * 1000)
        return result

    return wrapper


class AttributionService(pb_grpc.AttributionServiceServicer):
    """Registered before the server starts (grpc.aio needs that); answers UNAVAILABLE until
    `ready()` hands it the warmed-up pipeline."""

    def __init__(self, metrics: ServerMetrics, ledger: Ledger, collection: str):
        self.metrics = metrics
        self.ledger = ledger
        self.ledger_writer = LedgerWriter(ledger, metrics)
        self.collection = collection
        self.attributor: Attributor | None = None
        self.batcher: DynamicBatcher | None = None
        self.index_info: pb.IndexInfo | None = None

    def ready(self, attributor: Attributor, batcher: DynamicBatcher, index_info: pb.IndexInfo) -> None:
        self.attributor, self.batcher, self.index_info = attributor, batcher, index_info

    @observed
    async def _attribute(self, request: pb.AttributeRequest, context: grpc.aio.ServicerContext) -> tuple[Attribution, int]:
        """The generation's attribution and its pb.LedgerState. With recording on, the credits
        returned are the ledger's: committed before anything goes back to the caller."""
        if self.batcher is None:
            raise WarmingUpError("the server is loading its models; retry shortly")
        if not request.generation_id:
            raise InvalidArgumentError("generation_id is required")
        top_k = request.top_k or self.attributor.settings.top_k
        self.attributor.check_top_k(top_k, 1)
        image_hash = image_sha256(request.image)
        if not request.skip_ledger:
            # A retry of a recorded generation is answered from the ledger, not recomputed.
            earlier = await asyncio.to_thread(self.ledger.get, request.generation_id)
            if earlier is not None:
                return self._replay(request, image_hash, earlier)
        decode_started = time.perf_counter()
        image = await asyncio.to_thread(decode_image, request.image, self.attributor.limits)
        self.metrics.stage_seconds.labels(stage="decode").observe(time.perf_counter() - decode_started)
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        result = await self.batcher.submit(image, top_k, deadline)
        if request.skip_ledger:
            return result, pb.LEDGER_STATE_NOT_RECORDED
        settings = self._settings(top_k)
        stored, new = await self.ledger_writer.record(GenerationRecord(
            generation_id=request.generation_id, tenant_id=request.tenant_id, collection=self.collection,
            profile=self.attributor.info.profile, settings_hash=settings_hash(settings), image_sha256=image_hash,
            quality=result.quality, settings=settings,
            credits=tuple(CreditRow(c.rank, c.training_id, c.contributor_id, c.credit, c.distance) for c in result.credits),
        ))
        if new:
            return result, pb.LEDGER_STATE_RECORDED
        return _from_record(stored), pb.LEDGER_STATE_REPLAYED  # a concurrent request recorded it first

    def _replay(self, request: pb.AttributeRequest, image_hash: str, earlier: GenerationRecord) -> tuple[Attribution, int]:
        if earlier.image_sha256 != image_hash:
            self.metrics.ledger_writes.labels("conflict").inc()
            raise GenerationConflictError(
                f"generation '{request.generation_id}' was already recorded with a different image; "
                "a generation_id must be unique per generated image")
        self.metrics.ledger_writes.labels("replayed").inc()
        return _from_record(earlier), pb.LEDGER_STATE_REPLAYED

    def _settings(self, top_k: int) -> dict:
        """What produced a generation's credits; its hash goes in the ledger record."""
        a = self.attributor
        return {"collection": self.collection, "profile": a.info.profile, "encoder": a.encoder.name,
                "reranker": a.reranker.name, "quality": a.quality.name, "recall_k": a.settings.recall_k,
                "nprobe": a.settings.nprobe, "temperature": a.settings.temperature, "top_k": top_k}

    async def _fail(self, method: str, context: grpc.aio.ServicerContext, exc: Exception, generation_id: str = ""):
        code = status_for(exc)
        self.metrics.requests.labels(method, code.name).inc()
        # Server-side failures are the operator's to look at; a caller's bad input is not.
        level = {grpc.StatusCode.INTERNAL: logging.ERROR, grpc.StatusCode.UNAVAILABLE: logging.WARNING,
                 grpc.StatusCode.RESOURCE_EXHAUSTED: logging.WARNING}.get(code, logging.INFO)
        log.log(level, "%s failed with %s: %s", method, code.name, exc, extra={"generation_id": generation_id},
                exc_info=exc if code == grpc.StatusCode.INTERNAL else None)
        prefix = f"generation '{generation_id}': " if generation_id else ""
        await context.abort(code, f"{prefix}{exc}")

    async def Attribute(self, request, context) -> AsyncIterator[pb.Credit]:
        try:
            result, ledger_state = await self._attribute(request, context)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            await self._fail("Attribute", context, exc, request.generation_id)
            return
        context.set_trailing_metadata(((LEDGER_METADATA_KEY, LEDGER_STATE_NAMES[ledger_state]),))
        for credit in to_credits(request.generation_id, result):
            yield credit
        self.metrics.requests.labels("Attribute", "OK").inc()

    async def AttributeStream(self, request_iterator, context) -> AsyncIterator[pb.AttributionResult]:
        # Each request is attributed as soon as it arrives (so one stream fills batches);
        # results go back as they finish, in any order.
        finished: asyncio.Queue = asyncio.Queue()
        outstanding = 0
        reading_done = asyncio.Event()

        async def attribute_one(request):
            try:
                await finished.put((request, await self._attribute(request, context), None))
            except Exception as exc:  # noqa: BLE001
                await finished.put((request, None, exc))

        async def read_all():
            nonlocal outstanding
            async for request in request_iterator:
                outstanding += 1
                tasks.add(asyncio.create_task(attribute_one(request)))
            reading_done.set()

        tasks: set[asyncio.Task] = set()
        reader = asyncio.create_task(read_all())
        try:
            while True:
                if reading_done.is_set() and outstanding == 0:
                    break
                getter = asyncio.create_task(finished.get())
                done, _ = await asyncio.wait({getter, reader} if not reader.done() else {getter},
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    if reader.exception() is not None:
                        raise reader.exception()
                    continue
                request, outcome, error = getter.result()
                outstanding -= 1
                if error is not None:
                    await self._fail("AttributeStream", context, error, request.generation_id)
                    return
                yield to_result(request.generation_id, *outcome)
            self.metrics.requests.labels("AttributeStream", "OK").inc()
        finally:
            reader.cancel()
            for task in tasks:
                task.cancel()

    async def GetIndexInfo(self, request, context) -> pb.IndexInfo:
        if self.index_info is None:
            await self._fail("GetIndexInfo", context, WarmingUpError("the server is loading its models; retry shortly"))
        self.metrics.requests.labels("GetIndexInfo", "OK").inc()
        return self.index_info

    def _window(self, request) -> Window:
        since = request.since.ToSeconds() if request.HasField("since") else None
        until = request.until.ToSeconds() if request.HasField("until") else None
        if since is not None and until is not None and until <= since:
            raise InvalidArgumentError("until must be after since")
        return Window(since, until, request.collection or self.collection, request.tenant_id or None)

    async def _ledger_totals(self, method: str, request, context, query):
        """Run `query(window)` and the window's totals off the event loop; (items, generations,
        total credit), or None after the call was failed with the error's status."""
        try:
            window = self._window(request)
            items = await asyncio.to_thread(query, window)
            generations, total = await asyncio.to_thread(self.ledger.totals, window)
        except Exception as exc:  # noqa: BLE001
            await self._fail(method, context, exc)
            return None
        self.metrics.requests.labels(method, "OK").inc()
        return items, generations, total

    async def GetValuation(self, request, context) -> pb.GetValuationResponse:
        values, generations, total = await self._ledger_totals("GetValuation", request, context, lambda window: (
            self.ledger.values(window, request.limit or None, list(request.training_ids) or None)))
        return pb.GetValuationResponse(
            values=[pb.TrainingImageValue(training_id=v.training_id, contributor_id=v.contributor_id, value=v.value,
                                          generations=v.generations) for v in values],
            generations=generations, total_credit=total)

    async def TopContributors(self, request, context) -> pb.TopContributorsResponse:
        contributors, generations, total = await self._ledger_totals(
            "TopContributors", request, context, lambda window: self.ledger.contributors(window, request.limit or 10))
        return pb.TopContributorsResponse(
            contributors=[pb.ContributorValue(contributor_id=c.contributor_id, value=c.value, generations=c.generations,
                                              training_images=c.training_images) for c in contributors],
            generations=generations, total_credit=total)


LEDGER_METADATA_KEY = "gmv-ledger"
LEDGER_STATE_NAMES = {pb.LEDGER_STATE_RECORDED: "recorded", pb.LEDGER_STATE_REPLAYED: "replayed",
                      pb.LEDGER_STATE_NOT_RECORDED: "not-recorded"}


def _from_record(record: GenerationRecord) -> Attribution:
    credits = [Credit(c.rank, c.training_id, c.contributor_id, c.credit, c.distance) for c in record.credits]
    return Attribution(record.quality, credits, record.contributors)


def to_credits(generation_id: str, result: Attribution) -> list[pb.Credit]:
    return [
        pb.Credit(generation_id=generation_id, rank=c.rank, training_id=c.training_id, contributor_id=c.contributor_id,
                  credit=c.credit, distance=c.distance, quality=result.quality)
        for c in result.credits
    ]


def to_result(generation_id: str, result: Attribution, ledger_state: int = 0) -> pb.AttributionResult:
    return pb.AttributionResult(
        generation_id=generation_id,
        quality=result.quality,
        ledger=ledger_state,
        credits=to_credits(generation_id, result),
        contributors=[pb.ContributorCredit(contributor_id=cid, credit=credit) for cid, credit in result.contributors],
    )
