"""The I/O floor, run as its own process: read every input byte, write every output byte.

``python benchmarks/floor.py SPEC.json RESULT.json``. SPEC gives ``inputs`` (a directory: every file
under it is read to the end) and ``outputs`` (a directory, ``files`` and ``bytes_per_file``: the
merged adapters' size, written as one file per client). Reads and writes go through one reused
16 MiB buffer, without fsync (the merges do not sync either), and are timed in this process, so the
floor holds no interpreter start-up. No torch import: nothing but the bytes is measured.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

CHUNK = 16 << 20


def read_all(directory: Path, buffer: bytearray) -> tuple[int, int]:
    """Bytes and files read under ``directory``."""
    total = files = 0
    view = memoryview(buffer)
    for path in sorted(directory.rglob("*")):
        if not path.is_file():
            continue
        files += 1
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total, files


def write_all(directory: Path, files: int, size: int, buffer: bytearray) -> int:
    """Write ``files`` files of ``size`` bytes each under ``directory``; bytes written."""
    total = 0
    view = memoryview(buffer)
    for i in range(files):
        target = directory / f"client-{i:05d}"
        target.mkdir(parents=True, exist_ok=True)
        with open(target / "adapter_model.safetensors", "wb", buffering=0) as f:
            left = size
            while left:
                left -= f.write(view[: min(left, CHUNK)])
        total += size
    return total


def main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    buffer = bytearray(CHUNK)
    out = Path(spec["outputs"])
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    read_bytes, read_files = read_all(Path(spec["inputs"]), buffer)
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    written = write_all(out, spec["files"], spec["bytes_per_file"], buffer)
    write_s = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    result = {
        "read_s": read_s,
        "write_s": write_s,
        "read_bytes": read_bytes,
        "read_files": read_files,
        "write_bytes": written,
    }
    Path(result_path).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
