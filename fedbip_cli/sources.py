"""Parse and resolve SOURCES: adapter directories, ``@FILE`` lists and ``hf://`` Hub references.

A client directory is a PEFT adapter (``adapter_config.json``, kind ``lora``) or a fine-tuned model
in the Hugging Face layout (``config.json`` beside its weights, kind ``full``).

This is the only module that imports ``huggingface_hub``. Hub sources are fetched with
``snapshot_download`` into the ordinary Hub cache, which gives revision pinning, ``HF_HUB_OFFLINE``
and ``HF_TOKEN`` for free. ``huggingface_hub`` reads its environment once, at import; the cache
location and offline mode are read here again at each call, so that a change to the environment
after import (tests, notebooks) is honoured.
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from huggingface_hub.utils import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    validate_repo_id,
)

from fedbip_cli.errors import SourceError

# The .bin weights are fetched only so that adapters.py can refuse them with a clear message.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
# A fine-tuned model's config and safetensors weights (one file, or shards and their index).
CHECKPOINT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors")
HUB_PREFIX = "hf://"
LORA, FULL = "lora", "full"

_CONFIG = ADAPTER_FILES[0]
_MODEL_CONFIG = CHECKPOINT_FILES[0]
_FILES = {LORA: ADAPTER_FILES, FULL: CHECKPOINT_FILES}
_HUB_FORM = "write hf://owner/repo[@revision][/subfolder]; percent-encode '/' in a revision (refs%2Fpr%2F1)"
_FORMS = (
    "a SOURCE is an adapter or fine-tuned model directory, a directory of them, @FILE (a list of sources), "
    "or hf://owner/repo[@revision][/subfolder]"
)
_TRAILING_COMMENT = re.compile(r"\s+#.*$")
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HubRef:
    """A Hub reference ``hf://owner/repo[@revision][/subfolder]``; ``str()`` writes it back.

    A revision that contains ``/`` (``refs/pr/1``) is percent-encoded in the text form, as
    ``HfFileSystem`` does. Invalid fields raise ``SourceError`` at construction.
    """

    repo_id: str
    revision: str | None = None
    subfolder: str | None = None

    def __post_init__(self) -> None:
        owner, slash, name = self.repo_id.partition("/")
        if not (owner and slash and name):
            problem = f"expected owner/repo after {HUB_PREFIX}"
        elif self.revision == "":
            problem = "empty revision after '@'"
        elif self.subfolder is not None and any(p in ("", ".", "..") for p in self.subfolder.split("/")):
            problem = f"invalid subfolder {self.subfolder!r}: empty, '.' and '..' parts are not allowed"
        else:
            try:
                validate_repo_id(self.repo_id)
                return
            except HFValidationError as exc:
                problem = str(exc)
        raise SourceError(problem, where=str(self), hint=_HUB_FORM)

    def __str__(self) -> str:
        revision = "" if self.revision is None else "@" + quote(self.revision, safe="")
        subfolder = "" if self.subfolder is None else "/" + self.subfolder
        return f"{HUB_PREFIX}{self.repo_id}{revision}{subfolder}"

    @classmethod
    def parse(cls, text: str) -> HubRef:
        """Parse ``hf://owner/repo[@revision][/subfolder]``.

        Raises:
            SourceError: ``text`` is not of that form (no prefix, no repo name, empty parts).
        """
        if not text.startswith(HUB_PREFIX):
            raise SourceError(f"not a Hub reference (no {HUB_PREFIX})", where=text, hint=_HUB_FORM)
        owner, _, rest = text[len(HUB_PREFIX) :].partition("/")
        repo, slash, subfolder = rest.partition("/")
        name, at, revision = repo.partition("@")
        try:
            return cls(f"{owner}/{name}", unquote(revision) if at else None, subfolder if slash else None)
        except SourceError as exc:
            raise SourceError(exc.message, where=text, hint=exc.hint) from None


@dataclass(frozen=True)
class ResolvedSource:
    """One client: its name, its local directory, its origin and its kind.

    ``origin`` identifies the input in the manifest (an ``hf://`` reference or the local path);
    ``revision`` is the commit hash a Hub source resolved to, ``None`` for local sources; ``kind``
    is ``lora`` (the directory holds ``adapter_config.json``) or ``full`` (a fine-tuned model:
    ``config.json`` and its weights).
    """

    name: str
    path: Path
    origin: str
    revision: str | None = None
    kind: str = LORA


def resolve_sources(specs: Sequence[str], *, base_dir: Path | None = None) -> list[ResolvedSource]:
    """Resolve SOURCES to one ``ResolvedSource`` per client, in the order given.

    Args:
        specs: client directories (adapters or fine-tuned models), directories of them (expanded to
            their immediate sub-directories holding ``adapter_config.json`` or ``config.json``,
            sorted by name), ``@FILE`` lists and ``hf://`` references.
        base_dir: directory that relative paths are taken from (default: the working directory).

    Returns:
        The clients, named after their directories (or Hub repository / subfolder).

    Raises:
        SourceError: a source is missing, malformed or unreachable, or two clients share a name.
    """
    return [source for _, group in resolve_specs(specs, base_dir=base_dir) for source in group]


def resolve_specs(specs: Sequence[str], *, base_dir: Path | None = None) -> list[tuple[str, list[ResolvedSource]]]:
    """Like ``resolve_sources``, but keeps which SOURCE each client came from: ``[(spec, clients), ...]``."""
    base = Path.cwd() if base_dir is None else base_dir
    resolved = [(spec, _resolve(spec, base, ())) for spec in specs]
    _check_unique([source for _, group in resolved for source in group])
    return resolved


def pinned_spec(spec: str, revision: str | None, *, base_dir: Path | None = None) -> str:
    """``spec`` as it resolves the same everywhere: a Hub reference at ``revision`` (a commit), a path made absolute.

    Args:
        spec: one SOURCE (or ``--base``) as the user gave it.
        revision: the commit a Hub reference resolved to.
        base_dir: directory that a relative path was taken from (default: the working directory).
    """
    if spec.startswith(HUB_PREFIX):
        ref = HubRef.parse(spec)
        return str(HubRef(ref.repo_id, revision or ref.revision, ref.subfolder))
    base = Path.cwd() if base_dir is None else base_dir
    if spec.startswith("@"):
        return "@" + str(_local_path(spec[1:], base))
    return str(_local_path(spec, base))


def resolve_model_dir(
    spec: str,
    *,
    allow_patterns: Sequence[str] = ("*.json", "*.safetensors", "*.safetensors.index.json"),
    base_dir: Path | None = None,
) -> tuple[Path, str | None]:
    """Resolve a model (``--base``) given as a local directory or an ``hf://`` reference.

    Args:
        spec: a directory, or ``hf://owner/repo[@revision][/subfolder]``.
        allow_patterns: the files to fetch from the Hub, relative to the subfolder.
        base_dir: directory that a relative path is taken from (default: the working directory).

    Returns:
        The local directory (absolute) and the commit hash for a Hub model, else ``None``.

    Raises:
        SourceError: the directory does not exist, or the Hub reference cannot be resolved.
    """
    if spec.startswith(HUB_PREFIX):
        ref = HubRef.parse(spec)
        prefix = f"{ref.subfolder}/" if ref.subfolder else ""
        snapshot, root = _hub_dir(ref, [prefix + pattern for pattern in allow_patterns], ref.revision)
        return root.resolve(), snapshot.name
    path = _local_path(spec, Path.cwd() if base_dir is None else base_dir)
    if not path.is_dir():
        problem = "not a directory" if path.exists() else "no such file or directory"
        hint = "expected a model directory or hf://owner/repo[@revision][/subfolder]"
        raise SourceError(problem, where=spec, hint=hint)
    return path.resolve(), None


def _resolve(spec: str, base: Path, lists: tuple[Path, ...]) -> list[ResolvedSource]:
    """Resolve one SOURCE; ``lists`` are the @lists being read (to detect cycles)."""
    if spec.startswith("@"):
        return _resolve_list(_local_path(spec[1:], base).resolve(), lists)
    if spec.startswith(HUB_PREFIX):
        return _resolve_hub(HubRef.parse(spec))
    path = _local_path(spec, base)
    if not path.exists():
        raise SourceError("no such file or directory", where=spec, hint=_FORMS)
    if not path.is_dir():
        raise SourceError("not a directory", where=spec, hint=_FORMS)
    return [ResolvedSource(d.name, d.resolve(), str(d.resolve()), kind=kind) for d, kind in _client_dirs(path, spec)]


def _resolve_list(list_file: Path, lists: tuple[Path, ...]) -> list[ResolvedSource]:
    """Resolve every source named in an @list file, relative to the file's directory."""
    if list_file in lists:
        # Each enclosing list adds its file:line to the message, which spells out the cycle.
        raise SourceError("this @list includes itself", where=str(list_file), hint="remove the cycle")
    try:
        text = list_file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SourceError("list file is not UTF-8 text", where=str(list_file), hint=_FORMS) from None
    except OSError as exc:
        hint = "@FILE names a text file of sources, one a line"
        raise SourceError(f"cannot read list file: {exc.strerror}", where=str(list_file), hint=hint) from None
    sources: list[ResolvedSource] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        spec = _TRAILING_COMMENT.sub("", line).strip()
        if not spec or spec.startswith("#"):
            continue
        try:
            sources += _resolve(spec, list_file.parent, (*lists, list_file))
        except SourceError as exc:
            raise SourceError(str(exc), where=f"{list_file}:{lineno}", hint=exc.hint) from exc
    return sources


def _resolve_hub(ref: HubRef) -> list[ResolvedSource]:
    """Fetch the client(s) of a Hub reference: configs first, then weights of the chosen directories only."""
    prefix = f"{ref.subfolder}/" if ref.subfolder else ""
    configs = [pattern for name in (_CONFIG, _MODEL_CONFIG) for pattern in (prefix + name, f"{prefix}*/{name}")]
    snapshot, root = _hub_dir(ref, configs, ref.revision)
    commit = snapshot.name
    refs = [
        (ref if d == root else HubRef(ref.repo_id, ref.revision, d.relative_to(snapshot).as_posix()), kind)
        for d, kind in _client_dirs(root, str(ref))
    ]
    weights = [f"{r.subfolder}/{f}" if r.subfolder else f for r, kind in refs for f in _FILES[kind][1:]]
    _snapshot(ref, weights, commit)  # pinned to the commit the configs came from
    return [
        ResolvedSource(_hub_name(r), (snapshot / (r.subfolder or "")).resolve(), str(r), commit, kind)
        for r, kind in refs
    ]


def _hub_name(ref: HubRef) -> str:
    """Client name of a Hub adapter: the last part of its subfolder, else the repository name."""
    return (ref.subfolder or ref.repo_id).rsplit("/", 1)[-1]


def _hub_dir(ref: HubRef, allow_patterns: list[str], revision: str | None) -> tuple[Path, Path]:
    """Snapshot ``ref`` and return (snapshot directory, the subfolder in it that ``ref`` names)."""
    snapshot = _snapshot(ref, allow_patterns, revision)
    root = snapshot / ref.subfolder if ref.subfolder else snapshot
    if not root.is_dir():
        raise SourceError(
            f"no folder {ref.subfolder!r} in the repository at commit {snapshot.name}",
            where=str(ref),
            hint="check the subfolder and the revision",
        )
    return snapshot, root


def _snapshot(ref: HubRef, allow_patterns: list[str], revision: str | None) -> Path:
    """``snapshot_download`` into the Hub cache, with its errors turned into ``SourceError``."""
    cache_dir = _cache_dir()
    with _hub_errors(ref, cache_dir):
        folder = snapshot_download(
            ref.repo_id,
            revision=revision,
            allow_patterns=allow_patterns,
            cache_dir=cache_dir,
            local_files_only=_offline(),
        )
    _log.debug("%s %s -> %s", ref, allow_patterns, folder)
    return Path(folder)


@contextmanager
def _hub_errors(ref: HubRef, cache_dir: str | None) -> Iterator[None]:
    """Map ``huggingface_hub`` failures to one ``SourceError`` each, with a hint."""
    where = str(ref)
    login = "for a private or gated repository set HF_TOKEN or run `hf auth login`"
    try:
        yield
    except GatedRepoError as exc:
        raise SourceError("gated repository: access not granted", where=where, hint=login) from exc
    except RepositoryNotFoundError as exc:
        raise SourceError("repository not found", where=where, hint=f"check the name; {login}") from exc
    except RevisionNotFoundError as exc:
        hint = "check the branch, tag or commit"
        raise SourceError(f"revision {ref.revision!r} not found", where=where, hint=hint) from exc
    except LocalEntryNotFoundError as exc:  # also IncompleteSnapshotError: a partial download
        what = "repository" if ref.revision is None else f"revision {ref.revision!r}"
        cache = cache_dir or hub_constants.HF_HUB_CACHE
        reason = "HF_HUB_OFFLINE is set" if _offline() else "the Hub could not be reached"
        raise SourceError(
            f"{what} not in the local Hub cache {cache} (or only partly downloaded), and {reason}",
            where=where,
            hint="run once online, or check HF_HUB_CACHE / HF_HOME",
        ) from exc
    except HfHubHTTPError as exc:
        raise SourceError(f"Hub request failed: {exc}", where=where, hint=f"retry later; {login}") from exc
    except OSError as exc:
        hint = "check that HF_HUB_CACHE is writable"
        raise SourceError(f"Hub cache error: {exc}", where=where, hint=hint) from exc


def _cache_dir() -> str | None:
    """The Hub cache the environment names now, or ``None`` for huggingface_hub's own default."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return os.path.expandvars(os.path.expanduser(os.environ[variable]))
    home = os.environ.get("HF_HOME")
    return os.path.join(os.path.expandvars(os.path.expanduser(home)), "hub") if home else None


def _offline() -> bool:
    """Offline if huggingface_hub was imported offline, or the environment says so now."""
    variables = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    now = any(os.environ.get(v, "").upper() in hub_constants.ENV_VARS_TRUE_VALUES for v in variables)
    return hub_constants.HF_HUB_OFFLINE or now


def _local_path(text: str, base: Path) -> Path:
    """``text`` as an absolute, normalised path (``~`` expanded, relative to ``base``), links kept."""
    return Path(os.path.normpath(base / Path(text).expanduser()))


def _kind(directory: Path) -> str | None:
    """``lora`` for an adapter directory, ``full`` for a fine-tuned model directory, else None."""
    if (directory / _CONFIG).is_file():
        return LORA
    return FULL if (directory / _MODEL_CONFIG).is_file() else None


def _client_dirs(directory: Path, where: str) -> list[tuple[Path, str]]:
    """``directory`` itself if it is a client, else its visible sub-directories that are, by name; with their kind."""
    kind = _kind(directory)
    if kind is not None:
        return [(directory, kind)]
    children = sorted(
        ((c, _kind(c)) for c in directory.iterdir() if not c.name.startswith(".")),
        key=lambda item: item[0].name,
    )
    clients = [(c, k) for c, k in children if k is not None]
    if not clients:
        raise SourceError(
            f"no {_CONFIG} (adapter) nor {_MODEL_CONFIG} (fine-tuned model) here nor in any sub-directory",
            where=where,
            hint=f"expected PEFT adapter directories (each with {_CONFIG}) or fine-tuned model directories "
            f"({_MODEL_CONFIG} + model.safetensors) inside it",
        )
    return clients


def _check_unique(sources: list[ResolvedSource]) -> None:
    """Refuse two clients of the same name: outputs are written to OUT/<name>/."""
    origins: dict[str, list[str]] = defaultdict(list)
    for source in sources:
        origins[source.name].append(source.origin)
    duplicates = [f"{name!r} ({', '.join(found)})" for name, found in origins.items() if len(found) > 1]
    if duplicates:
        raise SourceError(
            "duplicate client names: " + "; ".join(duplicates),
            where="SOURCES",
            hint="client names come from directory names: rename a directory, or use separate runs",
        )
