"""GMV client SDK: typed results over gmv.v1.AttributionService. Needs only grpcio and protobuf.

    from gmv_client import GMVClient
    with GMVClient("localhost:50051") as gmv:
        result = gmv.attribute(png_bytes, generation_id="gen-1")
        print(result.quality, result.contributors)

UNAVAILABLE (server warming up, restarting, or its Milvus or ledger down) and
RESOURCE_EXHAUSTED (queue full) are retried with exponential backoff; other errors raise
grpc.RpcError at once. Retrying is safe: the server records each generation_id once and
answers a repeat with the recorded credits (`Attribution.ledger == "replayed"`).
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from datetime import datetime
from typing import AsyncIterator, Iterable, Iterator

import grpc

from gmv.v1 import attribution_pb2 as pb
from gmv.v1 import attribution_pb2_grpc as pb_grpc

__all__ = ["Attribution", "Credit", "ContributorValue", "TrainingImageValue", "Valuation", "GMVClient",
           "AsyncGMVClient", "RETRYABLE"]

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


@dataclass(frozen=True)
class Credit:
    rank: int
    training_id: str
    contributor_id: str
    credit: float
    distance: float


@dataclass(frozen=True)
class Attribution:
    generation_id: str
    quality: float
    credits: tuple[Credit, ...]
    contributors: tuple[tuple[str, float], ...]  # (contributor_id, credit), largest first
    ledger: str = ""  # "recorded", "replayed" (an earlier request's credits) or "not-recorded"
    # A stream's failed generation: its status code's name (e.g. "INVALID_ARGUMENT") and message;
    # it then has no credits. "" for a success.
    error_code: str = ""
    error_message: str = ""


@dataclass(frozen=True)
class TrainingImageValue:
    training_id: str
    contributor_id: str
    value: float  # phi_i: the sum of the image's credits in the window
    generations: int


@dataclass(frozen=True)
class ContributorValue:
    contributor_id: str
    value: float
    generations: int
    training_images: int


@dataclass(frozen=True)
class Valuation:
    """Ledger totals over a window: `items` are TrainingImageValue or ContributorValue."""

    items: tuple
    generations: int
    total_credit: float


LEDGER_STATES = {pb.LEDGER_STATE_RECORDED: "recorded", pb.LEDGER_STATE_REPLAYED: "replayed",
                 pb.LEDGER_STATE_NOT_RECORDED: "not-recorded"}
Moment = datetime | float | None  # a datetime, or Unix seconds


def _credit(message: pb.Credit) -> Credit:
    return Credit(message.rank, message.training_id, message.contributor_id, message.credit, message.distance)


def _from_result(message: pb.AttributionResult) -> Attribution:
    error_code = ""
    if message.HasField("error"):
        codes = {code.value[0]: code.name for code in grpc.StatusCode}
        error_code = codes.get(message.error.code, str(message.error.code))
    return Attribution(message.generation_id, message.quality, tuple(_credit(c) for c in message.credits),
                       tuple((c.contributor_id, c.credit) for c in message.contributors),
                       LEDGER_STATES.get(message.ledger, ""), error_code, message.error.message)


def _ledger_state(trailing_metadata) -> str:
    return dict(trailing_metadata or ()).get("gmv-ledger", "")


def _from_credits(generation_id: str, credits: list[pb.Credit], ledger: str = "") -> Attribution:
    totals: dict[str, float] = {}
    for c in credits:
        totals[c.contributor_id] = totals.get(c.contributor_id, 0.0) + c.credit
    return Attribution(generation_id, credits[0].quality if credits else 0.0, tuple(_credit(c) for c in credits),
                       tuple(sorted(totals.items(), key=lambda item: (-item[1], item[0]))), ledger)


def _request(image: bytes, generation_id: str, top_k: int, tenant_id: str = "", record: bool = True,
             collection: str = "") -> pb.AttributeRequest:
    return pb.AttributeRequest(generation_id=generation_id, image=image, top_k=top_k, tenant_id=tenant_id,
                               skip_ledger=not record, collection=collection)


def _window(message, since: Moment, until: Moment):
    for name, moment in (("since", since), ("until", until)):
        if moment is not None:
            seconds = moment.timestamp() if isinstance(moment, datetime) else float(moment)
            getattr(message, name).FromNanoseconds(int(round(seconds * 1e9)))
    return message


def _valuation_request(since: Moment, until: Moment, training_ids: Iterable[str], limit: int, tenant_id: str,
                       collection: str) -> pb.GetValuationRequest:
    return _window(pb.GetValuationRequest(training_ids=list(training_ids), limit=limit, tenant_id=tenant_id,
                                          collection=collection), since, until)


def _top_request(limit: int, since: Moment, until: Moment, tenant_id: str, collection: str) -> pb.TopContributorsRequest:
    return _window(pb.TopContributorsRequest(limit=limit, tenant_id=tenant_id, collection=collection), since, until)


def _from_valuation(reply: pb.GetValuationResponse) -> Valuation:
    return Valuation(tuple(TrainingImageValue(v.training_id, v.contributor_id, v.value, v.generations) for v in reply.values),
                     reply.generations, reply.total_credit)


def _from_top(reply: pb.TopContributorsResponse) -> Valuation:
    return Valuation(tuple(ContributorValue(c.contributor_id, c.value, c.generations, c.training_images)
                           for c in reply.contributors), reply.generations, reply.total_credit)


def _backoff(attempt: int, base_s: float) -> float:
    return base_s * (2 ** attempt) * (0.5 + random.random())  # jitter keeps callers from retrying in step


class GMVClient:
    def __init__(self, target: str, timeout_s: float = 30.0, retries: int = 4, backoff_s: float = 0.1,
                 channel: grpc.Channel | None = None):
        self.channel = channel or grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)])
        self.stub = pb_grpc.AttributionServiceStub(self.channel)
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s

    def _retrying(self, call):
        for attempt in range(self.retries + 1):
            try:
                return call()
            except grpc.RpcError as error:
                if error.code() not in RETRYABLE or attempt == self.retries:
                    raise
                time.sleep(_backoff(attempt, self.backoff_s))

    def attribute(self, image: bytes, generation_id: str, top_k: int = 0, tenant_id: str = "",
                  record: bool = True, collection: str = "") -> Attribution:
        """Credits for one generated image (PNG/JPEG/WebP bytes), in rank order. record=False:
        a preview the server does not write to its ledger."""
        request = _request(image, generation_id, top_k, tenant_id, record, collection)

        def call():
            responses = self.stub.Attribute(request, timeout=self.timeout_s)
            return list(responses), _ledger_state(responses.trailing_metadata())

        credits, ledger = self._retrying(call)
        return _from_credits(generation_id, credits, ledger)

    def attribute_stream(self, requests: Iterable[tuple[str, bytes] | tuple[str, bytes, int]], tenant_id: str = "",
                         record: bool = True, collection: str = "") -> Iterator[Attribution]:
        """Many generations over one call: (generation_id, image[, top_k]) in; results in any order.
        A failed generation comes back with `error_code`/`error_message` set and the stream goes on.
        Not retried here (a stream may have been half consumed): resend the ids you did not get
        back, or the whole stream; recorded ones come back as "replayed", never twice."""
        messages = (_request(r[1], r[0], r[2] if len(r) > 2 else 0, tenant_id, record, collection) for r in requests)
        for message in self.stub.AttributeStream(messages, timeout=self.timeout_s):
            yield _from_result(message)

    def valuation(self, since: Moment = None, until: Moment = None, training_ids: Iterable[str] = (), limit: int = 0,
                  tenant_id: str = "", collection: str = "") -> Valuation:
        """phi_i per credited training image from the server's ledger, largest first."""
        request = _valuation_request(since, until, training_ids, limit, tenant_id, collection)
        return _from_valuation(self._retrying(lambda: self.stub.GetValuation(request, timeout=self.timeout_s)))

    def top_contributors(self, limit: int = 10, since: Moment = None, until: Moment = None, tenant_id: str = "",
                         collection: str = "") -> Valuation:
        request = _top_request(limit, since, until, tenant_id, collection)
        return _from_top(self._retrying(lambda: self.stub.TopContributors(request, timeout=self.timeout_s)))

    def index_info(self, collection: str = "") -> pb.IndexInfo:
        request = pb.GetIndexInfoRequest(collection=collection)
        return self._retrying(lambda: self.stub.GetIndexInfo(request, timeout=self.timeout_s))

    def list_collections(self) -> list[pb.IndexInfo]:
        """Every collection the server serves."""
        request = pb.ListCollectionsRequest()
        return list(self._retrying(lambda: self.stub.ListCollections(request, timeout=self.timeout_s)).collections)

    def wait_until_ready(self, timeout_s: float = 300.0, poll_s: float = 0.5, collection: str = "") -> pb.IndexInfo:
        """Block until the server answers (it says UNAVAILABLE while its models load)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.stub.GetIndexInfo(pb.GetIndexInfoRequest(collection=collection), timeout=min(5.0, timeout_s))
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
            time.sleep(poll_s)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "GMVClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncGMVClient:
    def __init__(self, target: str, timeout_s: float = 30.0, retries: int = 4, backoff_s: float = 0.1):
        self.channel = grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)])
        self.stub = pb_grpc.AttributionServiceStub(self.channel)
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s

    async def _retrying(self, call):
        for attempt in range(self.retries + 1):
            try:
                return await call()
            except grpc.RpcError as error:
                if error.code() not in RETRYABLE or attempt == self.retries:
                    raise
                await asyncio.sleep(_backoff(attempt, self.backoff_s))

    async def attribute(self, image: bytes, generation_id: str, top_k: int = 0, tenant_id: str = "",
                        record: bool = True, collection: str = "") -> Attribution:
        request = _request(image, generation_id, top_k, tenant_id, record, collection)

        async def call():
            responses = self.stub.Attribute(request, timeout=self.timeout_s)
            credits = [credit async for credit in responses]
            return credits, _ledger_state(await responses.trailing_metadata())

        credits, ledger = await self._retrying(call)
        return _from_credits(generation_id, credits, ledger)

    async def attribute_stream(self, requests: Iterable[tuple[str, bytes] | tuple[str, bytes, int]], tenant_id: str = "",
                               record: bool = True, collection: str = "") -> AsyncIterator[Attribution]:
        messages = [_request(r[1], r[0], r[2] if len(r) > 2 else 0, tenant_id, record, collection) for r in requests]
        async for message in self.stub.AttributeStream(iter(messages), timeout=self.timeout_s):
            yield _from_result(message)

    async def valuation(self, since: Moment = None, until: Moment = None, training_ids: Iterable[str] = (),
                        limit: int = 0, tenant_id: str = "", collection: str = "") -> Valuation:
        request = _valuation_request(since, until, training_ids, limit, tenant_id, collection)
        return _from_valuation(await self._retrying(lambda: self.stub.GetValuation(request, timeout=self.timeout_s)))

    async def top_contributors(self, limit: int = 10, since: Moment = None, until: Moment = None, tenant_id: str = "",
                               collection: str = "") -> Valuation:
        request = _top_request(limit, since, until, tenant_id, collection)
        return _from_top(await self._retrying(lambda: self.stub.TopContributors(request, timeout=self.timeout_s)))

    async def index_info(self, collection: str = "") -> pb.IndexInfo:
        request = pb.GetIndexInfoRequest(collection=collection)
        return await self._retrying(lambda: self.stub.GetIndexInfo(request, timeout=self.timeout_s))

    async def list_collections(self) -> list[pb.IndexInfo]:
        request = pb.ListCollectionsRequest()
        reply = await self._retrying(lambda: self.stub.ListCollections(request, timeout=self.timeout_s))
        return list(reply.collections)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncGMVClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
