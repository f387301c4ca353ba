"""uvicorn serving the controller's HTTP app on a thread of ``tether up``."""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn

from .app import create_app

if TYPE_CHECKING:
    from tether.controller.agent_install import InstallFiles
    from tether.controller.service import Controller

log = logging.getLogger(__name__)


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free one), IPv4 or IPv6 as ``host`` says."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class HttpServer:
    """The HTTP app (:func:`~.app.create_app`) on uvicorn, on its own thread.

    The socket is bound when the server is made, so :attr:`port` is known at once (``--http
    127.0.0.1:0`` picks a free port); :meth:`start` returns once uvicorn serves it.
    """

    def __init__(
        self,
        controller: Controller,
        host: str,
        port: int,
        install: InstallFiles | None = None,
        certificate: tuple[Path, Path] | None = None,
    ) -> None:
        """``certificate``: (certificate, key) PEM files to serve HTTPS with (None: plain HTTP)."""
        self.app = create_app(controller, install=install)
        self._socket = _bind(host, port)
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_config=None,  # the controller's logging (JSON lines or plain) as it is
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
            ssl_certfile=str(certificate[0]) if certificate else None,
            ssl_keyfile=str(certificate[1]) if certificate else None,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name="http", daemon=True)

    def _serve(self) -> None:
        try:
            self._server.run(sockets=[self._socket])
        except Exception:
            log.exception("the HTTP server stopped")

    def start(self, timeout: float = 10.0) -> None:
        """Serve; return once uvicorn listens (RuntimeError if it did not within ``timeout``)."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()
