"""A fake Hugging Face Hub over HTTP on 127.0.0.1, so that huggingface_hub's real network code runs
in tests without the internet, and every byte it asks for is recorded.

It serves what huggingface_hub (2.x) requests to resolve revisions, list files, download them and
read ranges of them (``HF_ENDPOINT`` points it here)::

    GET  /api/models/<owner>/<repo>/revision/<revision>      repo_info: the commit a revision names
    GET  /api/models/<owner>/<repo>/tree/<commit>[/<path>]    list_repo_tree (one page)
    HEAD /<owner>/<repo>/resolve/<revision>/<path>            file metadata: commit, etag, size
    GET  /<owner>/<repo>/resolve/<revision>/<path>            the file, or the bytes of its Range header

Errors carry the ``X-Error-Code`` header the Hub sends (``RepoNotFound``, ``RevisionNotFound``,
``EntryNotFound``), which huggingface_hub turns into its own exceptions. Etags and blob ids are
those of the real Hub (git blob sha1; sha256 for LFS files), as in ``hubcache``: the same files
pushed here and laid out by ``make_hub_cache`` make the same commit.

Use::

    with FakeHub() as hub:
        commit = hub.push("org/base", {"config.json": b"{}", "model.safetensors": data})
        env = {"HF_ENDPOINT": hub.url, ...}
        ...
        hub.requests  # [Request(method, path, range, sent), ...]
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from hubcache import LFS_SUFFIXES, blob_id, derived_commit, lfs_pointer

_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<kind>revision|tree)/(?P<revision>[^/]+)(?:/(?P<path>.*))?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")
_RANGE = re.compile(r"^bytes=(?P<start>\d+)-(?P<end>\d*)$")


@dataclass(frozen=True)
class Request:
    """One request as the server saw it: ``range`` is the Range header (None without), ``sent`` the body's length."""

    method: str
    path: str
    range: str | None
    sent: int


@dataclass(frozen=True)
class FileRequest(Request):
    """A request for a file's bytes: which repository file, and which bytes ``[start, end)`` were sent."""

    repo_id: str = ""
    file: str = ""
    start: int = 0
    end: int = 0


class FakeHub:
    """Model repositories in memory, served over HTTP while the ``with`` block runs."""

    def __init__(self) -> None:
        self.commits: dict[str, dict[str, dict[str, bytes]]] = {}  # repo -> commit -> path -> bytes
        self.refs: dict[str, dict[str, str]] = {}  # repo -> branch -> commit
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def push(self, repo_id: str, files: Mapping[str, bytes], branch: str = "main", commit: str | None = None) -> str:
        """Make ``files`` the content of a new commit on ``branch``; return its hash (by default derived from the files)."""
        commit = commit or derived_commit(files)
        self.commits.setdefault(repo_id, {})[commit] = dict(files)
        self.refs.setdefault(repo_id, {})[branch] = commit
        return commit

    def file_requests(self, suffix: str = "") -> list[FileRequest]:
        """The requests (HEAD or GET) for a file whose path ends with ``suffix``."""
        return [r for r in self.requests if isinstance(r, FileRequest) and r.file.endswith(suffix)]

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def commit_of(self, repo_id: str, revision: str) -> str | None:
        """The commit a branch or commit hash names in ``repo_id``, or None."""
        commits = self.commits.get(repo_id, {})
        return revision if revision in commits else self.refs.get(repo_id, {}).get(revision)


def _entry(path: str, data: bytes) -> dict[str, Any]:
    """A file's tree entry, as the Hub lists it: LFS files carry their sha256."""
    entry: dict[str, Any] = {"type": "file", "path": path, "size": len(data), "oid": blob_id(path, data)}
    if path.endswith(LFS_SUFFIXES):
        entry["lfs"] = {
            "oid": hashlib.sha256(data).hexdigest(),
            "size": len(data),
            "pointerSize": len(lfs_pointer(data)),
        }
    return entry


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # keep the test output clean
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            api, resolve = _API.match(path), _RESOLVE.match(path)
            match = api or resolve
            if match is None:
                return self._error(404, "RepoNotFound", body)
            repo_id, revision = match["repo"], match["revision"]
            if repo_id not in hub.commits:
                return self._error(404, "RepoNotFound", body)
            commit = hub.commit_of(repo_id, revision)
            if commit is None:
                return self._error(404, "RevisionNotFound", body)
            files = hub.commits[repo_id][commit]
            if api is not None and api["kind"] == "revision":
                siblings = [{"rfilename": p} for p in sorted(files)]
                return self._json(
                    {"id": repo_id, "modelId": repo_id, "sha": commit, "siblings": siblings, "private": False}, body
                )
            if api is not None:
                prefix = f"{api['path']}/" if api["path"] else ""
                return self._json([_entry(p, d) for p, d in sorted(files.items()) if p.startswith(prefix)], body)
            file = resolve["path"]
            if file not in files:
                return self._error(404, "EntryNotFound", body)
            self._file(repo_id, commit, file, files[file], body)

        def _file(self, repo_id: str, commit: str, file: str, data: bytes, body: bool) -> None:
            entry = _entry(file, data)
            requested = self.headers.get("Range")
            start, end, status = 0, len(data), 200
            match = _RANGE.match(requested or "")
            if match is not None:
                start = int(match["start"])
                end = min(len(data), int(match["end"]) + 1 if match["end"] else len(data))
                if start >= len(data):
                    return self._error(416, None, body)
                status = 206
            self.send_response(status)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]}"')
            self.send_header("Content-Length", str(end - start))
            self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            self.end_headers()
            sent = end - start if body else 0
            if body:
                self.wfile.write(data[start:end])
            hub._record(FileRequest(self.command, self.path, requested, sent, repo_id, file, start, start + sent))

        def _json(self, value: Any, body: bool) -> None:
            data = json.dumps(value).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)
            hub._record(Request(self.command, self.path, self.headers.get("Range"), len(data) if body else 0))

        def _error(self, status: int, code: str | None, body: bool) -> None:
            data = json.dumps({"error": code or "error"}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)
            hub._record(Request(self.command, self.path, self.headers.get("Range"), 0))

    return Handler
