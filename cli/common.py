"""What every operator command shares: the broker/output/timeout options and error reporting."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError
from tether.protocol.codec import describe
from tether.protocol.errors import TetherError
from tether.protocol.secret_files import read_credentials

from .client import ControllerClient

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
DEFAULT_CREDENTIALS = Path("tether-data") / "operator.json"
"""What `tether up` writes in its default data dir: used when it exists and nothing else is given."""


def resolve_connection(
    broker: str | None,
    credentials: Path | None,
    ca_file: Path | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> tuple[str, str | None, str | None, str | None, tuple[str, str] | None]:
    """(broker URL, username, password, CA file, client certificate and key) from the options,
    the credentials file and the defaults.

    The file is ``--credentials``/``TETHER_CREDENTIALS``, else ``./tether-data/operator.json``
    if it exists. The broker is ``--broker``/``TETHER_BROKER``, else the file's ``broker``,
    else :data:`DEFAULT_BROKER`. The CA (for ``mqtts://``) is ``--ca-file``/``TETHER_CA_FILE``,
    else the file's ``ca_file`` (what ``tether up --tls`` writes), else the system's CAs. The
    client certificate (mTLS) is ``--tls-cert``/``--tls-key`` (``TETHER_TLS_CERT``/``_KEY``),
    else the file's ``tls_cert``/``tls_key`` (``tether up --require-client-cert``), else none.
    """
    path = (
        credentials
        if credentials is not None
        else (DEFAULT_CREDENTIALS if DEFAULT_CREDENTIALS.is_file() else None)
    )
    found = read_credentials(path) if path is not None else {}
    url = broker or found.get("broker") or DEFAULT_BROKER
    ca = str(ca_file) if ca_file is not None else found.get("ca_file")
    if (tls_cert is None) != (tls_key is None):
        raise TetherError("--tls-cert and --tls-key go together")
    cert = str(tls_cert) if tls_cert is not None else found.get("tls_cert")
    key = str(tls_key) if tls_key is not None else found.get("tls_key")
    return url, found.get("username"), found.get("password"), ca, (cert, key) if cert and key else None


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
        help=f"Operator credentials file (default: ./{DEFAULT_CREDENTIALS} if it exists).",
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
        fmt: str,
        request_timeout: float,
        **kwargs: Any,
    ) -> None:
        try:
            url, username, password, ca, cert = resolve_connection(
                broker, credentials, ca_file, tls_cert, tls_key
            )
            with ControllerClient(
                url,
                timeout=request_timeout,
                username=username,
                password=password,
                ca_file=ca,
                client_cert=cert,
            ) as client:
                fn(client, fmt, **kwargs)
        except TetherError as exc:
            fail(str(exc))
        except ValidationError as exc:  # a command built from out-of-bounds options
            fail(f"invalid {exc.title}: {describe(exc)}")

    return wrapper
