"""`helm lint` and `helm template`: modes, RBAC, security context, probes, schema errors.

Needs only the helm binary the local platform builds (no running cluster), so it is marked
`platform` to stay out of `make test-fast` on machines that have not built it yet.
"""

from __future__ import annotations

import pytest
import yaml

from ..security.permissions import flatten
from .chartlib import CHART, KUBE_VERSION, helm, permissions, rbac_rules, render, set_args

pytestmark = pytest.mark.platform

CHART_META = yaml.safe_load((CHART / "Chart.yaml").read_text())


@pytest.mark.parametrize("values", [
    {},
    {"watch.mode": "cluster"},
    {"watch.namespaces": ["team-a", "team-b"], "metrics.serviceMonitor.enabled": True},
    {"metrics.enabled": False, "rbac.create": False, "serviceAccount.create": False, "serviceAccount.name": "ops"},
])
def test_helm_lint_strict_is_clean(values):
    proc = helm("lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION, *set_args(values))
    assert "0 chart(s) failed" in proc.stdout
    # --strict turns warnings into failures; INFO lines (e.g. "icon is recommended") are not allowed either.
    assert "[INFO]" not in proc.stdout and "[WARNING]" not in proc.stdout, proc.stdout


def watch_roles(out, kind: str) -> list[dict]:
    """The Roles/RoleBindings of the watched namespaces (not the leader-election pair)."""
    return [r for r in out.of_kind(kind) if not r["metadata"]["name"].endswith("-leader-election")]


@pytest.mark.parametrize("mode", ["namespaced", "cluster"])
def test_leader_election_lease_in_the_release_namespace_only(mode):
    out = render({"watch.mode": mode, "watch.namespaces": ["team-a"]}, namespace="ops")
    role = next(r for r in out.of_kind("Role") if r["metadata"]["name"].endswith("-leader-election"))
    binding = next(b for b in out.of_kind("RoleBinding") if b["metadata"]["name"].endswith("-leader-election"))
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "ops"
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    by_verbs = {tuple(r["verbs"]): r for r in role["rules"]}
    assert by_verbs[("get", "update")]["resourceNames"] == ["ragtune-operator"]
    assert "resourceNames" not in by_verbs[("create",)]  # create cannot be restricted by name
    env = {e["name"]: e.get("value") for e in out.container["env"]}
    assert env["RAGTUNE_LEADER_ELECTION"] == "true" and env["RAGTUNE_LEASE_SECONDS"] == "15"


def test_replicas_get_a_disruption_budget_spread_and_a_rolling_update():
    out = render()
    deployment = out.one("Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate",
                                              "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    pdb = out.one("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    term = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    single = render({"replicas": 1})
    assert single.of_kind("PodDisruptionBudget") == []
    assert single.one("Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    custom = render({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "In", "values": ["ops"]}]}]}}}})
    assert "podAntiAffinity" not in custom.one("Deployment")["spec"]["template"]["spec"]["affinity"]


def test_namespaced_mode_uses_roles_in_each_watched_namespace_only():
    out = render({"watch.namespaces": ["team-a", "team-b"]})
    assert out.of_kind("ClusterRole") == [] and out.of_kind("ClusterRoleBinding") == []
    roles = {r["metadata"]["namespace"] for r in watch_roles(out, "Role")}
    bindings = {b["metadata"]["namespace"]: b for b in watch_roles(out, "RoleBinding")}
    assert roles == set(bindings) == {"team-a", "team-b"}
    for binding in bindings.values():
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ragtune", "namespace": "ragtune-system"}]
    args = out.container["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args and "--all-namespaces" not in args
    env = {e["name"]: e.get("value") for e in out.container["env"]}
    assert env["RAGTUNE_WATCH_NAMESPACES"] == "team-a,team-b"


def test_namespaced_mode_defaults_to_the_release_namespace():
    out = render(namespace="ml")
    assert [r["metadata"]["namespace"] for r in watch_roles(out, "Role")] == ["ml"]
    assert "--namespace=ml" in out.container["args"]


def test_cluster_mode_uses_one_cluster_role():
    out = render({"watch.mode": "cluster", "watch.namespaces": ["ignored"]})
    assert watch_roles(out, "Role") == [] and watch_roles(out, "RoleBinding") == []
    assert out.one("ClusterRoleBinding")["roleRef"]["name"] == out.one("ClusterRole")["metadata"]["name"]
    assert "--all-namespaces" in out.container["args"]
    assert not any(a.startswith("--namespace") for a in out.container["args"])


def test_rbac_is_exactly_the_documented_permission_list():
    for mode in ("namespaced", "cluster"):
        granted = permissions(rbac_rules(render({"watch.mode": mode})))
        assert granted == flatten(), (
            f"{mode}: surplus {sorted(granted - flatten())}, missing {sorted(flatten() - granted)}")


@pytest.mark.parametrize("mode", ["namespaced", "cluster"])
def test_rbac_never_grants_secrets_or_wildcards(mode):
    rules = rbac_rules(render({"watch.mode": mode}))
    for rule in rules:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
        assert not any(r.split("/")[0] in ("secrets", "serviceaccounts") for r in rule["resources"]), rule
        if "configmaps" in rule["resources"]:  # vLLM's desired-set ConfigMaps: by name, never listed or watched
            assert rule["resources"] == ["configmaps"] and not {"list", "watch", "patch"} & set(rule["verbs"]), rule
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule


def test_operator_pod_is_restricted_and_probed():
    out = render()
    pod = out.one("Deployment")["spec"]["template"]["spec"]
    container = out.container
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert container["command"] == ["ragtune", "operator", "run"]
    assert "--liveness=http://0.0.0.0:8081/healthz" in container["args"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": 8081}, probe
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert out.one("Deployment")["spec"]["replicas"] == 2  # one leads, one stands by (leader election)
    assert out.one("Deployment")["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert out.one("ServiceAccount")["automountServiceAccountToken"] is False
    assert pod["automountServiceAccountToken"] is True


def test_images_default_to_app_version_and_digest_pins():
    app = CHART_META["appVersion"]
    env = {e["name"]: e.get("value") for e in render().container["env"]}
    assert render().container["image"] == f"ghcr.io/ragtune/ragtune-operator:{app}"
    assert env["RAGTUNE_TRAINER_IMAGE"] == f"ghcr.io/ragtune/ragtune-trainer:{app}"
    digest = "sha256:" + "a" * 64
    out = render({"image.digest": digest, "trainer.image.tag": "custom"})
    env = {e["name"]: e.get("value") for e in out.container["env"]}
    assert out.container["image"] == f"ghcr.io/ragtune/ragtune-operator@{digest}"
    assert env["RAGTUNE_OPERATOR_IMAGE"] == out.container["image"]
    assert env["RAGTUNE_TRAINER_IMAGE"] == "ghcr.io/ragtune/ragtune-trainer:custom"


def test_metrics_service_and_service_monitor_select_the_operator():
    out = render({"metrics.serviceMonitor.enabled": True, "metrics.port": 9100,
                  "metrics.serviceMonitor.labels": {"release": "prom"}})
    service, monitor = out.one("Service"), out.one("ServiceMonitor")
    pod_labels = out.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["port"] == service["spec"]["ports"][0]["targetPort"] == 9100
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert {"name": "RAGTUNE_METRICS_PORT", "value": "9100"} in out.container["env"]
    assert render().of_kind("ServiceMonitor") == []
    off = render({"metrics.enabled": False})
    assert off.of_kind("Service") == [] and {"name": "RAGTUNE_METRICS_PORT", "value": "0"} in off.container["env"]


def test_crds_ship_in_the_chart_crds_dir():
    docs = render(include_crds=True).of_kind("CustomResourceDefinition")
    assert {d["metadata"]["name"] for d in docs} == {"finetunejobs.ragtune.dev", "adapterdeployments.ragtune.dev"}
    assert render().of_kind("CustomResourceDefinition") == [], "CRDs must not be templates (uninstall would delete them)"


@pytest.mark.parametrize("values, key", [
    ({"watch.mode": "sideways"}, "watch.mode"),
    ({"metrics.port": "http"}, "metrics.port"),
    ({"replicaCount": 3}, "replicaCount"),
    ({"securityContext.allowPrivilegeEscalation": True}, "securityContext.allowPrivilegeEscalation"),
])
def test_wrong_value_fails_rendering_with_the_key_named(values, key):
    proc = helm("template", "x", str(CHART), "--kube-version", KUBE_VERSION, *set_args(values), check=False)
    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr
    # helm names the key as a JSON pointer, or as the unexpected property.
    pointer = "'/" + key.replace(".", "/") + "'"
    assert pointer in proc.stderr or f"properties '{key}' not allowed" in proc.stderr, proc.stderr

