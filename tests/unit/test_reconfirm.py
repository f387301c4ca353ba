"""controller/reconfirm.py: which devices must show life again after the controller reconnects."""

from __future__ import annotations

from tether.controller.reconfirm import GRACE_S, Reconfirm


def test_newer_session_or_answer_confirms_and_the_rest_expire() -> None:
    """A newer session or an answer confirms a device; the same session (the broker's
    retained word) does not; the silent one is due at its deadline, once."""
    r = Reconfirm()
    assert r.start([("a", 3, 60.0), ("b", 5, 60.0), ("c", 1, 70.0)], now=0.0) == 3
    assert r.heard("a", 3) is False and len(r) == 3  # a restored retained online: not life
    asks = dict(r.asks(GRACE_S))  # quiet from the start
    assert sorted(asks.values()) == ["a", "b", "c"] and len(set(asks)) == 3
    assert r.heard("a", 4) is False and len(r) == 2
    by_device = {d: i for i, d in asks.items()}
    assert r.answered("unknown-id") is False
    assert r.answered(by_device["b"]) is False and len(r) == 1
    assert r.answered(by_device["b"]) is False  # answered twice: counted once
    assert r.due(69.9) == []
    assert r.due(70.0) == [("c", 1)]
    assert r.due(80.0) == [] and len(r) == 0


def test_only_devices_silent_once_quiet_are_asked_a_chunk_at_a_time() -> None:
    """Nothing is asked while devices keep showing life (each restarts the grace); then only
    devices not heard from, at most ``limit`` per call, each once, in order."""
    r = Reconfirm()
    r.start([(f"d{i}", 1, 100.0 + 60.0) for i in range(5)], now=100.0)
    assert r.asks(100.0 + GRACE_S - 0.1) == []
    assert r.heard("d1", 2) is False  # showed life on its own: never asked
    assert r.asks(100.0 + GRACE_S) == []  # ... and restarted the grace
    assert r.asks(100.0 + 2 * GRACE_S - 0.1) == []
    first = r.asks(100.0 + 2 * GRACE_S, limit=2)
    assert [d for _, d in first] == ["d0", "d2"]
    assert r.heard("d3", 2) is False  # heard before its turn came
    assert [d for _, d in r.asks(111.0, limit=2)] == ["d4"]
    assert r.asks(112.0) == []  # each asked once


def test_a_fleet_that_never_falls_quiet_is_asked_half_way_to_the_deadline() -> None:
    """Devices showing life every tick do not put asking off past half the shortest allowance."""
    r = Reconfirm()
    r.start([(f"d{i}", 1, 40.0 if i == 0 else 80.0) for i in range(30)], now=0.0)
    for t in range(20):
        r.heard(f"d{t + 1}", 2)
        assert r.asks(float(t)) == []
    assert [d for _, d in r.asks(20.0)] == ["d0", *(f"d{i}" for i in range(21, 30))]


def test_last_confirmation_says_so_and_a_new_start_replaces_the_old() -> None:
    """The last device to show life returns True; a reconnection starts over from the new list."""
    r = Reconfirm()
    r.start([("a", 1, 50.0)], now=0.0)
    r.start([("b", 2, 90.0)], now=0.0)
    assert r.due(60.0) == []  # "a" is no longer waited for
    assert [d for _, d in r.asks(GRACE_S)] == ["b"]
    assert r.heard("b", 3) is True and len(r) == 0
    assert r.start([], now=0.0) == 0 and r.asks(GRACE_S) == []
