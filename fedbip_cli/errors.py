"""One exception hierarchy: every user-facing failure of fedbip is a FedbipError.

The CLI turns these into one line (``<where>: <problem>`` plus a hint) and an exit code; any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class FedbipError(Exception):
    """A failure the user can fix. ``where`` names the file or input, ``hint`` says how."""

    exit_code = 1
    code = "error"  # names the kind of failure in a --json error object
    default_hint: str | None = None

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.where = where
        self.hint = hint or self.default_hint

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class UsageError(FedbipError):
    """Bad options or option combinations (exit code 2, like a parse error)."""

    exit_code = 2
    code = "usage"
    default_hint = "run the command with --help to see the accepted options and values"


class SourceError(FedbipError):
    """A source could not be parsed or resolved (path, @list, hf:// reference)."""

    code = "source"

    default_hint = (
        "a SOURCE is an adapter directory, a directory of adapter directories, @FILE, "
        "or hf://owner/repo[@revision][/subfolder]"
    )


class AdapterError(FedbipError):
    """An adapter or checkpoint is unreadable, unsupported or inconsistent."""

    code = "adapter"

    default_hint = "fedbip reads LoRA adapters as peft's save_pretrained writes them; fix or re-save this one"


class OutputError(FedbipError):
    """The output location cannot be written as asked."""

    code = "output"

    default_hint = "choose another --out"


class CacheError(FedbipError):
    """The inner-product cache cannot be opened, read or written."""

    code = "cache"

    default_hint = (
        "delete the cache directory (it is rebuilt on the next run), choose another --cache, or pass --no-cache"
    )


class LockError(FedbipError):
    """A lock file is missing or unreadable, or an input resolves differently from it."""

    code = "lock"

    default_hint = "run once without --locked to (re)write the lock file"
