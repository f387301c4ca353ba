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


def test_broker_restart(fleet: Fleet, record: Any) -> None:
    """(9) Mosquitto restarts while a device is cut off with a deploy pending for it: the
    retained desired state survives the restart, events produced while the broker was down
    arrive, and nothing running is touched."""
    d1, d2 = fleet.boot()
    steady = {n: fleet.pid(n) for n in (d1, d2)}
    fleet.backend.partition(d1)
    fleet.deploy_late()
    wait_until(lambda: fleet.converged([d2], BOTH), 30, 0.1, "the healthy device applies the deploy")
    fleet.broker.stop()
    down = time.monotonic()
    seq = fleet.agent_seq(d2)
    wait_until(lambda: fleet.agent_seq(d2) > seq, 30, 0.1, "an event produced while the broker is down")
    fleet.broker.start()
    restarted = time.monotonic()
    fleet.backend.heal(d1)
    settle(fleet, record, "09-broker-restart", restarted, [d1, d2], [d1, d2], steady,
           broker_down_s=round(restarted - down, 1))


def test_controller_restart(fleet: Fleet, record: Any) -> None:
    """(10) The controller is killed and restarted while a device is cut off with a deploy
    pending: a request made meanwhile fails loudly, events produced meanwhile are stored
    after its return, and the pending deploy still lands once."""
    d1, d2 = fleet.boot()
    steady = {n: fleet.pid(n) for n in (d1, d2)}
    fleet.backend.partition(d1)
    fleet.deploy_late()
    wait_until(lambda: fleet.converged([d2], BOTH), 30, 0.1, "the healthy device applies the deploy")
    assert fleet.controller is not None
    fleet.controller.kill()
    down = time.monotonic()
    refused = fleet.cli("stacks", "ls", "--request-timeout", "2")
    assert refused.returncode != 0 and "no reply from the controller" in refused.stderr
    seq = fleet.agent_seq(d2)
    wait_until(lambda: fleet.agent_seq(d2) > seq, 30, 0.1, "an event produced while the controller is down")
    fleet.start_controller()
    restarted = time.monotonic()
    fleet.backend.heal(d1)
    settle(fleet, record, "10-controller-restart", restarted, [d1, d2], [d1, d2], steady,
           controller_down_s=round(restarted - down, 1))


def test_agent_sigkill(fleet: Fleet, record: Any) -> None:
    """(11) The agent is killed with SIGKILL and a deploy is made while it is dead: the
    restarted agent re-adopts the running workload (same pid) and applies the deploy once."""
    d1, d2 = fleet.boot()
    steady = {n: fleet.pid(n) for n in (d1, d2)}
    fleet.agents[d1].kill()
    fleet.deploy_late()
    wait_until(lambda: fleet.show(d1)["status"] == "offline", 30, 0.1, "will published")
    assert fleet.alive(steady[d1])
    fleet.start_agent(d1)
    restarted = time.monotonic()
    settle(fleet, record, "11-agent-sigkill", restarted, [d1, d2], [d1], steady)


def test_reboot_while_offline(fleet: Fleet, record: Any) -> None:
    """(12) A device loses its link, then loses power: the agent comes back with the
    network still down and restarts the workloads from its saved desired state within
    seconds; the deploy made meanwhile lands once the link is back, and no event is lost."""
    d1, d2 = fleet.boot()
    steady = {n: fleet.pid(n) for n in (d1, d2)}
    fleet.backend.carrier(d1, up=False)
    fleet.deploy_late()
    wait_until(lambda: fleet.show(d1)["status"] == "offline", 30, 0.2, "d1 seen offline")
    fleet.kill_device_processes(d1)
    assert not fleet.alive(steady[d1])
    fleet.start_agent(d1)
    booted = time.monotonic()
    wait_until(lambda: fleet.alive(fleet.pid(d1)) and fleet.pid(d1) != steady[d1], 30, 0.1, "restored offline")
    restored = time.monotonic() - booted
    assert "connected to" not in fleet.agents[d1].output()
    fleet.backend.carrier(d1, up=True)
    settle(fleet, record, "12-reboot-while-offline", time.monotonic(), [d1, d2], [d1], {d2: steady[d2]},
           restored_offline_s=round(restored, 1))
