"""A contributor's opt-out as one use case, whichever door it comes in by (`gmv contributors
remove`, the RemoveContributor RPC): take every image of theirs out of the collection
(gmv_engine/milvus/erasure.py), then record the erasure in the ledger, once.

The ledger is written after Milvus, so it records only removals that are complete. A removal
keeps the time it was first marked, and that time keys its ledger row: the run that finishes an
interrupted removal (or a ledger write that failed) records it, and no later run records it
again (docs/CONTRIBUTORS.md).
"""
from __future__ import annotations

import getpass
import os
import socket
from dataclasses import dataclass

from .ledger import Erasure, Ledger
from .milvus.erasure import Removal, removals, remove_contributor
from .milvus.index import TrainingIndex

CLI, RPC = "cli", "rpc"


@dataclass(frozen=True)
class OptOut:
    removal: Removal  # what Milvus holds: the removal over every run of it
    erasure: Erasure | None  # the ledger's record of it; None when there is no ledger
    recorded_now: bool  # False: recorded by an earlier run (or not at all)


def remove(index: TrainingIndex, ledger: Ledger | None, collection: str, contributor_id: str, *,
           requested_via: str, requested_by: str, tenant_id: str = "") -> OptOut:
    """Remove `contributor_id` from `collection` and record the erasure in `ledger`."""
    removal = remove_contributor(index, collection, contributor_id)
    if ledger is None:
        return OptOut(removal, None, False)
    version = removals(index, collection).version  # at least the version that completed it
    erasure, new = ledger.record_erasure(Erasure(
        collection, removal.contributor_id, removal.removed_at, removal.rows, removal.hashes_blocked, version,
        requested_via, requested_by, tenant_id))
    return OptOut(removal, erasure, new)


def command_line_user() -> str:
    """Who runs a command: the OS user at the host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()}"
