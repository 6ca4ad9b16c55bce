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
    IncompatibleCollectionError,
    IndexUnavailableError,
    InvalidArgumentError,
    InvalidImageError,
    MissingWeightsError,
)
from gmv_engine.pipeline import Attribution, Attributor

from .batcher import DeadlinePassedError, DynamicBatcher, QueueFullError, ShuttingDownError
from .logs import generation_id as current_generation_id
from .metrics import ServerMetrics

log = logging.getLogger("gmv.server.requests")


class WarmingUpError(Exception):
    """The models are still loading (the health service says NOT_SERVING meanwhile)."""


STATUS_OF = [
    ((InvalidImageError, InvalidArgumentError), grpc.StatusCode.INVALID_ARGUMENT),
    ((CollectionNotFoundError,), grpc.StatusCode.NOT_FOUND),
    ((IncompatibleCollectionError, MissingWeightsError), grpc.StatusCode.FAILED_PRECONDITION),
    ((QueueFullError,), grpc.StatusCode.RESOURCE_EXHAUSTED),
    ((DeadlinePassedError,), grpc.StatusCode.DEADLINE_EXCEEDED),
    ((IndexUnavailableError, ShuttingDownError, WarmingUpError), grpc.StatusCode.UNAVAILABLE),
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

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.attributor: Attributor | None = None
        self.batcher: DynamicBatcher | None = None
        self.index_info: pb.IndexInfo | None = None

    def ready(self, attributor: Attributor, batcher: DynamicBatcher, index_info: pb.IndexInfo) -> None:
        self.attributor, self.batcher, self.index_info = attributor, batcher, index_info

    @observed
    async def _attribute(self, request: pb.AttributeRequest, context: grpc.aio.ServicerContext) -> Attribution:
        if self.batcher is None:
            raise WarmingUpError("the server is loading its models; retry shortly")
        if not request.generation_id:
            raise InvalidArgumentError("generation_id is required")
        top_k = request.top_k or self.attributor.settings.top_k
        self.attributor.check_top_k(top_k, 1)
        decode_started = time.perf_counter()
        image = await asyncio.to_thread(decode_image, request.image, self.attributor.limits)
        self.metrics.stage_seconds.labels(stage="decode").observe(time.perf_counter() - decode_started)
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        return await self.batcher.submit(image, top_k, deadline)

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
            result = await self._attribute(request, context)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            await self._fail("Attribute", context, exc, request.generation_id)
            return
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
                request, result, error = getter.result()
                outstanding -= 1
                if error is not None:
                    await self._fail("AttributeStream", context, error, request.generation_id)
                    return
                yield to_result(request.generation_id, result)
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


def to_credits(generation_id: str, result: Attribution) -> list[pb.Credit]:
    return [
        pb.Credit(generation_id=generation_id, rank=c.rank, training_id=c.training_id, contributor_id=c.contributor_id,
                  credit=c.credit, distance=c.distance, quality=result.quality)
        for c in result.credits
    ]


def to_result(generation_id: str, result: Attribution) -> pb.AttributionResult:
    return pb.AttributionResult(
        generation_id=generation_id,
        quality=result.quality,
        credits=to_credits(generation_id, result),
        contributors=[pb.ContributorCredit(contributor_id=cid, credit=credit) for cid, credit in result.contributors],
    )
