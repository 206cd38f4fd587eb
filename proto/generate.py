"""Regenerate the Python stubs from proto/*.proto: `python -m proto.generate [--check]`.

Run from the repository root. `--check` regenerates into a temporary directory and exits 1 if the
committed stubs differ (CI uses it so stale stubs never land).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ("proto/livetower_v1.proto", "proto/model_config.proto", "proto/grpc_service.proto")
OUTPUTS = ("livetower_v1_pb2.py", "livetower_v1_pb2.pyi", "livetower_v1_pb2_grpc.py",
           "model_config_pb2.py", "model_config_pb2.pyi", "model_config_pb2_grpc.py",
           "grpc_service_pb2.py", "grpc_service_pb2.pyi", "grpc_service_pb2_grpc.py")


def generate(out_root: Path) -> None:
    from grpc_tools import protoc  # dev-only dependency (the [test] extra)

    include = Path(protoc.__file__).parent / "_proto"
    # Include root = repo root, so generated imports read `from proto import livetower_v1_pb2`.
    args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out_root}",
            f"--pyi_out={out_root}", f"--grpc_python_out={out_root}", *[str(ROOT / p) for p in PROTOS]]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed: {' '.join(args)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed stubs are stale")
    opts = parser.parse_args()
    if not opts.check:
        generate(ROOT)
        print(f"wrote {', '.join(OUTPUTS)} into {ROOT / 'proto'}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [name for name in OUTPUTS
                 if not (ROOT / "proto" / name).exists()
                 or not filecmp.cmp(Path(tmp) / "proto" / name, ROOT / "proto" / name, shallow=False)]
    if stale:
        print(f"stale generated stubs: {stale}; run `python -m proto.generate` and commit", file=sys.stderr)
        return 1
    print("generated stubs are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
