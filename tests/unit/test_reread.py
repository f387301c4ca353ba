"""controller/reread.py: which devices' retained presence is read again, and when."""

from __future__ import annotations

from collections.abc import Mapping

from hypothesis import given, settings
from hypothesis import strategies as st
from tether.controller.reread import Reread


def fleet(online: int, offline: int) -> dict[str, str]:
    shown = {f"on-{i}": "online" for i in range(online)}
    shown.update({f"off-{i}": "offline" for i in range(offline)})
    return shown


class Status:
    """The fleet's presence, counting how often it was asked."""

    def __init__(self, shown: Mapping[str, str]) -> None:
        self.shown = dict(shown)
        self.asked = 0

    def __call__(self) -> Mapping[str, str]:
        self.asked += 1
        return self.shown


def test_devices_not_online_are_read_again_every_interval_in_paced_batches() -> None:
    """The first step reads nothing (the subscriptions just did); then every ``every`` the
    devices not shown online (offline, unknown, never seen) are subscribed, at most ``rate``
    a second, each batch unsubscribed at the next step; the fleet is asked once a sweep."""
    shown = {**fleet(3, 5), "u": "unknown", "n": "never seen"}
    status = Status(shown)
    r = Reread(every=10.0, full_every=1000.0, rate=3)
    assert r.step(0.0, status, busy=False) == ([], [])
    assert r.step(9.0, status, busy=False) == ([], []) and status.asked == 0
    read, done = r.step(10.0, status, busy=False)
    assert status.asked == 1 and done == [] and read == ["off-0", "off-1", "off-2"]
    read2, done2 = r.step(11.0, status, busy=False)
    assert done2 == read and read2 == ["off-3", "off-4", "u"]
    read3, done3 = r.step(12.0, status, busy=False)
    assert done3 == read2 and read3 == ["n"] and not r.sweeping
    assert r.step(13.0, status, busy=False) == ([], ["n"])
    assert status.asked == 1
    # The next sweep: 10 s after this one's end (three times its 7 devices at 3 a second is less).
    assert r.step(21.0, status, busy=False) == ([], [])
    assert r.step(22.0, status, busy=False)[0] == ["off-0", "off-1", "off-2"]


def test_a_sign_of_loss_reads_every_device_not_online_first() -> None:
    """After :meth:`Reread.suspect` every device is read, those not online first, even in
    the middle of a sweep of devices not online; then back to the interval."""
    status = Status(fleet(4, 2))
    r = Reread(every=100.0, full_every=1000.0, rate=10)
    r.step(0.0, status, busy=False)
    r.suspect()
    read, _ = r.step(1.0, status, busy=False)
    assert read == ["off-0", "off-1", "on-0", "on-1", "on-2", "on-3"] and not r.sweeping
    assert r.step(2.0, status, busy=False) == ([], read)
    assert r.step(50.0, status, busy=False) == ([], [])  # nothing due before the interval
    r2 = Reread(every=10.0, full_every=1000.0, rate=1)
    r2.step(0.0, status, busy=False)
    assert r2.step(10.0, status, busy=False)[0] == ["off-0"]
    r2.suspect()  # a sweep of devices not online under way: every device now
    assert r2.step(11.0, status, busy=False)[0] == ["off-0"]
    assert [r2.step(12.0 + i, status, busy=False)[0][0] for i in range(5)] == [
        "off-1",
        "on-0",
        "on-1",
        "on-2",
        "on-3",
    ]


def test_every_device_is_read_again_every_full_interval() -> None:
    """Without a sign of loss, every device (online ones too: a will may have been dropped)
    is read once every ``full_every``."""
    status = Status(fleet(2, 0))
    r = Reread(every=10.0, full_every=100.0, rate=10)
    r.step(0.0, status, busy=False)
    assert r.step(50.0, status, busy=False) == ([], [])  # no device is offline: nothing
    assert r.step(100.0, status, busy=False)[0] == ["on-0", "on-1"]


def test_nothing_is_read_while_busy_and_the_pace_is_kept_after() -> None:
    """While the inbox holds a burst nothing new is subscribed (the last batch is still
    unsubscribed); after it, at most a second's worth at once."""
    status = Status(fleet(0, 50))
    r = Reread(every=10.0, full_every=1000.0, rate=5)
    r.step(0.0, status, busy=False)
    first, _ = r.step(10.0, status, busy=False)
    assert len(first) == 5
    assert r.step(11.0, status, busy=True) == ([], first)
    assert r.step(12.0, status, busy=True) == ([], [])
    read, _ = r.step(40.0, status, busy=False)
    assert len(read) == 5  # a second's worth, not 28 seconds'
    read, _ = r.step(40.4, status, busy=False)
    assert len(read) == 2  # 0.4 s of pace


def test_many_devices_offline_for_good_cost_at_most_a_quarter_of_the_rate() -> None:
    """A long sweep (many devices offline) is followed by a pause three times as long."""
    status = Status(fleet(0, 100))
    r = Reread(every=1.0, full_every=10_000.0, rate=10)
    r.step(0.0, status, busy=False)
    now, reads = 0.0, 0
    while now < 400.0:
        now += 1.0
        reads += len(r.step(now, status, busy=False)[0])
    assert reads <= 400 * 10 / 4 + 100


@settings(max_examples=60, deadline=None)
@given(
    online=st.integers(0, 30),
    offline=st.integers(0, 30),
    rate=st.integers(1, 20),
    steps=st.lists(st.tuples(st.floats(0.01, 30.0), st.booleans(), st.booleans()), max_size=60),
)
def test_every_subscription_is_unsubscribed_and_the_pace_holds(
    online: int, offline: int, rate: int, steps: list[tuple[float, bool, bool]]
) -> None:
    """Whatever the steps, suspicions and bursts: each step unsubscribes exactly what the one
    before subscribed, never more than ``rate`` (nor more than the time allows) at once, and
    only known devices."""
    shown = fleet(online, offline)
    r = Reread(every=5.0, full_every=50.0, rate=rate)
    now = 0.0
    previous: list[str] = []
    r.step(now, lambda: shown, busy=False)
    for gap, busy, suspect in steps:
        if suspect:
            r.suspect()
        now += gap
        read, done = r.step(now, lambda: shown, busy=busy)
        assert done == previous
        assert len(read) <= rate and len(read) <= max(1, -(-rate * gap // 1))
        assert set(read) <= set(shown) and not (busy and read)
        previous = read
