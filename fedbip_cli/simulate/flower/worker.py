"""The long-lived worker behind the deployment's relay ClientApp (``relay``): fedbip's ClientApp kept
loaded across messages.

``python -m fedbip_cli.simulate.flower.worker SOCKET --watch PID --idle SECONDS`` listens on the Unix
socket SOCKET; each connection carries one message: the task's identity, the Flower ``Message`` and its
``Context`` (pickled; only processes of this user can connect: the socket's directory is private and
every peer's uid is checked), and gets back fedbip's ClientApp's reply and the context's state. It
serves one message at a time, as a SuperNode's ClientApps do, and exits when process PID is gone or
after SECONDS without a message. Its module imports nothing heavy; the apps load on the first message.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import signal
import socket
import stat
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

IDLE_SECONDS = 600
_LENGTH = struct.Struct("!Q")
# What a worker's results depend on beyond its code: the settings it inherits from the SuperNode.
_ENVIRONMENT = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "HF_HUB_OFFLINE", "HF_HOME", "PYTHONPATH")


def socket_dir() -> Path:
    """``$TMPDIR/fedbip-flower-<uid>``, created 0700; refused when it is not this user's or others may enter."""
    directory = Path(tempfile.gettempdir()) / f"fedbip-flower-{os.getuid()}"
    directory.mkdir(mode=0o700, exist_ok=True)
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise RuntimeError(f"{directory} is not a private directory of this user; remove it and try again")
    return directory


def socket_path(node_config: dict[str, object]) -> Path:
    """The socket of the worker for this SuperNode (``node_config``), this interpreter, this fedbip code
    (its files' modification times) and these thread and device settings."""
    package = Path(__file__).resolve().parents[2]
    code = max(p.stat().st_mtime_ns for p in package.rglob("*.py"))
    key = json.dumps(
        [sys.executable, str(package), code, sorted((str(k), str(v)) for k, v in node_config.items())]
        + [os.environ.get(name, "") for name in _ENVIRONMENT]
    )
    return socket_dir() / f"w-{hashlib.sha256(key.encode()).hexdigest()[:20]}.sock"


def send(connection: socket.socket, payload: bytes) -> None:
    connection.sendall(_LENGTH.pack(len(payload)) + payload)


def receive(connection: socket.socket) -> bytes:
    """One length-prefixed payload; ConnectionError when the peer hangs up before it is whole."""
    (length,) = _LENGTH.unpack(_exactly(connection, _LENGTH.size))
    return _exactly(connection, length)


def _exactly(connection: socket.socket, count: int) -> bytes:
    parts, left = [], count
    while left:
        part = connection.recv(min(left, 1 << 20))
        if not part:
            raise ConnectionError("the other side closed the connection mid-message")
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _peer_uid(connection: socket.socket) -> int:
    _, uid, _ = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid


def _answer(connection: socket.socket) -> None:
    """Serve one message: run fedbip's ClientApp on it, reply with its answer and the context's state."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedbip_cli.simulate.flower.apps import client_app

    (task, run, node), message, context = pickle.loads(receive(connection))
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = task, run, node
    try:
        reply = {"outcome": "ok", "reply": client_app(message, context), "state": context.state}
    except Exception:  # the relay turns it into the ClientApp's error, as Flower would
        reply = {"outcome": "error", "reply": traceback.format_exc(limit=5)}
    send(connection, pickle.dumps({**reply, "worker": os.getpid()}))


def serve(path: Path, *, watch: int | None, idle: float) -> None:
    """Answer messages on ``path`` until ``watch`` is gone, ``idle`` seconds pass without one, or it is
    asked to stop (SIGTERM, SIGINT); it then removes its socket, and its log when that is empty."""
    signal.signal(signal.SIGTERM, _stop)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
    except OSError:  # another worker took it first (several ClientApps started at once), or a stale file
        if _in_use(path):
            return
        path.unlink(missing_ok=True)
        listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen(16)
    listener.settimeout(2.0)
    last = time.monotonic()
    try:
        while (watch is None or _alive(watch)) and time.monotonic() - last < idle:
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(None)
                if _peer_uid(connection) == os.getuid():
                    try:
                        _answer(connection)
                    except (ConnectionError, BrokenPipeError):
                        pass  # the ClientApp went away; the next message gets a fresh connection
            last = time.monotonic()
    finally:
        listener.close()
        path.unlink(missing_ok=True)
        log = path.with_suffix(".log")
        if log.is_file() and log.stat().st_size == 0:
            log.unlink(missing_ok=True)


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(0)


def connect(path: Path) -> socket.socket | None:
    """A connection to the worker listening at ``path``, or None when none answers there."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        connection.close()
        return None
    return connection


def _in_use(path: Path) -> bool:
    try:
        probe = connect(path)
    except OSError:  # any other failure to connect: nobody serves there either
        return False
    if probe is None:
        return False
    probe.close()
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("socket", type=Path)
    parser.add_argument("--watch", type=int, help="exit when this process is gone")
    parser.add_argument("--idle", type=float, default=IDLE_SECONDS, help="exit after this many idle seconds")
    args = parser.parse_args()
    serve(args.socket, watch=args.watch, idle=args.idle)


if __name__ == "__main__":
    main()
