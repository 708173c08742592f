"""A universal expert distilled from clustered federated learning (arXiv 2506.20285, "Distilling A
Universal Expert from Clustered Federated Learning"), as the strategy ``universal-expert`` (issue 14).

Only the abstract was available: three steps a round, (1) local training at each client, (2)
aggregation within clusters, (3) a universal expert distilled from the cluster models, which every
client receives as the start of its next round's training. Every detail below is a choice made here:

- local training: each participant trains the universal expert it received (θ⁰ in round 1) with the
  round's batches and sends it;
- clusters: fedbip's own suggestion (``clustering.suggest_clusters``: average linkage on the cosine
  distance of the participants' updates τ_k = θ_k − expert, the cut with the best silhouette; one
  cluster when no cut beats ``clustering.MIN_SILHOUETTE``, or for fewer than 3 participants);
- cluster models: the example-weighted mean of the trained models of each cluster (``cluster_models``);
  each participant is evaluated and saved with its cluster's model (the server sends it beside the
  expert, so a participant receives two adapters a round);
- distillation: on public unlabeled sentences that no client holds (``partition.public_sentences``,
  ``--public-examples``, default 256), the teacher is the mean over clusters of the cluster models'
  class probabilities, each cluster weighted equally so that a large cluster does not outvote the
  others' knowledge (``ensemble_targets``); the student starts from the example-weighted mean of all
  the trained models and takes ``--distill-steps`` AdamW steps (default 16: one pass over the public
  sentences at the default batch of 16) at the clients' learning rate and batch size, minimizing the
  cross-entropy against the teacher's probabilities (equal, up to a constant, to KL(teacher ‖
  student) at temperature 1); its batches are seeded by the run's seed and the round.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from fedbip_cli.clustering import suggest_clusters
from fedbip_cli.merge import weighted_sum
from fedbip_cli.simulate.methods import ClientReply, Fit, ServerContext
from fedbip_cli.simulate.model import ClientModel, Tokens
from fedbip_cli.simulate.strategies import (
    Plan,
    RoundUpdates,
    ServerStep,
    State,
    ema_memory,
    task_vectors,
    update_similarity,
)

if TYPE_CHECKING:
    from fedbip_cli.simulate.checkpoint import StrategyRun
    from fedbip_cli.simulate.loop import ClientTokens

PUBLIC_EXAMPLES = 256  # public unlabeled sentences held out of every client (chosen here)
DISTILL_STEPS = 16  # one pass over the default public set at the default batch of 16 (chosen here)
EXPERT = "expert"  # the server state holding the universal expert


def cluster_rows(clusters: list[list[int]], examples: torch.Tensor) -> torch.Tensor:
    """(clusters, K) float64 rows: row c averages the members of cluster c by their ``examples`` (K,)."""
    rows = torch.zeros(len(clusters), len(examples), dtype=torch.float64)
    for c, members in enumerate(clusters):
        rows[c, members] = examples[members].to(torch.float64)
    return rows / rows.sum(dim=1, keepdim=True)


def cluster_models(trained: dict[str, torch.Tensor], rows: torch.Tensor) -> list[State]:
    """Each cluster's model Σ_k rows[c, k] θ_k from the trained models stacked (K, ...) per tensor."""
    merged = {name: weighted_sum(t, rows) for name, t in trained.items()}
    return [{name: t[c] for name, t in merged.items()} for c in range(rows.shape[0])]


def ensemble_targets(logits: list[torch.Tensor]) -> torch.Tensor:
    """The teacher's class probabilities: the mean over clusters of softmax(logits_c), (N, classes)."""
    return torch.stack([torch.softmax(z.to(torch.float64), dim=-1) for z in logits]).mean(dim=0).to(torch.float32)


def distil(
    model: ClientModel,
    teachers: list[State],
    student: State,
    public: Tokens,
    *,
    steps: int,
    generator: torch.Generator,
    batch_size: int,
    lr: float,
) -> State:
    """The ``student`` after ``steps`` AdamW steps on ``public`` toward the ensemble of ``teachers``:
    ``ClientModel.train``'s cross-entropy takes the teachers' mean probabilities (``ensemble_targets``)
    as soft targets, whose gradient is that of KL(teacher ‖ student)."""
    if steps == 0:
        return student
    logits = []
    for teacher in teachers:
        model.load_state(teacher)
        logits.append(model.logits(public))
    targets = ensemble_targets(logits)
    model.load_state(student)
    model.train(public, targets, steps=steps, batch_size=batch_size, lr=lr, generator=generator)
    return model.state()


@dataclass(frozen=True)
class UniversalExpert:
    """Local training, clusters, and a universal expert distilled from the cluster models (see the
    module's docstring)."""

    distill_steps: int = DISTILL_STEPS
    batch_size: int = 16
    lr: float = 1e-3
    name: str = "universal-expert"
    needs_public: bool = True
    finish: None = None

    def initial_server(self, initial: State, clients: list[str]) -> dict[str, State]:
        return {EXPERT: dict(initial)}

    def client_round(
        self, model: ClientModel, run: StrategyRun, client: str, data: ClientTokens, fit: Fit
    ) -> ClientReply:
        received = run.server[EXPERT]
        sent, loss = fit(received, None)
        return ClientReply(sent, loss, (received, run.bar[client]))

    def sent_from(self, run: StrategyRun, clients: list[str]) -> dict[str, State]:
        return {client: run.server[EXPERT] for client in clients}

    def server_round(
        self, run: StrategyRun, updates: RoundUpdates, server: ServerContext
    ) -> tuple[RoundUpdates, ServerStep]:
        if server.public is None:
            raise ValueError("the universal expert's server step needs the public sentences")
        chosen = updates.participants
        view = replace(updates, bar={c: run.server[EXPERT] for c in updates.clients})
        tau = task_vectors(view)
        similarity = update_similarity(chosen, tau, "model")
        clusters = suggest_clusters(similarity.groups["model"].similarity)
        examples = torch.tensor([float(updates.examples[c]) for c in chosen], dtype=torch.float64)
        trained = {name: torch.stack([updates.trained[c][name] for c in chosen]) for name in tau}
        rows = cluster_rows(clusters, examples)
        models = cluster_models(trained, rows)
        bar = dict(updates.bar)
        for c, members in enumerate(clusters):
            for k in members:
                bar[chosen[k]] = models[c]
        (start,) = cluster_models(trained, cluster_rows([list(range(len(chosen)))], examples))
        generator = torch.Generator().manual_seed(server.seed * 1_000_003 + server.round)
        run.server[EXPERT] = distil(
            server.model,
            models,
            start,
            server.public,
            steps=self.distill_steps,
            generator=generator,
            batch_size=self.batch_size,
            lr=self.lr,
        )
        cluster_of = {k: c for c, members in enumerate(clusters) for k in members}
        plan = Plan(list(chosen), {"model": rows[[cluster_of[k] for k in range(len(chosen))]]})
        return view, ServerStep(bar, similarity, plan, ema_memory(view, tau))
