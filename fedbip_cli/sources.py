"""Parse and resolve SOURCES: adapter directories, ``@FILE`` lists and ``hf://`` Hub references.

A client directory is a PEFT adapter (``adapter_config.json``, kind ``lora``) or a fine-tuned model
in the Hugging Face layout (``config.json`` beside its weights, kind ``full``).

This is the only module that imports ``huggingface_hub``. Hub sources are fetched with
``snapshot_download`` into the ordinary Hub cache, which gives revision pinning, ``HF_HUB_OFFLINE``
and ``HF_TOKEN`` for free: their configs first, which resolve the revision to a commit, then (at
that commit) their weights, so that a caller can compare the commits with a lock file in between.
A base model whose shapes are all that is needed (``model_shapes``) is read from its safetensors
headers only: from the cache when the files are there, else by HTTP range requests of the header
bytes. ``huggingface_hub`` reads its environment once, at import; the cache location and offline
mode are read here again at each call, so that a change to the environment after import (tests,
notebooks) is honoured.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote

from huggingface_hub import constants as hub_constants
from huggingface_hub import hf_hub_url, snapshot_download
from huggingface_hub.utils import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    build_hf_headers,
    get_session,
    hf_raise_for_status,
    validate_repo_id,
)

from fedbip_cli.boundedio import parse_json, read_json, read_text
from fedbip_cli.errors import SourceError
from fedbip_cli.shown import shown

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
_WEIGHTS, _INDEX = CHECKPOINT_FILES[1:3]
_SAFETENSORS_HINT = f"--base must be a model saved with safetensors: {_WEIGHTS}, or shards listed in {_INDEX}"
_MAX_HEADER = 100_000_000  # safetensors' own limit on the size of a header
MAX_LIST_DEPTH = 8  # @lists inside @lists: each level holds a file open and a frame of the resolver
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

    ``origin`` identifies the input in the manifest and cards as the user gave it: an ``hf://``
    reference, or the local path as written on the command line, in a config file or an @list (a
    client found inside a given directory: that path joined with its sub-directory), never resolved
    to an absolute path that would publish the merging machine's layout;
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


def resolve_specs(
    specs: Sequence[str], *, base_dir: Path | None = None, weights: bool = True
) -> list[tuple[str, list[ResolvedSource]]]:
    """Like ``resolve_sources``, but keeps which SOURCE each client came from: ``[(spec, clients), ...]``.

    With ``weights=False`` a Hub client's directory holds only its config so far (its ``revision``
    is final): ``fetch_weights`` fetches the rest, at that commit, once the caller has checked it.
    """
    base = Path.cwd() if base_dir is None else base_dir
    resolved = [(spec, _resolve(spec, base, ())) for spec in specs]
    clients = [source for _, group in resolved for source in group]
    _check_unique(clients)
    if weights:
        fetch_weights(clients)
    return resolved


def fetch_weights(sources: Iterable[ResolvedSource]) -> None:
    """Fetch the weights of the Hub clients among ``sources`` (resolved with ``weights=False``),
    at the commit their configs came from; one Hub call per repository and commit. Local clients
    need nothing.

    Raises:
        SourceError: a weight file cannot be fetched.
    """
    repos: dict[tuple[str, str], tuple[HubRef, list[str]]] = {}
    for source in sources:
        if source.revision is None:
            continue
        ref = HubRef.parse(source.origin)
        _, patterns = repos.setdefault((ref.repo_id, source.revision), (HubRef(ref.repo_id, ref.revision), []))
        patterns += [_in(ref, name) for name in _FILES[source.kind][1:]]
    for (_, commit), (repo, patterns) in repos.items():
        _snapshot(repo, patterns, commit)


def pinned_spec(spec: str, revision: str | None) -> str:
    """``spec`` for a reproducing command: a Hub reference pinned at ``revision`` (a commit); a local
    path or @list as given (relative paths are from where the merge ran), never made absolute.

    Args:
        spec: one SOURCE (or ``--base``) as the user gave it.
        revision: the commit a Hub reference resolved to.
    """
    if spec.startswith(HUB_PREFIX):
        ref = HubRef.parse(spec)
        return str(HubRef(ref.repo_id, revision or ref.revision, ref.subfolder))
    return spec


def resolve_model_dir(
    spec: str,
    *,
    allow_patterns: Sequence[str] = ("*.json", "*.safetensors", "*.safetensors.index.json"),
    base_dir: Path | None = None,
    revision: str | None = None,
) -> tuple[Path, str | None]:
    """Resolve a model (``--base``) given as a local directory or an ``hf://`` reference.

    Args:
        spec: a directory, or ``hf://owner/repo[@revision][/subfolder]``.
        allow_patterns: the files to fetch from the Hub, relative to the subfolder.
        base_dir: directory that a relative path is taken from (default: the working directory).
        revision: the commit to fetch a Hub model at (``resolve_revision``), instead of ``spec``'s revision.

    Returns:
        The local directory (absolute) and the commit hash for a Hub model, else ``None``.

    Raises:
        SourceError: the directory does not exist, or the Hub reference cannot be resolved.
    """
    if spec.startswith(HUB_PREFIX):
        ref = HubRef.parse(spec)
        snapshot, root = _hub_dir(ref, [_in(ref, pattern) for pattern in allow_patterns], revision or ref.revision)
        return root.resolve(), snapshot.name
    path = _local_path(spec, Path.cwd() if base_dir is None else base_dir)
    if not path.is_dir():
        problem = "not a directory" if path.exists() else "no such file or directory"
        hint = "expected a model directory or hf://owner/repo[@revision][/subfolder]"
        raise SourceError(problem, where=spec, hint=hint)
    return path.resolve(), None


# A Hub model id as peft's base_model_name_or_path and from_pretrained take it: owner/name.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def model_reference(spec: str, base_dir: Path) -> str:
    """A model (``--base``, or an adapter's ``base_model_name_or_path``) as fedbip reads it: as peft does,
    a local directory when one exists at ``spec``, else an ``owner/name`` Hub id as ``hf://owner/name``
    (resolved through the Hugging Face cache; ``HF_HUB_OFFLINE=1`` keeps it offline); ``hf://``
    references and anything else unchanged."""
    if spec.startswith(HUB_PREFIX) or _local_path(spec, base_dir).exists() or not _HUB_ID.fullmatch(spec):
        return spec
    return HUB_PREFIX + spec


def resolve_revision(spec: str) -> str | None:
    """The commit an ``hf://`` model resolves to, fetching only its JSON files (config, index); None for a path.

    Raises:
        SourceError: the Hub reference cannot be resolved.
    """
    if not spec.startswith(HUB_PREFIX):
        return None
    ref = HubRef.parse(spec)
    return _hub_dir(ref, [_in(ref, "*.json")], ref.revision)[0].name


@dataclass(frozen=True)
class ModelShapes:
    """The shape of every tensor of a model, from its safetensors headers; ``where`` names it in messages.

    ``dtypes`` holds each tensor's safetensors dtype name, ``files`` the weight file (relative to
    ``directory``, the model's local directory or Hub snapshot folder) whose header listed it.
    """

    where: str
    revision: str | None
    shapes: dict[str, list[int]]
    dtypes: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    directory: Path | None = None


def _shapes_from(
    where: str, revision: str | None, directory: Path, entries: dict[str, dict[str, tuple[list[int], str]]]
) -> ModelShapes:
    """A ``ModelShapes`` from each weight file's header entries (tensor -> (shape, dtype))."""
    shapes, dtypes, files = {}, {}, {}
    for file, header in entries.items():
        for name, (shape, dtype) in header.items():
            shapes[name], dtypes[name], files[name] = shape, dtype, file
    return ModelShapes(where, revision, shapes, dtypes, files, directory)


def model_shapes(spec: str, *, revision: str | None = None, base_dir: Path | None = None) -> ModelShapes:
    """The shapes of a model's tensors (``--base``), read from its safetensors headers and never its weights.

    A local directory: the headers of its ``*.safetensors``. ``hf://``: its JSON files are fetched
    (at ``revision``, a commit, when given), then the headers of ``model.safetensors`` or of the
    shards its index lists are read from the Hub cache where the files are there, else by two HTTP
    range requests each (the header's 8-byte length, then the header): no weight byte is fetched.

    Raises:
        SourceError: the model cannot be resolved, has no safetensors weights, or a header is corrupt.
    """
    if not spec.startswith(HUB_PREFIX):
        directory = resolve_model_dir(spec, base_dir=base_dir)[0]
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            hint = "--base must be a Hugging Face model directory saved with safetensors"
            raise SourceError("no *.safetensors weights found", where=str(directory), hint=hint)
        return _shapes_from(str(directory), None, directory, {f.name: _file_entries(f) for f in files})
    ref = HubRef.parse(spec)
    snapshot, root = _hub_dir(ref, [_in(ref, "*.json")], revision or ref.revision)
    entries = {}
    for name in _weight_names(root, spec):
        cached = root / name
        entries[name] = _file_entries(cached) if cached.is_file() else _remote_entries(ref, snapshot.name, name)
    return _shapes_from(spec, snapshot.name, root, entries)


def _weight_names(root: Path, where: str) -> list[str]:
    """A model's safetensors files: the shards its index lists, else ``model.safetensors``."""
    index = root / _INDEX
    if not index.is_file():
        return [_WEIGHTS]
    data = read_json(index, error=SourceError, what=_INDEX)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
        hint = _SAFETENSORS_HINT
        raise SourceError(f'{_INDEX}: expected {{"weight_map": {{tensor: file, ...}}}}', where=where, hint=hint)
    return sorted(set(weight_map.values()))


def _file_entries(path: Path) -> dict[str, tuple[list[int], str]]:
    """Tensor shapes and dtypes from the header of a local safetensors file."""
    try:
        with open(path, "rb") as f:

            def read(start: int, length: int) -> bytes:
                f.seek(start)
                return f.read(length)

            return _header_entries(read, str(path))
    except OSError as exc:
        raise SourceError(f"cannot read the weights: {exc.strerror}", where=str(path), hint=_SAFETENSORS_HINT) from None


def _remote_entries(ref: HubRef, commit: str, name: str) -> dict[str, tuple[list[int], str]]:
    """Tensor shapes and dtypes from the header of a safetensors file on the Hub, fetched by range requests of the header only."""
    where = f"{HubRef(ref.repo_id, commit, ref.subfolder)}: {name}"
    if _offline():
        cache = _cache_dir() or hub_constants.HF_HUB_CACHE
        raise SourceError(
            f"{name} is not in the local Hub cache {cache}, and HF_HUB_OFFLINE is set",
            where=where,
            hint="run once online (only the header of the weights is read), or check HF_HUB_CACHE / HF_HOME",
        )
    url = hf_hub_url(ref.repo_id, _in(ref, name), revision=commit)
    headers = build_hf_headers(library_name="fedbip")

    def read(start: int, length: int) -> bytes:
        try:
            response = get_session().get(
                url,
                headers={**headers, "Range": f"bytes={start}-{start + length - 1}"},
                timeout=hub_constants.HF_HUB_DOWNLOAD_TIMEOUT,
            )
        except Exception as exc:  # the session's own transport errors (httpx's are no OSError): no connection, timeout
            hint = "check the connection and HF_ENDPOINT, or run once where the Hub can be reached"
            raise SourceError(f"the Hub could not be reached: {exc}", where=where, hint=hint) from exc
        hf_raise_for_status(response)
        skip = 0 if response.status_code == 206 else start  # 200: a server that ignores ranges sent the whole file
        return response.content[skip : skip + length]

    with _hub_errors(ref, _cache_dir()):
        try:
            return _header_entries(read, where)
        except EntryNotFoundError:
            raise SourceError(
                f"no {name} in the repository at commit {commit}", where=str(ref), hint=_SAFETENSORS_HINT
            ) from None


def _header_entries(read: Callable[[int, int], bytes], where: str) -> dict[str, tuple[list[int], str]]:
    """Tensor shapes and dtypes from a safetensors header: 8 bytes giving its length n, then n bytes of JSON.

    ``read(start, length)`` returns that many bytes of the file from ``start`` (fewer at its end).
    """

    def corrupt(problem: str) -> SourceError:
        return SourceError(
            f"corrupt or truncated safetensors file: {problem}", where=where, hint="re-download or re-save it"
        )

    prefix = read(0, 8)
    size = int.from_bytes(prefix, "little")
    if len(prefix) < 8 or not 2 <= size <= _MAX_HEADER:
        raise corrupt(f"header length {size} out of range")
    raw = read(8, size)
    if len(raw) < size:
        raise corrupt(f"the file ends {len(raw)} bytes into a header of {size}")
    header = parse_json(raw, where=where, error=SourceError, what="the safetensors header")
    if not isinstance(header, dict):
        raise corrupt("the header is not a JSON object")
    entries = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(_dimension(d) for d in shape) or not isinstance(dtype, str):
            raise corrupt(f"tensor {name!r}: expected a dtype (string) and a shape (list of sizes)")
        entries[name] = (shape, dtype)
    return entries


def _dimension(value: object) -> bool:
    """A tensor dimension in a header: a non-negative integer that fits a u64."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


def _resolve(spec: str, base: Path, lists: tuple[Path, ...]) -> list[ResolvedSource]:
    """Resolve one SOURCE; ``lists`` are the @lists being read (to detect cycles)."""
    if spec.startswith("@"):
        return _resolve_list(_local_path(spec[1:], base), base, lists)
    if spec.startswith(HUB_PREFIX):
        return _resolve_hub(HubRef.parse(spec))
    path = _local_path(spec, base)
    if not path.exists():
        raise SourceError("no such file or directory", where=spec, hint=_FORMS)
    if not path.is_dir():
        raise SourceError("not a directory", where=spec, hint=_FORMS)
    return [
        ResolvedSource(name, d.resolve(), _as_given(spec, path, d), kind=kind)
        for d, kind, name in _client_dirs(path, spec)
    ]


def _as_given(spec: str, path: Path, directory: Path) -> str:
    """A client's local origin as the user gave it: ``spec``, joined with the client's sub-directory of it."""
    if directory == path:
        return spec
    return posixpath.join(spec, directory.relative_to(path).as_posix())


def _resolve_list(list_file: Path, base: Path, lists: tuple[Path, ...]) -> list[ResolvedSource]:
    """Resolve every source named in an @list file, relative to the file's directory (or to ``base``
    for a pipe, ``@<(find ...)``, whose /dev/fd/N link names no directory); ``lists`` are the lists
    being read, resolved."""
    resolved = list_file.resolve()
    if resolved in lists:
        # Each enclosing list adds its file:line to the message, which spells out the cycle.
        raise SourceError("this @list includes itself", where=str(list_file), hint="remove the cycle")
    if len(lists) >= MAX_LIST_DEPTH:
        raise SourceError(
            f"@lists nested more than {MAX_LIST_DEPTH} deep",
            where=str(list_file),
            hint="name the sources of the innermost lists in an outer one",
        )
    text = read_text(list_file, error=SourceError, what="the @list file", pipes=True)
    sources: list[ResolvedSource] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        spec = _TRAILING_COMMENT.sub("", line).strip()
        if not spec or spec.startswith("#"):
            continue
        try:
            sources += _resolve(spec, resolved.parent if resolved.exists() else base, (*lists, resolved))
        except SourceError as exc:
            raise SourceError(str(exc), where=f"{list_file}:{lineno}", hint=exc.hint) from None
    return sources


def _resolve_hub(ref: HubRef) -> list[ResolvedSource]:
    """The client(s) of a Hub reference, from their configs (fetched); ``fetch_weights`` fetches the rest."""
    configs = [_in(ref, pattern) for name in (_CONFIG, _MODEL_CONFIG) for pattern in (name, f"*/{name}")]
    snapshot, root = _hub_dir(ref, configs, ref.revision)
    sources = []
    for directory, kind, _ in _client_dirs(root, str(ref)):
        client = (
            ref if directory == root else HubRef(ref.repo_id, ref.revision, directory.relative_to(snapshot).as_posix())
        )
        sources.append(ResolvedSource(_hub_name(client), directory.resolve(), str(client), snapshot.name, kind))
    return sources


def _in(ref: HubRef, pattern: str) -> str:
    """A file name or pattern inside ``ref``'s subfolder, as a repository path."""
    return f"{ref.subfolder}/{pattern}" if ref.subfolder else pattern


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
    # exists(), not is_file(): a config that is a directory or a device makes a client whose reading
    # then fails with the reason, instead of a client silently left out.
    if (directory / _CONFIG).exists():
        return LORA
    return FULL if (directory / _MODEL_CONFIG).exists() else None


def _client_dirs(directory: Path, where: str) -> list[tuple[Path, str, str]]:
    """``directory`` itself if it is a client, else its visible sub-directories that are; each with its
    kind and its client name.

    A sub-directory that is no client but holds exactly one adapter directory is that adapter, named
    after the sub-directory: peft's ``save_pretrained`` writes an adapter that is not called
    ``default`` under a directory of its adapter name (``client3/my_adapter/adapter_config.json``).
    """
    kind = _kind(directory)
    if kind is not None:
        return [(directory, kind, directory.name)]
    clients = []
    for child in sorted((c for c in directory.iterdir() if not c.name.startswith(".")), key=lambda c: c.name):
        kind = _kind(child)
        if kind is not None:
            clients.append((child, kind, child.name))
        elif child.is_dir() and len(named := _named_adapters(child)) == 1:
            clients.append((named[0], LORA, child.name))
    if not clients:
        raise SourceError(
            f"no {_CONFIG} (adapter) nor {_MODEL_CONFIG} (fine-tuned model) here nor in any sub-directory",
            where=where,
            hint=f"expected PEFT adapter directories (each with {_CONFIG}) or fine-tuned model directories "
            f"({_MODEL_CONFIG} + model.safetensors) inside it",
        )
    return clients


def _named_adapters(directory: Path) -> list[Path]:
    """The adapter directories directly inside ``directory`` (peft's named-adapter layout)."""
    return [c for c in sorted(directory.iterdir()) if not c.name.startswith(".") and (c / _CONFIG).exists()]


def _check_unique(sources: list[ResolvedSource]) -> None:
    """Refuse two clients whose names are equal, or equal once case-folded and Unicode-normalised
    (``Client`` and ``client``, ``é`` composed and decomposed, ``ﬁ`` and ``fi``): outputs are written
    to OUT/<name>/, and on macOS or Windows such names are one directory, so one would overwrite the other."""
    origins: dict[str, list[str]] = defaultdict(list)
    for source in sources:
        origins[name_key(source.name)].append(f"{shown(repr(source.name), 80)} from {shown(source.origin, 120)}")
    duplicates = ["; ".join(found) for found in origins.values() if len(found) > 1]
    if duplicates:
        raise SourceError(
            "duplicate client names (equal, or equal ignoring case and Unicode form): " + " | ".join(duplicates[:3]),
            where="SOURCES",
            hint="client names come from directory names: rename a directory, or use separate runs",
        )


def name_key(name: str) -> str:
    """What a case-insensitive, normalising file system keeps of a name: NFKC form, case-folded."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())
