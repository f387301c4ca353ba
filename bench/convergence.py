"""Convergence after an outage: the time from healing the network to a converged fleet.

    .venv/bin/python bench/convergence.py --agents 100 --json out.json
    .venv/bin/python bench/convergence.py --agents 5 --hold 5       # CI scale, about 40 s

Real processes on a real (namespaced) network, built by the fault suite's harness
(tests/faults): Mosquitto (persistence on) and ``tether up --broker`` in a hub network
namespace, and ``--agents`` real ``tether-agent`` processes (process driver, keepalive
``--keepalive``), each in its own device namespace on one bridge. Without root it falls
back to loopback, every agent behind its own fault proxy (``--backend proxy`` forces it).

Each run: every device runs a stack; the broker is cut off from every device at once
(nft drop at the hub's switch port) for ``--hold`` seconds, longer than keepalive, so every
session drops and every agent is in its reconnect backoff; a new stack is deployed during
the outage; then the cut is healed. Measured from the heal, per device, from the
controller's view (``devices ls``, polled every 0.2 s):

* *online*: the controller shows the device online (after an outage longer than keepalive,
  in a newer session: ``reconnected`` counts those);
* *converged*: its desired generation is applied and both stacks run.

The table gives the first device, p50, p90 and the last one (the fleet converged), for one
device and for ``--agents``. What dominates is the agent's reconnect backoff (capped
exponential with full jitter, 0.5 s doubling to 30 s): a device that happened to start a
long wait just before the heal waits it out. See docs/reliability.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO, Row, log, percentile, report, rnd, wait_until

if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))

from faults.fleet import STEADY, Fleet, NetnsBackend, ProxyBackend  # noqa: E402
from faults.netns import unavailable_reason  # noqa: E402
from tether.protocol.backoff import Backoff  # noqa: E402
from tether.protocol.commands import DevicesList, GroupsCreate

NAME = "convergence"


def devices(fleet: Fleet) -> dict[str, dict[str, Any]]:
    return {d["id"]: d for d in fleet.request(DevicesList())["devices"]}


def is_converged(view: dict[str, Any], stacks: set[str]) -> bool:
    return (
        view["status"] == "online"
        and view["applied_generation"] is not None
        and view["applied_generation"] == view["desired_generation"]
        and all(view["stacks"].get(s) == "running" for s in stacks)
    )


def run(
    count: int, hold: float, backend_name: str, keepalive: int, timeout: float, tmp: Path
) -> dict[str, Any]:
    """One outage for ``count`` agents; per-device times after the heal."""
    backend = NetnsBackend(tmp) if backend_name == "netns" else ProxyBackend(tmp)
    fleet = Fleet(backend, tmp)
    try:
        fleet.start()
        names = [f"c{i:03d}-{fleet.run}" for i in range(count)]
        log(f"{count} agent(s): starting")
        for name in names:
            fleet.add_device(name)
        started = time.monotonic()
        for name in names:
            fleet.start_agent(name, extra=["--keepalive", str(keepalive)])
        wait_until(
            lambda: sum(v["status"] == "online" for v in devices(fleet).values()) == count,
            60 + count,
            0.5,
            "every agent online",
        )
        log(f"{count} agent(s): online in {time.monotonic() - started:.1f} s; deploying")
        fleet.request(GroupsCreate(name=fleet.group, selector=f"lab={fleet.run}", trust_device_labels=True))
        fleet.deploy("steady", STEADY)
        wait_until(
            lambda: all(is_converged(v, {"steady"}) for v in devices(fleet).values()),
            60 + count,
            0.5,
            "steady running everywhere",
        )
        before = {d: v["session"] for d, v in devices(fleet).items()}
        log(f"{count} agent(s): cutting the broker off for {hold:g} s")
        fleet.backend.isolate_broker(True)
        cut = time.monotonic()
        fleet.deploy_late()
        time.sleep(max(0.0, cut + hold - time.monotonic()))  # holding the outage is the experiment
        fleet.backend.isolate_broker(False)
        healed = time.monotonic()
        online: dict[str, float] = {}
        converged: dict[str, float] = {}
        sessions: dict[str, int] = {}
        while len(converged) < count and time.monotonic() - healed < timeout:
            now = time.monotonic() - healed
            for d, v in devices(fleet).items():
                if v["status"] == "online":
                    online.setdefault(d, now)
                    sessions[d] = v["session"]
                if d in online and is_converged(v, {"steady", "late"}):
                    converged.setdefault(d, now)
            time.sleep(0.2)
        log(
            f"{count} agent(s): {len(converged)} converged, last after {max(converged.values(), default=0):.1f} s"
        )
        return {
            "agents": count,
            "hold_s": hold,
            "online_s": stats(list(online.values()), count),
            "converged_s": stats(list(converged.values()), count),
            "reconnected": sum(sessions.get(d, 0) > s for d, s in before.items()),
            "per_device_converged_s": {d: rnd(t, 2) for d, t in sorted(converged.items())},
        }
    finally:
        fleet.stop()
        backend.close()


def stats(values: list[float], total: int) -> dict[str, Any]:
    return {
        "count": len(values),
        "missing": total - len(values),
        "first": rnd(min(values) if values else None, 2),
        "p50": rnd(percentile(values, 0.50), 2),
        "p90": rnd(percentile(values, 0.90), 2),
        "last": rnd(max(values) if values else None, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--agents", type=int, default=100, help="fleet size of the second run (the first has 1)")
    p.add_argument("--hold", type=float, default=25.0, help="seconds the broker stays cut off")
    p.add_argument("--keepalive", type=int, default=10, help="the agents' MQTT keepalive (s)")
    p.add_argument("--backend", choices=["auto", "netns", "proxy"], default="auto")
    p.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for convergence after the heal"
    )
    p.add_argument("--json", help="where to write the results (default bench/results/convergence.json)")
    args = p.parse_args(argv)

    backend = args.backend
    if backend == "auto":
        backend = "netns" if unavailable_reason() is None else "proxy"
    elif backend == "netns" and (reason := unavailable_reason()) is not None:
        p.error(f"--backend netns: {reason}")
    runs = []
    for count in sorted({1, args.agents}):
        with tempfile.TemporaryDirectory(prefix="tether-convergence-") as tmp:
            runs.append(run(count, args.hold, backend, args.keepalive, args.timeout, Path(tmp)))
    rows = []
    for r in runs:
        label = "1 device" if r["agents"] == 1 else f"{r['agents']} agents"
        c, o = r["converged_s"], r["online_s"]
        rows += [
            Row(f"{label}: first back online", o["first"], " s"),
            Row(f"{label}: all back online", o["last"], " s"),
            Row(f"{label}: first converged", c["first"], " s"),
            Row(f"{label}: p50 converged", c["p50"], " s"),
            Row(f"{label}: p90 converged", c["p90"], " s"),
            Row(f"{label}: all converged", c["last"], " s", "converges", c["missing"] == 0),
        ]
    backoff = Backoff()
    report(
        NAME,
        f"Time from heal to converged after a {args.hold:g} s outage ({backend}, keepalive {args.keepalive} s)",
        rows,
        {
            "backend": backend,
            "keepalive_s": args.keepalive,
            "reconnect_backoff": {"base_s": backoff.base, "cap_s": backoff.cap, "jitter": "full"},
            "runs": runs,
        },
        args.json,
    )
    return 0 if all(r["converged_s"]["missing"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
