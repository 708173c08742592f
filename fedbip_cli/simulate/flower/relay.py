"""The ClientApp of a Flower deployment: a light relay to a long-lived worker on the SuperNode's machine.

Flower 1.42 starts a new ``flwr-clientapp`` process for every message to a SuperNode (in both isolation
modes: ``run_clientapp`` pulls one message, replies and exits; its warm executors serve agent, model and
connector tasks, not ClientApps), so a ClientApp that imported torch, transformers and peft and loaded
its data and base model paid that for every message: a Deployment Engine round cost about 5× the
in-process one. This ClientApp imports only flwr and the standard library. It hands each message, with
its context, to a worker process (``worker``) that keeps the libraries, the data and the model loaded
across messages and runs fedbip's own ClientApp (``apps.client_app``) on it; the reply and the context's
state (what a method's client keeps) come back the same way. So every message is answered by the same
code as before, with the same bits.

The worker is started by the first message on the SuperNode and found again by the next: one worker per
SuperNode (its ``--node-config``), interpreter, fedbip code and thread settings, listening on a Unix
socket in a directory only this user can enter (``worker.socket_dir``); it serves only this user's
processes and stops when the process that started the ClientApps (the SuperNode's executor) is gone,
or after ``FEDBIP_FLOWER_WORKER_IDLE`` seconds without a message (default 600). It is started in the
ClientApp's own process group, so stopping the SuperNode's group stops it too. ``FEDBIP_FLOWER_WORKER=0``
runs fedbip's ClientApp in the ClientApp process itself, as before.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from fedbip_cli.simulate.flower import FINISH
from fedbip_cli.simulate.flower.worker import IDLE_SECONDS, connect, receive, send, socket_path

START_TIMEOUT = 120.0  # seconds to wait for a new worker's socket
log = logging.getLogger(__name__)


def forward(message: Message, context: Context) -> Message:
    """fedbip's ClientApp's reply to ``message``, computed by this SuperNode's worker (or here, with
    ``FEDBIP_FLOWER_WORKER=0``); ``context.state`` becomes what the handler left in it."""
    if os.environ.get("FEDBIP_FLOWER_WORKER", "1") == "0":
        from fedbip_cli.simulate.flower.apps import client_app  # torch and the model, in this process

        return client_app(message, context)
    identity = (TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id)
    path = socket_path(dict(context.node_config))
    with _connect(path) as connection:
        send(connection, pickle.dumps((identity, message, context)))
        answer = pickle.loads(receive(connection))
    if answer["outcome"] != "ok":
        raise RuntimeError(f"fedbip's Flower worker (pid {answer['worker']}) failed on this message: {answer['reply']}")
    log.debug("worker %d answered a %s message", answer["worker"], message.metadata.message_type)
    context.state = answer["state"]
    return answer["reply"]


def _connect(path: Path) -> socket.socket:
    """A connection to the worker at ``path``, started first when none answers there."""
    connection = connect(path)
    if connection is not None:
        return connection
    _start(path)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        connection = connect(path)
        if connection is not None:
            return connection
        time.sleep(0.05)
    raise RuntimeError(f"fedbip's Flower worker did not start at {path} within {START_TIMEOUT:.0f} s")


def _start(path: Path) -> None:
    """Start a worker for ``path`` in this process group; it watches this process's parent (the
    executor that starts the ClientApps). Several ClientApps starting at once: one worker binds the
    socket, the others see it taken and exit."""
    idle = os.environ.get("FEDBIP_FLOWER_WORKER_IDLE", str(IDLE_SECONDS))
    command = [sys.executable, "-m", "fedbip_cli.simulate.flower.worker", str(path), "--watch", str(os.getppid())]
    with path.with_suffix(".log").open("ab") as log:  # the worker's errors, beside its socket
        subprocess.Popen(
            [*command, "--idle", idle], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, close_fds=True
        )


client_app = ClientApp()


@client_app.query()
def query(message: Message, context: Context) -> Message:
    return forward(message, context)


@client_app.train()
def train(message: Message, context: Context) -> Message:
    return forward(message, context)


@client_app.train(FINISH)
def finish(message: Message, context: Context) -> Message:
    return forward(message, context)


@client_app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return forward(message, context)
