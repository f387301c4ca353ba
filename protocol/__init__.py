"""The shared wire protocol of Tether: topics, payload models, codec, errors and the transport seam.

Both the agent and the controller import this package; it imports neither of them.
Nearly everything here is pure (no I/O). The exceptions: :mod:`tether.protocol.mqtt` (the
paho client: sockets and a thread, behind :mod:`tether.protocol.transport`),
:mod:`tether.protocol.secret_files` (reads and writes private files) and
:mod:`tether.protocol.heap` (tunes the process's garbage collector).
:mod:`tether.protocol.credentials` draws random salts and tokens.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tether")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
