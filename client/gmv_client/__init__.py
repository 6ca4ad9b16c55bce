"""GMV client SDK: typed results over gmv.v1.AttributionService. Needs only grpcio and protobuf.

    from gmv_client import GMVClient
    with GMVClient("localhost:50051") as gmv:
        result = gmv.attribute(png_bytes, generation_id="gen-1")
        print(result.quality, result.contributors)

A server that requires keys takes `api_key=` (or the GMV_API_KEY environment variable); one
that speaks TLS takes `tls_ca="ca.pem"` (or True for the system's roots), and under mutual TLS
`tls_cert=`/`tls_key=` too. The tenant is the key's: `tenant_id=` may only repeat it (an
admin key may name any).

Retries ride out a server restart: UNAVAILABLE (server down, restarting, warming up, or its
Milvus or ledger down) and RESOURCE_EXHAUSTED (queue full) are retried until the call's
deadline (`timeout_s`, 30 s by default; every public method also takes `timeout_s=` for one
call), sleeping a "full jitter" exponential backoff between attempts: a uniform random time in
[0, min(max_backoff_s, backoff_s * backoff_multiplier ** n)] (0.1 s, x2, capped at 2 s by
default). Each attempt gets the time left as its gRPC timeout, no sleep reaches past the
deadline, and when time runs out the last attempt's error is raised (UNAVAILABLE, or
DEADLINE_EXCEEDED when an attempt itself ran out of time). `retries=N` also caps the attempts
at N + 1 (default None: no cap but the deadline). Other errors raise grpc.RpcError at once.
Retrying is safe: the server records each generation_id once and answers a repeat with the
recorded credits (`Attribution.ledger == "replayed"`). `attribute_stream` is not retried (a
stream may have been half consumed). gRPC's own service-config retry policy is not used: it
caps attempts at 5 and would multiply the `retries` cap; its transparent retries (of calls that
never reached a server) stay on. The channels made here reconnect at least every
max(1 s, max_backoff_s) while the server is away, so a restarted server is seen promptly.
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
           "AsyncGMVClient", "RETRYABLE", "backoff_delay"]

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
MIN_ATTEMPT_S = 0.005  # an attempt with less time left than this is not made


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


def backoff_delay(retry: int, initial_s: float = 0.1, multiplier: float = 2.0, max_s: float = 2.0,
                  rng: random.Random | None = None) -> float:
    """The sleep before retry number `retry` (0 = the first): "full jitter", uniform in
    [0, min(max_s, initial_s * multiplier ** retry)], so callers that failed together do not
    retry in step."""
    ceiling = min(max_s, initial_s * multiplier ** min(retry, 64))
    return (rng or random).uniform(0.0, ceiling)


def _retryable(error: grpc.RpcError, codes) -> bool:
    # RESOURCE_EXHAUSTED is also gRPC's answer to a message over a size limit: never retried.
    return error.code() in codes and "larger than max" not in (error.details() or "")


class _Attempts:
    """One call's retry state: its deadline, attempts made and the backoff settings."""

    def __init__(self, client, timeout_s: float | None, retries: int | None, codes=RETRYABLE,
                 attempt_cap_s: float | None = None, max_backoff_s: float | None = None):
        self.deadline = time.monotonic() + (client.timeout_s if timeout_s is None else timeout_s)
        self.client, self.retries, self.codes, self.attempt_cap_s = client, retries, codes, attempt_cap_s
        self.max_backoff_s = client.max_backoff_s if max_backoff_s is None else max_backoff_s
        self.made = 0
        self.capped = False  # the last attempt's timeout was attempt_cap_s, not the time left

    def timeout(self) -> float:
        """The gRPC timeout of the next attempt: the time left (or the per-attempt cap)."""
        left = max(0.0, self.deadline - time.monotonic())
        self.capped = self.attempt_cap_s is not None and self.attempt_cap_s < left
        self.made += 1
        return self.attempt_cap_s if self.capped else left

    def too_late(self) -> bool:
        """After a sleep that overshot: too little time left for an attempt to do anything but
        time out (the caller would see DEADLINE_EXCEEDED instead of why the last one failed)."""
        return self.deadline - time.monotonic() < MIN_ATTEMPT_S

    def delay(self, error: grpc.RpcError) -> float | None:
        """How long to sleep before retrying after `error`; None: give up and raise it."""
        timed_out = self.capped and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        if not (timed_out or _retryable(error, self.codes)):
            return None
        if self.retries is not None and self.made > self.retries:
            return None
        delay = backoff_delay(self.made - 1, self.client.backoff_s, self.client.backoff_multiplier, self.max_backoff_s)
        if time.monotonic() + delay >= self.deadline:
            return None  # the next attempt would start at or after the deadline
        return delay


def _channel_options(max_backoff_s: float) -> list[tuple[str, int]]:
    # gRPC reconnects a lost channel with its own backoff (up to 120 s by default), failing calls
    # fast meanwhile: bound it so a restarted server is reached within about max_backoff_s.
    reconnect_ms = max(1000, int(max_backoff_s * 1000))
    return [("grpc.max_send_message_length", 64 << 20), ("grpc.initial_reconnect_backoff_ms", 1000),
            ("grpc.max_reconnect_backoff_ms", reconnect_ms)]


def _tls_credentials(ca: str | bool | None, cert: str | None, key: str | None) -> grpc.ChannelCredentials | None:
    """TLS when asked for: ca is a PEM file of the server's CA, or True for the system's roots;
    cert and key, PEM files, present a client certificate (mutual TLS)."""
    if not (ca or cert):
        return None

    def read(path: str | None) -> bytes | None:
        if not path:
            return None
        with open(path, "rb") as file:
            return file.read()

    return grpc.ssl_channel_credentials(root_certificates=read(ca) if isinstance(ca, str) else None,
                                        private_key=read(key), certificate_chain=read(cert))


def _auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The API key (gmv keys create) on every call; GMV_API_KEY when none is given."""
    import os

    api_key = api_key or os.environ.get("GMV_API_KEY") or ""
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


class GMVClient:
    """A blocking client. timeout_s: each call's overall deadline, retries included (a method's
    `timeout_s=` overrides it for one call). retries: at most this many retries (None: retry
    until the deadline). backoff_s, backoff_multiplier, max_backoff_s: the jittered exponential
    backoff between attempts (see the module's docstring)."""

    def __init__(self, target: str, timeout_s: float = 30.0, retries: int | None = None, backoff_s: float = 0.1,
                 channel: grpc.Channel | None = None, *, backoff_multiplier: float = 2.0, max_backoff_s: float = 2.0,
                 api_key: str | None = None, tls_ca: str | bool | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None):
        credentials = _tls_credentials(tls_ca, tls_cert, tls_key)
        self.channel = channel or (
            grpc.secure_channel(target, credentials, options=_channel_options(max_backoff_s)) if credentials
            else grpc.insecure_channel(target, options=_channel_options(max_backoff_s)))
        self.metadata = _auth_metadata(api_key)
        self.stub = pb_grpc.AttributionServiceStub(self.channel)
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.backoff_multiplier, self.max_backoff_s = backoff_multiplier, max_backoff_s

    def _retrying(self, call, timeout_s: float | None = None, **attempts):
        """call(timeout) until it returns, a non-retryable error, the retries cap or the deadline."""
        state = _Attempts(self, timeout_s, attempts.pop("retries", self.retries), **attempts)
        while True:
            try:
                return call(state.timeout())
            except grpc.RpcError as error:
                delay = state.delay(error)
                if delay is None:
                    raise
                time.sleep(delay)
                if state.too_late():
                    raise

    def attribute(self, image: bytes, generation_id: str, top_k: int = 0, tenant_id: str = "",
                  record: bool = True, collection: str = "", *, timeout_s: float | None = None) -> Attribution:
        """Credits for one generated image (PNG/JPEG/WebP bytes), in rank order. record=False:
        a preview the server does not write to its ledger."""
        request = _request(image, generation_id, top_k, tenant_id, record, collection)

        def call(timeout):
            responses = self.stub.Attribute(request, timeout=timeout, metadata=self.metadata)
            return list(responses), _ledger_state(responses.trailing_metadata())

        credits, ledger = self._retrying(call, timeout_s)
        return _from_credits(generation_id, credits, ledger)

    def attribute_stream(self, requests: Iterable[tuple[str, bytes] | tuple[str, bytes, int]], tenant_id: str = "",
                         record: bool = True, collection: str = "", *,
                         timeout_s: float | None = None) -> Iterator[Attribution]:
        """Many generations over one call: (generation_id, image[, top_k]) in; results in any order.
        A failed generation comes back with `error_code`/`error_message` set and the stream goes on.
        Not retried here (a stream may have been half consumed): resend the ids you did not get
        back, or the whole stream; recorded ones come back as "replayed", never twice."""
        messages = (_request(r[1], r[0], r[2] if len(r) > 2 else 0, tenant_id, record, collection) for r in requests)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        for message in self.stub.AttributeStream(messages, timeout=timeout, metadata=self.metadata):
            yield _from_result(message)

    def valuation(self, since: Moment = None, until: Moment = None, training_ids: Iterable[str] = (), limit: int = 0,
                  tenant_id: str = "", collection: str = "", *, timeout_s: float | None = None) -> Valuation:
        """phi_i per credited training image from the server's ledger, largest first."""
        request = _valuation_request(since, until, training_ids, limit, tenant_id, collection)
        return _from_valuation(self._retrying(lambda t: self.stub.GetValuation(request, timeout=t, metadata=self.metadata), timeout_s))

    def top_contributors(self, limit: int = 10, since: Moment = None, until: Moment = None, tenant_id: str = "",
                         collection: str = "", *, timeout_s: float | None = None) -> Valuation:
        request = _top_request(limit, since, until, tenant_id, collection)
        return _from_top(self._retrying(lambda t: self.stub.TopContributors(request, timeout=t, metadata=self.metadata), timeout_s))

    def index_info(self, collection: str = "", *, timeout_s: float | None = None) -> pb.IndexInfo:
        request = pb.GetIndexInfoRequest(collection=collection)
        return self._retrying(lambda t: self.stub.GetIndexInfo(request, timeout=t, metadata=self.metadata), timeout_s)

    def list_collections(self, *, timeout_s: float | None = None) -> list[pb.IndexInfo]:
        """Every collection the server serves."""
        request = pb.ListCollectionsRequest()
        return list(self._retrying(lambda t: self.stub.ListCollections(request, timeout=t, metadata=self.metadata), timeout_s).collections)

    def remove_contributor(self, contributor_id: str, collection: str = "", *,
                           timeout_s: float | None = None) -> pb.RemoveContributorResponse:
        """A contributor's opt-out (needs an admin key): their images leave the collection and
        are credited no more. Safe to retry: a second run finishes an interrupted one."""
        request = pb.RemoveContributorRequest(collection=collection, contributor_id=contributor_id)
        return self._retrying(lambda t: self.stub.RemoveContributor(request, timeout=t, metadata=self.metadata),
                              timeout_s)

    def wait_until_ready(self, timeout_s: float = 300.0, poll_s: float = 0.5, collection: str = "") -> pb.IndexInfo:
        """Block until the server answers (it says UNAVAILABLE while its models load), polling
        at most 5 s per attempt with jittered sleeps of at most poll_s; `retries` does not apply."""
        request = pb.GetIndexInfoRequest(collection=collection)
        return self._retrying(lambda t: self.stub.GetIndexInfo(request, timeout=t, metadata=self.metadata), timeout_s, retries=None,
                              codes=(grpc.StatusCode.UNAVAILABLE,), attempt_cap_s=5.0, max_backoff_s=poll_s)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "GMVClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncGMVClient:
    """The asyncio client: the same settings and retries as GMVClient."""

    def __init__(self, target: str, timeout_s: float = 30.0, retries: int | None = None, backoff_s: float = 0.1, *,
                 backoff_multiplier: float = 2.0, max_backoff_s: float = 2.0, api_key: str | None = None,
                 tls_ca: str | bool | None = None, tls_cert: str | None = None, tls_key: str | None = None):
        credentials = _tls_credentials(tls_ca, tls_cert, tls_key)
        self.channel = (grpc.aio.secure_channel(target, credentials, options=_channel_options(max_backoff_s))
                        if credentials else grpc.aio.insecure_channel(target, options=_channel_options(max_backoff_s)))
        self.metadata = _auth_metadata(api_key)
        self.stub = pb_grpc.AttributionServiceStub(self.channel)
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.backoff_multiplier, self.max_backoff_s = backoff_multiplier, max_backoff_s

    async def _retrying(self, call, timeout_s: float | None = None, **attempts):
        state = _Attempts(self, timeout_s, attempts.pop("retries", self.retries), **attempts)
        while True:
            try:
                return await call(state.timeout())
            except grpc.RpcError as error:
                delay = state.delay(error)
                if delay is None:
                    raise
                await asyncio.sleep(delay)
                if state.too_late():
                    raise

    async def attribute(self, image: bytes, generation_id: str, top_k: int = 0, tenant_id: str = "",
                        record: bool = True, collection: str = "", *, timeout_s: float | None = None) -> Attribution:
        request = _request(image, generation_id, top_k, tenant_id, record, collection)

        async def call(timeout):
            responses = self.stub.Attribute(request, timeout=timeout, metadata=self.metadata)
            credits = [credit async for credit in responses]
            return credits, _ledger_state(await responses.trailing_metadata())

        credits, ledger = await self._retrying(call, timeout_s)
        return _from_credits(generation_id, credits, ledger)

    async def attribute_stream(self, requests: Iterable[tuple[str, bytes] | tuple[str, bytes, int]], tenant_id: str = "",
                               record: bool = True, collection: str = "", *,
                               timeout_s: float | None = None) -> AsyncIterator[Attribution]:
        """As GMVClient.attribute_stream: not retried."""
        messages = [_request(r[1], r[0], r[2] if len(r) > 2 else 0, tenant_id, record, collection) for r in requests]
        timeout = self.timeout_s if timeout_s is None else timeout_s
        async for message in self.stub.AttributeStream(iter(messages), timeout=timeout, metadata=self.metadata):
            yield _from_result(message)

    async def valuation(self, since: Moment = None, until: Moment = None, training_ids: Iterable[str] = (),
                        limit: int = 0, tenant_id: str = "", collection: str = "", *,
                        timeout_s: float | None = None) -> Valuation:
        request = _valuation_request(since, until, training_ids, limit, tenant_id, collection)
        return _from_valuation(await self._retrying(lambda t: self.stub.GetValuation(request, timeout=t, metadata=self.metadata), timeout_s))

    async def top_contributors(self, limit: int = 10, since: Moment = None, until: Moment = None, tenant_id: str = "",
                               collection: str = "", *, timeout_s: float | None = None) -> Valuation:
        request = _top_request(limit, since, until, tenant_id, collection)
        return _from_top(await self._retrying(lambda t: self.stub.TopContributors(request, timeout=t, metadata=self.metadata), timeout_s))

    async def index_info(self, collection: str = "", *, timeout_s: float | None = None) -> pb.IndexInfo:
        request = pb.GetIndexInfoRequest(collection=collection)
        return await self._retrying(lambda t: self.stub.GetIndexInfo(request, timeout=t, metadata=self.metadata), timeout_s)

    async def list_collections(self, *, timeout_s: float | None = None) -> list[pb.IndexInfo]:
        request = pb.ListCollectionsRequest()
        reply = await self._retrying(lambda t: self.stub.ListCollections(request, timeout=t, metadata=self.metadata), timeout_s)
        return list(reply.collections)

    async def remove_contributor(self, contributor_id: str, collection: str = "", *,
                                 timeout_s: float | None = None) -> pb.RemoveContributorResponse:
        """As GMVClient.remove_contributor."""
        request = pb.RemoveContributorRequest(collection=collection, contributor_id=contributor_id)
        return await self._retrying(lambda t: self.stub.RemoveContributor(request, timeout=t, metadata=self.metadata),
                                    timeout_s)

    async def wait_until_ready(self, timeout_s: float = 300.0, poll_s: float = 0.5,
                               collection: str = "") -> pb.IndexInfo:
        """As GMVClient.wait_until_ready."""
        request = pb.GetIndexInfoRequest(collection=collection)
        return await self._retrying(lambda t: self.stub.GetIndexInfo(request, timeout=t, metadata=self.metadata), timeout_s, retries=None,
                                    codes=(grpc.StatusCode.UNAVAILABLE,), attempt_cap_s=5.0, max_backoff_s=poll_s)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncGMVClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
