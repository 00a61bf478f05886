"""The budget for the operator's bookkeeping writes: status patches and the Events they carry.

Creating a training Job is what a user waits for; writing down that its FineTuneJob is Pending is
bookkeeping. In a burst of a thousand FineTuneJobs the bookkeeping (two or three status patches
and as many Events per object) more than doubled the API server's work while the Jobs were still
being created (`bench/operator_scale.py`). So status writes go through a token bucket, as every
Go controller's client does (client-go's QPS/burst limit; kube-controller-manager runs at 20 QPS,
burst 30), while creating and deleting child objects does not.

A reconcile that finds the bucket empty does not wait for a token - its worker would sit idle
while it could create a Job. It *reserves* the next free slot and comes back then: the
level-triggered reconcile writes the newest status at that moment, so the transitions made
meanwhile fold into one write, and a thousand deferred objects come back once each, spread over
their slots, instead of all retrying every time a token falls due.
"""

from __future__ import annotations

import time
from typing import Callable, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)


class WriteBudget(Generic[K]):
    """`rate` writes per second on average, bursts of `burst`; `rate <= 0` means no limit."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self._clock = clock
        self._tokens = float(self.burst)
        self._updated = clock()
        self._reserved: dict[K, float] = {}

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now

    def delay(self, key: K) -> float:
        """0.0 if `key` may write now (a token is taken, or was reserved for it earlier and is
        due); else the seconds until its reserved slot (one reservation per key, kept)."""
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        due = self._reserved.get(key)
        if due is not None:
            if due <= now:
                del self._reserved[key]
                return 0.0
            return due - now
        self._refill(now)
        self._tokens -= 1.0
        if self._tokens >= 0:
            return 0.0
        # In debt: this write is paid for by the token that refills -self._tokens / rate from now.
        wait = -self._tokens / self.rate
        self._reserved[key] = now + wait
        return wait

    def forget(self, key: K) -> None:
        """The object is gone; its reserved slot, if any, is simply left to expire unused."""
        self._reserved.pop(key, None)

    def __len__(self) -> int:
        """Keys waiting for their slot."""
        return len(self._reserved)
