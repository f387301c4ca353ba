"""The HTTP API against its own OpenAPI document (schemathesis), on a real `tether up --http`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from support.procs import ControllerProcess

pytestmark = [pytest.mark.e2e]

DOCS = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"
SKIPPED = ("/api/v1/events", "/api/v1/deployments/{id}/follow")
"""Streams (server-sent events) never end: tested in test_e2e_http_api.py."""
SELF_HARM = ("users.rm", "users.passwd")
"""Would remove or change the admin credential the rest of the run authenticates with."""


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A controller with --http; its API's base URL and the admin credential."""
    data = tmp_path_factory.mktemp("schemathesis")
    controller = ControllerProcess(data / "c", extra=["--http", "127.0.0.1:0"])
    try:
        port = int(controller.wait_for_line(r"health and metrics on http://127.0.0.1:(\d+)/").group(1))
        password = json.loads((data / "c" / "operator.json").read_text())["password"]
        yield {"base": f"http://127.0.0.1:{port}", "auth": ("admin", password)}
    finally:
        controller.stop()


def test_the_served_document_is_the_checked_in_one(live: dict[str, Any]) -> None:
    """/api/v1/openapi.json serves exactly docs/openapi.json (regenerate with scripts/gen-api-docs)."""
    served = httpx.get(f"{live['base']}/api/v1/openapi.json", timeout=30).json()
    assert served == json.loads(DOCS.read_text()), (
        "docs/openapi.json is out of date: run scripts/gen-api-docs"
    )


def test_api_conforms_to_its_document(live: dict[str, Any]) -> None:
    """Generated requests to every operation: never a 5xx; status, content type and body as documented."""
    schema = schemathesis.openapi.from_url(f"{live['base']}/api/v1/openapi.json")
    schema = schema.exclude(path=list(SKIPPED)).exclude(operation_id=[k.replace(".", "_") for k in SELF_HARM])
    failures: dict[str, str] = {}
    statuses: dict[int, int] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 40

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def run(case: Any) -> None:
            response = case.call_and_validate(
                auth=live["auth"],
                timeout=30,
                checks=[
                    not_a_server_error,
                    status_code_conformance,
                    content_type_conformance,
                    response_schema_conformance,
                ],
            )
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        try:
            run()
        except Exception as exc:  # every operation's problem at once
            failures[operation.label] = f"{type(exc).__name__}: {exc}"[:2000]
    assert not failures, "\n\n".join(f"{k}: {v}" for k, v in failures.items())
    assert sum(statuses.values()) >= len(operations), statuses  # requests were really sent
    assert statuses.get(200, 0) + statuses.get(201, 0) > 0 and statuses.get(422, 0) > 0, statuses
