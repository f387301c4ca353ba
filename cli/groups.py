"""``tether groups create|trust|ls|show|rm``: device groups, static lists or label selectors."""

from __future__ import annotations

from typing import Any

import click
from tether.protocol.client import ControllerClient
from tether.protocol.commands import GroupsCreate, GroupsList, GroupsRemove, GroupsShow, GroupsTrust
from tether.protocol.errors import TetherError

from . import output
from .common import common, send_and_print


@click.group()
def groups() -> None:
    """Device groups: static lists or label selectors."""


@groups.command("create")
@click.argument("name")
@click.option("--device", "device_ids", multiple=True, help="A member device id; repeatable.")
@click.option("--select", "selector", help="Label selector, e.g. site=berlin,arch=arm64.")
@click.option(
    "--trust-device-labels",
    is_flag=True,
    help="The selector also matches labels and facts devices report about themselves "
    "(any device can then join the group and get its stacks and secrets).",
)
@common
def groups_create(
    client: ControllerClient,
    fmt: str,
    name: str,
    device_ids: tuple[str, ...],
    selector: str | None,
    trust_device_labels: bool,
) -> None:
    """Create a group of named devices (--device) or of devices matching labels (--select).

    A selector matches labels set with `tether devices label` or pinned at enrollment (token
    --label, approve --label); not what devices report, unless --trust-device-labels."""
    if bool(device_ids) == bool(selector):
        raise TetherError("give either --device (one or more) or --select, not both")
    reply = client.request(
        GroupsCreate(
            name=name, devices=device_ids, selector=selector, trust_device_labels=trust_device_labels
        )
    )
    never_seen = reply.get("never_seen") or []
    group = reply["group"]
    if fmt == "json":
        click.echo(output.to_json(group))
    else:
        click.echo(f"group {group['name']} created ({output.plural(len(group['members']), 'member')} now)")
    if never_seen:
        click.echo(
            f"warning: {', '.join(output.printable(d) for d in never_seen)}: never connected to this controller "
            "(a typo?); a device joins the group when it does",
            err=True,
        )


@groups.command("trust")
@click.argument("name")
@click.option("--off", is_flag=True, help="Match only labels set by an operator or at enrollment again.")
@common
def groups_trust(client: ControllerClient, fmt: str, name: str, off: bool) -> None:
    """Let a selector group match the labels and facts devices report about themselves.

    Any device can then claim the labels and join the group (its stacks, variables and
    secrets): only for fleets whose every device is trusted."""
    send_and_print(client, fmt, GroupsTrust(name=name, trust=not off), _trust_line, key="group")


def _trust_line(group: dict[str, Any]) -> str:
    what = "labels devices report, too" if group["trust_device_labels"] else "trusted labels only"
    return f"group {group['name']} matches {what} ({output.plural(len(group['members']), 'member')} now)"


HEADERS = ["GROUP", "KIND", "DEFINITION", "MEMBERS", "STACKS"]


def _group_rows(groups: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (
            g["name"],
            g["kind"] + (" (trusts device labels)" if g.get("trust_device_labels") else ""),
            g["selector"] or ",".join(g["devices"]),
            len(g["members"]),
            ",".join(g["stacks"]) or "-",
        )
        for g in groups
    ]


@groups.command("ls")
@common
def groups_ls(client: ControllerClient, fmt: str) -> None:
    """List groups."""
    send_and_print(
        client, fmt, GroupsList(), lambda groups: output.table(HEADERS, _group_rows(groups)), key="groups"
    )


@groups.command("show")
@click.argument("name")
@common
def groups_show(client: ControllerClient, fmt: str, name: str) -> None:
    """Show a group and its current members."""
    send_and_print(
        client,
        fmt,
        GroupsShow(name=name),
        lambda g: [
            output.table(HEADERS, _group_rows([g])),
            "\nmembers: " + (", ".join(g["members"]) or "(none)"),
        ],
        key="group",
    )


@groups.command("rm")
@click.argument("name")
@common
def groups_rm(client: ControllerClient, fmt: str, name: str) -> None:
    """Remove a group (it must have no stacks)."""
    send_and_print(client, fmt, GroupsRemove(name=name), lambda _: f"group {name} removed")


def register(main: click.Group) -> None:
    main.add_command(groups)
