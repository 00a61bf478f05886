"""The pod runner: pods on node `ragtune-local` run as real local processes."""

from __future__ import annotations

import json
import os
import textwrap
import time

import pytest

from ragtune_local.procs import group_members

pytestmark = [pytest.mark.platform, pytest.mark.slow,
              pytest.mark.skipif(bool(os.environ.get("RAGTUNE_TEST_KUBECONFIG")),
                                 reason="tests the local platform itself, not an external cluster")]


def _pod_spec(command: list[str], restart: str = "Never", **container: object) -> dict:
    return {"restartPolicy": restart, "terminationGracePeriodSeconds": 3,
            "containers": [{"name": "main", "image": "local/shell", "command": command, **container}]}


def _job(name: str, command: list[str], backoff: int = 0, **container: object) -> str:
    return json.dumps({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
                       "spec": {"backoffLimit": backoff, "template": {"spec": _pod_spec(command, **container)}}})


def _pod(name: str, command: list[str], restart: str = "Never", container: dict | None = None, **spec: object) -> str:
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": _pod_spec(command, restart, **(container or {}))}
    body["spec"].update(spec)
    return json.dumps(body)


def _pod_json(platform, namespace: str, selector: str) -> dict:
    return json.loads(platform.kubectl("-n", namespace, "get", "pods", "-l", selector, "-o", "json"))["items"][0]


def test_job_runs_local_command_with_secret_env_volumes_and_termination_message(platform, namespace):
    platform.kubectl("-n", namespace, "create", "secret", "generic", "creds", "--from-literal=token=s3cr3t")
    platform.kubectl("-n", namespace, "create", "configmap", "cfg", "--from-literal=mode=fast")
    script = ('test "$TOKEN" = s3cr3t && test "$(cat /etc/cfg/mode)" = fast && echo scratch > /scratch/f '
              '&& echo "{\\"outcome\\":\\"Succeeded\\",\\"pod\\":\\"$POD\\"}" > /dev/termination-log '
              '&& echo ran-on-$POD_IP')
    job = json.loads(_job("ok", ["sh", "-c", script],
                          env=[{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                               {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                               {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                          volumeMounts=[{"name": "cfg", "mountPath": "/etc/cfg"}, {"name": "work", "mountPath": "/scratch"}]))
    job["spec"]["template"]["spec"]["volumes"] = [{"name": "cfg", "configMap": {"name": "cfg"}},
                                                  {"name": "work", "emptyDir": {}}]
    platform.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(job))
    platform.wait_for("job", "ok", "{.status.succeeded}", "1", namespace=namespace)
    pod = _pod_json(platform, namespace, "job-name=ok")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 0 and terminated["reason"] == "Completed"
    assert json.loads(terminated["message"]) == {"outcome": "Succeeded", "pod": pod["metadata"]["name"]}
    assert pod["spec"]["nodeName"] == "ragtune-local"
    assert platform.kubectl("-n", namespace, "logs", "job/ok").strip() == f"ran-on-{pod['status']['podIP']}"
    assert not os.path.exists("/scratch/f"), "the emptyDir must be mounted only inside the container's namespace"
    # resolved secrets reach the container over a pipe: nothing the runner keeps on disk holds them
    pod_dir = platform.local.state_dir / "runner" / "pods" / pod["metadata"]["uid"]
    files = [f for f in pod_dir.rglob("*") if f.is_file()]
    assert files and not [f for f in files if b"s3cr3t" in f.read_bytes()]


def test_failing_command_fails_the_job_with_exit_code_and_logs_fallback(platform, namespace):
    platform.kubectl("-n", namespace, "apply", "-f", "-",
                     input=_job("bad", ["sh", "-c", "echo 'dataset missing' >&2; exit 3"],
                                terminationMessagePolicy="FallbackToLogsOnError"))
    platform.wait_for("job", "bad", '{.status.conditions[?(@.type=="Failed")].status}', "True", namespace=namespace)
    terminated = _pod_json(platform, namespace, "job-name=bad")["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 3 and terminated["reason"] == "Error"
    assert "dataset missing" in terminated["message"]


def test_deleting_a_running_pod_stops_its_process_group(platform, namespace):
    # The child ignores nothing: SIGTERM to the group stops both the shell and its sleep.
    platform.kubectl("-n", namespace, "apply", "-f", "-", input=_pod("sleeper", ["sh", "-c", "sleep 600 & wait"]))
    platform.wait_for("pod", "sleeper", "{.status.phase}", "Running", namespace=namespace)
    cid = platform.wait_for("pod", "sleeper", "{.status.containerStatuses[0].containerID}",
                            lambda v: v.startswith("local://"), namespace=namespace)
    pid = int(cid.removeprefix("local://"))
    assert group_members(pid), "the container's process group should be alive"
    platform.kubectl("-n", namespace, "delete", "pod", "sleeper", "--timeout=30s")
    assert not group_members(pid)


def test_sigterm_ignoring_process_is_killed_after_grace_period(platform, namespace):
    platform.kubectl("-n", namespace, "apply", "-f", "-",
                     input=_pod("stubborn", ["sh", "-c", "trap '' TERM; while true; do sleep 0.2; done"],
                                terminationGracePeriodSeconds=2))
    cid = platform.wait_for("pod", "stubborn", "{.status.containerStatuses[0].containerID}",
                            lambda v: v.startswith("local://"), namespace=namespace)
    pid = int(cid.removeprefix("local://"))
    t0 = time.monotonic()
    platform.kubectl("-n", namespace, "delete", "pod", "stubborn", "--timeout=30s")
    assert time.monotonic() - t0 >= 1.5, "SIGKILL must wait for the grace period"
    assert not group_members(pid)


def test_logs_tail_and_follow_through_the_api_server(platform, namespace):
    platform.kubectl("-n", namespace, "apply", "-f", "-",
                     input=_pod("counter", ["sh", "-c", "for i in 1 2 3 4 5; do echo line-$i; sleep 0.3; done"]))
    # Like a kubelet, the runner refuses logs of a container that has not started yet.
    platform.wait_for("pod", "counter", "{.status.phase}", lambda v: v in ("Running", "Succeeded"), namespace=namespace)
    followed = platform.kubectl("-n", namespace, "logs", "-f", "counter", timeout=60)
    assert followed.split() == [f"line-{i}" for i in range(1, 6)]
    assert platform.kubectl("-n", namespace, "logs", "counter", "--tail=2").split() == ["line-4", "line-5"]


def test_init_containers_run_first_and_share_volumes(platform, namespace):
    init = [{"name": "fetch", "image": "local/shell", "command": ["sh", "-c", "echo fetched > /data/x"],
             "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]
    platform.kubectl("-n", namespace, "apply", "-f", "-",
                     input=_pod("withinit", ["cat", "/data/x"], initContainers=init,
                                container={"volumeMounts": [{"name": "data", "mountPath": "/data"}]},
                                volumes=[{"name": "data", "emptyDir": {}}]))
    platform.wait_for("pod", "withinit", "{.status.phase}", "Succeeded", namespace=namespace)
    status = json.loads(platform.kubectl("-n", namespace, "get", "pod", "withinit", "-o", "json"))["status"]
    assert status["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    assert platform.kubectl("-n", namespace, "logs", "withinit").strip() == "fetched"


def test_on_failure_restarts_with_backoff(platform, namespace):
    platform.kubectl("-n", namespace, "apply", "-f", "-", input=_pod("flaky", ["sh", "-c", "exit 1"], restart="OnFailure"))
    platform.wait_for("pod", "flaky", "{.status.containerStatuses[0].restartCount}",
                      lambda v: v.isdigit() and int(v) >= 2, namespace=namespace, timeout=60)
    status = json.loads(platform.kubectl("-n", namespace, "get", "pod", "flaky", "-o", "json"))["status"]
    container = status["containerStatuses"][0]
    assert container["lastState"]["terminated"]["exitCode"] == 1
    assert status["phase"] in ("Running", "Pending")


def test_unknown_image_reports_err_image_pull(platform, namespace):
    pod = json.loads(_pod("noimage", ["true"]))
    pod["spec"]["containers"][0]["image"] = "example.com/not-in-the-table:1"
    platform.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(pod))
    platform.wait_for("pod", "noimage", "{.status.containerStatuses[0].state.waiting.reason}",
                      lambda v: v in ("ErrImagePull", "ImagePullBackOff"), namespace=namespace)
    message = platform.kubectl("-n", namespace, "get", "pod", "noimage", "-o",
                               "jsonpath={.status.containerStatuses[0].state.waiting.message}")
    assert "example.com/not-in-the-table" in message
    logs = platform.kubectl("-n", namespace, "logs", "noimage", check=False)
    assert "is waiting to start" in logs


def test_missing_secret_is_a_config_error_until_created(platform, namespace):
    env = [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "later", "key": "x"}}}]
    platform.kubectl("-n", namespace, "apply", "-f", "-", input=_job("waits", ["sh", "-c", "echo $X"], env=env))
    platform.wait_for("pods", "", "{.items[0].status.containerStatuses[0].state.waiting.reason}",
                      "CreateContainerConfigError", namespace=namespace)
    platform.kubectl("-n", namespace, "create", "secret", "generic", "later", "--from-literal=x=now-here")
    platform.wait_for("job", "waits", "{.status.succeeded}", "1", namespace=namespace)
    assert platform.kubectl("-n", namespace, "logs", "job/waits").strip() == "now-here"


def test_service_names_resolve_to_a_ready_pod(platform, namespace):
    server = json.loads(_pod("srv", ["python3", "-m", "http.server", "8081", "--bind", "$(POD_IP)"], restart="Always"))
    server["metadata"]["labels"] = {"app": "srv"}
    c = server["spec"]["containers"][0]
    c["env"] = [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    c["readinessProbe"] = {"httpGet": {"path": "/", "port": 8081}, "periodSeconds": 1}
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "srv"},
           "spec": {"selector": {"app": "srv"}, "ports": [{"port": 8081, "targetPort": 8081}]}}
    platform.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(server))
    platform.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(svc))
    platform.wait_for("pod", "srv", '{.status.conditions[?(@.type=="Ready")].status}', "True", namespace=namespace)
    fetch = ("import urllib.request,sys;"
             f"print(urllib.request.urlopen('http://srv.{namespace}.svc.cluster.local:8081/').status,"
             "urllib.request.urlopen('http://srv:8081/').status)")
    platform.kubectl("-n", namespace, "apply", "-f", "-", input=_job("client", ["python3", "-c", fetch], backoff=2))
    platform.wait_for("job", "client", "{.status.succeeded}", "1", namespace=namespace, timeout=60)
    assert platform.kubectl("-n", namespace, "logs", "job/client").split() == ["200", "200"]
    # The EndpointSlice controller accepts the pod IP (it refuses loopback ones): what a Gateway routes to.
    pod_ip = platform.kubectl("-n", namespace, "get", "pod", "srv", "-o", "jsonpath={.status.podIP}")
    platform.wait_for("endpointslices", None, "{.items[*].endpoints[*].addresses[*]}", pod_ip, namespace=namespace,
                      timeout=30)


def test_indexed_job_pods_have_their_hostnames_and_find_index_0_through_the_headless_service(platform, namespace):
    """What torchrun's rendezvous needs: each pod's hostname is `<job>-<index>` (set by the Job
    controller, honoured by the pod runner) and `<job>-0.<subdomain>` resolves in the other pods."""
    rendezvous = textwrap.dedent("""
        import os, socket, sys, time
        index = int(os.environ["JOB_COMPLETION_INDEX"])
        print("hostname", socket.gethostname(), flush=True)
        if index == 0:
            srv = socket.create_server((os.environ["POD_IP"], 29400))
            conn, _ = srv.accept()
            print("index 0 got", conn.recv(64).decode(), flush=True)
        else:
            for _ in range(120):  # index 0 may start later, as in a real cluster
                try:
                    with socket.create_connection(("rdzv-0.rdzv", 29400), timeout=2) as c:
                        c.sendall(b"hello from " + socket.gethostname().encode())
                        break
                except OSError:
                    time.sleep(0.5)
            else:
                sys.exit("rdzv-0.rdzv never answered")
    """)
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "rdzv"},
           "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {"job-name": "rdzv"},
                    "ports": [{"port": 29400}]}}
    spec = _pod_spec(["python3", "-c", rendezvous])
    spec["subdomain"] = "rdzv"
    spec["containers"][0]["env"] = [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "rdzv"},
           "spec": {"completionMode": "Indexed", "completions": 2, "parallelism": 2, "backoffLimit": 0,
                    "template": {"spec": spec}}}
    platform.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(svc))
    platform.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(job))
    platform.wait_for("job", "rdzv", "{.status.succeeded}", "2", namespace=namespace, timeout=120)
    pods = json.loads(platform.kubectl("-n", namespace, "get", "pods", "-l", "job-name=rdzv", "-o", "json"))["items"]
    logs = {p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]:
            platform.kubectl("-n", namespace, "logs", p["metadata"]["name"]) for p in pods}
    assert "hostname rdzv-0" in logs["0"] and "hostname rdzv-1" in logs["1"]
    assert "index 0 got hello from rdzv-1" in logs["0"]


def test_volume_above_the_checkout_keeps_the_checkout_visible(platform, namespace):
    """An emptyDir at e.g. /tmp must work when the checkout itself lives under /tmp (CI clones)."""
    from ragtune_local.paths import REPO_ROOT

    script = f"test -f {REPO_ROOT}/pyproject.toml && ls {REPO_ROOT.parent}"
    pod = json.loads(_pod("above", ["sh", "-c", script],
                          container={"volumeMounts": [{"name": "v", "mountPath": str(REPO_ROOT.parent)}]},
                          volumes=[{"name": "v", "emptyDir": {}}]))
    platform.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(pod))
    platform.wait_for("pod", "above", "{.status.phase}", "Succeeded", namespace=namespace, timeout=60)
    # the emptyDir covers the parent (nothing else of the host shows), the checkout is bound back
    assert platform.kubectl("-n", namespace, "logs", "above").split() == [REPO_ROOT.name]


def test_volume_replacing_the_checkout_is_a_clear_config_error(platform, namespace):
    from ragtune_local.paths import REPO_ROOT

    pod = json.loads(_pod("shadow", ["true"], container={"volumeMounts": [{"name": "v", "mountPath": str(REPO_ROOT)}]},
                          volumes=[{"name": "v", "emptyDir": {}}]))
    platform.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(pod))
    message = platform.wait_for("pod", "shadow", "{.status.containerStatuses[0].state.waiting.message}",
                                lambda v: "would replace" in v, namespace=namespace)
    assert str(REPO_ROOT) in message


def test_ragtune_images_run_the_venv_entry_point(platform, namespace):
    from ragtune.api.pods import OPERATOR_IMAGE

    job = json.loads(_job("cli", ["ragtune", "--help"]))
    job["spec"]["template"]["spec"]["containers"][0]["image"] = f"{OPERATOR_IMAGE}:0.1.0"
    platform.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(job))
    platform.wait_for("job", "cli", "{.status.succeeded}", "1", namespace=namespace)
    assert "crds" in platform.kubectl("-n", namespace, "logs", "job/cli")


def test_logs_readable_with_the_kubernetes_client_and_previous_restart(platform, namespace):
    from kubernetes import client

    platform.kubectl("-n", namespace, "apply", "-f", "-",
                     input=_pod("again", ["sh", "-c", "echo run-at-$(date +%s%N); exit 1"], restart="OnFailure"))
    platform.wait_for("pod", "again", "{.status.containerStatuses[0].restartCount}",
                      lambda v: v.isdigit() and int(v) >= 1, namespace=namespace)
    core = client.CoreV1Api(platform.api_client())
    previous = core.read_namespaced_pod_log("again", namespace, previous=True)
    assert previous.startswith("run-at-")


def test_a_volume_over_the_runner_state_dir_does_not_hide_the_other_volumes(platform, namespace):
    if platform.local is None:
        pytest.skip("about the local runner's own directories")
    over = str(platform.local.state_dir.parent)  # every volume's host directory lives below this
    mounts = [{"name": "a", "mountPath": over}, {"name": "b", "mountPath": "/scratch-b"}]
    pod = _pod("overlap", ["sh", "-c", f"ls -A {over} | wc -l; echo hi > /scratch-b/f && cat /scratch-b/f"],
               container={"volumeMounts": mounts}, volumes=[{"name": "a", "emptyDir": {}}, {"name": "b", "emptyDir": {}}])
    platform.kubectl("-n", namespace, "apply", "-f", "-", input=pod)
    platform.wait_for("pod", "overlap", "{.status.phase}", "Succeeded", namespace=namespace)
    assert platform.kubectl("-n", namespace, "logs", "overlap").split() == ["0", "hi"]


def test_failing_liveness_probe_restarts_the_container(platform, namespace):
    probe = {"tcpSocket": {"port": 9}, "periodSeconds": 1, "failureThreshold": 2}  # nothing listens on port 9
    platform.kubectl("-n", namespace, "apply", "-f", "-",
                     input=_pod("unhealthy", ["sleep", "600"], restart="Always", container={"livenessProbe": probe}))
    platform.wait_for("pod", "unhealthy", "{.status.containerStatuses[0].restartCount}",
                      lambda v: v.isdigit() and int(v) >= 1, namespace=namespace, timeout=60)
    last = json.loads(platform.kubectl("-n", namespace, "get", "pod", "unhealthy", "-o", "json"))
    assert last["status"]["containerStatuses"][0]["lastState"]["terminated"]["exitCode"] == 143  # SIGTERM
