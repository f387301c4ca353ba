"""The controller's own CPU per device: its worker replaying what N devices send, no broker.

    .venv/bin/python bench/controller_cpu.py --devices 10000

A real controller (``Controller``, its worker loop and a real SQLite store) in this
process, whose MQTT client is replaced by one that acknowledges every publish at once.
What N devices would send arrives on its inbox as the MQTT thread would put it there:

1. *registration*: each device's presence (online, with its labels) and first report;
2. *deploy* (a new stack, then a new version of it): a ``stacks.deploy`` request, then
   from every device what an agent sends for the desired state it got (a report of the
   new generation converging, its events (``desired.accepted`` and one per service, in one
   message as tether.sim's agents send them), a report of it running), then the deployment's
   steps until it succeeded (the controller's clock is moved past ``min_healthy_time``);
3. *idle*: ticks with nothing to do.

Only this process's CPU time is measured (``time.process_time``), so the figures do not
depend on what else the machine runs: this is the benchmark to compare two versions of the
controller's code with. ``deploy_latency.py`` and ``controller_capacity.py`` measure the
same controller end to end (broker, simulated agents, wall time).

``--db postgresql://...`` (an empty database) replays on PostgreSQL instead of a SQLite
file: the controller's own CPU for its statements and round trips (the server's is not
counted).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from common import Row, compose_stack, load_average, log, per_device_ms, report, rnd
from tether.controller.models import User
from tether.controller.service import _STOP, Controller
from tether.controller.store import Store
from tether.protocol import codec, topics
from tether.protocol.acl import LEGACY_USER
from tether.protocol.commands import GroupsCreate, StacksDeploy
from tether.protocol.credentials import Credential, hash_password, new_password
from tether.protocol.heap import tune_gc
from tether.protocol.models import (
    DesiredState,
    DeviceFacts,
    Event,
    Presence,
    Reply,
    ReportedState,
    Request,
    ServiceStatus,
    StackStatus,
)
from tether.protocol.topics import DeviceTopic

NAME = "controller_cpu"
REPLIES = "tether/v1/clients/bench/replies"


class Acknowledging:
    """The controller's MQTT client, as a broker that acknowledges everything at once."""

    connected = True
    session_present = True

    def __init__(self) -> None:
        self.desired: dict[str, bytes] = {}
        """Each device's desired state, by its topic (the device id read from it outside the
        measured work: see :meth:`desired_states`)."""
        self.reply: Reply | None = None
        self.reply_cpu: float | None = None
        self.messages = 0

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        self.messages += 1
        if topic == REPLIES:
            self.reply_cpu = time.process_time()
            self.reply = codec.decode(payload, Reply)
        elif topic.endswith("/desired"):
            self.desired[topic] = payload  # as a client hands it on: no parsing counted as the controller's
        return True

    def desired_states(self) -> list[tuple[str, bytes]]:
        """(device id, desired state) of every desired state published, by device id."""
        parsed = ((topics.parse_device(topic), payload) for topic, payload in self.desired.items())
        return sorted((device[0], payload) for device, payload in parsed if device is not None)

    def publish_confirmed(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        return self.publish(topic, payload, qos, retain)

    def publish_many(self, messages: list[tuple[str, bytes, int, bool]], timeout: float = 30.0) -> list[bool]:
        return [self.publish(t, p, q, r) for t, p, q, r in messages]

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        pass

    def unsubscribe(self, topic_filter: str) -> None:  # a presence read again (controller/reread.py)
        pass


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def work(controller: Controller, messages: list[tuple[str, bytes]]) -> float:
    """Run the controller's worker loop over ``messages`` (ticks included); its CPU seconds,
    putting them on its inbox included (the MQTT thread's part: the inbox parses device topics)."""
    t0 = time.process_time()
    for message in messages:
        controller.inbox.put(message)
    controller.inbox.put((_STOP, b""))
    controller._run()
    return time.process_time() - t0


def device_id(i: int) -> str:
    return f"cpu-{i:06d}"


def registration(n: int) -> list[tuple[str, bytes]]:
    facts = DeviceFacts(
        agent_version="0.1",
        driver="process",
        arch="x86_64",
        os="linux",
        labels={"bench": "cpu"},
        keepalive=60,
    )
    out = []
    for i in range(n):
        d = device_id(i)
        out.append(
            (
                topics.device(d, DeviceTopic.PRESENCE),
                codec.encode(Presence(device_id=d, status="online", session=1, facts=facts)),
            )
        )
        out.append(
            (topics.device(d, DeviceTopic.REPORTED), codec.encode(ReportedState(device_id=d, generation=0)))
        )
    return out


def report_of(d: str, desired: DesiredState, state: str, spec_services: dict[str, dict[str, str]]) -> bytes:
    """A device's report of its desired state, every service ``running`` or ``starting``."""
    stacks = {
        ref.name: StackStatus(
            spec_hash=ref.spec_hash,
            state=state,  # type: ignore[arg-type]
            services={
                name: ServiceStatus(state="running" if state == "running" else "starting", spec_hash=h)
                for name, h in spec_services[ref.spec_hash].items()
            },
        )
        for ref in desired.stacks
    }
    return codec.encode(ReportedState(device_id=d, generation=desired.generation, stacks=stacks))


def answers(
    client: Acknowledging, spec_services: dict[str, dict[str, str]], seq: int
) -> list[list[tuple[str, bytes]]]:
    """What every device sends for its new desired state, as an agent does on the wire
    (captured from tether.sim): one message of events, a batch of a ``desired.accepted``
    event and a ``service.created`` event per service (each event with ``oldest``, none
    acknowledged yet, and acknowledged by the controller), a report converging, then a
    report running. Events are numbered from ``seq``."""
    converging, events, running = [], [], []
    for d, payload in client.desired_states():
        desired = codec.decode(payload, DesiredState)
        topic = topics.device(d, DeviceTopic.REPORTED)
        converging.append((topic, report_of(d, desired, "converging", spec_services)))
        event_topic = topics.device(d, DeviceTopic.EVENTS)
        n = len(desired.stacks)
        accepted = Event(
            device_id=d,
            seq=seq,
            kind="desired.accepted",
            message=f"generation {desired.generation} accepted ({n} stacks)",
            at=time.time(),
            oldest=seq,
        )
        batch = [codec.encode(accepted)]
        number = seq
        for ref in desired.stacks:
            for service in spec_services[ref.spec_hash]:
                number += 1
                created = Event(
                    device_id=d,
                    seq=number,
                    kind="service.created",
                    message=f"created and started (version {ref.spec_hash[:12]})",
                    stack=ref.name,
                    service=service,
                    at=time.time(),
                    oldest=seq,
                    spec_hash=ref.spec_hash,
                )
                batch.append(codec.encode(created))
        events.append((event_topic, codec.array(batch)))  # as the agent sends them: one message
        running.append((topic, report_of(d, desired, "running", spec_services)))
    return [converging + events, running]


def deploy(
    controller: Controller, client: Acknowledging, clock: Clock, version: int, seq: int
) -> dict[str, Any]:
    client.desired.clear()
    client.reply = None
    request = Request(
        id=uuid.uuid4().hex,
        reply_to=REPLIES,
        command=StacksDeploy(name="app", group="fleet", compose=compose_stack(3, version)).model_dump(
            mode="json"
        ),
    )
    t0 = time.process_time()
    cpu_request = work(controller, [(topics.REQUESTS, codec.encode(request))])
    assert client.reply is not None and client.reply.ok, client.reply
    cpu_reply = (client.reply_cpu or t0) - t0
    stack = controller.store.get_stack("app")
    assert stack is not None
    spec_services = {stack.spec_hash: {s.name: s.spec_hash() for s in stack.spec.services}}
    devices = len(client.desired)
    cpu_ingest = 0.0
    for wave in answers(client, spec_services, seq):
        cpu_ingest += work(controller, wave)
    t1 = time.process_time()
    controller.advance_deployments(force=True)  # sees every device running: the healthy timers start
    clock.offset += 11.0  # past min_healthy_time (10 s by default)
    for _ in range(5):
        controller.advance_deployments(force=True)
        latest = controller.store.latest_deployments()["app"]
        if latest.state == "succeeded":
            break
    cpu_steps = time.process_time() - t1
    total = cpu_request + cpu_ingest + cpu_steps
    log(f"deploy v{version}: {devices} devices, deployment {latest.state}, CPU {total:.2f} s")
    return {
        "version": version,
        "devices_sent_desired": devices,
        "deployment": latest.state,
        "cpu_s_reply": rnd(cpu_reply),
        "cpu_s_request": rnd(cpu_request),
        "cpu_s_ingest": rnd(cpu_ingest),
        "cpu_s_steps_after": rnd(cpu_steps),
        "cpu_s": rnd(total),
    }


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    n = args.devices
    store = Store(args.db or workdir / "tether.db")
    clock = Clock()
    controller = Controller(store, clock=clock)
    client = Acknowledging()
    controller.client = client  # type: ignore[assignment]
    controller.leading.set()
    with store.transaction():  # requests come from `tether up`'s first admin, as the CLI's do
        store.put_user(User(name=LEGACY_USER, role="admin", created=clock()))
        store.put_credential(Credential(LEGACY_USER, "operator", LEGACY_USER, hash_password(new_password())))
    controller.execute(GroupsCreate(name="fleet", selector="bench=cpu", trust_device_labels=True))
    thresholds = gc.get_threshold()
    if args.tune_gc:  # as `tether up` does once started (controller/app.py)
        tune_gc()
    load0 = load_average()
    cpu_registration = work(controller, registration(n))
    log(f"registration: {cpu_registration:.2f} s of CPU, {len(client.desired)} desired states")
    deploys = [deploy(controller, client, clock, v, 1 + 100 * (v - 1)) for v in (1, 2)]  # events' seq
    t0 = time.process_time()
    for _ in range(args.ticks):
        controller.tick()
    cpu_idle = time.process_time() - t0
    rows = {
        table: store.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        for table in ("devices", "reported", "desired", "events", "deployments", "specs")
    }
    gc.unfreeze()
    gc.set_threshold(*thresholds)
    store_mb = None
    if store.kind == "sqlite":
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        store_mb = (workdir / "tether.db").stat().st_size / 1024 / 1024
    store.close()
    return {
        "gc": "tether up's (protocol/heap.py)" if args.tune_gc else "CPython's defaults",
        "store_rows": rows,
        "store": store.kind,
        "store_mb": rnd(store_mb, 2) if store_mb is not None else None,
        "devices": n,
        "registration": {
            "cpu_s": rnd(cpu_registration),
            "cpu_ms_per_device": per_device_ms(cpu_registration, n),
        },
        "deploys": deploys,
        "idle_tick_cpu_ms": rnd(1000 * cpu_idle / max(1, args.ticks), 2),
        "load_average": [load0, load_average()],
    }


def rows(data: dict[str, Any]) -> list[Row]:
    n = data["devices"]
    reg = data["registration"]
    out = [
        Row("devices (replayed)", n),
        Row(
            "load average, start / end (CPU time grows with it: compare runs made side by side)",
            " / ".join(map(str, data["load_average"])),
        ),
        Row("garbage collector settings", data.get("gc", "?")),
        Row("registration: controller CPU", reg["cpu_s"], " s"),
        Row("registration: per device", reg["cpu_ms_per_device"], " ms"),
    ]
    for d, label in zip(data["deploys"], ("new stack", "new version"), strict=True):
        per_device = per_device_ms(d["cpu_s"], n)
        out += [
            Row(f"{label}: until the reply", d["cpu_s_reply"], " s", "<= 0.5 s at 10,000", None),
            Row(f"{label}: the request (reply, then publishing)", d["cpu_s_request"], " s"),
            Row(f"{label}: reports and events (3 messages per device: as an agent)", d["cpu_s_ingest"], " s"),
            Row(f"{label}: deployment steps after the last report", d["cpu_s_steps_after"], " s"),
            Row(f"{label}: the deploy in all (deployment {d['deployment']})", d["cpu_s"], " s"),
            Row(
                f"{label}: per device",
                per_device,
                " ms",
                "<= 0.2 ms",
                per_device is not None and per_device <= 0.2,
            ),
        ]
    out.append(Row("idle tick", data["idle_tick_cpu_ms"], " ms"))
    out.append(Row("store rows", ", ".join(f"{k} {v:,}" for k, v in data["store_rows"].items())))
    out.append(Row("store", data.get("store", "sqlite")))
    if data["store_mb"] is not None:
        out.append(Row("store size (SQLite, checkpointed)", data["store_mb"], " MB"))
        out.append(Row("store size per device", rnd(1024 * data["store_mb"] / n, 2), " KB"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--ticks", type=int, default=10, help="idle ticks measured")
    p.add_argument(
        "--no-tune-gc",
        dest="tune_gc",
        action="store_false",
        help="CPython's default collector settings, not those of `tether up` (protocol/heap.py)",
    )
    p.add_argument(
        "--db",
        default=None,
        help="a postgresql:// URL of an empty database (default: a SQLite file in a temporary directory); "
        "only this process's CPU is counted, not the database server's",
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tether-cpu-") as tmp:
        data = run(args, Path(tmp))
    report(
        NAME, f"Controller CPU: {args.devices} devices replayed", rows(data), data, args.json, args.devices
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
