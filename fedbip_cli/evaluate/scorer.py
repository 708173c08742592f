"""Per-example scores of PEFT adapters on one base model, loaded once.

The base is loaded once; each adapter is added to it by name with peft's ``load_adapter``, made
active with ``set_adapter`` and deleted once scored, so a candidate costs its adapter's weights, never
a second base. peft keeps one adapter loaded at all times and allows only one that trains base biases
(``bias="lora_only"``/``"all"``, whose loading writes into the base's own biases): the scorer holds
a permanent anchor adapter that changes nothing (LoRA B = 0, no bias), loads one adapter at a time
beside it, and puts the base's biases back after each. A
sequence classifier's adapter carries its head in ``modules_to_save`` (as ``simulate`` saves it), and
peft switches that head with the adapter. Sentences are tokenized as ``simulate`` tokenizes them
(truncated and right-padded to ``max_length``), sorted by length and batched, each batch trimmed to
its longest sentence: a simulation's own adapters score here exactly as in its run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from fedbip_cli.evaluate.stats import Scores
from fedbip_cli.simulate.model import Tokens, quiet

CLASSIFICATION, CAUSAL_LM = "classification", "causal-lm"
# adapter_config.json's task_type -> the task evaluated
TASKS = {"SEQ_CLS": CLASSIFICATION, "CAUSAL_LM": CAUSAL_LM}
_MODELS = {CLASSIFICATION: AutoModelForSequenceClassification, CAUSAL_LM: AutoModelForCausalLM}
_PEFT_TASKS = {task: kind for kind, task in TASKS.items()}
ANCHOR = "fedbip-anchor"


class Scorer:
    """One base model of ``task`` and the adapters loaded into it by name."""

    def __init__(self, base_dir: Path, task: str, *, max_length: int, batch_size: int, device: torch.device) -> None:
        self.task = task
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = device
        with quiet():
            self._tokenizer = AutoTokenizer.from_pretrained(base_dir)
            self._base = _MODELS[task].from_pretrained(base_dir).to(device).eval()
        self._tokenizer.padding_side = "right"  # batches are trimmed off the right end
        if self._tokenizer.pad_token is None:  # GPT-2's has none; padding is masked out of every score
            self._tokenizer.pad_token = self._tokenizer.eos_token or self._tokenizer.unk_token
        self._biases = [(p, p.detach().clone()) for n, p in self._base.named_parameters() if n.endswith("bias")]
        self._model: PeftModel | None = None

    @property
    def label_ids(self) -> dict[str, int]:
        """The classifier's label names (its config's ``label2id``) and their indices."""
        return {str(name): int(index) for name, index in self._base.config.label2id.items()}

    def tokenize(self, texts: Sequence[str]) -> Tokens:
        """``texts`` truncated and right-padded to ``max_length``."""
        encoded = self._tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return Tokens(encoded["input_ids"].long(), encoded["attention_mask"].long())

    def scores(self, directory: Path, tokens: Tokens, labels: torch.Tensor | None) -> Scores:
        """The per-example scores of the adapter in ``directory``: correct (1/0) per sentence against
        ``labels`` (classification), or each sentence's summed next-token loss and its count of
        predicted tokens (causal LM)."""
        model = self._anchored(directory)
        with quiet():
            model.load_adapter(directory, adapter_name=directory.name)
        try:
            model.set_adapter(directory.name)
            return self._scores(model, tokens, labels)
        finally:
            model.set_adapter(ANCHOR)
            model.delete_adapter(directory.name)
            with torch.no_grad():
                for param, saved in self._biases:
                    param.copy_(saved)

    def _anchored(self, directory: Path) -> PeftModel:
        """The base wrapped with the anchor, on the modules the first adapter (in ``directory``) targets."""
        if self._model is None:
            targets = LoraConfig.from_pretrained(directory).target_modules
            config = LoraConfig(
                task_type=_PEFT_TASKS[self.task], r=1, target_modules=targets, bias="none", lora_dropout=0.0
            )
            with quiet():
                self._model = get_peft_model(self._base, config, adapter_name=ANCHOR).eval()
        return self._model

    def _scores(self, model: PeftModel, tokens: Tokens, labels: torch.Tensor | None) -> Scores:
        numerator = torch.zeros(len(tokens), dtype=torch.float64)
        denominator = torch.ones(len(tokens), dtype=torch.float64)
        with torch.inference_mode():
            for index, ids, mask in self._batches(tokens):
                logits = model(input_ids=ids, attention_mask=mask).logits
                if labels is None:
                    numerator[index], denominator[index] = _token_losses(logits, ids, mask)
                else:
                    numerator[index] = (logits.argmax(dim=-1).cpu() == labels[index]).double()
        return Scores(numerator, denominator)

    def _batches(self, tokens: Tokens) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(indices, ids, mask) of batches of sentences of similar length, each trimmed to its longest."""
        order = tokens.attention_mask.sum(dim=1).argsort(stable=True)
        for start in range(0, len(tokens), self.batch_size):
            index = order[start : start + self.batch_size]
            batch = tokens[index]
            length = int(batch.attention_mask.sum(dim=1).max())
            yield index, batch.input_ids[:, :length].to(self.device), batch.attention_mask[:, :length].to(self.device)


def _token_losses(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sentence's summed next-token cross-entropy (float64) and number of predicted tokens."""
    targets = ids[:, 1:]
    losses = F.cross_entropy(logits[:, :-1].double().transpose(1, 2), targets, reduction="none")
    kept = mask[:, 1:].double()
    return (losses * kept).sum(dim=1).cpu(), kept.sum(dim=1).cpu()
