"""Run every benchmark, one after the other, and collect their results.

    .venv/bin/python bench/run_all.py            # the sizes in docs/performance.md (about an hour)
    .venv/bin/python bench/run_all.py --quick    # small and fast: proves they all still work
    .venv/bin/python bench/run_all.py --only deploy_latency,reconnect_storm

Each benchmark runs as its own process (``bench/NAME.py``), prints its table and writes
``bench/results/NAME*.json`` (``--results DIR`` elsewhere); this command then writes
``all.json`` there with every result and prints which targets were met. A benchmark that
fails (or needs what this machine lacks, such as Docker) is reported and the rest still
run. ``bench/broker_bench.py`` (the embedded broker against Mosquitto) runs too when present.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# name -> list of (result file stem, arguments); full sizes and quick sizes.
FULL: dict[str, list[tuple[str, list[str]]]] = {
    "footprint": [("footprint", ["--window", "300"])],
    "bandwidth": [("bandwidth", ["--window", "900"])],
    "deploy_latency": [
        ("deploy_latency-1000-mosquitto", ["--devices", "1000"]),
        ("deploy_latency-1000-embedded", ["--devices", "1000", "--broker", "embedded"]),
        ("deploy_latency-10000-mosquitto", ["--devices", "10000"]),
    ],
    "reconnect_storm": [("reconnect_storm-10000", ["--devices", "10000"])],
    "controller_capacity": [("controller_capacity-10000", ["--devices", "10000"])],
    "fleet_scale": [("fleet_scale-50000-e3", ["--devices", "50000", "--edge-brokers", "3"])],
    "broker_bench": [("broker_bench", ["--devices", "1000", "--broker", "embedded,mosquitto"])],
    "update_over_weak_link": [("update_over_weak_link", [])],
}
QUICK: dict[str, list[tuple[str, list[str]]]] = {
    "footprint": [("footprint", ["--window", "3", "--settle", "1", "--no-install-size"])],
    "bandwidth": [("bandwidth", ["--window", "3", "--quiet", "1.5"])],
    "deploy_latency": [("deploy_latency-30-mosquitto", ["--devices", "30", "--timeout", "60"])],
    "reconnect_storm": [("reconnect_storm-30", ["--devices", "30", "--timeout", "60", "--settle", "0.5"])],
    "controller_capacity": [
        (
            "controller_capacity-30",
            ["--devices", "30", "--window", "2", "--settle", "0.5", "--runs", "1", "--timeout", "60"],
        )
    ],
    "fleet_scale": [
        (
            "fleet_scale-300-e2",
            ["--devices", "300", "--edge-brokers", "2", "--settle", "0.2", "--timeout", "60"],
        )
    ],
    "broker_bench": [("broker_bench", ["--devices", "30", "--broker", "mosquitto", "--phase-timeout", "30"])],
    "update_over_weak_link": [("update_over_weak_link", ["--quick"])],
}


def missed(result: dict[str, Any]) -> list[str]:
    return [r["metric"] for r in result.get("rows", []) if r.get("met") is False]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes and short windows")
    p.add_argument("--only", default="", help="comma-separated benchmark names")
    p.add_argument("--results", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    plan = QUICK if args.quick else FULL
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(plan)
    unknown = [n for n in names if n not in plan]
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(plan)}")
    args.results.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"quick": args.quick, "runs": []}
    failed = 0
    for name in names:
        script = HERE / f"{name}.py"
        if not script.exists():
            print(f"== {name}: {script.name} not present, skipped", flush=True)
            summary["runs"].append({"name": name, "status": "absent"})
            continue
        for stem, extra in plan[name]:
            out = args.results / f"{stem}.json"
            out.unlink(missing_ok=True)
            cmd = [sys.executable, str(script), *extra, "--json", str(out)]
            print(f"\n== {stem}: {' '.join(cmd[1:])}", flush=True)
            t0 = time.monotonic()
            code = subprocess.call(cmd, cwd=HERE.parent)
            run: dict[str, Any] = {
                "name": stem,
                "exit_code": code,
                "seconds": round(time.monotonic() - t0, 1),
            }
            if code == 0 and out.exists():
                result = json.loads(out.read_text())
                run["status"] = "ok"
                run["missed"] = missed(result)
                run["result"] = result
            else:
                run["status"] = "failed"
                failed += 1
            summary["runs"].append(run)
    (args.results / "all.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n== summary")
    for run in summary["runs"]:
        detail = ""
        if run["status"] == "ok":
            detail = "all targets met" if not run["missed"] else "MISSED: " + "; ".join(run["missed"])
        print(f"{run['name']:<34} {run['status']:<7} {run.get('seconds', '')!s:>7} s  {detail}")
    print(f"results in {args.results}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
