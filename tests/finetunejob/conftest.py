"""Fixtures for the controller's integration tests: the operator as a real process.

The operator runs as `ragtune operator run --all-namespaces` (a subprocess, exactly as in
development against any cluster) with the platform's kubeconfig, once per test module; each test
works in its own namespace. Trainer pods use the image `ragtune.test/fake-trainer`, which the
local platform's pod runner maps to `python -m ragtune_local.testdoubles.fake_trainer`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from ragtune_local.platform import free_port
from ragtune_local.procs import terminate_with_parent

FAKE_TRAINER_IMAGE = "ragtune.test/fake-trainer:dev"
REPO = Path(__file__).resolve().parents[2]


class OperatorProcess:
    """`ragtune operator run` in a subprocess that tests can kill and start again."""

    def __init__(self, kubeconfig: str, log_path: Path, extra_env: Optional[dict] = None) -> None:
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.extra_env = extra_env or {}
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 60) -> None:
        env = {**os.environ, "KUBECONFIG": self.kubeconfig, "RAGTUNE_TRAINER_IMAGE": FAKE_TRAINER_IMAGE,
               "RAGTUNE_PROGRESS_INTERVAL_SECONDS": "2", "RAGTUNE_METRICS_PORT": str(self.metrics_port),
               **self.extra_env}
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ragtune.cli", "operator", "run", "--all-namespaces",
             "--liveness", f"http://127.0.0.1:{self.health_port}/healthz", "--log-format", "json"],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
            preexec_fn=terminate_with_parent)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the operator exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the operator was not healthy within {timeout} s; see {self.log_path}")
            time.sleep(0.3)

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, like a crashed or OOM-killed operator."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def metrics(self) -> dict[str, float]:
        """The scraped samples, `name{labels}` -> value."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                samples[key] = float(value)
        return samples

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def crds(platform):
    platform.install_crds()


@pytest.fixture(scope="module")
def fake_trainer_image():
    from ragtune_local import images

    try:
        images.lookup(FAKE_TRAINER_IMAGE)
    except images.ImageNotFound:
        pytest.fail(f"the pod runner has no stand-in for {FAKE_TRAINER_IMAGE}: add it to "
                    "localplatform/ragtune_local/images.py (-> python -m ragtune_local.testdoubles.fake_trainer)")
    return FAKE_TRAINER_IMAGE


@pytest.fixture(scope="module")
def operator(platform, crds, fake_trainer_image, tmp_path_factory):
    op = OperatorProcess(platform.kubeconfig, tmp_path_factory.mktemp("operator") / "operator.log")
    op.start()
    try:
        yield op
    finally:
        op.stop()


# --- helpers for the tests ------------------------------------------------------------


def ftj_manifest(name: str, namespace: str, scenario: str = "succeed/2", **spec: Any) -> dict:
    body: dict[str, Any] = {
        "baseModel": {"id": "tiny/model", "revision": "r1"},
        "dataset": {"train": f"s3://fake-trainer/{scenario}"},
        "output": {"uri": "s3://ragtune-out/runs"},
        "s3": {"endpoint": "http://127.0.0.1:9000", "credentialsSecretRef": {"name": "s3-credentials"}},
        "resources": {"gpus": 0, "cpu": "100m", "memory": "256Mi", "shmSize": "64Mi"},
        "backoffLimit": 0,
    }
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    return {"apiVersion": "ragtune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": namespace}, "spec": body}


def get_json(platform, *args: str) -> dict:
    return json.loads(platform.kubectl("get", *args, "-o", "json"))


def wait_status(platform, namespace: str, name: str, check: Callable[[dict], bool], timeout: float = 90,
                what: str = "") -> dict:
    """Polls the FineTuneJob until `check(status)` holds; returns the status."""
    deadline = time.monotonic() + timeout
    status: dict = {}
    while time.monotonic() < deadline:
        status = get_json(platform, "-n", namespace, "finetunejob", name).get("status") or {}
        try:
            if check(status):
                return status
        except (KeyError, TypeError, IndexError, StopIteration):
            pass
        time.sleep(0.5)
    raise AssertionError(f"FineTuneJob {namespace}/{name}: {what or 'condition'} not reached in {timeout} s; "
                         f"status: {json.dumps(status, indent=1)}")


def condition(status: dict, type_: str) -> dict:
    return next(c for c in status.get("conditions", []) if c["type"] == type_)


def events(platform, namespace: str, name: str) -> list[dict]:
    items = get_json(platform, "-n", namespace, "events",
                     f"--field-selector=involvedObject.name={name},involvedObject.kind=FineTuneJob")["items"]
    return sorted(items, key=lambda e: e.get("eventTime") or e.get("lastTimestamp") or "")


def jobs_of(platform, namespace: str, name: str) -> list[dict]:
    return get_json(platform, "-n", namespace, "jobs", "-l", f"ragtune.dev/finetunejob={name}")["items"]


def pods_of(platform, namespace: str, job: str) -> list[dict]:
    return get_json(platform, "-n", namespace, "pods", "-l", f"batch.kubernetes.io/job-name={job}")["items"]
