"""Device metrics: what is worth sending (pure), what receivers make of it, the wire size."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tether.agent.metrics import Reporter, Sampler, Values, changes, cpu_times, disk, memory
from tether.protocol import codec
from tether.protocol.device_api import MetricsSample, merge_sample

GIB = 1024**3
BASE = Values(
    cpu=10.0,
    mem=2 * GIB,
    mem_total=8 * GIB,
    disk=50 * GIB,
    disk_total=100 * GIB,
    containers={"s/a": (1.0, GIB)},
)


def moved(**kw: object) -> Values:
    return Values(**{**BASE.__dict__, **kw})  # type: ignore[arg-type]


def test_nothing_sent_yet_means_every_known_field() -> None:
    """With nothing sent before, every field that has a value is sent, and unknown ones are not."""
    assert changes(None, BASE, 5.0) == {"cpu", "mem", "mem_total", "disk", "disk_total", "containers"}
    assert changes(None, Values(cpu=1.0), 5.0) == {"cpu"}


def test_values_within_the_threshold_are_not_sent() -> None:
    """CPU +5 points, memory and disk +5 % of their totals: nothing moved *beyond* the threshold."""
    same = moved(cpu=15.0, mem=int(2.4 * GIB), disk=55 * GIB, containers={"s/a": (6.0, int(1.4 * GIB))})
    assert changes(BASE, same, 5.0) == set()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("cpu", 15.1),
        ("cpu", 4.9),
        ("mem", int(2.41 * GIB)),
        ("disk", 44 * GIB),
    ],
)
def test_a_value_beyond_the_threshold_is_sent_alone(field: str, value: float) -> None:
    """CPU in percentage points, memory and disk in % of their totals; only that field goes."""
    assert changes(BASE, moved(**{field: value}), 5.0) == {field}


def test_totals_are_sent_on_any_change() -> None:
    """A total that changed at all (memory hot-plug, a resized filesystem) is sent."""
    assert changes(BASE, moved(mem_total=8 * GIB + 4096), 5.0) == {"mem_total"}
    assert changes(BASE, moved(disk_total=101 * GIB), 5.0) == {"disk_total"}


def test_instances_are_sent_whole_when_one_moved_or_the_set_changed() -> None:
    """A service that appeared or went, or one whose CPU or memory moved, sends the whole map."""
    assert changes(BASE, moved(containers={"s/a": (1.0, GIB), "s/b": (0.0, 1)}), 5.0) == {"containers"}
    assert changes(BASE, moved(containers={}), 5.0) == {"containers"}
    assert changes(BASE, moved(containers={"s/a": (7.0, GIB)}), 5.0) == {"containers"}
    assert changes(BASE, moved(containers={"s/a": (1.0, int(1.5 * GIB))}), 5.0) == {"containers"}
    assert changes(BASE, moved(containers={"s/a": (None, GIB)}), 5.0) == set()


def test_unknown_values_keep_what_was_sent() -> None:
    """A value that cannot be read now (None) is not sent as a change."""
    assert changes(BASE, Values(), 5.0) == set()


def test_threshold_zero_sends_every_change_and_nothing_else() -> None:
    """With threshold 0 any difference is sent; identical values are not."""
    assert changes(BASE, BASE, 0.0) == set()
    assert changes(BASE, moved(cpu=10.1), 0.0) == {"cpu"}


def test_reporter_sends_full_then_only_what_moved_then_full_again() -> None:
    """Full first; then deltas only beyond the threshold; full again after full_interval."""
    reporter = Reporter(threshold=5.0, full_interval=900.0)
    first = reporter.decide(BASE, at=1.0, now=0.0)
    assert first is not None and first.full and first.cpu == 10.0 and first.containers == {"s/a": (1.0, GIB)}
    assert reporter.decide(moved(cpu=12.0), at=61.0, now=60.0) is None
    delta = reporter.decide(moved(cpu=30.0), at=121.0, now=120.0)
    assert delta is not None and not delta.full
    assert delta.model_dump(exclude_none=True).keys() == {"v", "at", "full", "cpu"}
    assert reporter.decide(moved(cpu=30.0), at=900.0, now=899.0) is None
    again = reporter.decide(moved(cpu=30.0), at=901.0, now=1000.0)
    assert again is not None and again.full


def test_reporter_compares_with_what_it_sent_so_a_drift_adds_up() -> None:
    """Small steps each under the threshold are sent once their sum passes it."""
    reporter = Reporter(threshold=5.0, full_interval=900.0)
    reporter.decide(BASE, at=0.0, now=0.0)
    sent = [reporter.decide(moved(cpu=10.0 + 2 * step), at=step, now=step) for step in range(1, 5)]
    assert [s.cpu if s else None for s in sent] == [None, None, 16.0, None]


def test_reporter_sends_full_after_a_lost_publish() -> None:
    """After forget() (the publish failed) the next sample is full, whatever moved."""
    reporter = Reporter(threshold=5.0, full_interval=900.0)
    reporter.decide(BASE, at=0.0, now=0.0)
    reporter.forget()
    sample = reporter.decide(BASE, at=1.0, now=1.0)
    assert sample is not None and sample.full


def test_merge_keeps_fields_a_delta_leaves_out_and_a_full_sample_replaces() -> None:
    """Receivers: a delta updates what it carries, containers whole; a full sample starts afresh."""
    full = MetricsSample(at=1.0, full=True, cpu=5.0, mem=10, mem_total=100, containers={"s/a": (1.0, 2)})
    merged = merge_sample(None, full, received=2.0)
    assert merged["cpu"] == 5.0 and merged["full_at"] == 1.0 and merged["containers"] == {"s/a": [1.0, 2]}
    merged = merge_sample(merged, MetricsSample(at=3.0, cpu=50.0, containers={}), received=4.0)
    assert merged["cpu"] == 50.0 and merged["mem"] == 10 and merged["containers"] == {}
    assert merged["at"] == 3.0 and merged["full_at"] == 1.0 and merged["received"] == 4.0
    fresh = merge_sample(merged, MetricsSample(at=5.0, full=True, cpu=1.0), received=6.0)
    assert fresh["mem"] is None and fresh["full_at"] == 5.0


def test_samples_are_compact_on_the_wire() -> None:
    """Fields that are None are left out: a one-field delta is a few dozen bytes."""
    delta = MetricsSample(at=1_700_000_000.123, cpu=42.5)
    data = codec.encode(delta, compact=True)
    assert len(data) < 40
    assert codec.decode(data, MetricsSample) == delta
    full = MetricsSample(
        at=1_700_000_000.0, full=True, cpu=1.0, mem=GIB, mem_total=8 * GIB, disk=GIB, disk_total=GIB,
        containers={"web/app": (0.5, 12 * 1024 * 1024)},
    )  # fmt: skip
    assert len(codec.encode(full, compact=True)) < 160


def test_sampler_reads_this_host(tmp_path: Path) -> None:
    """The real /proc and statvfs: totals match the host, CPU is a percentage, usage is per key."""
    sampler = Sampler(tmp_path, usage=lambda: {"s/a": (1.0, 4096)})
    values = sampler.sample()
    total, available = memory()
    assert values.mem_total == total and available is not None and total is not None
    assert (
        values.disk_total
        == disk(tmp_path)[0]
        == os.statvfs(tmp_path).f_blocks * os.statvfs(tmp_path).f_frsize
    )
    assert values.cpu is None or 0.0 <= values.cpu <= 100.0
    assert cpu_times() is not None
    assert values.containers == {"s/a": (0.0, 4096)}
