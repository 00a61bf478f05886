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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_node_that_never_joins_ends_the_attempt_as_rendezvous_timeout(tmp_path):
    """Two nodes, the second never comes: the first gives up after join_timeout, writes the
    termination message the operator reads (reason RendezvousTimeout) and exits retryable."""
    from ragtune.api import pods
    from ragtune.finetunejob.status import parse_result

    term = tmp_path / "termination-log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", pods.ENV_TERMINATION_PATH: str(term), pods.ENV_RUN_ID: "r-1"}
    endpoint = f"127.0.0.1:{_free_port()}"
    done = subprocess.run([RAGTUNE, "torchrun", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
                           f"--rdzv-endpoint={endpoint}", "--rdzv-id=r-1", "--rdzv-conf=join_timeout=3",
                           "--max-restarts=0", "--no-python", "sh", "-c", "touch ran"],
                          cwd=tmp_path, env=env, timeout=120, capture_output=True, text=True)
    assert done.returncode == pods.EXIT_RETRYABLE, done.stderr[-3000:]
    assert not (tmp_path / "ran").exists()  # no worker started
    result = parse_result(term.read_text())
    assert result is not None and (result.outcome, result.reason, result.run_id) == ("Failed", "RendezvousTimeout", "r-1")
    assert result.message.startswith(f"not all 2 nodes joined the rendezvous at {endpoint} within 3 s "
                                     "(training.distributed.rendezvousTimeoutSeconds)"), result.message
    assert "RendezvousTimeout" in done.stderr
