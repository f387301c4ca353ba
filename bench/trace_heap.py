"""Run a command's Python module with tracemalloc on, dumping snapshots on request (bench use only).

    TETHER_BENCH_TRACEMALLOC=DIR .venv/bin/python bench/reconnect_storm.py ...

``bench/common.Controller`` starts the controller as ``python bench/trace_heap.py DIR
tether.cli.main up ...`` when the variable is set. A thread of the controller's process then
watches DIR: a file ``LABEL.req`` makes it write ``LABEL.snap`` (a tracemalloc snapshot)
and ``LABEL.json`` (traced bytes and RSS then); while ``arm`` exists, it takes a snapshot
every few seconds and keeps the one with the most traced bytes as ``peak.snap`` (and the
highest RSS seen as ``peak.json``'s ``rss_max_mb``). Compare with
``python bench/trace_heap.py --compare A.snap B.snap``.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import threading
import time
import tracemalloc
from pathlib import Path


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _dump(d: Path, label: str, extra: dict[str, float] | None = None) -> None:
    snap = tracemalloc.take_snapshot()
    snap.dump(str(d / f"{label}.snap.tmp"))
    os.replace(d / f"{label}.snap.tmp", d / f"{label}.snap")
    cur, peak = tracemalloc.get_traced_memory()
    info = {"traced_mb": cur / 2**20, "traced_peak_mb": peak / 2**20, "rss_mb": _rss_mb(), "t": time.time()}
    (d / f"{label}.json").write_text(json.dumps({**info, **(extra or {})}))


def _watch(d: Path) -> None:
    best = 0
    rss_max = 0.0
    while True:
        time.sleep(0.5)
        for req in d.glob("*.req"):
            _dump(d, req.stem)
            req.unlink()
        if (d / "arm").exists():
            rss_max = max(rss_max, _rss_mb())
            cur, _ = tracemalloc.get_traced_memory()
            if cur > best + 2**20:
                best = cur
                _dump(d, "peak", {"rss_max_mb": rss_max})
            else:
                (d / "rss_max.json").write_text(json.dumps({"rss_max_mb": rss_max}))


def compare(a: str, b: str, top: int = 40) -> None:
    sa = tracemalloc.Snapshot.load(a).filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    sb = tracemalloc.Snapshot.load(b).filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    total = sum(s.size for s in sb.statistics("filename")) - sum(s.size for s in sa.statistics("filename"))
    print(f"total difference: {total / 2**20:+.1f} MB")
    for stat in sb.compare_to(sa, "lineno")[:top]:
        print(f"{stat.size_diff / 2**20:+8.2f} MB {stat.count_diff:+9d}  {stat.traceback[0]}")


def main() -> None:
    if sys.argv[1] == "--compare":
        compare(sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 40)
        return
    d = Path(sys.argv[1])
    d.mkdir(parents=True, exist_ok=True)
    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    tracemalloc.start(int(os.environ.get("TETHER_BENCH_TRACEMALLOC_FRAMES", "1")))
    threading.Thread(target=_watch, args=(d,), daemon=True, name="trace-heap").start()
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
