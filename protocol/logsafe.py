"""Remote strings made safe to show: in a log line or a terminal. Pure (and the standard library).

Device ids, event messages, labels, errors: whatever a device or a client sends is
attacker-controlled. Written raw, a newline forges a whole log line ("device devB
revoked") and an escape sequence (``ESC[2K``) rewrites what a terminal shows.
:func:`printable` escapes every character that is not printable (control characters,
line and paragraph separators, bidirectional overrides) the way Python writes them in a
string literal; :class:`SafeFormatter` applies it to every log message, so no log line built
from remote input can be split, whichever code logs it.
"""

from __future__ import annotations

import logging
import sys

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(value: object) -> str:
    """``value`` as text with every non-printable character escaped (``\\x1b``, ``\\n``...).

    Printable text (spaces included) is returned unchanged; a backslash is kept as is, so
    the result is for eyes, not to be parsed back."""
    text = "" if value is None else str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


class SafeFormatter(logging.Formatter):
    """A text formatter whose messages are one line: control characters escaped.

    A traceback keeps its lines, each indented, so nothing in it starts a line the way a log
    record does."""

    def format(self, record: logging.LogRecord) -> str:
        msg, args = record.msg, record.args
        record.msg, record.args = printable(record.getMessage()), None
        try:
            text = super().format(record)
        finally:
            record.msg, record.args = msg, args
        return text.replace("\n", "\n    ")


def log_to_stderr(level: str, fmt: str = LOG_FORMAT) -> None:
    """Configure the root logger: text lines on stderr through :class:`SafeFormatter`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeFormatter(fmt))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
