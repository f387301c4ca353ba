"""What one device can make the controller store is bounded, and what is dropped is counted.

Real processes: `tether up` (embedded broker, SQLite, --http), the CLI, and a raw MQTT client
playing a device that floods its events topic.
"""

from __future__ import annotations

import sqlite3
import urllib.request
import uuid
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from support.infra import wait_until
from support.procs import ControllerProcess, cli_json
from tether.protocol import codec
from tether.protocol.models import DeviceFacts, Event, JobResult, Presence

pytestmark = pytest.mark.e2e

FLOOD = 120


def _db_counts(db: Path, device: str) -> tuple[int, int, int]:
    """(job result rows, event rows of ``device``, largest stored event) read from the live SQLite file."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        results = conn.execute("SELECT COUNT(*) FROM job_results").fetchone()[0]
        events, largest = conn.execute(
            "SELECT COUNT(*), COALESCE(MAX(LENGTH(body)), 0) FROM events WHERE device_id = ?", (device,)
        ).fetchone()
        return results, events, largest
    finally:
        conn.close()


def test_a_flooding_device_is_bounded_and_its_drops_are_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """job.result events for a new job each time store no result row, oversized events are
    trimmed, and the drops show in `devices show` and /metrics; a real job's result is kept
    (on SQLite: the test counts the rows in the database file)."""
    monkeypatch.delenv("TETHER_DB", raising=False)
    controller = ControllerProcess(tmp_path / "c", extra=["--http", "127.0.0.1:0"])
    device = f"flood-{uuid.uuid4().hex[:6]}"
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    try:
        http = int(controller.wait_for_line(r"health and metrics on http://127.0.0.1:(\d+)/").group(1))
        client.connect("127.0.0.1", controller.port)
        client.loop_start()
        facts = DeviceFacts(agent_version="0", driver="process", arch="x", os="Linux")
        presence = Presence(device_id=device, status="online", session=1, facts=facts)
        client.publish(
            f"tether/v1/devices/{device}/presence", codec.encode(presence), qos=1
        ).wait_for_publish(10)
        cli_json(controller.url, "groups", "create", "g", "--device", device)
        cli_json(controller.url, "jobs", "run", "real", "--group", "g", "--", "true")

        def event(seq: int, job: str) -> bytes:
            result = JobResult(
                job=job, run=f"r{seq}", started=float(seq), duration_s=0.1, exit_code=0, output="o" * 20_000
            )
            return codec.encode(
                Event(
                    device_id=device, seq=seq, kind="job.result", message="m" * 5000, data=result.model_dump()
                )
            )

        for seq in range(1, FLOOD + 1):
            client.publish(f"tether/v1/devices/{device}/events", event(seq, f"job-{uuid.uuid4().hex}"), qos=1)
        client.publish(
            f"tether/v1/devices/{device}/events", event(FLOOD + 1, "real"), qos=1
        ).wait_for_publish(10)

        shown = wait_until(
            lambda: (
                (d := cli_json(controller.url, "devices", "show", device))["dropped"].get("event_trimmed")
                == FLOOD + 1
                and d
            ),
            60,
            message="every flooding event handled",
        )
        assert shown["dropped"] == {
            "event_trimmed": FLOOD + 1,
            "job_output_trimmed": 1,
            "job_result_unknown_job": FLOOD,
        }
        results, events, largest = _db_counts(tmp_path / "c" / "tether.db", device)
        assert results == 1  # only the real job's
        assert events <= 201 and largest < 24_000
        logs = cli_json(controller.url, "jobs", "logs", "real")
        assert [len(r["output"]) for r in logs] == [16 * 1024]
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
        assert f'tether_device_messages_dropped_total{{reason="job_result_unknown_job"}} {FLOOD}.0' in metrics
        shown_text = controller.log_path.read_text()
        assert shown_text.count("not stored as sent: job_result_unknown_job") == 3  # the 1st, 10th and 100th
    finally:
        client.loop_stop()
        client.disconnect()
        controller.stop()
