"""Generated gRPC/protobuf code for ``protos/``: built by ``make`` (or on first import), never committed.

    from services.common.protos import inference_pb2, inference_pb2_grpc, pd_pb2, pd_pb2_grpc
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[2] / "protos"
GEN_DIR = PROTO_ROOT / "gen"
_PROTOS = ("baton/v1/inference.proto", "baton/v1/pd.proto")


def _stale() -> bool:
    stamp = GEN_DIR / ".stamp"
    if not stamp.is_file():
        return True
    built = stamp.stat().st_mtime
    return any((PROTO_ROOT / p).stat().st_mtime > built for p in _PROTOS)


def generate() -> None:
    """Run protoc (from grpcio-tools) over the .proto files into protos/gen."""
    from grpc_tools import protoc

    GEN_DIR.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={GEN_DIR}", f"--grpc_python_out={GEN_DIR}"]
    if protoc.main(args + [str(PROTO_ROOT / p) for p in _PROTOS]) != 0:
        raise RuntimeError(f"protoc failed on {_PROTOS}")
    for package in ("baton", "baton/v1"):
        (GEN_DIR / package / "__init__.py").touch()
    (GEN_DIR / ".stamp").touch()


def _can_generate() -> bool:
    try:
        import grpc_tools  # noqa: F401
    except ImportError:  # e.g. a GPU image without grpcio-tools: use code generated elsewhere
        return not (GEN_DIR / "baton" / "v1" / "pd_pb2.py").is_file()
    return True


if _stale() and _can_generate():
    generate()
if str(GEN_DIR) not in sys.path:
    sys.path.insert(0, str(GEN_DIR))

inference_pb2 = importlib.import_module("baton.v1.inference_pb2")
inference_pb2_grpc = importlib.import_module("baton.v1.inference_pb2_grpc")
pd_pb2 = importlib.import_module("baton.v1.pd_pb2")
pd_pb2_grpc = importlib.import_module("baton.v1.pd_pb2_grpc")

if __name__ == "__main__":
    generate()
    print(f"generated gRPC code in {GEN_DIR}")
