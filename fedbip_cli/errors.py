"""One exception hierarchy: every user-facing failure of fedbip is a FedbipError.

The CLI turns these into one line (``<where>: <problem>`` plus a hint) and an exit code; any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class FedbipError(Exception):
    """A failure the user can fix. ``where`` names the file or input, ``hint`` says how."""

    exit_code = 1

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.where = where
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class UsageError(FedbipError):
    """Bad options or option combinations (exit code 2, like a parse error)."""

    exit_code = 2


class SourceError(FedbipError):
    """A source could not be parsed or resolved (path, @list, hf:// reference)."""


class AdapterError(FedbipError):
    """An adapter or checkpoint is unreadable, unsupported or inconsistent."""


class OutputError(FedbipError):
    """The output location cannot be written as asked."""
