"""``fedbip evaluate`` as one library call: every client's own adapter and each candidate's, scored
on the client's held-out data with one base model, and compared pairwise (``stats``).

OWN and each CANDIDATE are SOURCES that resolve to one adapter per client (a merge's ``--out``,
a simulation's ``OUT/adapters``); DATA holds ``<client>.jsonl`` or ``<client>.csv`` per client, in the
format ``simulate --data`` reads. A sequence-classification adapter is scored by accuracy (the
rows need ``label``), a causal-LM adapter by mean token loss (perplexity is its exponential).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedbip_cli.boundedio import read_json
from fedbip_cli.defaults import CONFIDENCE, EVALUATE_BATCH_SIZE, EVALUATE_MAX_LENGTH, RESAMPLES
from fedbip_cli.errors import AdapterError, SourceError, UsageError
from fedbip_cli.evaluate.scorer import CAUSAL_LM, CLASSIFICATION, TASKS, Scorer
from fedbip_cli.evaluate.stats import Scores, paired_interval, verdict, worse_beyond
from fedbip_cli.options import Progress, resolve_device, start
from fedbip_cli.simulate.data import DATA_SUFFIXES, read_client_rows
from fedbip_cli.simulate.model import Tokens
from fedbip_cli.sources import LORA, resolve_model_dir, resolve_specs

OWN = "own"


@dataclass(frozen=True)
class EvaluateOptions:
    """How adapters are scored and compared."""

    max_length: int = EVALUATE_MAX_LENGTH
    batch_size: int = EVALUATE_BATCH_SIZE
    device: str = "auto"
    resamples: int = RESAMPLES
    confidence: float = CONFIDENCE
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_length", "batch_size", "resamples"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)} must be at least 1")
        if not 0 < self.confidence < 1:
            raise UsageError(f"--confidence {self.confidence} must be in (0, 1)")
        if self.seed < 0:
            raise UsageError(f"--seed {self.seed} must be a non-negative integer")


@dataclass(frozen=True)
class Metric:
    """What is compared: ``accuracy`` (higher is better) or ``loss``, the mean token loss (lower is better)."""

    name: str
    higher_is_better: bool


METRICS = {CLASSIFICATION: Metric("accuracy", True), CAUSAL_LM: Metric("loss", False)}


@dataclass(frozen=True)
class Comparison:
    """One candidate against the client's own adapter: its score, the difference (candidate − own, in
    the metric's units), the difference's interval and the verdict."""

    candidate: str
    score: float
    difference: float
    low: float
    high: float
    verdict: str


@dataclass(frozen=True)
class ClientResult:
    """One client's scores: its own adapter's, each candidate's comparison, and the best of all."""

    client: str
    examples: int
    tokens: int
    own: float
    comparisons: list[Comparison]
    best: str  # OWN or a candidate's name
    adapters: dict[str, Path] = field(repr=False)  # OWN and each candidate -> its adapter directory


@dataclass(frozen=True)
class Evaluation:
    """Every client's result, with what was compared and how."""

    task: str
    metric: Metric
    own: str
    candidates: list[str]
    base: str
    options: EvaluateOptions
    clients: list[ClientResult]

    def worse(self, margin: float) -> list[tuple[str, str]]:
        """(client, candidate) pairs worse than the client's own by more than ``margin`` beyond their interval."""
        better = self.metric.higher_is_better
        return [
            (result.client, c.candidate)
            for result in self.clients
            for c in result.comparisons
            if worse_beyond(c.low, c.high, margin, higher_is_better=better)
        ]


def evaluate(
    own: str,
    candidates: Sequence[str],
    data: Path,
    base: str,
    options: EvaluateOptions | None = None,
    *,
    progress: Progress | None = None,
) -> Evaluation:
    """Score every client's own adapter and each candidate's on ``data/<client>`` and compare them.

    Raises:
        UsageError: no candidate, a set named twice, or a candidate named ``own``.
        SourceError: an adapter set or a client's data file is missing or malformed.
        AdapterError: an adapter of a task that cannot be evaluated, or of mixed tasks.
    """
    options = options or EvaluateOptions()
    _check_names(own, candidates)
    adapters = _adapter_sets(own, candidates)
    files = {client: _data_file(Path(data), client) for client in adapters}
    task = _task(adapters)
    scorer = Scorer(
        resolve_model_dir(base)[0],
        task,
        max_length=options.max_length,
        batch_size=options.batch_size,
        device=resolve_device(options.device),
    )
    advance = start(progress, "evaluate", len(adapters) * (1 + len(candidates)))
    results = []
    for client, paths in adapters.items():
        tokens, labels = _client_data(scorer, files[client])
        scores = {}
        for name, path in paths.items():
            scores[name] = scorer.scores(path, tokens, labels)
            advance(1)
        results.append(_client_result(client, scores, paths, METRICS[task], options))
    return Evaluation(task, METRICS[task], own, list(candidates), base, options, results)


def _check_names(own: str, candidates: Sequence[str]) -> None:
    if not candidates:
        raise UsageError("no CANDIDATE given", hint="name one or more adapter sets to compare with --own")
    if OWN in candidates:  # the name results give the own adapter
        raise UsageError(f"a candidate named {OWN!r}", hint=f"write it as ./{OWN}")
    named = [own, *candidates]
    twice = sorted({c for c in named if named.count(c) > 1})
    if twice:
        raise UsageError(f"{', '.join(twice)} named twice among --own and the candidates", hint="name each set once")


def _adapter_sets(own: str, candidates: Sequence[str]) -> dict[str, dict[str, Path]]:
    """client -> {OWN: dir, candidate: dir, ...}, for every client of ``own``; each candidate must cover them all."""
    sets = {OWN: _adapters(own), **{c: _adapters(c) for c in candidates}}
    for name, found in sets.items():
        missing = sorted(set(sets[OWN]) - set(found))
        if missing:
            raise SourceError(
                f"no adapter for client(s) {', '.join(missing)} of --own {own}",
                where=name,
                hint="a candidate needs one adapter per client of --own, in a sub-directory named after the client",
            )
    return {client: {name: found[client] for name, found in sets.items()} for client in sets[OWN]}


def _adapters(spec: str) -> dict[str, Path]:
    """One SOURCES entry's adapters by client name."""
    found = {}
    for _, group in resolve_specs([spec]):
        for source in group:
            if source.kind != LORA:
                raise SourceError(
                    "a full fine-tuned model, not an adapter",
                    where=str(source.origin),
                    hint="evaluate compares PEFT adapters of one base",
                )
            found[source.name] = source.path
    return found


def _data_file(directory: Path, client: str) -> Path:
    found = [directory / f"{client}{suffix}" for suffix in DATA_SUFFIXES if (directory / f"{client}{suffix}").exists()]
    if len(found) != 1:
        problem = "both a .jsonl and a .csv file" if found else "no .jsonl or .csv file"
        raise SourceError(
            f"{problem} for client {client}",
            where=str(directory),
            hint="--data DIR holds one <client>.jsonl or <client>.csv of held-out rows per client",
        )
    return found[0]


def _task(adapters: dict[str, dict[str, Path]]) -> str:
    """The task every adapter was trained for (adapter_config.json's ``task_type``)."""
    tasks = {}
    for paths in adapters.values():
        for path in paths.values():
            config = read_json(path / "adapter_config.json", error=AdapterError, what="an adapter_config.json")
            kind = config.get("task_type") if isinstance(config, dict) else None
            if kind not in TASKS:
                raise AdapterError(
                    f"task_type {kind!r} in adapter_config.json; evaluate scores {', '.join(TASKS)}",
                    where=str(path),
                    hint="save the adapter with LoraConfig(task_type='SEQ_CLS') or 'CAUSAL_LM'",
                )
            tasks.setdefault(TASKS[kind], path)
    if len(tasks) > 1:
        raise AdapterError(f"adapters of different tasks: {', '.join(f'{t} ({p})' for t, p in tasks.items())}")
    return next(iter(tasks))


def _client_data(scorer: Scorer, path: Path) -> tuple[Tokens, torch.Tensor | None]:
    """A client's held-out sentences, tokenized, and (classification) their label indices."""
    classify = scorer.task == CLASSIFICATION
    rows = read_client_rows(path, labelled=classify)
    if not rows:
        raise SourceError("no rows; evaluate needs at least one held-out example", where=str(path))
    tokens = scorer.tokenize([text for _, text, _ in rows])
    if not classify:
        return tokens, None
    ids = scorer.label_ids
    for line, _, label in rows:
        if label not in ids:
            raise SourceError(
                f"label {label!r} is not one of the base's labels {sorted(ids)}",
                where=f"{path}:{line}",
                hint="the base's config.json (label2id) names the labels its classifier predicts",
            )
    return tokens, torch.tensor([ids[label] for _, _, label in rows])


def _client_result(
    client: str, scores: dict[str, Scores], paths: dict[str, Path], metric: Metric, options: EvaluateOptions
) -> ClientResult:
    """Compare each candidate's ``scores`` with OWN's; the best is the highest accuracy (the lowest
    loss), OWN first among equals, then the candidates in the order given."""
    own = scores[OWN]
    if not own.denominator.sum() > 0:
        raise SourceError(f"no predicted tokens for client {client}", hint="give sentences of at least 2 tokens")
    comparisons = []
    for name, candidate in scores.items():
        if name == OWN:
            continue
        # The same draws for every candidate of a client: their intervals are comparable.
        generator = torch.Generator().manual_seed(options.seed)
        low, high = paired_interval(
            own, candidate, resamples=options.resamples, confidence=options.confidence, generator=generator
        )
        difference = candidate.value - own.value
        found = verdict(low, high, higher_is_better=metric.higher_is_better)
        comparisons.append(Comparison(name, candidate.value, difference, low, high, found))
    sign = 1.0 if metric.higher_is_better else -1.0
    best = max(scores, key=lambda name: sign * scores[name].value)  # max keeps the first of equals
    return ClientResult(
        client, len(own.numerator), int(own.denominator.sum()), own.value, comparisons, best, dict(paths)
    )
