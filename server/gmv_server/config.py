"""The server's one typed config. Sources, later ones winning: defaults below, a TOML file
(`gmv serve --config FILE`, keys as the field names), GMV_* environment variables
(GMV_MAX_BATCH_SIZE=64), then command-line flags."""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping


@dataclass(frozen=True)
class ServerConfig:
    collection: str = ""  # required
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int = 0  # 0: no metrics endpoint
    max_batch_size: int = 32  # images per model batch
    max_queue_delay_ms: float = 5.0  # how long the first request of a batch waits for company
    max_queue_size: int = 256  # waiting requests past which callers get RESOURCE_EXHAUSTED
    top_k: int = 10
    recall_k: int = 100
    nprobe: int = 32
    temperature: float = 1.0
    reranker: str = ""  # "": the collection's
    quality: str = ""  # "": the profile's
    device: str = "auto"
    grace_s: float = 10.0  # how long SIGTERM waits for in-flight calls
    ledger_url: str = ""  # "": SQLite in the data directory; postgresql://... for shared replicas
    log_format: str = "text"  # "text", or "json": one object a line, with generation_id on request lines
    milvus_probe_s: float = 15.0  # how often an idle server checks Milvus for gmv_milvus_up (0: never)

    @classmethod
    def load(cls, file: str | Path | None = None, env: Mapping[str, str] = os.environ,
             overrides: Mapping[str, Any] | None = None) -> "ServerConfig":
        values: dict[str, Any] = {}
        types = {f.name: type(f.default) for f in fields(cls)}
        if file:
            with open(file, "rb") as handle:
                data = tomllib.load(handle)
            unknown = set(data) - set(types)
            if unknown:
                raise ValueError(f"unknown key(s) in {file}: {', '.join(sorted(unknown))}")
            values.update(data)
        for name in types:
            raw = env.get(f"GMV_{name.upper()}")
            if raw:
                values[name] = raw
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        config = cls(**{k: types[k](v) for k, v in values.items()})
        if config.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be text or json, not '{config.log_format}'")
        if not config.collection:
            raise ValueError("a collection is required (--collection, GMV_COLLECTION or `collection` in the config file)")
        return config
