"""One deployment step's CPU (``Deployer.advance``) at N devices, by the share of devices changed.

    .venv/bin/python bench/deployment_step.py --devices 10000

The controller of ``controller_cpu.py`` (real worker, real SQLite store, no broker)
registers N devices and deploys a first version to all of them, then a second: every
device reports it running, and one step starts every healthy timer. Then, for 0 %, 1 %,
10 % and 100 % of the devices, those devices' reports are ingested (the worker's own
steps held back) and one step is timed (process CPU), alternately a ``converging`` report
(their healthy timers stop: entries change and the deployment is stored) and a
``running`` one from the next devices (running already: no entry changes). End to end a step runs about every second while devices report, each
seeing a fraction of the group changed: that is what this measures. One more converging
step per share, not timed, gives what a step writes to the store (rows changed, and the
bytes of the pages SQLite writes to its write-ahead log).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import controller_cpu as replay
from common import Row, load_average, report, rnd
from tether.controller.models import User
from tether.controller.service import Controller
from tether.controller.store import Store
from tether.protocol import codec, topics
from tether.protocol.acl import LEGACY_USER
from tether.protocol.commands import GroupsCreate, StacksDeploy
from tether.protocol.credentials import Credential, hash_password, new_password
from tether.protocol.models import DesiredState, Request
from tether.protocol.topics import DeviceTopic

NAME = "deployment_step"
SHARES = (0.0, 0.01, 0.10, 1.0)


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    n = args.devices
    store = Store(workdir / "tether.db")
    clock = replay.Clock()
    controller = Controller(store, clock=clock)
    client = replay.Acknowledging()
    controller.client = client  # type: ignore[assignment]
    controller.leading.set()
    with store.transaction():
        store.put_user(User(name=LEGACY_USER, role="admin", created=clock()))
        store.put_credential(Credential(LEGACY_USER, "operator", LEGACY_USER, hash_password(new_password())))
    controller.execute(GroupsCreate(name="fleet", selector="bench=cpu", trust_device_labels=True))
    replay.work(controller, replay.registration(n))
    replay.deploy(controller, client, clock, 1, 1)
    client.desired.clear()
    request = Request(
        id=uuid.uuid4().hex,
        reply_to=replay.REPLIES,
        command=StacksDeploy(name="app", group="fleet", compose=replay.compose_stack(3, 2)).model_dump(
            mode="json"
        ),
    )
    replay.work(controller, [(topics.REQUESTS, codec.encode(request))])
    stack = store.get_stack("app")
    assert stack is not None
    services = {stack.spec_hash: {s.name: s.spec_hash() for s in stack.spec.services}}
    desired = {d: codec.decode(p, DesiredState) for d, p in client.desired_states()}
    ids = sorted(desired)
    deployer = controller.context.deployer

    def ingest(chosen: list[str], state: str) -> None:
        deployer._step_not_before = float("inf")  # the worker's own ticks do not step
        topic = DeviceTopic.REPORTED
        replay.work(
            controller,
            [(topics.device(d, topic), replay.report_of(d, desired[d], state, services)) for d in chosen],
        )
        deployer._step_not_before = 0.0

    ingest(ids, "running")
    controller.advance_deployments(force=True)  # every device updating, its healthy timer running
    load0 = load_average()
    shares = []
    for share in SHARES:
        k = int(n * share)
        stored, unstored = [], []
        for rep in range(args.reps):
            chosen = ids if k >= n else (ids[(rep * k) % n :] + ids)[:k]
            ingest(chosen, "converging" if rep % 2 == 0 else "running")
            t0 = time.process_time()
            controller.advance_deployments(force=True)
            (stored if rep % 2 == 0 else unstored).append(1000 * (time.process_time() - t0))
        # One more converging step, not timed: what it writes to the store (rows, WAL pages).
        chosen = ids if k >= n else (ids[(args.reps * k) % n :] + ids)[:k]
        ingest(chosen, "converging")
        rows_written, bytes_written = traced_step(controller, store)
        shares.append(
            {
                "share": share,
                "devices_changed": k,
                "ms_converging": rnd(statistics.median(stored), 3),
                "ms_running": rnd(statistics.median(unstored), 3),
                "rows_written": rows_written,
                "kb_written": rnd(bytes_written / 1000, 1),
            }
        )
    latest = store.latest_deployments()["app"]
    store.close()
    return {
        "devices": n,
        "reps": args.reps,
        "shares": shares,
        "deployment": latest.state,
        "load_average": [load0, load_average()],
    }


def traced_step(controller: Controller, store: Store) -> tuple[int, int]:
    """One step, and what it wrote to the store: rows changed, and bytes written (the pages
    SQLite appended to its write-ahead log, emptied first)."""
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = store.db.total_changes
    controller.advance_deployments(force=True)
    rows_written = store.db.total_changes - before
    _, frames, _ = store.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    (page,) = store.db.execute("PRAGMA page_size").fetchone()
    return rows_written, int(frames) * int(page)


def rows(data: dict[str, Any]) -> list[Row]:
    out = [
        Row("devices", data["devices"]),
        Row("load average, start / end", " / ".join(map(str, data["load_average"]))),
    ]
    for s in data["shares"]:
        label = f"{s['share']:.0%} of devices changed"
        out.append(Row(f"{label}: a step after converging reports (median)", s["ms_converging"], " ms"))
        out.append(Row(f"{label}: a step after running reports (median)", s["ms_running"], " ms"))
        out.append(Row(f"{label}: store rows written by a converging step", s["rows_written"]))
        out.append(Row(f"{label}: store writes of a converging step", s["kb_written"], " KB"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=10000)
    p.add_argument("--reps", type=int, default=6, help="steps timed per share (half of each report)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tether-step-") as tmp:
        data = run(args, Path(tmp))
    report(NAME, f"Deployment step: {args.devices} devices", rows(data), data, args.json, args.devices)
    return 0


if __name__ == "__main__":
    sys.exit(main())
