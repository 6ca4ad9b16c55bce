"""Regenerate the Python stubs from proto/ into client/ (run after editing the .proto):

    .venv/bin/python client/generate_stubs.py

tests/test_proto_stubs.py fails when the committed stubs differ from what this produces.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTOS = ["gmv/v1/attribution.proto"]


def generate(out_dir: Path) -> None:
    from importlib.resources import files

    from grpc_tools import protoc

    well_known = files("grpc_tools") / "_proto"  # google/protobuf/timestamp.proto and friends
    out_dir.mkdir(parents=True, exist_ok=True)
    for proto in PROTOS:
        code = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={out_dir}",
                            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", proto])
        if code != 0:
            raise SystemExit(f"protoc failed on {proto}")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "client")
