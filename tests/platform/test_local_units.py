"""Unit tests of the local platform's pure parts (no processes started)."""

from __future__ import annotations

import ssl
import subprocess

import pytest
import yaml

from ragtune_local import images, pki
from ragtune_local.podenv import ConfigError, container_env, container_mounts, expand, hosts_file, pod_hostname


def test_image_repository_parsing():
    assert images.repository("ghcr.io/ragtune/ragtune-trainer:0.1.0") == "ghcr.io/ragtune/ragtune-trainer"
    assert images.repository("localhost:5000/x/y") == "localhost:5000/x/y"
    assert images.repository("busybox@sha256:abc") == "busybox"


def test_image_argv_follows_command_args_rules():
    assert images.local_argv("ghcr.io/ragtune/ragtune-trainer:1", ["ragtune", "train", "--in-cluster"], None) == \
        ["ragtune", "train", "--in-cluster"]
    tgi = images.local_argv("ghcr.io/huggingface/text-generation-inference:3.3.4", None, ["--port", "80"])
    assert tgi[1:] == ["-m", "ragtune_local.testdoubles.tgi_standin", "--port", "80"]
    # Kubernetes: args alone replace CMD but keep ENTRYPOINT; neither runs ENTRYPOINT + CMD.
    assert images.local_argv("ghcr.io/ragtune/ragtune-operator:1", None, ["crds", "--check"]) == ["ragtune", "crds", "--check"]
    assert images.local_argv("ghcr.io/ragtune/ragtune-operator:1", None, None) == \
        ["ragtune", "operator", "run", "--all-namespaces"]
    assert images.local_argv("ragtune.test/fake-trainer:dev", ["ragtune", "train"], None)[1:] == \
        ["-m", "ragtune_local.testdoubles.fake_trainer"]
    with pytest.raises(images.ImageNotFound, match="set the container's `command`"):
        images.local_argv("local/shell", None, None)
    with pytest.raises(images.ImageNotFound, match="nginx"):
        images.lookup("nginx:1.27")
    assert images.base_env()["PATH"].startswith(images.VENV_BIN + ":")


def test_dollar_expansion_matches_kubernetes():
    env = {"A": "1", "B": "two"}
    assert expand("$(A)-$(B)", env) == "1-two"
    assert expand("$(MISSING)", env) == "$(MISSING)"
    assert expand("$$(A)", env) == "$(A)"


class _Objects:
    namespace = "ns"

    def __init__(self, data):
        self._data = data

    def data(self, kind, name, optional):
        if (kind, name) not in self._data:
            if optional:
                return {}
            raise ConfigError(f'{kind.lower()} "{name}" not found')
        return self._data[(kind, name)]


def test_container_env_resolution_and_missing_keys():
    pod = {"metadata": {"name": "p", "namespace": "ns", "uid": "u", "labels": {"app": "x"}}, "spec": {}}
    container = {"envFrom": [{"configMapRef": {"name": "cm"}, "prefix": "CM_"}],
                 "env": [{"name": "S", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "k"}}},
                         {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                         {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                         {"name": "JOINED", "value": "$(S)@$(IP)"}]}
    objects = _Objects({("Secret", "sec"): {"k": b"v"}, ("ConfigMap", "cm"): {"mode": b"m"}})
    env = container_env(pod, container, objects, {"PATH": "/bin"}, "127.100.0.2", "127.0.0.1")
    assert env == {"PATH": "/bin", "CM_mode": "m", "S": "v", "IP": "127.100.0.2", "APP": "x", "JOINED": "v@127.100.0.2"}
    bad = {"env": [{"name": "S", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "nope"}}}]}
    with pytest.raises(ConfigError, match="nope"):
        container_env(pod, bad, objects, {}, "", "")
    with pytest.raises(ConfigError, match='secret "gone" not found'):
        container_env(pod, {"env": [{"name": "S", "valueFrom": {"secretKeyRef": {"name": "gone", "key": "k"}}}]},
                      objects, {}, "", "")


def test_mounts_are_ordered_parent_first_and_unknown_volumes_rejected(tmp_path):
    vols = {"a": tmp_path / "a", "b": tmp_path / "b"}
    mounts = container_mounts({"volumeMounts": [{"name": "b", "mountPath": "/data/sub/deep"},
                                                {"name": "a", "mountPath": "/data", "readOnly": True}]}, vols)
    assert [m["target"] for m in mounts] == ["/data", "/data/sub/deep"] and mounts[0]["readOnly"]
    with pytest.raises(ConfigError, match="unknown volume 'c'"):
        container_mounts({"volumeMounts": [{"name": "c", "mountPath": "/x"}]}, vols)


def _pod(name: str, namespace: str, **spec) -> dict:
    return {"metadata": {"name": name, "namespace": namespace}, "spec": spec}


def test_hosts_file_names_services_short_only_in_own_namespace():
    text = hosts_file(_pod("pod-1", "a"), "127.100.0.5", {("a", "tgi"): "127.100.0.9", ("b", "s3"): "127.100.0.7"})
    assert "127.100.0.5\tpod-1" in text
    assert "127.100.0.9\ttgi tgi.a tgi.a.svc tgi.a.svc.cluster.local" in text
    assert "127.100.0.7\ts3.b s3.b.svc s3.b.svc.cluster.local" in text


def test_hosts_file_gives_a_pod_with_a_subdomain_its_fqdn_and_peers_their_records():
    pod = _pod("train-0-x7k2p", "a", hostname="train-0", subdomain="train")
    text = hosts_file(pod, "127.100.0.5", {("a", "train-1.train"): "127.100.0.6"})
    # as a kubelet writes it: the FQDN first, then the short hostname
    assert "127.100.0.5\ttrain-0.train.a.svc.cluster.local\ttrain-0\n" in text
    assert "127.100.0.6\ttrain-1.train train-1.train.a train-1.train.a.svc train-1.train.a.svc.cluster.local" in text
    assert pod_hostname(_pod("p" * 70, "a")) == ("p" * 63, "")


def test_pki_issues_certs_the_ca_verifies(tmp_path):
    ca = pki.CertAuthority(tmp_path)
    crt, key = ca.issue("server", "srv", server=True, ips=("127.0.0.1",), dns=("localhost",))
    out = subprocess.run(["openssl", "verify", "-CAfile", str(ca.ca_path), str(crt)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(crt, key)  # the key matches the certificate
    kc = pki.write_kubeconfig(tmp_path / "kc", "https://127.0.0.1:1", ca.ca_path, crt, key, "u")
    assert yaml.safe_load(kc.read_text())["users"][0]["name"] == "u"
    assert oct(kc.stat().st_mode & 0o777) == "0o600"


def test_helper_processes_die_with_the_process_that_started_them(tmp_path):
    """A pytest (or demo) killed with SIGKILL leaves no operator behind: terminate_with_parent."""
    import os
    import sys
    import time

    from ragtune_local.procs import ProcRef

    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "from ragtune_local.procs import terminate_with_parent\n"
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], preexec_fn=terminate_with_parent)\n"
        f"open({str(pid_file)!r}, 'w').write(str(c.pid))\n"
        "time.sleep(120)\n")])
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = ProcRef.of(int(pid_file.read_text()))
    assert child.alive()
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while child.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = child.alive()
    if alive:
        os.kill(child.pid, 9)
    assert not alive, "the child outlived its killed parent"


def test_localhost_in_a_pod_is_the_pod_itself():
    """No network namespaces here: `localhost` must not be 127.0.0.1 (every pod's and the host's at
    once), or two vLLM pods' loopback-only servers would collide (adapterdeployment/render.py)."""
    text = hosts_file(_pod("pod-1", "a"), "127.100.0.5", {})
    assert "127.100.0.5\tlocalhost" in text.splitlines()
    assert not any(line.startswith("127.0.0.1") for line in text.splitlines())
    assert "localhost" not in next(line for line in text.splitlines() if line.startswith("::1")).split()


def test_configmap_volumes_follow_their_configmap_atomically(tmp_path):
    from ragtune_local.podenv import refresh_configmap_volumes

    class Kube:
        data = {"adapters.json": '{"v": 1}'}

        def get(self, path):
            assert path == "/api/v1/namespaces/a/configmaps/set"
            return {"data": dict(self.data)}

    pod = {"metadata": {"name": "p", "namespace": "a"}, "spec": {"volumes": [
        {"name": "set", "configMap": {"name": "set", "items": [{"key": "adapters.json", "path": "adapters.json"}]}},
        {"name": "data", "emptyDir": {}}]}}
    vol = tmp_path / "set"
    vol.mkdir()
    (vol / "adapters.json").write_text('{"v": 1}')
    inode = vol.stat().st_ino
    kube = Kube()
    assert refresh_configmap_volumes(pod, {"set": vol, "data": tmp_path / "data"}, kube) == []
    kube.data = {"adapters.json": '{"v": 2}'}
    assert refresh_configmap_volumes(pod, {"set": vol, "data": tmp_path / "data"}, kube) == ["set"]
    assert (vol / "adapters.json").read_text() == '{"v": 2}'
    assert vol.stat().st_ino == inode, "the bind-mounted directory stays the same"
    assert [p.name for p in vol.iterdir()] == ["adapters.json"], "no temporary file left behind"


def test_an_api_server_that_does_not_answer_is_an_api_error_not_a_crash(tmp_path):
    """The pod runner's threads handle ApiError; a raw urllib3 timeout used to end the node heartbeat
    (node NotReady, pods evicted) and kill pod workers on a loaded machine."""
    import socket

    from ragtune_local.kubeclient import ApiError, Kube

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    try:
        kube = Kube(f"http://127.0.0.1:{silent.getsockname()[1]}", tmp_path / "ca", tmp_path / "c", tmp_path / "k",
                    timeout=0.3)
        with pytest.raises(ApiError) as err:
            kube.get("/api/v1/namespaces/a/configmaps/x")
        assert err.value.status == 0 and "configmaps/x" in err.value.message
    finally:
        silent.close()
