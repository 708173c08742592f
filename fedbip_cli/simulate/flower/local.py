"""A Flower deployment on this machine: a SuperLink and SuperNodes as processes on 127.0.0.1.

For trying a deployment, the tests and the overhead benchmark. Bound to 127.0.0.1 only; insecure
(no TLS, no node authentication) unless given ``credentials`` (``credentials.write_credentials``):
then the SuperLink serves TLS with SuperNode authentication, SuperNodes trust the CA and sign with
their keys, and ``register`` admits a SuperNode's public key, as a real federation does on its own
machines (docs/flower.md). Every process runs in its own session and ``close`` stops each by its
process group, so that nothing outlives the federation.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from fedbip_cli.errors import FedbipError
from fedbip_cli.simulate.flower import OFFLINE_ENV
from fedbip_cli.simulate.flower.credentials import Credentials
from fedbip_cli.simulate.flower.records import run_config_from
from fedbip_cli.simulate.loop import SimulationConfig

APP = Path(__file__).resolve().parent / "app"
CONNECTION = "local"  # the SuperLink connection's name in the private FLWR_HOME/config.toml


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalFederation:
    """SuperLink and SuperNodes on 127.0.0.1 with a private ``FLWR_HOME`` under ``root``.

    Runtime dependency installation is disabled, telemetry and update checks are off. Use as a
    context manager, or call ``close``.
    """

    def __init__(
        self, root: Path, *, env: dict[str, str] | None = None, credentials: Credentials | None = None
    ) -> None:
        self.root = Path(root)
        self.home = self.root / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.credentials = credentials
        trust = "insecure = true" if credentials is None else f"root-certificates = {json.dumps(str(credentials.ca))}"
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\n{trust}\n'
        )
        self.bin = Path(sys.executable).parent
        self.env = {
            **os.environ,
            **OFFLINE_ENV,
            **(env or {}),
            "FLWR_HOME": str(self.home),
            "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        self.processes: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def _start(self, name: str, *command: str) -> subprocess.Popen:
        with (self.root / f"{name}.log").open("wb") as log:
            process = subprocess.Popen(
                [str(self.bin / command[0]), *command[1:]],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() reaches the apps it spawns
            )
        self.processes[name] = process
        return process

    def start_superlink(self, *, timeout: float = 60) -> None:
        """Start the SuperLink and wait until it listens."""
        secure = self.credentials
        security = (
            ["--insecure"]
            if secure is None
            else [
                *("--ssl-ca-certfile", str(secure.ca), "--ssl-certfile", str(secure.server_certificate)),
                *("--ssl-keyfile", str(secure.server_key), "--enable-supernode-auth"),
            ]
        )
        process = self._start(
            "superlink",
            "flower-superlink",
            *security,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if process.poll() is not None:
                break
            time.sleep(0.2)
        raise FedbipError("the SuperLink did not start", where=str(self.root / "superlink.log"))

    def start_supernode(
        self, index: int, count: int, *, node_config: str | None = None, key: Path | None = None, insecure: bool = False
    ) -> None:
        """Start SuperNode ``index`` of ``count``: client ``index`` of the run, or the client that
        ``node_config`` names (``'data-dir="/path/to/client-dir"'``: Flower wants string values quoted).

        With credentials it trusts their CA and signs with ``key`` (a private key file; None: no key),
        unless ``insecure``: a plaintext SuperNode, which a TLS SuperLink does not let in."""
        if self.credentials is None or insecure:
            security = ["--insecure"]
        else:
            security = ["--root-certificates", str(self.credentials.ca)]
            security += [] if key is None else ["--auth-supernode-private-key", str(key)]
        self._start(
            f"supernode-{index}",
            "flower-supernode",
            *security,
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--port",
            str(free_port()),
            "--node-config",
            node_config or f"partition-id={index} num-partitions={count}",
        )

    def register(self, public_key: Path) -> None:
        """Admit the SuperNode whose OpenSSH public key is ``public_key`` (``flwr supernode register``)."""
        done = subprocess.run(
            [str(self.bin / "flwr"), "supernode", "register", str(public_key), CONNECTION],
            env=self.env,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise FedbipError(
                f"flwr supernode register {public_key.name} failed: {done.stdout[-500:]}{done.stderr[-500:]}"
            )

    def start_run(self, config: SimulationConfig, out: Path, **run_config: Any) -> subprocess.Popen:
        """``flwr run`` of the fedbip app with ``config`` into ``out``, streaming its log until the run ends."""
        values = {**run_config_from(config), "out": str(Path(out).resolve()), **run_config}
        overrides = " ".join(f"{key}={json.dumps(value)}" for key, value in values.items())
        return self._start("flwr-run", "flwr", "run", str(APP), CONNECTION, "--stream", "--run-config", overrides)

    def stop(self, name: str, *, grace: float = 10) -> None:
        """SIGTERM the process group of ``name``, SIGKILL whatever is left after ``grace`` seconds."""
        process = self.processes.pop(name)
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=grace)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            pass
        try:  # the leader gone, its children may remain in the group
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()

    def close(self) -> None:
        """Stop every process this federation started."""
        for name in list(self.processes):
            self.stop(name)

    def log(self, name: str, *, tail: int = 4000) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")[-tail:]
