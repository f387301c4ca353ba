"""Device commands on a real SQLite store: views, metrics and operator labels."""

from __future__ import annotations

import pytest
from support.fleet import desired, online
from support.recording import RecordingPublisher
from tether.controller.models import DesiredRecord
from tether.controller.service import Controller
from tether.protocol.commands import (
    DevicesCredentials,
    DevicesLabel,
    DevicesList,
    DevicesShow,
    DevicesTop,
    GroupsCreate,
    StacksDeploy,
)
from tether.protocol.errors import CommandError, NotFoundError
from tether.protocol.results import DeviceSample

COMPOSE = "services:\n  web:\n    image: busybox:1.36\n"


def test_devices_ls_includes_devices_named_but_never_seen(controller: Controller) -> None:
    """A device only named by a static group is listed as never seen; one heard from is online."""
    online(controller, "pi-1")
    controller.execute(GroupsCreate(name="edge", devices=("pi-1", "pi-9")))
    rows = {d.id: d for d in controller.execute(DevicesList()).devices}
    assert (rows["pi-1"].status, rows["pi-9"].status) == ("online", "never seen")
    shown = controller.execute(DevicesShow(device_id="pi-1")).device
    assert shown.facts is not None and shown.facts["driver"] == "process"
    assert shown.events == [] and shown.reported is None
    with pytest.raises(NotFoundError, match="unknown device 'pi-2'"):
        controller.execute(DevicesShow(device_id="pi-2"))


def test_devices_top_reads_the_latest_sample_and_refuses_unknown_ids(controller: Controller) -> None:
    """devices.top gives each device's sample (None before one arrived) and names an unknown id."""
    online(controller, "pi-1")
    controller.context.device_metrics["pi-1"] = {"at": 1.0, "cpu": 0.5}
    rows = controller.execute(DevicesTop()).devices
    assert rows == [
        DeviceSample(id="pi-1", status="online", since=controller.clock(), sample={"at": 1.0, "cpu": 0.5})
    ]
    with pytest.raises(NotFoundError, match="unknown device 'nope'"):
        controller.execute(DevicesTop(device_ids=("pi-1", "nope")))


def test_an_operator_label_moves_a_device_into_a_selector_group(
    controller: Controller, publisher: RecordingPublisher
) -> None:
    """devices.label sets a trusted label: the selector group's stack goes to the device; removing it takes it away."""
    online(controller, "pi-1", labels={"role": "cam"})  # its own label: not trusted
    controller.execute(GroupsCreate(name="cams", selector="role=cam"))
    controller.execute(StacksDeploy(name="web", group="cams", compose=COMPOSE))
    assert desired(publisher, "pi-1") is None
    view = controller.execute(DevicesLabel(device_id="pi-1", set={"role": "cam"})).device
    assert view.label_sources["role"] == "operator"
    state = desired(publisher, "pi-1")
    assert state is not None and [s.name for s in state.stacks] == ["web"]
    controller.execute(DevicesLabel(device_id="pi-1", remove=("role",)))
    state = desired(publisher, "pi-1")
    assert state is not None and state.stacks == ()


def test_bad_labels_are_refused_and_change_nothing(controller: Controller) -> None:
    """An invalid label or an unknown device is one error; the device's labels stay as they were."""
    online(controller, "pi-1")
    controller.execute(DevicesLabel(device_id="pi-1", set={"zone": "a"}))
    with pytest.raises(CommandError, match="label"):
        controller.execute(DevicesLabel(device_id="pi-1", set={"Bad Key!": "x"}))
    with pytest.raises(NotFoundError, match="unknown device 'pi-2'"):
        controller.execute(DevicesLabel(device_id="pi-2", set={"zone": "a"}))
    device = controller.store.get_device("pi-1")
    assert device is not None and device.operator_labels == {"zone": "a"}


def test_a_device_with_credentials_never_connected_can_be_labelled(controller: Controller) -> None:
    """devices.label works on a device that has broker credentials but never connected (pre-labelling)."""
    controller.execute(DevicesCredentials(device_id="pi-7"))
    view = controller.execute(DevicesLabel(device_id="pi-7", set={"zone": "a"})).device
    assert view.label_sources == {"zone": "operator"}
    device = controller.store.get_device("pi-7")
    assert device is not None and device.operator_labels == {"zone": "a"}


def test_devices_ls_pages_and_filters(controller: Controller) -> None:
    """A paged devices.ls returns one page in id order with the next page's cursor, counts every
    match and each presence, and filters by search, key=value, presence, stack state and group."""
    from support.fleet import report_running
    from tether.controller.devices import devices_ls

    for n in range(7):
        online(controller, f"d-{n}", labels={"site": "north" if n % 2 else "south"})
    report_running(controller, "d-3", 1, {"app": "h"})
    controller.execute(GroupsCreate(name="odd", selector="site=north", trust_device_labels=True))
    controller.execute(GroupsCreate(name="named", devices=("d-0", "ghost")))
    whole = controller.execute(DevicesList())
    assert whole.matched is None and len(whole.devices) == 8  # unpaged: as before (ghost never seen)
    first = controller.execute(DevicesList(limit=3))
    assert [d.id for d in first.devices] == ["d-0", "d-1", "d-2"] and first.next == "d-2"
    assert (first.matched, first.total, first.by_presence) == (8, 8, {"never seen": 1, "online": 7})
    last = controller.execute(DevicesList(limit=3, after="d-5"))
    assert [d.id for d in last.devices] == ["d-6", "ghost"] and last.next is None
    assert [d.id for d in controller.execute(DevicesList(search="site=north")).devices] == [
        "d-1",
        "d-3",
        "d-5",
    ]
    assert [d.id for d in controller.execute(DevicesList(search="SOUTH", limit=1)).devices] == ["d-0"]
    assert [d.id for d in controller.execute(DevicesList(presence="never seen")).devices] == ["ghost"]
    running = controller.execute(DevicesList(state="running"))
    assert [d.id for d in running.devices] == ["d-3"] and running.devices[0].stacks == {"app": "running"}
    assert [d.id for d in controller.execute(DevicesList(group="odd", limit=2)).devices] == ["d-1", "d-3"]
    assert [d.id for d in controller.execute(DevicesList(group="named")).devices] == ["d-0", "ghost"]
    assert "d-3" not in [d.id for d in controller.execute(DevicesList(state="none")).devices]
    paged_view = devices_ls(controller.context, DevicesList(search="d-3")).devices[0]
    assert paged_view == next(d for d in whole.devices if d.id == "d-3")  # the page reads reported states
    with pytest.raises(NotFoundError, match="unknown group 'nope'"):
        controller.execute(DevicesList(group="nope"))


def test_the_presence_gauges_count_devices_named_but_never_seen(controller: Controller) -> None:
    """/metrics' tether_devices: the fleet by presence, plus the devices only a group or a
    desired record names, each counted once."""
    online(controller, "pi-1")
    controller.execute(GroupsCreate(name="edge", devices=("pi-1", "pi-9")))
    controller.store.put_desired(DesiredRecord(device_id="pi-8", generation=1))
    controller.store.put_desired(DesiredRecord(device_id="pi-9", generation=1))
    controller.refresh_metrics()
    shown = {p: controller.metrics.devices.labels(presence=p)._value.get() for p in ("online", "never seen")}
    assert shown == {"online": 1, "never seen": 2}
