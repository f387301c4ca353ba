"""A deployment's per-device entries stored apart from it (issue 21), on SQLite and PostgreSQL:
a step writes only what it changed, reads assemble the same deployment, the migration
converts a deployment in progress written by the old schema and the controller continues it."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.fleet import report_running, web_on_twelve
from support.recording import Clock, RecordingPublisher
from tether.controller import rollout
from tether.controller.security import ensure_operator_credentials
from tether.controller.service import Controller
from tether.controller.store import MIGRATIONS, Store, _deployment_entries
from tether.controller.variables import SecretsKey
from tether.protocol.commands import DeploymentsStatus

pytestmark = pytest.mark.store


def _started(n: int) -> rollout.Deployment:
    members = [f"d-{i:03}" for i in range(n)]
    return rollout.start(1, "web", "a" * 64, "b" * 64, rollout.Strategy(), members, 100.0)


def _moved(d: rollout.Deployment, names: list[str], now: float) -> rollout.Deployment:
    devices = dict(d.devices)
    for name in names:
        devices[name] = devices[name].model_copy(update={"state": "updating", "moved_at": now})
    return d.model_copy(update={"devices": devices, "updated": now})


def _stored(store_target: str, deployment_id: int = 1) -> rollout.Deployment:
    """The deployment as a store that never saw it reads it (nothing kept parsed)."""
    fresh = Store(store_target)
    try:
        d = fresh.get_deployment(deployment_id)
        assert d is not None
        return d
    finally:
        fresh.close()


def test_a_step_rewrites_only_the_entries_it_changed(store_target: str) -> None:
    """Changed, added and removed entries are written and the rest left alone (an entry altered
    behind the store's back stays altered); the order of the devices survives a re-read."""
    store = Store(store_target)
    d0 = _started(50)
    with store.transaction():
        store.put_deployment(d0)
    assert _stored(store_target) == d0
    marker = d0.devices["d-007"].model_copy(update={"state": "held"})
    store.db.execute(
        "UPDATE deployment_devices SET body = ? WHERE deployment_id = 1 AND device_id = 'd-007'",
        (marker.model_dump_json(),),
    )
    d1 = _moved(d0, ["d-001", "d-002"], 110.0)
    devices = dict(d1.devices)
    del devices["d-040"]
    devices["a-new"] = rollout.DeviceRollout()  # joined: last in the deployment's order
    d1 = d1.model_copy(update={"devices": devices})
    with store.transaction():
        store.put_deployment(d1)  # compared with d0 entry by entry
    d2 = _moved(d1, ["d-003"], 120.0)
    with store.transaction():
        store.put_deployment(d2, d1, ["d-003"])  # the step's own list of what it changed
    seen = _stored(store_target)
    assert seen.devices["d-007"] == marker  # untouched: not written again
    assert seen.model_copy(update={"devices": {**seen.devices, "d-007": d0.devices["d-007"]}}) == d2
    assert list(seen.devices) == list(d2.devices) and list(seen.devices)[-1] == "a-new"
    assert store.latest_deployments()["web"] is d2  # kept as written: nothing parsed again
    store.close()


def test_a_rolled_back_step_leaves_the_stored_deployment_whole(store_target: str) -> None:
    """A step's transaction rolled back writes neither header nor entries; the next write, made
    from the unstored one, is stored whole; a second store on the database sees each write."""
    store, other = Store(store_target), Store(store_target)
    d0 = _started(20)
    with store.transaction():
        store.put_deployment(d0)
    assert other.latest_deployments()["web"] == d0
    d1 = _moved(d0, ["d-000", "d-001"], 110.0)
    with pytest.raises(RuntimeError), store.transaction():
        store.put_deployment(d1, d0, ["d-000", "d-001"])
        raise RuntimeError("crash in the middle of the step")
    assert _stored(store_target) == d0 and store.latest_deployments()["web"] == d0
    d2 = _moved(d1, ["d-002"], 120.0)
    with store.transaction():
        store.put_deployment(d2, d1, ["d-002"])  # d1 never stored: every entry written again
    assert _stored(store_target) == d2
    assert other.latest_deployments()["web"] == d2  # another controller's write is read afresh
    d3 = _moved(d2, ["d-010"], 130.0)
    with other.transaction():
        other.put_deployment(d3)
    assert store.latest_deployments()["web"] == d3 == _stored(store_target)
    store.close()
    other.close()


def _old_schema(store: Store) -> None:
    """Make the database what the schema before migration ``_deployment_entries`` held: each
    deployment one row with every device's entry in its body (as that code wrote it)."""
    deployments = [store.get_deployment(i) for i in range(1, store.next_deployment_id())]
    version = MIGRATIONS.index(_deployment_entries) + 1
    with store.transaction():
        store.db.execute("DROP TABLE deployment_devices")
        store.db.execute("ALTER TABLE deployments DROP COLUMN rev")
        for d in deployments:
            assert d is not None
            store.db.execute("UPDATE deployments SET body = ? WHERE id = ?", (d.model_dump_json(), d.id))
        store.db.execute("DELETE FROM schema_migrations WHERE version >= ?", (version,))


def _controller(store: Store, tmp_path: Path, now: float) -> Controller:
    controller = Controller(store, clock=Clock(now), secrets=SecretsKey.load_or_create(tmp_path))
    controller.client = RecordingPublisher()  # type: ignore[assignment]
    controller.leading.set()
    return controller


def test_a_deployment_in_progress_under_the_old_schema_is_migrated_and_continues(
    store_target: str, tmp_path: Path
) -> None:
    """Reopening a database of the old schema mid-deployment converts it (same deployment, same
    status output) and the controller takes the rollout to its end."""
    store = Store(store_target)
    ensure_operator_credentials(store, tmp_path, "mqtt://127.0.0.1:1883", 0.0)
    controller = _controller(store, tmp_path, 1000.0)
    spec_hash = web_on_twelve(controller)  # d-00..d-04 report it running
    controller.advance_deployments()  # their healthy timers start; the 7 others still updating
    deployment = store.latest_deployments()["web"]
    status = controller.execute(DeploymentsStatus(id=deployment.id)).model_dump()
    assert deployment.state == "running" and status["deployment"]["counts"] == {"updating": 12}
    _old_schema(store)
    store.close()

    store = Store(store_target)
    assert store.schema_version() == len(MIGRATIONS)
    migrated = store.get_deployment(deployment.id)
    assert (
        migrated == deployment and migrated is not None and list(migrated.devices) == list(deployment.devices)
    )
    controller = _controller(store, tmp_path, 1000.0)
    assert controller.execute(DeploymentsStatus(id=deployment.id)).model_dump() == status
    for i in range(5, 12):
        record = store.get_desired(f"d-{i:02}")
        assert record is not None
        report_running(controller, f"d-{i:02}", record.generation, {"web": spec_hash})
    controller.advance_deployments()
    controller.clock.now += 60  # type: ignore[attr-defined]  # past min_healthy_time
    controller.advance_deployments()
    done = store.latest_deployments()["web"]
    assert (done.id, done.state) == (deployment.id, "succeeded")
    assert _stored(store_target, deployment.id) == done
    assert {r.state for r in done.devices.values()} == {"healthy"}
    store.close()
