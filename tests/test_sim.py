"""The fleet simulator: its MQTT session, its simulated runtime, and fleets against real brokers."""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from click.testing import CliRunner
from paho.mqtt.enums import CallbackAPIVersion
from support.infra import Mosquitto, wait_until
from support.procs import ControllerProcess
from tether.cli import devices as cli_devices
from tether.cli.main import main as cli_main
from tether.protocol import codec, topics
from tether.protocol.client import ControllerClient, ask
from tether.protocol.commands import GroupsCreate, GroupsShow, StacksDeploy, StacksStatus
from tether.protocol.device_api import FactsCommand, HostFacts, RestartCommand
from tether.protocol.errors import DriverError, PayloadError, RequestError
from tether.protocol.models import Presence, ServiceSpec, StackDefinition, StackSpec
from tether.protocol.mqtt import Will
from tether.sim import Fleet, FleetConfig, FleetThread, SimDriver, hashcache
from tether.sim.main import main as sim_main
from tether.sim.mqtt import Counters, MqttSession, connect_packet, publish_packet, varint

COMPOSE = """
services:
  web:
    command: ["sleep", "1000"]
    restart: always
  worker:
    command: ["sleep", "1000"]
    restart: always
"""

# --- the MQTT session, without a broker -------------------------------------------------------


class FakeTransport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


def test_varint_matches_the_spec_examples() -> None:
    assert varint(0) == b"\x00"
    assert varint(127) == b"\x7f"
    assert varint(128) == b"\x80\x01"
    assert varint(16_383) == b"\xff\x7f"
    assert varint(2_097_152) == b"\x80\x80\x80\x01"


def test_connect_packet_carries_will_and_persistent_session() -> None:
    will = Will("t/w", b"gone", qos=1, retain=True)
    pkt = connect_packet("tether-dev", clean_session=False, keepalive=60, will=will)
    assert pkt[0] == 0x10
    body = pkt[2:]
    assert body[:6] == b"\x00\x04MQTT" and body[6] == 4
    flags = body[7]
    assert flags & 0x02 == 0  # clean session off
    assert flags & 0x04 and (flags >> 3) & 0x03 == 1 and flags & 0x20  # will, QoS 1, retained
    assert body[8:10] == b"\x00\x3c"
    assert b"tether-dev" in body and b"t/w" in body and body.endswith(b"gone")


def test_sessions_read_into_one_shared_buffer_and_keep_their_own_remainders() -> None:
    """Sessions read into their thread's one buffer (``get_buffer``/``buffer_updated``): what one
    keeps of a packet split across reads is its own, not overwritten by another's next read."""

    async def go() -> None:
        got: dict[str, list[tuple[str, bytes]]] = {"a": [], "b": []}
        sessions = {
            name: MqttSession(
                name, counters=Counters(), on_message=lambda t, p, _r, n=name: got[n].append((t, p))
            )
            for name in got
        }
        for session in sessions.values():
            session.connection_made(FakeTransport())  # type: ignore[arg-type]
            session.data_received(b"\x20\x02\x00\x00")  # CONNACK

        def read(session: MqttSession, data: bytes) -> None:
            buffer = session.get_buffer(-1)
            assert buffer is sessions["a"].get_buffer(-1)  # one buffer, not one per session
            buffer[: len(data)] = data
            session.buffer_updated(len(data))

        streams = {name: publish_packet(f"{name}/t", name.encode() * 200, 0, False) for name in got}
        for i in range(0, len(streams["a"]), 7):  # the two sessions' reads interleaved, packets split
            for name, session in sessions.items():
                read(session, streams[name][i : i + 7])
        assert got == {name: [(f"{name}/t", name.encode() * 200)] for name in got}

    asyncio.run(go())


def test_session_parses_fragmented_input_and_acknowledges_qos1() -> None:
    async def go() -> None:
        got: list[tuple[str, bytes]] = []
        session = MqttSession("c", counters=Counters(), on_message=lambda t, p, _retained: got.append((t, p)))
        transport = FakeTransport()
        session.connection_made(transport)  # type: ignore[arg-type]
        session.data_received(b"\x20\x02\x00\x00")  # CONNACK
        assert session.connected
        stream = publish_packet("a/b", b"x" * 300, 1, False, pid=7) + publish_packet("c", b"", 0, True)
        for i in range(len(stream)):  # one byte at a time: lengths and bodies split anywhere
            session.data_received(stream[i : i + 1])
        assert got == [("a/b", b"x" * 300), ("c", b"")]
        await asyncio.sleep(0)  # writes are flushed once per loop iteration
        assert b"\x40\x02\x00\x07" in transport.written  # PUBACK for packet 7

    asyncio.run(go())


def test_session_renews_subscriptions_and_resends_unacknowledged_publishes() -> None:
    async def go() -> None:
        session = MqttSession("c", counters=Counters())
        session.subscribe("s/1")
        transport = FakeTransport()
        session.connection_made(transport)  # type: ignore[arg-type]
        session.data_received(b"\x20\x02\x00\x00")
        assert session.publish("p/1", b"hello", qos=1)
        await asyncio.sleep(0)
        assert b"s/1" in transport.written and b"hello" in transport.written
        session.connection_lost(None)
        assert not session.connected and not session.publish("p/2", b"no")
        again = FakeTransport()
        session.connection_made(again)  # type: ignore[arg-type]
        session.data_received(b"\x20\x02\x01\x00")
        await asyncio.sleep(0)
        assert b"s/1" in again.written  # subscriptions renewed after every CONNACK
        resent = again.written[again.written.index(b"p/1") - 4 :]
        assert resent[0] & 0x08 and b"hello" in resent  # the unacknowledged QoS 1 message, DUP

    asyncio.run(go())


def test_session_counts_a_refused_connect_and_keeps_no_transport() -> None:
    """open() to a port nothing listens on returns False, counts one refused connect, holds no socket."""

    async def go() -> None:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        listener.close()  # nothing listens there now
        counters = Counters()
        session = MqttSession("c", counters=counters)
        assert not await session.open("127.0.0.1", port, 5)
        await asyncio.sleep(0)
        assert counters.refused == 1 and session.transport is None and not session.connected

    asyncio.run(go())


# --- the simulated runtime --------------------------------------------------------------------


def test_sim_driver_starts_after_a_delay_and_fails_on_demand() -> None:
    """A create returns the instance running and says when the call would have returned; failures on demand."""
    now = [100.0]
    driver = SimDriver("d1", start_delay=2.0, jitter=0.0, clock=lambda: now[0])
    spec = StackSpec(services=(ServiceSpec(name="web"), ServiceSpec(name="db")))
    assert driver.take_busy() is None
    driver.create("app", spec, spec.services[0])
    now[0] = 100.5
    driver.create("app", spec, spec.services[1])
    assert [i.state for i in driver.observe()] == ["running", "running"]
    assert driver.take_busy() == 102.5  # started side by side: the latest start
    assert driver.take_busy() is None
    driver.crash("app", "web", exit_code=3)
    exited = next(i for i in driver.observe() if i.service == "web")
    assert (exited.state, exited.exit_code) == ("exited", 3)
    driver.start(exited, spec.services[0])
    assert [i.state for i in driver.observe()] == ["running", "running"]
    assert driver.take_busy() == 102.5
    failing = SimDriver("d2", fail=True)
    with pytest.raises(DriverError, match="simulated failure"):
        failing.create("app", spec, spec.services[0])
    labelled = ServiceSpec(name="bad", labels={"tether.sim/fail": "no image"})
    with pytest.raises(DriverError, match="no image"):
        SimDriver("d3").create("app", spec, labelled)


def test_hash_cache_decodes_a_definition_once_and_still_refuses_bad_ones() -> None:
    """With the shortcut, the same definition bytes give the same model (same hash); bad bytes still fail."""
    spec = StackSpec(services=(ServiceSpec(name="web", environment={"A": "1"}),))
    payload = codec.encode(StackDefinition(spec_hash=spec.spec_hash(), spec=spec))
    hashcache.install()
    assert hashcache.installed()
    first = codec.decode(payload, StackDefinition)
    assert codec.decode(payload, StackDefinition) is first
    assert first.spec.spec_hash() == spec.spec_hash() == first.spec_hash
    with pytest.raises(PayloadError):
        codec.decode(payload[:-3], StackDefinition)


def test_hash_cache_finds_the_same_refusals_per_policy() -> None:
    """With the shortcut, a stack's refusals are those of the policy given (not another's), in a new list each time."""
    from tether.agent import rendering
    from tether.agent.policy import HostAccess, refusals

    spec = StackSpec(services=(ServiceSpec(name="web", privileged=True),))
    locked, default = HostAccess(preset="locked"), HostAccess()
    expected = (refusals(spec, locked), refusals(spec, default))
    assert expected[0] and not expected[1]
    hashcache.install()
    found = rendering.refusals(spec, locked)
    assert found == expected[0] and rendering.refusals(spec, default) == expected[1]
    found.append("changed by the caller")
    assert rendering.refusals(spec, locked) == expected[0]
    assert rendering.refusals(spec, HostAccess(preset="locked")) == expected[0]  # another object, same answer


# --- fleets against Mosquitto -----------------------------------------------------------------


def retained(url_port: int, topic: str, timeout: float = 5.0) -> bytes | None:
    """The retained message on ``topic`` (None if there is none)."""
    got: list[bytes] = []
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    client.on_message = lambda c, u, m: got.append(bytes(m.payload))
    client.connect("127.0.0.1", url_port)
    client.subscribe(topic, 1)
    client.loop_start()
    try:
        deadline = time.monotonic() + timeout
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        client.loop_stop()
        client.disconnect()
    return got[0] if got else None


def presence(broker: Mosquitto, device_id: str) -> Presence | None:
    payload = retained(broker.port, topics.device(device_id, topics.DeviceTopic.PRESENCE))
    return codec.decode(payload, Presence) if payload else None


@pytest.mark.mosquitto
def test_fleet_connects_each_device_with_its_own_session_and_will(mosquitto: Mosquitto) -> None:
    config = FleetConfig(broker=mosquitto.url, devices=20, prefix="t", labels={"site": "x"}, connect_rate=200)
    with FleetThread(config) as sim:
        sim.wait(lambda f: f.connected() == 20, 20, message="20 connected")
        log = mosquitto.log_text()
        assert "as tether-t-00000 (p2, c0, k60)" in log and "as tether-t-00019 (p2, c0, k60)" in log
        online = presence(mosquitto, "t-00003")
        assert online is not None and online.status == "online"
        assert online.facts is not None and online.facts.labels == {"site": "x"}
        sim.call(lambda f: f.devices[3].crash())  # vanish without DISCONNECT: the broker sends the will
        wait_until(
            lambda: (p := presence(mosquitto, "t-00003")) is not None and p.status == "offline",
            10,
            message="the will of t-00003",
        )
        summary = sim.stop()
    assert summary is not None and summary["devices"] == 20 and summary["connects"] == 20


@pytest.mark.mosquitto
def test_simulated_device_answers_facts_and_refuses_other_operations(mosquitto: Mosquitto) -> None:
    """A simulated device answers a ``facts`` request as a real agent does (read only, always
    on), with its own id as hostname; an operation on workloads is refused with a reason."""
    config = FleetConfig(broker=mosquitto.url, devices=2, prefix="f")
    with FleetThread(config) as sim:
        sim.wait(lambda f: f.connected() == 2, 20)
        with ControllerClient(mosquitto.url, timeout=10) as client:
            facts = HostFacts.model_validate(ask(client, "f-00001", FactsCommand()))
            assert (facts.hostname, facts.os, facts.driver) == ("f-00001", "tether-sim", "sim")
            with pytest.raises(RequestError, match="simulated: only facts are answered, not restart"):
                ask(client, "f-00000", RestartCommand(stack="app"))


@pytest.mark.mosquitto
def test_fleet_reconnects_after_the_broker_restarts(mosquitto: Mosquitto) -> None:
    config = FleetConfig(broker=mosquitto.url, devices=10, prefix="r", backoff_base=0.2, backoff_cap=1.0)
    with FleetThread(config) as sim:
        sim.wait(lambda f: f.connected() == 10, 20)
        mosquitto.stop()
        sim.wait(lambda f: f.connected() == 0, 10)
        assert mosquitto._launch(), mosquitto.log_text()  # the same port again
        sim.wait(lambda f: f.connected() == 10 and all(d.connects == 2 for d in f.devices), 30)


@pytest.mark.mosquitto
@pytest.mark.e2e
def test_fleet_deploy_through_a_real_controller(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """A real controller's deploy applies on every simulated device (failures reported); a crash wakes an idle one."""
    controller = ControllerProcess(tmp_path / "controller", broker=mosquitto.url)
    try:
        with ControllerClient(mosquitto.url, timeout=30) as client:
            client.request(GroupsCreate(name="sim", selector="site=sim", trust_device_labels=True))
            config = FleetConfig(
                broker=mosquitto.url,
                devices=20,
                prefix="e",
                labels={"site": "sim"},
                shard_label=("ring", 4),
                fail_labels={"ring": "3"},  # 5 of the 20 devices
                start_delay=0.3,
            )
            with FleetThread(config) as sim:
                sim.wait(lambda f: f.connected() == 20, 20)
                wait_until(
                    lambda: len(client.request(GroupsShow(name="sim"))["group"]["members"]) == 20,
                    20,
                    interval=0.2,
                )
                client.request(StacksDeploy(name="app", group="sim", compose=COMPOSE))
                sim.wait(
                    lambda f: all(d.done_at(1) is not None for d in f.devices), 30, message="all applied"
                )
                counts = sim.call(lambda f: f.generation_counts())
                assert counts == {1: {"devices": 20, "converged": 20, "failed": 5}}
                failing = sim.call(lambda f: sorted(d.device_id for d in f.devices if d.failed))
                assert failing == [f"e-{i:05d}" for i in (3, 7, 11, 15, 19)]

                def states() -> dict[str, str]:
                    rows = client.request(StacksStatus(name="app"))["devices"]
                    return {r["device"]: r["state"] for r in rows}

                wait_until(lambda: list(states().values()).count("running") == 15, 20, interval=0.3)
                assert {d for d, s in states().items() if s == "failed"} == set(failing)

                # An idle device sleeps until something happens: a crashed instance wakes it,
                # and its agent core restarts the service (restart: always).
                def crash(f: Fleet) -> int:
                    device = f.devices[0]
                    device.driver.crash("app", "web", exit_code=3)
                    return device.driver.changes

                changes = sim.call(crash)

                def restarted(f: Fleet) -> bool:
                    driver = f.devices[0].driver
                    web = [i for i in driver.observe() if i.service == "web"]
                    return driver.changes > changes and [i.state for i in web] == ["running"]

                sim.wait(restarted, 20, message="the crashed service restarted")
    finally:
        controller.stop()


@pytest.mark.mosquitto
@pytest.mark.e2e
def test_devices_ls_reads_every_page(
    mosquitto: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tether devices ls` lists every device of a fleet spanning several pages (one reply for
    the whole fleet passes the message limit past some 25,000 devices)."""
    monkeypatch.setattr(cli_devices, "LS_PAGE", 3)
    controller = ControllerProcess(tmp_path / "controller", broker=mosquitto.url)
    try:
        with FleetThread(FleetConfig(broker=mosquitto.url, devices=7, prefix="ls")) as sim:
            sim.wait(lambda f: f.connected() == 7, 20)

            def listed() -> list[dict[str, Any]]:
                result = CliRunner().invoke(
                    cli_main, ["devices", "ls", "-o", "json", "--broker", mosquitto.url]
                )
                assert result.exit_code == 0, result.output
                return list(json.loads(result.stdout))

            wanted = [f"ls-{i:05d}" for i in range(7)]
            wait_until(
                lambda: [d["id"] for d in listed() if d["status"] == "online"] == wanted,
                20,
                interval=0.2,
                message="every device listed online",
            )
    finally:
        controller.stop()


@pytest.mark.mosquitto
def test_tether_sim_command_stops_by_itself_and_summarises(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """tether-sim --processes 2 splits the fleet into two processes, stops cleanly and sums their summaries."""
    summary_path = tmp_path / "summary.json"
    result = subprocess.run(
        [sys.executable, "-m", "tether.sim", "--broker", mosquitto.url, "--devices", "15", "--processes", "2"]
        + ["--labels", "site=cli", "--prefix", "cli", "--duration", "3", "--progress", "1"]
        + ["--json", str(summary_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "connected:   15" in result.stdout
    assert "none: 15 devices" in result.stdout
    assert "8/8 connected" in result.stderr and "7/7 connected" in result.stderr
    summary = json.loads(summary_path.read_text())
    assert (summary["processes"], summary["devices"], summary["connects"]) == (2, 15, 15)
    log = mosquitto.log_text()
    assert "as tether-cli-00000 " in log and "as tether-cli-00014 " in log and "cli-00015" not in log
    # Stopped cleanly: every device said goodbye (retained offline), no will needed.
    for device_id in ("cli-00003", "cli-00012"):  # one of each process
        goodbye = presence(mosquitto, device_id)
        assert goodbye is not None and goodbye.status == "offline"


def test_a_fleet_past_the_open_file_limit_is_refused_at_once() -> None:
    """A simulator process asked for more devices than it may open sockets (the hard limit
    on open files) is refused before it starts, naming the limit and the way out, in the
    benchmarks' FleetThread and in tether-sim (it used to wait for connections that never
    open: bench/reconnect_storm.py at 20,000 devices hung)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard limit on open files here")
    too_many = hard  # plus the process's own files: past the limit
    thread = FleetThread(FleetConfig(broker="mqtt://127.0.0.1:1", devices=too_many))
    with pytest.raises(ValueError, match=rf"{too_many} devices need .* may open {hard}"):
        thread.start()
    assert not thread._thread.is_alive()
    result = CliRunner().invoke(
        sim_main, ["--broker", "mqtt://127.0.0.1:1", "--devices", str(too_many), "--duration", "1"]
    )
    assert result.exit_code == 2 and "--processes" in result.output and str(hard) in result.output
