"""The fleet view kept in memory (Scheduler.fleet_view) stays what the store holds, whatever is
written: presences taken from the row written, reports as written, anything else read again."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from support.recording import Clock
from tether.controller.fleet import Seen
from tether.controller.models import Device
from tether.controller.service import Controller
from tether.controller.store import Store
from tether.protocol.models import DeviceFacts, ReportedState, StackStatus

DEVICES = ("d1", "d2", "d3")
_facts = st.sampled_from(
    [
        None,
        *(
            DeviceFacts(agent_version="1", driver="docker", arch="x", os="linux", labels={"site": s})
            for s in "ab"
        ),
    ]
)
_presence = st.tuples(
    st.just("presence"),
    st.sampled_from(DEVICES),
    st.sampled_from(["online", "offline", "unknown"]),
    st.integers(0, 5),
    _facts,
)
_report = st.tuples(
    st.just("report"),
    st.sampled_from(DEVICES),
    st.integers(0, 3),
    st.sampled_from(["running", "failed"]),
)
_other = st.tuples(st.sampled_from(["whole", "forget", "view", "rollback"]), st.sampled_from(DEVICES))


@settings(max_examples=80, deadline=None)
@given(st.lists(st.one_of(_presence, _report, _other), max_size=30))
def test_the_kept_fleet_view_is_the_stores_whatever_is_written(ops: list[tuple]) -> None:  # type: ignore[type-arg]
    """After any writes (a presence keeping the stored report, reports, whole devices, forgotten
    devices, rolled back transactions), the fleet view equals every device read again."""
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "tether.db")
        try:
            scheduler = Controller(store, clock=Clock()).context.scheduler
            known = [("presence", d, "online", 1, None) for d in DEVICES[:2]]
            for op in [*known, ("view", "d1"), *ops, ("view", "d1")]:
                kind, device_id = op[0], op[1]
                stored = store.get_device(device_id, reported=False)
                if kind == "presence":
                    _, _, status, session, facts = op
                    device = (stored or Device(id=device_id)).model_copy(
                        update={
                            "status": status,
                            "session": session,
                            "facts": facts or (stored and stored.facts),
                        }
                    )
                    store.put_device(device, keep_reported=True)
                elif kind == "report" and stored is not None:
                    _, _, generation, state = op
                    stacks = {"app": StackStatus(spec_hash="a" * 12, state=state)}
                    store.put_reported(
                        device_id, ReportedState(device_id=device_id, generation=generation, stacks=stacks)
                    )
                elif kind == "whole":
                    store.put_device(Device(id=device_id, status="online", session=9))
                elif kind == "forget":
                    store.forget_device(device_id)
                elif kind == "rollback" and stored is not None:
                    try:
                        with store.transaction():
                            store.put_device(
                                stored.model_copy(update={"status": "offline"}), keep_reported=True
                            )
                            raise RuntimeError("undone")
                    except RuntimeError:
                        pass
                elif kind == "view":
                    assert scheduler.fleet_view() == {d.id: Seen.of(d) for d in store.list_devices()}
        finally:
            store.close()


def test_the_tick_takes_the_writes_into_the_view_and_the_store_lets_them_go(tmp_path: Path) -> None:
    """keep_up (after a batch, the tick) folds what the store wrote into the kept view, so the
    store holds nothing of those writes afterwards; with no view kept yet (or not leading), or
    after a rollback (every device to read again), it reads nothing."""
    store = Store(tmp_path / "tether.db")
    controller = Controller(store, clock=Clock())
    scheduler = controller.context.scheduler
    store.put_device(Device(id="d1", status="online", session=1))
    scheduler.keep_up()  # neither leading nor a view: nothing read
    controller.leading.set()
    scheduler.keep_up()  # no view to keep up: none built
    assert store.devices_written() is None, "nobody asked the store yet"
    assert scheduler.fleet_view()["d1"].status == "online"
    stored = store.get_device("d1", reported=False)
    assert stored is not None
    store.put_device(stored.model_copy(update={"status": "offline", "session": 2}), keep_reported=True)
    store.put_reported("d1", ReportedState(device_id="d1", generation=3))
    scheduler.keep_up()
    assert store.devices_written() == {}, "the writes were taken into the view"
    seen = scheduler.fleet_view()["d1"]
    assert (seen.status, seen.generation) == ("offline", 3)
    with contextlib.suppress(RuntimeError), store.transaction():
        store.put_device(Device(id="d2"))
        raise RuntimeError("undone: the store no longer knows what was written")
    scheduler.keep_up()  # a rollback: every device would be read again; left to the next reader
    assert store.devices_written() is None
    store.close()
