"""The login throttling policy HTTP and MQTT share (protocol/lockout.py), on a fake clock."""

from __future__ import annotations

from tether.protocol.lockout import Lockout, LockoutPolicy


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_five_failures_lock_for_30s_doubling_to_15_min_and_a_success_clears() -> None:
    """Failures 1-4 lock nothing; the 5th locks 30 s, each further one doubles up to 900 s; success resets."""
    clock = Clock()
    lockout = Lockout.of(LockoutPolicy(), clock)
    assert [lockout.failed("ann") for _ in range(4)] == [0.0] * 4 and lockout.locked("ann") == 0
    windows = []
    for _ in range(7):
        windows.append(lockout.failed("ann"))
        assert lockout.locked("ann") == windows[-1]
        clock.now += windows[-1]  # the window passes
        assert lockout.locked("ann") == 0
    assert windows == [30, 60, 120, 240, 480, 900, 900] and lockout.lockouts == 7
    assert lockout.locked("bob") == 0  # per username
    lockout.succeeded("ann")
    assert [lockout.failed("ann") for _ in range(5)] == [0.0] * 4 + [30.0]
    for _ in range(200):  # no float overflow however long an attack runs
        clock.now += 900
        lockout.failed("ann")
    assert lockout.locked("ann") == 900


def test_an_address_that_last_succeeded_stays_exempt_until_it_fails() -> None:
    """The trusted address is not locked out and its success does not lift the lock for others; one
    failure from it ends its trust; callers without an address (HTTP) get the plain policy."""
    clock = Clock()
    lockout = Lockout(limit=2, base=10, cap=10, clock=clock)
    lockout.succeeded("dev", "10.0.0.5")
    lockout.failed("dev", "203.0.113.9")
    assert lockout.failed("dev", "203.0.113.9") == 10
    assert lockout.locked("dev", "203.0.113.9") == 10 and lockout.locked("dev") == 10
    assert lockout.locked("dev", "10.0.0.5") == 0
    lockout.succeeded("dev", "10.0.0.5")
    assert lockout.locked("dev", "203.0.113.9") == 10  # still locked for the attacker
    lockout.failed("dev", "10.0.0.5")
    assert lockout.locked("dev", "10.0.0.5") > 0  # one wrong guess and it is throttled too
    clock.now += 60
    lockout.succeeded("dev", "10.0.0.5")  # after the window a success clears the count
    assert lockout.failed("dev", "203.0.113.9") == 0
