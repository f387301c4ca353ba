"""controller/reconfirm.py: which devices must show life again after the controller reconnects."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from tether.controller.reconfirm import (
    ANSWER_S,
    ASK_AFTER_S,
    ASK_RATE_MAX,
    ASK_RATE_MIN,
    Reconfirm,
    ask_rate,
)


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


def test_only_devices_still_silent_are_asked_later_a_seconds_worth_at_a_time() -> None:
    """Nothing is asked before ASK_AFTER_S; then only devices not heard from, ``rate`` turns
    a second (a second's worth at once, missed seconds caught up), each once, in order."""
    n = 3 * ASK_RATE_MIN
    r = Reconfirm()
    r.start([(f"d{i}", 1, 100.0 + 1000.0) for i in range(n)], now=100.0)
    assert r.rate == ASK_RATE_MIN  # 3,000 within hundreds of seconds: the floor
    assert r.asks(100.0 + ASK_AFTER_S - 0.1) == []
    assert r.heard("d1", 2) is False  # reconnected on its own: never asked
    first = [d for _, d in r.asks(100.0 + ASK_AFTER_S)]
    assert first[:2] == ["d0", "d2"] and len(first) == ASK_RATE_MIN - 1  # d1's turn passed
    assert r.asks(100.0 + ASK_AFTER_S + 0.9) == []  # the next second's turns not yet
    assert r.heard(f"d{ASK_RATE_MIN}", 2) is False  # heard before its turn came
    late = [d for _, d in r.asks(100.0 + ASK_AFTER_S + 5.0)]  # a late call: the rest at once
    assert len(late) == n - ASK_RATE_MIN - 1 and late[0] == f"d{ASK_RATE_MIN + 1}"
    assert r.asks(300.0) == []  # each asked once


def test_a_short_allowance_is_asked_a_third_of_the_way() -> None:
    """Asking waits at most a third of the shortest allowance."""
    r = Reconfirm()
    r.start([("a", 1, 30.0), ("b", 1, 300.0)], now=0.0)
    assert r.asks(9.9) == []
    assert sorted(d for _, d in r.asks(10.0)) == ["a", "b"]


def test_a_large_fleet_with_the_shortest_allowance_is_asked_within_it() -> None:
    """100,000 devices with a 37.5 s allowance (keepalive 5 s) are all asked within half of
    what is left after the wait, and none is due before its deadline: 1,000 a second would
    have taken 100 s, and expired most of them unasked."""
    n, allowance = 100_000, 1.5 * 5 + 30
    r = Reconfirm()
    r.start([(f"d{i}", 1, allowance) for i in range(n)], now=0.0)
    assert r.rate == 8000
    ask_from = allowance / 3
    asked, last = 0, 0.0
    for k in range(100):
        t = ask_from + k
        got = len(r.asks(t))
        if got:
            asked, last = asked + got, t
    assert asked == n and last <= ask_from + (allowance - ask_from) / 2  # the last asked by 25 s
    assert r.due(allowance - 0.01) == []
    assert len(r.due(allowance)) == n  # none answered


def test_beyond_the_cap_the_will_waits_for_the_turn_and_the_answer() -> None:
    """When the cap makes asking outlast the allowance, a device is due only ANSWER_S after
    it was asked (ticks asking, then expiring, as the controller's do), never unasked."""
    n = 40 * ASK_RATE_MAX
    r = Reconfirm()
    r.start([(f"d{i}", 1, 37.5) for i in range(n)], now=0.0)
    assert r.rate == ASK_RATE_MAX
    asked_at: dict[str, float] = {}
    due_at: dict[str, float] = {}
    for k in range(80):
        t = 12.5 + k
        asked_at.update((d, t) for _, d in r.asks(t))
        due_at.update((d, t) for d, _ in r.due(t))
    assert len(due_at) == n and len(r) == 0
    assert all(t >= 37.5 and t >= asked_at[d] + ANSWER_S for d, t in due_at.items())
    assert max(asked_at.values()) == 12.5 + 39  # 10,000 a second: 40 seconds' worth
    assert due_at["d0"] == 37.5 and due_at[f"d{n - 1}"] == 12.5 + 39 + ANSWER_S


def test_last_confirmation_says_so_and_a_new_start_replaces_the_old() -> None:
    """The last device to show life returns True; a reconnection starts over from the new list."""
    r = Reconfirm()
    r.start([("a", 1, 50.0)], now=0.0)
    r.start([("b", 2, 90.0)], now=0.0)
    assert r.due(60.0) == []  # "a" is no longer waited for
    assert [d for _, d in r.asks(30.0)] == ["b"]
    assert r.heard("b", 3) is True and len(r) == 0
    assert r.start([], now=0.0) == 0 and r.asks(30.0) == []


@given(count=st.integers(min_value=0, max_value=10**7), window=st.floats(min_value=-10.0, max_value=1e5))
def test_ask_rate_asks_all_within_the_window_unless_capped(count: int, window: float) -> None:
    """The rate stays within its floor and cap, and below the cap asks ``count`` devices
    (a second's worth at a time) within ``window`` seconds."""
    rate = ask_rate(count, window)
    assert ASK_RATE_MIN <= rate <= ASK_RATE_MAX
    if window > 0 and rate < ASK_RATE_MAX and count:
        assert (count - 1) // rate <= window  # the last device's turn, in whole seconds
    if window > 0 and count / window > ASK_RATE_MAX:
        assert rate == ASK_RATE_MAX
    if window > 0 and count <= ASK_RATE_MIN * window:
        assert rate == ASK_RATE_MIN


@settings(deadline=None, max_examples=40)
@given(
    allowances=st.lists(st.floats(min_value=37.5, max_value=100_000.0), min_size=1, max_size=50),
    extra=st.integers(min_value=0, max_value=150_000),
)
def test_no_device_is_due_before_its_allowance_or_its_answer_time(
    allowances: list[float], extra: int
) -> None:
    """Whatever the fleet and allowances, a device is never due before its own deadline, nor
    before ANSWER_S after its turn to be asked; asked on time, all turns come within the
    window unless the cap binds."""
    devices = [(f"d{i}", 1, a) for i, a in enumerate(allowances)]
    devices += [(f"x{i}", 1, max(allowances)) for i in range(extra)]
    r = Reconfirm()
    r.start(devices, now=0.0)
    earliest = min(allowances)
    ask_from = min(ASK_AFTER_S, earliest / 3)
    asked_at: dict[str, float] = {}
    k = 0
    while len(asked_at) < len(devices):
        t = ask_from + k
        for _, d in r.asks(t):
            asked_at[d] = t
        k += 1
    if r.rate < ASK_RATE_MAX:
        assert max(asked_at.values()) <= ask_from + (earliest - ask_from) / 2 + 1e-6
    deadline = {d: max(a, asked_at[d] + ANSWER_S) for d, _, a in devices}
    for d, _ in r.due(min(deadline.values()) - 1e-6):
        raise AssertionError(f"{d} due before its deadline")
    assert {d for d, _ in r.due(max(deadline.values()))} == set(deadline)
