"""The benchmarks still run: each one in a small, fast configuration (not a timed test).

The figures are not checked against targets here (a loaded CI machine is no benchmark
machine); only that each benchmark completes, writes its JSON and measured what it says.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support.infra import MOSQUITTO_BIN

BENCH = Path(__file__).resolve().parent.parent / "bench"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.mosquitto,
    pytest.mark.skipif(not os.access(MOSQUITTO_BIN, os.X_OK), reason="mosquitto not installed"),
]


def bench(tmp_path: Path, name: str, *args: str, timeout: float = 120) -> dict[str, Any]:
    out = tmp_path / f"{name}.json"
    result = subprocess.run(
        [sys.executable, str(BENCH / f"{name}.py"), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=BENCH.parent,
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "metric" in result.stdout  # the table
    data: dict[str, Any] = json.loads(out.read_text())
    assert data["benchmark"] == name and data["rows"] and data["machine"]["cores"]
    return data


def test_deploy_latency(tmp_path: Path) -> None:
    data = bench(tmp_path, "deploy_latency", "--devices", "30", "--timeout", "60")
    assert data["registration"]["simulator_cpu_s"] > 0 and data["registration"]["mosquitto_cpu_s"] >= 0
    for deploy in data["deploys"]:
        assert deploy["applied"]["count"] == 30 and deploy["applied"]["missing"] == 0
        assert deploy["controller_sees_all_running_s"] is not None


def test_deploy_latency_embedded_broker(tmp_path: Path) -> None:
    data = bench(tmp_path, "deploy_latency", "--devices", "20", "--broker", "embedded", "--timeout", "60")
    assert all(d["applied"]["missing"] == 0 for d in data["deploys"])


def test_reconnect_storm(tmp_path: Path) -> None:
    data = bench(tmp_path, "reconnect_storm", "--devices", "30", "--timeout", "60", "--settle", "0.5")
    assert data["not_reconnected"] == 0 and data["all_converged_s"] is not None
    assert data["controller_sees_all_s"] is not None and data["peak_connacks_per_s"] > 0


def test_controller_capacity(tmp_path: Path) -> None:
    data = bench(
        tmp_path, "controller_capacity", "--devices", "30", "--window", "2", "--settle", "0.5", "--runs", "1"
    )
    assert data["devices_ls_rows"] == 30 and data["reporting"]["store_writes"] > 30


def test_controller_cpu(tmp_path: Path) -> None:
    """The in-process replay registers every device and takes both deploys to succeeded."""
    data = bench(tmp_path, "controller_cpu", "--devices", "40", "--ticks", "2")
    assert [d["deployment"] for d in data["deploys"]] == ["succeeded", "succeeded"]
    assert all(d["devices_sent_desired"] == 40 and d["cpu_s"] > 0 for d in data["deploys"])
    assert data["store_rows"]["devices"] == 40 and data["store_rows"]["reported"] == 40


def test_sim_cpu(tmp_path: Path) -> None:
    """A recorded deploy replayed into simulated devices: each applies it with one report, its CPU measured."""
    data = bench(tmp_path, "sim_cpu", "--devices", "40", "--watch", "0.5")
    # desired state, definition
    assert [d["messages_per_device"] >= 2 for d in data["deploys"]] == [True, True]
    assert all(d["cpu_s"] > 0 and d["reconciles"] >= 40 for d in data["deploys"])
    # Per device: online presence and a report on connecting; per deploy one message of events
    # (a batch: the acceptance and three service.created), and one report (the services running).
    assert data["messages_out"] == 40 * (2 + 2 * 2)


def test_ui_devices(tmp_path: Path) -> None:
    """The dashboard's device list is fetched over HTTP after logging in, each page saying what it should."""
    data = bench(tmp_path, "ui_devices", "--devices", "30", "--repeat", "1")
    assert data["devices"] == 30 and set(data["timings_s"]) >= {"first page", "search by id", "overview"}
    assert all(len(v) == 1 and v[0] > 0 for v in data["timings_s"].values())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_bandwidth(tmp_path: Path) -> None:
    data = bench(tmp_path, "bandwidth", "--window", "2", "--quiet", "1.5")
    for name in ("plain-60-nometrics", "tls-60-nometrics"):
        assert data["new_stack"][name]["app_up"] > 0 and data["new_stack"][name]["app_down"] > 0
    plain = data["noop_redeploy"]["plain-60-nometrics"]["mqtt_packets"]
    assert not [k for k in plain if k.startswith("down ") and k != "down PINGRESP"]


@pytest.mark.docker
def test_footprint(tmp_path: Path, busybox_image: str) -> None:
    data = bench(tmp_path, "footprint", "--window", "2", "--settle", "1", "--no-install-size")
    assert data["rss_mb"] > 0 and data["uss_mb"] > 0 and data["floor"]["rss_mb"] > 0


def test_run_all_collects_results(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(BENCH / "run_all.py"),
            "--quick",
            "--only",
            "deploy_latency",
            "--results",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "all.json").read_text())
    assert [r["status"] for r in summary["runs"]] == ["ok"]


@pytest.mark.docker
def test_update_over_weak_link(tmp_path: Path, busybox_image: str) -> None:
    """The smoke scenario (200 KB, no cuts): both contestants update, and the figures are there."""
    from support.registry import registry_available

    if registry_available():
        pytest.skip(str(registry_available()))
    data = bench(tmp_path, "update_over_weak_link", "--smoke", timeout=120)
    assert list(data["results"]) == ["smoke"]
    run = data["results"]["smoke"]
    assert run["tether"]["succeeded"] and run["tether"]["bytes_ratio"] >= 1.0
    assert run["baseline"]["converge_s"] is not None and run["baseline"]["outage_longest_s"] > 0


def test_fleet_scale_on_bridged_edge_brokers(tmp_path: Path) -> None:
    """300 devices on 2 edge Mosquittos bridged to the controller's: every device registers,
    is seen online and applies both deploys, comes back after the edge brokers restart, and
    wills and retained desired states cross the bridge (bench/fleet_scale.py)."""
    data = bench(
        tmp_path,
        "fleet_scale",
        "--devices",
        "300",
        "--edge-brokers",
        "2",
        "--settle",
        "0.2",
        "--timeout",
        "60",
    )
    assert data["controller_shows_online"] == 300
    assert all(d["all_applied_s"] is not None and d["controller_sees_all_running_s"] for d in data["deploys"])
    storm = data["storm"]
    assert storm["devices_not_connected"] == 0 and storm["controller_sees_all_back_s"] is not None
    checks = data["bridge_checks"]
    m = checks["devices"]
    assert m == 150 and checks["wills_shown_offline"] == m and checks["desired_retained_on_edge"] == m
    assert (
        checks["restarted_converged_from_retained"] == m and checks["controller_sees_restarted_in_step"] == m
    )


def test_mqtt_client_cpu(tmp_path: Path) -> None:
    """bench/mqtt_client_cpu.py runs and reports its CPU figures per run, each above zero."""
    data = bench(tmp_path, "mqtt_client_cpu", "--messages", "300", "--runs", "2", timeout=60)
    for key in ("received_us", "published_us", "publish_caller_us"):
        assert len(data[key]) == 2 and all(v > 0 for v in data[key])


def test_deployment_step(tmp_path: Path) -> None:
    """One deployment step timed at each share of devices changed; the deployment still running."""
    data = bench(tmp_path, "deployment_step", "--devices", "40", "--reps", "2")
    assert [s["devices_changed"] for s in data["shares"]] == [0, 0, 4, 40]
    assert data["deployment"] == "running" and all(s["ms_converging"] > 0 for s in data["shares"])


def test_devices_page(tmp_path: Path) -> None:
    """bench/devices_page.py times every kind of page at a small fleet; the first page is full."""
    data = bench(tmp_path, "devices_page", "--devices", "1200", "--repeat", "1", timeout=60)
    (run,) = data["runs"]
    assert run["first_page_rows"] == 1000 and len(run["ms"]) == 6 and all(ms > 0 for ms in run["ms"].values())
