"""Container health check through the gRPC health service (the Dockerfile's HEALTHCHECK and
Compose use it; Kubernetes probes the same service natively):

    python -m gmv_server.healthcheck [HOST:PORT] [--service NAME] [--timeout S]

Exit 0 when the service reports SERVING, 1 otherwise (not serving yet, or no answer).
HOST:PORT defaults to 127.0.0.1 and $GMV_PORT (50051).
"""
from __future__ import annotations

import argparse
import os
import sys

SERVICE = "gmv.v1.AttributionService"


def check(target: str, service: str = SERVICE, timeout_s: float = 3.0) -> str:
    """The health status name (SERVING, NOT_SERVING, ...), or UNREACHABLE."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as error:
            return "UNREACHABLE" if error.code() == grpc.StatusCode.UNAVAILABLE else error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gmv_server.healthcheck", description=__doc__.split("\n\n")[0])
    # The plaintext health-only port when there is one (the gRPC port may speak TLS).
    port = os.environ.get("GMV_HEALTH_PORT") or os.environ.get("GMV_PORT") or 50051
    parser.add_argument("target", nargs="?", default=f"127.0.0.1:{port}")
    parser.add_argument("--service", default=SERVICE, help=f"health service name (default {SERVICE}; '' = the server)")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    status = check(args.target, args.service, args.timeout)
    print(f"{args.target} {args.service or '(server)'}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
