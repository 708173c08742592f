"""TAP — two-stage adaptive personalization (arXiv 2509.26524; code lee3296/TAP, ``main_training.py``
and ``utils/training.py``), as the strategy ``tap`` (issue 14).

Each client keeps a personal model (its θ̄, the adapter it is evaluated and saved with) beside the
federated one, which the server averages as FedAvg does (``methods.fedavg_round``). In a round a
participant

1. replaces components of its personal model by the received federated version where that version
   has the lower local training loss by a margin (``replacements``): a component here is one LoRA
   module's pair (A, B) or the classification head (weight and bias), i.e. the trainable tensors of
   one module (``components``). For each component c, the personal model with c swapped for the
   received global version is scored on the client's training sentences (mean cross-entropy,
   ``local_loss``); c is replaced when that loss plus the margin is below the personal model's own;
   every component is judged against the unmodified personal model, then all chosen ones are
   swapped at once;
2. trains its personal model on the task loss, and trains the received federated model on the task
   loss and sends it (both with the round's batches).

After the last round (``finish``) each personal model is fine-tuned for a few steps on the task
loss plus a knowledge-distillation term from the final global model (``kd_loss``):
weight · T² · KL(softmax(t/T) ‖ softmax(s/T)), averaged over the batch, t and s the teacher's and
the student's logits.

Followed from the code: the comparison of training losses with a margin (the code's margin for text
classification, ``smaller_margin`` = 0.005), the distillation loss and its temperature (T = 1), the
distillation weight for text classification (``distil_loss_weight`` 1e-4 × 500 = 0.05), and the
post-training length: 50 iterations with gradient accumulation 4 are 13 optimizer steps. Choices
made here: the code's components are the encoders and experts a task uses and it compares whole
task losses recorded while training; here, one task per client, the components are the modules
above and each is scored by swapping it alone, before training; the teacher of the post-training is
the final global model itself (the code first fine-tunes a copy of it on the client's data); no
gradient clipping or warm-up (fedbip's local training is the same for every strategy).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from fedbip_cli.simulate.methods import GLOBAL, ClientReply, Fit, ServerContext, fedavg_round, personal_then_global
from fedbip_cli.simulate.model import ClientModel, Regularizer
from fedbip_cli.simulate.strategies import RoundUpdates, ServerStep, State

if TYPE_CHECKING:
    from fedbip_cli.simulate.checkpoint import StrategyRun
    from fedbip_cli.simulate.loop import ClientTokens

MARGIN = 0.005  # the code's ``smaller_margin``, its margin for text classification
KD_STEPS = 13  # the code's 50 post-training iterations with gradient accumulation 4
KD_WEIGHT = 0.05  # the code's ``distil_loss_weight`` 1e-4, × 500 for text classification
TEMPERATURE = 1.0  # the code's ``knowledge_distillation_loss`` default


def components(state: State) -> dict[str, list[str]]:
    """The state's tensors by module: each LoRA module's ``lora_A`` and ``lora_B``, the head's weight
    and bias."""
    grouped: dict[str, list[str]] = {}
    for name in state:
        grouped.setdefault(name.rsplit(".", 1)[0], []).append(name)
    return grouped


def swapped(personal: State, received: State, names: list[str]) -> State:
    """``personal`` with the tensors ``names`` taken from ``received``."""
    return {name: received[name] if name in names else t for name, t in personal.items()}


def replacements(own: float, swapped_losses: dict[str, float], margin: float) -> list[str]:
    """The components whose swapped-in federated version lowers the local loss ``own`` by more than
    ``margin``: those c with swapped_losses[c] + margin < own."""
    return [c for c, loss in swapped_losses.items() if loss + margin < own]


def local_loss(model: ClientModel, data: ClientTokens, state: State) -> float:
    """Mean cross-entropy of ``state`` on the client's training sentences."""
    model.load_state(state)
    return F.cross_entropy(model.logits(data.train), data.train_labels).item()


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), summed over classes, averaged over the batch."""
    log_student = F.log_softmax(student / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher / temperature, dim=-1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=-1).mean()
    return temperature**2 * kl


def kd_regularizer(
    head: Callable[[torch.Tensor], torch.Tensor], teacher: torch.Tensor, weight: float, temperature: float
) -> Regularizer:
    """weight · ``kd_loss`` of the batch's logits (``head`` of its features) against the fixed
    ``teacher`` logits (N, classes) of the same sentences, picked by the batch's indices."""
    fixed = teacher.detach()

    def term(index: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        student = head(features)
        return weight * kd_loss(student, fixed[index].to(student.device, student.dtype), temperature)

    return term


@dataclass(frozen=True)
class TAP:
    """TAP: a FedAvg model, a personal model per client that takes components from it when they
    fit the client better, and a distillation phase at the end (see the module's docstring)."""

    margin: float = MARGIN
    kd_steps: int = KD_STEPS
    kd_weight: float = KD_WEIGHT
    temperature: float = TEMPERATURE
    name: str = "tap"
    needs_public: bool = False

    def initial_server(self, initial: State, clients: list[str]) -> dict[str, State]:
        return {GLOBAL: dict(initial)}

    def replace(self, model: ClientModel, data: ClientTokens, personal: State, received: State) -> State:
        """``personal`` with the components of ``received`` that fit the client better swapped in."""
        groups = components(personal)
        own = local_loss(model, data, personal)
        losses = {c: local_loss(model, data, swapped(personal, received, names)) for c, names in groups.items()}
        chosen = [name for c in replacements(own, losses, self.margin) for name in groups[c]]
        return swapped(personal, received, chosen)

    def client_round(
        self, model: ClientModel, run: StrategyRun, client: str, data: ClientTokens, fit: Fit
    ) -> ClientReply:
        personal = self.replace(model, data, run.bar[client], run.server[GLOBAL])
        return personal_then_global(run, client, personal, None, fit)

    def server_round(
        self, run: StrategyRun, updates: RoundUpdates, server: ServerContext
    ) -> tuple[RoundUpdates, ServerStep]:
        return fedavg_round(run, updates, GLOBAL)

    def sent_from(self, run: StrategyRun, clients: list[str]) -> dict[str, State]:
        return {client: run.server[GLOBAL] for client in clients}

    def finish(self, model: ClientModel, run: StrategyRun, client: str, data: ClientTokens, fit: Fit) -> None:
        """Fine-tune the client's personal model with distillation from the final global model."""
        if self.kd_steps == 0:
            return
        model.load_state(run.server[GLOBAL])
        teacher = model.logits(data.train)
        term = kd_regularizer(model.head_logits, teacher, self.kd_weight, self.temperature)
        run.bar[client], _ = fit(run.bar[client], term, self.kd_steps)
