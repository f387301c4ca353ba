"""The HTTP API's routes over a real controller and store (no process): auth, standby, errors."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient
from tether.controller.http import create_app
from tether.controller.security import ensure_operator_credentials
from tether.controller.service import Controller


def _client(controller: Controller, tmp_path: Path) -> TestClient:
    ensure_operator_credentials(controller.store, tmp_path, "mqtt://127.0.0.1:1883", 0.0)
    password = json.loads((tmp_path / "operator.json").read_text())["password"]
    client = TestClient(create_app(controller), base_url="http://127.0.0.1")
    client.auth = ("admin", password)
    return client


def test_a_standby_answers_reads_and_refuses_writes_with_503(controller: Controller, tmp_path: Path) -> None:
    """A standby controller answers GET /groups and refuses POST /groups with 503 (code unavailable)."""
    client = _client(controller, tmp_path)
    assert client.post("/api/v1/groups", json={"name": "a", "selector": "x=1"}).status_code == 201
    controller.leading.clear()
    listed = client.get("/api/v1/groups")
    assert listed.status_code == 200 and [g["name"] for g in listed.json()["groups"]] == ["a"]
    refused = client.post("/api/v1/groups", json={"name": "b", "selector": "x=1"})
    assert refused.status_code == 503 and refused.json()["code"] == "unavailable"
    assert "stands by" in refused.json()["detail"]
    assert controller.store.get_group("b") is None


def test_errors_are_problems_with_the_controllers_code(controller: Controller, tmp_path: Path) -> None:
    """Bad bodies are 422 naming every bad field, refusals keep their code, unknown paths 404 as before."""
    client = _client(controller, tmp_path)
    bad = client.post("/api/v1/groups", json={"name": 1, "devices": "x", "extra": True})
    assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"
    assert all(word in bad.json()["detail"] for word in ("name", "devices", "extra"))
    gone = client.delete("/api/v1/stacks/nope")
    assert gone.status_code == 404 and gone.json()["code"] == "not_found"
    assert client.get("/api/v1/nope").json()["code"] == "not_found"
    plain = client.get("/nope")
    assert (plain.status_code, plain.text) == (404, "not found\n")
    anonymous = TestClient(create_app(controller), base_url="http://127.0.0.1")
    assert anonymous.get("/api/v1/stacks").status_code == 401
    assert anonymous.get("/healthz").text == "ok\n"
    garbled = anonymous.get("/api/v1/stacks", headers={"Authorization": "Basic !!!"})
    assert garbled.status_code == 401 and "base64" in garbled.json()["detail"]
