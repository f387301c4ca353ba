"""Devices: what the controller knows of each, and operator labels (``devices.ls|show|top|label``).

Credentials, revocation and removal are in :mod:`.security`; the waiting room in :mod:`.enrollment`.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tether.protocol.commands import DevicesLabel, DevicesList, DevicesMetrics, DevicesShow, DevicesTop
from tether.protocol.errors import NotFoundError
from tether.protocol.results import (
    DeviceDetails,
    DeviceList,
    DeviceMetricsHistory,
    DeviceResult,
    DeviceSample,
    DeviceSamples,
    DeviceShown,
    DeviceView,
)

from .context import Context, require
from .metrics_history import SLOTS, STEP_S
from .models import Device
from .registry import CommandRegistry, Route
from .scheduler import members
from .selectors import Attributes, check_labels
from .store import Store

commands = CommandRegistry(tag="devices")
"""The commands handled here (see :mod:`.registry`)."""


def all_devices(store: Store, reported: bool = True) -> dict[str, Device]:
    """Devices heard from, plus devices named by groups or desired states but never seen
    (without ``reported``: without their reported states, much less to read)."""
    devices = {d.id: d for d in store.list_devices(reported=reported)}
    for record in store.list_desired():
        devices.setdefault(record.device_id, Device(id=record.device_id))
    for group in store.list_groups():
        for device_id in group.devices:
            devices.setdefault(device_id, Device(id=device_id))
    return dict(sorted(devices.items()))


def attributes(store: Store) -> dict[str, Attributes]:
    """Every device's attributes (labels with their provenance, and facts), by device id."""
    return {d.id: d.attributes() for d in store.list_devices(reported=False)}


def never_seen(store: Store, device_ids: Iterable[str]) -> list[str]:
    """Those of ``device_ids`` that never connected to this controller (a typo, or not yet)."""
    return [d for d in device_ids if (device := store.get_device(d)) is None or device.status == "never seen"]


def device_views(store: Store, devices: Sequence[Device]) -> list[DeviceView]:
    """Devices as replies show them (their desired generations read together: a page of
    ``devices.ls`` is one query, not one per device)."""
    generations = store.desired_generations([d.id for d in devices])
    return [_view(d, generations.get(d.id)) for d in devices]


def _view(device: Device, desired_generation: int | None) -> DeviceView:
    reported = device.reported
    return DeviceView(
        id=device.id,
        status=device.status,
        since=device.since,
        session=device.session,
        labels=device.labels,
        label_sources=device.label_sources(),
        desired_generation=desired_generation,
        applied_generation=reported.generation if reported else None,
        stacks={name: s.state for name, s in (reported.stacks.items() if reported else ())},
        storage_error=reported.storage_error if reported else None,
    )


def device_details(store: Store, device: Device) -> DeviceDetails:
    """The view with the device's facts, desired and reported state, events and drops."""
    record = store.get_desired(device.id)
    reported = device.reported
    return DeviceDetails(
        **dict(device_views(store, [device])[0]),
        facts=device.facts.model_dump(mode="json") if device.facts else None,
        desired=[r.model_dump(mode="json") for r in record.stacks] if record else [],
        reported=reported.model_dump(mode="json") if reported else None,
        events=[json.loads(b) for b in store.list_events(device.id)],
        dropped=store.dropped(device.id),
    )


def _searched(device: Device, search: str) -> bool:
    """``search`` is ``key=value`` (that label exactly), else a part of the id or of a label value."""
    labels = device.labels
    if "=" in search:
        key, _, value = search.partition("=")
        return labels.get(key.strip()) == value.strip()
    needle = search.lower()
    return needle in device.id.lower() or any(needle in v.lower() for v in labels.values())


@commands.command(DevicesList, read_only=True, http=Route("GET", "/devices", "Every device"))
def devices_ls(ctx: Context, cmd: DevicesList) -> DeviceList:
    paged = cmd.limit is not None or any(
        v is not None for v in (cmd.search, cmd.presence, cmd.state, cmd.group, cmd.after)
    )
    if not paged:
        return DeviceList(devices=device_views(ctx.store, list(all_devices(ctx.store).values())))
    if cmd.state is not None:  # reported states change with every report: filter afresh
        return _stacks_page(ctx, cmd)
    if cmd.group is not None:
        require(ctx.store.get_group(cmd.group), "group", cmd.group)
    # What the group and search select over the whole fleet, once per listing: every page
    # after the first (until the next write to devices, groups or desired states other than
    # a presence, see _Listing.moved) is a bisection, a presence filter and the page's rows.
    listing = ctx.store.memo(
        ("devices.ls", cmd.group, cmd.search), lambda: _listing(ctx.store, cmd), _Listing.moved
    )
    start = 0 if cmd.after is None else bisect_right(listing.ids, cmd.after)
    page, more = listing.page(start, cmd.presence, cmd.limit)
    matched = len(listing.ids) if cmd.presence is None else listing.by_presence.get(cmd.presence, 0)
    found = ctx.store.get_devices(page)
    return DeviceList(
        devices=device_views(ctx.store, [found.get(d) or Device(id=d) for d in page]),
        matched=matched,
        total=listing.total,
        by_presence=dict(sorted((k, n) for k, n in listing.by_presence.items() if n)),
        next=page[-1] if more and page else None,
    )


@dataclass
class _Listing:
    """What ``devices.ls``'s group and search select: the matching ids in order, each one's
    presence and the count per presence (kept up to date as presences change), and the
    fleet's size."""

    ids: list[str]
    status: dict[str, str]
    by_presence: Counter[str]
    total: int

    def moved(self, device_id: str, status: str) -> None:
        """``device_id``'s presence is now ``status`` (see :meth:`.Store.memo`)."""
        before = self.status.get(device_id)
        if before is not None:
            self.by_presence[before] -= 1
            self.by_presence[status] += 1
            self.status[device_id] = status

    def page(self, start: int, presence: str | None, limit: int | None) -> tuple[list[str], bool]:
        """Up to ``limit`` ids from ``start`` on with that ``presence`` (None: any), and
        whether more follow."""
        ids = self.ids[start:]
        if presence is not None:
            wanted: list[str] = []
            for device_id in ids:
                if self.status[device_id] == presence:
                    wanted.append(device_id)
                    if limit is not None and len(wanted) > limit:
                        break
            ids = wanted
        if limit is None or len(ids) <= limit:
            return ids, False
        return ids[:limit], True


def _listing(store: Store, cmd: DevicesList) -> _Listing:
    """The devices matching ``cmd``'s group and search (not its presence nor reported states)."""
    devices = all_devices(store, reported=False)
    found = _filtered(store, cmd, list(devices.values()))
    status: dict[str, str] = {d.id: d.status for d in found}
    return _Listing([d.id for d in found], status, Counter(status.values()), len(devices))


def _filtered(store: Store, cmd: DevicesList, found: list[Device]) -> list[Device]:
    """``found`` in ``cmd``'s group and matching its search."""
    if cmd.group is not None:
        group = require(store.get_group(cmd.group), "group", cmd.group)
        wanted = set(members(group, {d.id: d.attributes() for d in found}))
        found = [d for d in found if d.id in wanted]
    if cmd.search:
        found = [d for d in found if _searched(d, cmd.search)]
    return found


def _stacks_page(ctx: Context, cmd: DevicesList) -> DeviceList:
    """A page filtered by stack state: reads every device's reported state."""
    devices = all_devices(ctx.store, reported=True)
    found = _filtered(ctx.store, cmd, list(devices.values()))
    if cmd.state == "none":
        found = [d for d in found if not (d.reported and d.reported.stacks)]
    else:
        state = cmd.state
        found = [d for d in found if d.reported and any(s.state == state for s in d.reported.stacks.values())]
    by_presence = Counter(d.status for d in found)
    if cmd.presence is not None:
        found = [d for d in found if d.status == cmd.presence]
    after = [d for d in found if cmd.after is None or d.id > cmd.after]
    limit = len(after) if cmd.limit is None else cmd.limit
    page = after[:limit]
    return DeviceList(
        devices=device_views(ctx.store, page),
        matched=len(found),
        total=len(devices),
        by_presence=dict(sorted(by_presence.items())),
        next=page[-1].id if len(after) > limit and page else None,
    )


@commands.command(
    DevicesShow, read_only=True, http=Route("GET", "/devices/{device_id}", "A device in detail")
)
def devices_show(ctx: Context, cmd: DevicesShow) -> DeviceShown:
    device = require(all_devices(ctx.store).get(cmd.device_id), "device", cmd.device_id)
    return DeviceShown(device=device_details(ctx.store, device))


@commands.command(
    DevicesTop,
    role="viewer",
    http=Route("GET", "/device-metrics", "The latest metrics sample of each device"),
)
def devices_top(ctx: Context, cmd: DevicesTop) -> DeviceSamples:
    devices = all_devices(ctx.store)
    for device_id in cmd.device_ids:
        if device_id not in devices:
            raise NotFoundError(f"unknown device {device_id!r}")
    wanted = cmd.device_ids or tuple(devices)
    rows = [
        DeviceSample(id=d, status=devices[d].status, since=devices[d].since, sample=ctx.device_metrics.get(d))
        for d in wanted
    ]
    return DeviceSamples(devices=rows)


@commands.command(
    DevicesMetrics,
    role="viewer",
    http=Route("GET", "/devices/{device_id}/metrics", "A device's recent usage, downsampled"),
)
def devices_metrics(ctx: Context, cmd: DevicesMetrics) -> DeviceMetricsHistory:
    if cmd.device_id not in all_devices(ctx.store):
        raise NotFoundError(f"unknown device {cmd.device_id!r}")
    now = ctx.clock()
    found = ctx.device_history.series(cmd.device_id, now)
    start, series = found if found is not None else (float((int(now // STEP_S) - SLOTS + 1) * STEP_S), {})
    return DeviceMetricsHistory(
        id=cmd.device_id,
        step_s=STEP_S,
        start=start,
        cpu=series.get("cpu", []),
        mem=series.get("mem", []),
        disk=series.get("disk", []),
    )


@commands.command(
    DevicesLabel, http=Route("PATCH", "/devices/{device_id}/labels", "Set and remove operator labels")
)
def devices_label(ctx: Context, cmd: DevicesLabel) -> DeviceResult:
    """Operator labels: trusted, so selector groups match them. Removing a key also
    removes it where the device's enrollment pinned it."""
    device = all_devices(ctx.store).get(cmd.device_id)
    if device is None and (cred := ctx.store.get_credential(cmd.device_id)) is not None:
        device = Device(id=cmd.device_id) if cred.role == "device" else None  # issued, never connected
    device = require(device, "device", cmd.device_id)
    check_labels(cmd.set)
    labels = {k: v for k, v in device.operator_labels.items() if k not in cmd.remove}
    labels.update(cmd.set)
    check_labels(labels)
    pinned = {k: v for k, v in device.pinned_labels.items() if k not in cmd.remove}
    with ctx.store.transaction():
        ctx.store.put_device(device.model_copy(update={"operator_labels": labels, "pinned_labels": pinned}))
    if any(s.placement.mode == "replicas" for s in ctx.store.list_stacks()):
        ctx.sync()
    else:
        ctx.sync({cmd.device_id})
    return DeviceResult(device=device_views(ctx.store, [all_devices(ctx.store)[cmd.device_id]])[0])
