"""Webhooks end to end: a real controller and agent, a simulated fleet, and a local HTTP
receiver: signed delivery, retries while the receiver is down, an offline device heard within
the threshold plus one keepalive, its return, and one summary for a fleet-wide outage."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from support.infra import wait_until
from support.procs import AgentProcess, ControllerProcess, cli_json, wait_online
from tether.controller import notify
from tether.sim import FleetConfig, FleetThread

pytestmark = [pytest.mark.e2e]

SECRET = "e2e-" + uuid.uuid4().hex
OFFLINE_AFTER = 2.0
KEEPALIVE = 10.0  # AgentProcess's --keepalive


class Receiver:
    """An HTTP endpoint on 127.0.0.1:0: bound at once, but refusing connections until :meth:`listen`."""

    def __init__(self) -> None:
        self.posts: list[tuple[float, bytes, dict[str, str]]] = []
        received = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                received.append((time.monotonic(), body, dict(self.headers.items())))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
        self.server.server_bind()  # the port is ours; not listening yet: connections are refused
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread: threading.Thread | None = None

    def listen(self) -> None:
        self.server.server_activate()
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.thread is not None:
            self.server.shutdown()
        self.server.server_close()

    def bodies(self, kind: str | None = None) -> list[dict[str, Any]]:
        out = [json.loads(b) for _, b, _ in list(self.posts)]
        return [b for b in out if kind is None or b["kind"] == kind]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    recv = Receiver()
    yield recv
    recv.stop()


def test_webhooks_deliver_signed_retry_and_summarise_an_outage(tmp_path: Path, receiver: Receiver) -> None:
    """A signed test message reaches a receiver that was down at first; a killed agent's device.offline
    arrives within the threshold plus one keepalive, device.online when it is back; 30 simulated
    devices dropping at once bring 3 posts and one summary, not 30."""
    controller = ControllerProcess(tmp_path / "controller")
    agent: AgentProcess | None = None
    try:
        url = controller.url
        secret_file = tmp_path / "secret"
        secret_file.write_text(SECRET + "\n")
        added = cli_json(
            url,
            "notify",
            "add",
            receiver.url,
            "--on",
            "device.offline,device.online",
            "--offline-after",
            f"{OFFLINE_AFTER:.0f}s",
            "--window",
            "4s",
            "--secret-file",
            str(secret_file),
        )["webhook"]
        assert added["signed"] and SECRET not in json.dumps(cli_json(url, "notify", "ls"))
        hook = added["id"]

        # The receiver is down: the test message fails, stays pending with the error, then arrives.
        test = cli_json(url, "notify", "test", hook)
        failed = wait_until(
            lambda: (d := cli_json(url, "notify", "log", hook)[0])["attempts"] >= 1 and d,
            20,
            interval=0.2,
            message="a first failed attempt",
        )
        assert failed["state"] == "pending" and "Connection" in failed["last_error"], failed
        receiver.listen()
        wait_until(lambda: receiver.bodies("test"), 30, interval=0.2, message="the retried test message")
        _, raw, headers = receiver.posts[0]
        assert json.loads(raw)["delivery"] == test["id"]
        assert notify.verify(SECRET, headers[notify.TIMESTAMP_HEADER], raw, headers[notify.SIGNATURE_HEADER])
        assert not notify.verify(
            "other", headers[notify.TIMESTAMP_HEADER], raw, headers[notify.SIGNATURE_HEADER]
        )

        # A real agent killed: its will makes it offline; the webhook hears of it past the threshold.
        device = f"wh-{uuid.uuid4().hex[:6]}"
        agent = AgentProcess(url, device, tmp_path / "agent")
        wait_online(url, device)
        agent.kill()
        killed = time.monotonic()
        offline = wait_until(
            lambda: [(t, b) for t, b, _ in receiver.posts if json.loads(b)["kind"] == "device.offline"],
            OFFLINE_AFTER + KEEPALIVE + 10,
            interval=0.1,
            message="device.offline",
        )
        heard, body = offline[0]
        assert json.loads(body)["subject"] == f"devices/{device}"
        assert OFFLINE_AFTER <= heard - killed <= OFFLINE_AFTER + KEEPALIVE, heard - killed
        agent = AgentProcess(url, device, tmp_path / "agent")
        back = wait_until(lambda: receiver.bodies("device.online"), 30, interval=0.2, message="device.online")
        assert back[0]["subject"] == f"devices/{device}" and back[0]["data"]["offline_for"] >= OFFLINE_AFTER

        # A fleet-wide outage: 30 devices vanish at once.
        config = FleetConfig(broker=url, devices=30, prefix="out", connect_rate=200)
        with FleetThread(config) as sim:
            sim.wait(lambda f: f.connected() == 30, 30, message="30 connected")
            wait_until(
                lambda: (
                    sum(
                        d["id"].startswith("out-") and d["status"] == "online"
                        for d in cli_json(url, "devices", "ls")
                    )
                    == 30
                ),
                30,
                interval=0.5,
                message="the controller sees 30 online",
            )
            sim.call(lambda f: [d.crash() for d in f.devices])
            summary = wait_until(lambda: receiver.bodies("summary"), 40, interval=0.2, message="one summary")
            sim.stop()
        singles = [b for b in receiver.bodies("device.offline") if b["subject"].startswith("devices/out-")]
        assert len(singles) == notify.BURST, singles
        assert summary[0]["data"]["kind"] == "device.offline"
        assert summary[0]["data"]["count"] + len(singles) == 30
        assert len(receiver.bodies("summary")) == 1
        wait_until(
            lambda: all(
                d["state"] == "delivered" for d in cli_json(url, "notify", "log", hook, "--limit", "100")
            ),
            10,
            interval=0.2,
            message="every delivery recorded as delivered",
        )
    finally:
        if agent is not None:
            agent.stop()
        controller.stop()
