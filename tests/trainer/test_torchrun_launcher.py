"""`ragtune torchrun`: torchrun that keeps the workers' exit code (torchrun's own is 1 for any
failure), so the Job's podFailurePolicy still sees the permanent exit 2 of a multi-node run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

RAGTUNE = str(Path(sys.executable).with_name("ragtune"))


def _launch(script: str, tmp_path) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([RAGTUNE, "torchrun", "--nnodes=1", "--nproc-per-node=2", "--max-restarts=0",
                           "--no-python", "sh", "-c", script], cwd=tmp_path, env=env, timeout=120,
                          capture_output=True, text=True).returncode


def test_exit_codes_of_the_workers_come_through(tmp_path):
    assert _launch("exit 0", tmp_path) == 0
    assert _launch('[ "$RANK" = 1 ] && exit 2; exit 0', tmp_path) == 2  # permanent: FailJob
    assert _launch('[ "$RANK" = 0 ] && exit 3; exit 0', tmp_path) == 1  # anything else: retryable
