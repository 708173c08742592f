"""The federated round loop: local LoRA training, the server step, evaluation, checkpoints.

Every random draw is a function of (seed, round, client), never of what ran before, so a run
resumed from its last complete round ends with exactly the metrics of an uninterrupted one, and
strategies compared in one run see identical partitions, initial adapters, batches and participants.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedbip_cli.defence import ClipNorm
from fedbip_cli.errors import FedbipError, OutputError, UsageError
from fedbip_cli.outdir import foreign_refusal
from fedbip_cli.shown import shown
from fedbip_cli.simulate import attacks, checkpoint, fedmerge, selection, tap, universal
from fedbip_cli.simulate.attacks import Attack
from fedbip_cli.simulate.checkpoint import StrategyRun
from fedbip_cli.simulate.clipping import clip_sent
from fedbip_cli.simulate.data import ClientData, load_bbc, load_bbc_annotated, load_client_files
from fedbip_cli.simulate.methods import FEDOA_LAMBDA, METHODS, ClientReply, Fit, Method, ServerContext
from fedbip_cli.simulate.model import ClientModel, Regularizer, Tokens, embedded_model_dir
from fedbip_cli.simulate.partition import partition_dirichlet, partition_tasks, public_sentences
from fedbip_cli.simulate.separation import round_separation
from fedbip_cli.simulate.strategies import (
    RoundUpdates,
    ServerStep,
    State,
    check_strategies,
    cumulative_vectors,
    server_step,
    task_vectors,
)
from fedbip_cli.simulate.taskshift import partition_task_shift
from fedbip_cli.simulate.weight_trace import weight_trace
from fedbip_cli.sources import resolve_model_dir

CHECKPOINTS = "checkpoints"
# The default regime (declared before its measuring runs; docs/simulate.md, "Where sharing can pay"):
# groups doing different tasks (task-shift), no label skew inside a task (alpha inf, the
# partition's default), and limited data: 32 training sentences per client, where a client alone
# cannot learn its task well and its group-mates' data should help. The label-skew regime of
# earlier versions is --partition tasks --alpha 1 --examples-per-client 64; the ample one 480.
PARTITION = "task-shift"
EXAMPLES_PER_CLIENT = 32
# What an encoder needs from the Hub: config, weights and tokenizer files.
MODEL_FILES = ("*.json", "*.safetensors", "*.txt", "*.model")
METRICS = "metrics.jsonl"
MAX_LR = 1e3
RUN_RECORD = "fedbip-run.json"  # a simulate run's mark: only a directory holding it is ever replaced or resumed
UNRECORDED = f"no {RUN_RECORD} marks a fedbip simulate run there"
_SEED_DIR = re.compile(r"seed-[0-9]+")
SIMILARITY = "similarity.jsonl"


@dataclass(frozen=True)
class SimulationConfig:
    """Everything that determines a simulation's result (recorded in summary.json and checkpoints)."""

    strategies: tuple[str, ...] = ("fedbip",)
    rounds: int = 50
    clients: int = 10
    partition: str = PARTITION
    groups: int = 3
    # Dirichlet concentration of each client's label mix; "inf": none (a float inf is stored so, to
    # keep the JSON records strict); None: the partition's default (``PARTITIONS``).
    alpha: float | str | None = None
    data_dir: str | None = None
    max_examples: int | None = 6000  # only without examples_per_client
    test_fraction: float = 0.2  # only without examples_per_client, and for --data
    examples_per_client: int | None = EXAMPLES_PER_CLIENT  # None: the max_examples / test_fraction split
    model: str | None = None  # a local HF encoder directory; None = the embedded MiniLM
    num_layers: int | None = None  # keep only the first N encoder layers (tests)
    target_modules: tuple[str, ...] = ("query", "value")
    rank: int = 8
    lora_alpha: int = 16
    local_steps: int = 4
    batch_size: int = 16
    lr: float = 1e-3
    max_length: int = 32
    eval_every: int = 5
    participation: float = 1.0
    seed: int = 0
    # Poisoning (``attacks``) and the server-step defence (``clipping``); see ``attacks.check_config``.
    attack: str = "none"
    attackers: int = 0
    attack_scale: float = 1.0
    trigger: str = attacks.TRIGGER
    target_label: str | None = None  # a label name; None = the first label
    clip_norm: str | None = None  # auto | <K>x | <value> (``defence.ClipNorm``)
    fedoa_lambda: float = FEDOA_LAMBDA  # FedOA's feature-distance weight λ (``methods.FedOA``)
    global_models: int = fedmerge.GLOBAL_MODELS  # FedMerge's d (``fedmerge.FedMerge``)
    fedmerge_lr_w: float = fedmerge.LR_W  # FedMerge's step on W
    tap_margin: float = tap.MARGIN  # TAP's replacement margin (``tap.TAP``)
    tap_kd_steps: int = tap.KD_STEPS  # TAP's post-training steps
    tap_kd_weight: float = tap.KD_WEIGHT  # TAP's distillation weight
    tap_temperature: float = tap.TEMPERATURE  # TAP's distillation temperature
    public_examples: int = universal.PUBLIC_EXAMPLES  # the universal expert's unlabeled public sentences
    distill_steps: int = universal.DISTILL_STEPS  # the universal expert's distillation steps per round
    # --select-on-validation: the share of each client's training sentences it holds out to choose, every
    # round, between its own trained model and the merge (``selection``); None: no choice, no hold-out.
    select_on_validation: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.alpha, float) and math.isinf(self.alpha) and self.alpha > 0:
            object.__setattr__(self, "alpha", "inf")
        if isinstance(self.alpha, str) and self.alpha != "inf":
            raise UsageError(f"--alpha {self.alpha!r}: expected a positive number or inf")
        check_strategies(list(self.strategies), extra=list(METHODS))
        if not self.fedoa_lambda >= 0:
            raise UsageError(f"--fedoa-lambda {self.fedoa_lambda} must be a non-negative number")
        for name in ("global_models", "public_examples"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("tap_margin", "tap_kd_steps", "tap_kd_weight", "distill_steps"):
            if not getattr(self, name) >= 0:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)} must be a non-negative number")
        for name in ("fedmerge_lr_w", "tap_temperature"):
            if not getattr(self, name) > 0:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)} must be positive")
        methods = [s for s in self.strategies if s in METHODS]
        selection.check_fraction(self.select_on_validation)
        if self.select_on_validation is not None and (methods or self.attack != "none"):
            what = f"the methods {', '.join(methods)}" if methods else "--attack"
            raise UsageError(
                f"--select-on-validation is not wired to {what}: they keep their own client models",
                hint="compare the server-step strategies (fedbip, fedbip-layerwise, fedamp, ...) with it",
            )
        if self.partition not in PARTITIONS:
            raise UsageError(f"unknown partition {self.partition!r}; choose one of {', '.join(PARTITIONS)}")
        for name in ("rounds", "clients", "local_steps", "batch_size", "max_length", "eval_every", "rank"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.participation <= 1:
            raise UsageError(f"--participation {self.participation} must be in (0, 1]")
        if not 0 < self.lr <= MAX_LR:  # NaN fails both; a larger step overflows float32 weights
            raise UsageError(f"--lr {self.lr} must be a positive number no larger than {MAX_LR:g}")
        if self.seed < 0:  # numpy's generators take only non-negative seeds
            raise UsageError(f"--seed {self.seed} must be a non-negative integer")
        if self.examples_per_client is not None and self.examples_per_client < 1:
            raise UsageError(f"--examples-per-client {self.examples_per_client} must be at least 1 (0 = off)")
        attacks.check_config(self)

    def alpha_value(self) -> float:
        """The Dirichlet concentration the partition uses: ``alpha``, ``math.inf`` for "inf", or the
        partition's default (``PARTITIONS``)."""
        if self.alpha is None:
            return PARTITIONS[self.partition].alpha
        return math.inf if self.alpha == "inf" else float(self.alpha)


@dataclass
class ClientTokens:
    name: str
    train: Tokens
    train_labels: torch.Tensor
    test: Tokens
    test_labels: torch.Tensor
    group: int | None
    validation: Tokens | None = None  # the held-out sentences (``selection``), when the client holds some
    validation_labels: torch.Tensor | None = None


def config_from_dict(values: dict[str, Any]) -> SimulationConfig:
    """The SimulationConfig that ``asdict`` made ``values`` of, after a JSON round trip (in a
    summary.json, a checkpoint or a Flower message tuples arrive as lists)."""
    return SimulationConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


# round_done(strategy, round, mean accuracy or None when not evaluated)
RoundCallback = Callable[[str, int, float | None], None]
# on_round(the run after its checkpoint, mean accuracy or None)
RunCallback = Callable[["StrategyRun", float | None], None]
Progress = Callable[[str, int], Callable[[int], None]]


def load_clients(config: SimulationConfig) -> tuple[list[ClientData], list[str]]:
    """The clients' data: the user's files (--data) or the embedded BBC News, partitioned; with
    --select-on-validation, each client's validation sentences held out of its training ones."""
    clients, labels = _partitioned(config)
    if config.select_on_validation is not None:
        selection.split_validation(clients, config.select_on_validation, config.seed)
    return clients, labels


def _partitioned(config: SimulationConfig) -> tuple[list[ClientData], list[str]]:
    if config.data_dir is not None:
        clients, labels = load_client_files(Path(config.data_dir), test_fraction=config.test_fraction, seed=config.seed)
        if config.examples_per_client is not None:  # the first N of each client's (shuffled) train split
            for client in clients:
                client.train_texts = client.train_texts[: config.examples_per_client]
                client.train_labels = client.train_labels[: config.examples_per_client]
        return clients, labels
    return PARTITIONS[config.partition].split(
        config,
        num_clients=config.clients,
        alpha=config.alpha_value(),
        seed=config.seed,
        test_fraction=config.test_fraction,
        max_examples=config.max_examples,
        examples_per_client=config.examples_per_client,
    )


@dataclass(frozen=True)
class Partition:
    """A ``--partition``: its ``--alpha`` when none is given, and how it splits the embedded corpus."""

    alpha: float
    split: Callable[..., tuple[list[ClientData], list[str]]]


# --alpha when not given: none for task-shift (each group's own task is what sets clients apart),
# label skew inside each task group for tasks, strong skew on the one task for dirichlet.
PARTITIONS: dict[str, Partition] = {
    "task-shift": Partition(
        math.inf, lambda config, **kw: partition_task_shift(load_bbc_annotated(), groups=config.groups, **kw)
    ),
    "tasks": Partition(1.0, lambda config, **kw: partition_tasks(load_bbc(), groups=config.groups, **kw)),
    "dirichlet": Partition(0.1, lambda config, **kw: partition_dirichlet(load_bbc(), **kw)),
}


def participants(config: SimulationConfig, clients: list[str], round_: int) -> list[str]:
    """The clients sampled in ``round_`` (a function of seed and round only), in client order."""
    count = max(1, round(config.participation * len(clients)))
    if count >= len(clients):
        return list(clients)
    chosen = np.random.default_rng([config.seed, round_]).choice(len(clients), size=count, replace=False)
    return [clients[i] for i in sorted(chosen.tolist())]


def batch_generator(config: SimulationConfig, round_: int, client_index: int) -> torch.Generator:
    """The generator of one client's batches in one round."""
    return torch.Generator().manual_seed(((config.seed * 1_000_003) + round_ * 10_007 + client_index) % (2**63))


def build_model(config: SimulationConfig, label_names: list[str], *, device: str = "cpu") -> ClientModel:
    """The client model of ``config`` for ``label_names``: the same in every process for one seed."""
    model_dir = resolve_model_dir(config.model, allow_patterns=MODEL_FILES)[0] if config.model else embedded_model_dir()
    return ClientModel(
        model_dir,
        labels=label_names,
        target_modules=config.target_modules,
        rank=config.rank,
        lora_alpha=config.lora_alpha,
        max_length=config.max_length,
        seed=config.seed,
        device=device,
        num_layers=config.num_layers,
    )


def tokenize_client(model: ClientModel, client: ClientData) -> ClientTokens:
    """One client's sentences tokenized for ``model``."""
    held = bool(client.validation_texts)
    return ClientTokens(
        client.name,
        model.tokenize(client.train_texts),
        torch.tensor(client.train_labels),
        model.tokenize(client.test_texts),
        torch.tensor(client.test_labels),
        client.group,
        model.tokenize(client.validation_texts) if held else None,
        torch.tensor(client.validation_labels) if held else None,
    )


def train_client(
    model: ClientModel,
    config: SimulationConfig,
    data: ClientTokens,
    state: State,
    round_: int,
    index: int,
    regularizer: Regularizer | None = None,
    steps: int | None = None,
) -> tuple[State, float]:
    """One client's local training in ``round_``, from the personalized ``state`` the server sent it:
    the trained state and the mean training loss. ``index`` is the client's place in client order,
    which seeds its batches; ``regularizer`` is a method's extra loss term (``methods``); ``steps``
    replaces ``--local-steps`` (a method's post-training phase). Every engine calls this one function."""
    model.load_state(state)
    loss = model.train(
        data.train,
        data.train_labels,
        steps=config.local_steps if steps is None else steps,
        batch_size=config.batch_size,
        lr=config.lr,
        generator=batch_generator(config, round_, index),
        regularizer=regularizer,
    )
    return model.state(), loss


def local_fit(model: ClientModel, config: SimulationConfig, data: ClientTokens, round_: int, index: int) -> Fit:
    """``train_client`` for one client and round, from any state and with any extra loss term: what
    a method's ``client_round`` trains with (``methods.Fit``)."""
    return lambda state, term, steps=None: train_client(model, config, data, state, round_, index, term, steps)


def evaluate_client(model: ClientModel, data: ClientTokens, state: State) -> float:
    """Test accuracy of ``state`` on one client's test sentences."""
    model.load_state(state)
    return model.evaluate(data.test, data.test_labels)


def evaluates(config: SimulationConfig, round_: int) -> bool:
    """Whether clients are evaluated after ``round_``: every ``eval_every`` rounds and after the last."""
    return round_ % config.eval_every == 0 or round_ == config.rounds


def server_round(
    run: StrategyRun,
    round_: int,
    chosen: list[str],
    trained: dict[str, State],
    *,
    clients: list[str],
    examples: dict[str, int],
    groups: dict[str, int | None],
    initial: State,
    clip: ClipNorm | None = None,
    method: Method | None = None,
    context: ServerContext | None = None,
) -> ServerStep:
    """The server's part of ``round_``: the strategy's step over the participants ``chosen`` and
    their ``trained`` states, applied to ``run`` (its personalized states and similarity record),
    with each update's norm bounded by ``clip`` when given; a ``method``'s own aggregation
    (``methods``) for the strategies that are one, which may use ``context``. Every engine calls this
    one function after collecting the round's replies."""
    updates = RoundUpdates(clients, chosen, run.bar, trained, examples, groups, initial, run.memory, clip)
    if method is None:
        step = server_step(run.strategy, updates)
    else:
        if context is None:
            raise UsageError(f"strategy {run.strategy}'s server step needs the server's context")
        clipped = None
        if clip is not None:  # bounded before the method aggregates them its own way
            trained, clipped = clip_sent(trained, method.sent_from(run, chosen), chosen, clip)
            updates = replace(updates, trained=trained, clip=None)
        updates, step = method.server_round(run, updates, context)
        if clipped is not None:
            step = replace(step, clip=clipped)
    run.bar, run.memory = step.bar, step.memory
    record = similarity_record(run.strategy, round_, step)
    record["separation"] = separation_record(updates, step)
    record["weights"] = weight_trace(step.plan, chosen, groups)
    if step.clip is not None:
        record["clip"] = step.clip
    run.similarity.append(record)
    return step


def separation_record(updates: RoundUpdates, step: ServerStep) -> dict[str, Any] | None:
    """The paper's Figure 3 check for one round (``separation.round_separation``): how well the
    cosine of the participants' updates, trained parameters, trajectories and EMAs separates the
    true groups; None when the groups are unknown."""
    chosen = updates.participants
    vectors = {
        "update": task_vectors(updates),
        "parameters": {
            name: torch.stack([updates.trained[c][name] for c in chosen]) for name in updates.trained[chosen[0]]
        },
        "cumulative": cumulative_vectors(updates),
        "ema": {name: torch.stack([step.memory[c][name] for c in chosen]) for name in step.memory[chosen[0]]},
    }
    return round_separation(chosen, updates.groups, vectors)


def similarity_record(strategy: str, round_: int, step: ServerStep) -> dict[str, Any]:
    """One line of ``similarity.jsonl``: the participants and their whole-model update similarity."""
    return {
        "strategy": strategy,
        "round": round_,
        "clients": step.similarity.clients,
        "similarity": step.similarity.groups["model"].similarity.tolist(),
    }


def metric_rows(
    strategy: str,
    round_: int,
    clients: list[str],
    examples: dict[str, int],
    losses: dict[str, float],
    accuracy: dict[str, float],
    attack: Attack | None = None,
    attack_rates: dict[str, dict[str, float]] | None = None,
    traffic: dict[str, tuple[int, int]] | None = None,
) -> list[dict[str, Any]]:
    """The lines of ``metrics.jsonl`` for one round, one per client: a client that did not train
    has no ``train_loss``, one that was not evaluated no ``test_accuracy``; under an ``attack``,
    whether the client attacks and its attack success rates (``attacks.attack_fields``); with
    ``traffic`` (client -> (uplink, downlink) bytes of the round), ``uplink_bytes`` and
    ``downlink_bytes`` (0 for a client that did not take part)."""
    return [
        {
            "strategy": strategy,
            "round": round_,
            "client": client,
            "train_loss": losses.get(client),
            "test_accuracy": accuracy.get(client),
            "examples": examples[client],
            **(attacks.attack_fields(attack, client, (attack_rates or {}).get(client)) if attack else {}),
            **(_traffic_fields(traffic.get(client, (0, 0))) if traffic is not None else {}),
        }
        for client in clients
    ]


def selection_fields(rows: list[dict[str, Any]], choices: dict[str, selection.Choice]) -> list[dict[str, Any]]:
    """``rows`` with each client's choice of the round (--select-on-validation): λ, the merge's share of
    the model it keeps, and that model's validation accuracy; None for a client that did not choose."""
    for row in rows:
        choice = choices.get(row["client"])
        row["selected_weight"] = None if choice is None else choice.weight
        row["validation_accuracy"] = None if choice is None else choice.accuracy
    return rows


def _traffic_fields(traffic: tuple[int, int]) -> dict[str, int]:
    return {"uplink_bytes": traffic[0], "downlink_bytes": traffic[1]}


def state_bytes(*states: State) -> int:
    """The bytes of the tensors of ``states`` as sent (every element at its dtype's size)."""
    return sum(t.numel() * t.element_size() for state in states for t in state.values())


# Strategies whose clients exchange nothing with the server (their traffic is 0 bytes).
SILENT = ("local",)


class Simulation:
    """Runs every configured strategy on one partition, writing metrics and checkpoints to ``out``."""

    def __init__(self, config: SimulationConfig, out: Path, *, device: str = "cpu") -> None:
        self.config = config
        self.out = Path(out)
        self.clients, self.label_names = load_clients(config)
        self.attack = Attack.of(config, self.clients, self.label_names)
        self.clients = self.attack.poison(self.clients)  # backdoor attackers' training data
        self.model = build_model(config, self.label_names, device=device)
        self.data = [tokenize_client(self.model, c) for c in self.clients]
        self.attack.prepare(self.model, self.clients)  # the triggered test sentences
        self.names = [c.name for c in self.clients]
        self.initial = self.model.initial_state()
        # Round 1 trains every client from the shared initial state with the same batches whatever
        # the strategy, so its results are computed once and reused by every strategy compared.
        self._first_round: dict[str, tuple[ClientReply, float]] = {}
        self._public_tokens: Tokens | None = None  # the public unlabeled sentences (``_public``)

    # -- checkpoints ---------------------------------------------------------------------------
    def _checkpoint_path(self, strategy: str) -> Path:
        return self.out / CHECKPOINTS / f"{strategy}.safetensors"

    def save_checkpoint(self, run: StrategyRun) -> None:
        """Write the run's state atomically as one checksummed file (``checkpoint.save``)."""
        checkpoint.save(self._checkpoint_path(run.strategy), run, self._config_json())

    def load_checkpoint(self, strategy: str, server: dict[str, State] | None = None) -> StrategyRun | None:
        """The last complete round of ``strategy``, checked in full (its method's server state against
        ``server``, the initial one), or None when it has not started."""
        path = self._checkpoint_path(strategy)
        if not checkpoint.present(path):
            return None
        defaults = json.loads(json.dumps(asdict(SimulationConfig())))
        return checkpoint.load(path, strategy, self._config_json(), self.names, self.initial, server or {}, defaults)

    def _config_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self.config)))

    # -- one strategy ----------------------------------------------------------------------------
    def _public(self, method: Method | None) -> Tokens | None:
        """The public unlabeled sentences, tokenized, for a method whose server needs them."""
        if method is None or not method.needs_public:
            return None
        if self._public_tokens is None:
            if self.config.data_dir is not None:
                raise UsageError(
                    f"strategy {method.name} needs public unlabeled sentences, held out of the embedded corpus",
                    hint="run it without --data",
                )
            texts = public_sentences(load_bbc(), self.clients, self.config.public_examples, self.config.seed)
            self._public_tokens = self.model.tokenize(texts)
        return self._public_tokens

    def _client_round(
        self, run: StrategyRun, method: Method | None, round_: int, index: int, data: ClientTokens
    ) -> tuple[ClientReply, float]:
        """One participant's round and the seconds it took (round 1's shared result is charged the
        seconds it took when it was computed)."""
        start = time.perf_counter()
        if method is not None:  # the client's own round (``methods``)
            fit = local_fit(self.model, self.config, data, round_, index)
            reply = method.client_round(self.model, run, data.name, data, fit)
            return reply, time.perf_counter() - start
        if round_ == 1 and data.name in self._first_round:
            return self._first_round[data.name]
        merged, own = run.bar[data.name], run.personal(data.name)
        state, loss = train_client(self.model, self.config, data, own, round_, index)
        if data.name in run.own:  # a selecting client: it keeps what it trained, sends the merge plus its update
            reply = ClientReply(selection.sent_state(merged, own, state), loss, (merged,), kept=state)
        else:
            reply = ClientReply(state, loss, (merged,), kept=state if self.config.select_on_validation else None)
        done = reply, time.perf_counter() - start
        if round_ == 1:
            self._first_round[data.name] = done
        return done

    def _select(self, run: StrategyRun, kept: dict[str, State]) -> dict[str, selection.Choice]:
        """--select-on-validation after the server's step: each participant keeps the best of its own
        trained model and the merge it receives (``selection.select``)."""
        choices: dict[str, selection.Choice] = {}
        for data in self.data:
            if data.name in kept and data.validation is not None and data.validation_labels is not None:
                choice = selection.select(
                    self.model, data.validation, data.validation_labels, kept[data.name], run.bar[data.name]
                )
                run.own[data.name] = choice.state
                choices[data.name] = choice
        return choices

    def run_strategy(
        self, strategy: str, *, resume: bool, progress: Progress | None = None, on_round: RunCallback | None = None
    ) -> StrategyRun:
        """All rounds of one strategy (from its checkpoint when resuming)."""
        method = METHODS[strategy](self.config) if strategy in METHODS else None
        server_state = method.initial_server(self.initial, self.names) if method is not None else {}
        run = self.load_checkpoint(strategy, server_state) if resume else None
        if run is None:
            run = StrategyRun(strategy, 0, {c: dict(self.initial) for c in self.names})
            run.server = server_state
        advance = (progress or (lambda stage, total: lambda n: None))(strategy, self.config.rounds * len(self.names))
        advance(run.round * len(self.names))
        examples = {d.name: len(d.train) for d in self.data}
        groups = {d.name: d.group for d in self.data}
        public = self._public(method)
        for round_ in range(run.round + 1, self.config.rounds + 1):
            chosen = participants(self.config, self.names, round_)
            trained: dict[str, State] = {}
            losses: dict[str, float] = {}
            traffic: dict[str, tuple[int, int]] = {}
            client_seconds: dict[str, float] = {}
            kept: dict[str, State] = {}
            for index, data in enumerate(self.data):
                if data.name in chosen:
                    reply, client_seconds[data.name] = self._client_round(run, method, round_, index, data)
                    losses[data.name] = reply.loss
                    if reply.kept is not None:
                        kept[data.name] = reply.kept
                    # what an attacker sends (``attacks.Attack.update``)
                    trained[data.name] = self.attack.update(data.name, reply.received[0], reply.sent)
                    silent = strategy in SILENT
                    traffic[data.name] = (
                        0 if silent else state_bytes(trained[data.name]),
                        0 if silent else state_bytes(*reply.received),
                    )
                advance(1)
            check_finite(strategy, round_, losses, trained)
            run.seconds["train"] += sum(client_seconds.values())

            start = time.perf_counter()
            server_round(
                run,
                round_,
                chosen,
                trained,
                clients=self.names,
                examples=examples,
                groups=groups,
                initial=self.initial,
                clip=ClipNorm.parse(self.config.clip_norm),
                method=method,
                context=ServerContext(self.model, public, round_, self.config.seed),
            )
            server_seconds = time.perf_counter() - start
            run.seconds["server"] += server_seconds
            start = time.perf_counter()
            choices = self._select(run, kept) if self.config.select_on_validation is not None else {}
            elapsed = time.perf_counter() - start
            for client in choices:  # the choice is the client's work
                client_seconds[client] += elapsed / len(choices)
            run.seconds["train"] += elapsed
            if round_ == self.config.rounds and method is not None and method.finish is not None:
                for index, data in enumerate(self.data):  # the method's post-training phase
                    start = time.perf_counter()
                    fit = local_fit(self.model, self.config, data, self.config.rounds + 1, index)
                    method.finish(self.model, run, data.name, data, fit)
                    elapsed = time.perf_counter() - start
                    client_seconds[data.name] = client_seconds.get(data.name, 0.0) + elapsed
                    run.seconds["train"] += elapsed

            accuracy: dict[str, float] = {}
            rates: dict[str, dict[str, float]] = {}
            if evaluates(self.config, round_):
                start = time.perf_counter()
                for data in self.data:
                    accuracy[data.name] = evaluate_client(self.model, data, run.personal(data.name))
                    rates[data.name] = self.attack.rates(self.model, data.name, run.personal(data.name))
                run.seconds["eval"] += time.perf_counter() - start
            rows = metric_rows(strategy, round_, self.names, examples, losses, accuracy, self.attack, rates, traffic)
            run.metrics.extend(selection_fields(rows, choices) if self.config.select_on_validation else rows)
            run.timings.append({"round": round_, "server_seconds": server_seconds, "client_seconds": client_seconds})
            run.round = round_
            self.save_checkpoint(run)
            if on_round is not None:
                on_round(run, sum(accuracy.values()) / len(accuracy) if accuracy else None)
        return run


def check_finite(strategy: str, round_: int, losses: dict[str, float], trained: dict[str, State]) -> None:
    """Stop a run whose training diverged, before the server step sees it: a non-finite loss or weight
    (too large an --lr) would poison every client's model, and NaN is not JSON (metrics.jsonl).

    Raises:
        FedbipError: naming the strategy, the round and the first client whose training diverged.
    """
    for client, loss in losses.items():
        weights = all(bool(torch.isfinite(t).all()) for t in trained[client].values() if t.is_floating_point())
        if not (math.isfinite(loss) and weights):
            raise FedbipError(
                f"training diverged: {strategy} round {round_}, client {shown(client)} has a non-finite "
                + ("loss" if not math.isfinite(loss) else "weight"),
                hint="lower --lr (or --local-steps); nothing of this run's rounds from here on is written",
            )


def check_out(out: Path, *, resume: bool, overwrite: bool) -> bool:
    """Refuse to mix a new run into an old one: a non-empty ``out`` needs --resume or --overwrite, and
    must be a simulate run (its run record proves it: ``foreign_entries``), whatever they say.

    Writes nothing; returns whether ``out`` holds an old run that --overwrite will replace.
    """
    if out.exists() and not out.is_dir():
        raise OutputError("exists and is not a directory", where=str(out))
    busy = out.is_dir() and any(out.iterdir())
    if busy and (foreign := foreign_entries(out)):
        raise foreign_refusal(out, foreign, UNRECORDED)
    if busy and not (resume or overwrite):
        raise OutputError(
            "output directory exists and is not empty",
            where=str(out),
            hint="pass --resume to continue it or --overwrite to start afresh",
        )
    return busy and overwrite and not resume


def prepare_out(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Create ``out`` (emptied with --overwrite) and its run record. Call it once the inputs have
    loaded, so that a bad input leaves neither a new directory nor a removed old run behind."""
    if check_out(out, resume=resume, overwrite=overwrite):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    mark_run(out)


def mark_run(out: Path) -> None:
    """Write ``out``'s run record: what proves a directory to be a simulate run that fedbip wrote."""
    if not _is_run(out):
        (out / RUN_RECORD).write_text(json.dumps({"fedbip_run": 1}) + "\n", encoding="utf-8")


def foreign_entries(out: Path) -> list[str]:
    """The entries of a non-empty ``out`` that fedbip cannot prove a simulate run's: none when its run
    record is there; else all but the ``seed-<s>`` runs (a run of several seeds killed before its
    aggregate is written)."""
    if _is_run(out):
        return []
    return [p.name for p in sorted(out.iterdir()) if not (_SEED_DIR.fullmatch(p.name) and _is_run(p))]


def _is_run(directory: Path) -> bool:
    record = directory / RUN_RECORD
    if record.is_symlink() or not record.is_file():
        return False
    try:
        with record.open("rb") as handle:
            return json.loads(handle.read(1024)) == {"fedbip_run": 1}
    except (OSError, ValueError):
        return False


def mean_accuracy_by_round(metrics: list[dict[str, Any]]) -> dict[int, float]:
    """Mean test accuracy over clients at each evaluated round."""
    by_round: dict[int, list[float]] = {}
    for row in metrics:
        if row["test_accuracy"] is not None:
            by_round.setdefault(row["round"], []).append(row["test_accuracy"])
    return {r: sum(v) / len(v) for r, v in sorted(by_round.items())}


def final_accuracy(metrics: list[dict[str, Any]]) -> dict[str, float]:
    """Each client's test accuracy at the last evaluated round."""
    last = max(row["round"] for row in metrics if row["test_accuracy"] is not None)
    return {
        row["client"]: row["test_accuracy"]
        for row in metrics
        if row["round"] == last and row["test_accuracy"] is not None
    }
