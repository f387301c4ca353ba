"""CPU of one ``devices.ls`` page at a large fleet, the controller's handler alone (no broker).

    .venv/bin/python bench/devices_page.py --devices 10000 50000

Fills a fresh SQLite store with ``--devices`` devices (a mix of presences, a ``site`` label,
every tenth with a desired state, a group naming a few never-seen ids), then times (process
CPU) the handler for a listing's first page right after a device's presence changed, then
the first, a middle and the last page of 1,000 (the CLI's walk) and a searched page of 50
(the dashboard's), each the median of ``--repeat`` runs. Python 3.11: ``--devices`` from 10 up.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from tether.controller.devices import devices_ls
from tether.controller.models import Device, Group
from tether.controller.store import Store
from tether.protocol.commands import DevicesList

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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, nargs="+", default=[10000, 50000])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    for n in args.devices:
        with tempfile.TemporaryDirectory() as tmp:
            store = Store(Path(tmp) / "tether.db")
            fill(store, n)
            ctx = cast(Any, SimpleNamespace(store=store))
            devices_ls(ctx, DevicesList(limit=1000))  # warm the store's parsed-row caches
            fresh = {
                "first page after a write (1000)": DevicesList(limit=1000),
                "search after a write (50)": DevicesList(limit=50, search="site=s3"),
            }
            for name, cmd in fresh.items():
                print(
                    f"{n:>6} devices  {name:<32} {cpu(ctx, cmd, args.repeat, fresh=True) * 1000:8.1f} ms CPU"
                )
            rows = {
                "first page (1000)": DevicesList(limit=1000),
                "middle page (1000)": DevicesList(limit=1000, after=f"d-{n // 2:05d}"),
                "last page (1000)": DevicesList(limit=1000, after=f"d-{n - 500:05d}"),
                "search page (50)": DevicesList(limit=50, search="site=s3"),
            }
            for name, cmd in rows.items():
                print(f"{n:>6} devices  {name:<32} {cpu(ctx, cmd, args.repeat) * 1000:8.1f} ms CPU")
            store.close()


if __name__ == "__main__":
    main()
