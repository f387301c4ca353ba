"""One scenario per failure mode of issue 4, each under a real fault (see fleet.py)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from support.infra import wait_until

from .fleet import Fleet

pytestmark = pytest.mark.e2e

BOTH = {"steady", "noise", "late"}


def hold(since: float, seconds: float) -> None:
    """Keep the fault on until ``seconds`` after ``since``: holding it *is* the scenario."""
    time.sleep(max(0.0, since + seconds - time.monotonic()))


def settle(
    fleet: Fleet,
    record: Any,
    scenario: str,
    healed_at: float,
    names: list[str],
    faulted: list[str],
    steady: dict[str, int | None],
    **details: Any,
) -> dict[str, Any]:
    """After healing: wait for convergence, then check the four promises and record the result.

    ``steady`` maps each device to the pid its steady workload had before the fault (None
    where the scenario restarts it on purpose).
    """
    converge = fleet.wait_converged(healed_at, names, BOTH)
    for name in names:
        if steady.get(name) is not None:
            assert fleet.pid(name) == steady[name] and fleet.alive(steady[name]), f"{name}: steady restarted"
        else:
            assert fleet.alive(fleet.pid(name)), f"{name}: steady not running"
        starts = fleet.starts(name, "late", "late")
        assert starts == [fleet.late_tag], f"{name}: late started {starts}, want exactly once"
        assert fleet.alive(fleet.pid(name, "late", "late"))
        agent = fleet.agents[name]
        assert agent.proc.poll() is None, f"{name}: agent exited"
        assert "Traceback" not in agent.output(), f"{name}: agent logged a traceback"
    events = {name: fleet.event_report(name) for name in faulted}
    for name, report in events.items():
        assert not report["lost"], f"{name}: events lost {report}"
        assert report["duplicates_stored"] == 0
    return record(
        scenario,
        converge_s=round(converge, 2),
        events=events[faulted[0]],
        **details,
    )


def test_long_partition(fleet: Fleet, record: Any) -> None:
    """(1) A 30 s partition, longer than keepalive and the broker's 1.5 x keepalive timeout:
    the device is seen offline, its workload keeps running, the deploy made during the cut
    is applied after healing exactly once, and no event is lost."""
    d1, d2 = fleet.boot()
    steady = {n: fleet.pid(n) for n in (d1, d2)}
    fleet.backend.partition(d1)
    cut = time.monotonic()
    fleet.deploy_late()
    wait_until(lambda: fleet.converged([d2], BOTH), 30, 0.1, "the healthy device applies the deploy")
    wait_until(lambda: fleet.show(d1)["status"] == "offline", 30, 0.2, "d1 seen offline")
    offline_after = time.monotonic() - cut
    hold(cut, 30)
    assert fleet.alive(steady[d1])
    fleet.backend.heal(d1)
    settle(fleet, record, "01-long-partition", time.monotonic(), [d1, d2], [d1], steady,
           held_s=30, offline_seen_after_s=round(offline_after, 1))
