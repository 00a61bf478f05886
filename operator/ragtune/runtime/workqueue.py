"""A deduplicating work queue with a fixed number of workers, like client-go's.

Watch events only *enqueue* the key of the object to reconcile. A key is queued at most once; a
key that changes while it is being reconciled is reconciled again afterwards; a failing key is
retried with exponential backoff; `add_after` coalesces a burst of events into one reconcile.
Urgent keys (work that creates something a user waits for) jump the queue, so a flood of status
updates never delays the creation of new training Jobs.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Awaitable, Callable, Generic, Hashable, Optional, TypeVar

K = TypeVar("K", bound=Hashable)

logger = logging.getLogger(__name__)


class RetryableError(Exception):
    """An expected, transient failure: retried with backoff and logged without a traceback."""


class WorkQueue(Generic[K]):
    def __init__(self, reconcile: Callable[[K], Awaitable[Optional[float]]], workers: int = 16,
                 base_delay: float = 1.0, max_delay: float = 300.0, name: str = "workqueue") -> None:
        """`reconcile(key)` may return seconds after which to look at the key again."""
        self._reconcile = reconcile
        self._workers = workers
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._name = name
        self._urgent: deque[K] = deque()
        self._normal: deque[K] = deque()
        self._items = asyncio.Semaphore(0)
        self._queued: set[K] = set()
        self._active: set[K] = set()
        self._dirty: set[K] = set()
        self._failures: dict[K, int] = {}
        self._timers: dict[K, asyncio.TimerHandle] = {}
        self._tasks: list[asyncio.Task] = []

    def __len__(self) -> int:
        return len(self._queued)

    @property
    def alive(self) -> bool:
        return bool(self._tasks) and not any(t.done() for t in self._tasks)

    def add(self, key: K, urgent: bool = False) -> None:
        if key in self._active:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            (self._urgent if urgent else self._normal).append(key)
            self._items.release()

    def add_after(self, key: K, delay: float) -> None:
        """Enqueue `key` in `delay` seconds; an earlier pending timer for it wins (coalescing)."""
        loop = asyncio.get_running_loop()
        existing = self._timers.get(key)
        if existing is not None:
            if existing.when() <= loop.time() + delay:
                return
            existing.cancel()
        self._timers[key] = loop.call_later(delay, self._fire, key)

    def forget(self, key: K) -> None:
        """Drop retry state of a key whose object is gone."""
        self._failures.pop(key, None)
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work(), name=f"{self._name}-{i}") for i in range(self._workers)]

    async def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _work(self) -> None:
        while True:
            await self._items.acquire()
            key = self._urgent.popleft() if self._urgent else self._normal.popleft()
            self._queued.discard(key)
            self._active.add(key)
            try:
                again = await self._reconcile(key)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure is retried with backoff
                failures = self._failures.get(key, 0) + 1
                self._failures[key] = failures
                delay = min(self._base_delay * 2 ** (failures - 1), self._max_delay)
                logger.warning("reconcile of %s failed (attempt %d), retrying in %.0f s: %s",
                               key, failures, delay, exc, exc_info=not isinstance(exc, RetryableError))
                self.add_after(key, delay)
            else:
                self._failures.pop(key, None)
                if again is not None:
                    self.add_after(key, again)
            finally:
                self._active.discard(key)
                if key in self._dirty:
                    self._dirty.discard(key)
                    self.add(key)
