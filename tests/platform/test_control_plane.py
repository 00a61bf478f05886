"""The real control plane: CRDs enforced, scheduling onto kwok GPU nodes, Deployments, garbage collection."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from ragtune_local.kwok import FAKE_TOLERATION

pytestmark = [pytest.mark.platform, pytest.mark.slow]
local_only = pytest.mark.skipif(bool(os.environ.get("RAGTUNE_TEST_KUBECONFIG")),
                                reason="needs the local platform's kwok nodes / pod runner images")


def _job(name: str, *, image: str, command: list[str], gpu: bool = False, backoff: int = 0) -> dict:
    container = {"name": "main", "image": image, "command": command}
    spec: dict = {"restartPolicy": "Never", "containers": [container], "terminationGracePeriodSeconds": 2}
    if gpu:
        container["resources"] = {"limits": {"nvidia.com/gpu": 1}}
        spec["tolerations"] = [FAKE_TOLERATION]
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"backoffLimit": backoff, "template": {"spec": spec}}}


def test_crd_installs_and_rejects_invalid_objects(platform, namespace):
    names = platform.install_crds()
    assert "finetunejobs.ragtune.dev" in names
    explained = platform.kubectl("explain", "finetunejob.spec.output")
    assert "uri" in explained
    invalid = {"apiVersion": "ragtune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "bad"},
               "spec": {"baseModel": {"id": 42}}}
    with pytest.raises(subprocess.CalledProcessError) as err:
        platform.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(invalid))
    assert "spec" in err.value.stderr and ("Invalid" in err.value.stderr or "invalid" in err.value.stderr)
    assert platform.kubectl("-n", namespace, "get", "finetunejobs", "-o", "name") == ""


@local_only
def test_gpu_job_schedules_on_kwok_node_and_completes(platform, namespace):
    nodes = platform.gpu_nodes(2, gpus=4)
    platform.wait_for("node", nodes[0], '{.status.conditions[?(@.type=="Ready")].status}', "True")
    platform.kubectl("-n", namespace, "apply", "-f", "-",
                     input=json.dumps(_job("gpu", image="ghcr.io/ragtune/ragtune-trainer:test", command=["train"],
                                           gpu=True)))
    platform.wait_for("job", "gpu", '{.status.succeeded}', "1", namespace=namespace)
    node = platform.kubectl("-n", namespace, "get", "pods", "-l", "job-name=gpu", "-o",
                            "jsonpath={.items[0].spec.nodeName}")
    assert node in nodes


@local_only
def test_gpu_pod_without_toleration_stays_pending(platform, namespace):
    platform.gpu_nodes(1, gpus=4)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "no-toleration"},
           "spec": {"containers": [{"name": "main", "image": "local/shell", "command": ["true"],
                                    "resources": {"limits": {"nvidia.com/gpu": 1}}}]}}
    platform.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(pod))
    message = platform.wait_for("pod", "no-toleration", '{.status.conditions[?(@.type=="PodScheduled")].message}',
                                lambda v: "nvidia.com/gpu" in v or "untolerated" in v, namespace=namespace)
    assert "0/" in message


@local_only
@pytest.mark.parametrize("where", ["kwok", "runner"])
def test_deployment_becomes_available(platform, namespace, where):
    spec: dict = {"containers": [{"name": "web", "image": "local/shell",
                                  "command": ["python3", "-m", "http.server", "8080", "--bind", "$(POD_IP)"],
                                  "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                                  "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1}}],
                  "terminationGracePeriodSeconds": 2}
    if where == "kwok":
        platform.gpu_nodes(1)
        spec["tolerations"] = [FAKE_TOLERATION]
        spec["nodeSelector"] = {"type": "kwok"}
    deploy = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
              "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                       "template": {"metadata": {"labels": {"app": "web"}}, "spec": spec}}}
    platform.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(deploy))
    platform.kubectl("-n", namespace, "rollout", "status", "deployment/web", "--timeout=60s")
    assert platform.wait_for("deployment", "web", '{.status.availableReplicas}', "2", namespace=namespace)
    nodes = set(platform.kubectl("-n", namespace, "get", "pods", "-l", "app=web", "-o",
                                 "jsonpath={.items[*].spec.nodeName}").split())
    assert (nodes == {"ragtune-local"}) == (where == "runner")


def test_owner_reference_garbage_collection(platform, namespace):
    platform.kubectl("-n", namespace, "create", "configmap", "parent")
    uid = platform.kubectl("-n", namespace, "get", "configmap", "parent", "-o", "jsonpath={.metadata.uid}")
    child = {"apiVersion": "v1", "kind": "ConfigMap",
             "metadata": {"name": "child", "ownerReferences": [
                 {"apiVersion": "v1", "kind": "ConfigMap", "name": "parent", "uid": uid}]}}
    platform.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(child))
    platform.kubectl("-n", namespace, "delete", "configmap", "parent")
    platform.wait_for("configmaps", "", "{.items[*].metadata.name}",
                      lambda names: "child" not in names.split() and "parent" not in names.split(),
                      namespace=namespace, timeout=60)


@local_only
def test_job_deletion_cascades_to_pods(platform, namespace):
    platform.kubectl("-n", namespace, "apply", "-f", "-",
                     input=json.dumps(_job("sleeper", image="local/shell", command=["sleep", "300"])))
    platform.wait_for("pods", "", "{.items[*].status.phase}", "Running", namespace=namespace)
    platform.kubectl("-n", namespace, "delete", "job", "sleeper", "--cascade=foreground", "--timeout=60s")
    platform.wait_for("pods", "", "{.items[*].metadata.name}", "", namespace=namespace, timeout=60)


@local_only
def test_pod_service_account_token_reaches_api_server(platform, namespace):
    """In-cluster clients work: projected token + KUBERNETES_SERVICE_HOST on loopback."""
    script = ("import os,ssl,urllib.request;d='/var/run/secrets/kubernetes.io/serviceaccount/';"
              "ctx=ssl.create_default_context(cafile=d+'ca.crt');"
              "url='https://%s:%s/api/v1/namespaces/%s/pods'%(os.environ['KUBERNETES_SERVICE_HOST'],"
              "os.environ['KUBERNETES_SERVICE_PORT'],open(d+'namespace').read());"
              "req=urllib.request.Request(url,headers={'Authorization':'Bearer '+open(d+'token').read()});"
              "\ntry:\n urllib.request.urlopen(req,context=ctx)\nexcept urllib.error.HTTPError as e:\n print(e.code)")
    platform.kubectl("-n", namespace, "apply", "-f", "-",
                     input=json.dumps(_job("sa", image="local/shell", command=["python3", "-c", script])))
    platform.wait_for("job", "sa", "{.status.succeeded}", "1", namespace=namespace)
    # Authenticated as the namespace's default ServiceAccount, which RBAC does not let list pods.
    assert platform.kubectl("-n", namespace, "logs", "job/sa").strip() == "403"
