"""The chart on a real API server: server-side dry run, then install -> the operator pod (run by
the local pod runner) reconciles a FineTuneJob -> upgrade -> uninstall keeps CRDs and user objects."""

from __future__ import annotations

import json
import secrets

import pytest
import yaml

from ragtune_local.platform import free_port

from .chartlib import CHART, FAKE_TRAINER_IMAGE, finetunejob, kubectl, render, wait_for

pytestmark = [pytest.mark.platform, pytest.mark.slow]

CRDS = ("finetunejobs.ragtune.dev", "adapterdeployments.ragtune.dev")


# One operator replica: the local platform's pods share one network namespace, so two replicas on its
# one pod-runner node bind the same health port and the second crash-loops (whether the scheduler puts it
# on a kwok node instead depends on what earlier tests left; two clean-clone runs differed). Two replicas
# with leader election are tested as processes (tests/finetunejob/test_high_availability.py).
ONE_REPLICA = ("--set", "replicas=1")


def helm(platform, *args: str, check: bool = True) -> str:
    import subprocess

    from .chartlib import helm_binary

    proc = subprocess.run([str(helm_binary()), f"--kubeconfig={platform.kubeconfig}", *args],
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


@pytest.fixture
def system_namespace(platform):
    name = f"ragtune-system-{secrets.token_hex(3)}"
    kubectl(platform.kubeconfig, "create", "namespace", name)
    yield name
    helm(platform, "uninstall", "ragtune", "-n", name, "--wait", check=False)
    kubectl(platform.kubeconfig, "delete", "namespace", name, "--wait=false", check=False)


@pytest.mark.parametrize("mode", ["namespaced", "cluster"])
def test_rendered_chart_passes_server_side_dry_run(platform, namespace, mode):
    platform.install_crds()
    out = render({"watch.mode": mode, "watch.namespaces": [namespace]}, namespace=namespace,
                 release=f"dry-{mode}")
    text = kubectl(platform.kubeconfig, "apply", "--dry-run=server", "-f", "-",
                   stdin=yaml.safe_dump_all(out.docs))
    accepted = [line for line in text.splitlines() if line.endswith("(server dry run)")]
    assert len(accepted) == len(out.docs), text


def _job_of(platform, ns: str, ftj: str) -> dict | None:
    name = kubectl(platform.kubeconfig, "-n", ns, "get", "finetunejob", ftj, "-o", "jsonpath={.status.jobName}",
                   check=False).strip()
    if not name or "NotFound" in name:
        return None
    found = kubectl(platform.kubeconfig, "-n", ns, "get", "job", name, "-o", "json", check=False)
    return json.loads(found) if found.startswith("{") else None


def _apply_ftj(platform, ns: str, name: str) -> None:
    obj = finetunejob(name, ns, platform.s3_endpoint or "http://127.0.0.1:9000", image=FAKE_TRAINER_IMAGE,
                      train="s3://fake-trainer/succeed/1")
    kubectl(platform.kubeconfig, "apply", "-f", "-", stdin=json.dumps(obj))


def _assert_reconciled(platform, ns: str, name: str) -> None:
    job = wait_for(f"FineTuneJob {ns}/{name} to get its training Job", lambda: _job_of(platform, ns, name),
                   timeout=120)
    owner = job["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner.get("controller")) == ("FineTuneJob", name, True)
    status = wait_for(f"FineTuneJob {ns}/{name} to succeed", lambda: (lambda s: s if s.get("phase") == "Succeeded"
                      else None)(json.loads(kubectl(platform.kubeconfig, "-n", ns, "get", "finetunejob", name,
                                                    "-o", "json")).get("status", {})), timeout=120)
    assert status["observedGeneration"] == 1 and status["adapter"]["sha256"], status


def test_install_reconcile_upgrade_uninstall(platform, namespace, system_namespace):
    kc = platform.kubeconfig
    values = ["--set-json", f"watch.namespaces={json.dumps([namespace])}", *ONE_REPLICA,
              "--set", f"healthPort={free_port()}", "--set", f"metrics.port={free_port()}"]

    installed = helm(platform, "install", "ragtune", str(CHART), "-n", system_namespace, *values,
                     "--wait", "--timeout", "180s")
    assert f"kubectl -n {system_namespace} rollout status deployment/ragtune" in installed
    assert "create secret generic s3-credentials" in installed and f"in: {namespace}" in installed
    for crd in CRDS:
        kubectl(kc, "get", "crd", crd)
    pod = json.loads(kubectl(kc, "-n", system_namespace, "get", "pods", "-l",
                             "app.kubernetes.io/name=ragtune", "-o", "json"))["items"][0]
    assert pod["spec"]["nodeName"] == "ragtune-local", "the operator pod must run on the pod-runner node"

    _apply_ftj(platform, namespace, "first")
    _assert_reconciled(platform, namespace, "first")

    upgraded = helm(platform, "upgrade", "ragtune", str(CHART), "-n", system_namespace, "--reuse-values",
                    "--set", "logFormat=text", "--wait", "--timeout", "180s")
    assert "STATUS: deployed" in upgraded and "REVISION: 2" in upgraded
    deployment = json.loads(kubectl(kc, "-n", system_namespace, "get", "deployment", "ragtune", "-o", "json"))
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RAGTUNE_LOG_FORMAT"] == "text"
    _apply_ftj(platform, namespace, "second")
    _assert_reconciled(platform, namespace, "second")

    helm(platform, "uninstall", "ragtune", "-n", system_namespace, "--wait")
    leftovers = kubectl(kc, "-n", system_namespace, "get", "deployment,serviceaccount,service", "-l",
                        "app.kubernetes.io/instance=ragtune", "-o", "name")
    assert leftovers.strip() == ""
    assert kubectl(kc, "-n", namespace, "get", "role,rolebinding", "-o", "name").strip() == ""
    for crd in CRDS:
        kubectl(kc, "get", "crd", crd)  # CRDs survive uninstall ...
    names = kubectl(kc, "-n", namespace, "get", "finetunejobs", "-o", "jsonpath={.items[*].metadata.name}").split()
    assert sorted(names) == ["first", "second"]  # ... and so do the user's objects


def test_install_with_a_wrong_value_fails_naming_the_key(platform, system_namespace):
    out = helm(platform, "install", "ragtune", str(CHART), "-n", system_namespace,
               "--set", "watch.mode=sideways", check=False)
    assert "values don't meet the specifications of the schema" in out and "'/watch/mode'" in out, out
    assert "ragtune" not in helm(platform, "list", "-n", system_namespace, "-q")


def test_cluster_mode_install_reconciles_in_any_namespace(platform, namespace, system_namespace):
    kc = platform.kubeconfig
    helm(platform, "install", "ragtune", str(CHART), "-n", system_namespace, "--set", "watch.mode=cluster", *ONE_REPLICA,
         "--set", f"healthPort={free_port()}", "--set", f"metrics.port={free_port()}", "--wait", "--timeout", "180s")
    role = "ragtune"  # cluster-scoped, named after the release
    kubectl(kc, "get", "clusterrole", role)
    assert kubectl(kc, "-n", namespace, "get", "role", "-o", "name").strip() == ""
    _apply_ftj(platform, namespace, "anywhere")
    _assert_reconciled(platform, namespace, "anywhere")
    helm(platform, "uninstall", "ragtune", "-n", system_namespace, "--wait")
    assert "NotFound" in kubectl(kc, "get", "clusterrole", role, check=False)
