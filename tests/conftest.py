"""Shared fixtures: ONE real embedded Milvus per test session, and the digits data set.

Everything runs on a CPU-only machine with no internet: the `offline` profile needs no
weights, and tests of weight-needing components use stand-ins that are explicit in the test.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One re-rank feature store for the session, like its one Milvus: collections the tests build
# keep their features there, and every `gmv` the tests start finds them through the variable.
if "GMV_FEATURE_STORE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["GMV_FEATURE_STORE"] = tempfile.mkdtemp(prefix="gmv-test-features-")
    atexit.register(shutil.rmtree, os.environ["GMV_FEATURE_STORE"], ignore_errors=True)


@pytest.fixture(scope="session")
def milvus(tmp_path_factory):
    from gmv_engine.milvus.embedded import EmbeddedMilvus, free_port

    shared = os.environ.get("GMV_TEST_MILVUS_PORT")
    if shared:
        # An embedded Milvus started beforehand (`python -m gmv_engine.milvus.embedded DIR PORT`),
        # shared by several test sessions at once to save memory. Tests that stop or restart
        # Milvus, or read what the session's Milvus built, must not run this way.
        yield EmbeddedMilvus(tmp_path_factory.mktemp("milvus-unused"), port=int(shared))
        return
    server = EmbeddedMilvus(tmp_path_factory.mktemp("milvus"), port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres():
    """One real PostgreSQL server per session (skipped, saying why, where none is installed)."""
    from gmv_engine.milvus.embedded import free_port
    from helpers import PostgresServer, find_bindir

    if find_bindir() is None:
        pytest.skip("PostgreSQL is not installed (`make test` installs Debian's postgresql package)")
    server = PostgresServer(free_port()).start()
    yield server
    server.stop()


_databases = iter(range(1, 10_000))


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request, tmp_path):
    """A fresh, empty ledger on each backend: every ledger test runs on SQLite and PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "ledger.sqlite3")
    return request.getfixturevalue("postgres").create_database(f"gmv_ledger_{next(_databases)}")


@pytest.fixture(scope="session")
def index(milvus):
    from gmv_engine.milvus.index import TrainingIndex

    training_index = TrainingIndex(milvus.uri, feature_store=os.environ["GMV_FEATURE_STORE"])
    yield training_index
    training_index.close()


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    from gmv_engine.datasets import export_digits

    return export_digits(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def offline_components():
    from gmv_engine.encoders import create_encoder
    from gmv_engine.rerankers import create_reranker

    return create_encoder("pixels"), create_reranker("l2")


@pytest.fixture(scope="session")
def digits_collection(index, digits, offline_components):
    """The digits training split indexed with the offline profile (built once per session)."""
    from gmv_engine.milvus.index import CollectionInfo
    from gmv_engine.ingest import ingest, read_manifest

    encoder, reranker = offline_components
    info = CollectionInfo("offline", encoder.name, encoder.dim, reranker.name, reranker.feature_dim)
    report = ingest(index, "digits_offline", read_manifest(digits.manifest), info, encoder, reranker, progress=False)
    assert not report.bad, report.bad
    return "digits_offline", report
