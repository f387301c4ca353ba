"""``tether audit``: who changed what, when, from where, and how it ended (docs/security.md)."""

from __future__ import annotations

import time
from typing import Any

import click
from tether.protocol.client import ControllerClient
from tether.protocol.commands import AuditList

from . import output
from .common import common, send_and_print
from .users import days_or_duration


@click.command("audit")
@click.option("--since", default="24h", show_default=True, help="How far back (30m, 12h, 7d), or 'all'.")
@click.option("--user", default=None, help="Only this user's writes.")
@click.option("--limit", type=int, default=1000, show_default=True, help="At most this many (the newest).")
@common
def audit(client: ControllerClient, fmt: str, since: str, user: str | None, limit: int) -> None:
    """The audit log: every write asked of the controller (refused ones too), oldest first."""
    start = 0.0 if since == "all" else max(0.0, time.time() - days_or_duration(since, "--since"))
    send_and_print(client, fmt, AuditList(since=start, user=user, limit=limit), _table, key="records")


def _table(records: list[dict[str, Any]]) -> str:
    return output.table(
        ["WHEN", "USER", "VIA", "FROM", "COMMAND", "TARGET", "OUTCOME"],
        [
            (
                output.when(r["at"]),
                r["user"],
                r["via"],
                r["address"] or "-",
                r["command"],
                " ".join(f"{k}={v}" for k, v in sorted(r["target"].items())) or "-",
                r["outcome"],
            )
            for r in records
        ],
    )


def register(main: click.Group) -> None:
    main.add_command(audit)
