"""The pure reconcile core: plan() and status(), by example and by property."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tether.agent.drivers.base import Observed
from tether.agent.drivers.fake import FakeDriver
from tether.agent.reconcile import Action, Create, Plan, Remove, Start, plan, status
from tether.agent.restarts import RESTART_BACKOFF_CAP, RestartRecord, ServiceKey, wants_restart
from tether.protocol.models import RestartPolicy, ServiceSpec, StackSpec

NOW = 1000.0
STALE = "0" * 64


def svc(name: str, **kw: object) -> ServiceSpec:
    return ServiceSpec.model_validate({"name": name, "image": "registry.example/app:1", **kw})


def stack(*services: ServiceSpec) -> StackSpec:
    return StackSpec(services=services)


def inst(
    id: str,
    stack: str,
    service: ServiceSpec | str,
    *,
    spec_hash: str | None = None,
    state: str = "running",
    exit_code: int | None = None,
    health: str | None = None,
) -> Observed:
    name = service if isinstance(service, str) else service.name
    if spec_hash is None:
        assert isinstance(service, ServiceSpec)
        spec_hash = service.spec_hash()
    return Observed(id, stack, name, spec_hash, state, exit_code, health)  # type: ignore[arg-type]


def kinds(p: Plan) -> list[tuple[str, str, str]]:
    """(kind, stack, service) of every action, in order."""
    return [(a.kind, *key(a)) for a in p.actions]


def key(action: Action) -> ServiceKey:
    if isinstance(action, Remove):
        return (action.instance.stack, action.instance.service)
    return (action.stack, action.service.name)


# --- plan: by example ------------------------------------------------------------------------


def test_missing_services_are_created_in_service_order() -> None:
    """A desired stack with no instances gets one Create per service, in the stack's order."""
    db, api, web = svc("db"), svc("api", depends_on=["db"]), svc("web", depends_on=["api"])
    p = plan({"shop": stack(db, api, web)}, [], NOW)
    assert p.actions == (Create("shop", db), Create("shop", api), Create("shop", web))
    assert not p.waiting


def test_current_running_instance_needs_nothing() -> None:
    """A running instance with the service's spec hash yields an empty (falsy) plan."""
    web = svc("web")
    p = plan({"s": stack(web)}, [inst("1", "s", web)], NOW)
    assert not p
    assert p.actions == ()


def test_spec_change_removes_the_stale_instance_before_creating() -> None:
    """An instance with another spec hash is removed (with the new grace period), then recreated."""
    web = svc("web", stop_grace_period_s=3)
    stale = inst("1", "s", web, spec_hash=STALE)
    p = plan({"s": stack(web)}, [stale], NOW)
    assert p.actions == (Remove(stale, 3.0, "spec changed"), Create("s", web))


def test_instances_of_undesired_stacks_are_removed() -> None:
    """Every instance of a stack that is no longer desired is removed with the default grace."""
    old = [
        inst("1", "gone", "web", spec_hash=STALE),
        inst("2", "gone", "db", spec_hash=STALE, state="exited"),
    ]
    p = plan({}, old, NOW)
    assert sorted(a.instance.id for a in p.actions if isinstance(a, Remove)) == ["1", "2"]
    assert all(isinstance(a, Remove) and a.reason == "not desired" and a.grace == 10.0 for a in p.actions)


def test_service_dropped_from_a_stack_is_removed() -> None:
    """An instance of a service no longer in its (still desired) stack is removed, the rest kept."""
    web = svc("web")
    dropped = inst("2", "s", "worker", spec_hash=STALE)
    p = plan({"s": stack(web)}, [inst("1", "s", web), dropped], NOW)
    assert p.actions == (Remove(dropped, 10.0, "not desired"),)


def test_duplicate_removes_the_exited_copy_and_keeps_the_running_one() -> None:
    """Of two current instances, the running one is kept and the other removed as a duplicate."""
    web = svc("web", restart="always")
    exited = inst("a", "s", web, state="exited", exit_code=1)
    running = inst("b", "s", web)
    p = plan({"s": stack(web)}, [exited, running], NOW)
    assert p.actions == (Remove(exited, 10.0, "duplicate"),)


def test_duplicate_running_instances_keep_the_lowest_id() -> None:
    """Of several running current instances, the lowest id is kept (a stable choice)."""
    web = svc("web")
    copies = [inst(i, "s", web) for i in ("c", "a", "b")]
    p = plan({"s": stack(web)}, copies, NOW)
    assert sorted(a.instance.id for a in p.actions if isinstance(a, Remove)) == ["b", "c"]
    assert len(p.actions) == 2


@pytest.mark.parametrize(
    ("policy", "exit_code", "restarts"),
    [
        ("no", 0, False),
        ("no", 1, False),
        ("always", 0, True),
        ("always", 137, True),
        ("unless-stopped", 0, True),
        ("unless-stopped", 2, True),
        ("on-failure", 0, False),
        ("on-failure", 1, True),
        ("on-failure", 137, True),
    ],
)
def test_restart_policy_decides_whether_an_exited_instance_is_started(
    policy: RestartPolicy, exit_code: int, restarts: bool
) -> None:
    """An exited current instance is started again exactly when its restart policy asks for it."""
    web = svc("web", restart=policy)
    exited = inst("1", "s", web, state="exited", exit_code=exit_code)
    p = plan({"s": stack(web)}, [exited], NOW)
    assert wants_restart(web, exit_code) is restarts
    assert p.actions == ((Start("s", web, exited),) if restarts else ())


@pytest.mark.parametrize("state", ["starting", "restarting"])
def test_instance_in_transition_is_left_alone(state: str) -> None:
    """A current instance that is starting or restarting is neither started nor replaced."""
    web = svc("web", restart="always")
    assert not plan({"s": stack(web)}, [inst("1", "s", web, state=state)], NOW)


def test_next_allowed_doubles_from_one_second_and_caps() -> None:
    """Restart backoff is 1 s, 2 s, 4 s ... after the last attempt, capped at RESTART_BACKOFF_CAP."""
    assert RestartRecord(0, 50.0).next_allowed() == 50.0
    assert [RestartRecord(n, 100.0).next_allowed() - 100.0 for n in (1, 2, 3, 4)] == [1, 2, 4, 8]
    assert RestartRecord(40, 100.0).next_allowed() == 100.0 + RESTART_BACKOFF_CAP


def test_backoff_holds_a_restart_until_next_allowed() -> None:
    """An exited instance waits (reported in Plan.waiting) until its backoff has passed."""
    web = svc("web", restart="always")
    exited = inst("1", "s", web, state="exited", exit_code=1)
    history = {("s", "web"): RestartRecord(count=3, last_at=NOW)}  # next allowed at NOW + 4
    held = plan({"s": stack(web)}, [exited], NOW + 3.99, history)
    assert held.actions == ()
    assert held.waiting == {("s", "web")}
    due = plan({"s": stack(web)}, [exited], NOW + 4, history)
    assert due.actions == (Start("s", web, exited),)
    assert not due.waiting


def test_backoff_holds_a_create_after_failed_attempts() -> None:
    """A missing service whose create failed is not created again before its backoff has passed."""
    web = svc("web")
    history = {("s", "web"): RestartRecord(count=1, last_at=NOW)}
    held = plan({"s": stack(web)}, [], NOW + 0.5, history)
    assert (held.actions, held.waiting) == ((), {("s", "web")})
    assert plan({"s": stack(web)}, [], NOW + 1, history).actions == (Create("s", web),)


def test_removals_come_before_creations_and_starts() -> None:
    """Instances no longer desired are removed before anything is created or started."""
    a1, a2 = svc("one"), svc("two", restart="always")
    b1 = svc("web")
    observed = [
        inst("x", "a", a2, state="exited", exit_code=1),
        inst("z", "gone", "web", spec_hash=STALE),
    ]
    p = plan({"a": stack(a1, a2), "b": stack(b1)}, observed, NOW)
    assert kinds(p) == [
        ("remove", "gone", "web"),
        ("create", "a", "one"),
        ("start", "a", "two"),
        ("create", "b", "web"),
    ]


def test_stale_services_are_replaced_one_at_a_time_in_service_order() -> None:
    """Each stale instance is removed right before its successor is created, dependencies first:
    a service is down only for its own stop and start."""
    db, api, web = svc("db"), svc("api", depends_on=["db"]), svc("web", depends_on=["api"])
    observed = [inst(n, "shop", n, spec_hash=STALE) for n in ("db", "api", "web")]
    p = plan({"shop": stack(db, api, web)}, observed, NOW)
    assert kinds(p) == [
        ("remove", "shop", "db"),
        ("create", "shop", "db"),
        ("remove", "shop", "api"),
        ("create", "shop", "api"),
        ("remove", "shop", "web"),
        ("create", "shop", "web"),
    ]


# --- status --------------------------------------------------------------------------------


def test_status_reports_pending_then_failed_for_a_missing_service() -> None:
    """A service without instance is pending, or failed with the error of its last action."""
    web = svc("web")
    desired = {"s": stack(web)}
    pending = status(desired, {}, [], {}, {})["s"]
    assert (pending.state, pending.services["web"].state) == ("converging", "pending")
    failed = status(desired, {}, [], {("s", "web"): "boom"}, {})["s"]
    assert (failed.state, failed.services["web"].state) == ("failed", "failed")
    assert failed.services["web"].last_error == "boom"


def test_status_of_a_running_stack_carries_hashes_and_restart_totals() -> None:
    """All services running: stack running, its definition hash and each restart total reported."""
    db, web = svc("db"), svc("web")
    desired = {"s": stack(db, web)}
    report = status(
        desired,
        {"s": "f" * 64},
        [inst("1", "s", db), inst("2", "s", web)],
        {},
        {("s", "web"): RestartRecord(count=0, last_at=1.0, total=4)},
    )["s"]
    assert report.state == "running"
    assert report.spec_hash == "f" * 64
    assert report.services["web"].restarts == 4
    assert report.services["web"].spec_hash == web.spec_hash()
    assert status(desired, {}, [], {}, {})["s"].spec_hash == desired["s"].spec_hash()


def test_status_ignores_stale_instances() -> None:
    """An instance with an old spec hash does not count: the service is still pending."""
    web = svc("web")
    report = status({"s": stack(web)}, {}, [inst("1", "s", web, spec_hash=STALE)], {}, {})["s"]
    assert report.services["web"].state == "pending"


def test_status_exited_instance_to_be_restarted_is_restarting() -> None:
    """An exited instance is 'restarting' when its policy restarts it or it waits for backoff."""
    always, once = svc("always", restart="always"), svc("once")
    desired = {"s": stack(always, once)}
    observed = [
        inst("1", "s", always, state="exited", exit_code=1),
        inst("2", "s", once, state="exited", exit_code=1),
    ]
    plain = status(desired, {}, observed, {}, {})["s"].services
    assert plain["always"].state == "restarting"
    assert plain["once"].state == "exited"
    assert plain["once"].exit_code == 1
    waiting = status(desired, {}, observed, {}, {}, frozenset({("s", "once")}))["s"].services
    assert waiting["once"].state == "restarting"


def test_status_stack_state_follows_exit_codes_and_health() -> None:
    """Exit 0 of a one-shot service counts as done; a non-zero exit or unhealthy fails the stack."""
    job, web = svc("job"), svc("web")
    desired = {"s": stack(job, web)}

    def state(job_code: int, health: str | None) -> str:
        observed = [
            inst("1", "s", job, state="exited", exit_code=job_code),
            inst("2", "s", web, health=health),
        ]
        return status(desired, {}, observed, {}, {})["s"].state

    assert state(0, None) == "running"
    assert state(0, "healthy") == "running"
    assert state(0, "starting") == "converging"
    assert state(0, "unhealthy") == "failed"
    assert state(2, None) == "failed"


def test_status_says_why_a_service_failed() -> None:
    """A failed service reports its exit code and last log lines; an unhealthy one its check's output."""
    job, web = svc("job"), svc("web")
    desired = {"s": stack(job, web)}
    sick = Observed("2", "s", "web", web.spec_hash(), "running", health="unhealthy", health_output="refused")
    observed = [inst("1", "s", job, state="exited", exit_code=3), sick]
    tails = {("s", "job"): "panic: no config\n"}
    services = status(desired, {}, observed, {}, {}, log_tails=tails)["s"].services
    assert (services["job"].exit_code, services["job"].log_tail) == (3, "panic: no config\n")
    assert (services["web"].health, services["web"].health_output) == ("unhealthy", "refused")
    healthy = status(desired, {}, [inst("2", "s", web, health="healthy")], {}, {}, log_tails=tails)["s"]
    assert healthy.services["web"].health_output is None and healthy.services["job"].log_tail is None


def test_equal_statuses_are_shared_and_a_changed_one_is_made_anew() -> None:
    """status() hands out one (frozen) status per distinct content, whichever device or instance
    it is computed for; a change (an error, an exit) gives a status that says so."""
    web = svc("web", restart="no")
    desired = {"s": stack(web)}
    first = status(desired, {}, [inst("1", "s", web)], {}, {})["s"]
    again = status(desired, {}, [inst("other-device-7", "s", web)], {}, {})["s"]
    assert again is first and again.services["web"] is first.services["web"]
    assert first.services["web"].state == "running" and first.state == "running"
    exited = status(desired, {}, [inst("1", "s", web, state="exited", exit_code=2)], {}, {})["s"]
    assert exited is not first
    assert (exited.state, exited.services["web"].state, exited.services["web"].exit_code) == (
        "failed",
        "exited",
        2,
    )
    failing = status(desired, {}, [], {("s", "web"): "no such image"}, {})["s"]
    assert failing.services["web"].last_error == "no such image" and failing.state == "failed"
    other = status(desired, {}, [], {("s", "web"): "disk full"}, {})["s"]
    assert other.services["web"].last_error == "disk full"
    assert first == status(desired, {}, [inst("1", "s", web)], {}, {})["s"], "unchanged by what came between"


def test_a_kept_status_is_the_one_its_content_makes() -> None:
    """The stack statuses kept (per version and what its services' statuses are made of: the
    stack's state is made with them, only when new) never answer for other content: through
    states that change one at a time, back and forth, for two versions of one stack and two
    stacks, every status equals one made with nothing kept."""
    from tether.agent import reconcile

    web, job = svc("web"), svc("job", restart="no")
    v1 = stack(web, job)
    v2 = stack(svc("web", image="img:2"), job)
    steps: list[tuple[str, str | None, int | None]] = [
        ("running", None, None),
        ("running", "starting", None),
        ("running", "healthy", None),
        ("running", "unhealthy", None),
        ("exited", None, 0),
        ("exited", None, 3),
        ("running", None, None),
    ]
    for spec, hashes in ((v1, {}), (v2, {}), (v1, {"s": "f" * 64, "t": "e" * 64})):
        desired = {"s": spec, "t": spec}
        for state, health, code in [*steps, *reversed(steps)]:
            observed = [
                Observed("1", "s", "web", spec.services[0].spec_hash(), state, exit_code=code, health=health),  # type: ignore[arg-type]
                inst("2", "s", job),
                inst("3", "t", job, state="exited", exit_code=0),
            ]
            got = status(desired, hashes, observed, {}, {})
            reconcile._STACK_STATUSES._kept.clear()
            reconcile._SERVICE_STATUSES._kept.clear()
            assert got == status(desired, hashes, observed, {}, {}), (state, health, code)


# --- properties ------------------------------------------------------------------------------

STACK_NAMES = ["alpha", "beta", "gamma"]
SERVICE_NAMES = ["db", "api", "web", "cache", "worker"]
POLICIES: list[RestartPolicy] = ["no", "always", "on-failure", "unless-stopped"]
LATER = NOW + RESTART_BACKOFF_CAP + 1


@st.composite
def stack_specs(draw: st.DrawFn) -> StackSpec:
    names = draw(st.lists(st.sampled_from(SERVICE_NAMES), min_size=1, max_size=4, unique=True))
    services = tuple(
        ServiceSpec(
            name=name,
            image=draw(st.sampled_from(["app:1", "app:2", "db:16"])),
            command=draw(
                st.none() | st.lists(st.sampled_from(["run", "-v", "serve"]), max_size=3).map(tuple)
            ),
            restart=draw(st.sampled_from(POLICIES)),
        )
        for name in names
    )
    return StackSpec(services=services)


World = tuple[dict[str, StackSpec], list[Observed], dict[ServiceKey, RestartRecord]]


@st.composite
def worlds(draw: st.DrawFn, history: bool = True) -> World:
    """Desired stacks, a messy observed set on a device, and (optionally) restart history."""
    desired = draw(st.dictionaries(st.sampled_from(STACK_NAMES), stack_specs(), max_size=3))
    hashes = {(n, s.name): s.spec_hash() for n, spec in desired.items() for s in spec.services}
    slots = st.tuples(st.sampled_from([*STACK_NAMES, "undesired"]), st.sampled_from(SERVICE_NAMES))
    observed = []
    for i, (stack_name, service) in enumerate(draw(st.lists(slots, max_size=10))):
        current = hashes.get((stack_name, service))
        spec_hash = draw(st.sampled_from([current, STALE] if current else [STALE, "1" * 64]))
        state = draw(st.sampled_from(["running", "exited", "starting"]))
        code = draw(st.sampled_from([0, 1, 137])) if state == "exited" else None
        observed.append(Observed(f"obs-{i:02}", stack_name, service, spec_hash, state, code))
    restarts = {}
    if history:
        for k in draw(st.lists(st.sampled_from(sorted(hashes)), unique=True)) if hashes else []:
            count = draw(st.integers(0, 12))
            restarts[k] = RestartRecord(count, draw(st.floats(0, NOW)), count + draw(st.integers(0, 3)))
    return desired, observed, restarts


def apply(
    driver: FakeDriver,
    p: Plan,
    desired: Mapping[str, StackSpec],
    restarts: Mapping[ServiceKey, RestartRecord],
    now: float,
) -> dict[ServiceKey, RestartRecord]:
    """Carry out ``p`` on ``driver`` as the agent does; return the updated restart history."""
    history = dict(restarts)
    for action in p.actions:
        if isinstance(action, Create):
            driver.create(action.stack, desired[action.stack], action.service)
        elif isinstance(action, Start):
            rec = history.get(key(action), RestartRecord())
            history[key(action)] = RestartRecord(rec.count + 1, now, rec.total + 1)
            driver.start(action.instance, action.service)
        else:
            driver.remove(action.instance, action.grace)
    return history


def check_converged(desired: Mapping[str, StackSpec], before: list[Observed], after: list[Observed]) -> None:
    """One current instance per desired service and nothing else; kept instances were not recreated."""
    wanted = {(n, s.name): s for n, spec in desired.items() for s in spec.services}
    assert sorted((i.stack, i.service) for i in after) == sorted(wanted)
    for i in after:
        service = wanted[(i.stack, i.service)]
        assert i.spec_hash == service.spec_hash()
        # Left as they are: starting instances and exited ones their policy does not restart.
        assert i.state in ("running", "starting") or not wants_restart(service, i.exit_code)
        earlier = [
            b for b in before if (b.stack, b.service, b.spec_hash) == (i.stack, i.service, i.spec_hash)
        ]
        if earlier:
            assert i.id in {b.id for b in earlier}, "a current instance was needlessly recreated"
        else:
            assert i.state == "running"


def device_with(observed: list[Observed]) -> FakeDriver:
    driver = FakeDriver("prop")
    for o in observed:
        driver.add(o)
    return driver


@settings(max_examples=150, deadline=None)
@given(worlds(history=False))
def test_applying_a_plan_then_planning_again_yields_an_empty_plan(world: World) -> None:
    """Without restart history, one plan converges any observed set: the next plan is empty."""
    desired, observed, _ = world
    driver = device_with(observed)
    first = plan(desired, driver.observe(), NOW)
    assert not first.waiting
    history = apply(driver, first, desired, {}, NOW)
    second = plan(desired, driver.observe(), LATER, history)
    assert second.actions == ()
    assert not second.waiting
    check_converged(desired, observed, driver.observe())


@settings(max_examples=150, deadline=None)
@given(worlds())
def test_services_held_by_backoff_converge_once_it_has_passed(world: World) -> None:
    """With restart history, only services the first plan held back act later; then all is converged."""
    desired, observed, history = world
    driver = device_with(observed)
    first = plan(desired, driver.observe(), NOW, history)
    history = apply(driver, first, desired, history, NOW)
    second = plan(desired, driver.observe(), LATER, history)
    assert {key(a) for a in second.actions} <= first.waiting
    assert not any(isinstance(a, Remove) for a in second.actions)
    history = apply(driver, second, desired, history, LATER)
    third = plan(desired, driver.observe(), LATER + RESTART_BACKOFF_CAP + 1, history)
    assert third.actions == ()
    assert not third.waiting
    check_converged(desired, observed, driver.observe())


@settings(max_examples=100, deadline=None)
@given(worlds(), st.floats(0, 2 * NOW))
def test_plan_is_deterministic(world: World, now: float) -> None:
    """The same desired state, observations, time and history always give the same plan."""
    desired, observed, history = world
    first = plan(desired, observed, now, history)
    again = plan(
        {n: StackSpec.model_validate(s.model_dump()) for n, s in desired.items()},
        [Observed(**vars(o)) for o in observed],
        now,
        dict(history),
    )
    assert first == again
    early = [a.kind == "remove" and a.reason != "spec changed" for a in first.actions]
    assert early == sorted(early, reverse=True), "removals of what is not desired come first"
    acts = first.actions
    for i, action in enumerate(acts):
        if isinstance(action, Remove) and action.reason == "spec changed":
            key = (action.instance.stack, action.instance.service)
            rest = acts[i + 1 :]
            created = any(isinstance(a, Create) and (a.stack, a.service.name) == key for a in rest)
            if created:  # its successor comes right after it (after other stale copies of it)
                j = next(k for k, a in enumerate(rest) if isinstance(a, Create))
                assert all(
                    isinstance(a, Remove) and (a.instance.stack, a.instance.service) == key for a in rest[:j]
                ), "a stale instance is replaced right away"
