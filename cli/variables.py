"""``tether vars set|get|ls|rm``: variables and secrets referenced by stacks as ``${var:PATH/KEY}``.

A secret's values are sealed to the controller's public key here, before they go on the
broker (see controller/variables.py); the controller never sends them back.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from tether.protocol.client import ControllerClient
from tether.protocol.commands import VarsGet, VarsKey, VarsList, VarsRemove, VarsSet
from tether.protocol.enrollment import seal_text

from . import output
from .common import common, send_and_print

_scope = [
    click.option("--group", help="Scope: the stacks of this group (default: the whole fleet)."),
    click.option("--device", "device_id", help="Scope: this device only."),
]


def scoped(f: Any) -> Any:
    for option in reversed(_scope):
        f = option(f)
    return f


def parse_items(pairs: tuple[str, ...]) -> dict[str, str]:
    """``KEY=VALUE`` pairs; ``KEY=@FILE`` reads the value from a file, ``KEY=-`` from stdin
    (so that a secret need not be on the command line)."""
    items: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="KEY=VALUE")
        if value == "-":
            value = sys.stdin.read().rstrip("\n")
        elif value.startswith("@"):
            try:
                value = Path(value[1:]).read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise click.BadParameter(
                    f"{key}: cannot read {value[1:]}: {exc}", param_hint="KEY=@FILE"
                ) from exc
        items[key] = value
    return items


def _scope_text(scope: str) -> str:
    return "the fleet" if scope == "fleet" else scope.replace(":", " ", 1)


@click.group("vars")
def variables() -> None:
    """Variables and secrets for stacks: ${var:PATH/KEY} (docs/variables.md)."""


@variables.command("set")
@click.argument("path")
@click.argument("pairs", metavar="KEY=VALUE...", nargs=-1, required=True)
@click.option("--secret", is_flag=True, help="Encrypt end to end: only the devices can read the values.")
@scoped
@common
def vars_set(
    client: ControllerClient,
    fmt: str,
    path: str,
    pairs: tuple[str, ...],
    secret: bool,
    group: str | None,
    device_id: str | None,
) -> None:
    """Set keys of the variable PATH (other keys stay). KEY=@FILE or KEY=- read a value."""
    items = parse_items(pairs)
    if secret:
        key = client.request(VarsKey())["public_key"]
        sealed = seal_text(key, json.dumps(items))
        command = VarsSet(path=path, secret=True, sealed=sealed, group=group, device_id=device_id)
    else:
        command = VarsSet(path=path, items=items, group=group, device_id=device_id)
    send_and_print(client, fmt, command, _set_line)


def _set_line(result: dict[str, Any]) -> str:
    v = result["variable"]
    what = "secret" if v["secret"] else "variable"
    if result["changed"]:
        return f"{what} {v['path']} set for {_scope_text(v['scope'])} (version {v['version']})"
    return f"{what} {v['path']} unchanged"


@variables.command("get")
@click.argument("path")
@scoped
@common
def vars_get(client: ControllerClient, fmt: str, path: str, group: str | None, device_id: str | None) -> None:
    """Show a variable's keys and values (a secret's values are never shown)."""
    send_and_print(
        client, fmt, VarsGet(path=path, group=group, device_id=device_id), _get_text, key="variable"
    )


def _get_text(v: dict[str, Any]) -> list[str]:
    items = v.get("items") or {}
    rows = [(k, "(secret)" if v["secret"] else items.get(k, "")) for k in v["keys"]]
    return [
        f"{v['path']} ({_scope_text(v['scope'])}, version {v['version']})",
        output.table(["KEY", "VALUE"], rows),
    ]


@variables.command("ls")
@click.argument("prefix", default="")
@common
def vars_ls(client: ControllerClient, fmt: str, prefix: str) -> None:
    """List variables (their keys, never their values)."""
    send_and_print(
        client,
        fmt,
        VarsList(prefix=prefix),
        lambda rows: output.table(
            ["PATH", "SCOPE", "SECRET", "KEYS", "VERSION"],
            [
                (r["path"], r["scope"], "yes" if r["secret"] else "no", ",".join(r["keys"]), r["version"])
                for r in rows
            ],
        ),
        key="variables",
    )


@variables.command("rm")
@click.argument("path")
@click.argument("keys", nargs=-1)
@scoped
@common
def vars_rm(
    client: ControllerClient,
    fmt: str,
    path: str,
    keys: tuple[str, ...],
    group: str | None,
    device_id: str | None,
) -> None:
    """Remove the variable PATH, or only some of its KEYS (refused while a stack needs them)."""
    send_and_print(
        client,
        fmt,
        VarsRemove(path=path, keys=keys, group=group, device_id=device_id),
        lambda result: f"removed {path}: {', '.join(result['removed'])} ({_scope_text(result['scope'])})",
    )


def register(main: click.Group) -> None:
    main.add_command(variables)
