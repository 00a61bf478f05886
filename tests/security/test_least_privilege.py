"""The operator runs with nothing but the chart's ServiceAccount and RBAC, through a recording
proxy in front of the real API server. One scenario exercises the FineTuneJob paths; the tests
then check what it showed:
- a FineTuneJob reconciles (Job created, suspended, deleted) with the chart's Role only;
- a Secret in another namespace cannot be used (secretKeyRef is namespace-local);
- no credential leaks into specs, statuses, events, logs or reports;
- every API call the operator made was allowed, and every permission the chart grants for these
  paths was used (AdapterDeployment/admission-plugin permissions are listed with their reason).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from ragtune_local.apiproxy import RecordingProxy
from ragtune_local.platform import free_port

from ..chart.chartlib import finetunejob, kubectl, render, wait_for
from .leakscan import scan
from .permissions import PERMISSIONS, flatten

pytestmark = [pytest.mark.platform, pytest.mark.slow]

RELEASE = "ragtune"
FAKE_ACCESS_KEY = "AKIARAGTUNELEAKTEST7Q"
FAKE_SECRET_KEY = "ragtune/leak-test/" + "Zm9vYmFy" * 3  # distinctive, and never a real key
MISSING_IMAGE = "ragtune.test/absent-trainer:1"


@dataclass
class Scenario:
    watched: str
    other: str
    system: str
    proxy: RecordingProxy
    operator_log: Path
    results: dict = field(default_factory=dict)


def _write_sa_kubeconfig(platform, path: Path, server: str, namespace: str, sa: str) -> None:
    token = kubectl(platform.kubeconfig, "-n", namespace, "create", "token", sa, "--duration=2h").strip()
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": "sa"}}],
    }))


def _upstream(platform, workdir: Path) -> tuple[str, str]:
    config = yaml.safe_load(Path(platform.kubeconfig).read_text())
    cluster = config["clusters"][0]["cluster"]
    ca = workdir / "ca.crt"
    if "certificate-authority-data" in cluster:
        ca.write_bytes(base64.b64decode(cluster["certificate-authority-data"]))
    else:
        ca.write_bytes(Path(cluster["certificate-authority"]).read_bytes())
    return cluster["server"], str(ca)


def _ftj(platform, name: str, ns: str, secret: str, image: str | None = None) -> None:
    obj = finetunejob(name, ns, platform.s3_endpoint or "http://127.0.0.1:9000", secret=secret, image=image)
    kubectl(platform.kubeconfig, "apply", "-f", "-", stdin=json.dumps(obj))


def _adapterdeployment(platform, ns: str, name: str, ftj: str) -> dict:
    return {"apiVersion": "ragtune.dev/v1alpha1", "kind": "AdapterDeployment",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"baseModel": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "main"},
                     "server": {"gpus": 0, "cpu": "1", "memory": "2Gi"},
                     "adapters": [{"name": "rag", "fineTuneJobRef": {"name": ftj}}],
                     "s3": {"endpoint": platform.s3_endpoint or "http://127.0.0.1:9000",
                            "credentialsSecretRef": {"name": "s3-credentials"}}}}


def _get(platform, ns: str, kind: str, name: str) -> dict | None:
    out = kubectl(platform.kubeconfig, "-n", ns, "get", kind, name, "-o", "json", check=False)
    return json.loads(out) if out.startswith("{") else None


def _condition(obj: dict | None, reason: str) -> dict | None:
    for cond in ((obj or {}).get("status") or {}).get("conditions", []):
        if cond.get("reason") == reason:
            return cond
    return None


def _pod_waiting(platform, ns: str, job: str) -> dict | None:
    pods = json.loads(kubectl(platform.kubeconfig, "-n", ns, "get", "pods", "-l", f"job-name={job}", "-o", "json"))
    for pod in pods["items"]:
        for status in pod.get("status", {}).get("containerStatuses", []):
            waiting = status.get("state", {}).get("waiting")
            if waiting and waiting.get("reason") == "CreateContainerConfigError":
                return waiting
    return None


@pytest.fixture(scope="module")
def scenario(platform, tmp_path_factory):
    kc = platform.kubeconfig
    watched, other = platform.create_namespace(), platform.create_namespace()
    system = f"ragtune-system-{secrets.token_hex(3)}"
    kubectl(kc, "create", "namespace", system)
    platform.install_crds()
    # Exactly the chart's ServiceAccount and RBAC (namespaced mode, watching one namespace).
    chart = render({"watch.namespaces": [watched]}, namespace=system, release=RELEASE)
    rbac = [d for d in chart.docs if d["kind"] in ("ServiceAccount", "Role", "RoleBinding")]
    kubectl(kc, "apply", "-f", "-", stdin=yaml.safe_dump_all(rbac))
    workdir = tmp_path_factory.mktemp("least-privilege")
    proxy = RecordingProxy(*_upstream(platform, workdir)).start()
    _write_sa_kubeconfig(platform, workdir / "kubeconfig", proxy.url, system, RELEASE)
    health = free_port()
    log_path = workdir / "operator.log"
    env = {**os.environ, "KUBECONFIG": str(workdir / "kubeconfig"), "RAGTUNE_METRICS_PORT": "0",
           "RAGTUNE_LOG_FORMAT": "json", "RAGTUNE_PROGRESS_INTERVAL_SECONDS": "1",
           # As the chart runs it: leader election on the Lease in the release namespace.
           "RAGTUNE_LEADER_ELECTION": "true", "RAGTUNE_LEADER_ELECTION_NAMESPACE": system}
    with open(log_path, "wb") as log:
        operator = subprocess.Popen(
            [str(Path(sys.executable).parent / "ragtune"), "operator", "run", f"--namespace={watched}",
             f"--liveness=http://127.0.0.1:{health}/healthz"], env=env, stdout=log, stderr=subprocess.STDOUT)
    sc = Scenario(watched, other, system, proxy, log_path)
    try:
        wait_for("the operator's health endpoint", lambda: _healthy(health, operator, log_path), timeout=60)
        _run(platform, sc)
        yield sc
    finally:
        operator.terminate()
        try:
            operator.wait(30)
        except subprocess.TimeoutExpired:
            operator.kill()
            operator.wait()
        proxy.stop()
        for ns in (watched, other, system):
            platform.delete_namespace(ns)


def _healthy(port: int, operator: subprocess.Popen, log_path: Path) -> bool:
    if operator.poll() is not None:
        raise AssertionError(f"the operator exited ({operator.returncode}):\n{log_path.read_text()[-3000:]}")
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).status == 200
    except OSError:
        return False


def _run(platform, sc: Scenario) -> None:
    kc, ns = platform.kubeconfig, sc.watched
    kubectl(kc, "-n", ns, "create", "secret", "generic", "leak-s3",
            f"--from-literal=AWS_ACCESS_KEY_ID={FAKE_ACCESS_KEY}", f"--from-literal=AWS_SECRET_ACCESS_KEY={FAKE_SECRET_KEY}")
    kubectl(kc, "-n", sc.other, "create", "secret", "generic", "other-s3",
            "--from-literal=AWS_ACCESS_KEY_ID=other-namespace-key", "--from-literal=AWS_SECRET_ACCESS_KEY=other-secret")
    platform.bucket("ragtune-test")
    _ftj(platform, "basic", ns, "s3-credentials", image=MISSING_IMAGE)   # cheap: never runs
    _ftj(platform, "cross-ns", ns, "other-s3")                           # never starts: no such Secret
    _ftj(platform, "leak", ns, "leak-s3")                                # real trainer, fake credentials

    job = wait_for("the training Job of 'basic'", lambda: (_get(platform, ns, "finetunejob", "basic") or {})
                   .get("status", {}).get("jobName"), timeout=90)
    sc.results["basic_job"] = _get(platform, ns, "job", job)
    kubectl(kc, "-n", ns, "patch", "finetunejob", "basic", "--type=merge", "-p", '{"spec":{"suspend":true}}')
    sc.results["suspended_job"] = wait_for("the Job to be suspended", lambda: (
        lambda j: j if j and j["spec"].get("suspend") else None)(_get(platform, ns, "job", job)), timeout=60)

    cross_job = wait_for("the training Job of 'cross-ns'", lambda: (
        _get(platform, ns, "finetunejob", "cross-ns") or {}).get("status", {}).get("jobName"), timeout=90)
    sc.results["cross_job"] = _get(platform, ns, "job", cross_job)
    sc.results["cross_waiting"] = wait_for("the cross-namespace pod to wait on its Secret",
                                           lambda: _pod_waiting(platform, ns, cross_job), timeout=90)
    sc.results["cross_condition"] = wait_for("condition SecretNotFound on 'cross-ns'", lambda: _condition(
        _get(platform, ns, "finetunejob", "cross-ns"), "SecretNotFound"), timeout=90)

    sc.results["leak"] = wait_for("'leak' to fail on its fake credentials", lambda: (
        lambda o: o if o and o.get("status", {}).get("phase") in ("Failed", "Succeeded") else None)(
        _get(platform, ns, "finetunejob", "leak")), timeout=300, interval=2)

    # An AdapterDeployment whose adapter comes from the failed run: resolution stops with a reason.
    kubectl(kc, "apply", "-f", "-", stdin=json.dumps(_adapterdeployment(platform, ns, "serving", "leak")))
    sc.results["ad"] = wait_for("the AdapterDeployment to get a phase", lambda: (
        lambda o: o if o and o.get("status", {}).get("phase") else None)(
        _get(platform, ns, "adapterdeployment", "serving")), timeout=60)
    kubectl(kc, "-n", ns, "delete", "adapterdeployment", "serving", "--wait=true", "--timeout=60s")

    kubectl(kc, "-n", ns, "delete", "finetunejob", "basic", "--wait=true", "--timeout=60s")
    sc.results["basic_job_after_delete"] = wait_for("the Job of a deleted FineTuneJob to go", lambda: (
        _get(platform, ns, "job", job) is None) or None, timeout=90)


def test_finetunejob_reconciles_with_only_the_charts_permissions(scenario):
    job = scenario.results["basic_job"]
    assert job["metadata"]["ownerReferences"][0]["name"] == "basic"
    assert scenario.results["suspended_job"]["spec"]["suspend"] is True
    assert scenario.results["basic_job_after_delete"] is True
    forbidden = [c for c in scenario.proxy.recorded() if c.status == 403]
    assert forbidden == [], f"the chart's RBAC refused: {forbidden}"


def test_adapterdeployment_resolves_with_only_the_charts_permissions(scenario):
    ad = scenario.results["ad"]
    assert ad["status"]["phase"] in ("Pending", "Failed"), ad["status"]
    assert "leak" in (ad["status"].get("message") or ""), ad["status"]


def test_a_secret_in_another_namespace_cannot_be_used(platform, scenario):
    env = scenario.results["cross_job"]["spec"]["template"]["spec"]["containers"][0]["env"]
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in env if "secretKeyRef" in e.get("valueFrom", {})}
    assert refs == {"other-s3"}
    # The reference resolves in the pod's own namespace only: the Secret of the other namespace is not found.
    assert 'secret "other-s3" not found' in scenario.results["cross_waiting"]["message"]
    assert "other-s3" in scenario.results["cross_condition"]["message"]
    # And the API has no way to name another namespace in the reference.
    obj = finetunejob("sneaky", scenario.watched, "http://127.0.0.1:9000", secret="other-s3")
    obj["spec"]["s3"]["credentialsSecretRef"]["namespace"] = scenario.other
    out = kubectl(platform.kubeconfig, "create", "--dry-run=server", "-f", "-", stdin=json.dumps(obj), check=False)
    assert 'unknown field "spec.s3.credentialsSecretRef.namespace"' in out, out
    # The operator itself cannot read Secrets anywhere.
    sa = f"system:serviceaccount:{scenario.system}:{RELEASE}"
    for ns in (scenario.watched, scenario.other):
        answer = kubectl(platform.kubeconfig, "auth", "can-i", "get", "secrets", "-n", ns, f"--as={sa}", check=False)
        assert answer.strip().startswith("no"), answer


def test_no_credential_appears_in_specs_statuses_events_logs_or_reports(platform, scenario):
    leak = scenario.results["leak"]
    assert leak["status"]["phase"] == "Failed", leak["status"]
    needles = [FAKE_ACCESS_KEY, FAKE_SECRET_KEY]
    paths = [scenario.operator_log]
    if platform.local is not None:
        # Every container log, component log and termination message of the local platform. (The
        # runner's per-container exec spec holds the resolved env, like a container runtime's state.)
        state = Path(platform.local.state_dir)
        paths += [state / "runner" / "logs", state / "logs", *sorted((state / "runner").glob("pods/*/termination-*"))]
    s3 = platform.s3_client()
    listing = s3.list_objects_v2(Bucket="ragtune-test", Prefix=f"runs/{scenario.watched}/").get("Contents", [])
    objects = [(o["Key"], s3.get_object(Bucket="ragtune-test", Key=o["Key"])["Body"].read()) for o in listing]

    def run_kubectl(*args: str, check: bool = True) -> str:
        return kubectl(platform.kubeconfig, *args, check=check)

    findings = scan(run_kubectl, [scenario.watched], needles, paths=paths, s3_objects=objects)
    assert findings == [], "\n".join(map(str, findings))
    # Positive control: the scanner finds the values where they legitimately are (their Secret).
    control = scenario.operator_log.parent / "secret.json"
    control.write_text(run_kubectl("-n", scenario.watched, "get", "secret", "leak-s3", "-o", "json"))
    assert scan(run_kubectl, [], needles, paths=[control]), "the scanner missed the credentials in their own Secret"


def test_api_calls_match_the_charts_rbac(scenario):
    calls = scenario.proxy.recorded()
    assert calls, "the operator made no API call through the proxy"
    denied = sorted({(c.method, c.path, c.status) for c in calls if c.status in (401, 403)})
    assert denied == [], f"calls the chart's RBAC does not allow: {denied}"
    used = {c.rbac for c in calls if c.rbac}
    granted = flatten()
    assert used <= granted, f"calls outside the documented permission list: {sorted(used - granted)}"
    # Every permission of the paths this scenario runs must have been used; the rest are listed
    # with the code path that needs them (AdapterDeployment controller, admission plugin).
    # (The AdapterDeployment here stops at resolution: no TGI Deployment, Service or eval Job.)
    ad_resolution = {("ragtune.dev", "adapterdeployments", "get"), ("ragtune.dev", "adapterdeployments", "patch"),
                     ("ragtune.dev", "adapterdeployments/status", "patch"), ("ragtune.dev", "finetunejobs", "get")}
    unused = sorted((p.group, p.resource, p.verb, p.used_by) for p in PERMISSIONS
                    if (p.used_by in ("kopf", "finetunejob", "leader") or (p.group, p.resource, p.verb) in ad_resolution)
                    and (p.group, p.resource, p.verb) not in used)
    assert unused == [], f"granted for the FineTuneJob paths but never used (surplus?): {unused}"
