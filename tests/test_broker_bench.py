"""The broker benchmark runs at CI scale and reports a clean fixed broker."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[1] / "bench" / "broker_bench.py"


def test_broker_bench_at_ci_scale(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    result = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--devices",
            "30",
            "--broker",
            "embedded",
            "--phase-timeout",
            "20",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "connect+subscribe storm" in result.stdout
    report = json.loads(out.read_text())
    assert report["benchmark"] == "broker_bench"
    assert all(row["met"] is not False for row in report["rows"]), report["rows"]
    (data,) = report["results"]
    assert data["broker"] == "embedded" and data["devices"] == 30
    assert data["storm_subscribed"] == 30 and data["storm_retained_received"] == 30
    assert data["update_received"] == 30 and data["replay_received"] == 30
    assert data["unsolicited"] == 0 and data["dropped"] == 0 and data["connect_failures"] == 0
    assert data["rss_after_storm_mb"] > 0
    assert data["broker_log"]["errors"] == 0
