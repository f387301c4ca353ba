"""Users end to end: a viewer can change nothing through any door, every write is audited, secrets never.

Real processes: `tether up` (embedded broker, and Mosquitto with Tether's dynamic security),
the CLI as the admin of operator.json and as a viewer (a credentials file from `tether users
add --write`), a raw paho client logged in as the viewer publishing on the topics it must
not use (the admin's request topic, the shared one of older CLIs, a device's request topic),
and the HTTP API (`tether up --http`) with the viewer's password and an admin API token.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import msgpack
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from support.infra import wait_until
from support.procs import BROKERS, ControllerProcess, cli, cli_json, secured_controller

pytestmark = [pytest.mark.e2e, pytest.mark.store]
R = "tether/v1"


@pytest.fixture(params=BROKERS)
def controller(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """`tether up` with authentication, on the embedded broker and on Mosquitto (dynamic security)."""
    with secured_controller(request.param, tmp_path, extra=["--http", "127.0.0.1:0"]) as ctl:
        monkeypatch.setenv("TETHER_CREDENTIALS", str(ctl.operator_file))
        yield ctl


def _forge(url: str, username: str, password: str, topics: list[str], prefix: str = "forged") -> None:
    """Publish a groups.create named ``{prefix}-{i}`` on each topic (QoS 1), as ``username``, raw paho."""
    host, port = url.removeprefix("mqtt://").rsplit(":", 1)
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"raw-{uuid.uuid4().hex[:8]}",
        protocol=paho.MQTTv311,
    )  # fmt: skip
    client.username_pw_set(username, password)
    client.connect(host, int(port), keepalive=30)
    client.loop_start()
    try:
        for i, topic in enumerate(topics):
            request = {
                "v": 1,
                "id": uuid.uuid4().hex,
                "reply_to": f"{R}/clients/{client._client_id.decode()}/replies",
                "command": {"kind": "groups.create", "name": f"{prefix}-{i}", "selector": "x=1"},
            }
            info = client.publish(topic, msgpack.packb(request), qos=1)
            info.wait_for_publish(10)  # Mosquitto acknowledges a denied publish; amqtt may drop it
    finally:
        client.disconnect()
        client.loop_stop()


def test_a_viewer_changes_nothing_and_every_write_is_audited(
    controller: ControllerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A viewer reads but is refused every write (CLI and raw MQTT on others' topics); the audit log
    names each write with its user, door and outcome, and holds no secret."""
    url = controller.url
    assert [u["name"] for u in cli_json(url, "users", "ls")] == ["admin"]  # the first admin user
    ann_file = tmp_path / "ann.json"
    added = cli_json(url, "users", "add", "ann", "--role", "viewer", "--write", str(ann_file))
    ann_password = added["password"]
    assert json.loads(ann_file.read_text())["username"] == "ann"
    cli_json(url, "vars", "set", "app/db", "password=s3cret-value")
    token = cli_json(url, "users", "token", "admin", "--expires", "30d")["token"]

    monkeypatch.setenv("TETHER_CREDENTIALS", str(ann_file))
    assert cli_json(url, "groups", "ls") == []  # a viewer reads
    assert cli_json(url, "vars", "ls")[0]["path"] == "app/db"
    refused = cli(url, "groups", "create", "edge", "--select", "x=1")
    assert refused.returncode != 0 and "viewer 'ann' may not groups.create" in refused.stderr
    assert cli(url, "users", "add", "eve", "--role", "admin").returncode != 0
    _forge(url, "ann", ann_password, [f"{R}/controller/requests/admin", f"{R}/controller/requests", f"{R}/devices/pi-1/requests", f"{R}/controller/requests/ann"])  # fmt: skip

    port = int(controller.wait_for_line(r"health and metrics on http://127.0.0.1:(\d+)/").group(1))
    api = f"http://127.0.0.1:{port}/api/v1"
    assert httpx.get(f"{api}/groups", auth=("ann", ann_password)).status_code == 200
    forbidden = httpx.post(
        f"{api}/groups", json={"name": "web", "selector": "x=1"}, auth=("ann", ann_password)
    )
    assert forbidden.status_code == 403 and forbidden.json()["code"] == "forbidden"
    bearer = {"Authorization": f"Bearer {token}"}
    assert (
        httpx.post(f"{api}/groups", json={"name": "by-token", "selector": "x=1"}, headers=bearer).status_code
        == 201
    )

    monkeypatch.setenv("TETHER_CREDENTIALS", str(controller.operator_file))
    # ann's own topic is answered (as ann: refused); the forged ones never ran as anyone
    records = wait_until(
        lambda: (
            (rows := cli_json(url, "audit", "--user", "ann"))
            and any(r["target"].get("name") == "forged-3" for r in rows)
            and rows
        ),
        timeout=30,
    )
    assert [(r["command"], r["target"].get("name"), r["outcome"], r["via"]) for r in records] == [
        ("groups.create", "edge", "forbidden", "mqtt"),
        ("users.add", "eve", "forbidden", "mqtt"),
        ("groups.create", "forged-3", "forbidden", "mqtt"),
        ("groups.create", "web", "forbidden", "http"),
    ]
    assert [r["address"] for r in records if r["via"] == "http"] == ["127.0.0.1"]
    assert all(r["address"].startswith(("tether-cli-", "raw-")) for r in records if r["via"] == "mqtt")
    groups = [g["name"] for g in cli_json(url, "groups", "ls")]
    assert groups == ["by-token"], groups
    everything = cli_json(url, "audit", "--since", "all")
    mine = [(r["user"], r["command"], r["via"], r["outcome"]) for r in everything if r["user"] == "admin"]
    assert mine == [
        ("admin", "users.add", "mqtt", "ok"),
        ("admin", "vars.set", "mqtt", "ok"),
        ("admin", "users.token", "mqtt", "ok"),
        ("admin", "groups.create", "http", "ok"),
    ]
    text = json.dumps(everything)
    for secret in ("s3cret-value", ann_password, token, token.split("_", 2)[2]):
        assert secret not in text
    assert "forged-0" not in text and "forged-1" not in text and "forged-2" not in text

    # an older CLI (the shared request topic) still works as admin
    admin_password = json.loads(controller.operator_file.read_text())["password"]
    _forge(url, "admin", admin_password, [f"{R}/controller/requests"], prefix="legacy")
    wait_until(lambda: "legacy-0" in [g["name"] for g in cli_json(url, "groups", "ls")], timeout=30)
    last = cli_json(url, "audit", "--user", "admin")[-1]
    assert (last["command"], last["target"]["name"], last["via"], last["outcome"]) == (
        "groups.create",
        "legacy-0",
        "mqtt",
        "ok",
    )
