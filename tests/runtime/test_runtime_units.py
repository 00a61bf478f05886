"""Operator configuration, metrics bookkeeping and the work queue."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry, Gauge

from ragtune.api.pods import TRAINER_IMAGE
from ragtune.runtime.metrics import PhaseTracker
from ragtune.runtime.ratelimit import WriteBudget
from ragtune.runtime.settings import ConfigError, OperatorConfig
from ragtune.runtime.workqueue import WorkQueue


def test_config_defaults_and_overrides():
    c = OperatorConfig.from_env({})
    assert c.trainer_image.startswith(TRAINER_IMAGE + ":")
    assert c.namespaces == () and c.metrics_port == 8080 and c.log_format == "json"
    c = OperatorConfig.from_env({"RAGTUNE_WATCH_NAMESPACES": "a, b,,", "RAGTUNE_METRICS_PORT": "0",
                                 "RAGTUNE_TRAINER_IMAGE": "reg/t:1", "RAGTUNE_LOG_FORMAT": "TEXT"})
    assert c.namespaces == ("a", "b") and c.metrics_port == 0 and c.trainer_image == "reg/t:1"
    assert c.log_format == "text"


@pytest.mark.parametrize("env, named", [
    ({"RAGTUNE_METRICS_PORT": "http"}, "RAGTUNE_METRICS_PORT"),
    ({"RAGTUNE_PROGRESS_INTERVAL_SECONDS": "0"}, "RAGTUNE_PROGRESS_INTERVAL_SECONDS"),
    ({"RAGTUNE_LOG_FORMAT": "xml"}, "RAGTUNE_LOG_FORMAT"),
    ({"RAGTUNE_STATUS_WRITES_PER_SECOND": "-1"}, "RAGTUNE_STATUS_WRITES_PER_SECOND"),
])
def test_config_errors_name_the_variable(env, named):
    with pytest.raises(ConfigError, match=named):
        OperatorConfig.from_env(env)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_write_budget_allows_a_burst_then_gives_each_waiting_key_its_own_slot():
    clock = FakeClock()
    budget: WriteBudget[str] = WriteBudget(rate=2.0, burst=3, clock=clock)
    assert [budget.delay(k) for k in "abc"] == [0.0, 0.0, 0.0]  # the burst
    waits = [budget.delay(k) for k in "defg"]
    assert waits == pytest.approx([0.5, 1.0, 1.5, 2.0])  # one slot each, 1/rate apart, none shared
    assert len(budget) == 4
    # Asking again before the slot keeps the slot (no second reservation, no debt added).
    clock.now += 0.25
    assert budget.delay("d") == pytest.approx(0.25) and budget.delay("g") == pytest.approx(1.75)
    clock.now += 0.25
    assert budget.delay("d") == 0.0 and len(budget) == 3  # d's slot is due: it writes
    # A newcomer queues behind the reserved slots, not ahead of them.
    assert budget.delay("h") == pytest.approx(2.0)
    budget.forget("g")
    assert len(budget) == 3
    # After a quiet spell the bucket is full again, but never holds more than the burst.
    clock.now += 60
    assert [budget.delay(k) for k in ("e", "f", "h")] == [0.0, 0.0, 0.0]  # due reservations
    assert [budget.delay(k) for k in "xyz"] == [0.0, 0.0, 0.0] and budget.delay("w") > 0


def test_write_budget_of_zero_is_unlimited():
    budget: WriteBudget[int] = WriteBudget(rate=0, burst=0, clock=FakeClock())
    assert all(budget.delay(i) == 0.0 for i in range(10_000)) and len(budget) == 0


def test_phase_tracker_counts_each_object_once():
    gauge = Gauge("test_phases", "t", ["phase"], registry=CollectorRegistry())
    tracker = PhaseTracker(gauge)
    tracker.set("a", "Pending")
    tracker.set("b", "Pending")
    tracker.set("a", "Running")
    tracker.set("a", "Running")
    value = lambda phase: gauge.labels(phase=phase)._value.get()  # noqa: E731
    assert (value("Pending"), value("Running")) == (1, 1)
    tracker.forget("b")
    assert value("Pending") == 0


def test_workqueue_deduplicates_requeues_changed_keys_and_retries():
    calls: list[str] = []
    gate = asyncio.Event()

    async def reconcile(key: str):
        calls.append(key)
        if key == "slow" and calls.count("slow") == 1:
            await gate.wait()
        if key == "flaky" and calls.count("flaky") < 3:
            raise RuntimeError("transient")
        return None

    async def scenario():
        q: WorkQueue[str] = WorkQueue(reconcile, workers=2, base_delay=0.01, max_delay=0.05)
        q.start()
        for _ in range(5):
            q.add("a")  # queued once
        q.add("slow")
        await asyncio.sleep(0.05)
        q.add("slow")  # changes while being reconciled: runs once more afterwards
        q.add("slow")
        gate.set()
        q.add("flaky")
        await asyncio.sleep(0.3)
        assert q.alive
        await q.stop()

    asyncio.run(scenario())
    assert calls.count("a") == 1
    assert calls.count("slow") == 2
    assert calls.count("flaky") == 3


def test_workqueue_serves_urgent_keys_first():
    order: list[str] = []

    async def reconcile(key: str):
        order.append(key)

    async def scenario():
        q: WorkQueue[str] = WorkQueue(reconcile, workers=1)
        for key in ("status-1", "status-2"):
            q.add(key)
        q.add("create", urgent=True)
        q.start()
        await asyncio.sleep(0.05)
        await q.stop()

    asyncio.run(scenario())
    assert order == ["create", "status-1", "status-2"]


def test_workqueue_add_after_coalesces_a_burst():
    calls: list[str] = []

    async def reconcile(key: str):
        calls.append(key)

    async def scenario():
        q: WorkQueue[str] = WorkQueue(reconcile, workers=2)
        q.start()
        for _ in range(10):
            q.add_after("pod", 0.05)
        await asyncio.sleep(0.2)
        await q.stop()

    asyncio.run(scenario())
    assert calls == ["pod"]
