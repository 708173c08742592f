"""How a method's state travels on Flower (``methods.Method``: server state, client state, finish).

The method's verbs are the in-process loop's own; this module only carries what they read and write:

- the server state ``run.server`` lives in the strategy (``PersonalizedStrategy.run``, the
  ``StrategyRun`` that a checkpoint holds) and goes with every train message, one ``ArrayRecord``
  per name (``server/<name>``);
- what the client keeps between rounds, ``run.bar[client]``, lives in the ClientApp's
  ``context.state`` on its SuperNode (``fedbip/<strategy>/kept``), with the round it was made in.
  The server sends it only when the client may not hold it (its first round of the strategy, or
  after a round it missed); a client told to use a state it does not hold (its SuperNode restarted)
  says so, misses that round and is sent its state in the next. The client also returns it after
  each round, so that the server evaluates it, writes it out and checkpoints it as the in-process
  loop does;
- the client's round runs ``method.client_round`` on a view of the run holding only what the client
  has (its kept state and the server state), the finish phase ``method.finish`` on the same view.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from fedbip_cli.errors import FedbipError
from fedbip_cli.simulate.checkpoint import StrategyRun
from fedbip_cli.simulate.flower.records import from_record, to_record
from fedbip_cli.simulate.strategies import State

KEPT = "kept"  # the client's kept state, sent by the server when the client may lack it, and returned
SERVER = "server/"  # the method's server state, one ArrayRecord per name
KEPT_ROUND = "kept-round"  # the round the server's copy of the kept state was made in (0: θ⁰)


def server_records(server: dict[str, State]) -> dict[str, ArrayRecord]:
    """The server state as records of a message's content."""
    return {SERVER + name: to_record(state) for name, state in server.items()}


def server_from(content: RecordDict) -> dict[str, State]:
    """The server state a message carries."""
    return {
        key.removeprefix(SERVER): from_record(record)
        for key, record in content.array_records.items()
        if key.startswith(SERVER)
    }


def _key(strategy: str) -> str:
    return f"fedbip/{strategy}/{KEPT}"


def kept_state(content: RecordDict, context: Context, client: str, strategy: str, made_in: int) -> State:
    """What the client kept: as the server sent it, or as it stored it after round ``made_in``."""
    if KEPT in content.array_records:
        return from_record(content.array_records[KEPT])
    key = _key(strategy)
    stored = context.state.config_records.get(key + "/round")
    if stored is None or int(stored["round"]) != made_in or key not in context.state.array_records:
        raise FedbipError(
            f"client {client} does not hold its {strategy} state of round {made_in} (its SuperNode restarted?)",
            hint="the server sends it with the next round",
        )
    return from_record(context.state.array_records[key])


def store_kept(context: Context, strategy: str, state: State, made_in: int) -> None:
    """Keep ``state`` in the SuperNode's ``context.state`` for the next round."""
    key = _key(strategy)
    context.state[key] = to_record(state)
    context.state[key + "/round"] = ConfigRecord({"round": made_in})


def client_view(
    strategy: str, round_: int, clients: list[str], client: str, kept: State, server: dict[str, State]
) -> StrategyRun:
    """The run as a method's client verbs see it on a client before ``round_``: the run's clients in
    client order (a method may find the client's place from it, as FedMerge its row of W), its own
    kept state, and the server state. Other clients' states are not on this machine: theirs are empty.
    """
    if client not in clients:
        raise FedbipError(f"the server's client list {clients} does not name this client, {client}")
    bar: dict[str, State] = {name: kept if name == client else {} for name in clients}
    return StrategyRun(strategy, round_ - 1, bar, server=server)
