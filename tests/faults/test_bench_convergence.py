"""bench/convergence.py still runs: 1 and 5 real agents through a short outage (not a timed test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "convergence.py"

pytestmark = pytest.mark.e2e


@pytest.mark.usefixtures("fleet_prerequisites")
def test_convergence_benchmark_smoke(tmp_path: Path, backend_name: str) -> None:
    """The benchmark heals a 5 s outage of 1 and of 5 agents, prints its table and writes
    JSON in which every agent converged."""
    out = tmp_path / "convergence.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--agents", "5", "--hold", "5", "--timeout", "60",
         "--backend", backend_name, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=BENCH.parents[1],
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "all converged" in result.stdout
    data = json.loads(out.read_text())
    assert data["benchmark"] == "convergence" and data["backend"] == backend_name
    assert [r["agents"] for r in data["runs"]] == [1, 5]
    for run in data["runs"]:
        assert run["converged_s"]["missing"] == 0 and run["converged_s"]["last"] is not None
