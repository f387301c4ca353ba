"""Named contexts: which controller the CLI talks to, as whom (like kubeconfig's contexts).

A per-user file, ``$TETHER_CLI_CONFIG``, else ``$XDG_CONFIG_HOME/tether/config.json``, else
``~/.config/tether/config.json`` (0600), holds named contexts and the current one::

    {"current": "local",
     "contexts": {"local": {"broker": "mqtt://127.0.0.1:1883",
                            "credentials": "/home/ana/tether/tether-data/operator.json"}}}

``tether up`` writes the context ``local`` (its data dir's operator.json, which it keeps up
to date) for the user who runs it; ``tether login --credentials FILE`` copies a credentials
file an operator was given into the configuration directory (0600) and makes it current;
``tether context ls|use|rm`` manage them.

Where a command finds its connection, first match wins (cli/common.py resolve_connection):
``--credentials``/``TETHER_CREDENTIALS``, ``--context``/``TETHER_CONTEXT``,
``./tether-data/operator.json`` (a `tether up` in this directory), the current context.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import click
from tether.protocol import names
from tether.protocol.errors import ConfigError, TetherError
from tether.protocol.secret_files import read_credentials, write_secret_text

from . import output

CONFIG_ENV = "TETHER_CLI_CONFIG"
CONTEXT_ENV = "TETHER_CONTEXT"
LOCAL = "local"
_KEYS = ("broker", "credentials", "ca_file")


def config_path() -> Path:
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "tether" / "config.json"


@dataclass(frozen=True)
class Context:
    name: str
    broker: str | None = None
    credentials: str | None = None
    ca_file: str | None = None


@dataclass
class Config:
    path: Path
    current: str | None
    contexts: dict[str, Context]

    @classmethod
    def load(cls, path: Path | None = None) -> Config:
        """The file, or an empty configuration if there is none; one error naming the file if it is bad."""
        path = path or config_path()
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return cls(path, None, {})
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: not a Tether CLI configuration ({exc})") from None
        problems = []
        contexts: dict[str, Context] = {}
        raw = data.get("contexts", {}) if isinstance(data, dict) else None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected an object with 'contexts'")
        for name, entry in raw.items():
            problem = names.NAME.problem(name)
            if problem or not isinstance(entry, dict):
                problems.append(problem or f"context {name!r}: expected an object")
                continue
            unknown = sorted(set(entry) - set(_KEYS))
            bad = [k for k in _KEYS if entry.get(k) is not None and not isinstance(entry[k], str)]
            if unknown or bad:
                problems.append(
                    f"context {name!r}: unknown keys {unknown}"
                    if unknown
                    else f"context {name!r}: {bad[0]} must be a string"
                )
                continue
            contexts[name] = Context(name, *(entry.get(k) for k in _KEYS))
        current = data.get("current")
        if current is not None and current not in contexts:
            problems.append(f"current context {current!r} is not defined")
        if problems:
            raise ConfigError(f"{path}: " + "; ".join(problems))
        return cls(path, current, contexts)

    def save(self) -> None:
        data = {
            "current": self.current,
            "contexts": {
                c.name: {k: getattr(c, k) for k in _KEYS if getattr(c, k) is not None}
                for c in sorted(self.contexts.values(), key=lambda c: c.name)
            },
        }
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_secret_text(self.path, json.dumps(data, indent=2) + "\n")

    def get(self, name: str) -> Context:
        if name not in self.contexts:
            known = ", ".join(sorted(self.contexts)) or "none"
            raise ConfigError(f"no context {name!r} in {self.path} (known: {known}; tether context ls)")
        return self.contexts[name]


def remember_local(operator_file: Path) -> Path | None:
    """`tether up`: the context ``local`` (its operator credentials file, whose broker and CA it
    keeps up to date) for this user, current unless another one is. Never fails the
    controller: a configuration that cannot be read or written is left alone (None)."""
    try:
        config = Config.load()
        config.contexts[LOCAL] = Context(LOCAL, credentials=str(operator_file.resolve()))
        if config.current is None:
            config.current = LOCAL
        config.save()
        return config.path
    except (OSError, TetherError):
        return None


def register(main: click.Group) -> None:
    main.add_command(login)
    main.add_command(context)


def _add(name: str, credentials: Path, broker: str | None, ca_file: Path | None) -> Config:
    problem = names.NAME.problem(name)
    if problem:
        raise ConfigError(problem)
    found = read_credentials(credentials)  # one error if it is not a credentials file
    broker = broker or found.get("broker")
    if not broker:
        raise ConfigError(f"{credentials} names no broker: give --broker URL")
    config = Config.load()
    copy = config.path.parent / "credentials" / f"{name}.json"
    copy.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_secret_text(copy, credentials.read_text())
    config.contexts[name] = Context(name, broker, str(copy), str(ca_file.resolve()) if ca_file else None)
    config.current = name
    config.save()
    return config


@click.command("login")
@click.option(
    "--credentials",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    required=True,
    help="An operator credentials file (the controller host's tether-data/operator.json).",
)
@click.option("--name", default="default", show_default=True, help="The context's name.")
@click.option("--broker", default=None, help="Broker URL as seen from here (default: the file's).")
@click.option("--ca-file", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None)
def login(credentials: Path, name: str, broker: str | None, ca_file: Path | None) -> None:
    """Keep CREDENTIALS as context NAME in your configuration and make it current."""
    try:
        config = _add(name, credentials, broker, ca_file)
    except TetherError as exc:
        _fail(exc)
    click.echo(f"context {name}: {config.contexts[name].broker}, now current ({config.path})")


@click.group("context")
def context() -> None:
    """Named contexts: which controller the CLI talks to, as whom (tether login adds one)."""


@context.command("ls")
@click.option("-o", "--output", "fmt", type=click.Choice(["table", "json"]), default="table")
def context_ls(fmt: str) -> None:
    """The contexts of your configuration; * marks the current one."""
    config = _load_or_fail()
    rows = [
        {
            "name": c.name,
            "current": c.name == config.current,
            "broker": c.broker,
            "credentials": c.credentials,
        }
        for c in sorted(config.contexts.values(), key=lambda c: c.name)
    ]
    if fmt == "json":
        click.echo(output.to_json(rows))
        return
    if not rows:
        click.echo(f"no contexts in {config.path} (tether up writes 'local'; tether login adds one)")
        return
    table = [
        ("*" if r["current"] else "", r["name"], r["broker"] or "-", r["credentials"] or "-") for r in rows
    ]
    click.echo(output.table(("CURRENT", "NAME", "BROKER", "CREDENTIALS"), table))


@context.command("use")
@click.argument("name")
def context_use(name: str) -> None:
    """Make NAME the current context."""
    config = _load_or_fail()
    try:
        config.get(name)
    except TetherError as exc:
        _fail(exc)
    config.current = name
    config.save()
    click.echo(f"current context: {name}")


@context.command("rm")
@click.argument("name")
def context_rm(name: str) -> None:
    """Forget context NAME (and the credentials `tether login` copied for it)."""
    config = _load_or_fail()
    try:
        entry = config.get(name)
    except TetherError as exc:
        _fail(exc)
    del config.contexts[name]
    if config.current == name:
        config.current = None
    config.save()
    copy = config.path.parent / "credentials" / f"{name}.json"
    if entry.credentials == str(copy):
        copy.unlink(missing_ok=True)
    click.echo(f"context {name} removed" + ("" if config.current else " (no current context now)"))


def _fail(exc: TetherError) -> NoReturn:
    from .common import fail  # common resolves connections with this module

    fail(str(exc))
    raise AssertionError("unreachable")


def _load_or_fail() -> Config:
    try:
        return Config.load()
    except TetherError as exc:
        _fail(exc)


def lookup_order() -> str:
    """Where a command looks for credentials, in order (for a `Not authorized`)."""
    return (
        f"--credentials/TETHER_CREDENTIALS, --context/{CONTEXT_ENV}, ./tether-data/operator.json, "
        f"the current context in {config_path()}"
    )
