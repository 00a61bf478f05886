"""A small random-kill campaign (issue 15 fault scenarios): FineTuneJobs run to the end while the
operator is SIGKILLed again and again. Exactly one Job per generation, every status converges, and
no Event is posted twice (an Event posted just before a kill may be lost: at most once)."""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest

from .conftest import OperatorProcess, events, ftj_manifest, jobs_of, wait_status

pytestmark = [pytest.mark.platform, pytest.mark.slow]

RUNS, KILLS = 6, 4


def test_runs_converge_under_repeated_operator_kills(platform, namespace, crds, fake_trainer_image, tmp_path):
    rng = random.Random(15)
    op = OperatorProcess(platform.kubeconfig, tmp_path / "operator.log")
    op.start()
    try:
        names = [f"kill-{i}" for i in range(RUNS)]
        for i, name in enumerate(names):
            platform.apply(ftj_manifest(name, namespace, f"succeed/{4 + i % 3}", backoffLimit=1))
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.5, 4.0))
            op.kill()
            op.start()
        for name in names:
            status = wait_status(platform, namespace, name, lambda s: s["phase"] == "Succeeded", timeout=240,
                                 what="Succeeded")
            assert status["observedGeneration"] == 1 and status["attempts"] == 1, status
        for name in names:
            assert len(jobs_of(platform, namespace, name)) == 1, name  # one child per generation
            posted = Counter(e["reason"] for e in events(platform, namespace, name))
            twice = {reason: n for reason, n in posted.items() if n > 1}
            assert not twice, f"{name}: Events posted more than once: {twice}"
            assert "Retrying" not in posted and "Failed" not in posted
    finally:
        op.stop()
