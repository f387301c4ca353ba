"""A reconnection burst that finds the controller behind is merged in its inbox, and every device
still ends where its newest messages put it (controller/inbox.py).

Real processes: Mosquitto, `tether up --broker` (its persistent session, --http), the CLI, and a
raw MQTT client playing 200 devices that reconnect while the controller is frozen (SIGSTOP).
"""

from __future__ import annotations

import re
import signal
import urllib.request
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from support.infra import Mosquitto, wait_until
from support.procs import ControllerProcess, cli_json
from tether.protocol import codec, topics
from tether.protocol.models import DeviceFacts, Presence, ReportedState
from tether.protocol.topics import DeviceTopic

pytestmark = [pytest.mark.e2e, pytest.mark.mosquitto]

DEVICES = 200


def _merged(http: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {k: float(v) for k, v in re.findall(r'tether_inbox_merged_total\{kind="(\w+)"\} (\S+)', text)}


def test_a_burst_held_while_the_controller_is_behind_is_merged_and_nothing_is_lost(
    tmp_path: Path, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 devices send their stale presence and report, then new ones, while the controller is
    frozen: it merges part of that burst (counted in /metrics), and shows every device online in
    its newer session with its report's generation."""
    monkeypatch.delenv("TETHER_DB", raising=False)
    controller = ControllerProcess(tmp_path / "c", broker=mosquitto.url, extra=["--http", "127.0.0.1:0"])
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    devices = [f"burst-{i:03d}" for i in range(DEVICES)]
    facts = DeviceFacts(agent_version="0", driver="process", arch="x", os="Linux")
    try:
        http = int(controller.wait_for_line(r"health and metrics on http://127.0.0.1:(\d+)/").group(1))
        client.connect("127.0.0.1", mosquitto.port)
        client.loop_start()
        controller.signal(signal.SIGSTOP)  # its connection stays open: the broker queues for it
        try:
            sent = []
            for session in (1, 2):  # the stale retained ones, then the new connection's
                for device in devices:
                    presence = Presence(
                        device_id=device, status="online", session=session, facts=facts, at=session
                    )
                    report = ReportedState(device_id=device, generation=3, at=session)
                    for kind, message in ((DeviceTopic.PRESENCE, presence), (DeviceTopic.REPORTED, report)):
                        sent.append(client.publish(topics.device(device, kind), codec.encode(message), qos=1))
            for info in sent:
                info.wait_for_publish(10)
        finally:
            controller.signal(signal.SIGCONT)

        def all_back() -> bool:
            shown = {d["id"]: d for d in cli_json(controller.url, "devices", "ls")}
            return all(
                (d := shown.get(device)) is not None
                and (d["status"], d["session"], d["applied_generation"]) == ("online", 2, 3)
                for device in devices
            )

        wait_until(all_back, 60, 0.5, "every device online in session 2 with generation 3 applied")
        merged = _merged(http)
        assert merged.get("presence", 0) + merged.get("reported", 0) > 0, merged
        assert merged.get("presence", 0) <= DEVICES and merged.get("reported", 0) <= DEVICES
    finally:
        client.loop_stop()
        client.disconnect()
        controller.signal(signal.SIGCONT)
        controller.stop()
