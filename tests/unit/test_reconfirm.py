"""controller/reconfirm.py: which devices must show life again after the controller reconnects."""

from __future__ import annotations

from tether.controller.reconfirm import ASK_AFTER_S, Reconfirm


def test_newer_session_or_answer_confirms_and_the_rest_expire() -> None:
    """A newer session or an answer confirms a device; the same session (the broker's
    retained word) does not; the silent one is due at its deadline, once."""
    r = Reconfirm()
    assert r.start([("a", 3, 60.0), ("b", 5, 60.0), ("c", 1, 70.0)], now=0.0) == 3
    assert r.heard("a", 3) is False and len(r) == 3  # a restored retained online: not life
    asks = dict(r.asks(20.0))  # a third of the way to the earliest deadline
    assert sorted(asks.values()) == ["a", "b", "c"] and len(set(asks)) == 3
    assert r.heard("a", 4) is False and len(r) == 2
    by_device = {d: i for i, d in asks.items()}
    assert r.answered("unknown-id") is False
    assert r.answered(by_device["b"]) is False and len(r) == 1
    assert r.answered(by_device["b"]) is False  # answered twice: counted once
    assert r.due(69.9) == []
    assert r.due(70.0) == [("c", 1)]
    assert r.due(80.0) == [] and len(r) == 0


def test_only_devices_still_silent_are_asked_later_a_chunk_at_a_time() -> None:
    """Nothing is asked before ASK_AFTER_S; then only devices not heard from, at most
    ``limit`` per call, each once, in order."""
    r = Reconfirm()
    r.start([(f"d{i}", 1, 100.0 + 1000.0) for i in range(5)], now=100.0)
    assert r.asks(100.0 + ASK_AFTER_S - 0.1) == []
    assert r.heard("d1", 2) is False  # reconnected on its own: never asked
    first = r.asks(100.0 + ASK_AFTER_S, limit=2)
    assert [d for _, d in first] == ["d0", "d2"]
    assert r.heard("d3", 2) is False  # heard before its turn came
    assert [d for _, d in r.asks(200.0, limit=2)] == ["d4"]
    assert r.asks(201.0) == []  # each asked once


def test_a_short_allowance_is_asked_a_third_of_the_way() -> None:
    """Asking waits at most a third of the shortest allowance: two thirds are left for answers."""
    r = Reconfirm()
    r.start([("a", 1, 30.0), ("b", 1, 300.0)], now=0.0)
    assert r.asks(9.9) == []
    assert sorted(d for _, d in r.asks(10.0)) == ["a", "b"]


def test_last_confirmation_says_so_and_a_new_start_replaces_the_old() -> None:
    """The last device to show life returns True; a reconnection starts over from the new list."""
    r = Reconfirm()
    r.start([("a", 1, 50.0)], now=0.0)
    r.start([("b", 2, 90.0)], now=0.0)
    assert r.due(60.0) == []  # "a" is no longer waited for
    assert [d for _, d in r.asks(30.0)] == ["b"]
    assert r.heard("b", 3) is True and len(r) == 0
    assert r.start([], now=0.0) == 0 and r.asks(30.0) == []
