"""The controller's HTTP app: operations endpoints, the device install, the JSON API, the UI.

    /healthz   200 while the process runs (liveness)
    /readyz    200 once connected to the broker and the store answers, else 503 (readiness)
    /metrics   Prometheus text format (controller/observability.py :class:`Metrics`)
    /install.sh, /agent/..., /ca.pem, /wheels/   the device install (agent_install.py)
    /api/v1/...  the JSON API over the controller's commands (api.py; docs/openapi.json)
    /          the web UI (tether.controller.ui, when it is installed)

The first four answer exactly as the standard-library server before them did (plain text,
no authentication). Everything under /api/ requires credentials (auth.py).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from tether.protocol import __version__
from tether.protocol.errors import TetherError

from . import problems

if TYPE_CHECKING:
    from tether.controller.agent_install import InstallFiles
    from tether.controller.service import Controller

API_PREFIX = "/api/v1"


def create_app(controller: Controller, install: InstallFiles | None = None) -> FastAPI:
    """The HTTP app of ``controller``; ``install``: the device install's files (None: not served)."""
    from . import auth
    from .api import router as api_router

    if controller is not None:  # None: only the routes, for the API documents (http/docs.py)
        controller.metrics.lockouts.doors["http"] = lambda: auth.LOCKOUT.lockouts
    app = FastAPI(
        title="Tether controller API",
        version=__version__,
        description=(
            "The controller's commands over HTTP: the same commands and result models as the "
            "MQTT request API (docs/topics.md). Errors are application/problem+json with the "
            "controller's error code."
        ),
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=None,  # FastAPI's Swagger page loads its JavaScript from a CDN: nothing from the internet
        redoc_url=None,
    )
    app.state.controller = controller
    app.add_exception_handler(HTTPException, problems.http_exception)
    app.add_exception_handler(RequestValidationError, problems.validation_exception)
    app.add_exception_handler(TetherError, problems.command_exception)
    app.add_exception_handler(ValidationError, problems.command_exception)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> Response:
        return PlainTextResponse("ok\n")

    @app.get("/readyz", include_in_schema=False)
    def readyz() -> Response:
        ready = controller.is_ready()
        return PlainTextResponse("ready\n" if ready else "not ready\n", status_code=200 if ready else 503)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(controller.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def download(request: Request) -> Response:
        found = install.get(request.url.path, request.headers.get("host", "")) if install else None
        if found is not None:
            return Response(found.data, media_type=found.content_type)
        if request.url.path == "/install.sh":
            return PlainTextResponse("the Host header is not HOST[:PORT]\n", status_code=400)
        return PlainTextResponse("not found\n", status_code=404)

    for path in ("/install.sh", "/ca.pem", "/agent/{name}", "/wheels/{name:path}"):
        app.add_api_route(path, download, methods=["GET"], include_in_schema=False)

    app.include_router(api_router, prefix=API_PREFIX)
    if importlib.util.find_spec("tether.controller.ui") is not None:  # the web UI (issue 20)
        importlib.import_module("tether.controller.ui").mount(app)
    return app
