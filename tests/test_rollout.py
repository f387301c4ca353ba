"""The deployment state machine (pure)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from tether.controller.rollout import Observation, Strategy, progress, promote, start, step, switch
from tether.protocol.models import DownloadStatus, ServiceStatus, StackStatus

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


def test_first_deployment_waits_min_healthy_time() -> None:
    """A first deployment is healthy only after min_healthy_time of running, like any other."""
    dep = step(start(1, "s", None, NEW, Strategy(min_healthy_time_s=60), DEVICES, 0), DEVICES, _obs(set()), 0)
    dep = step(dep, DEVICES, _obs(set(DEVICES)), 1)
    assert dep.state == "running" and _updating(dep) == DEVICES
    dep = step(dep, DEVICES, _obs(set(DEVICES)), 61)
    assert dep.state == "succeeded"


# --- the health gate ------------------------------------------------------------------------

ONE = ["d1"]


def _status(
    state: str = "running", restarts: int = 0, exit_code: int | None = None, **svc: Any
) -> StackStatus:
    service = ServiceStatus(state=state if state != "converging" else "restarting", restarts=restarts,
                            exit_code=exit_code, **svc)  # fmt: skip
    stack_state = {"running": "running", "failed": "failed"}.get(state, "converging")
    return StackStatus(spec_hash=NEW, state=stack_state, services={"app": service})  # type: ignore[arg-type]


def _seen(status: StackStatus | None, download: DownloadStatus | None = None) -> dict[str, Observation]:
    if status is None:
        return {"d1": Observation(online=True, spec_hash=OLD, state="running", download=download)}
    return {
        "d1": Observation(
            online=True,
            spec_hash=status.spec_hash,
            state=status.state,
            restarts=sum(s.restarts for s in status.services.values()),
            status=status,
            download=download,
        )
    }


def test_a_restart_within_min_healthy_time_restarts_the_timer() -> None:
    """A restart the controller only sees as a grown restart counter still restarts the healthy timer."""
    strategy = Strategy(min_healthy_time_s=10, healthy_deadline_s=300)
    dep = step(start(1, "s", OLD, NEW, strategy, ONE, 0), ONE, _seen(None), 0)
    dep = step(dep, ONE, _seen(_status(restarts=0)), 1)
    dep = step(dep, ONE, _seen(_status(restarts=1)), 9)  # crashed and restarted between two reports
    dep = step(dep, ONE, _seen(_status(restarts=1)), 12)
    assert dep.devices["d1"].state == "updating"
    assert "restarted" in (dep.devices["d1"].reason or "")
    dep = step(dep, ONE, _seen(_status(restarts=1)), 19)
    assert dep.state == "succeeded"


def test_a_crash_loop_is_reverted_and_says_why() -> None:
    """A service crashing every 3 s never becomes healthy; the crash loop it reports reverts the
    deployment, with the exit code, restart count and last log lines as the reason."""
    strategy = Strategy(min_healthy_time_s=10, auto_revert=True)
    dep = step(start(1, "s", OLD, NEW, strategy, ONE, 0), ONE, _seen(None), 0)
    t = 0.0
    for restarts in range(5):
        t += 3
        dep = step(dep, ONE, _seen(_status(restarts=restarts)), t)
        assert dep.devices["d1"].state == "updating"
    crash = _status("failed", restarts=5, exit_code=3, log_tail="starting\npanic: no config\n",
                    last_error="crash loop: restarted 5 times, last exit code 3")  # fmt: skip
    dep = step(dep, ONE, _seen(crash), t + 3)
    assert dep.state == "reverted" and dep.pins() == {"d1": OLD}
    error = dep.devices["d1"].error or ""
    for part in ("exit code 3", "5 restarts", "panic: no config"):
        assert part in error


def test_a_first_deployment_that_crash_loops_fails() -> None:
    """A first deployment whose service keeps restarting is failed, never succeeded."""
    strategy = Strategy(min_healthy_time_s=10, healthy_deadline_s=60)
    dep = step(start(1, "s", None, NEW, strategy, ONE, 0), ONE, _seen(None), 0)
    for i in range(1, 30):
        dep = step(dep, ONE, _seen(_status(restarts=i // 3)), i * 2.5)
    assert dep.state == "failed"
    assert "not healthy within 1m" in (dep.message or "")


def test_a_failing_health_check_is_shown() -> None:
    """An unhealthy service fails the device with its health check's output in the reason."""
    dep = step(start(1, "s", OLD, NEW, Strategy(), ONE, 0), ONE, _seen(None), 0)
    sick = StackStatus(spec_hash=NEW, state="failed", services={
        "web": ServiceStatus(state="running", health="unhealthy", health_output="curl: (7) refused")})  # fmt: skip
    dep = step(dep, ONE, _seen(sick), 5)
    assert dep.state == "failed"
    assert "web: running, unhealthy, health check: curl: (7) refused" in (dep.message or "")


def _download(state: str, done: int = 0, reason: str | None = None) -> DownloadStatus:
    return DownloadStatus(spec_hash=NEW, state=state, done=done, total=8_000_000, rate=12_000.0,  # type: ignore[arg-type]
                          eta_s=383, reason=reason)  # fmt: skip


def test_downloading_is_not_failed_until_the_download_deadline() -> None:
    """A device still downloading (even retrying) past healthy_deadline is not failed; past the
    download deadline it is, with its progress in the reason."""
    strategy = Strategy(healthy_deadline_s=30, download_deadline_s=600, min_healthy_time_s=5)
    dep = step(start(1, "s", OLD, NEW, strategy, ONE, 0), ONE, _seen(None), 0)
    dep = step(dep, ONE, _seen(None, _download("downloading", 3_400_000)), 10)
    assert dep.devices["d1"].state == "downloading"
    dep = step(dep, ONE, _seen(None, _download("retrying", 3_400_000, "connection refused")), 400)
    assert dep.state == "running" and dep.devices["d1"].state == "downloading"
    dep = step(dep, ONE, _seen(None, _download("retrying", 3_400_000, "connection refused")), 601)
    assert dep.state == "failed"
    assert "download not finished within 10m" in (dep.message or "")
    assert "retrying: connection refused" in (dep.message or "")


def test_healthy_deadline_counts_from_the_end_of_the_download() -> None:
    """After a long download the device gets its whole healthy_deadline to become healthy."""
    strategy = Strategy(healthy_deadline_s=30, min_healthy_time_s=5)
    dep = step(start(1, "s", OLD, NEW, strategy, ONE, 0), ONE, _seen(None), 0)
    dep = step(dep, ONE, _seen(None, _download("downloading")), 1)
    dep = step(dep, ONE, _seen(_status("converging")), 1000)
    dep = step(dep, ONE, _seen(_status("converging")), 1020)
    assert dep.devices["d1"].state == "updating"
    dep = step(dep, ONE, _seen(_status()), 1025)
    dep = step(dep, ONE, _seen(_status()), 1030)
    assert dep.state == "succeeded"


def test_a_permanent_download_error_fails_at_once() -> None:
    """unauthorized, unknown manifest...: the device fails at once with the registry's reason."""
    dep = step(start(1, "s", OLD, NEW, Strategy(), ONE, 0), ONE, _seen(None), 0)
    dep = step(dep, ONE, _seen(None, _download("failed", reason="unauthorized: authentication required")), 2)
    assert dep.state == "failed"
    assert dep.message == "d1: download failed: unauthorized: authentication required"


def test_progress_reads_like_the_issue_says() -> None:
    """Progress shows percent, bytes, rate and ETA; retrying shows its reason."""
    assert (
        progress(_download("downloading", 3_400_000)) == "downloading 42% (3.4 of 8.0 MB, 12 KB/s, ETA 6m23s)"
    )
    assert progress(_download("retrying", 0, "EOF")).endswith("(retrying: EOF)")


# Property tests: one device, any sequence of reports; the gate never calls a device healthy
# unless the reports of the last min_healthy_time were all "running the new version" with the
# same restart counter, and always does once they have been for long enough.

REPORT = st.sampled_from(["running", "restart", "converging", "downloading", "retrying", "old"])


@settings(max_examples=300, deadline=None)
@given(
    min_healthy=st.sampled_from([0.0, 3.0, 10.0]),
    first=st.booleans(),
    reports=st.lists(st.tuples(st.floats(0.1, 8.0), REPORT), min_size=1, max_size=40),
)
def test_health_gate_is_sound(min_healthy: float, first: bool, reports: list[tuple[float, str]]) -> None:
    """Healthy only after min_healthy_time of uninterrupted running (no restart) on the new version;
    never failed while downloading within the download deadline."""
    strategy = Strategy(min_healthy_time_s=min_healthy, healthy_deadline_s=1e5, download_deadline_s=1e5)
    dep = step(start(1, "s", None if first else OLD, NEW, strategy, ONE, 0), ONE, _seen(None), 0)
    now, restarts, good_since = 0.0, 0, None
    for dt, kind in reports:
        now += dt
        if kind == "restart":
            restarts += 1
        if kind in ("running", "restart"):
            seen = _seen(_status(restarts=restarts))
        elif kind in ("downloading", "retrying"):
            seen = _seen(None, _download(kind, reason="EOF"))
        elif kind == "converging":
            seen = _seen(_status("converging", restarts=restarts))
        else:
            seen = _seen(None)
        was = dep.devices["d1"].state
        dep = step(dep, ONE, seen, now)
        state = dep.devices["d1"].state
        assert state != "failed"
        if kind == "running" and good_since is None:
            good_since = now
        elif kind != "running":
            good_since = now if kind == "restart" else None
        if state == "healthy" and was != "healthy":
            assert good_since is not None and now - good_since >= min_healthy
        if was != "healthy" and good_since is not None and now - good_since >= min_healthy:
            assert state == "healthy"
    assert (dep.state == "succeeded") == (dep.devices["d1"].state == "healthy")


# --- stage now, switch later ----------------------------------------------------------------


def _staged(devices: set[str], offline: frozenset[str] = frozenset()) -> dict[str, Observation]:
    return {
        d: Observation(
            online=d not in offline,
            spec_hash=OLD,
            state="running",
            download=DownloadStatus(spec_hash=NEW, state="staged" if d in devices else "downloading"),
        )
        for d in DEVICES
    }


def test_stage_only_downloads_everywhere_and_switches_on_command() -> None:
    """--stage-only: every device downloads (pinned to the old version, staging the new) and nobody
    moves until the switch; then the strategy moves them as usual."""
    strategy = Strategy(kind="rolling", max_parallel=2, min_healthy_time_s=0, stage_only=True)
    dep = step(start(1, "s", OLD, NEW, strategy, DEVICES, 0), DEVICES, _staged(set()), 0)
    assert dep.state == "staging" and {r.state for r in dep.devices.values()} == {"staging"}
    assert dep.pins() == {d: OLD for d in DEVICES} and dep.stages() == {d: NEW for d in DEVICES}
    dep = step(dep, DEVICES, _staged({"d1", "d2", "d3"}, offline=frozenset({"d4"})), 5)
    assert dep.state == "staging"  # d4 was seen staging, not staged
    dep = step(dep, DEVICES, _staged(set(DEVICES)), 9)
    assert dep.state == "staged" and _updating(dep) == []
    dep = step(dep, DEVICES, _staged(set(DEVICES)), 3600)
    assert dep.state == "staged"  # waits for the operator, however long
    dep = step(switch(dep, 3601), DEVICES, _staged(set(DEVICES)), 3601)
    assert _updating(dep) == ["d1", "d2"]
    assert dep.pins() == {"d3": OLD, "d4": OLD} and dep.stages() == {"d3": NEW, "d4": NEW}  # kept staged


def test_stage_only_first_deployment_runs_nowhere_before_the_switch() -> None:
    """A first deployment staged only keeps the stack off every device until the switch."""
    strategy = Strategy(min_healthy_time_s=0, stage_only=True)
    dep = step(start(1, "s", None, NEW, strategy, DEVICES, 0), DEVICES, _staged(set()), 0)
    assert dep.pins() == {d: "" for d in DEVICES}
    dep = step(switch(dep, 1), DEVICES, _staged(set(DEVICES)), 1)
    assert dep.pins() == {} and _updating(dep) == DEVICES


def test_stage_only_permanent_error_fails_before_anything_switches() -> None:
    """A permanent download error while staging fails the deployment; nobody moved."""
    strategy = Strategy(stage_only=True, auto_revert=True)
    dep = step(start(1, "s", OLD, NEW, strategy, DEVICES, 0), DEVICES, _staged(set()), 0)
    bad = dict(_staged(set()))
    bad["d2"] = Observation(online=True, spec_hash=OLD, state="running",
                            download=_download("failed", reason="manifest unknown"))  # fmt: skip
    dep = step(dep, DEVICES, bad, 3)
    assert dep.state == "reverted" and "manifest unknown" in (dep.message or "")
    assert dep.stages() == {} and dep.pins() == {d: OLD for d in DEVICES}


def test_a_step_that_changes_nothing_returns_the_deployment_itself() -> None:
    """Nothing observed moved and no timer ran out: the step returns the same object (the
    controller then writes nothing); the first change makes a new one, dated."""
    strategy = Strategy(kind="all-at-once", min_healthy_time_s=10)
    dep = step(start(1, "s", OLD, NEW, strategy, DEVICES, 0), DEVICES, _obs(set()), 0)
    assert step(dep, DEVICES, _obs(set(), state="converging"), 1) is dep  # still updating, same reasons
    held = step(dep, DEVICES, _obs(set(), held=frozenset({"d1"})), 2)
    assert held is not dep and held.devices["d1"].state == "held" and held.updated == 2
    assert step(held, DEVICES, _obs(set(), held=frozenset({"d1"})), 3) is held  # held stays held: no copy
    running = step(held, DEVICES, _obs(set(DEVICES)), 4)
    assert running is not held and running.updated == 4
    assert step(running, DEVICES, _obs(set(DEVICES)), 5) is running  # healthy timers still running
    assert step(running, DEVICES, _obs(set(DEVICES)), 14).state == "succeeded"


def test_devices_judged_alike_share_one_entry() -> None:
    """Devices that change alike in a step (running since the same step, healthy at the same
    step) share one (frozen) entry, as devices moved together do: the store then writes its
    JSON once, not once per device. A device judged otherwise gets its own, and the states
    are those of the devices judged one by one."""
    strategy = Strategy(kind="all-at-once", min_healthy_time_s=10)
    dep = step(start(1, "s", OLD, NEW, strategy, DEVICES, 0), DEVICES, _obs(set()), 0)
    running = step(dep, DEVICES, _obs({"d1", "d2", "d3"}), 4)
    d1, d2, d3, d4 = (running.devices[d] for d in DEVICES)
    assert d1 is d2 is d3 and d1.healthy_since == 4 and d1.state == "updating"
    assert d4 is dep.devices["d4"] and d4.healthy_since is None
    healthy = step(running, DEVICES, _obs(set(DEVICES)), 14)
    h1, h2, h3, h4 = (healthy.devices[d] for d in DEVICES)
    assert h1 is h2 is h3 and h1.state == "healthy" and h1.healthy_since == 4
    assert h4 is not h1 and h4.state == "updating" and h4.healthy_since == 14
    assert d1.state == "updating"  # entries shared are never changed: each step copies
