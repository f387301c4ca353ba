"""``tether users add|ls|rm|passwd|token|tokens|revoke``: who may use the controller, and how much.

Roles (docs/security.md "Users and roles"): a viewer reads; an operator also deploys and
operates devices; an admin also manages users, API tokens, device credentials, enrollment
tokens and registries. Passwords and API tokens are made by the controller and shown once;
``--write FILE`` keeps a new password in a credentials file for ``--credentials FILE`` (or
``tether context``), which makes the CLI act as that user.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from tether.protocol import principals
from tether.protocol.client import ControllerClient
from tether.protocol.commands import (
    UsersAdd,
    UsersList,
    UsersPasswd,
    UsersRemove,
    UsersRevoke,
    UsersToken,
    UsersTokens,
    VarsKey,
)
from tether.protocol.durations import parse_duration
from tether.protocol.enrollment import seal_text
from tether.protocol.errors import TetherError
from tether.protocol.secret_files import write_secret_json

from . import output
from .common import common, send_and_print

ROLES = click.Choice(list(principals.ROLES))


def days_or_duration(value: str, where: str) -> float:
    """Seconds of ``30d`` (days) or of a Compose duration (``12h``, ``30m``); a clear error else."""
    text = value.strip()
    try:
        if text.endswith("d") and text[:-1].isdigit():
            return int(text[:-1]) * 86400.0
        return parse_duration(text, where)
    except TetherError as exc:
        raise click.BadParameter(f"{value!r}: use e.g. 30d, 12h, 30m", param_hint=where) from exc


@click.group("users")
def users() -> None:
    """Users, their roles and API tokens (docs/security.md "Users and roles")."""


def _shown_once(client: ControllerClient, fmt: str, result: dict[str, Any], write: Path | None) -> None:
    user = result["user"]
    if write is not None:
        data = {"username": user["name"], "password": result["password"], "broker": client.broker_url}
        if client.ca_file:
            data["ca_file"] = client.ca_file
        write_secret_json(write, data)
    if fmt == "quiet":
        return
    if fmt == "json":
        click.echo(output.to_json(result))
        return
    click.echo(f"user {user['name']} ({user['role']})")
    click.echo(f"password (shown once): {result['password']}")
    if write is not None:
        click.echo(f"credentials written to {write} (0600): tether ... --credentials {write}")


WRITE = click.option(
    "--write",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Also write a credentials file (0600) for --credentials FILE, acting as this user.",
)


@users.command("add")
@click.argument("name")
@click.option(
    "--role", type=ROLES, required=True, help="viewer: reads; operator: also deploys; admin: everything."
)
@WRITE
@common
def users_add(client: ControllerClient, fmt: str, name: str, role: str, write: Path | None) -> None:
    """Add user NAME with a new password (shown once)."""
    _shown_once(client, fmt, client.request(UsersAdd(name=name, role=role)), write)  # type: ignore[arg-type]


@users.command("ls")
@common
def users_ls(client: ControllerClient, fmt: str) -> None:
    """List users and their roles (never a password)."""
    send_and_print(
        client,
        fmt,
        UsersList(),
        lambda rows: output.table(
            ["NAME", "ROLE", "CREATED"], [(u["name"], u["role"], output.when(u["created"])) for u in rows]
        ),
        key="users",
    )


@users.command("rm")
@click.argument("name")
@common
def users_rm(client: ControllerClient, fmt: str, name: str) -> None:
    """Remove user NAME and its API tokens (never the last admin); its connections are closed."""
    send_and_print(
        client,
        fmt,
        UsersRemove(name=name),
        lambda result: f"user {result['removed']} removed (and {result['tokens']} API token(s))",
    )


@users.command("passwd")
@click.argument("name")
@click.option("--role", type=ROLES, default=None, help="Also change the role.")
@click.option(
    "--choose", is_flag=True, help="Set a password of your own (asked for, hidden) instead of a random one."
)
@click.option("--password-stdin", is_flag=True, help="With --choose: read it from stdin.")
@WRITE
@common
def users_passwd(
    client: ControllerClient,
    fmt: str,
    name: str,
    role: str | None,
    choose: bool,
    password_stdin: bool,
    write: Path | None,
) -> None:
    """Give NAME a new password (random and shown once, or --choose your own; the old one stops working)."""
    sealed = None
    if choose or password_stdin:
        if password_stdin:
            password = sys.stdin.read().rstrip("\r\n")
        else:
            password = click.prompt("New password", hide_input=True, confirmation_prompt=True)
        key = client.request(VarsKey())["public_key"]  # sealed to the controller: never in plaintext
        sealed = seal_text(key, json.dumps({"password": password}))
    result = client.request(UsersPasswd(name=name, role=role, sealed=sealed))  # type: ignore[arg-type]
    if sealed is not None:
        result["password"] = password
        if fmt == "json":
            click.echo(output.to_json({**result, "password": ""}))
        else:
            click.echo(f"user {result['user']['name']} ({result['user']['role']}): password set")
        if write is not None:
            _shown_once(client, "quiet", result, write)
    else:
        _shown_once(client, fmt, result, write)
    if write is None and client.username == name:
        click.echo(
            f"tether: note: your credentials file still holds {name}'s old password: put the new one in it "
            "(or run this with --write FILE)",
            err=True,
        )


def _token_rows(rows: list[dict[str, Any]]) -> str:
    return output.table(
        ["ID", "USER", "SCOPE", "EXPIRES", "CREATED"],
        [
            (
                t["id"],
                t["user"],
                t["scope"],
                "expired" if t["expired"] else (output.when(t["expires"]) or "never"),
                output.when(t["created"]),
            )
            for t in rows
        ],
    )


@users.command("token")
@click.argument("name")
@click.option("--expires", default="90d", show_default=True, help="Lifetime (30m, 12h, 30d), or 'never'.")
@click.option("--scope", type=ROLES, default="admin", show_default=True, help="The most the token may do.")
@common
def users_token(client: ControllerClient, fmt: str, name: str, expires: str, scope: str) -> None:
    """A new API token of NAME for the HTTP API (Authorization: Bearer TOKEN), shown once."""
    expires_s = None if expires == "never" else days_or_duration(expires, "--expires")
    result = client.request(UsersToken(name=name, scope=scope, expires_s=expires_s))  # type: ignore[arg-type]
    if fmt == "json":
        click.echo(output.to_json(result))
        return
    click.echo(_token_rows([result]))
    click.echo(f"token (shown once): {result['token']}")


@users.command("tokens")
@click.argument("name", required=False)
@common
def users_tokens(client: ControllerClient, fmt: str, name: str | None) -> None:
    """List API tokens (of NAME, or everyone's), never the tokens themselves."""
    send_and_print(client, fmt, UsersTokens(name=name), _token_rows, key="tokens")


@users.command("revoke")
@click.argument("token_id")
@common
def users_revoke(client: ControllerClient, fmt: str, token_id: str) -> None:
    """Revoke the API token TOKEN_ID (tether users tokens lists them)."""
    send_and_print(
        client, fmt, UsersRevoke(token_id=token_id), lambda result: f"API token {result['revoked']} revoked"
    )


def register(main: click.Group) -> None:
    main.add_command(users)
