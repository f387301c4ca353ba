"""The controller's HTTP side (``tether up --http HOST:PORT``): FastAPI on uvicorn, in a thread.

    app.py      :func:`create_app`: /healthz, /readyz, /metrics, the device install, the
                ``/api/v1`` JSON API and (when installed) the web UI's router
    api.py      the ``/api/v1`` routes: one route, one command (protocol/commands.py), run
                through :meth:`~tether.controller.service.Controller.submit`
    auth.py     who is asking (:func:`~.auth.authenticate`)
    problems.py controller errors as HTTP status codes and ``application/problem+json``
    server.py   :class:`HttpServer`: uvicorn on its own thread

See docs/adr/0006-http-stack.md for why this stack.
"""

from .app import create_app
from .server import HttpServer

__all__ = ["HttpServer", "create_app"]
