"""The few Kubernetes API calls the controllers make, as raw JSON requests.

The `kubernetes` package provides configuration, authentication and TLS; requests and responses
stay plain dicts (no typed-model round trip that could drop fields the client does not know).
Calls are blocking: the controllers run them in a bounded thread pool (`KubeClient.run`).
"""

from __future__ import annotations

import asyncio
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, TypeVar
from urllib.parse import quote

T = TypeVar("T")

RAGTUNE_GROUP = "ragtune.dev"
RAGTUNE_VERSION = "v1alpha1"


class KubeError(Exception):
    """A non-2xx answer from the API server."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def retryable(self) -> bool:
        return self.status in (0, 408, 409, 429, 500, 502, 503, 504)


def _api_client(kubeconfig: Optional[str] = None):
    from kubernetes import client, config

    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
        return client.ApiClient()
    return config.new_client_from_config(config_file=kubeconfig)


class KubeClient:
    def __init__(self, kubeconfig: Optional[str] = None, workers: int = 8, field_manager: str = "ragtune-operator"):
        self._api = _api_client(kubeconfig)
        # urllib3's pool must hold as many connections as threads use it at once.
        self._api.rest_client.pool_manager.connection_pool_kw["maxsize"] = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kube")
        self.field_manager = field_manager

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking call of this client in its thread pool."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._api.close()

    # --- raw requests -------------------------------------------------------------

    def request(self, method: str, path: str, query: Optional[list[tuple[str, Any]]] = None,
                body: Any = None, content_type: str = "application/json", raw: bool = False) -> Any:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        method_, url, headers, body_, post = self._api.param_serialize(
            method=method, resource_path=path, query_params=query or [], header_params=headers,
            body=body, auth_settings=["BearerToken"],
        )
        try:
            response = self._api.call_api(method_, url, header_params=headers, body=body_, post_params=post,
                                          _request_timeout=(10, 60))
            response.read()
        except Exception as exc:  # connection errors surface as retryable
            if hasattr(exc, "status") and getattr(exc, "status", None):
                raise KubeError(exc.status, getattr(exc, "reason", "") or "", str(exc)) from None
            raise KubeError(0, type(exc).__name__, str(exc)) from None
        data = response.data or b""
        if not 200 <= response.status <= 299:
            try:
                message = json.loads(data).get("message", "")
            except ValueError:
                message = data[:500].decode(errors="replace")
            raise KubeError(response.status, response.reason or "", message)
        if raw:
            return data.decode(errors="replace")
        return json.loads(data) if data else {}

    # --- the operations the controllers use ------------------------------------------

    def create_job(self, namespace: str, job: dict) -> dict:
        return self.request("POST", f"/apis/batch/v1/namespaces/{namespace}/jobs", body=job,
                            query=[("fieldManager", self.field_manager)])

    def patch_job(self, namespace: str, name: str, patch: dict) -> dict:
        return self.request("PATCH", f"/apis/batch/v1/namespaces/{namespace}/jobs/{quote(name)}", body=patch,
                            content_type="application/merge-patch+json",
                            query=[("fieldManager", self.field_manager)])

    def delete_job(self, namespace: str, name: str, uid: Optional[str] = None) -> None:
        """Foreground delete: the Job goes only after its pods are gone. Absent is fine."""
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Foreground"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self.request("DELETE", f"/apis/batch/v1/namespaces/{namespace}/jobs/{quote(name)}", body=body)
        except KubeError as exc:
            if exc.status not in (404, 409):
                raise

    def patch_status(self, plural: str, namespace: str, name: str, status_patch: dict) -> dict:
        return self.request(
            "PATCH",
            f"/apis/{RAGTUNE_GROUP}/{RAGTUNE_VERSION}/namespaces/{namespace}/{plural}/{quote(name)}/status",
            body={"status": status_patch}, content_type="application/merge-patch+json",
            query=[("fieldManager", self.field_manager)],
        )

    def pod_log_tail(self, namespace: str, pod: str, container: str, lines: int = 200,
                     limit_bytes: int = 65536) -> str:
        return self.request(
            "GET", f"/api/v1/namespaces/{namespace}/pods/{quote(pod)}/log",
            query=[("container", container), ("tailLines", lines), ("limitBytes", limit_bytes)], raw=True,
        )
