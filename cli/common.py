"""What every operator command shares: the broker/output/timeout options and error reporting."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import click
from tether.protocol.errors import TetherError

from .client import ControllerClient

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"


def fail(message: str, code: int = 1) -> None:
    """One line on stderr and a non-zero exit: never a traceback."""
    click.echo(f"tether: error: {message}", err=True)
    sys.exit(code)


def common(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--broker, -o and --request-timeout on every command; TetherError becomes a one-line message."""

    @click.option(
        "--broker", envvar="TETHER_BROKER", default=DEFAULT_BROKER, show_default=True, help="Broker URL."
    )
    @click.option("-o", "--output", "fmt", type=click.Choice(["table", "json"]), default="table")
    @click.option(
        "--request-timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for a reply."
    )
    @functools.wraps(fn)
    def wrapper(broker: str, fmt: str, request_timeout: float, **kwargs: Any) -> None:
        try:
            with ControllerClient(broker, timeout=request_timeout) as client:
                fn(client, fmt, **kwargs)
        except TetherError as exc:
            fail(str(exc))

    return wrapper
