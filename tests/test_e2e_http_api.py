"""The HTTP API (/api/v1) of a real `tether up --http` with a real agent: a deploy with an API
credential followed to the end over server-sent events, the fleet's events, errors mapped to
HTTP status codes with a problem body."""

from __future__ import annotations

import json
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.infra import wait_until
from support.procs import AgentProcess, ControllerProcess, cli

pytestmark = [pytest.mark.e2e, pytest.mark.store]

COMPOSE = 'services:\n  s:\n    command: ["sleep", "600"]\n'


def _sse(lines: Any) -> Any:
    """(event, data) of each server-sent event read from ``lines``."""
    event, data = "message", []
    for line in lines:
        if line == "":
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def _problem(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status and body["code"] == code, body
    return str(body["detail"])


def test_deploy_over_http_with_events_and_errors(tmp_path: Path) -> None:
    """A CI-style deploy with curl-like calls: 401 without credentials, 422/400/404/409 problems,
    the deployment returned and followed (SSE) to succeeded, the fleet stream tells the same,
    and the deploy counted in /metrics as an MQTT request would be."""
    controller = ControllerProcess(tmp_path / "c", extra=["--http", "127.0.0.1:0"])
    device = f"api-{uuid.uuid4().hex[:6]}"
    agent = AgentProcess(controller.url, device, tmp_path / "agent")
    try:
        port = int(controller.wait_for_line(r"health and metrics on http://127.0.0.1:(\d+)/").group(1))
        password = json.loads((tmp_path / "c" / "operator.json").read_text())["password"]
        base = f"http://127.0.0.1:{port}/api/v1"
        anonymous = httpx.Client(base_url=base, timeout=30)
        api = httpx.Client(base_url=base, auth=("admin", password), timeout=30)

        refused = anonymous.get("/devices")
        _problem(refused, 401, "unauthenticated")
        assert refused.headers["www-authenticate"].startswith("Basic")
        _problem(httpx.get(f"{base}/devices", auth=("admin", "wrong")), 401, "unauthenticated")
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").text == "ok\n"  # no credentials needed

        wait_until(
            lambda: any(
                d["id"] == device and d["status"] == "online" for d in api.get("/devices").json()["devices"]
            ),
            30,
            0.2,
            "the device online in GET /devices",
        )
        created = api.post("/groups", json={"name": "lab", "devices": [device]})
        assert created.status_code == 201 and created.json()["group"]["devices"] == [device]
        assert "unknown group 'nope'" in _problem(api.get("/groups/nope"), 404, "not_found")
        detail = _problem(
            api.post("/stacks/web/deploy", json={"group": "lab", "compose": COMPOSE, "colour": 1}),
            422,
            "invalid",
        )
        assert "colour" in detail
        _problem(
            api.post("/stacks/web/deploy", json={"group": "lab", "compose": "services: [1"}), 400, "invalid"
        )

        heard: list[tuple[str, dict[str, Any]]] = []
        listening = threading.Event()

        def listen() -> None:
            with api.stream("GET", "/events", params={"kinds": ["deployment.started", "deployment.succeeded"]},
                            timeout=httpx.Timeout(30, read=60)) as stream:  # fmt: skip
                assert stream.status_code == 200
                listening.set()
                for event, data in _sse(stream.iter_lines()):
                    heard.append((event, data))
                    if event == "deployment.succeeded":
                        return

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        assert listening.wait(30)
        strategy = {"min_healthy_time_s": 1}
        deployed = api.post(
            "/stacks/web/deploy", json={"group": "lab", "compose": COMPOSE, "strategy": strategy}
        )
        assert deployed.status_code == 200, deployed.text
        answer = deployed.json()
        assert deployed.headers["location"] == f"/api/v1/deployments/{answer['deployment']}"
        assert answer["stack"]["name"] == "web" and answer["devices"] == [device] and answer["changed"]
        deployment = api.get(f"/deployments/{answer['deployment']}").json()["deployment"]
        assert deployment["stack"] == "web" and deployment["state"] in ("running", "succeeded")

        states = []
        with api.stream(
            "GET", f"/deployments/{deployment['id']}/follow", timeout=httpx.Timeout(30, read=90)
        ) as s:
            assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
            for event, data in _sse(s.iter_lines()):
                assert event == "deployment"
                states.append(data["deployment"]["state"])
        assert states[-1] == "succeeded", states  # the stream ends once the deployment does
        listener.join(60)
        kinds = [event for event, _ in heard]
        assert kinds[:1] == ["deployment.started"] and kinds[-1] == "deployment.succeeded", heard
        assert all(data["subject"] == "stacks/web" for _, data in heard)

        status = api.get(f"/deployments/{deployment['id']}").json()["deployment"]
        assert status["state"] == "succeeded" and status["devices"][device]
        _problem(api.post(f"/deployments/{deployment['id']}/pause"), 409, "conflict")
        _problem(api.get("/deployments/0"), 422, "invalid")
        shown = api.get("/stacks/web").json()
        assert shown["compose"] == COMPOSE or "sleep" in json.dumps(shown)
        listed = cli(controller.url, "stacks", "ls", "-o", "json")  # the CLI sees what HTTP deployed
        assert listed.returncode == 0 and "web" in listed.stdout

        # CI: an operator's API token and curl alone, the Compose file as it is, answered once it ended.
        assert api.post("/users", json={"name": "ci", "role": "operator"}).status_code == 201
        assert api.post("/users", json={"name": "watcher", "role": "viewer"}).status_code == 201
        tokens = {u: api.post(f"/users/{u}/tokens", json={"scope": r}).json()["token"]
                  for u, r in (("ci", "operator"), ("watcher", "viewer"))}  # fmt: skip
        (tmp_path / "ci.yml").write_text(COMPOSE.replace("600", "601"))

        def curl(token: str, *args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["curl", "-sS", "-w", "\n%{http_code}", "-H", f"Authorization: Bearer {token}", *args],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip

        url = f"{base}/stacks/ci/compose?group=lab&min_healthy_time_s=1&wait_s=60"
        yaml_args = ["-H", "Content-Type: application/yaml", "--data-binary", f"@{tmp_path / 'ci.yml'}", url]
        refused = curl(tokens["watcher"], *yaml_args)
        assert refused.stdout.endswith("\n403") and '"code":"forbidden"' in refused.stdout, refused.stdout
        done = curl(tokens["ci"], *yaml_args)
        body, _, code = done.stdout.rpartition("\n")
        assert code == "200", done.stdout + done.stderr
        assert json.loads(body)["stack"]["name"] == "ci"
        ci = api.get("/deployments", params={"stack": "ci"}).json()["deployments"]
        assert [d["state"] for d in ci] == ["succeeded"]  # answered once it had ended
        audit = api.get("/audit", params={"user": "ci"}).json()
        assert "stacks.deploy" in json.dumps(audit)

        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'tether_requests_total{command="stacks.deploy",outcome="ok"} 2.0' in metrics
        assert 'tether_requests_total{command="groups.show",outcome="error"} 1.0' in metrics
    finally:
        agent.stop()
        controller.stop()


def test_http_tls_serves_the_api_over_https(tmp_path: Path) -> None:
    """--http-tls serves HTTPS with the quick-start certificate (verified against its CA): the
    health check, the API with credentials, and an install script whose URLs are https."""
    controller = ControllerProcess(
        tmp_path / "c", auth=True, extra=["--tls", "--http", "127.0.0.1:0", "--http-tls"]
    )
    try:
        port = int(controller.wait_for_line(r"health and metrics on https://127.0.0.1:(\d+)/").group(1))
        ca = str(tmp_path / "c" / "tls" / "ca.pem")
        password = json.loads((tmp_path / "c" / "operator.json").read_text())["password"]
        base = f"https://127.0.0.1:{port}"
        assert httpx.get(f"{base}/healthz", verify=ca).text == "ok\n"
        listed = httpx.get(f"{base}/api/v1/devices", auth=("admin", password), verify=ca)
        assert listed.status_code == 200 and "devices" in listed.json()
        script = httpx.get(f"{base}/install.sh", verify=ca).text
        assert f"https://127.0.0.1:{port}/agent/tether-" in script and "http://127.0.0.1" not in script
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)  # plain HTTP is not served
    finally:
        controller.stop()
