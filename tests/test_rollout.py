"""The deployment state machine (pure)."""

from __future__ import annotations

from tether.controller.rollout import Observation, Strategy, promote, start, step

OLD, NEW = "a" * 64, "b" * 64
DEVICES = ["d1", "d2", "d3", "d4"]


def _obs(
    running: set[str],
    hash_: str = NEW,
    state: str = "running",
    offline: frozenset[str] = frozenset(),
    held: frozenset[str] = frozenset(),
) -> dict[str, Observation]:
    return {
        d: Observation(
            online=d not in offline,
            spec_hash=hash_ if d in running else OLD,
            state=state if d in running else "running",
            held=d in held,
        )
        for d in DEVICES
    }


def _updating(dep) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(d for d, r in dep.devices.items() if r.state == "updating")


def test_rolling_moves_max_parallel_and_waits_for_the_batch() -> None:
    """Rolling: two devices at a time; the next batch only after min_healthy_time of health."""
    dep = start(1, "s", OLD, NEW, Strategy(kind="rolling", max_parallel=2, min_healthy_time_s=5), DEVICES, 0)
    dep = step(dep, DEVICES, _obs(set()), 0)
    assert _updating(dep) == ["d1", "d2"] and dep.pins() == {"d3": OLD, "d4": OLD}
    dep = step(dep, DEVICES, _obs({"d1", "d2"}), 1)
    assert _updating(dep) == ["d1", "d2"]  # healthy, but not yet for 5 s
    dep = step(dep, DEVICES, _obs({"d1", "d2"}), 6)
    assert _updating(dep) == ["d3", "d4"] and {dep.devices[d].batch for d in ("d3", "d4")} == {2}
    dep = step(dep, DEVICES, _obs(set(DEVICES)), 7)
    dep = step(dep, DEVICES, _obs(set(DEVICES)), 12)
    assert dep.state == "succeeded" and dep.pins() == {}


def test_deadline_failure_with_auto_revert_reverts_everyone() -> None:
    """A device not healthy by healthy_deadline fails the deployment; auto_revert pins all back."""
    strategy = Strategy(kind="all-at-once", healthy_deadline_s=30, auto_revert=True)
    dep = step(start(1, "s", OLD, NEW, strategy, DEVICES, 0), DEVICES, _obs(set()), 0)
    assert _updating(dep) == DEVICES
    dep = step(dep, DEVICES, _obs({"d1"}, state="converging"), 31)
    assert dep.state == "reverted"
    assert dep.pins() == {d: OLD for d in DEVICES}


def test_failed_stack_without_auto_revert_stops() -> None:
    """A failed stack on a moved device fails the deployment; pending devices stay pinned."""
    strategy = Strategy(kind="rolling", max_parallel=1)
    dep = step(start(1, "s", OLD, NEW, strategy, DEVICES, 0), DEVICES, _obs(set()), 0)
    dep = step(dep, DEVICES, _obs({"d1"}, state="failed"), 1)
    assert dep.state == "failed" and "d1" in (dep.message or "")
    assert dep.pins() == {"d2": OLD, "d3": OLD, "d4": OLD}


def test_canary_waits_for_promotion_unless_auto_promote() -> None:
    """Canary: one device first; then manual promotion (or automatic after min_healthy_time)."""
    strategy = Strategy(kind="canary", canary=1, max_parallel=0, min_healthy_time_s=2)
    dep = step(start(1, "s", OLD, NEW, strategy, DEVICES, 0), DEVICES, _obs(set()), 0)
    assert _updating(dep) == ["d1"]
    dep = step(dep, DEVICES, _obs({"d1"}), 1)
    dep = step(dep, DEVICES, _obs({"d1"}), 3)
    assert dep.state == "awaiting-promotion" and _updating(dep) == []
    dep = step(promote(dep, 4), DEVICES, _obs({"d1"}), 4)
    assert _updating(dep) == ["d2", "d3", "d4"]
    auto = strategy.model_copy(update={"auto_promote": True})
    dep = step(start(2, "s", OLD, NEW, auto, DEVICES, 0), DEVICES, _obs(set()), 0)
    dep = step(dep, DEVICES, _obs({"d1"}), 1)
    dep = step(dep, DEVICES, _obs({"d1"}), 3)
    assert _updating(dep) == ["d2", "d3", "d4"]


def test_offline_and_held_devices_do_not_block() -> None:
    """Offline devices are pending (offline); held ones are held; the rest completes."""
    strategy = Strategy(kind="all-at-once", min_healthy_time_s=0)
    offline = frozenset({"d4"})
    dep = step(start(1, "s", OLD, NEW, strategy, DEVICES, 0), DEVICES, _obs(set(), offline=offline), 0)
    assert dep.devices["d4"].state == "pending (offline)"
    dep = step(dep, DEVICES, _obs({"d1", "d2"}, offline=offline, held=frozenset({"d3"})), 1)
    assert dep.devices["d3"].state == "held"
    dep = step(dep, DEVICES, _obs({"d1", "d2"}, offline=offline, held=frozenset({"d3"})), 2)
    assert dep.state == "succeeded"
    assert dep.pins() == {}  # d4 gets the final version when it returns


def test_paused_moves_nobody() -> None:
    """A paused deployment moves no new device."""
    strategy = Strategy(kind="rolling", max_parallel=1, min_healthy_time_s=0)
    dep = step(start(1, "s", OLD, NEW, strategy, DEVICES, 0), DEVICES, _obs(set()), 0)
    dep = dep.model_copy(update={"state": "paused"})
    dep = step(dep, DEVICES, _obs({"d1"}), 5)
    assert dep.devices["d1"].state == "healthy"
    assert {dep.devices[d].state for d in ("d2", "d3", "d4")} == {"pending"}


def test_first_deployment_is_healthy_when_running() -> None:
    """With no previous version there is nothing to protect: running is healthy at once."""
    dep = step(start(1, "s", None, NEW, Strategy(min_healthy_time_s=60), DEVICES, 0), DEVICES, _obs(set()), 0)
    dep = step(dep, DEVICES, _obs(set(DEVICES)), 1)
    assert dep.state == "succeeded"
