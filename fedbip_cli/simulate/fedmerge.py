"""FedMerge (arXiv 2504.06768, "FedMerge: Federated Personalization via Model Merging"; code
shutong043/FedMerge, ``server_merging.py`` and ``main_merging_cifar100_personal.py``): the server
step as pure functions over tensors, and the strategy ``fedmerge`` built on them (issue 14).

The server keeps d global models Θ_1..Θ_d and a weight matrix W (clients × d); client i receives
θ_i = Σ_j S_ij Θ_j with S = softmax(W) by rows, trains it to θ'_i and sends it back; g_i = θ_i − θ'_i
is its pseudo-gradient. Followed from the code, in its order:

1. W by its gradient: ∂L_i/∂W_ij = S_ij ⟨Θ_j − θ_i, g_i⟩ (the chain rule through θ_i = Σ_j S_ij Θ_j
   and the softmax), scaled by each client's share of the examples n_i; the code normalises the
   step and repeats it until some entry of W has moved by more than its learning rate, which is the
   step scaled so that the largest entry moves by exactly ``lr_w`` — what ``update_w`` does.
2. Every Θ_j from the updates weighted by softmax(W) (the new W) and the clients' sizes, normalised
   over the clients for each j: Θ_j ← Θ_j − Σ_i w_ij g_i, w_ij = S_ij n_i / Σ_k S_kj n_k.

Choices made here: the inner products run over the whole trainable state (LoRA factors and head;
the code takes only the top linear layer), and only the round's participants count.

The strategy (``FedMerge``): the server keeps Θ_1..Θ_d (``theta-<j>``) and W (``w``, clients × d,
float64, zero at the start as in the code), all checkpointed. Defaults from the code's argument
parser: d = 5 (``--num-shared``) and W's step 0.01 (``--learning_rate_W``). The code draws each Θ_j
as a new model (``load_model`` once per j: independent random initialisations); here Θ_1 is the
run's shared initial adapter θ⁰ and Θ_j (j ≥ 2) is θ⁰ with the entries of each tensor permuted at
random (seeded by the run's seed and j): for the tensors initialised i.i.d. (LoRA A, the head's
weight) that is another draw from the same initialisation, and the zero ones (LoRA B, the bias)
stay zero. (With one shared start and W = 0 every client would receive the same model and the Θ_j
would never separate.) Client i receives θ_i = Σ_j softmax(W_i)_j Θ_j, trains it with the round's
batches and sends it; the server steps W, then Θ (``fedmerge_step``); every client is then
evaluated and saved with its merged model under the new W and Θ.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from fedbip_cli.simulate.methods import ClientReply, Fit, ServerContext
from fedbip_cli.simulate.model import ClientModel
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

GLOBAL_MODELS = 5  # d: the code's --num-shared default
LR_W = 0.01  # the code's --learning_rate_W default: how far W's largest entry moves per round
W = "w"  # the server state holding W


def merged(theta: dict[str, torch.Tensor], weights: torch.Tensor) -> State:
    """θ_i = Σ_j S_ij Θ_j for each row i of ``weights`` S (rows, d), Θ stacked on dim 0 (d, ...).

    Returns:
        per tensor name, the merged models stacked on dim 0 (rows, ...).
    """
    return {
        name: torch.einsum("rd,d...->r...", weights.to(torch.float64), t.to(torch.float64)).to(t.dtype)
        for name, t in theta.items()
    }


def _inner(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> torch.Tensor:
    """⟨left_a, right_b⟩ over every tensor, for stacks on dim 0: an (A, B) float64 matrix."""
    return sum(
        left[name].reshape(left[name].shape[0], -1).to(torch.float64)
        @ right[name].reshape(right[name].shape[0], -1).to(torch.float64).T
        for name in left
    )


def update_w(
    w: torch.Tensor,
    theta: dict[str, torch.Tensor],
    sent: dict[str, torch.Tensor],
    pseudo: dict[str, torch.Tensor],
    share: torch.Tensor,
    lr_w: float,
) -> torch.Tensor:
    """Step 1: W's rows of the K participants after one step (the other rows are the caller's).

    Args:
        w: (K, d) the participants' rows of W.
        theta: Θ stacked (d, ...) per tensor name.
        sent: θ_i, what each participant received, stacked (K, ...).
        pseudo: g_i = θ_i − θ'_i stacked (K, ...).
        share: (K,) each participant's share n_i of the examples.
        lr_w: how far the largest entry of W moves.
    """
    s = torch.softmax(w.to(torch.float64), dim=1)
    # ⟨Θ_j − θ_i, g_i⟩ = ⟨Θ_j, g_i⟩ − ⟨θ_i, g_i⟩
    along = _inner(pseudo, theta) - _inner(pseudo, sent).diagonal().unsqueeze(1)
    grad = share.to(torch.float64).unsqueeze(1) * s * along
    largest = grad.abs().max()
    if not largest > 0:
        return w.clone()
    return w - lr_w * grad / largest


def update_theta(
    w: torch.Tensor, theta: dict[str, torch.Tensor], pseudo: dict[str, torch.Tensor], share: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Step 2: Θ_j ← Θ_j − Σ_i w_ij g_i with w_ij = S_ij n_i / Σ_k S_kj n_k, S = softmax(``w``) (K, d)."""
    weighted = torch.softmax(w.to(torch.float64), dim=1) * share.to(torch.float64).unsqueeze(1)
    weighted = weighted / weighted.sum(dim=0, keepdim=True)
    return {
        name: theta[name] - torch.einsum("kd,k...->d...", weighted, pseudo[name].to(torch.float64)).to(t.dtype)
        for name, t in theta.items()
    }


def fedmerge_step(
    w: torch.Tensor,
    theta: dict[str, torch.Tensor],
    trained: dict[str, torch.Tensor],
    share: torch.Tensor,
    lr_w: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One FedMerge server step over K participants: (new W rows (K, d), new Θ (d, ...)).

    Args:
        w: (K, d) the participants' rows of W, the ones their models were merged with.
        theta: Θ stacked (d, ...) per tensor name.
        trained: θ'_i, each participant's trained model, stacked (K, ...).
        share: (K,) the participants' example counts (normalised here).
        lr_w: W's step (``update_w``).
    """
    share = share.to(torch.float64) / share.sum()
    sent = merged(theta, torch.softmax(w.to(torch.float64), dim=1))
    pseudo = {name: sent[name] - trained[name] for name in theta}
    new_w = update_w(w, theta, sent, pseudo, share, lr_w)
    return new_w, update_theta(new_w, theta, pseudo, share)


def theta_key(j: int) -> str:
    """The server state holding Θ_{j+1}."""
    return f"theta-{j}"


def distinct_starts(initial: State, count: int, seed: int) -> list[State]:
    """Θ_1 = ``initial``; Θ_j (j ≥ 2) = ``initial`` with each tensor's entries permuted at random by a
    generator seeded with (``seed``, j): another draw of an i.i.d. initialisation (see the module's
    docstring)."""
    starts = [dict(initial)]
    for j in range(1, count):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + j)
        starts.append(
            {
                name: t.reshape(-1)[torch.randperm(t.numel(), generator=generator)].reshape(t.shape)
                for name, t in initial.items()
            }
        )
    return starts


def _stacked(states: list[State]) -> dict[str, torch.Tensor]:
    return {name: torch.stack([s[name] for s in states]) for name in states[0]}


@dataclass(frozen=True)
class FedMerge:
    """FedMerge: d global models merged per client by softmax(W) (see the module's docstring)."""

    global_models: int = GLOBAL_MODELS
    lr_w: float = LR_W
    seed: int = 0
    name: str = "fedmerge"
    needs_public: bool = False
    finish: None = None

    def initial_server(self, initial: State, clients: list[str]) -> dict[str, State]:
        starts = distinct_starts(initial, self.global_models, self.seed)
        server = {theta_key(j): start for j, start in enumerate(starts)}
        server[W] = {"weights": torch.zeros(len(clients), self.global_models, dtype=torch.float64)}
        return server

    def _theta(self, run: StrategyRun) -> dict[str, torch.Tensor]:
        return _stacked([run.server[theta_key(j)] for j in range(self.global_models)])

    def received(self, run: StrategyRun, rows: list[int]) -> list[State]:
        """θ_i = Σ_j softmax(W_i)_j Θ_j for the clients at ``rows`` of W."""
        stacked = merged(self._theta(run), torch.softmax(run.server[W]["weights"][rows], dim=1))
        return [{name: t[r] for name, t in stacked.items()} for r in range(len(rows))]

    def client_round(
        self, model: ClientModel, run: StrategyRun, client: str, data: ClientTokens, fit: Fit
    ) -> ClientReply:
        (received,) = self.received(run, [list(run.bar).index(client)])
        sent, loss = fit(received, None)
        return ClientReply(sent, loss, (received,))

    def sent_from(self, run: StrategyRun, clients: list[str]) -> dict[str, State]:
        order = list(run.bar)  # each row alone, as ``client_round`` computes it
        return {client: self.received(run, [order.index(client)])[0] for client in clients}

    def server_round(
        self, run: StrategyRun, updates: RoundUpdates, server: ServerContext
    ) -> tuple[RoundUpdates, ServerStep]:
        rows = [updates.clients.index(c) for c in updates.participants]
        weights = run.server[W]["weights"]
        before = dict(zip(updates.clients, self.received(run, list(range(len(updates.clients))))))
        view = replace(updates, bar=before)
        share = torch.tensor([float(updates.examples[c]) for c in updates.participants], dtype=torch.float64)
        trained = _stacked([updates.trained[c] for c in updates.participants])
        new_rows, theta = fedmerge_step(weights[rows], self._theta(run), trained, share, self.lr_w)
        weights = weights.clone()
        weights[rows] = new_rows
        run.server[W] = {"weights": weights}
        for j in range(self.global_models):
            run.server[theta_key(j)] = {name: t[j] for name, t in theta.items()}
        bar = dict(zip(updates.clients, self.received(run, list(range(len(updates.clients))))))
        tau = task_vectors(view)
        similarity = update_similarity(updates.participants, tau, "model")
        plan = Plan(list(updates.clients), {"model": torch.softmax(weights, dim=1)})
        return view, ServerStep(bar, similarity, plan, ema_memory(view, tau))
