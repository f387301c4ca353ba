"""The shared wire protocol of Tether: topics, payload models, codec, errors and the transport seam.

Both the agent and the controller import this package; it imports neither of them.
Nearly everything here is pure (no I/O). The exceptions: :mod:`tether.protocol.mqtt` (the
paho client: sockets and a thread, behind :mod:`tether.protocol.transport`),
:mod:`tether.protocol.secret_files` (reads and writes private files) and
:mod:`tether.protocol.heap` (tunes the process's garbage collector).
:mod:`tether.protocol.credentials` draws random salts and tokens.
"""

from __future__ import annotations

__all__ = ["__version__"]


def __getattr__(name: str) -> str:
    """``__version__``, read from the installed distribution on first use: importing
    :mod:`importlib.metadata` costs a CLI call some 40 ms that most commands never need."""
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("tether")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        found = "0.0.0+unknown"
    globals()["__version__"] = found
    return found
