"""Untrusted text made safe for a terminal: one line, and nothing the terminal would obey.

File names, document paths and every string in a pack come from someone else. Printed
raw, a newline splits an error over two lines, an ANSI escape recolours or clears the
screen, and a bidi override reverses what the reader sees. :func:`printable` replaces
each such character by its Python escape (``\\n``, ``\\x1b``, ``\\u202e``); everything
else, accents and CJK included, is left as it is.
"""

from __future__ import annotations

import re

# C0 and C1 controls, DEL, line and paragraph separators, bidi marks, embeddings,
# overrides and isolates, and lone surrogates (undecodable bytes in file names).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")


def printable(text: object, keep: str = "") -> str:
    """``str(text)`` with every control character escaped (on one line), except those in
    ``keep`` (``"\n\t"`` for a model's answer, which may span lines)."""
    def escape(m: re.Match) -> str:
        c = m.group()
        return c if c in keep else c.encode("unicode_escape", "backslashreplace").decode("ascii")

    return _UNSAFE.sub(escape, str(text))
