"""Enrollment end to end: fleet tokens, the waiting room, approval, refusal.

Real processes: `tether up` with auth (on the embedded broker and on Mosquitto with its
dynamic security plugin), `tether-agent` with an enrollment token in its config file (the
same file for every device of a batch), and the CLI.
"""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import msgpack
import pytest
from support.infra import wait_until
from support.procs import (
    BROKERS,
    AgentProcess,
    ControllerProcess,
    cli,
    cli_json,
    device_view,
    secured_controller,
    wait_online,
)
from tether.protocol import codec, topics
from tether.protocol.credentials import enroll_username
from tether.protocol.enrollment import new_private_key, public_key_b64
from tether.protocol.models import DeviceFacts, EnrollmentRequest, Event
from tether.protocol.mqtt import MqttClient, parse_broker_url

pytestmark = pytest.mark.e2e
# On PostgreSQL too (scripts/test's second pass) only the tests marked `store` below: every
# line of controller/store.py and lease.py that the batch test runs on PostgreSQL is run there by the
# store-level tests and the other `store` tests (coverage compared per line).

SERVICE = """
services:
  worker:
    command: ["sh", "-c", "echo $$TETHER_MARK >> {out}; exec sleep 600"]
    environment:
      TETHER_MARK: running
"""


@pytest.fixture(params=BROKERS)
def controller(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """`tether up` with authentication, on the embedded broker and on Mosquitto (dynamic security)."""
    with secured_controller(request.param, tmp_path) as ctl:
        monkeypatch.setenv("TETHER_CREDENTIALS", str(ctl.operator_file))
        yield ctl


def _config(tmp_path: Path, url: str, token: str, labels: dict[str, str] | None = None) -> Path:
    """One agent config file for a whole batch: brokers, token, labels (no device id)."""
    path = tmp_path / "agent.toml"
    lines = [f'brokers = ["{url}"]', f'enrollment_token = "{token}"', "[labels]"]
    lines += [f'{k} = "{v}"' for k, v in (labels or {}).items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _agent(url: str, tmp_path: Path, device_id: str, config: Path) -> AgentProcess:
    return AgentProcess(url, device_id, tmp_path / device_id, extra=["--config", str(config)])


def _pending(url: str) -> dict[str, dict]:  # type: ignore[type-arg]
    return {d["id"]: d for d in cli_json(url, "devices", "pending")}


def test_batch_waits_then_approved_devices_run_a_stack(controller: ControllerProcess, tmp_path: Path) -> None:
    """Two devices with the same config file land pending, get approved, come online with
    their own credentials, match the token's group through its label, and run a stack."""
    url = controller.url
    cli_json(url, "groups", "create", "batch", "--select", "batch=b1")
    cli_json(url, "groups", "create", "zoned", "--select", "zone=z1")
    cli_json(url, "groups", "create", "claimed", "--select", "site=lab")  # what the devices say of themselves
    created = cli_json(url, "tokens", "create", "--group", "batch", "--label", "batch=b1", "--uses", "5")
    assert created["token"].startswith("tet_") and created["uses"] == 5
    config = _config(tmp_path, url, created["token"], {"site": "lab"})
    agents = [_agent(url, tmp_path, d, config) for d in ("batch-1", "batch-2")]
    try:
        pending = wait_until(lambda: len(p := _pending(url)) == 2 and p, 30, message="two pending devices")
        assert {d["state"] for d in pending.values()} == {"pending"}
        assert pending["batch-1"]["labels"]["site"] == "lab" and pending["batch-1"]["labels"]["batch"] == "b1"
        time.sleep(1)
        for agent in agents:  # nothing for a pending device
            assert not (agent.data_dir / "credentials.json").exists()
            assert (
                device_view(url, agent.device_id) is None
                or device_view(url, agent.device_id)["status"] != "online"
            )
        tokens = cli_json(url, "tokens", "ls")
        assert tokens[0]["used"] == 2 and "token" not in tokens[0]
        db = controller.operator_file.parent / "tether.db"
        if db.exists():  # SQLite (with PostgreSQL the store is elsewhere): only the token's hash
            stored = b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal")) if p.exists())
            assert created["token"].encode() not in stored

        nothing = cli_json(url, "devices", "approve", "--all", "--select", "site=elsewhere")
        assert nothing["approved"] == []
        approved = cli_json(url, "devices", "approve", "--all", "--select", "site=lab", "--label", "zone=z1")
        assert sorted(approved["approved"]) == ["batch-1", "batch-2"]
        for agent in agents:
            wait_online(url, agent.device_id)
            saved = json.loads((agent.data_dir / "credentials.json").read_text())
            assert saved["username"] == agent.device_id
            assert stat.S_IMODE((agent.data_dir / "credentials.json").stat().st_mode) == 0o600
            assert stat.S_IMODE((agent.data_dir / "enroll.key").stat().st_mode) == 0o600
            agent.wait_for_line(r"enrolled: credentials for")
        assert _pending(url) == {}
        group = cli_json(url, "groups", "show", "batch")
        assert sorted(group["members"]) == ["batch-1", "batch-2"]
        # Labels pinned by the token and at approval are trusted; the device's own are not.
        assert sorted(cli_json(url, "groups", "show", "zoned")["members"]) == ["batch-1", "batch-2"]
        assert cli_json(url, "groups", "show", "claimed")["members"] == []
        shown = cli_json(url, "devices", "show", "batch-1")
        assert shown["label_sources"] == {"batch": "enrollment", "site": "device", "zone": "enrollment"}

        out = tmp_path / "worker.out"
        stack = tmp_path / "worker.yml"
        stack.write_text(SERVICE.format(out=out))
        deploy = cli(url, "stacks", "deploy", str(stack), "--name", "worker", "--group", "batch", "--wait",
                     "--min-healthy-time", "1s", "--timeout", "60")  # fmt: skip
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        wait_until(lambda: out.exists() and out.read_text().count("running") == 2, 20, message="two workers")
        controller.wait_for_line(r"device batch-1 enrolled and online")
        _events_arrive_once_and_a_bad_batch_is_refused(controller, agents)
    finally:
        for agent in agents:
            agent.stop()


def _stored_events(url: str, device_id: str) -> list[tuple[int, str]]:
    return [(e["seq"], e["kind"]) for e in cli_json(url, "devices", "show", device_id)["events"]]


def _events_arrive_once_and_a_bad_batch_is_refused(
    controller: ControllerProcess, agents: list[AgentProcess]
) -> None:
    """The deploy's events (sent by the agents in batches) are stored once each and acknowledged:
    each agent's outbox empties. A batch with one bad event, published with the device's own
    credentials, is refused whole with a warning naming that event and field: nothing of it is
    stored; the same batch made good is stored."""
    url = controller.url
    for agent in agents:
        wait_until(lambda a=agent: not list((a.data_dir / "outbox").glob("*.msgpack")), 30,
                   message=f"{agent.device_id}: every event acknowledged by the controller")  # fmt: skip
        stored = _stored_events(url, agent.device_id)
        assert ("desired.accepted" in {k for _, k in stored}) and (
            "service.created" in {k for _, k in stored}
        )
        assert len({seq for seq, _ in stored}) == len(stored)  # each once
    device = agents[1]
    device.stop()  # its identity is taken below (the broker allows one session per device)
    before = _stored_events(url, device.device_id)
    saved = json.loads((device.data_dir / "credentials.json").read_text())
    client = MqttClient([parse_broker_url(url)], f"tether-{device.device_id}", username=saved["username"],
                        password=saved["password"])  # fmt: skip
    client.connect(10)
    try:
        topic = topics.device(device.device_id, topics.DeviceTopic.EVENTS)
        good = [
            Event(device_id=device.device_id, seq=s, kind="note", message=f"n{s}", oldest=900)
            for s in (900, 901)
        ]
        bad = codec.array(
            [codec.encode(good[0]), msgpack.packb({"v": 1, "device_id": device.device_id, "seq": 901})]
        )
        assert client.publish_confirmed(topic, bad)
        controller.wait_for_line(r"Event batch: item 2 of 2 \(seq 901\): kind: Field required")
        assert _stored_events(url, device.device_id) == before
        assert client.publish_confirmed(topic, codec.array([codec.encode(e) for e in good]))
        wait_until(lambda: _stored_events(url, device.device_id)[-2:] == [(900, "note"), (901, "note")], 20,
                   message="the good batch stored")  # fmt: skip
    finally:
        client.stop()


@pytest.mark.store
def test_auto_approve_static_group_and_exhausted_token(controller: ControllerProcess, tmp_path: Path) -> None:
    """An auto-approve token enrolls at once into its static group; a used-up token is refused."""
    url = controller.url
    cli_json(url, "groups", "create", "fixed", "--device", "someone")
    token = cli_json(url, "tokens", "create", "--group", "fixed", "--auto-approve", "--uses", "1")["token"]
    config = _config(tmp_path, url, token)
    first = _agent(url, tmp_path, "auto-1", config)
    second = None
    try:
        wait_online(url, "auto-1")
        assert "auto-1" in cli_json(url, "groups", "show", "fixed")["devices"]
        second = _agent(url, tmp_path, "auto-2", config)
        if hasattr(controller, "broker"):  # Mosquitto: the token's client lives until it expires or goes
            controller.wait_for_line(r"enrollment of auto-2 refused: enrollment token \w+ is used up")
        else:  # the embedded broker counts uses at connect
            second.wait_for_line(r"enrollment refused by the broker")
        assert "auto-2" not in _pending(url)
        assert not (second.data_dir / "credentials.json").exists()
        assert cli_json(url, "tokens", "ls")[0]["used"] == 1
    finally:
        first.stop()
        if second is not None:
            second.stop()


@pytest.mark.store
def test_rejected_device_gets_nothing(controller: ControllerProcess, tmp_path: Path) -> None:
    url = controller.url
    token = cli_json(url, "tokens", "create")["token"]
    agent = _agent(url, tmp_path, "nope-1", _config(tmp_path, url, token))
    try:
        wait_until(lambda: "nope-1" in _pending(url), 30, message="pending")
        assert cli_json(url, "devices", "reject", "nope-1") == {"rejected": ["nope-1"]}
        agent.wait_for_line(r"enrollment of nope-1 was rejected")
        assert _pending(url)["nope-1"]["state"] == "rejected"
        assert not (agent.data_dir / "credentials.json").exists()
        assert device_view(url, "nope-1") is None
        again = cli(url, "devices", "reject", "nope-1")
        assert again.returncode != 0 and "not pending" in again.stderr
    finally:
        agent.stop()


@pytest.mark.store
def test_expired_token_is_refused(controller: ControllerProcess, tmp_path: Path) -> None:
    url = controller.url
    token = cli_json(url, "tokens", "create", "--expires", "1s")["token"]
    time.sleep(1.5)
    assert cli_json(url, "tokens", "ls")[0]["expired"] is True
    agent = _agent(url, tmp_path, "late-1", _config(tmp_path, url, token))
    try:
        agent.wait_for_line(r"enrollment refused by the broker")
        assert _pending(url) == {}
    finally:
        agent.stop()
    bad = cli(url, "tokens", "create", "--expires", "soon")
    assert bad.returncode != 0 and "7d" in bad.stderr
    unknown_group = cli(url, "tokens", "create", "--group", "ghost")
    assert unknown_group.returncode != 0 and "unknown group" in unknown_group.stderr
    token_id = cli_json(url, "tokens", "ls")[0]["id"]
    assert cli_json(url, "tokens", "rm", token_id) == {"removed": [token_id]}
    assert cli_json(url, "tokens", "ls") == []
    gone = cli(url, "tokens", "rm", token_id)
    assert gone.returncode != 0 and "unknown token" in gone.stderr


@pytest.mark.store
def test_malformed_requests_are_ignored_with_an_error(controller: ControllerProcess) -> None:
    """Garbage, a request naming another device and a short public key: logged, nothing changes."""
    url = controller.url
    token = cli_json(url, "tokens", "create")["token"]
    client = MqttClient(
        [parse_broker_url(url)],
        "tether-enroll-evil-1",
        username=enroll_username(token, "evil-1"),
        password=token,
    )
    client.connect(10)
    try:
        topic = topics.enroll_request("evil-1")
        assert client.publish_confirmed(topic, b"\xc1 not msgpack")
        controller.wait_for_line(r"enrollment of evil-1 refused: malformed request")
        facts = DeviceFacts(agent_version="x", driver="process", arch="x", os="x")
        other = EnrollmentRequest(
            device_id="evil-2", token=token, public_key=public_key_b64(new_private_key()), facts=facts
        )
        assert client.publish_confirmed(topic, codec.encode(other))
        controller.wait_for_line(r"enrollment of evil-1 refused: request names device 'evil-2'")
        short = other.model_copy(update={"device_id": "evil-1", "public_key": "AAAA"})
        assert client.publish_confirmed(topic, codec.encode(short))
        controller.wait_for_line(r"enrollment of evil-1 refused: malformed request: public_key")
        forged = other.model_copy(update={"device_id": "evil-1", "token": "tet_forged"})
        assert client.publish_confirmed(topic, codec.encode(forged))
        controller.wait_for_line(r"enrollment of evil-1 refused: unknown or removed enrollment token")
        assert (
            not client.publish_confirmed(topics.device("evil-1", topics.DeviceTopic.PRESENCE), b"x") or True
        )
    finally:
        client.stop()
    assert _pending(url) == {}
    assert cli_json(url, "tokens", "ls")[0]["used"] == 0
    assert cli_json(url, "devices", "ls") == []
