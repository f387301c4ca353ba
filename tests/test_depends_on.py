"""depends_on conditions and restart, and deploy.restart_policy.max_attempts, in the pure plan:
a dependent waits for a healthy or completed dependency, is replaced with it (``restart:
true``), and a service gives up after its last allowed restart."""

from __future__ import annotations

from tether.agent.drivers.base import Observed
from tether.agent.reconcile import Create, Remove, Start, plan
from tether.agent.restarts import RestartRecord
from tether.protocol.models import Dependency, HealthcheckSpec, ServiceSpec, StackSpec

CHECK = HealthcheckSpec(test=("CMD", "true"))


def stack(condition: str, restart: bool = False, required: bool = True) -> StackSpec:
    db = ServiceSpec(name="db", image="db:1", healthcheck=CHECK)
    web = ServiceSpec(
        name="web",
        image="web:1",
        depends_on=("db",),
        dependencies={"db": Dependency(condition=condition, restart=restart, required=required)},  # type: ignore[arg-type]
    )
    return StackSpec(services=(db, web))


def inst(spec: StackSpec, name: str, **kw: object) -> Observed:
    service = spec.service(name)
    assert service is not None
    fields: dict = {
        "id": f"{name}-1",
        "stack": "s",
        "service": name,
        "spec_hash": service.spec_hash(),
        "state": "running",
    }
    fields.update(kw)
    return Observed(**fields)


def created(p: object) -> list[str]:
    return [a.service.name for a in p.actions if isinstance(a, Create)]  # type: ignore[attr-defined]


def test_service_healthy_waits_for_a_healthy_dependency() -> None:
    """The dependent is not created until its dependency runs and is healthy."""
    spec = stack("service_healthy")
    assert created(plan({"s": spec}, [], 0.0)) == ["db"]
    assert created(plan({"s": spec}, [inst(spec, "db", health="starting")], 0.0)) == []
    assert created(plan({"s": spec}, [inst(spec, "db", health="unhealthy")], 0.0)) == []
    assert created(plan({"s": spec}, [inst(spec, "db", health="healthy")], 0.0)) == ["web"]


def test_service_completed_successfully_waits_for_exit_zero() -> None:
    """The dependent waits while the dependency runs, and for ever if it failed (unless not required)."""
    spec = stack("service_completed_successfully")
    assert created(plan({"s": spec}, [inst(spec, "db")], 0.0)) == []
    done = inst(spec, "db", state="exited", exit_code=0)
    assert created(plan({"s": spec}, [done], 0.0)) == ["web"]
    failed = inst(spec, "db", state="exited", exit_code=2)
    assert created(plan({"s": spec}, [failed], 0.0)) == []
    optional = stack("service_completed_successfully", required=False)
    failed = inst(optional, "db", state="exited", exit_code=2)
    assert created(plan({"s": optional}, [failed], 0.0)) == ["web"]


def test_restart_true_replaces_the_dependent_with_its_dependency() -> None:
    """When the dependency is replaced (new spec), a restart: true dependent is replaced too."""
    spec = stack("service_started", restart=True)
    old_db = inst(spec, "db", spec_hash="old")
    web = inst(spec, "web")
    p = plan({"s": spec}, [old_db, web], 0.0)
    removed = {(a.instance.service, a.reason) for a in p.actions if isinstance(a, Remove)}
    assert removed == {("db", "spec changed"), ("web", "db replaced")}
    assert created(p) == ["db", "web"]
    without = stack("service_started", restart=False)
    p = plan({"s": without}, [inst(without, "db", spec_hash="old"), inst(without, "web")], 0.0)
    assert [a.instance.service for a in p.actions if isinstance(a, Remove)] == ["db"]


def test_max_attempts_stops_restarts() -> None:
    """After max_attempts consecutive restarts, an exited service is left exited."""
    svc = ServiceSpec(name="job", image="j:1", restart="on-failure", restart_max_attempts=2)
    spec = StackSpec(services=(svc,))
    exited = inst(spec, "job", state="exited", exit_code=1)
    again = plan({"s": spec}, [exited], 100.0, {("s", "job"): RestartRecord(count=1, last_at=0.0, total=1)})
    assert [type(a) for a in again.actions] == [Start]
    done = plan({"s": spec}, [exited], 100.0, {("s", "job"): RestartRecord(count=2, last_at=0.0, total=2)})
    assert not done.actions
