"""Remote operations and device metrics end to end: real agents (process driver), real brokers."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from support.infra import Mosquitto, wait_until
from support.procs import PY, AgentProcess, ControllerProcess, _Proc, cli, cli_json, wait_online
from tether.protocol import codec, topics
from tether.protocol.device_api import DeviceReply, MetricsSample
from tether.protocol.models import DeviceFacts, Presence, Request
from tether.protocol.topics import DeviceTopic

pytestmark = pytest.mark.e2e

SERVICE = """
services:
  app:
    command: ["sh", "-c", "echo $$$$ > {pidfile}; echo hello-1; echo hello-2; echo hello-3; while true; do if [ -e {trigger} ]; then echo \\"mark-$$(cat {trigger})\\"; rm -f {trigger}; fi; sleep 0.1; done"]
    restart: always
    stop_grace_period: 1s
"""


class Sniffer:
    """A plain MQTT client recording every message on its filters (and publishing raw payloads)."""

    def __init__(self, url: str, filters: list[str]) -> None:
        self.messages: list[tuple[str, bytes, float]] = []
        self.lock = threading.Lock()
        subscribed = threading.Event()
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.connect("127.0.0.1", int(url.rsplit(":", 1)[1]))
        self.client.loop_start()
        self.client.subscribe([(f, 1) for f in filters])
        assert subscribed.wait(10), "no SUBACK"

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload), time.time()))

    def on(self, topic: str) -> list[bytes]:
        with self.lock:
            return [p for t, p, _at in self.messages if t == topic]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def one_line_error(result: Any, *needles: str) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def meminfo_total() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))


def pid_of(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def alive(pid: int | None) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture
def procs() -> Iterator[list[Any]]:
    started: list[Any] = []
    yield started
    for proc in reversed(started):
        proc.stop()


def follow(url: str, tmp_path: Path, *args: str) -> _Proc:
    """`tether logs ... --follow` running in the background, its output collected line by line."""
    argv = [PY, "-m", "tether.cli.main", "logs", *args, "--follow", "--broker", url]
    return _Proc(argv, tmp_path / f"follow-{uuid.uuid4().hex[:6]}.log")


def test_logs_follow_restart_facts_and_offline_with_the_process_driver(
    tmp_path: Path, procs: list[Any]
) -> None:
    """Through the CLI: logs with --tail, --follow sees a line printed after it started,
    restart gives a new process, facts hold real values, and an offline device is named."""
    device = f"rem-{uuid.uuid4().hex[:6]}"
    pidfile, trigger = tmp_path / "app.pid", tmp_path / "trigger"
    controller = ControllerProcess(tmp_path / "controller")
    procs.append(controller)
    url = controller.url
    agent = AgentProcess(url, device, tmp_path / "agent", extra=["--metrics-interval", "1"])
    procs.append(agent)
    wait_online(url, device)
    assert cli(url, "groups", "create", "solo", "--device", device).returncode == 0
    stack = tmp_path / "svc.yml"
    stack.write_text(SERVICE.format(pidfile=pidfile, trigger=trigger))
    deploy = cli(
        url,
        "stacks",
        "deploy",
        str(stack),
        "--name",
        "svc",
        "--group",
        "solo",
        "--wait",
        "--min-healthy-time",
        "1s",
        "--timeout",
        "60",
    )
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr

    # Logs, through the controller's broker to the device and back.
    wait_until(lambda: "hello-3" in cli(url, "logs", device, "svc").stdout, 20, 0.2, "hello-3 logged")
    tail = cli(url, "logs", device, "svc", "app", "--tail", "2")
    assert tail.returncode == 0 and tail.stdout == "hello-2\nhello-3\n", tail.stdout + tail.stderr
    everything = cli_json(url, "logs", device, "svc", "--tail", "all")
    assert everything == {
        "logs": [{"service": "app", "text": "hello-1\nhello-2\nhello-3\n"}],
        "truncated": False,
    }
    one_line_error(cli(url, "logs", device, "svc", "--since", "10m"), "does not timestamp output")
    one_line_error(cli(url, "logs", device, "nope"), f"stack 'nope' is not on device {device}")
    # Following is checked the same way: one error at once, never silence and exit 0.
    for follows in (["-f"], ["-f", "--for", "3s"]):
        one_line_error(cli(url, "logs", device, "nope", *follows), f"stack 'nope' is not on device {device}")
        one_line_error(cli(url, "logs", device, "svc", "nope", *follows), "has no service 'nope'")
    one_line_error(cli(url, "logs", device, "svc", "--tail", "lots"), "--tail")

    # --follow: the tail proves the stream is up; a line printed afterwards arrives.
    streaming = follow(url, tmp_path, device, "svc", "--tail", "1")
    try:
        streaming.wait_for_line(r"^hello-3$", 20)
        trigger.write_text("42")
        streaming.wait_for_line(r"^mark-42$", 20)
        streaming.signal(signal.SIGINT)
        assert streaming.proc.wait(20) == 130
    finally:
        streaming.stop()

    # Restart: a new process.
    first = pid_of(pidfile)
    assert alive(first)
    restarted = cli(url, "devices", "restart", device, "svc", "app")
    assert restarted.returncode == 0, restarted.stderr
    assert f"svc/app on {device}: restarted" in restarted.stdout
    second = wait_until(lambda: (p := pid_of(pidfile)) != first and alive(p) and p, 20, message="new process")
    assert not alive(first) and second != first
    one_line_error(cli(url, "devices", "restart", device, "svc", "nope"), "has no service 'nope'")

    # Facts: real values of this host.
    facts = cli_json(url, "devices", "facts", device)
    assert facts["cpu_count"] == os.cpu_count()
    assert facts["memory_total"] == meminfo_total()
    agent_dir = tmp_path / "agent"
    st = os.statvfs(agent_dir)
    assert facts["disk_path"] == str(agent_dir) and facts["disk_total"] == st.f_blocks * st.f_frsize
    assert facts["arch"] == os.uname().machine and facts["kernel"] == os.uname().release
    assert facts["driver"] == "process" and facts["docker_version"] is None
    assert facts["hostname"] == os.uname().nodename and facts["uptime_s"] > 0
    shown = cli(url, "devices", "show", device)
    assert shown.returncode == 0, shown.stderr
    for line in ("cpu:", "memory:", "disk:", "docker:", "addresses:", "facts:      live"):
        assert line in shown.stdout, shown.stdout

    # Metrics of the device and of its service instance reach the controller.
    top = wait_until(
        lambda: (
            (d := cli_json(url, "devices", "top", device)[0])["sample"]
            and "svc/app" in (d["sample"]["containers"] or {})
            and d
        ),
        30,
        0.3,
        "a sample with the service's usage",
    )
    assert top["sample"]["mem_total"] == meminfo_total() and top["sample"]["containers"]["svc/app"][1] > 0

    # Offline: a one-line error naming the device and since when; show falls back to presence.
    assert agent.stop() == 0
    wait_until(lambda: cli_json(url, "devices", "show", device)["status"] == "offline", 20, 0.2)
    line = one_line_error(cli(url, "logs", device, "svc"), f"device {device} is offline since ")
    assert " ago)" in line
    one_line_error(cli(url, "devices", "restart", device, "svc"), f"device {device} is offline since ")
    offline = cli(url, "devices", "show", device)
    assert "last known, from the device's presence" in offline.stdout and "cpu:" in offline.stdout
    one_line_error(cli(url, "logs", "never-seen-x", "svc"), "unknown device 'never-seen-x'")
    os.kill(second, signal.SIGKILL)  # the process driver's service outlives the agent


def test_device_requests_are_validated_and_answered_only_on_reply_topics(
    tmp_path: Path, procs: list[Any]
) -> None:
    """Malformed requests get an error reply on a client reply topic, or nothing at all;
    the device never publishes on a topic that is not a reply topic; a device that is
    online but silent makes the CLI give up after its timeout."""
    device = f"val-{uuid.uuid4().hex[:6]}"
    controller = ControllerProcess(tmp_path / "controller")
    procs.append(controller)
    url = controller.url
    procs.append(AgentProcess(url, device, tmp_path / "agent"))
    wait_online(url, device)
    requests = topics.device(device, DeviceTopic.REQUESTS)
    reply_to = topics.replies(f"sniffer-{uuid.uuid4().hex[:6]}")
    bad_targets = [
        topics.device(device, DeviceTopic.DESIRED),
        topics.REQUESTS,
        "elsewhere/x",
        "tether/v1/clients/x",
    ]
    sniffer = Sniffer(url, ["#"])
    try:

        def request(request_id: Any, command: dict[str, Any], target: str = reply_to) -> None:
            sniffer.publish(
                requests,
                codec.encode(Request.model_construct(id=request_id, reply_to=target, command=command, v=1)),
            )

        sniffer.publish(requests, b"\xc1\xc1 not msgpack")
        sniffer.publish(requests, codec.encode(Presence(device_id=device, status="online", session=1)))
        for n, target in enumerate(bad_targets):
            request(f"bad-{n}", {"kind": "facts"}, target)
        request(None, {"kind": "facts"})
        request("unknown-kind", {"kind": "reboot"})
        request("bad-tail", {"kind": "logs", "stack": "x", "tail": -5})
        request("no-stack", {"kind": "logs", "stack": "x"})
        request("good", {"kind": "facts"})  # handled after every request above: the agent keeps order

        def replies() -> dict[str, DeviceReply]:
            decoded = (codec.decode(p, DeviceReply) for p in sniffer.on(reply_to))
            return {r.id: r for r in decoded}

        answered = wait_until(
            lambda: "good" in replies() and replies(), 20, message="the good request's reply"
        )
        assert answered["good"].ok and answered["good"].result["cpu_count"] >= 1
        assert "invalid request: Request: id" in (answered[""].error or "")
        assert "invalid request: command: " in (answered["unknown-kind"].error or "")
        assert "logs.tail" in (answered["bad-tail"].error or "")
        assert answered["no-stack"].error == f"stack 'x' is not on device {device}"
        assert set(answered) == {"good", "", "unknown-kind", "bad-tail", "no-stack"}
        for target in bad_targets:
            assert sniffer.on(target) == [], f"the device published on {target}"
        assert cli_json(url, "devices", "show", device)["status"] == "online"

        # Online for the controller, but nobody answers: a bounded wait, one line.
        ghost = f"ghost-{uuid.uuid4().hex[:6]}"
        facts = DeviceFacts(agent_version="0", driver="process", arch="x", os="x")
        presence = Presence(device_id=ghost, status="online", session=1, facts=facts, at=time.time())
        sniffer.publish(topics.device(ghost, DeviceTopic.PRESENCE), codec.encode(presence), retain=True)
        wait_online(url, ghost)
        started = time.monotonic()
        one_line_error(
            cli(url, "logs", ghost, "svc", "--request-timeout", "2"),
            f"device {ghost} did not answer within 2s",
        )
        assert time.monotonic() - started < 15
        sniffer.publish(topics.device(ghost, DeviceTopic.PRESENCE), b"", retain=True)
    finally:
        sniffer.close()


def _samples(sniffer: Sniffer, device: str) -> list[tuple[MetricsSample, int]]:
    return [
        (codec.decode(p, MetricsSample), len(p))
        for p in sniffer.on(topics.device(device, DeviceTopic.METRICS))
    ]


def test_metrics_arrive_per_their_settings(mosquitto: Mosquitto, tmp_path: Path, procs: list[Any]) -> None:
    """With Mosquitto: a device whose values never move beyond its threshold sends only full
    samples, full_interval apart; threshold 0 sends deltas every interval; interval 0 sends
    nothing until someone asks for live samples, which then come every second."""
    run = uuid.uuid4().hex[:6]
    quiet, chatty, off = f"quiet-{run}", f"chatty-{run}", f"off-{run}"
    controller = ControllerProcess(tmp_path / "controller", broker=mosquitto.url)
    procs.append(controller)
    url = controller.url
    sniffer = Sniffer(url, ["tether/v1/devices/+/metrics"])
    try:
        settings = {
            quiet: [
                "--metrics-interval",
                "0.5",
                "--metrics-full-interval",
                "3",
                "--metrics-threshold",
                "100",
            ],
            chatty: [
                "--metrics-interval",
                "0.5",
                "--metrics-full-interval",
                "600",
                "--metrics-threshold",
                "0",
            ],
            off: ["--metrics-interval", "0"],
        }
        for device, extra in settings.items():
            procs.append(AgentProcess(url, device, tmp_path / device, extra=extra))
        for device in settings:
            wait_online(url, device)

        wait_until(lambda: len(_samples(sniffer, quiet)) >= 3, 30, 0.1, "three samples from the quiet device")
        quiet_samples = [s for s, _size in _samples(sniffer, quiet)]
        assert all(s.full for s in quiet_samples), "a device that did not move sent a partial sample"
        gaps = [b.at - a.at for a, b in zip(quiet_samples, quiet_samples[1:], strict=False)]
        assert all(2.9 <= gap <= 8.0 for gap in gaps), gaps

        chatty_samples = wait_until(
            lambda: len(s := _samples(sniffer, chatty)) >= 5 and s,
            30,
            0.1,
            "partial samples from the chatty device",
        )
        assert chatty_samples[0][0].full and not any(s.full for s, _size in chatty_samples[1:])
        full_size = chatty_samples[0][1]
        assert all(size < full_size for _s, size in chatty_samples[1:])
        assert all(
            s.mem is not None or s.cpu is not None or s.disk is not None for s, _ in chatty_samples[1:]
        )
        assert _samples(sniffer, off) == [], "metrics_interval 0 must send nothing"

        top = {d["id"]: d for d in cli_json(url, "devices", "top")}
        assert top[quiet]["sample"]["mem_total"] == meminfo_total()
        assert top[chatty]["sample"]["full_at"] == chatty_samples[0][0].at
        assert top[off]["sample"] is None
        table = cli(url, "devices", "top")
        assert table.returncode == 0 and "no sample yet" in table.stdout

        # Live samples on request, while the command runs.
        live = cli(url, "devices", "top", off, "--follow", "--for", "5s", timeout=60)
        assert live.returncode == 0, live.stderr
        assert len([line for line in live.stdout.splitlines() if " cpu " in line]) >= 2, live.stdout
        live_samples = [s for s, _size in _samples(sniffer, off)]
        assert len(live_samples) >= 2 and all(s.full for s in live_samples)
        assert cli_json(url, "devices", "top", off)[0]["sample"]["mem_total"] == meminfo_total()
        one_line_error(cli(url, "devices", "top", "--follow"), "--follow needs a DEVICE")
    finally:
        sniffer.close()


def test_requests_sent_while_a_device_is_away_are_not_carried_out_later(
    mosquitto: Mosquitto, tmp_path: Path, procs: list[Any]
) -> None:
    """With Mosquitto (which queues QoS 1 messages for persistent sessions): a request
    published while the agent is stopped is not delivered when it comes back."""
    device = f"away-{uuid.uuid4().hex[:6]}"
    controller = ControllerProcess(tmp_path / "controller", broker=mosquitto.url)
    procs.append(controller)
    url = controller.url
    agent = AgentProcess(url, device, tmp_path / "agent")
    procs.append(agent)
    wait_online(url, device)
    reply_to = topics.replies(f"sniffer-{uuid.uuid4().hex[:6]}")
    requests = topics.device(device, DeviceTopic.REQUESTS)
    sniffer = Sniffer(url, [reply_to])
    try:

        def ask(request_id: str) -> None:
            request = Request(id=request_id, reply_to=reply_to, command={"kind": "facts"})
            sniffer.publish(requests, codec.encode(request))

        def answered() -> set[str]:
            return {codec.decode(p, DeviceReply).id for p in sniffer.on(reply_to)}

        ask("before")
        wait_until(lambda: "before" in answered(), 20, message="an answer while online")
        assert agent.stop() == 0
        wait_until(lambda: cli_json(url, "devices", "show", device)["status"] == "offline", 20, 0.2)
        ask("stale")
        procs.append(AgentProcess(url, device, tmp_path / "agent"))
        wait_online(url, device)
        ask("after")
        wait_until(lambda: "after" in answered(), 20, message="an answer after the restart")
        assert answered() == {"before", "after"}
    finally:
        sniffer.close()
