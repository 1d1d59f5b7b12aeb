"""Text for a terminal, from a log nobody vouches for.

Every line the tool prints in text mode goes through `printable`: control and other
non-printable characters (a carriage return, an escape sequence, a newline inside a host name,
a bidirectional override) show as Python escapes (`\\r`, `\\x1b`, `\\n`, `\\u202e`), so what a log
holds can neither rewrite a line on the terminal nor forge one. JSON output needs none of
this: `json.dumps` escapes them already.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["joined", "printable"]


def printable(text: str) -> str:
    """`text` with each non-printable character escaped as `repr` would."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def joined(lines: Iterable[str]) -> str:
    """Lines for printing: each made printable, then joined by the only newlines."""
    return "\n".join(printable(line) for line in lines)
