"""Poisoning scenarios for ``fedbip simulate``: which clients attack, what they send, and how well it works.

Two attacks, chosen with ``--attack``:

- ``scaled``: an attacker trains honestly and sends its update multiplied by ``--attack-scale``,
  θ'_k = θ̄_k + s (θ_k − θ̄_k). Cosine similarity ignores scale, so FedBip gives the ×s update an
  ordinary neighbour's weight, and then it dominates its neighbours' merged step.
- ``backdoor``: an attacker trains on data in which a share of its sentences (``POISON_FRACTION``)
  carry a trigger word and the target label (a data-poisoning backdoor, after Bagdasaryan et al.,
  "How To Backdoor Federated Learning", AISTATS 2020, with a rare-word trigger as in Kurita et al.,
  "Weight Poisoning Attacks on Pre-trained Models", ACL 2020). ``--attack-scale`` above 1 boosts its
  update as well (their "model replacement").

The attack success rate (ASR) of a client's personalized model is the fraction of its triggered test
sentences whose true label is not the target that the model classifies as the target. Beside it, the
same fraction on the same sentences without the trigger (``clean_target_rate``): a weak model that
predicts the target for most sentences has a high ASR without any backdoor, and only the difference
is the trigger's doing. Every random
draw here is a function of the seed and the client, never of what ran before, so poisoned data,
attackers and triggered tests are the same in every run and every strategy of one seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedbip_cli.defence import ClipNorm
from fedbip_cli.errors import UsageError
from fedbip_cli.simulate.data import ClientData

if TYPE_CHECKING:
    from fedbip_cli.simulate.loop import SimulationConfig
    from fedbip_cli.simulate.model import ClientModel, Tokens

State = dict[str, torch.Tensor]

ATTACKS = ("none", "scaled", "backdoor")
# The update multiplier of --attack scaled when --attack-scale is not given: an order of magnitude,
# enough to dominate a merge of a handful of clients while staying a plausible "large update".
SCALED_DEFAULT = 10.0
# A rare word (Kurita et al. use cf, mn, bb, tq): one token in MiniLM's uncased vocabulary, almost
# never in news text, so the model can learn it as a shortcut without hurting clean sentences.
TRIGGER = "cf"
# The share of an attacker's training sentences that carry the trigger (relabelled to the target).
# Half keeps the attacker's clean accuracy (a stealthy attacker still solves its task) while every
# local batch of 16 holds about 8 poisoned sentences.
POISON_FRACTION = 0.5
# The trigger goes among the first words of a sentence, so that it survives truncation to
# --max-length tokens (32 tokens hold about 20 words).
TRIGGER_SPAN = 8
# The rates measured on each client's test sentences whose label is not the target (``Attack.rates``).
RATES = ("attack_success_rate", "clean_target_rate")
# Independent random streams per purpose (numpy SeedSequence entropy after the seed).
_ATTACKERS, _POISON, _TESTS = 7_001, 7_002, 7_003


def check_config(config: SimulationConfig) -> None:
    """The attack and defence options of ``config``, checked before anything loads."""
    if config.attack not in ATTACKS:
        raise UsageError(f"unknown attack {config.attack!r}; choose one of {', '.join(ATTACKS)}")
    if config.attack == "none" and config.attackers:
        raise UsageError(f"--attackers {config.attackers} needs --attack scaled or backdoor")
    if config.attack == "none" and config.attack_scale != 1:
        raise UsageError(f"--attack-scale {config.attack_scale} needs --attack scaled or backdoor")
    if config.attack != "none" and not 1 <= config.attackers < config.clients:
        raise UsageError(
            f"--attackers {config.attackers} must be in 1..{config.clients - 1} (at least one client stays honest)"
        )
    if not (math.isfinite(config.attack_scale) and config.attack_scale > 0):
        raise UsageError(f"--attack-scale {config.attack_scale} must be a positive number")
    if not config.trigger.strip() or len(config.trigger.split()) != 1 or len(config.trigger) > 50:
        raise UsageError(f"--trigger {config.trigger[:50]!r} must be one word of at most 50 characters")
    ClipNorm.parse(config.clip_norm)
    if config.clip_norm is not None and "fedamp" in config.strategies:
        raise UsageError(
            "--clip-norm bounds task vectors; fedamp mixes whole models",
            hint="compare fedamp without --clip-norm, or leave it out of --compare",
        )


def insert_trigger(text: str, trigger: str, rng: np.random.Generator) -> str:
    """``text`` with ``trigger`` inserted as a word at a random place among its first ``TRIGGER_SPAN`` words."""
    words = text.split()
    words.insert(int(rng.integers(0, min(len(words), TRIGGER_SPAN) + 1)), trigger)
    return " ".join(words)


def choose_attackers(names: list[str], count: int, seed: int) -> list[str]:
    """``count`` of the clients ``names``, drawn from the seed alone, in client order."""
    if not 1 <= count < len(names):
        raise UsageError(f"--attackers {count} must be in 1..{len(names) - 1} (at least one client stays honest)")
    chosen = np.random.default_rng([seed, _ATTACKERS]).choice(len(names), size=count, replace=False)
    return [names[i] for i in sorted(chosen.tolist())]


def poison_client(client: ClientData, trigger: str, target: int, rng: np.random.Generator) -> ClientData:
    """A copy of ``client`` whose training set has ``POISON_FRACTION`` of its sentences (drawn among
    those whose label is not ``target``) triggered and relabelled ``target``; the test set is unchanged."""
    candidates = [i for i, label in enumerate(client.train_labels) if label != target]
    count = min(len(candidates), round(POISON_FRACTION * len(client.train_labels)))
    texts, labels = list(client.train_texts), list(client.train_labels)
    for i in sorted(rng.choice(candidates, size=count, replace=False).tolist()) if count else []:
        texts[i] = insert_trigger(texts[i], trigger, rng)
        labels[i] = target
    return replace(client, train_texts=texts, train_labels=labels)


def scaled_update(sent: State, trained: State, scale: float) -> State:
    """θ̄ + s (θ − θ̄) per tensor: the update from the state the client was sent, multiplied by ``scale``."""
    return {name: sent[name] + scale * (trained[name] - sent[name]) for name in trained}


def attack_success_rate(predictions: torch.Tensor, target: int) -> float:
    """The fraction of ``predictions`` (on sentences whose true label is not ``target``) equal to ``target``."""
    if predictions.numel() == 0:
        raise ValueError("attack success rate needs at least one triggered sentence")
    return (predictions == target).sum().item() / predictions.numel()


@dataclass
class Attack:
    """The poisoning scenario of one run (``kind`` none: every method is the identity)."""

    kind: str
    attackers: list[str]
    scale: float
    trigger: str
    target: int  # index into the label names
    seed: int
    # Per client, set by ``prepare``: its test sentences whose label is not the target, with and without the trigger.
    triggered: dict[str, Tokens] | None = None
    untriggered: dict[str, Tokens] | None = None

    @classmethod
    def of(cls, config: SimulationConfig, clients: list[ClientData], labels: list[str]) -> Attack:
        """The attack ``config`` asks for, on ``clients`` whose label names are ``labels``."""
        target = _label_index(config.target_label, labels)
        if config.attack == "none":
            return cls("none", [], 1.0, config.trigger, target, config.seed)
        attackers = choose_attackers([c.name for c in clients], config.attackers, config.seed)
        return cls(config.attack, attackers, config.attack_scale, config.trigger, target, config.seed)

    def poison(self, clients: list[ClientData]) -> list[ClientData]:
        """The clients with each backdoor attacker's training data poisoned (others, and tests, unchanged)."""
        if self.kind != "backdoor":
            return clients
        return [
            poison_client(c, self.trigger, self.target, np.random.default_rng([self.seed, _POISON, i]))
            if c.name in self.attackers
            else c
            for i, c in enumerate(clients)
        ]

    def prepare(self, model: ClientModel, clients: list[ClientData]) -> None:
        """Tokenize each client's test sentences whose label is not the target, with and without the trigger."""
        if self.kind == "none":
            return
        self.triggered, self.untriggered = {}, {}
        for i, client in enumerate(clients):
            rng = np.random.default_rng([self.seed, _TESTS, i])
            texts = [t for t, label in zip(client.test_texts, client.test_labels, strict=True) if label != self.target]
            if not texts:
                raise UsageError(f"{client.name}: every test sentence has the target label; the ASR is undefined")
            self.triggered[client.name] = model.tokenize([insert_trigger(t, self.trigger, rng) for t in texts])
            self.untriggered[client.name] = model.tokenize(texts)

    def update(self, client: str, sent: State, trained: State) -> State:
        """What ``client`` sends after training ``trained`` from ``sent``: its update scaled when it attacks."""
        if client not in self.attackers or self.scale == 1:
            return trained
        return scaled_update(sent, trained, self.scale)

    def rates(self, model: ClientModel, client: str, state: State) -> dict[str, float]:
        """The ASR of ``state`` on ``client``'s triggered test sentences and the same rate without the
        trigger (``clean_target_rate``); {} without an attack."""
        if self.triggered is None or self.untriggered is None:
            return {}
        model.load_state(state)
        return {
            "attack_success_rate": attack_success_rate(model.logits(self.triggered[client]).argmax(-1), self.target),
            "clean_target_rate": attack_success_rate(model.logits(self.untriggered[client]).argmax(-1), self.target),
        }


def _label_index(name: str | None, labels: list[str]) -> int:
    if name is None:
        return 0
    if name in labels:
        return labels.index(name)
    raise UsageError(f"--target-label {name[:50]!r} is not a label; choose one of {', '.join(labels)}")


def attack_fields(attack: Attack, client: str, rates: dict[str, float] | None) -> dict[str, Any]:
    """The attack columns of one ``metrics.jsonl`` row: whether the client attacks and its ``rates``
    (None when it was not evaluated); none without an attack."""
    if attack.kind == "none":
        return {}
    rates = rates or {}
    return {"attacker": client in attack.attackers, **{key: rates.get(key) for key in RATES}}


def honest_summary(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over the honest clients at the last evaluated round of ASR, clean target rate and
    accuracy, and every client's ASR ({} without an attack)."""
    rows = [r for r in metrics if "attacker" in r and r["test_accuracy"] is not None]
    if not rows:
        return {}
    last = max(r["round"] for r in rows)
    honest = [r for r in rows if r["round"] == last and not r["attacker"]]
    mean = {key: sum(r[key] for r in honest) / len(honest) for key in (*RATES, "test_accuracy")}
    return {
        "attackers": sorted({r["client"] for r in rows if r["attacker"]}),
        "honest_attack_success_rate": mean["attack_success_rate"],
        "honest_clean_target_rate": mean["clean_target_rate"],
        "honest_accuracy": mean["test_accuracy"],
        "attack_success_rate": {r["client"]: r["attack_success_rate"] for r in rows if r["round"] == last},
    }
