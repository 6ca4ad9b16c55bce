import argparse

import grpc
import pytest

from gmv_engine.settings import Settings
from gmv_server.commands.serve import load_settings


def test_precedence_defaults_file_env_flags(tmp_path):
    config_file = tmp_path / "gmv.toml"
    config_file.write_text('collections = ["from_file"]\nmax_batch_size = 8\nport = 6000\n')
    config = Settings.load(config_file, env={"GMV_MAX_BATCH_SIZE": "16", "GMV_MAX_QUEUE_DELAY_MS": "2.5"},
                           overrides={"port": 7000, "top_k": None})
    assert (config.collections, config.max_batch_size, config.max_queue_delay_ms, config.port, config.top_k) == (
        ("from_file",), 16, 2.5, 7000, 10)


def test_unknown_keys_and_missing_collection_are_errors(tmp_path):
    config_file = tmp_path / "gmv.toml"
    config_file.write_text('collections = ["x"]\nmax_bach_size = 8\n')
    with pytest.raises(ValueError, match="max_bach_size"):
        Settings.load(config_file, env={})
    with pytest.raises(ValueError, match="collection is required"):
        load_settings(argparse.Namespace(config=None))


def test_client_retries_unavailable_with_backoff():
    """A real gRPC server that answers UNAVAILABLE twice, then a result."""
    from concurrent import futures

    from gmv.v1 import attribution_pb2 as pb
    from gmv.v1 import attribution_pb2_grpc as pb_grpc
    from gmv_client import GMVClient

    calls = []

    class Flaky(pb_grpc.AttributionServiceServicer):
        def GetIndexInfo(self, request, context):
            calls.append(1)
            if len(calls) <= 2:
                context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
            return pb.IndexInfo(collection="c")

    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_AttributionServiceServicer_to_server(Flaky(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with GMVClient(f"127.0.0.1:{port}", retries=3, backoff_s=0.01) as client:
            assert client.index_info().collection == "c" and len(calls) == 3
        calls.clear()
        with GMVClient(f"127.0.0.1:{port}", retries=1, backoff_s=0.01) as client:
            with pytest.raises(grpc.RpcError) as caught:
                client.index_info()
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and len(calls) == 2
    finally:
        server.stop(0)


def test_every_engine_error_maps_to_its_documented_status():
    from gmv_engine import errors
    from gmv_server.batcher import DeadlinePassedError, QueueFullError, ShuttingDownError
    from gmv_server.attribution_service import WarmingUpError
    from gmv_server.grpc_service import status_for

    code = grpc.StatusCode
    assert status_for(errors.InvalidImageError("x")) == code.INVALID_ARGUMENT
    assert status_for(errors.InvalidArgumentError("x")) == code.INVALID_ARGUMENT
    assert status_for(errors.CollectionNotFoundError("x")) == code.NOT_FOUND
    assert status_for(errors.IncompatibleCollectionError("x")) == code.FAILED_PRECONDITION
    assert status_for(errors.MissingWeightsError("maniqa")) == code.FAILED_PRECONDITION
    assert status_for(QueueFullError("x")) == code.RESOURCE_EXHAUSTED
    assert status_for(DeadlinePassedError("x")) == code.DEADLINE_EXCEEDED
    for unavailable in (errors.IndexUnavailableError("x"), ShuttingDownError("x"), WarmingUpError("x")):
        assert status_for(unavailable) == code.UNAVAILABLE
    assert status_for(RuntimeError("bug")) == code.INTERNAL


def test_log_format_is_text_or_json():
    assert Settings.load(None, env={"GMV_COLLECTIONS": "c", "GMV_LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(ValueError, match="log_format must be one of text, json"):
        Settings.load(None, env={"GMV_COLLECTIONS": "c"}, overrides={"log_format": "xml"})
