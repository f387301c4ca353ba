"""Capped exponential backoff with full jitter (pure: the random source is injected).

Full jitter spreads reconnects of a whole fleet over the window instead of synchronising
them: after an outage, 10,000 devices do not come back in the same second.
See https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delay before attempt ``n`` (0-based) is uniform in ``[0, min(cap, base * 2**n)]``."""

    base: float = 0.5
    cap: float = 30.0
    rng: random.Random = field(default_factory=random.Random)

    def ceiling(self, attempt: int) -> float:
        """The largest delay attempt ``attempt`` may wait."""
        return min(self.cap, self.base * (2.0 ** min(attempt, 32)))

    def delay(self, attempt: int) -> float:
        """A jittered delay for ``attempt``."""
        return self.rng.uniform(0.0, self.ceiling(attempt))
