"""gmv.v1.AttributionService over gRPC: converts messages to the attribution service's types
and back, and its errors to the status codes the .proto documents. No attribution logic
lives here (see attribution_service.py)."""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import AsyncIterator

import grpc

from gmv.v1 import attribution_pb2 as pb
from gmv.v1 import attribution_pb2_grpc as pb_grpc
from gmv_engine.credit import Attribution
from gmv_engine.errors import (
    CollectionNotFoundError,
    GenerationConflictError,
    IncompatibleCollectionError,
    IndexUnavailableError,
    InvalidArgumentError,
    InvalidImageError,
    LedgerUnavailableError,
    MissingWeightsError,
    PermissionDeniedError,
    UnauthenticatedError,
)

from .attribution_service import (
    NOT_RECORDED,
    RECORDED,
    REPLAYED,
    AttributionOutcome,
    AttributionRequest,
    AttributionService,
    CollectionDescription,
    WarmingUpError,
)
from .auth import CALLER, tenant_for_attribution, tenant_for_reading
from .batcher import DeadlinePassedError, QueueFullError, ShuttingDownError
from .logs import generation_id as current_generation_id

log = logging.getLogger("gmv.server.requests")

# The one mapping from errors to gRPC status codes.
STATUS_OF = [
    ((InvalidImageError, InvalidArgumentError), grpc.StatusCode.INVALID_ARGUMENT),
    ((CollectionNotFoundError,), grpc.StatusCode.NOT_FOUND),
    ((GenerationConflictError,), grpc.StatusCode.ALREADY_EXISTS),
    ((IncompatibleCollectionError, MissingWeightsError), grpc.StatusCode.FAILED_PRECONDITION),
    ((QueueFullError,), grpc.StatusCode.RESOURCE_EXHAUSTED),
    ((DeadlinePassedError,), grpc.StatusCode.DEADLINE_EXCEEDED),
    ((IndexUnavailableError, LedgerUnavailableError, ShuttingDownError, WarmingUpError), grpc.StatusCode.UNAVAILABLE),
    ((UnauthenticatedError,), grpc.StatusCode.UNAUTHENTICATED),
    ((PermissionDeniedError,), grpc.StatusCode.PERMISSION_DENIED),
]
# Server-side failures are the operator's to look at; a caller's bad input is not, and refusals
# (thousands a second under a flood, each retried) are counted in gmv_queue_rejected_total.
LOG_LEVEL_OF = {grpc.StatusCode.INTERNAL: logging.ERROR, grpc.StatusCode.UNAVAILABLE: logging.WARNING,
                grpc.StatusCode.RESOURCE_EXHAUSTED: logging.DEBUG}
LEDGER_METADATA_KEY = "gmv-ledger"
LEDGER_STATES = {RECORDED: pb.LEDGER_STATE_RECORDED, REPLAYED: pb.LEDGER_STATE_REPLAYED,
                 NOT_RECORDED: pb.LEDGER_STATE_NOT_RECORDED}


def loggable(text: str, limit: int = 128) -> str:
    """A caller's id as it may appear in a log line or a status message: control characters
    escaped (no forged lines) and cut to `limit` characters (no megabyte trailers)."""
    escaped = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    return escaped if len(escaped) <= limit else escaped[:limit] + f"...({len(text)} characters)"


# A status message travels in the grpc-message trailer, percent-encoded, and a peer drops a call
# whose metadata passes 8 KiB (the caller then sees RESOURCE_EXHAUSTED instead of the real
# status): a message that echoes a caller's string (a 20,000-character collection name) is cut.
MAX_STATUS_MESSAGE = 500  # characters; at most 4 UTF-8 bytes each, 3 characters per byte encoded


def timestamp_seconds(request, name: str) -> float | None:
    """A request's Timestamp field as seconds (nanos included), or None when unset; one outside
    google.protobuf.Timestamp's range is the caller's error, not the server's."""
    if not request.HasField(name):
        return None
    try:
        return getattr(request, name).ToNanoseconds() / 1e9
    except ValueError as exc:
        raise InvalidArgumentError(f"{name} is not a valid timestamp: {exc}") from exc


def status_for(exc: BaseException) -> grpc.StatusCode:
    for types, code in STATUS_OF:
        if isinstance(exc, types):
            return code
    return grpc.StatusCode.INTERNAL


class GrpcAttributionService(pb_grpc.AttributionServiceServicer):
    """Registered before the server starts (grpc.aio needs that); the attribution service
    answers UNAVAILABLE until its models are warm."""

    def __init__(self, service: AttributionService):
        self.service = service
        self.metrics = service.metrics
        self._streams = itertools.count(1)

    def _request(self, message: pb.AttributeRequest, context: grpc.aio.ServicerContext,
                 stream: str = "") -> AttributionRequest:
        remaining = context.time_remaining()
        return AttributionRequest(
            generation_id=message.generation_id, image=message.image, collection=message.collection,
            top_k=message.top_k, tenant_id=tenant_for_attribution(message.tenant_id), record=not message.skip_ledger,
            deadline=time.monotonic() + remaining if remaining is not None else None, stream=stream)

    async def _attribute(self, message: pb.AttributeRequest, context, stream: str = "") -> AttributionOutcome:
        current_generation_id.set(loggable(message.generation_id))  # the calling task's context: _fail's lines too
        return await self.service.attribute(self._request(message, context, stream))

    def _count(self, method: str, code: grpc.StatusCode, collection: str) -> None:
        self.metrics.requests.labels(method, code.name, self.service.served_label(collection)).inc()

    async def _fail(self, method: str, context: grpc.aio.ServicerContext, exc: Exception, collection: str = "",
                    generation_id: str = ""):
        code = status_for(exc)
        self._count(method, code, collection)
        generation_id = loggable(generation_id)
        # The message may echo the caller's strings: escaped and cut, in the log as in the status.
        message = loggable(str(exc), MAX_STATUS_MESSAGE)
        log.log(LOG_LEVEL_OF.get(code, logging.INFO), "%s failed with %s: %s", method, code.name, message,
                extra={"generation_id": generation_id},
                exc_info=exc if code == grpc.StatusCode.INTERNAL else None)
        prefix = f"generation '{generation_id}': " if generation_id else ""
        await context.abort(code, f"{prefix}{message}")

    async def refuse(self, method: str, exc: Exception, context: grpc.aio.ServicerContext) -> None:
        """The authentication interceptor's way to fail a call: counted, logged, its status."""
        await self._fail(method, context, exc)

    async def Attribute(self, request, context) -> AsyncIterator[pb.Credit]:
        try:
            outcome = await self._attribute(request, context)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            await self._fail("Attribute", context, exc, request.collection, request.generation_id)
            return
        context.set_trailing_metadata(((LEDGER_METADATA_KEY, outcome.ledger),))
        for credit in to_credits(request.generation_id, outcome.attribution):
            yield credit
        self._count("Attribute", grpc.StatusCode.OK, outcome.collection)

    async def AttributeStream(self, request_iterator, context) -> AsyncIterator[pb.AttributionResult]:
        # Each request is attributed as soon as it arrives (so one stream fills batches), but at
        # most max_stream_in_flight at a time: the stream is read only as fast as it is computed.
        # Results go back as they finish, in any order; a failed request is a result with `error`.
        finished: asyncio.Queue = asyncio.Queue()
        slots = asyncio.Semaphore(self.service.settings.max_stream_in_flight)
        outstanding = 0
        reading_done = asyncio.Event()
        collections: set[str] = set()
        stream = f"stream-{next(self._streams)}"  # its own flow in the fair queue

        async def attribute_one(request):
            try:
                await finished.put((request, await self._attribute(request, context, stream), None))
            except Exception as exc:  # noqa: BLE001 - the request's own outcome, sent as its result
                await finished.put((request, None, exc))

        async def read_all():
            nonlocal outstanding
            async for request in request_iterator:
                await slots.acquire()
                outstanding += 1
                if isinstance(request, MalformedRequest):  # this item fails; the stream goes on
                    await finished.put((pb.AttributeRequest(), None, InvalidArgumentError(request.message)))
                    continue
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
                slots.release()
                if error is not None:
                    yield self._item_error("AttributeStream", request, error)
                    continue
                collections.add(outcome.collection)
                yield to_result(request.generation_id, outcome)
            # A stream may span collections: it counts once, under its one collection or "".
            self._count("AttributeStream", grpc.StatusCode.OK, next(iter(collections)) if len(collections) == 1 else "")
        finally:
            reader.cancel()
            for task in tasks:
                task.cancel()

    def _item_error(self, method: str, request: pb.AttributeRequest, exc: Exception) -> pb.AttributionResult:
        """One failed generation of a stream: logged and counted like a failed call, sent as a result."""
        code = status_for(exc)
        self.metrics.stream_item_errors.labels(code.name, self.service.served_label(request.collection)).inc()
        message = loggable(str(exc), MAX_STATUS_MESSAGE)
        log.log(LOG_LEVEL_OF.get(code, logging.INFO), "%s item failed with %s: %s", method, code.name, message,
                extra={"generation_id": loggable(request.generation_id)}, exc_info=exc if code == grpc.StatusCode.INTERNAL else None)
        return pb.AttributionResult(generation_id=request.generation_id,
                                    error=pb.AttributionError(code=code.value[0], message=message))

    async def GetIndexInfo(self, request, context) -> pb.IndexInfo:
        try:
            description = self.service.describe(request.collection)
        except Exception as exc:  # noqa: BLE001
            await self._fail("GetIndexInfo", context, exc, request.collection)
        self._count("GetIndexInfo", grpc.StatusCode.OK, description.collection)
        return to_index_info(description)

    async def ListCollections(self, request, context) -> pb.ListCollectionsResponse:
        try:
            descriptions = self.service.list_collections()
        except Exception as exc:  # noqa: BLE001
            await self._fail("ListCollections", context, exc)
        self._count("ListCollections", grpc.StatusCode.OK, "")
        return pb.ListCollectionsResponse(collections=[to_index_info(d) for d in descriptions])

    async def RemoveContributor(self, request, context) -> pb.RemoveContributorResponse:
        caller = CALLER.get()  # recorded with the erasure: who asked, as what tenant, from where
        requested_by = f"{caller.credential if caller else 'no credential (open server)'} from {context.peer()}"
        try:
            collection, outcome = await self.service.remove_contributor(
                request.collection, request.contributor_id, requested_by, caller.tenant_id if caller else "")
        except Exception as exc:  # noqa: BLE001
            await self._fail("RemoveContributor", context, exc, request.collection)
        removal, erasure = outcome.removal, outcome.erasure
        self._count("RemoveContributor", grpc.StatusCode.OK, collection)
        log.info("contributor '%s' removed from '%s' by %s: %d images, %d hashes blocked; erasure %s",
                 loggable(removal.contributor_id), collection, loggable(requested_by), removal.rows,
                 removal.hashes_blocked, "recorded in the ledger" if outcome.recorded_now else
                 "recorded in the ledger before" if erasure else "not recorded (no ledger)")
        reply = pb.RemoveContributorResponse(collection=collection, contributor_id=removal.contributor_id,
                                             images_removed=removal.rows, hashes_blocked=removal.hashes_blocked)
        reply.removed_at.FromNanoseconds(int(removal.removed_at * 1e9))
        if erasure is not None:
            reply.ledger_recorded_at.FromNanoseconds(int(erasure.recorded_at * 1e9))
        return reply

    async def _ledger_query(self, method: str, request, context, query):
        """Run `query(window)` on the service: (items, generations, total credit), or None
        after the call was failed with the error's status."""
        try:
            since, until = timestamp_seconds(request, "since"), timestamp_seconds(request, "until")
            window = self.service.window(since, until, request.collection, tenant_for_reading(request.tenant_id))
            answer = await query(window)
        except Exception as exc:  # noqa: BLE001
            await self._fail(method, context, exc, request.collection)
            return None
        self._count(method, grpc.StatusCode.OK, request.collection)
        return answer

    async def GetValuation(self, request, context) -> pb.GetValuationResponse:
        values, generations, total = await self._ledger_query("GetValuation", request, context, lambda window: (
            self.service.valuation(window, request.limit or None, list(request.training_ids) or None)))
        return pb.GetValuationResponse(
            values=[pb.TrainingImageValue(training_id=v.training_id, contributor_id=v.contributor_id, value=v.value,
                                          generations=v.generations) for v in values],
            generations=generations, total_credit=total)

    async def TopContributors(self, request, context) -> pb.TopContributorsResponse:
        contributors, generations, total = await self._ledger_query(
            "TopContributors", request, context, lambda window: self.service.top_contributors(window, request.limit or 10))
        return pb.TopContributorsResponse(
            contributors=[pb.ContributorValue(contributor_id=c.contributor_id, value=c.value, generations=c.generations,
                                              training_images=c.training_images) for c in contributors],
            generations=generations, total_credit=total)


class MalformedRequest:
    """What a request that does not parse (bytes that are not the message, a string field that
    is not UTF-8) becomes, so the method answers INVALID_ARGUMENT rather than gRPC's UNKNOWN."""

    def __init__(self, error: Exception):
        self.message = f"the request is not a valid gmv.v1 message (malformed bytes, or a string that is not UTF-8): {error}"


def add_to_server(servicer: GrpcAttributionService, server: grpc.aio.Server) -> None:
    """Register every method of the .proto's service with deserializers that never raise."""
    from google.protobuf import message_factory

    descriptor = pb.DESCRIPTOR.services_by_name["AttributionService"]
    handlers = {}
    for method in descriptor.methods:
        request_type = message_factory.GetMessageClass(method.input_type)
        response_type = message_factory.GetMessageClass(method.output_type)
        make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler,
                }[(method.client_streaming, method.server_streaming)]
        behavior = getattr(servicer, method.name)
        if not method.client_streaming:
            behavior = _refusing_malformed(servicer, method.name, behavior, method.server_streaming)
        handlers[method.name] = make(behavior, request_deserializer=_tolerant(request_type),
                                     response_serializer=response_type.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))


def _tolerant(request_type):
    def deserialize(data: bytes):
        try:
            return request_type.FromString(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, and upb's errors for bad UTF-8
            return MalformedRequest(exc)
    return deserialize


def _refusing_malformed(servicer: GrpcAttributionService, name: str, behavior, server_streaming: bool):
    if server_streaming:
        async def streaming(request, context):
            if isinstance(request, MalformedRequest):
                await servicer._fail(name, context, InvalidArgumentError(request.message))
                return
            async for response in behavior(request, context):
                yield response
        return streaming

    async def unary(request, context):
        if isinstance(request, MalformedRequest):
            await servicer._fail(name, context, InvalidArgumentError(request.message))
        return await behavior(request, context)
    return unary


def to_index_info(description: CollectionDescription) -> pb.IndexInfo:
    d = description
    return pb.IndexInfo(collection=d.collection, profile=d.profile, encoder=d.encoder, encoder_dim=d.encoder_dim,
                        reranker=d.reranker, feature_dim=d.feature_dim, quality=d.quality, row_count=d.row_count,
                        index_type=d.index_type, index_params=d.index_params, search_params=d.search_params)


def to_credits(generation_id: str, result: Attribution) -> list[pb.Credit]:
    return [
        pb.Credit(generation_id=generation_id, rank=c.rank, training_id=c.training_id, contributor_id=c.contributor_id,
                  credit=c.credit, distance=c.distance, quality=result.quality)
        for c in result.credits
    ]


def to_result(generation_id: str, outcome: AttributionOutcome) -> pb.AttributionResult:
    result = outcome.attribution
    return pb.AttributionResult(
        generation_id=generation_id,
        quality=result.quality,
        ledger=LEDGER_STATES[outcome.ledger],
        credits=to_credits(generation_id, result),
        contributors=[pb.ContributorCredit(contributor_id=cid, credit=credit) for cid, credit in result.contributors],
    )
