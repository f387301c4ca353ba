"""``tether notify add|ls|rm|test|log``: webhooks told of fleet events (docs/notifications.md).

The signing secret is read from a file and sealed to the controller's public key here,
before it goes on the broker (as ``tether registries add`` does); the controller never
shows it again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from tether.protocol.client import ControllerClient
from tether.protocol.commands import (
    NOTIFY_KINDS,
    NotifyAdd,
    NotifyList,
    NotifyLog,
    NotifyRemove,
    NotifyTest,
    VarsKey,
)
from tether.protocol.durations import format_duration, parse_duration
from tether.protocol.enrollment import seal_text
from tether.protocol.errors import TetherError

from . import output
from .common import common, send_and_print


@click.group("notify")
def notify() -> None:
    """Webhooks: fleet events posted to HTTP endpoints, signed and retried (admin only)."""


def _kinds(value: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in value.split(",") if k.strip())
    unknown = [k for k in kinds if k not in NOTIFY_KINDS]
    if unknown or not kinds:
        raise TetherError(
            f"--on: unknown event(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"choose from {', '.join(NOTIFY_KINDS)}"
        )
    return kinds


@notify.command("add")
@click.argument("url")
@click.option("--on", "on", required=True, help=f"Comma-separated events: {', '.join(NOTIFY_KINDS)}.")
@click.option(
    "--offline-after",
    default="5m",
    show_default=True,
    help="How long a device stays offline before device.offline fires (device.online follows when it is back).",
)
@click.option(
    "--window",
    default="30s",
    show_default=True,
    help="Past 3 messages of one event within this window, the rest are summed up in one message.",
)
@click.option(
    "--format", "body_format", type=click.Choice(["json", "slack"]), default="json", show_default=True
)
@click.option(
    "--secret-file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="A file holding the HMAC secret the body is signed with (X-Tether-Signature).",
)
@common
def notify_add(
    client: ControllerClient,
    fmt: str,
    url: str,
    on: str,
    offline_after: str,
    window: str,
    body_format: str,
    secret_file: Path | None,
) -> None:
    """Post the events --on to URL (http or https)."""
    kinds = _kinds(on)
    seconds = parse_duration(offline_after, "--offline-after")
    sealed = None
    if secret_file is not None:
        secret = secret_file.read_text().rstrip("\r\n")
        if not secret:
            raise TetherError(f"--secret-file {secret_file}: the file is empty")
        key = client.request(VarsKey())["public_key"]
        sealed = seal_text(key, json.dumps({"secret": secret}))
    send_and_print(
        client,
        fmt,
        NotifyAdd(
            url=url,
            on=kinds,  # type: ignore[arg-type]
            offline_after_s=seconds,
            window_s=parse_duration(window, "--window"),
            format=body_format,  # type: ignore[arg-type]
            sealed=sealed,
        ),
        _added_line,
    )


def _added_line(result: dict[str, Any]) -> str:
    w = result["webhook"]
    signed = "signed" if w["signed"] else "unsigned"
    return f"webhook {w['id']} added: {w['url']} ({signed}) on {', '.join(w['on'])}"


@notify.command("ls")
@common
def notify_ls(client: ControllerClient, fmt: str) -> None:
    """List webhooks (never their secrets) and their deliveries."""
    send_and_print(client, fmt, NotifyList(), _webhooks_table, key="webhooks")


def _webhooks_table(rows: list[dict[str, Any]]) -> str:
    return output.table(
        ["ID", "URL", "ON", "OFFLINE AFTER", "FORMAT", "SIGNED", "PENDING", "DELIVERED", "FAILED"],
        [
            (
                w["id"],
                w["url"],
                ",".join(w["on"]),
                format_duration(w["offline_after_s"]),
                w["format"],
                "yes" if w["signed"] else "no",
                w["deliveries"]["pending"],
                w["deliveries"]["delivered"],
                w["deliveries"]["failed"],
            )
            for w in rows
        ],
    )


@notify.command("rm")
@click.argument("webhook_id")
@common
def notify_rm(client: ControllerClient, fmt: str, webhook_id: str) -> None:
    """Remove a webhook and its delivery log."""
    send_and_print(client, fmt, NotifyRemove(id=webhook_id), lambda result: f"webhook {result['id']} removed")


@notify.command("test")
@click.argument("webhook_id")
@common
def notify_test(client: ControllerClient, fmt: str, webhook_id: str) -> None:
    """Send a test message to a webhook (see it arrive with tether notify log)."""
    send_and_print(
        client,
        fmt,
        NotifyTest(id=webhook_id),
        lambda d: f"delivery {d['id']} queued for {d['webhook']}",
        key="delivery",
    )


@notify.command("log")
@click.argument("webhook_id", required=False)
@click.option("--limit", type=int, default=50, show_default=True)
@common
def notify_log(client: ControllerClient, fmt: str, webhook_id: str | None, limit: int) -> None:
    """The newest deliveries (of WEBHOOK_ID, or all): state, attempts, last error."""
    send_and_print(client, fmt, NotifyLog(id=webhook_id, limit=limit), _deliveries_table, key="deliveries")


def _deliveries_table(rows: list[dict[str, Any]]) -> str:
    return output.table(
        ["ID", "WEBHOOK", "EVENT", "SUBJECT", "STATE", "ATTEMPTS", "NEXT", "LAST ERROR", "CREATED"],
        [
            (
                d["id"],
                d["webhook"],
                d["kind"],
                d["subject"] or "-",
                d["state"],
                d["attempts"],
                output.when(d["next_at"]) if d["next_at"] else "-",
                d["last_error"] or "-",
                output.when(d["created"]),
            )
            for d in rows
        ],
    )


def register(main: click.Group) -> None:
    main.add_command(notify)
