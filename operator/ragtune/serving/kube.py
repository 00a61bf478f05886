"""A thin JSON client over the kubernetes package's ApiClient (auth from kubeconfig or the
in-cluster ServiceAccount). The AdapterDeployment controller works with plain wire-form dicts:
what it renders is exactly what it sends, and what it reads is what `kubectl get -o json` shows."""

from __future__ import annotations

import json
from typing import Any, Optional

MERGE_PATCH = "application/merge-patch+json"

# kind -> (API path prefix, plural)
KINDS = {
    "Deployment": ("/apis/apps/v1", "deployments"),
    "Service": ("/api/v1", "services"),
    "Job": ("/apis/batch/v1", "jobs"),
    "Pod": ("/api/v1", "pods"),
    "FineTuneJob": ("/apis/ragtune.dev/v1alpha1", "finetunejobs"),
    "AdapterDeployment": ("/apis/ragtune.dev/v1alpha1", "adapterdeployments"),
}


class KubeError(Exception):
    def __init__(self, status: int, method: str, path: str, body: str):
        try:
            detail = json.loads(body)
            message, reason = detail.get("message", body), detail.get("reason", "")
        except ValueError:
            message, reason = body, ""
        super().__init__(f"{method} {path}: HTTP {status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message


def path(kind: str, namespace: str, name: Optional[str] = None, sub: Optional[str] = None) -> str:
    prefix, plural = KINDS[kind]
    out = f"{prefix}/namespaces/{namespace}/{plural}"
    if name:
        out += f"/{name}"
    if sub:
        out += f"/{sub}"
    return out


class Kube:
    def __init__(self, api_client=None):
        if api_client is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api_client = client.ApiClient()
        self.api = api_client

    def request(self, method: str, url_path: str, body: Any = None, query: Optional[dict[str, Any]] = None,
                content_type: str = "application/json") -> dict[str, Any]:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        method, url, headers, body, post = self.api.param_serialize(
            method, url_path, query_params=list((query or {}).items()), header_params=headers, body=body,
            auth_settings=["BearerToken"])
        resp = self.api.call_api(method, url, header_params=headers, body=body, post_params=post,
                                 _request_timeout=30)
        data = resp.read()
        if resp.status >= 300:
            raise KubeError(resp.status, method, url_path, (data or b"").decode(errors="replace"))
        return json.loads(data) if data else {}

    # --- conveniences ---------------------------------------------------------------------

    def get(self, kind: str, namespace: str, name: str) -> Optional[dict[str, Any]]:
        try:
            return self.request("GET", path(kind, namespace, name))
        except KubeError as err:
            if err.status == 404:
                return None
            raise

    def list(self, kind: str, namespace: str, selector: dict[str, str]) -> list[dict[str, Any]]:
        query = {"labelSelector": ",".join(f"{k}={v}" for k, v in selector.items())}
        return self.request("GET", path(kind, namespace), query=query).get("items", [])

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create, or return the existing object of that name (create-or-adopt)."""
        meta = obj["metadata"]
        try:
            return self.request("POST", path(obj["kind"], meta["namespace"]), obj)
        except KubeError as err:
            if err.status == 409:
                existing = self.get(obj["kind"], meta["namespace"], meta["name"])
                if existing is not None:
                    return existing
            raise

    def replace(self, obj: dict[str, Any]) -> dict[str, Any]:
        """PUT with the object's resourceVersion: a concurrent writer makes this fail (409)."""
        meta = obj["metadata"]
        return self.request("PUT", path(obj["kind"], meta["namespace"], meta["name"]), obj)

    def merge_patch(self, kind: str, namespace: str, name: str, body: dict[str, Any],
                    sub: Optional[str] = None) -> dict[str, Any]:
        return self.request("PATCH", path(kind, namespace, name, sub), body, content_type=MERGE_PATCH)

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete with background propagation (pods go too); False when it was already gone."""
        try:
            self.request("DELETE", path(kind, namespace, name),
                         {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"})
            return True
        except KubeError as err:
            if err.status == 404:
                return False
            raise

    def event(self, involved: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """A core/v1 Event on `involved` (what `kubectl describe` shows)."""
        from datetime import datetime, timezone

        meta = involved["metadata"]
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.request("POST", f"/api/v1/namespaces/{meta['namespace']}/events", {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": involved.get("apiVersion"), "kind": involved.get("kind"),
                               "name": meta["name"], "namespace": meta["namespace"], "uid": meta.get("uid"),
                               "resourceVersion": meta.get("resourceVersion")},
            "reason": reason, "message": message[:1024], "type": type_,
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
            "source": {"component": "ragtune-operator"}, "reportingComponent": "ragtune-operator",
        })
