"""The incremental deployment step (rollout.step_changed) against a full judgement (rollout.step),
step by step over random fleets, strategies, reports, clocks and operator actions."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st
from tether.controller.rollout import (
    MASS_SHARE,
    Deployment,
    Observation,
    Progress,
    Strategy,
    pins_changed,
    promote,
    start,
    step,
    step_changed,
    switch,
)
from tether.protocol.models import DownloadStatus, ServiceStatus, StackStatus

OLD, NEW = "a" * 64, "b" * 64
REPORTS = ("old", "new-running", "new-converging", "new-failed", "nothing")
DOWNLOADS = (None, None, "downloading", "retrying", "staged", "failed")
ACTIONS = ("none",) * 6 + ("promote", "pause", "resume", "switch", "members", "extra")

# What one device shows in a round: online, its report, held, restarts added, its download.
Shown = tuple[bool, str, bool, int, str | None]


@dataclass(frozen=True)
class Case:
    devices: list[str]
    strategy: Strategy
    first: bool
    rounds: list[tuple[float, dict[str, Shown], str, frozenset[str]]]
    """Per round: seconds passed, what each device shows, an operator action, devices said
    changed though they did not (a caller may say too many, never too few)."""
    mass: float
    """step_changed's share of the group above which it judges all (inf: never, in most runs)."""


@st.composite
def cases(draw: st.DrawFn) -> Case:
    n = draw(st.integers(1, 8))
    devices = [f"d{i}" for i in range(n)]
    kind = draw(st.sampled_from(["all-at-once", "rolling", "canary"]))
    strategy = Strategy(
        kind=kind,
        max_parallel=draw(st.integers(1 if kind == "rolling" else 0, 3)),
        canary=draw(st.integers(1, 3)),
        min_healthy_time_s=draw(st.sampled_from([0.0, 1.0, 2.0, 5.0])),
        healthy_deadline_s=draw(st.sampled_from([3.0, 4.0, 30.0])),
        download_deadline_s=draw(st.sampled_from([2.0, 6.0, 100.0])),
        auto_revert=draw(st.booleans()),
        auto_promote=draw(st.booleans()),
        stage_only=draw(st.integers(0, 4)) == 0,
    )
    # Mostly good reports, so deployments get far; the rest now and then, unchanged often.
    shown = st.tuples(
        st.sampled_from([True, True, True, False]),
        st.sampled_from(REPORTS[:2] * 4 + REPORTS),
        st.integers(0, 9).map(lambda x: x == 0),
        st.sampled_from([0, 0, 0, 1]),
        st.sampled_from(DOWNLOADS[:1] * 6 + DOWNLOADS),
    )
    rounds = []
    last: dict[str, Shown] = {}
    for _ in range(draw(st.integers(1, 20))):
        now = {d: last[d] if d in last and draw(st.integers(0, 2)) else draw(shown) for d in devices}
        last = now
        rounds.append(
            (
                draw(st.sampled_from([0.0, 0.5, 1.0, 1.0, 2.0, 3.0, 4.0, 6.0, 31.0])),
                now,
                draw(st.sampled_from(ACTIONS)),
                frozenset(draw(st.lists(st.sampled_from(devices), max_size=2))),
            )
        )
    mass = draw(st.sampled_from([float("inf")] * 3 + [MASS_SHARE]))
    return Case(devices, strategy, draw(st.integers(0, 4)) == 0, rounds, mass)


def observation(shown: Shown, restarts: int) -> Observation:
    online, what, held, _, download = shown
    spec = None if what == "nothing" else OLD if what == "old" else NEW
    state = None if what == "nothing" else "running" if what == "old" else what.split("-", 1)[1]
    status = None
    if state is not None:
        svc = ServiceStatus(
            state="running" if state == "running" else "exited",
            restarts=restarts,
            exit_code=None if state == "running" else 3,
            log_tail="boom" if state == "failed" else None,
        )
        status = StackStatus(spec_hash=spec, state=state, services={"web": svc})  # type: ignore[arg-type]
    return Observation(
        online=online,
        spec_hash=spec,
        state=state,
        held=held,
        restarts=restarts,
        status=status,
        download=None
        if download is None
        else DownloadStatus(spec_hash=NEW, state=download, done=5, total=10, reason="net"),  # type: ignore[arg-type]
    )


def act(dep: Deployment, action: str, now: float) -> Deployment:
    """An operator's action, as deployments_action makes it: a new deployment object."""
    if not dep.active:
        return dep
    if action == "promote" and dep.strategy.kind == "canary":
        return promote(dep, now)
    if action == "pause":
        return dep.model_copy(update={"state": "paused", "updated": now})
    if action == "resume" and dep.state == "paused":
        return dep.model_copy(update={"state": "running", "updated": now})
    if action == "switch" and dep.strategy.stage_only and not dep.switched:
        return switch(dep, now)
    return dep


@settings(max_examples=400, deadline=None)
@given(cases())
def test_an_incremental_step_gives_what_a_full_judgement_gives(case: Case) -> None:
    """Judging only devices whose observation changed, whose deadline or healthy timer may have
    passed, or that changed at the last step gives, at every step, the very deployment a full
    judgement of every device gives: states, entries, stored JSON, whether anything changed, and
    whether pins or stages changed (what the Deployer publishes on)."""
    from_hash = None if case.first else OLD
    full = inc = start(1, "s", from_hash, NEW, case.strategy, case.devices, 0.0)
    progress: Progress | None = None
    members = list(case.devices)
    restarts = dict.fromkeys(case.devices, 0)
    shown_before: dict[str, Shown] = {}
    observed: dict[str, Observation] = {}
    now = 0.0
    for dt, shown, action, extra in case.rounds:
        now += dt
        changed = set(extra)
        for d, s in shown.items():
            restarts[d] += s[3]
            if shown_before.get(d) != s or s[3]:
                observed[d] = observation(s, restarts[d])
                changed.add(d)
        shown_before = dict(shown)
        if action == "members":  # the group changed: a device left, another joined
            members = [*members[1:], f"new{len(members)}"]
            observed[members[-1]] = Observation(online=True, spec_hash=OLD, state="running")
            changed.add(members[-1])
        elif action == "extra":
            members = list(members)  # the same devices, a list made again
        acted_full, acted_inc = act(full, action, now), act(inc, action, now)
        assert acted_full == acted_inc
        want = step(acted_full, members, observed, now)
        got, progress = step_changed(progress, acted_inc, members, observed, changed, now, mass=case.mass)
        assert got == want, f"at {now}: {got.devices} != {want.devices}"
        assert got.model_dump_json() == want.model_dump_json()
        assert (got is acted_inc) == (want is acted_full), "one says nothing changed, the other not"
        assert pins_changed(acted_inc, got, progress.changed) == (
            acted_full.pins() != want.pins() or acted_full.stages() != want.stages()
        )
        full, inc = want, got


def test_a_step_with_nothing_changed_judges_nobody() -> None:
    """With no observation changed and no deadline due, the incremental step looks at no device
    (its cost does not grow with the group): it returns the deployment itself, untouched."""
    devices = [f"d{i:05d}" for i in range(2000)]
    s = Strategy(min_healthy_time_s=10.0, healthy_deadline_s=300.0)
    dep = start(1, "s", OLD, NEW, s, devices, 0.0)
    observed = {d: Observation(online=True, spec_hash=NEW, state="running") for d in devices}
    dep, progress = step_changed(None, dep, devices, observed, None, 0.0)  # full: every device moved
    dep, progress = step_changed(progress, dep, devices, observed, (), 1.0)  # healthy timers start
    assert all(r.state == "updating" and r.healthy_since == 1.0 for r in dep.devices.values())
    same, progress = step_changed(progress, dep, devices, observed, (), 2.0)  # changed last step: again
    assert same is dep

    class Counting(dict[str, Observation]):
        reads = 0

        def get(self, key: str, default: Observation | None = None) -> Observation | None:  # type: ignore[override]
            Counting.reads += 1
            return super().get(key, default)

    same, progress = step_changed(progress, dep, devices, Counting(observed), (), 5.0)
    assert same is dep and Counting.reads == 0
    done, progress = step_changed(progress, dep, devices, Counting(observed), (), 11.0)
    assert done.state == "succeeded" and Counting.reads == len(devices)  # their timers ended
