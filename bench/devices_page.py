"""CPU of one ``devices.ls`` page at a large fleet, the controller's handler alone (no broker).

    .venv/bin/python bench/devices_page.py --devices 10000 50000

Fills a fresh SQLite store with ``--devices`` devices (a mix of presences, a ``site`` label,
and a group naming a few never-seen ids), then times (process
CPU) the handler for a listing's first page right after a device's presence changed, then
the first, a middle and the last page of 1,000 (the CLI's walk) and a searched page of 50
(the dashboard's), each the median of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from common import Row, load_average, report, rnd
from tether.controller.devices import devices_ls
from tether.controller.models import Device, Group
from tether.controller.store import Store
from tether.protocol.commands import DevicesList

NAME = "devices_page"
PRESENCES = ("online", "offline", "unknown")


def fill(store: Store, n: int) -> None:
    """``n`` devices d-00000.. with a presence mix and a site label, and a group of ghosts."""
    with store.transaction():
        for i in range(n):
            store.put_device(
                Device(
                    id=f"d-{i:05d}",
                    status=PRESENCES[i % 3],
                    session=1,
                    since=1.0,
                    operator_labels={"site": f"s{i % 7}"},
                )
            )
        store.create_group(Group(name="ghosts", devices=[f"ghost-{i}" for i in range(5)]))


def cpu(ctx: Any, cmd: DevicesList, repeat: int, fresh: bool = False) -> float:
    """The median process CPU seconds of one ``devices_ls`` call (``fresh``: each after a
    device's presence was written, as a listing's first page after a change)."""
    runs = []
    for i in range(repeat):
        if fresh:
            ctx.store.put_device(Device(id="d-00000", status=PRESENCES[i % 3], session=1, since=1.0))
        t = time.process_time()
        devices_ls(ctx, cmd)
        runs.append(time.process_time() - t)
    return statistics.median(runs)


def run(n: int, repeat: int) -> dict[str, Any]:
    """Each page's median CPU in milliseconds at ``n`` devices, and the load around it."""
    load0 = load_average()
    with tempfile.TemporaryDirectory(prefix="tether-devpage-") as tmp:
        store = Store(Path(tmp) / "tether.db")
        fill(store, n)
        ctx = cast(Any, SimpleNamespace(store=store))
        devices_ls(ctx, DevicesList(limit=1000))  # warm the store's parsed-row caches
        pages: dict[str, float | None] = {}
        for name, cmd in {
            "first page after a write (1000)": DevicesList(limit=1000),
            "search after a write (50)": DevicesList(limit=50, search="site=s3"),
        }.items():
            pages[name] = rnd(cpu(ctx, cmd, repeat, fresh=True) * 1000)
        for name, cmd in {
            "first page (1000)": DevicesList(limit=1000),
            "middle page (1000)": DevicesList(limit=1000, after=f"d-{n // 2:05d}"),
            "last page (1000)": DevicesList(limit=1000, after=f"d-{n - 500:05d}"),
            "search page (50)": DevicesList(limit=50, search="site=s3"),
        }.items():
            pages[name] = rnd(cpu(ctx, cmd, repeat) * 1000)
        listed = len(devices_ls(ctx, DevicesList(limit=1000)).devices)
        store.close()
    return {
        "devices": n,
        "repeat": repeat,
        "ms": pages,
        "first_page_rows": listed,
        "load_average": [load0, load_average()],
    }


def rows(results: list[dict[str, Any]]) -> list[Row]:
    out = []
    for data in results:
        n = data["devices"]
        out.append(Row(f"{n} devices: load average, start / end", " / ".join(map(str, data["load_average"]))))
        out += [Row(f"{n} devices: {name} (median CPU)", ms, " ms") for name, ms in data["ms"].items()]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[10000, 50000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    results = [run(n, args.repeat) for n in args.devices]
    title = "devices.ls page CPU: " + ", ".join(map(str, args.devices)) + " devices"
    report(NAME, title, rows(results), {"runs": results}, args.json, *args.devices)
    return 0


if __name__ == "__main__":
    sys.exit(main())
