"""The test infrastructure itself works: real brokers, real containers, real HTTP."""

from __future__ import annotations

import socket
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from support import infra
from support.infra import Mosquitto, free_port, wait_until


def test_wait_until_returns_value_and_times_out_with_message() -> None:
    """wait_until returns the predicate's truthy value and raises AssertionError carrying the message."""
    calls = iter([0, "", "ready"])
    assert wait_until(lambda: next(calls), timeout=5, interval=0.001) == "ready"
    with pytest.raises(AssertionError, match="never true"):
        wait_until(lambda: False, timeout=0.1, message="never true")


def test_free_port_is_bindable() -> None:
    """free_port hands out a port that can be bound on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))


@pytest.mark.mosquitto
def test_mosquitto_round_trips_a_retained_message(mosquitto: Mosquitto) -> None:
    """The mosquitto fixture accepts TCP and relays a retained message between two paho 2 clients."""
    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"
    socket.create_connection(("127.0.0.1", mosquitto.port), timeout=5).close()

    topic = f"tether/test/{uuid.uuid4().hex}"
    publisher = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    publisher.connect("127.0.0.1", mosquitto.port)
    publisher.loop_start()
    try:
        publisher.publish(topic, b"hello", qos=1, retain=True).wait_for_publish(timeout=10)
    finally:
        publisher.disconnect()
        publisher.loop_stop()

    received: list[mqtt.MQTTMessage] = []
    subscriber = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    subscriber.on_connect = lambda client, *_: client.subscribe(topic, qos=1)
    subscriber.on_message = lambda _c, _u, msg: received.append(msg)
    subscriber.connect("127.0.0.1", mosquitto.port)
    subscriber.loop_start()
    try:
        wait_until(lambda: received, timeout=10, message="retained message delivered")
    finally:
        subscriber.disconnect()
        subscriber.loop_stop()
    assert (received[0].payload, received[0].retain) == (b"hello", True)
    assert "mosquitto version" in mosquitto.log_text()


@pytest.mark.mosquitto
def test_mosquitto_retries_when_its_port_is_taken(
    mosquitto: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Mosquitto handed a port that is already taken starts again on another one."""
    offered = iter([mosquitto.port])
    real_free_port = infra.free_port
    monkeypatch.setattr(infra, "free_port", lambda: next(offered, None) or real_free_port())
    (tmp_path / "second").mkdir()
    with Mosquitto(tmp_path / "second") as second:
        assert second.port != mosquitto.port
        assert second.proc is not None and second.proc.poll() is None
        socket.create_connection(("127.0.0.1", second.port), timeout=5).close()


@pytest.mark.docker
def test_busybox_image_serves_http_on_a_published_port(docker_engine: Any, busybox_image: str) -> None:
    """The local busybox image runs httpd, reachable through a host port Docker chose on 127.0.0.1."""
    script = "echo tether-ok > /www/index.html && exec httpd -f -p 8080 -h /www"
    container = docker_engine.containers.run(
        busybox_image,
        ["sh", "-c", script],
        detach=True,
        ports={"8080/tcp": ("127.0.0.1", None)},
        labels={"io.tether.test": "infra"},
    )
    try:

        def host_port() -> str | None:
            container.reload()
            bindings = container.ports.get("8080/tcp") or []
            return bindings[0]["HostPort"] if bindings else None

        port = wait_until(host_port, timeout=10, message="Docker to publish 8080/tcp")

        def fetch() -> bytes | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=2) as resp:
                    return bytes(resp.read())
            except OSError:
                return None

        body = wait_until(fetch, timeout=20, message=f"httpd to answer on 127.0.0.1:{port}")
        assert body == b"tether-ok\n"
    finally:
        container.remove(force=True)
