"""What every operator command shares: the broker/output/timeout options and error reporting."""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from pydantic import BaseModel, ValidationError
from tether.protocol.client import ControllerClient
from tether.protocol.codec import describe
from tether.protocol.durations import parse_duration
from tether.protocol.errors import ConfigError, TetherError
from tether.protocol.secret_files import read_credentials

from . import output
from .contexts import CONTEXT_ENV, Config, Context, lookup_order

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
# The broker's refusals for missing or wrong credentials (CONNACK 4 and 5).
_REFUSED = re.compile(r"not authori[sz]ed|bad user ?name or password", re.I)
DEFAULT_CREDENTIALS = Path("tether-data") / "operator.json"
"""What `tether up` writes in its default data dir: used when it exists and nothing else is given."""


@dataclass(frozen=True)
class Connection:
    """Where and as whom a command connects, and where that came from (for `Not authorized`)."""

    url: str
    username: str | None
    password: str | None
    ca_file: str | None
    client_cert: tuple[str, str] | None
    source: str


def resolve_connection(
    broker: str | None,
    credentials: Path | None,
    ca_file: Path | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    context: str | None = None,
) -> Connection:
    """The connection from the options, the credentials file, the contexts and the defaults.

    The credentials file is ``--credentials``/``TETHER_CREDENTIALS``, else the context
    ``--context``/``TETHER_CONTEXT``'s, else ``./tether-data/operator.json`` if it exists,
    else the current context's (cli/contexts.py). The broker is ``--broker``/``TETHER_BROKER``,
    else the context's, else the file's ``broker``, else :data:`DEFAULT_BROKER`. The CA (for
    ``mqtts://``) is ``--ca-file``/``TETHER_CA_FILE``, else the context's, else the file's
    ``ca_file`` (what ``tether up --tls`` writes), else the system's CAs. The client
    certificate (mTLS) is ``--tls-cert``/``--tls-key`` (``TETHER_TLS_CERT``/``_KEY``), else
    the file's ``tls_cert``/``tls_key`` (``tether up --require-client-cert``), else none.
    """
    chosen: Context | None = None
    if credentials is not None:
        path: Path | None = credentials
        source = f"--credentials/TETHER_CREDENTIALS {credentials}"
    elif context is not None:
        chosen = Config.load().get(context)
        path = Path(chosen.credentials) if chosen.credentials else None
        source = f"context {context!r} ({path})"
    elif DEFAULT_CREDENTIALS.is_file():
        path = DEFAULT_CREDENTIALS
        source = f"./{DEFAULT_CREDENTIALS}"
    else:
        config = Config.load()
        chosen = config.contexts.get(config.current) if config.current else None
        path = Path(chosen.credentials) if chosen and chosen.credentials else None
        source = f"current context {chosen.name!r} ({path})" if chosen else "none found"
        if chosen and path is not None and not path.exists():
            raise ConfigError(
                f"the current context {chosen.name!r} ({config.path}) names {path}, which does not exist: "
                f"start that `tether up` again, or tether context use OTHER, tether context rm {chosen.name}, "
                "--credentials FILE"
            )
    found = read_credentials(path) if path is not None else {}
    url = broker or (chosen.broker if chosen else None) or found.get("broker") or DEFAULT_BROKER
    ca = str(ca_file) if ca_file is not None else (chosen.ca_file if chosen else None) or found.get("ca_file")
    if (tls_cert is None) != (tls_key is None):
        raise TetherError("--tls-cert and --tls-key go together")
    cert = str(tls_cert) if tls_cert is not None else found.get("tls_cert")
    key = str(tls_key) if tls_key is not None else found.get("tls_key")
    return Connection(
        url, found.get("username"), found.get("password"), ca, (cert, key) if cert and key else None, source
    )


def fail(message: str, code: int = 1) -> None:
    """One line on stderr and a non-zero exit: never a traceback."""
    click.echo(f"tether: error: {message}", err=True)
    sys.exit(code)


def common(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--broker, --credentials, -o and --request-timeout on every command; TetherError becomes one line."""

    @click.option(
        "--broker",
        envvar="TETHER_BROKER",
        default=None,
        help=f"Broker URL (default: the credentials file's, else {DEFAULT_BROKER}).",
    )
    @click.option(
        "--credentials",
        envvar="TETHER_CREDENTIALS",
        type=click.Path(path_type=Path, dir_okay=False),
        default=None,
        help=f"Operator credentials file, or TETHER_CREDENTIALS (default: ./{DEFAULT_CREDENTIALS} if it "
        "exists, else the current context's: tether context ls).",
    )
    @click.option(
        "--ca-file",
        envvar="TETHER_CA_FILE",
        type=click.Path(path_type=Path, dir_okay=False),
        default=None,
        help="CA certificate to verify an mqtts:// broker (default: the credentials file's ca_file).",
    )
    @click.option(
        "--tls-cert",
        envvar="TETHER_TLS_CERT",
        type=click.Path(path_type=Path, dir_okay=False),
        default=None,
        help="Client certificate for a broker requiring one (default: the credentials file's tls_cert).",
    )
    @click.option(
        "--tls-key",
        envvar="TETHER_TLS_KEY",
        type=click.Path(path_type=Path, dir_okay=False),
        default=None,
        help="Its private key (default: the credentials file's tls_key).",
    )
    @click.option(
        "--context",
        envvar=CONTEXT_ENV,
        default=None,
        help="A named context of your configuration, or TETHER_CONTEXT (tether context ls; tether login "
        "adds one).",
    )
    @click.option("-o", "--output", "fmt", type=click.Choice(["table", "json"]), default="table")
    @click.option(
        "--request-timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for a reply."
    )
    @functools.wraps(fn)
    def wrapper(
        broker: str | None,
        credentials: Path | None,
        ca_file: Path | None,
        tls_cert: Path | None,
        tls_key: Path | None,
        context: str | None,
        fmt: str,
        request_timeout: float,
        **kwargs: Any,
    ) -> None:
        connection: Connection | None = None
        try:
            connection = resolve_connection(broker, credentials, ca_file, tls_cert, tls_key, context)
            with ControllerClient(
                connection.url,
                timeout=request_timeout,
                username=connection.username,
                password=connection.password,
                ca_file=connection.ca_file,
                client_cert=connection.client_cert,
            ) as client:
                fn(client, fmt, **kwargs)
        except TetherError as exc:
            message = str(exc)
            if connection is not None and _REFUSED.search(message):
                message += f" (credentials: {connection.source}; looked at {lookup_order()})"
            fail(message)
        except ValidationError as exc:  # a command built from out-of-bounds options
            fail(f"invalid {exc.title}: {describe(exc)}")

    return wrapper


def send_and_print(
    client: ControllerClient,
    fmt: str,
    command: BaseModel,
    text: Callable[[Any], str | list[str]],
    *,
    key: str | None = None,
) -> Any:
    """Send ``command`` to the controller, then print its result: as JSON with ``-o json``,
    else ``text(result)``: a table or a line, or a list of lines (none for an empty list).
    With ``key``, only ``result[key]`` is shown (and given to ``text``). Returns what was shown.

    The shape of most commands; those that do more between the request and the printing
    (follow a deployment, write a file, ask a device) call :meth:`ControllerClient.request`."""
    result = client.request(command)
    shown = result[key] if key is not None else result
    if fmt == "json":
        click.echo(output.to_json(shown))
        return shown
    rendered = text(shown)
    for line in [rendered] if isinstance(rendered, str) else rendered:
        click.echo(line)
    return shown


def read_pages(
    client: ControllerClient, page: Callable[[str | None], BaseModel], key: str
) -> tuple[dict[str, Any], list[Any]]:
    """Every page of a paged listing: ``page(after)`` is the request for the page after that
    cursor (None: the first); returns the last reply and the rows of every page under ``key``.
    A controller from before paging answers with every row in one reply, no ``next``."""
    result: dict[str, Any] = client.request(page(None))
    rows = list(result[key])
    while result.get("next"):
        result = client.request(page(result["next"]))
        rows.extend(result[key])
    return result, rows


def duration_option(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """A click callback: a Compose duration (``30s``, ``5m``) in seconds; None stays None."""
    if value is None:
        return None
    where = param.opts[0] if param.opts else "duration"  # --every, not the internal every_s
    try:
        return parse_duration(value, where)
    except TetherError as exc:  # click names the option already
        raise click.BadParameter(str(exc).removeprefix(f"{where}: ")) from exc


def wait_timeout_option(
    ctx: click.Context, param: click.Parameter, value: str | float | None
) -> float | None:
    """--timeout: a duration (5m, 90s) or, as before, a number of seconds."""
    if value is None or isinstance(value, float):
        return value
    try:
        return float(value) if value.replace(".", "", 1).isdigit() else parse_duration(value, "--timeout")
    except TetherError as exc:  # click names the option already
        raise click.BadParameter(str(exc).removeprefix("--timeout: ")) from exc
