"""Remote strings cannot split a log line or drive a terminal (protocol/logsafe.py, cli/output.py)."""

from __future__ import annotations

import logging

from tether.cli import output
from tether.protocol.logsafe import SafeFormatter, printable

FORGED = "ok\n2025-01-01 00:00:00,000 WARNING tether.controller: device devB revoked"


def test_printable_escapes_every_non_printable_character() -> None:
    """Control characters, line separators and bidi overrides are escaped; printable text is unchanged."""
    assert printable("pi-1 site=berlin München") == "pi-1 site=berlin München"
    assert printable("a\x1b[2Kb") == "a\\x1b[2Kb"
    assert printable("a\nb\r\tc") == "a\\x0ab\\x0d\\x09c"
    assert printable("x\u2028y\u202ez") == "x\\u2028y\\u202ez"
    assert printable(None) == "" and printable(3) == "3"


def _format(record: logging.LogRecord) -> str:
    return SafeFormatter("%(levelname)s %(name)s: %(message)s").format(record)


def test_a_log_message_from_remote_input_stays_one_line() -> None:
    """A device's newline cannot start a fake log line; the record's own args are left intact."""
    record = logging.LogRecord(
        "tether.controller", logging.INFO, __file__, 1, "device %s: %s", ("d1", FORGED), None
    )
    line = _format(record)
    assert "\n" not in line
    assert line.startswith("INFO tether.controller: device d1: ok\\x0a2025-01-01")
    assert record.args == ("d1", FORGED)


def test_a_traceback_keeps_its_lines_but_none_starts_like_a_record() -> None:
    """Exception text stays readable; every line after the first is indented."""
    try:
        raise ValueError(FORGED)
    except ValueError:
        import sys

        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    lines = _format(record).splitlines()
    assert lines[0] == "ERROR t: failed" and len(lines) > 2
    assert all(line.startswith("    ") for line in lines[1:])


def test_table_cells_and_labels_are_printable_only() -> None:
    """A label value with ESC[2K cannot erase a table row: the escape is shown, not sent."""
    text = output.table(["DEVICE", "LABELS"], [("d1", output.labels({"x": "\x1b[2K\rfake healthy"}))])
    assert "\x1b" not in text and "\r" not in text
    assert "x=\\x1b[2K\\x0dfake healthy" in text
    assert (
        output.labels({"a": "1", "b": "\x07"}, {"a": "operator", "b": "device"})
        == "a=1 [operator], b=\\x07 [device]"
    )
