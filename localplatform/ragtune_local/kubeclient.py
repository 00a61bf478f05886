"""The local platform's JSON client for its API server (client-cert auth, streaming watches).

The pod runner talks to the API server like a kubelet does: merge patches of pod status, node
leases, long watches. It is part of the platform (a stand-in for the kubelet's client), not of
the operator, so it stays a small urllib3 client; it raises the operator's `KubeError`.
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any, Iterator, Optional
from urllib.parse import urlencode

import urllib3

from ragtune.runtime.kube import MERGE_PATCH, KubeError

# The operator's error type: callers on both sides handle "the API server said no" alike.
ApiError = KubeError


class Kube:
    def __init__(self, server: str, ca: Path, cert: Path, key: Path, timeout: float = 30.0):
        self.server = server.rstrip("/")
        self._http = urllib3.PoolManager(
            maxsize=8, cert_reqs=ssl.CERT_REQUIRED, ca_certs=str(ca), cert_file=str(cert), key_file=str(key),
            timeout=urllib3.Timeout(connect=5.0, read=timeout), retries=False,
        )

    def request(self, method: str, path: str, body: Any = None, params: Optional[dict] = None,
                content_type: str = "application/json") -> dict:
        url = self.server + path + ("?" + urlencode(params) if params else "")
        data = None if body is None else json.dumps(body).encode()
        try:
            resp = self._http.request(method, url, body=data, headers={"Content-Type": content_type,
                                                                        "Accept": "application/json"})
        except urllib3.exceptions.HTTPError as exc:
            # No answer (a read timeout on a loaded machine, a refused connection): status 0, which
            # every caller already handles as an API error; a raw urllib3 error would kill its thread.
            raise ApiError(0, "NoAnswer", f"{method} {path}: {exc}") from None
        if resp.status >= 300:
            raise ApiError.from_response(resp.status, method, path, resp.data)
        return json.loads(resp.data) if resp.data else {}

    def get(self, path: str, **params: Any) -> dict:
        return self.request("GET", path, params=params or None)

    def create(self, path: str, body: dict) -> dict:
        return self.request("POST", path, body)

    def create_if_absent(self, path: str, body: dict) -> None:
        """POST `body`; one that exists already (409) is left as it is (idempotent set-up)."""
        try:
            self.create(path, body)
        except ApiError as err:
            if err.status != 409:
                raise

    def merge_patch(self, path: str, body: dict) -> dict:
        return self.request("PATCH", path, body, content_type=MERGE_PATCH)

    def delete(self, path: str, body: Optional[dict] = None) -> dict:
        return self.request("DELETE", path, body)

    def watch(self, path: str, timeout_seconds: int = 60, **params: Any) -> Iterator[dict]:
        """Yields watch events until the server closes the stream (at most `timeout_seconds`)."""
        query = {"watch": "true", "timeoutSeconds": timeout_seconds, "allowWatchBookmarks": "false", **params}
        resp = self._http.request("GET", f"{self.server}{path}?{urlencode(query)}", preload_content=False,
                                  timeout=urllib3.Timeout(connect=5.0, read=timeout_seconds + 10))
        try:
            if resp.status >= 300:
                raise ApiError.from_response(resp.status, "WATCH", path, resp.read())
            buf = b""
            for chunk in resp.stream(4096, decode_content=True):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
        finally:
            resp.release_conn()
