"""``devices.ls`` pages against the whole filtered list, on random fleets in a real SQLite store."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from hypothesis import given, settings
from hypothesis import strategies as st
from tether.controller.devices import _searched, all_devices, devices_ls
from tether.controller.models import DesiredRecord, Device, Group
from tether.controller.scheduler import members
from tether.controller.store import Store
from tether.protocol.commands import DevicesList

PRESENCE = st.sampled_from(["online", "offline", "unknown", "never seen"])
IDS = st.text(alphabet="abd-0123", min_size=1, max_size=4)
SITES = st.sampled_from(["north", "south", "n-1"])

devices_st = st.dictionaries(IDS, st.tuples(PRESENCE, st.none() | SITES), max_size=25)
filters_st = st.fixed_dictionaries(
    {
        "search": st.none() | st.sampled_from(["", "a", "D-", "site=north", "NOR", "1"]),
        "presence": st.none() | PRESENCE,
        "group": st.none() | st.sampled_from(["named", "north"]),
    }
)


def expected(store: Store, cmd: DevicesList) -> tuple[list[str], int, dict[str, int]]:
    """The whole filtered list and the counts, computed directly from every device."""
    devices = all_devices(store)
    found = list(devices.values())
    if cmd.group is not None:
        group = store.get_group(cmd.group)
        assert group is not None
        wanted = set(members(group, {d.id: d.attributes() for d in found}))
        found = [d for d in found if d.id in wanted]
    if cmd.search:
        found = [d for d in found if _searched(d, cmd.search)]
    by_presence = dict(sorted(Counter(d.status for d in found).items()))
    found = [d for d in found if cmd.presence is None or d.status == cmd.presence]
    return [d.id for d in found], len(devices), by_presence


def put(store: Store, device_id: str, presence: str, site: str | None) -> None:
    labels = {"site": site} if site else {}
    store.put_device(Device(id=device_id, status=presence, session=1, operator_labels=labels))  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(
    fleet=devices_st,
    ghosts=st.lists(IDS, max_size=4),
    wanted=st.lists(IDS, max_size=4),
    filters=filters_st,
    limit=st.integers(1, 6),
    change=st.none() | st.tuples(st.integers(0, 8), IDS, PRESENCE, st.none() | SITES),
)
def test_paged_walk_equals_the_whole_list(
    fleet: dict[str, tuple[str, str | None]],
    ghosts: list[str],
    wanted: list[str],
    filters: dict[str, Any],
    limit: int,
    change: tuple[int, str, str, str | None] | None,
) -> None:
    """Walking devices.ls page by page (cursor ``next``) gives the whole filtered list in id
    order with every page's counts and views as if computed afresh, also when a device is
    written between two pages (the fleet-wide part is kept only until the next write)."""
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "tether.db")
        try:
            for device_id, (presence, site) in fleet.items():
                put(store, device_id, presence, site)
            store.create_group(Group(name="named", devices=tuple(ghosts)))
            store.create_group(Group(name="north", selector="site=north"))
            for device_id in wanted:
                store.put_desired(DesiredRecord(device_id=device_id, generation=1))
            ctx = cast(Any, SimpleNamespace(store=store))
            after: str | None = None
            walked: list[str] = []
            for n in range(200):
                if change is not None and n == change[0]:
                    put(store, change[1], change[2], change[3])
                cmd = DevicesList(limit=limit, after=after, **filters)
                page = devices_ls(ctx, cmd)
                ids, total, by_presence = expected(store, cmd)
                if change is not None and n == change[0]:  # what was walked is read again
                    walked = [d for d in ids if after is not None and d <= after]
                rest = [d for d in ids if after is None or d > after]
                assert [d.id for d in page.devices] == rest[:limit]
                assert (page.matched, page.total, page.by_presence) == (len(ids), total, by_presence)
                whole = {d.id: d for d in devices_ls(ctx, DevicesList()).devices}
                assert page.devices == [whole[d.id] for d in page.devices]
                walked += [d.id for d in page.devices]
                assert page.next == (rest[limit - 1] if len(rest) > limit else None)
                if page.next is None:
                    break
                after = page.next
            assert walked == ids
        finally:
            store.close()


def test_presence_writes_keep_the_listing_and_its_counts_true(monkeypatch: Any) -> None:
    """A presence-only write (status, session, since) keeps devices.ls's fleet-wide listing
    (no refiltering per page under a reconnection storm) with counts, presence filter and
    rows as written; any other write to a device (a label) filters the fleet again."""
    import tether.controller.devices as devices_module

    computed: list[int] = []
    real = devices_module._listing

    def counting(store: Store, cmd: DevicesList) -> Any:
        computed.append(1)
        return real(store, cmd)

    monkeypatch.setattr(devices_module, "_listing", counting)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "tether.db")
        try:
            for i in range(5):
                put(store, f"d{i}", "online", "north")
            store.create_group(Group(name="north", selector="site=north"))
            ctx = cast(Any, SimpleNamespace(store=store))
            first = devices_ls(ctx, DevicesList(limit=2, group="north"))
            assert first.by_presence == {"online": 5} and len(computed) == 1
            store.put_device(
                Device(id="d3", status="offline", session=2, since=7.0, operator_labels={"site": "north"})
            )
            store.put_device(Device(id="d1", status="unknown", session=1, operator_labels={"site": "north"}))
            offline = devices_ls(ctx, DevicesList(limit=2, group="north", presence="offline"))
            assert [d.id for d in offline.devices] == ["d3"] and offline.devices[0].session == 2
            assert (offline.matched, offline.next) == (1, None)
            page = devices_ls(ctx, DevicesList(limit=2, group="north", after=first.next))
            assert page.by_presence == {"offline": 1, "online": 3, "unknown": 1}
            assert [(d.id, d.status) for d in page.devices] == [("d2", "online"), ("d3", "offline")]
            online = devices_ls(ctx, DevicesList(limit=1, group="north", presence="online"))
            assert ([d.id for d in online.devices], online.matched, online.next) == (["d0"], 3, "d0")
            assert len(computed) == 1  # every page above from the one listing
            put(store, "d4", "online", "south")  # a label: the group's members change
            moved = devices_ls(ctx, DevicesList(limit=10, group="north"))
            assert len(computed) == 2 and [d.id for d in moved.devices] == ["d0", "d1", "d2", "d3"]
            assert moved.by_presence == {"offline": 1, "online": 2, "unknown": 1}
        finally:
            store.close()
