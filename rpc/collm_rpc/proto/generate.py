"""Regenerate collm_pb2.py, its type stub collm_pb2.pyi (for mypy) and collm_pb2_grpc.py from
collm.proto (`python -m collm_rpc.proto.generate`).

The generated files are committed (no protoc needed at install time); tests/federated/test_proto.py
regenerates into a temporary folder and fails when the committed files are stale.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

PROTO = Path(__file__).with_name("collm.proto")
ROOT = PROTO.parents[2]  # the repository root: generated imports read `from collm_rpc.proto import ...`


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    rel = PROTO.relative_to(ROOT)
    code = protoc.main(["grpc_tools.protoc", f"-I{ROOT}", f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", str(rel)])
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")
    gen = out_dir / rel.parent
    return [gen / "collm_pb2.py", gen / "collm_pb2.pyi", gen / "collm_pb2_grpc.py"]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            target = PROTO.with_name(path.name)
            target.write_text(path.read_text())
            print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
