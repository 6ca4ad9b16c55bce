"""What several commands share: exit statuses, opening Milvus from the settings, checking a
port before anything slow starts, and printing attributions."""
from __future__ import annotations

import contextlib
import errno
import json
import socket
import sys
from pathlib import Path
from typing import Iterator

from gmv_engine.credit import Attribution
from gmv_engine.errors import GMVError
from gmv_engine.settings import Settings, flag_of

EXIT_OK, EXIT_PARTIAL, EXIT_FAILED = 0, 1, 2


class PortInUseError(GMVError):
    """A port this command must listen on is taken (exit 2, before Milvus starts)."""


@contextlib.contextmanager
def open_index(settings: Settings) -> Iterator:
    """The TrainingIndex on settings.milvus_uri, or on an embedded Milvus started for the block."""
    from gmv_engine.milvus.embedded import open_index as open_milvus

    with open_milvus(settings.milvus_uri or None, settings.data_dir, settings.milvus_port, settings.milvus_token,
                     settings.milvus_timeout_s, settings.resolved_feature_store(),
                     settings.resolved_feature_cache_dir()) as index:
        yield index


def device(settings: Settings) -> str:
    from gmv_engine.models import pick_device

    return pick_device(settings.device)


def check_port_free(host: str, port: int, setting: str) -> None:
    """Fail at once, naming the port and the flag that moves it, if something listens there."""
    if not port:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: TIME_WAIT is no conflict
        try:
            sock.bind((host, port))
        except OSError as exc:
            reason = "already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise PortInUseError(f"port {port} ({flag_of(setting)}) on {host or '*'} is not available: {reason}; "
                                 f"pass {flag_of(setting)} with a free port") from None


def attribution_record(generation_id: str, path: Path, result: Attribution) -> dict:
    return {
        "generation_id": generation_id,
        "image": str(path),
        "quality": result.quality,
        "credits": [{"rank": c.rank, "training_id": c.training_id, "contributor_id": c.contributor_id,
                     "credit": c.credit, "distance": c.distance} for c in result.credits],
        "contributors": [{"contributor_id": cid, "credit": credit} for cid, credit in result.contributors],
    }


def format_json(generation_id: str, path: Path, result: Attribution) -> str:
    return json.dumps(attribution_record(generation_id, path, result))


def format_table(generation_id: str, path: Path, result: Attribution, ledger: str = "") -> str:
    state = f", {ledger}" if ledger else ""
    lines = [f"{path}  (generation {generation_id}, quality q = {result.quality:.4f}{state})",
             f"  {'rank':>4}  {'training_id':<28} {'contributor':<20} {'credit':>10} {'distance':>10}"]
    for c in result.credits:
        lines.append(f"  {c.rank:>4}  {c.training_id:<28} {c.contributor_id:<20} {c.credit:>10.6f} {c.distance:>10.4f}")
    lines.append("  contributors: " + ", ".join(f"{cid} {credit:.6f}" for cid, credit in result.contributors))
    return "\n".join(lines)


def warn(message: str) -> None:
    print(f"gmv: {message}", file=sys.stderr)
