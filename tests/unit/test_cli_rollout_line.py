"""The CLI's one line per device under --wait: the state said once, the download's progress, the countdown."""

from __future__ import annotations

from tether.cli.deployments import _rollout_line


def test_a_downloading_device_says_downloading_once() -> None:
    """``downloading (batch 1): 43% (...)``, not ``downloading (batch 1), downloading 43% (...)``;
    other states keep the progress after a comma, and the countdown follows."""
    row = {"state": "downloading", "batch": 1, "progress": "downloading 43% (3.4 of 8.0 MB)"}
    assert _rollout_line(row, 10) == "downloading (batch 1): 43% (3.4 of 8.0 MB)"
    assert _rollout_line({**row, "progress": "downloading"}, 10) == "downloading (batch 1)"
    updating = {"state": "updating", "batch": 2, "progress": "downloading", "healthy_in": 7.2}
    assert _rollout_line(updating, 10) == "updating (batch 2), downloading, healthy in 8s"
    assert _rollout_line({"state": "pending", "batch": 0}, 10) == "pending"
