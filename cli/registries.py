"""``tether registries add|ls|rm``: credentials for private image registries.

The username and password are sealed to the controller's public key here, before they go
on the broker (see controller/registries.py); the controller never sends them back, and
each device gets them sealed to its own key.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from tether.protocol.client import ControllerClient
from tether.protocol.commands import RegistriesAdd, RegistriesList, RegistriesRemove, VarsKey
from tether.protocol.enrollment import seal_text
from tether.protocol.errors import TetherError

from . import output
from .common import common, send_and_print
from .variables import _scope_text, scoped


@click.group("registries")
def registries() -> None:
    """Credentials for private image registries, sealed end to end (docs/security.md)."""


@registries.command("add")
@click.argument("host")
@click.option("--username", "-u", required=True, help="The registry username.")
@click.option(
    "--password-stdin", is_flag=True, help="Read the password from stdin (else it is asked for, hidden)."
)
@scoped
@common
def registries_add(
    client: ControllerClient,
    fmt: str,
    host: str,
    username: str,
    password_stdin: bool,
    group: str | None,
    device_id: str | None,
) -> None:
    """Set the credentials devices use for HOST (as image references name it: HOST[:PORT], docker.io)."""
    if password_stdin:
        password = sys.stdin.read().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True)
    if not password:
        raise TetherError("registries add: the password is empty")
    key = client.request(VarsKey())["public_key"]
    sealed = seal_text(key, json.dumps({"username": username, "password": password}))
    add = RegistriesAdd(host=host, sealed=sealed, group=group, device_id=device_id)
    send_and_print(client, fmt, add, _added_line)


def _added_line(result: dict[str, Any]) -> str:
    r = result["registry"]
    verb = f"set (version {r['version']})" if result["changed"] else "unchanged"
    return f"registry {r['host']} for {_scope_text(r['scope'])}: {verb}"


@registries.command("ls")
@common
def registries_ls(client: ControllerClient, fmt: str) -> None:
    """List registries with credentials (never the credentials)."""
    send_and_print(
        client,
        fmt,
        RegistriesList(),
        lambda rows: output.table(
            ["HOST", "SCOPE", "VERSION", "UPDATED"],
            [(r["host"], r["scope"], r["version"], output.when(r["updated"])) for r in rows],
        ),
        key="registries",
    )


@registries.command("rm")
@click.argument("host")
@scoped
@common
def registries_rm(
    client: ControllerClient, fmt: str, host: str, group: str | None, device_id: str | None
) -> None:
    """Remove the credentials for HOST (in the fleet, --group or --device scope)."""
    send_and_print(
        client,
        fmt,
        RegistriesRemove(host=host, group=group, device_id=device_id),
        lambda result: f"registry {result['host']} removed for {_scope_text(result['scope'])}",
    )


def register(main: click.Group) -> None:
    main.add_command(registries)
