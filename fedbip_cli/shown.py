"""Names and values as they may be shown on a terminal: no control characters, cut to a length.

A client's name comes from a directory name, a Hub repository or a Flower node, so it may hold
terminal escapes (an OSC sequence that retitles the window), bidirectional overrides, newlines that
forge a second line, or rich markup (``[b]c1`` renders as a bold ``c1`` and can pose as it). Every
place that prints such a text passes it through ``shown``, which makes the invisible visible;
rich markup is escaped where rich renders (``report.cell``, the CLI's error line).
"""

from __future__ import annotations

import unicodedata

MAX_SHOWN = 200  # characters of one name or value in a message
_INVISIBLE = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}  # controls, format (bidi), surrogates, unassigned, separators


def _visible(char: str) -> str:
    if unicodedata.category(char) not in _INVISIBLE:
        return char
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def shown(text: str, limit: int = MAX_SHOWN) -> str:
    """``text`` with every control, format and separator character written as an escape (``\\x1b``),
    cut to about ``limit`` characters when longer: its start and its end (where an error line says
    what is wrong) are kept, the middle gives the full length."""
    visible = "".join(map(_visible, text))
    if len(visible) <= limit:
        return visible
    keep = max(limit - 30, 20) // 2
    return f"{visible[:keep]} …({len(text)} characters)… {visible[-keep:]}"
