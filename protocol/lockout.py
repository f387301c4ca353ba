"""Login throttling: the one policy HTTP (controller/http/auth.py) and MQTT (broker/auth.py) share.

After ``limit`` failed password checks in a row for a username, its password is not even
checked (no slow KDF runs) for ``base`` seconds; each further failure after the window
doubles it, up to ``cap``. A success clears the count. This is throttling in the NIST SP
800-63B sense, not a permanent lockout: the correct password is always accepted again once
the window has passed, so an attacker can at worst keep delaying a user, never lock them out
for good, and guessing is slowed to about one try per ``cap`` seconds.

``address`` (optional, MQTT passes the client's IP address): an address that last logged in
as the user successfully stays trusted, and its logins are still checked while the user is
locked, so an attacker elsewhere guessing a device's name cannot keep the device itself off
the broker. A failure from a trusted address ends its trust (one wrong guess, then it is
throttled like everyone else), and its success does not lift the lockout for others. The trade-off: an attacker sharing the device's address (same
NAT) gets the device's exemption until its first wrong guess. Callers that pass no address
(HTTP) get the plain per-username policy.

Pure and thread-safe (HTTP requests run on several threads); the clock is injectable.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Lockout", "LockoutPolicy"]

MAX_USERS = 100_000
"""Usernames tracked at most (attackers choose them); past it the memory starts afresh."""
MAX_TRUSTED = 4
"""Trusted addresses kept per username (the most recent successes)."""


@dataclass(frozen=True)
class LockoutPolicy:
    """How many failures lock a username out, the first window, and the longest (seconds)."""

    limit: int = 5
    base: float = 30.0
    cap: float = 900.0


class Lockout:
    """Failed password checks per username (see the module's docstring)."""

    def __init__(
        self,
        limit: int = 5,
        base: float = 30.0,
        cap: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit, self.base, self.cap, self.clock = limit, base, cap, clock
        self._failures: dict[str, tuple[int, float]] = {}  # user -> (failures, locked until)
        self._trusted: dict[str, tuple[str, ...]] = {}  # user -> addresses that last succeeded
        self._lock = threading.Lock()
        self.lockouts = 0
        """Lockouts started so far (``tether_login_lockouts_total`` in /metrics)."""

    @classmethod
    def of(cls, policy: LockoutPolicy, clock: Callable[[], float] = time.monotonic) -> Lockout:
        return cls(policy.limit, policy.base, policy.cap, clock)

    def locked(self, user: str, address: str = "") -> float:
        """Seconds ``user`` stays locked out (0: not locked, or ``address`` is trusted for it)."""
        with self._lock:
            _, until = self._failures.get(user, (0, 0.0))
            if address and address in self._trusted.get(user, ()):
                return 0.0
        return max(0.0, until - self.clock())

    def failed(self, user: str, address: str = "") -> float:
        """Count a failure; the seconds of the lockout it starts (0: none starts).

        A caller logs a lockout when this is positive: once per lockout window."""
        with self._lock:
            if len(self._failures) > MAX_USERS:
                self._failures.clear()
            count, _ = self._failures.get(user, (0, 0.0))
            count += 1
            window = 0.0
            if count >= self.limit:
                window = min(self.cap, self.base * 2 ** min(count - self.limit, 64))
            self._failures[user] = (count, self.clock() + window if window else 0.0)
            self.lockouts += 1 if window else 0
            trusted = self._trusted.get(user, ())
            if address and address in trusted:
                self._trusted[user] = tuple(a for a in trusted if a != address)
            return window

    def succeeded(self, user: str, address: str = "") -> None:
        """Clear ``user``'s failures; trust ``address`` (if given) for it.

        A trusted address's success while the user is locked leaves the lockout in force
        for everyone else (the device reconnecting does not hand an attacker fresh tries)."""
        with self._lock:
            _, until = self._failures.get(user, (0, 0.0))
            if until <= self.clock():
                self._failures.pop(user, None)
            if address:
                if len(self._trusted) > MAX_USERS:
                    self._trusted.clear()
                kept = tuple(a for a in self._trusted.get(user, ()) if a != address)
                self._trusted[user] = (address, *kept)[:MAX_TRUSTED]
