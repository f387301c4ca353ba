"""The per-device usage ring behind ``devices.metrics`` and the dashboard's charts (pure)."""

from __future__ import annotations

import pytest
from tether.controller.metrics_history import CARRY, SLOTS, STEP_S, MetricsHistory

T0 = 1_700_000_100.0 - 1_700_000_100.0 % STEP_S  # the start of a bucket


def _cpu(history: MetricsHistory, device: str, now: float) -> list[float | None]:
    found = history.series(device, now)
    assert found is not None
    return found[1]["cpu"]


def test_a_bucket_holds_the_mean_of_its_samples_in_percent() -> None:
    """Samples in one 5-minute bucket average; memory and disk are % of their totals."""
    history = MetricsHistory(10)
    history.add("d", T0 + 1, {"cpu": 10.0, "mem": 1, "mem_total": 4, "disk": 3, "disk_total": 4})
    history.add("d", T0 + 200, {"cpu": 30.0, "mem": 3, "mem_total": 4, "disk": None, "disk_total": 4})
    found = history.series("d", T0 + 250)
    assert found is not None
    start, series = found
    assert start == T0 - (SLOTS - 1) * STEP_S
    assert [len(v) for v in series.values()] == [SLOTS] * 3
    assert series["cpu"][-1] == 20.0 and series["mem"][-1] == 50.0
    assert series["disk"][-1] == 75.0  # the one sample that had it
    assert series["cpu"][:-1] == [None] * (SLOTS - 1)


def test_many_samples_in_a_bucket_keep_an_accurate_mean() -> None:
    """A live follow's 300 samples a bucket average exactly (to the half percent stored)."""
    history = MetricsHistory(10)
    values = [float(i % 97) + 0.3 for i in range(300)]
    for i, v in enumerate(values):
        history.add("d", T0 + i * 0.9, {"cpu": v})
    assert _cpu(history, "d", T0)[-1] == pytest.approx(sum(values) / len(values), abs=0.25)


def test_gaps_carry_at_most_three_points_then_show_and_old_points_roll_off() -> None:
    """A quiet device's point carries over CARRY empty buckets, then a gap; after SLOTS buckets it is gone."""
    history = MetricsHistory(10)
    history.add("d", T0, {"cpu": 50.0})
    cpu = _cpu(history, "d", T0 + (CARRY + 2) * STEP_S)
    assert cpu[-(CARRY + 3) :] == [50.0] * (CARRY + 1) + [None, None]
    history.add("d", T0 + 10 * STEP_S, {"cpu": 70.0})
    cpu = _cpu(history, "d", T0 + 10 * STEP_S)
    assert cpu[-11] == 50.0 and cpu[-1] == 70.0 and cpu[-6] is None
    history.add("d", T0 - STEP_S, {"cpu": 99.0})  # older than the latest bucket: dropped
    assert 99.0 not in _cpu(history, "d", T0 + 10 * STEP_S)
    later = T0 + (10 + SLOTS) * STEP_S
    history.add("d", later, {"cpu": 1.0})
    assert [p for p in _cpu(history, "d", later) if p is not None] == [1.0]


def test_the_history_is_bounded_clamps_values_and_reuses_forgotten_slots() -> None:
    """At most max_devices rings; values outside 0..100 are clamped; a forgotten device's slot
    comes back empty to the next device."""
    history = MetricsHistory(max_devices=2)
    for d in ("a", "b", "c"):
        history.add(d, T0, {"cpu": 250.0})
    assert sorted(history.rings) == ["a", "b"] and history.series("c", T0) is None
    assert _cpu(history, "a", T0)[-1] == 100.0
    history.forget("a")
    history.add("c", T0 + STEP_S, {"cpu": 3.0})
    assert history.series("a", T0) is None and sorted(history.rings) == ["b", "c"]
    assert [p for p in _cpu(history, "c", T0 + STEP_S) if p is not None] == [3.0]
    assert _cpu(history, "b", T0)[-1] == 100.0


def test_a_device_costs_a_few_hundred_bytes() -> None:
    """1,000 devices' rings (allocated whole at a device's first sample, so filling them adds
    nothing) stay under 450 bytes a device, ids aside: 10,000 fit in a few MB."""
    import tracemalloc

    ids = [f"device-{d:05d}" for d in range(1000)]
    sample = {"cpu": 12.5, "mem": 1, "mem_total": 2, "disk": 1, "disk_total": 8}
    tracemalloc.start()
    try:
        history = MetricsHistory(max_devices=100_000)
        for device in ids:
            history.add(device, T0, sample)
        used, _ = tracemalloc.get_traced_memory()
        for t in range(1, SLOTS):
            history.add(ids[-1], T0 + t * STEP_S, sample)
        filled, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert used / len(ids) < 450 and filled - used < 1000, (used, filled)
    assert _cpu(history, ids[-1], T0 + (SLOTS - 1) * STEP_S) == [12.5] * SLOTS
