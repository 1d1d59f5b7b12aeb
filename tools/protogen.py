"""Generate (or check) the committed Python code for proto/.

Generated modules live where their path equals their import path (`whimbrel/v1/x_pb2.py` is
imported as `whimbrel.v1.x_pb2`), which avoids the `_pb2_grpc` import trap. `--check` generates
into a scratch directory and fails when anything differs from what is committed.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

# The mypy-protobuf plugins are installed beside this interpreter (in .venv/bin).
BIN = Path(sys.executable).parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(root: Path, out: Path) -> None:
    protos = sorted(str(p.relative_to(root / "proto")) for p in (root / "proto").rglob("*.proto"))
    args = [
        "protoc",
        f"-I{root / 'proto'}",
        f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--mypy_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def generated_files(base: Path) -> set[Path]:
    return {
        p.relative_to(base)
        for p in (base / "whimbrel").rglob("*")
        if p.name.endswith(GENERATED_SUFFIXES)
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path)
    parser.add_argument("--check", action="store_true")
    ns = parser.parse_args()
    root: Path = ns.root.resolve()
    if not ns.check:
        generate(root, root)
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        generate(root, out)
        fresh, committed = generated_files(out), generated_files(root)
        drift = sorted(str(p) for p in fresh ^ committed)
        drift += sorted(
            str(p) for p in fresh & committed if not filecmp.cmp(out / p, root / p, shallow=False)
        )
    if drift:
        print("generated code is out of date; run `make proto`:", *drift, sep="\n  ")
        return 1
    print("generated code matches proto/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
