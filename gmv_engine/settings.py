"""Every setting of GMV, with its default, defined once.

`Settings` is the one table. Each field is a typed setting with its default and help text;
from it come the command-line flags (`add_flags`), the TOML config file (keys are the field
names), the `GMV_<FIELD>` environment variables and docs/SETTINGS.md (`python -m
gmv_engine.settings`). Sources, later ones winning: these defaults, the config file
(`--config FILE` or GMV_CONFIG), GMV_* variables, then flags. One file configures a whole
deployment: Milvus, models, the pipeline, serving and the ledger.
"""
from __future__ import annotations

import argparse
import math
import os
import tomllib
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

# Groups, in the order help texts and docs/SETTINGS.md show them.
GROUPS = {
    "milvus": "Milvus: embedded by default, any Milvus by URI",
    "models": "models: where weights live and where they run",
    "pipeline": "pipeline: recall, re-rank, quality and credit",
    "images": "image limits: what a generated image may be",
    "ingest": "ingest: building a training index",
    "serving": "serving: the gRPC server, its batcher and metrics",
    "ledger": "ledger: where credits are recorded",
    "security": "security: TLS on the gRPC port (API keys: `gmv keys`, docs/SECURITY.md)",
}


def setting(default: Any, help: str, group: str, *, flag: str | None = None, choices: Iterable[str] | None = None,
            secret: bool = False) -> Any:
    """One row of the table. `flag` overrides the flag's name; `choices` is a registry's names
    (validated on load); a `secret` never appears in help or docs with its value."""
    assert group in GROUPS, group
    metadata = {"help": help, "group": group, "flag": flag, "choices": choices, "secret": secret}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _registry_names(kind: str) -> tuple[str, ...]:
    from . import registry

    return tuple(registry.names(kind))


@dataclass(frozen=True)
class Settings:
    # -- Milvus
    milvus_uri: str = setting("", "Milvus to use, e.g. http://host:19530; empty: start the embedded Milvus on "
                                  "data_dir for the command's duration", "milvus")
    milvus_token: str = setting("", "Milvus token: user:password or an API key", "milvus", secret=True)
    data_dir: str = setting(".gmv", "where the embedded Milvus and the SQLite ledger keep their data", "milvus")
    milvus_port: int = setting(0, "port of the embedded Milvus' proxy on 127.0.0.1; 0: 19530 when free, else any "
                                  "free port (other commands on the data dir find it in its lock file)", "milvus")
    milvus_timeout_s: float = setting(30.0, "seconds one Milvus call may take", "milvus")
    feature_store: str = setting("", "where re-rank features are kept: a directory, or a URI pyarrow opens "
                                     "(s3://bucket/prefix, gs://...) that every replica reads; empty: "
                                     "data_dir/features with the embedded Milvus, and in Milvus (NAME__rerank, "
                                     "held in its memory as float32) with a Milvus by URI", "milvus")
    feature_cache_dir: str = setting("", "a replica's local copy of a remote feature_store (memory-mapped from "
                                         "there); empty: data_dir/feature-cache", "milvus")
    # -- models
    model_dir: str = setting("", "folder holding pretrained weights; empty: each library's standard cache", "models")
    device: str = setting("auto", "torch device: auto (CUDA when present), cpu, cuda, cuda:1 ...", "models")
    # -- pipeline
    recall_k: int = setting(100, "K': candidates recalled from Milvus per generated image", "pipeline")
    top_k: int = setting(10, "k: training images kept after re-ranking (all others get zero credit); "
                             "a request's top_k of 0 means this", "pipeline")
    nprobe: int = setting(32, "IVF lists Milvus visits per query", "pipeline")
    recall_mirror: int = setting(1, "1: recall also searches each generated image mirrored left to right, keeping "
                                    "the K' nearest of both (generators trained with flip augmentation reproduce "
                                    "training images mirrored); one Milvus search of twice the vectors; 0: off",
                                 "pipeline")
    temperature: str = setting("auto", "T in exp(-d/T): auto, the collection's calibrated T (the median distance "
                                       "between a training image and its nearest other one, over 8), or a number; "
                                       "1 is the paper's formula", "pipeline")
    min_quality: float = setting(0.0, "q at least this for an image a quality metric scores lower, for metrics "
                                      "that misjudge a domain (PIQE on microscopy); a flat image still gets q = 0",
                                 "pipeline")
    reranker: str = setting("", "re-ranker: at build, overrides the profile's; at query time, none or empty "
                                "(the collection's own)", "pipeline", choices="reranker")
    quality: str = setting("", "quality metric for q; empty: the collection's profile's", "pipeline",
                           choices="quality")
    feature_cache_mb: int = setting(256, "MiB of re-rank features cached in memory per collection", "pipeline")
    # -- image limits
    max_image_bytes: int = setting(20 * 1024 * 1024, "largest image accepted, in bytes", "images")
    max_image_pixels: int = setting(40_000_000, "most pixels an image may decode to (decompression bombs)", "images")
    min_image_side: int = setting(8, "shortest side an image may have, in pixels", "images")
    # -- ingest
    profile: str = setting("paper", "the components a new collection is built with", "ingest", choices="profile")
    encoder: str = setting("", "recall encoder of a new collection; empty: the profile's", "ingest",
                           choices="encoder")
    ingest_batch_size: int = setting(64, "training images embedded and inserted per batch", "ingest",
                                     flag="--batch-size")
    nlist: int = setting(0, "IVF lists; 0: about 4*sqrt(rows), at least 39 rows a list", "ingest")
    m: int = setting(0, "PQ sub-quantizers; 0: about one per 4 dimensions", "ingest")
    nbits: int = setting(8, "bits per PQ code", "ingest")
    index_type: str = setting("IVF_PQ", "IVF_PQ, or FLAT for exact search (a reference for evaluations)", "ingest",
                              choices=("IVF_PQ", "FLAT"))
    executor: str = setting("local", "where `gmv index build` embeds: local (this process), or ray (a Ray cluster; "
                                      "the `distributed` extra: pip install -e '.[distributed]')", "ingest",
                            choices=("local", "ray"))
    ray_address: str = setting("", "--executor ray: the Ray cluster, e.g. auto, 10.0.0.5:6379 or ray://head:10001; "
                                   "empty: RAY_ADDRESS, else a Ray started on this machine", "ingest")
    ray_actors: int = setting(0, "--executor ray: embedding actors; 0: one per GPU of the cluster, else one per CPU",
                              "ingest")
    # -- serving
    collections: tuple[str, ...] = setting((), "collections `gmv serve` serves (repeat --collection)", "serving",
                                           flag="--collection")
    host: str = setting("127.0.0.1", "address the gRPC server listens on; 0.0.0.0 (as the container image sets) "
                                     "for every interface", "serving")
    port: int = setting(50051, "gRPC port", "serving")
    reflection: int = setting(1, "1: serve gRPC server reflection (what grpcurl lists the API with); 0: off",
                              "serving")
    health_port: int = setting(0, "a second, plaintext port that serves only the gRPC health service (for "
                                  "probes that cannot speak TLS, as Kubernetes' gRPC probe); 0: none", "serving")
    metrics_host: str = setting("127.0.0.1", "address the Prometheus /metrics endpoint listens on", "serving")
    metrics_port: int = setting(0, "Prometheus /metrics port; 0: no metrics endpoint", "serving")
    thumbnails_mb: float = setting(0.0, "keep a small JPEG of each generation recorded, for contributors' statements "
                                        "(`gmv ledger statement`), up to this many MiB under data_dir/thumbnails, "
                                        "oldest dropped first; 0: keep no generated image", "serving")
    max_batch_size: int = setting(32, "generated images per model batch", "serving")
    max_queue_delay_ms: float = setting(5.0, "how long the first request of a batch waits for company", "serving")
    max_queue_size: int = setting(256, "requests in progress (decoding, queued, running, recording) past which "
                                       "unary callers get RESOURCE_EXHAUSTED and streams wait", "serving")
    max_tenant_queue_share: float = setting(0.5, "the part of max_queue_size one tenant's requests may hold, so a "
                                                 "flood leaves room for the others; more wait in the tenant's "
                                                 "own line (max_tenant_line_mb)", "serving")
    max_tenant_line_mb: float = setting(256.0, "image bytes (plus 16 KiB a request) one tenant's requests past its "
                                               "share may hold while they wait in its line; past that its unary "
                                               "calls get RESOURCE_EXHAUSTED", "serving")
    tenant_rate_limit: float = setting(0.0, "requests a second one tenant may make (bursts of one second's "
                                            "worth pass); past it unary calls get RESOURCE_EXHAUSTED and stream "
                                            "items wait; 0: no limit", "serving")
    tenant_max_in_flight: int = setting(0, "requests one tenant may have in progress at once; past it as for "
                                           "tenant_rate_limit; 0: no limit", "serving")
    batch_lanes: int = setting(2, "batches run at once; with 2 or more, one tenant may hold all lanes but one, so "
                                  "a flood leaves a lane for the others", "serving")
    queue_policy: str = setting("fair", "fair: batches filled round-robin over tenants, then over each tenant's "
                                        "streams; fifo: arrival order (for comparison)", "serving",
                                choices=("fair", "fifo"))
    max_stream_in_flight: int = setting(64, "requests of one AttributeStream in flight at once; the stream is "
                                            "read no faster (backpressure)", "serving")
    max_id_bytes: int = setting(128, "longest generation_id or tenant_id accepted, in UTF-8 bytes", "serving")
    max_valuation_ids: int = setting(10_000, "most training_ids one GetValuation request may name", "serving")
    max_message_mb: int = setting(64, "largest gRPC message the server receives, in MiB", "serving")
    grace_s: float = setting(10.0, "how long SIGTERM waits for in-flight calls", "serving")
    log_format: str = setting("text", "text, or json: one object a line, with generation_id on request lines",
                              "serving", choices=("text", "json"))
    milvus_probe_s: float = setting(2.0, "how often gmv serve checks that Milvus answers (within the same time): "
                                         "health is NOT_SERVING while it does not, and an embedded Milvus that died "
                                         "is restarted; 0: never", "serving")
    # -- security
    tls_cert: str = setting("", "PEM certificate (chain) file of the gRPC port; with tls_key, the port speaks TLS only",
                            "security")
    tls_key: str = setting("", "PEM private key file of tls_cert", "security")
    tls_client_ca: str = setting("", "PEM file of the CAs whose client certificates are accepted: mutual TLS, "
                                     "every caller must present one (its common name is its tenant)", "security")
    # -- ledger
    ledger_url: str = setting("", "royalty ledger: postgresql://user:pass@host/db for replicas sharing one, or a "
                                  "SQLite file; empty: DATA_DIR/ledger.sqlite3", "ledger", secret=True)

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def load(cls, file: str | Path | None = None, env: Mapping[str, str] = os.environ,
             overrides: Mapping[str, Any] | None = None) -> "Settings":
        """Defaults < the TOML file < GMV_* variables < overrides (flags; None = not given)."""
        values: dict[str, Any] = {}
        file = file or env.get("GMV_CONFIG") or None
        if file:
            with open(file, "rb") as handle:
                data = tomllib.load(handle)
            unknown = set(data) - set(FIELDS)
            if unknown:
                raise ValueError(f"unknown key(s) in {file}: {', '.join(sorted(unknown))}")
            values.update(data)
        for name in FIELDS:
            raw = env.get(f"GMV_{name.upper()}")
            if raw:
                values[name] = raw
            elif FIELDS[name].metadata["secret"] and env.get(f"GMV_{name.upper()}_FILE"):
                # A secret from a file (a Docker or Kubernetes secret), as PostgreSQL's images do.
                with open(env[f"GMV_{name.upper()}_FILE"], encoding="utf-8") as secret_file:
                    values[name] = secret_file.read().strip()
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        settings = cls(**{name: _convert(name, value) for name, value in values.items()})
        settings.validate()
        return settings

    def validate(self) -> None:
        for f in fields(self):
            choices = f.metadata["choices"]
            value = getattr(self, f.name)
            if choices and value != "":
                allowed = _registry_names(choices) if isinstance(choices, str) else choices
                if value not in allowed:
                    raise ValueError(f"{f.name} must be one of {', '.join(allowed)}, not '{value}'")
        if self.batch_lanes < 1:
            raise ValueError(f"batch_lanes must be at least 1, not {self.batch_lanes}")
        if not 0 < self.max_tenant_queue_share <= 1:
            raise ValueError(f"max_tenant_queue_share must be in (0, 1], not {self.max_tenant_queue_share}")
        if self.max_tenant_line_mb < 0:
            raise ValueError(f"max_tenant_line_mb must be >= 0, not {self.max_tenant_line_mb}")
        if bool(self.tls_cert) != bool(self.tls_key) or (self.tls_client_ca and not self.tls_cert):
            raise ValueError("TLS needs tls_cert and tls_key together (and both for tls_client_ca)")
        self.check_query()

    def check_query(self) -> None:
        from .errors import InvalidArgumentError

        if not 1 <= self.recall_k <= 16384:
            raise InvalidArgumentError(f"recall_k must be between 1 and 16384 (Milvus' limit), got {self.recall_k}")
        if not 1 <= self.top_k <= self.recall_k:
            raise InvalidArgumentError(f"top_k must be between 1 and recall_k={self.recall_k}, got {self.top_k}")
        if self.nprobe < 1:
            raise InvalidArgumentError(f"nprobe must be at least 1, got {self.nprobe}")
        if self.temperature != "auto" and not (self.fixed_temperature or 0) > 0:
            raise InvalidArgumentError(f"temperature must be auto or a number > 0, got {self.temperature!r}")
        if self.recall_mirror not in (0, 1):
            raise InvalidArgumentError(f"recall_mirror must be 0 or 1, got {self.recall_mirror}")
        if self.thumbnails_mb < 0:
            raise InvalidArgumentError(f"thumbnails_mb must be >= 0, got {self.thumbnails_mb}")
        if not 0.0 <= self.min_quality <= 1.0:
            raise InvalidArgumentError(f"min_quality must lie in [0, 1], got {self.min_quality}")

    def with_(self, **changes: Any) -> "Settings":
        return replace(self, **changes)

    # -- derived ----------------------------------------------------------------------------
    @property
    def fixed_temperature(self) -> float | None:
        """T as a number, or None for auto (the collection's calibrated T)."""
        if self.temperature == "auto":
            return None
        try:
            value = float(self.temperature)
        except ValueError:
            return None
        return value if math.isfinite(value) else None

    @property
    def embedded(self) -> bool:
        return not self.milvus_uri

    def resolved_feature_store(self) -> str | None:
        """Where re-rank features are kept (None: in Milvus): see feature_store."""
        if self.feature_store:
            return self.feature_store
        return str(Path(self.data_dir).absolute() / "features") if self.embedded else None

    def resolved_feature_cache_dir(self) -> str:
        return self.feature_cache_dir or str(Path(self.data_dir).absolute() / "feature-cache")

    def resolved_ledger_url(self) -> str:
        from .ledger import default_ledger_url

        return self.ledger_url or default_ledger_url(self.data_dir)

    def query_settings(self) -> dict[str, Any]:
        """The search-time settings a server reports and a ledger record hashes."""
        return {"recall_k": self.recall_k, "nprobe": self.nprobe, "recall_mirror": self.recall_mirror, "top_k": self.top_k,
                "temperature": self.temperature, "min_quality": self.min_quality}


FIELDS = {f.name: f for f in fields(Settings)}
DEFAULTS = Settings()


def _convert(name: str, value: Any) -> Any:
    kind = FIELDS[name].type
    if kind == "tuple[str, ...]":
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return tuple(str(v) for v in value)
    caster = {"int": int, "float": float, "str": str}[kind]
    try:
        return caster(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {kind}, not {value!r}") from None


def _default_of(f) -> Any:
    return f.default if f.default is not MISSING else f.default_factory()


def flag_of(name: str) -> str:
    return FIELDS[name].metadata["flag"] or "--" + name.replace("_", "-")


def describe_default(name: str) -> str:
    f = FIELDS[name]
    default = _default_of(f)
    if f.metadata["secret"] or default in ("", ()):
        return "none" if default in ("", ()) else "set"
    return ",".join(default) if isinstance(default, tuple) else str(default)


def add_flags(parser: argparse.ArgumentParser, groups: Iterable[str] = (), names: Iterable[str] = (),
              exclude: Iterable[str] = ()) -> None:
    """Flags for the settings of `groups` (and single `names`), help from the table. A flag not
    given stays None, so the file and environment are not overridden by argparse defaults."""
    wanted = [f for f in fields(Settings) if (f.metadata["group"] in groups or f.name in names)
              and f.name not in exclude]
    by_group: dict[str, argparse._ArgumentGroup] = {}
    for f in wanted:
        group = by_group.get(f.metadata["group"])
        if group is None:
            group = by_group[f.metadata["group"]] = parser.add_argument_group(GROUPS[f.metadata["group"]])
        choices = f.metadata["choices"]
        help_text = f"{f.metadata['help']} (default {describe_default(f.name)}; env GMV_{f.name.upper()})"
        if isinstance(choices, str):
            help_text += f"; one of the registered {choices}s"
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if f.type == "tuple[str, ...]":
            kwargs["action"] = "append"
        else:
            kwargs["type"] = {"int": int, "float": float, "str": str}[f.type]
        if isinstance(choices, tuple):
            kwargs["choices"] = choices
        group.add_argument(flag_of(f.name), **kwargs)


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="TOML file of settings, keys as in docs/SETTINGS.md (env GMV_CONFIG)")


def from_args(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> Settings:
    """Settings for a command: the file named by --config, the environment, then its flags."""
    overrides = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    return Settings.load(getattr(args, "config", None), env=env, overrides=overrides)


def markdown() -> str:
    """docs/SETTINGS.md: the table, as users read it."""
    lines = ["# Settings", "",
             "Generated from `gmv_engine/settings.py` (`python -m gmv_engine.settings > docs/SETTINGS.md`); "
             "a test fails when it is out of date.", "",
             "Every setting is a key of the TOML config file (`--config FILE`, or `GMV_CONFIG`), a `GMV_<KEY>` "
             "environment variable and a flag of the commands it applies to. Later sources win: default, file, "
             "environment, flag. A list (`collections`) is a TOML array, or comma-separated in the environment.", ""]
    for group, title in GROUPS.items():
        lines += [f"## {title}", "", "| key | flag | default | what |", "|---|---|---|---|"]
        for f in fields(Settings):
            if f.metadata["group"] == group:
                lines.append(f"| `{f.name}` | `{flag_of(f.name)}` | {describe_default(f.name)} | {f.metadata['help']} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(), end="")
