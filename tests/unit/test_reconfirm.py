"""controller/reconfirm.py: which devices must show life again after the controller reconnects."""

from __future__ import annotations

from tether.controller.reconfirm import Reconfirm


def test_newer_session_or_answer_confirms_and_the_rest_expire() -> None:
    """A newer session or an answer confirms a device; the same session (the broker's
    retained word) does not; the silent one is due at its deadline, once."""
    r = Reconfirm()
    asks = dict(r.start([("a", 3, 10.0), ("b", 5, 10.0), ("c", 1, 20.0)]))
    assert sorted(asks.values()) == ["a", "b", "c"] and len(set(asks)) == 3
    assert r.heard("a", 3) is False and len(r) == 3  # a restored retained online: not life
    assert r.heard("a", 4) is False and len(r) == 2
    by_device = {d: i for i, d in asks.items()}
    assert r.answered("unknown-id") is False
    assert r.answered(by_device["b"]) is False and len(r) == 1
    assert r.answered(by_device["b"]) is False  # answered twice: counted once
    assert r.due(19.9) == []
    assert r.due(20.0) == [("c", 1)]
    assert r.due(30.0) == [] and len(r) == 0


def test_last_confirmation_says_so_and_a_new_start_replaces_the_old() -> None:
    """The last device to show life returns True; a reconnection starts over from the new list."""
    r = Reconfirm()
    r.start([("a", 1, 5.0)])
    r.start([("b", 2, 9.0)])
    assert r.due(6.0) == []  # "a" is no longer waited for
    assert r.heard("b", 3) is True and len(r) == 0
    assert r.start([]) == []
