"""Properties of the rollout policy (controller/rollout.py) over random fleets, strategies and reports."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st
from tether.controller.rollout import MOVING, Deployment, Observation, Strategy, promote, start, step

OLD, NEW = "a" * 64, "b" * 64
REPORTS = ("old", "new-running", "new-converging", "new-failed")


@dataclass(frozen=True)
class Case:
    devices: list[str]
    strategy: Strategy
    first: bool
    rounds: list[tuple[float, dict[str, tuple[bool, str]], bool]]
    """Per round: seconds passed, per device (online, what it reports), whether an operator promotes."""


@st.composite
def cases(draw: st.DrawFn) -> Case:
    n = draw(st.integers(1, 7))
    devices = [f"d{i}" for i in range(n)]
    kind = draw(st.sampled_from(["all-at-once", "rolling", "canary"]))
    strategy = Strategy(
        kind=kind,
        max_parallel=draw(st.integers(1 if kind == "rolling" else 0, 3)),
        canary=draw(st.integers(1, 3)),
        min_healthy_time_s=draw(st.sampled_from([0.0, 2.0, 5.0])),
        healthy_deadline_s=draw(st.sampled_from([4.0, 30.0])),
        auto_revert=draw(st.booleans()),
        auto_promote=draw(st.booleans()),
    )
    # Mostly healthy reports, so deployments get far; failures and offline devices now and then.
    report = st.sampled_from(REPORTS[:2] * 4 + REPORTS)
    obs = st.tuples(st.sampled_from([True, True, True, False]), report)
    rounds = draw(
        st.lists(
            st.tuples(
                st.sampled_from([0.0, 1.0, 3.0, 6.0]),
                st.fixed_dictionaries({d: obs for d in devices}),
                st.integers(0, 9).map(lambda x: x == 0),
            ),
            min_size=1,
            max_size=15,
        )
    )
    return Case(devices, strategy, draw(st.integers(0, 4)) == 0, rounds)


def observe(reports: dict[str, tuple[bool, str]]) -> dict[str, Observation]:
    out = {}
    for d, (online, what) in reports.items():
        new = what != "old"
        state = what.split("-", 1)[1] if new else "running"
        out[d] = Observation(online=online, spec_hash=NEW if new else OLD, state=state)
    return out


def moved(dep: Deployment) -> set[str]:
    return {d for d, r in dep.devices.items() if r.batch > 0}


@settings(max_examples=150, deadline=None)
@given(cases())
def test_the_rollout_policy_keeps_its_promises(case: Case) -> None:
    """Whatever the devices report: a batch never exceeds max_parallel and nothing moves while a batch
    is still moving; canaries go first and alone until promoted; an automatic promotion happens
    only once every canary is healthy; a failed device fails the deployment, which reverts every
    device with auto_revert; a succeeded one has every device healthy (or offline, not moved)."""
    s = case.strategy
    from_hash = None if case.first else OLD
    dep = start(1, "s", from_hash, NEW, s, case.devices, 0.0)
    now = 0.0
    for dt, reports, operator_promotes in case.rounds:
        now += dt
        before = dep
        if operator_promotes and dep.state == "awaiting-promotion":
            dep = promote(dep, now)
        promoted_by_operator = dep.promoted and not before.promoted
        dep = step(dep, case.devices, observe(reports), now)
        batches: dict[int, int] = {}
        for r in dep.devices.values():
            batches[r.batch] = batches.get(r.batch, 0) + 1
        newly = {d for d, r in dep.devices.items() if r.batch == dep.batch and r.batch > before.batch}
        if newly:  # the policy moves a batch only once nothing else is moving (judged this step)
            assert not any(r.state in MOVING for d, r in dep.devices.items() if d not in newly), (
                "a batch moved while the previous one was still moving"
            )
        if from_hash is not None and s.kind == "rolling":
            assert all(count <= s.max_parallel for b, count in batches.items() if b > 0)
            assert sum(1 for r in dep.devices.values() if r.state in MOVING) <= s.max_parallel
        if from_hash is not None and s.kind == "canary":
            if not dep.promoted:
                assert batches.get(1, 0) <= s.canary and moved(dep) <= {
                    d for d, r in dep.devices.items() if r.batch == 1
                }, "a device beyond the canaries moved before the promotion"
            elif not promoted_by_operator and not before.promoted:
                # Judged in the step that promoted: a canary may turn healthy in it (min_healthy_time 0).
                canaries = [r for r in dep.devices.values() if r.batch == 1]
                assert canaries and all(r.state == "healthy" for r in canaries), (
                    f"promoted with an unhealthy canary: {[r.state for r in canaries]}"
                )
            if s.max_parallel > 0:
                assert all(count <= s.max_parallel for b, count in batches.items() if b > 1)
        failed = [d for d, r in dep.devices.items() if r.state == "failed"]
        if failed and before.active:
            if s.auto_revert and from_hash is not None:
                assert dep.state == "reverted" and dep.pins() == {d: OLD for d in dep.devices}
            else:
                assert dep.state == "failed"
        if dep.state == "succeeded":
            assert not failed and dep.pins() == {}
            assert all(r.state in ("healthy", "held", "pending (offline)") for r in dep.devices.values())
        if not before.active:
            assert dep is before, "a finished deployment changed"
