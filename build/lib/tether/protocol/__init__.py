"""The shared wire protocol of Tether: topics, payload models, codec and errors.

Both the agent and the controller import this package; it imports neither of them.
Everything here except :mod:`tether.protocol.mqtt` is pure (no I/O).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tether")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
