"""The per-device usage ring behind ``devices.metrics`` and the dashboard's charts (pure)."""

from __future__ import annotations

import pytest
from tether.controller.metrics_history import CARRY, SLOTS, STEP_S, MetricsHistory, Ring, percents

T0 = 1_700_000_100.0 - 1_700_000_100.0 % STEP_S  # the start of a bucket


def test_a_bucket_holds_the_mean_of_its_samples_in_percent() -> None:
    """Samples in one 5-minute bucket average; memory and disk are % of their totals."""
    ring = Ring()
    ring.add(T0 + 1, percents({"cpu": 10.0, "mem": 1, "mem_total": 4, "disk": 3, "disk_total": 4}))
    ring.add(T0 + 200, percents({"cpu": 30.0, "mem": 3, "mem_total": 4, "disk": None, "disk_total": 4}))
    start, series = ring.series(T0 + 250)
    assert start == T0 - (SLOTS - 1) * STEP_S
    assert [len(v) for v in series.values()] == [SLOTS] * 3
    assert series["cpu"][-1] == pytest.approx(20.0) and series["mem"][-1] == pytest.approx(50.0)
    assert series["disk"][-1] == pytest.approx(75.0)  # the one sample that had it
    assert series["cpu"][:-1] == [None] * (SLOTS - 1)


def test_many_samples_in_a_bucket_keep_an_accurate_mean() -> None:
    """A live follow's 300 samples a bucket do not drift the stored mean (hundredths of a %)."""
    ring = Ring()
    values = [float(i % 97) for i in range(300)]
    for i, v in enumerate(values):
        ring.add(T0 + i * 0.9, (v, None, None))
    assert ring.series(T0)[1]["cpu"][-1] == pytest.approx(sum(values) / len(values), abs=0.05)


def test_gaps_carry_at_most_three_points_then_show_and_old_points_roll_off() -> None:
    """A quiet device's point carries over CARRY empty buckets, then a gap; after SLOTS buckets it is gone."""
    ring = Ring()
    ring.add(T0, (50.0, None, None))
    cpu = ring.series(T0 + (CARRY + 2) * STEP_S)[1]["cpu"]
    assert cpu[-(CARRY + 3) :] == [50.0] * (CARRY + 1) + [None, None]
    ring.add(T0 + 10 * STEP_S, (70.0, None, None))
    cpu = ring.series(T0 + 10 * STEP_S)[1]["cpu"]
    assert cpu[-11] == 50.0 and cpu[-1] == 70.0 and cpu[-6] is None
    ring.add(T0 - STEP_S, (99.0, None, None))  # older than the latest bucket: dropped
    assert 99.0 not in ring.series(T0 + 10 * STEP_S)[1]["cpu"]
    later = T0 + (10 + SLOTS) * STEP_S
    ring.add(later, (1.0, None, None))
    assert [p for p in ring.series(later)[1]["cpu"] if p is not None] == [1.0]


def test_the_history_is_bounded_in_devices_and_clamps_values() -> None:
    """At most max_devices rings; values outside 0..100 are clamped, not wrapped."""
    history = MetricsHistory(max_devices=2)
    for d in ("a", "b", "c"):
        history.add(d, T0, {"cpu": 250.0})
    assert sorted(history.rings) == ["a", "b"] and history.series("c", T0) is None
    found = history.series("a", T0)
    assert found is not None and found[1]["cpu"][-1] == 100.0
