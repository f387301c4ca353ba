"""The MQTT client's CPU per message received and per message published (issue 21).

Received: what a controller's client does while a fleet reports. Mosquitto delivers N QoS 1
messages (a device's report topic, ~480 bytes) published by a raw socket as fast as it
can write them, and :class:`tether.protocol.mqtt.MqttClient` reads, parses,
acknowledges and hands each to a queue as the controller does. Only the client thread's
own CPU time is counted (the publisher and the consumer are other threads), so it is the
benchmark to compare two versions of ``protocol/mqtt.py`` with, alternated: the figure
varies with how many messages each ``recv`` brings (Mosquitto's inflight window of 20
and the machine's load). Published: the same client publishes N retained QoS 1 messages
(a deploy's desired states) at once (``publish_many``); the client thread's CPU until
every one is acknowledged (writing them, reading the PUBACKs, refilling the inflight
window of :data:`~tether.protocol.mqtt.MAX_INFLIGHT`) and the caller's are counted. Then
N retained QoS 0 messages one ``publish`` at a time (the controller's event
acknowledgements): the caller's CPU, and the client thread's until a QoS 1 message sent
after them is acknowledged.

    .venv/bin/python bench/mqtt_client_cpu.py --messages 30000 --runs 3
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

from common import Mosquitto, Row, load_average, log, report, rnd
from tether.protocol.mqtt import BrokerAddress, MqttClient
from tether.sim.mqtt import connect_packet, publish_packet


def one_run(port: int, messages: int) -> tuple[float, float, float, float, float]:
    """Seconds of the client thread's CPU to receive ``messages``, then its and the caller's
    to publish as many in a batch, then one at a time (QoS 0)."""
    inbox: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()
    receiver = MqttClient(
        [BrokerAddress("127.0.0.1", port)], "bench-receiver", on_message=lambda t, p, r: inbox.put((t, p))
    )
    receiver.subscribe("tether/v1/devices/+/reported", 1)
    receiver.connect(10)
    sender = socket.create_connection(("127.0.0.1", port))
    try:
        sender.sendall(connect_packet("bench-sender", clean_session=True, keepalive=60))
        sender.recv(4)  # CONNACK
        threading.Thread(target=lambda: all(iter(lambda: sender.recv(65536), b"")), daemon=True).start()
        # The subscription is in place once a message comes back.
        while True:
            sender.sendall(publish_packet("tether/v1/devices/ready/reported", b"", 1, False, 1))
            with contextlib.suppress(queue.Empty):
                inbox.get(timeout=0.2)
                break
        payload = bytes(range(256)) + b"x" * 200
        data = b"".join(
            publish_packet(f"tether/v1/devices/device-{i:05d}/reported", payload, 1, False, i % 65535 + 1)
            for i in range(messages)
        )
        while not inbox.empty():
            inbox.get_nowait()
        clock = time.pthread_getcpuclockid(receiver._thread.ident)  # type: ignore[union-attr]
        start = time.clock_gettime(clock)
        sender.sendall(data)
        for _ in range(messages):
            inbox.get(timeout=60)
        received = time.clock_gettime(clock) - start
        batch = [(f"tether/v1/devices/device-{i:05d}/desired", payload, 1, True) for i in range(messages)]
        start, caller = time.clock_gettime(clock), time.thread_time()
        if not all(receiver.publish_many(batch, timeout=120)):
            raise RuntimeError("not every message published was acknowledged")
        published, published_caller = time.clock_gettime(clock) - start, time.thread_time() - caller
        # One at a time, QoS 0, retained: the controller's event acknowledgements.
        acks = [(f"tether/v1/devices/device-{i:05d}/acked", payload[:40]) for i in range(messages)]
        start, caller = time.clock_gettime(clock), time.thread_time()
        for topic, ack in acks:
            if not receiver.publish(topic, ack, qos=0, retain=True):
                raise RuntimeError("a QoS 0 message was not handed over")
        caller_qos0 = time.thread_time() - caller
        if not receiver.publish_confirmed("tether/v1/devices/device-00000/acked", b"end", qos=1, timeout=120):
            raise RuntimeError("the QoS 0 burst's last message was not acknowledged")
        qos0 = time.clock_gettime(clock) - start
        return received, published, published_caller, qos0, caller_qos0
    finally:
        sender.close()
        receiver.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=30000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    load_start = load_average()
    with tempfile.TemporaryDirectory() as tmp, Mosquitto(Path(tmp)) as broker:
        figures: dict[str, list[float]] = {
            "received_us": [],
            "published_us": [],
            "publish_caller_us": [],
            "qos0_us": [],
            "qos0_caller_us": [],
        }
        for run in range(args.runs):
            for key, cpu in zip(figures, one_run(broker.port, args.messages), strict=True):
                figures[key].append(cpu / args.messages * 1e6)
            log(f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in figures.items()))
    labels = {
        "received_us": "received: client thread CPU per message",
        "published_us": "published: client thread CPU per message",
        "publish_caller_us": "published: the caller's CPU per message",
        "qos0_us": "published one at a time, QoS 0: client thread CPU per message",
        "qos0_caller_us": "published one at a time, QoS 0: the caller's CPU per message",
    }
    rows = [
        Row("messages per run (QoS 1, ~480 bytes)", args.messages),
        Row("load average, start / end", f"{load_start:.2f} / {load_average():.2f}"),
    ]
    for key, values in figures.items():
        rows.append(Row(f"{labels[key]}, median", rnd(statistics.median(values), 2), " us"))
        rows.append(Row(f"{labels[key]}, runs", " / ".join(f"{v:.1f}" for v in values), " us"))
    report("mqtt_client_cpu", "MQTT client CPU per message", rows, figures, args.json)


if __name__ == "__main__":
    main()
