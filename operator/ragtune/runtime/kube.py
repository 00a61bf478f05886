"""The operator's one Kubernetes client: raw JSON requests over the `kubernetes` package's ApiClient.

The `kubernetes` package provides configuration, authentication and TLS (kubeconfig or the
in-cluster ServiceAccount); requests and responses stay plain wire-form dicts, so what a
controller renders is exactly what it sends and what it reads is what `kubectl get -o json`
shows (no typed-model round trip that could drop fields the client does not know).

Calls are blocking. Async code (the kopf handlers) runs them in this client's bounded thread
pool through `Kube.run`; the rollout state machine calls them directly from its handler thread.
Every non-2xx answer is a `KubeError` (the local platform's own client raises the same type).
"""

from __future__ import annotations

import asyncio
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, TypeVar
from urllib.parse import quote

from ragtune.api.keys import API_GROUP, API_VERSION
from ragtune.clock import utc_now_iso

T = TypeVar("T")

MERGE_PATCH = "application/merge-patch+json"

# kind -> (API path prefix, plural) for the kinds the controllers read and write.
KINDS = {
    "Deployment": ("/apis/apps/v1", "deployments"),
    "Service": ("/api/v1", "services"),
    "ConfigMap": ("/api/v1", "configmaps"),
    "Job": ("/apis/batch/v1", "jobs"),
    "Pod": ("/api/v1", "pods"),
    "FineTuneJob": (f"/apis/{API_GROUP}/{API_VERSION}", "finetunejobs"),
    "AdapterDeployment": (f"/apis/{API_GROUP}/{API_VERSION}", "adapterdeployments"),
    "HTTPRoute": ("/apis/gateway.networking.k8s.io/v1", "httproutes"),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets"),
}

RETRYABLE_STATUSES = frozenset({0, 408, 409, 429, 500, 502, 503, 504})
"""0: no answer at all (connection refused, timeout)."""


class KubeError(Exception):
    """A non-2xx answer from the API server (status 0: no answer)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @classmethod
    def from_response(cls, status: int, method: str, path: str, body: bytes | str) -> "KubeError":
        """From a raw answer: the API server's `Status` object gives reason and message."""
        text = body.decode(errors="replace") if isinstance(body, bytes) else body
        try:
            detail = json.loads(text)
            reason, message = detail.get("reason", ""), detail.get("message", text)
        except (ValueError, AttributeError):
            reason, message = "", text[:500]
        return cls(status, reason, f"{method} {path}: {message}")

    @property
    def retryable(self) -> bool:
        return self.status in RETRYABLE_STATUSES


def path(kind: str, namespace: str, name: Optional[str] = None, sub: Optional[str] = None) -> str:
    prefix, plural = KINDS[kind]
    out = f"{prefix}/namespaces/{namespace}/{plural}"
    if name:
        out += f"/{quote(name)}"
    if sub:
        out += f"/{sub}"
    return out


def _api_client(kubeconfig: Optional[str] = None):
    from kubernetes import client, config

    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
        return client.ApiClient()
    return config.new_client_from_config(config_file=kubeconfig)


class Kube:
    def __init__(self, api_client=None, *, kubeconfig: Optional[str] = None, workers: int = 8,
                 field_manager: str = "ragtune-operator"):
        self.api = api_client if api_client is not None else _api_client(kubeconfig)
        # urllib3's pool must hold as many connections as threads use it at once.
        self.api.rest_client.pool_manager.connection_pool_kw["maxsize"] = max(workers, 4)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kube")
        self.field_manager = field_manager

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking call of this client in its thread pool."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.api.close()

    # --- raw requests -------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, query: Optional[list[tuple[str, Any]]] = None,
                content_type: str = "application/json", raw: bool = False) -> Any:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        method_, url, headers, body_, post = self.api.param_serialize(
            method=method, resource_path=path, query_params=list(query or []), header_params=headers,
            body=body, auth_settings=["BearerToken"],
        )
        try:
            response = self.api.call_api(method_, url, header_params=headers, body=body_, post_params=post,
                                         _request_timeout=(10, 60))
            data = response.read() or b""
        except Exception as exc:  # no answer (refused, reset, timed out): retryable
            status = getattr(exc, "status", None)
            if status:
                raise KubeError(status, getattr(exc, "reason", "") or "", str(exc)) from None
            raise KubeError(0, type(exc).__name__, str(exc)) from None
        if not 200 <= response.status <= 299:
            raise KubeError.from_response(response.status, method, path, data)
        if raw:
            return data.decode(errors="replace")
        return json.loads(data) if data else {}

    def _write_query(self) -> list[tuple[str, Any]]:
        return [("fieldManager", self.field_manager)]

    # --- objects by kind ------------------------------------------------------------

    def get(self, kind: str, namespace: str, name: str) -> Optional[dict[str, Any]]:
        """The object, or None when it does not exist."""
        try:
            return self.request("GET", path(kind, namespace, name))
        except KubeError as err:
            if err.status == 404:
                return None
            raise

    def list(self, kind: str, namespace: str, selector: dict[str, str]) -> list[dict[str, Any]]:
        query = [("labelSelector", ",".join(f"{k}={v}" for k, v in selector.items()))]
        return self.request("GET", path(kind, namespace), query=query).get("items", [])

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create, or return the existing object of that name (create-or-adopt)."""
        meta = obj["metadata"]
        try:
            return self.request("POST", path(obj["kind"], meta["namespace"]), obj, query=self._write_query())
        except KubeError as err:
            if err.status == 409:
                existing = self.get(obj["kind"], meta["namespace"], meta["name"])
                if existing is not None:
                    return existing
            raise

    def replace(self, obj: dict[str, Any]) -> dict[str, Any]:
        """PUT with the object's resourceVersion: a concurrent writer makes this fail (409)."""
        meta = obj["metadata"]
        return self.request("PUT", path(obj["kind"], meta["namespace"], meta["name"]), obj,
                            query=self._write_query())

    def merge_patch(self, kind: str, namespace: str, name: str, body: dict[str, Any],
                    sub: Optional[str] = None) -> dict[str, Any]:
        return self.request("PATCH", path(kind, namespace, name, sub), body, content_type=MERGE_PATCH,
                            query=self._write_query())

    def delete(self, kind: str, namespace: str, name: str, *, propagation: str = "Background",
               uid: Optional[str] = None) -> bool:
        """Delete (children go too); False when it was already gone. With `uid`, only that
        incarnation of the name is deleted (a 409 for another one counts as gone)."""
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self.request("DELETE", path(kind, namespace, name), body)
            return True
        except KubeError as err:
            if err.status == 404 or (uid and err.status == 409):
                return False
            raise

    def event(self, involved: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """A core/v1 Event on `involved` (what `kubectl describe` shows)."""
        meta = involved["metadata"]
        stamp = utc_now_iso()
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

    # --- what the FineTuneJob controller uses ------------------------------------------

    def create_job(self, namespace: str, job: dict) -> dict:
        return self.request("POST", path("Job", namespace), body=job, query=self._write_query())

    def patch_job(self, namespace: str, name: str, patch: dict) -> dict:
        return self.merge_patch("Job", namespace, name, patch)

    def delete_job(self, namespace: str, name: str, uid: Optional[str] = None) -> None:
        """Foreground delete: the Job goes only after its pods are gone. Absent is fine."""
        try:
            self.delete("Job", namespace, name, propagation="Foreground", uid=uid)
        except KubeError as exc:
            if exc.status != 409:  # being deleted already
                raise

    def patch_status(self, plural: str, namespace: str, name: str, status_patch: dict) -> dict:
        kind = {"finetunejobs": "FineTuneJob", "adapterdeployments": "AdapterDeployment"}[plural]
        return self.merge_patch(kind, namespace, name, {"status": status_patch}, sub="status")

    def pod_log_tail(self, namespace: str, pod: str, container: str, lines: int = 200,
                     limit_bytes: int = 65536) -> str:
        return self.request(
            "GET", path("Pod", namespace, pod, "log"),
            query=[("container", container), ("tailLines", lines), ("limitBytes", limit_bytes)], raw=True,
        )
