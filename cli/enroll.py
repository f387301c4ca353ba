"""Enrollment commands: ``tether tokens create|ls|rm`` and ``tether devices pending|approve|reject``.

See docs/onboarding.md for the flow.
"""

from __future__ import annotations

import re
from typing import Any

import click
from tether.protocol import labels as label_rules
from tether.protocol.client import ControllerClient
from tether.protocol.commands import (
    DevicesApprove,
    DevicesPending,
    DevicesReject,
    TokensCreate,
    TokensList,
    TokensRemove,
)
from tether.protocol.durations import parse_duration
from tether.protocol.errors import TetherError

from . import output
from .common import common, send_and_print

_DAYS = re.compile(r"\A(\d+(?:\.\d+)?)([dw])\Z")


def parse_expiry(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """``7d``, ``2w``, ``12h``, ``30m``, ``90s`` (or plain seconds) in seconds."""
    if value is None:
        return None
    m = _DAYS.fullmatch(value.strip())
    if m:
        seconds = float(m.group(1)) * (86400 if m.group(2) == "d" else 7 * 86400)
    else:
        try:
            seconds = parse_duration(value, "--expires")
        except TetherError as exc:
            raise click.BadParameter(f"{value!r}: use e.g. 7d, 2w, 12h, 30m") from exc
    if seconds <= 0:
        raise click.BadParameter("must be more than zero")
    return seconds


def _labels(items: tuple[str, ...]) -> dict[str, str]:
    try:
        return label_rules.parse(items)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--label") from None


@click.group()
def tokens() -> None:
    """Fleet enrollment tokens (docs/onboarding.md)."""


@tokens.command("create")
@click.option("--group", default=None, help="Put enrolled devices in this group.")
@click.option("--label", "labels", multiple=True, help="A label key=value for enrolled devices; repeatable.")
@click.option("--auto-approve", is_flag=True, help="Approve devices at once (no waiting room).")
@click.option("--expires", callback=parse_expiry, default=None, help="Valid for this long (e.g. 7d, 12h).")
@click.option("--uses", type=click.IntRange(min=1), default=None, help="At most this many devices.")
@common
def tokens_create(
    client: ControllerClient,
    fmt: str,
    group: str | None,
    labels: tuple[str, ...],
    auto_approve: bool,
    expires: float | None,
    uses: int | None,
) -> None:
    """Create an enrollment token; it is shown only once (only its hash is kept)."""
    result = client.request(
        TokensCreate(
            group=group, labels=_labels(labels), auto_approve=auto_approve, expires_s=expires, uses=uses
        )
    )
    if fmt == "json":
        click.echo(output.to_json(result))
        return
    click.echo(result["token"])
    click.echo(
        f"token {result['id']}: shown once; put it in the agent's config (enrollment_token) "
        f"or TETHER_ENROLLMENT_TOKEN",
        err=True,
    )


@tokens.command("ls")
@common
def tokens_ls(client: ControllerClient, fmt: str) -> None:
    """List enrollment tokens (never the tokens themselves)."""
    send_and_print(client, fmt, TokensList(), _tokens_table, key="tokens")


def _tokens_table(rows: list[dict[str, Any]]) -> str:
    table = [
        (
            t["id"],
            t["group"] or "-",
            output.labels(t["labels"]),
            "yes" if t["auto_approve"] else "no",
            ("expired " if t["expired"] else "") + (output.when(t["expires"]) or "never"),
            f"{t['used']}/{t['uses'] if t['uses'] is not None else 'unlimited'}",
        )
        for t in rows
    ]
    return output.table(["ID", "GROUP", "LABELS", "AUTO-APPROVE", "EXPIRES", "USED"], table)


@tokens.command("rm")
@click.argument("ids", nargs=-1, required=True)
@common
def tokens_rm(client: ControllerClient, fmt: str, ids: tuple[str, ...]) -> None:
    """Remove tokens: no new device can enroll with them (enrolled devices keep their credentials)."""
    send_and_print(
        client, fmt, TokensRemove(ids=ids), lambda r: [f"token {t}: removed" for t in r["removed"]]
    )


@click.command("pending")
@common
def pending(client: ControllerClient, fmt: str) -> None:
    """The waiting room: devices that asked to join (pending or rejected)."""
    send_and_print(client, fmt, DevicesPending(), _pending_table, key="devices")


def _pending_table(rows: list[dict[str, Any]]) -> str:
    table = [
        (
            d["id"],
            d["state"],
            d["token"],
            d["group"] or "-",
            output.labels(d["labels"]),
            output.when(d["requested"]),
            d["error"] or "",
        )
        for d in rows
    ]
    return output.table(["DEVICE", "STATE", "TOKEN", "GROUP", "LABELS", "ASKED", "LAST ERROR"], table)


@click.command("approve")
@click.argument("device_ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Every pending device (with --select: those matching).")
@click.option("--select", "selector", default=None, help="With --all: a label selector, e.g. site=berlin.")
@click.option(
    "--label",
    "labels",
    multiple=True,
    help="Pin a label key=value on the approved devices (trusted: selector groups match it); repeatable.",
)
@common
def approve(
    client: ControllerClient,
    fmt: str,
    device_ids: tuple[str, ...],
    all_: bool,
    selector: str | None,
    labels: tuple[str, ...],
) -> None:
    """Approve devices of the waiting room: they get their credentials and join the fleet.

    --select matches what the devices report (under their token's labels): it chooses whom
    to admit. Groups are chosen by the token's group and by trusted labels (the token's,
    --label, or tether devices label)."""
    if bool(device_ids) == all_:
        raise click.UsageError("name devices to approve, or use --all")
    send_and_print(
        client,
        fmt,
        DevicesApprove(device_ids=device_ids, all=all_, selector=selector, labels=_labels(labels)),
        lambda r: [f"{d}: approved" for d in r["approved"]] or "no pending device matched",
    )


@click.command("reject")
@click.argument("device_ids", nargs=-1, required=True)
@common
def reject(client: ControllerClient, fmt: str, device_ids: tuple[str, ...]) -> None:
    """Reject pending devices: they get no credentials."""
    send_and_print(
        client, fmt, DevicesReject(device_ids=device_ids), lambda r: [f"{d}: rejected" for d in r["rejected"]]
    )


def register(main: click.Group) -> None:
    """Add ``tokens`` to ``main`` and ``pending``, ``approve``, ``reject`` to its ``devices`` group."""
    main.add_command(tokens)
    devices = main.commands["devices"]
    assert isinstance(devices, click.Group)
    for command in (pending, approve, reject):
        devices.add_command(command)
