"""Generate the Python gRPC stubs from proto/ (grpcio-tools), next to the .proto files.

    python -m tools.gen_proto [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1] / "proto"
PROTOS = ["specdec/v1/generation.proto"]


def generate(out: Path = ROOT) -> list[Path]:
    import grpc_tools

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    out.mkdir(parents=True, exist_ok=True)
    for proto in PROTOS:
        args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}", str(ROOT / proto)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed for {proto}")
    return sorted(out.rglob("*_pb2*.py"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT)
    for path in generate(parser.parse_args().out):
        print(path)
