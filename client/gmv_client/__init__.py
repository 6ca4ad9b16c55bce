"""GMV client SDK: typed results over gmv.v1.AttributionService. Needs only grpcio and protobuf.

    from gmv_client import GMVClient
    with GMVClient("localhost:50051") as gmv:
        result = gmv.attribute(png_bytes, generation_id="gen-1")
        print(result.quality, result.contributors)

UNAVAILABLE (server warming up, restarting, or its Milvus down) and RESOURCE_EXHAUSTED
(queue full) are retried with exponential backoff; other errors raise grpc.RpcError at once.
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import AsyncIterator, Iterable, Iterator

import grpc

from gmv.v1 import attribution_pb2 as pb
from gmv.v1 import attribution_pb2_grpc as pb_grpc

__all__ = ["Attribution", "Credit", "GMVClient", "AsyncGMVClient", "RETRYABLE"]

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


def _credit(message: pb.Credit) -> Credit:
    return Credit(message.rank, message.training_id, message.contributor_id, message.credit, message.distance)


def _from_result(message: pb.AttributionResult) -> Attribution:
    return Attribution(message.generation_id, message.quality, tuple(_credit(c) for c in message.credits),
                       tuple((c.contributor_id, c.credit) for c in message.contributors))


def _from_credits(generation_id: str, credits: list[pb.Credit]) -> Attribution:
    totals: dict[str, float] = {}
    for c in credits:
        totals[c.contributor_id] = totals.get(c.contributor_id, 0.0) + c.credit
    return Attribution(generation_id, credits[0].quality if credits else 0.0, tuple(_credit(c) for c in credits),
                       tuple(sorted(totals.items(), key=lambda item: (-item[1], item[0]))))


def _request(image: bytes, generation_id: str, top_k: int) -> pb.AttributeRequest:
    return pb.AttributeRequest(generation_id=generation_id, image=image, top_k=top_k)


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

    def attribute(self, image: bytes, generation_id: str, top_k: int = 0) -> Attribution:
        """Credits for one generated image (PNG/JPEG/WebP bytes), in rank order."""
        request = _request(image, generation_id, top_k)
        credits = self._retrying(lambda: list(self.stub.Attribute(request, timeout=self.timeout_s)))
        return _from_credits(generation_id, credits)

    def attribute_stream(self, requests: Iterable[tuple[str, bytes] | tuple[str, bytes, int]]) -> Iterator[Attribution]:
        """Many generations over one call: (generation_id, image[, top_k]) in; results in any order.
        Not retried (a stream may have been half consumed); retry the ids you did not get back."""
        messages = (_request(r[1], r[0], r[2] if len(r) > 2 else 0) for r in requests)
        for message in self.stub.AttributeStream(messages, timeout=self.timeout_s):
            yield _from_result(message)

    def index_info(self) -> pb.IndexInfo:
        return self._retrying(lambda: self.stub.GetIndexInfo(pb.GetIndexInfoRequest(), timeout=self.timeout_s))

    def wait_until_ready(self, timeout_s: float = 300.0, poll_s: float = 0.5) -> pb.IndexInfo:
        """Block until the server answers (it says UNAVAILABLE while its models load)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.stub.GetIndexInfo(pb.GetIndexInfoRequest(), timeout=min(5.0, timeout_s))
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

    async def attribute(self, image: bytes, generation_id: str, top_k: int = 0) -> Attribution:
        request = _request(image, generation_id, top_k)

        async def call():
            return [credit async for credit in self.stub.Attribute(request, timeout=self.timeout_s)]

        return _from_credits(generation_id, await self._retrying(call))

    async def attribute_stream(self, requests: Iterable[tuple[str, bytes] | tuple[str, bytes, int]]) -> AsyncIterator[Attribution]:
        messages = [_request(r[1], r[0], r[2] if len(r) > 2 else 0) for r in requests]
        async for message in self.stub.AttributeStream(iter(messages), timeout=self.timeout_s):
            yield _from_result(message)

    async def index_info(self) -> pb.IndexInfo:
        return await self._retrying(lambda: self.stub.GetIndexInfo(pb.GetIndexInfoRequest(), timeout=self.timeout_s))

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncGMVClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
