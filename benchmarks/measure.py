"""Run one contender in a fresh process: its own wall time and peak RSS, with a time limit.

Linux keeps, in a process's ``ru_maxrss``, the peak of the address space it was forked from until
its ``exec``: a contender spawned straight from the harness (which has imported torch and generated
adapters) would report the harness's size. So the harness starts a small launcher (this file run as
a script: standard library only), which spawns the contender, waits for it with ``os.wait4`` and
writes that one process's ``ru_maxrss`` and wall time (spawn to exit, Python start-up and imports
included, as a user's command pays them), killing its process group at the time limit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Measured:
    """``status`` is ``ok``, ``timeout`` or ``failed`` (non-zero exit: ``detail`` holds stderr's tail)."""

    status: str
    wall_s: float
    peak_rss_mb: float
    detail: str = ""


def run(command: Sequence[str], *, timeout: float, env: Mapping[str, str], stdout: Path | None = None) -> Measured:
    """Run ``command`` through the launcher, stdout to ``stdout`` (default: discarded)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        launcher = [sys.executable, "-S", __file__, str(timeout), str(stdout or os.devnull), result.name, *command]
        subprocess.run(launcher, env=dict(env), check=True)
        return Measured(**json.loads(Path(result.name).read_text()))


def launch(command: Sequence[str], timeout: float, stdout: str) -> Measured:
    """The launcher's side: spawn, wait, measure (MB = 10⁶ bytes; Linux reports ru_maxrss in KiB)."""
    with open(stdout, "wb") as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(list(command), stdout=out, stderr=err, start_new_session=True)
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        rss_mb = usage.ru_maxrss * 1024 / 1e6
        if timed_out.is_set():
            return Measured("timeout", wall, rss_mb, f"killed after {timeout:.0f} s")
        if proc.returncode != 0:
            err.seek(max(0, os.fstat(err.fileno()).st_size - 1500))
            tail = err.read().decode(errors="replace").strip()
            return Measured("failed", wall, rss_mb, f"exit {proc.returncode}: {tail}")
        return Measured("ok", wall, rss_mb)


if __name__ == "__main__":
    limit, out_path, result_path, *cmd = sys.argv[1:]
    measured = launch(cmd, float(limit), out_path)
    Path(result_path).write_text(json.dumps(measured.__dict__))
