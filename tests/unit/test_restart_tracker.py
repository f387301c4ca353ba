"""Properties of the restart tracker and its decision (agent/restarts.py)."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from tether.agent.restarts import (
    CRASH_LOOP_RESTARTS,
    RESTART_BACKOFF_CAP,
    STEADY_RUN_SECONDS,
    RestartRecord,
    RestartTracker,
    decide,
)
from tether.protocol.models import ServiceSpec

KEY = ("s", "web")
events = st.lists(
    st.tuples(
        st.sampled_from(["restarted", "create_failed", "running", "exited", "forget"]),
        st.floats(0, 2 * STEADY_RUN_SECONDS),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(events)
def test_the_tracker_counts_backs_off_and_forgets_as_it_says(history: list[tuple[str, float]]) -> None:
    """Over any history: ``total`` counts every restart and never drops (unless the service is
    forgotten); ``count`` grows by one per restart or failed create and goes to 0 only after a
    steady run; a crash loop is reported exactly from the CRASH_LOOP_RESTARTS-th consecutive
    restart on; the backoff never exceeds its cap."""
    tracker = RestartTracker()
    now = 0.0
    count = total = 0
    for event, dt in history:
        now += dt
        if event == "restarted":
            looping = tracker.restarted(KEY, now)
            count, total = count + 1, total + 1
            assert looping == (count >= CRASH_LOOP_RESTARTS)
        elif event == "create_failed":
            tracker.create_failed(KEY, now)
            count += 1
        elif event in ("running", "exited"):
            last = tracker.record(KEY).last_at
            reset = tracker.observed(KEY, event == "running", now)
            assert reset == (event == "running" and count > 0 and now - last > STEADY_RUN_SECONDS)
            if reset:
                count = 0
        else:
            tracker.keep_only(set())
            count = total = 0
            assert KEY not in tracker
        rec = tracker.record(KEY)
        assert (rec.count, rec.total) == (count, total)
        assert rec.last_at <= rec.next_allowed() <= rec.last_at + RESTART_BACKOFF_CAP
        assert tracker.counting() == (count > 0)


policies = st.sampled_from(["no", "always", "on-failure", "unless-stopped"])


@settings(max_examples=300, deadline=None)
@given(
    policies,
    st.none() | st.integers(1, 6),
    st.none() | st.integers(0, 3),
    st.integers(0, 12),
    st.floats(0, 1000),
    st.floats(0, 1000),
)
def test_a_restart_is_never_decided_before_its_backoff_nor_against_the_policy(
    policy: str, max_attempts: int | None, exit_code: int | None, count: int, last: float, now: float
) -> None:
    """``restart`` only once the backoff passed, ``wait`` (until exactly the backoff's end) only
    before; ``no`` exactly when the policy or max_attempts says so, whatever the time; the
    backoff doubles with each consecutive attempt up to its cap."""
    service = ServiceSpec(name="web", image="x", restart=policy, restart_max_attempts=max_attempts)
    record = RestartRecord(count, last, count)
    decision = decide(service, exit_code, record, now)
    policy_says = (
        policy in ("always", "unless-stopped") or (policy == "on-failure" and exit_code != 0)
    ) and (max_attempts is None or count < max_attempts)
    assert (decision.kind == "no") == (not policy_says)
    if decision.kind == "restart":
        assert now >= record.next_allowed()
    if decision.kind == "wait":
        assert now < record.next_allowed() == decision.at and decision.reason == "backoff"
    if count >= 1:
        step = record.next_allowed() - last
        nxt = RestartRecord(count + 1, last).next_allowed() - last
        assert math.isclose(nxt, min(RESTART_BACKOFF_CAP, 2 * step), abs_tol=1e-6)
