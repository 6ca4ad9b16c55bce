"""Where a request becomes a recorded attribution, whichever door it came in by.

`AttributionService` is transport-free: the gRPC servicer (`grpc_service.py`) and `gmv
attribute` both call it. For each request it picks the collection, answers a retry of a
recorded generation from the ledger (replay), decodes the image, hands it to the dynamic
batcher (which may batch it with other collections' requests where the models are the same),
records the result in the ledger and only then answers. Several collections are served by one
service; each model is loaded once (a shared `ModelPool`).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from PIL import Image

from gmv_engine.credit import Attribution
from gmv_engine.decode import decode_image
from gmv_engine.errors import (
    CollectionNotFoundError,
    GenerationConflictError,
    GMVError,
    InvalidArgumentError,
)
from gmv_engine.ledger import GenerationRecord, Ledger, Window, image_sha256, settings_hash
from gmv_engine.milvus.index import TrainingIndex
from gmv_engine.models import ModelPool
from gmv_engine.pipeline import Attributor, attribute_batch
from gmv_engine.settings import Settings

from .admission import TenantLimits, TenantSlots
from .batcher import UNARY, DynamicBatcher
from .ledger_writer import LedgerWriter
from .metrics import ServerMetrics

log = logging.getLogger("gmv.server.requests")

RECORDED, REPLAYED, NOT_RECORDED = "recorded", "replayed", "not-recorded"
# A tenant's requests looking up replays or decoding at once (the thread pool is first come, first
# served); 4 keeps a tenant's own decode rate far above what the models can take.
THREAD_SLOTS_PER_TENANT = 4


class WarmingUpError(GMVError):
    """The models are still loading (the health service says NOT_SERVING meanwhile)."""


@dataclass(frozen=True)
class AttributionRequest:
    generation_id: str
    image: bytes
    collection: str = ""  # "": the only collection served
    top_k: int = 0  # 0: the settings' top_k
    tenant_id: str = ""
    record: bool = True
    deadline: float | None = None  # time.monotonic() seconds
    stream: str = ""  # "": a unary call; else the stream it came on (its own flow in the fair queue)


@dataclass(frozen=True)
class AttributionOutcome:
    collection: str
    attribution: Attribution
    ledger: str  # RECORDED, REPLAYED or NOT_RECORDED


@dataclass(frozen=True)
class CollectionDescription:
    """What a collection is and how it is searched (GetIndexInfo, ListCollections)."""

    collection: str
    profile: str
    encoder: str
    encoder_dim: int
    reranker: str
    feature_dim: int
    quality: str
    row_count: int
    index_type: str
    index_params: dict[str, str] = field(default_factory=dict)
    search_params: dict[str, str] = field(default_factory=dict)


class AttributionService:
    def __init__(self, settings: Settings, ledger: Ledger | None, metrics: ServerMetrics | None = None):
        self.settings = settings
        self.ledger = ledger
        self.metrics = metrics or ServerMetrics()
        self.ledger_writer = LedgerWriter(ledger, self.metrics) if ledger is not None else None
        self.attributors: dict[str, Attributor] = {}
        self.descriptions: dict[str, CollectionDescription] = {}
        self.batcher: DynamicBatcher | None = None
        self._thread_slots = TenantSlots(THREAD_SLOTS_PER_TENANT)
        self.tenant_limits = TenantLimits(settings.tenant_rate_limit, settings.tenant_max_in_flight, self.metrics)
        self.models: ModelPool | None = None
        self.thumbnails = None  # opt-in: statements show what was generated (gmv_engine/thumbnails.py)
        if settings.thumbnails_mb > 0 and ledger is not None:
            from gmv_engine.thumbnails import ThumbnailStore, thumbnail_dir

            self.thumbnails = ThumbnailStore(thumbnail_dir(settings.data_dir), int(settings.thumbnails_mb * 1024 * 1024))

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self, index: TrainingIndex, collections: Sequence[str], device: str, warm: bool = True) -> None:
        """Load every collection's models (each model once), run one warm-up image through
        each, and start the batcher. Until this returns, requests get WarmingUpError."""
        if not collections:
            raise InvalidArgumentError("no collection to serve")
        self.models = ModelPool(device)
        attributors = {}
        for name in dict.fromkeys(collections):
            attributors[name] = await asyncio.to_thread(
                Attributor, index, name, self.settings, device=device, models=self.models)
        if warm:
            warm_image = Image.new("RGB", (64, 64), (127, 127, 127))
            for attributor in attributors.values():
                await asyncio.to_thread(attributor.attribute, [warm_image])
        self.descriptions = {name: describe(index, a) for name, a in attributors.items()}
        self.batcher = DynamicBatcher(self._run_batch, self.metrics, self.settings.max_batch_size,
                                      self.settings.max_queue_delay_ms / 1000.0, self.settings.max_queue_size,
                                      self.settings.max_tenant_queue_share, self.settings.queue_policy,
                                      self.settings.batch_lanes,
                                      max_tenant_line_bytes=int(self.settings.max_tenant_line_mb * 1024 * 1024))
        self.batcher.start()
        self.attributors = attributors

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()

    def _keep_thumbnail(self, request, image) -> None:
        try:
            self.thumbnails.put(request.tenant_id, request.generation_id, image)
        except OSError as exc:  # a full disk must not fail a recorded generation
            log.warning("could not keep the thumbnail of %r: %s", request.generation_id[:128], exc)

    def refresh_removals(self) -> None:
        """Pick up contributors removed from served collections (`gmv contributors remove`)."""
        for name, attributor in self.attributors.items():
            if attributor.refresh_removals():
                log.info("collection '%s': removed contributors now %s (version %d); they are credited no more",
                         name, ", ".join(sorted(attributor.excluded)) or "none", attributor.removals_version)

    def _run_batch(self, items: Sequence[tuple[Attributor, Image.Image]], top_ks: Sequence[int],
                   checkpoint: Callable[[], None]) -> list[Attribution]:
        return attribute_batch([a for a, _ in items], [image for _, image in items], top_ks,
                               on_batch=self.metrics.observe_stages, checkpoint=checkpoint)

    # -- collections ----------------------------------------------------------------------
    def resolve(self, collection: str) -> str:
        """The collection a request means: its own, or the only one served."""
        if not self.attributors:
            raise WarmingUpError("the server is loading its models; retry shortly")
        if not collection:
            if len(self.attributors) == 1:
                return next(iter(self.attributors))
            raise InvalidArgumentError(
                f"this server serves {len(self.attributors)} collections ({', '.join(self.attributors)}); "
                "name one in the request's collection field")
        if collection not in self.attributors:
            raise CollectionNotFoundError(
                f"collection '{collection}' is not served here; served: {', '.join(self.attributors)}")
        return collection

    def served_label(self, collection: str) -> str:
        """A metric label: the collection when it is served, else "" (no label per unknown name)."""
        if not collection and len(self.attributors) == 1:
            return next(iter(self.attributors))
        return collection if collection in self.attributors else ""

    def describe(self, collection: str = "") -> CollectionDescription:
        return self.descriptions[self.resolve(collection)]

    async def remove_contributor(self, collection: str, contributor_id: str, requested_by: str, tenant_id: str = ""):
        """A contributor's opt-out (gmv_engine.optout), seen by this server at once and recorded
        in its ledger: (the collection, the OptOut)."""
        from gmv_engine.optout import RPC, remove

        attributor = self.attributors[self.resolve(collection)]
        outcome = await asyncio.to_thread(remove, attributor.index, self.ledger, attributor.collection, contributor_id,
                                          requested_via=RPC, requested_by=requested_by, tenant_id=tenant_id)
        await asyncio.to_thread(self.refresh_removals)
        return attributor.collection, outcome

    def list_collections(self) -> list[CollectionDescription]:
        if not self.attributors:
            raise WarmingUpError("the server is loading its models; retry shortly")
        return list(self.descriptions.values())

    # -- attribution ----------------------------------------------------------------------
    async def attribute(self, request: AttributionRequest) -> AttributionOutcome:
        """The generation's attribution and what the ledger did with it. With recording on, the
        credits returned are the ledger's: committed before anything goes back to the caller."""
        started = time.perf_counter()
        collection = self.resolve(request.collection)
        attributor = self.attributors[collection]
        self.check_id("generation_id", request.generation_id, required=True)
        self.check_id("tenant_id", request.tenant_id)
        top_k = request.top_k or self.settings.top_k
        attributor.check_top_k(top_k, 1)
        async with self.tenant_limits.hold(request.tenant_id, wait=bool(request.stream), deadline=request.deadline), \
                self.batcher.admission.admit(request.tenant_id, wait=bool(request.stream), deadline=request.deadline,
                                             size=len(request.image)):
            return await self._attribute(request, collection, attributor, top_k, started)

    async def _attribute(self, request: AttributionRequest, collection: str, attributor: Attributor, top_k: int,
                         started: float) -> AttributionOutcome:
        record = request.record and self.ledger is not None
        image_hash = image_sha256(request.image)
        async with self._thread_slots.slot(request.tenant_id):
            earlier, image = await asyncio.to_thread(self._replay_or_decode, request, attributor, record)
        if earlier is not None:  # a retry of a recorded generation is answered from the ledger, not recomputed
            return self._finish(collection, started, self._replay(request, image_hash, earlier), REPLAYED)
        result = await self.batcher.submit((attributor, image), top_k, request.deadline, request.tenant_id,
                                           request.stream or UNARY)
        self.metrics.generations.labels(collection=collection).inc()
        self.metrics.quality.labels(collection=collection).observe(result.quality)
        if not record:
            return self._finish(collection, started, result, NOT_RECORDED)
        settings = {**attributor.components, **attributor.query_settings(), "top_k": top_k}
        stored, new = await self.ledger_writer.record(GenerationRecord(
            generation_id=request.generation_id, tenant_id=request.tenant_id, collection=collection,
            profile=attributor.info.profile, settings_hash=settings_hash(settings), image_sha256=image_hash,
            quality=result.quality, settings=settings, credits=result.credits,
        ))
        if new:
            if self.thumbnails is not None:
                await asyncio.to_thread(self._keep_thumbnail, request, image)
            return self._finish(collection, started, result, RECORDED)
        return self._finish(collection, started, stored.attribution, REPLAYED)  # a concurrent request recorded it first

    def _replay_or_decode(self, request: AttributionRequest, attributor: Attributor,
                          record: bool) -> tuple[GenerationRecord | None, Image.Image | None]:
        """The recorded generation of this id, or else the decoded image (one thread hop for both)."""
        if record and (earlier := self.ledger.get(request.generation_id, request.tenant_id)) is not None:
            return earlier, None
        decode_started = time.perf_counter()
        image = decode_image(request.image, attributor.limits)
        self.metrics.stage_seconds.labels(stage="decode").observe(time.perf_counter() - decode_started)
        return None, image

    def check_id(self, field_name: str, value: str, required: bool = False) -> None:
        """Ids go into the ledger and every log line about a request: bounded, and printable."""
        if not value:
            if required:
                raise InvalidArgumentError(f"{field_name} is required")
            return
        size = len(value.encode("utf-8"))
        if size > self.settings.max_id_bytes:
            raise InvalidArgumentError(f"{field_name} is {size} bytes; the limit is {self.settings.max_id_bytes}")
        if any(ord(ch) < 32 or 127 <= ord(ch) < 160 for ch in value):
            raise InvalidArgumentError(f"{field_name} contains control characters (newlines, tabs, ...); "
                                       "use printable text")

    def _finish(self, collection: str, started: float, attribution: Attribution, ledger: str) -> AttributionOutcome:
        elapsed = time.perf_counter() - started
        self.metrics.generation_seconds.labels(collection=collection).observe(elapsed)
        log.debug("attributed in %.1f ms (%s)", elapsed * 1000, ledger)
        return AttributionOutcome(collection, attribution, ledger)

    def _replay(self, request: AttributionRequest, image_hash: str, earlier: GenerationRecord) -> Attribution:
        if earlier.image_sha256 != image_hash:
            self.metrics.ledger_writes.labels(outcome="conflict", collection=earlier.collection).inc()
            raise GenerationConflictError(
                f"generation '{request.generation_id}' was already recorded with a different image; "
                "a generation_id must be unique per generated image")
        self.metrics.ledger_writes.labels(outcome="replayed", collection=earlier.collection).inc()
        return earlier.attribution

    # -- the ledger's totals ----------------------------------------------------------------
    def window(self, since: float | None, until: float | None, collection: str, tenant_id: str) -> Window:
        """A ledger window. An empty collection is the only one served, or every collection when
        several are served (a finance team's totals span models)."""
        if since is not None and until is not None and until <= since:
            raise InvalidArgumentError("until must be after since")
        if not collection and len(self.attributors) == 1:
            collection = next(iter(self.attributors))
        return Window(since, until, collection or None, tenant_id or None)

    def _require_ledger(self) -> Ledger:
        if self.ledger is None:
            raise InvalidArgumentError("this service records nothing, so it has no ledger to query")
        return self.ledger

    async def valuation(self, window: Window, limit: int | None, training_ids: list[str] | None):
        ledger = self._require_ledger()
        if training_ids and len(training_ids) > self.settings.max_valuation_ids:
            raise InvalidArgumentError(f"{len(training_ids)} training_ids in one request; the limit is "
                                       f"{self.settings.max_valuation_ids}: ask in pages, or for all (none named)")
        values = await asyncio.to_thread(ledger.values, window, limit, training_ids)
        return values, *(await asyncio.to_thread(ledger.totals, window))

    async def top_contributors(self, window: Window, limit: int):
        ledger = self._require_ledger()
        contributors = await asyncio.to_thread(ledger.contributors, window, limit)
        return contributors, *(await asyncio.to_thread(ledger.totals, window))


def describe(index: TrainingIndex, attributor: Attributor) -> CollectionDescription:
    info, state = attributor.info, index.index_state(attributor.collection)
    return CollectionDescription(
        collection=attributor.collection, profile=info.profile, encoder=info.encoder, encoder_dim=info.encoder_dim,
        reranker=attributor.reranker.name, feature_dim=info.feature_dim, quality=attributor.quality.name,
        row_count=state["total_rows"], index_type=state["index_type"] or "",
        index_params={k: str(v) for k, v in state["params"].items()},
        search_params={k: str(v) for k, v in attributor.query_settings().items()},
    )
