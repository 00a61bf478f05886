"""The vLLM pod's serving port: a small HTTP/1.1 reverse proxy (stdlib) in the adapter-sync sidecar.

vLLM listens on loopback only (`--host localhost`, an internal port); everything a client sends to
the pod's serving port is forwarded to it unchanged, except vLLM's runtime LoRA endpoints
(`api.pods.LORA_ADMIN_PATHS`: `/v1/load_lora_adapter`, `/v1/unload_lora_adapter`, and the
SageMaker-style `/adapters` API that vLLM 0.32 mounts as well), which vLLM itself calls risky:
those get a 403 with a JSON body saying why. Only the sidecar loads and unloads adapters, on
loopback.

The path test is made on what vLLM's router would match: percent-decoding undone (repeatedly),
`//` and `.` segments collapsed, trailing `/` and query ignored, any case. Responses stream: a
body without Content-Length (vLLM's SSE for `"stream": true`) is relayed chunk by chunk as it
arrives, so a streaming client sees tokens as vLLM produces them.
"""

from __future__ import annotations

import http.client
import json
import logging
import posixpath
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

from ragtune.api.pods import LORA_ADMIN_PATHS

log = logging.getLogger("ragtune.serving_proxy")

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailers", "transfer-encoding", "upgrade", "proxy-connection"})
CHUNK = 64 * 1024
REFUSED_BODY = json.dumps({
    "error": {"type": "Forbidden", "code": 403,
              "message": "vLLM's runtime LoRA endpoints are not served on this port: ragtune's adapter-sync "
                         "sidecar loads and unloads adapters from the AdapterDeployment's spec (change "
                         "spec.adapters instead)"}}).encode()


def normalized_path(target: str) -> str:
    """The path a request target names, as a router would match it."""
    path = urllib.parse.urlsplit(target).path if "://" in target else target.split("?", 1)[0].split("#", 1)[0]
    for _ in range(4):  # %256c -> %6c -> l: undo every layer
        decoded = urllib.parse.unquote(path)
        if decoded == path:
            break
        path = decoded
    path = re.sub(r"/+", "/", "/" + path.replace("\\", "/"))  # normpath keeps a leading `//`
    return (posixpath.normpath(path).rstrip("/") or "/").lower()


def refused(target: str) -> bool:
    """True for vLLM's runtime LoRA endpoints, in any spelling (and anything below `/adapters`)."""
    path = normalized_path(target)
    return path.endswith(("load_lora_adapter", "lora_adapter")) or \
        any(path == p or path.startswith(p + "/") for p in LORA_ADMIN_PATHS)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "ServingProxy"

    def log_message(self, fmt, *args) -> None:  # requests are vLLM's to log
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> Optional[bytes]:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else None

    def _forward(self) -> None:
        body = self._body()
        if refused(self.path):
            log.warning("refused %s %s from %s", self.command, self.path[:200], self.client_address[0])
            self._send(403, REFUSED_BODY)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if body is not None:
            headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection(self.server.upstream_host, self.server.upstream_port,
                                              timeout=self.server.upstream_timeout)
        try:
            try:
                upstream.request(self.command, self.path, body=body, headers=headers)
                resp = upstream.getresponse()
            except OSError as exc:
                self._send(502, json.dumps({"error": {"type": "BadGateway", "code": 502,
                                                      "message": f"vLLM is not answering yet: {exc}"}}).encode())
                return
            self.send_response(resp.status, resp.reason)
            length = resp.getheader("Content-Length")
            for k, v in resp.getheaders():
                if k.lower() not in HOP_BY_HOP and k.lower() not in ("content-length", "date", "server"):
                    self.send_header(k, v)
            bodyless = self.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
            if length is not None or bodyless:
                if length is not None:
                    self.send_header("Content-Length", length)
                self.end_headers()
                while not bodyless and (data := resp.read(CHUNK)):
                    self.wfile.write(data)
                return
            # No length (SSE, chunked): relay each piece as it arrives.
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            while data := resp.read1(CHUNK):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        finally:
            upstream.close()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _forward


class ServingProxy(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int], upstream_timeout: float = 600.0):
        super().__init__(listen, _Handler)
        self.upstream_host, self.upstream_port = upstream
        self.upstream_timeout = upstream_timeout


def parse_hostport(value: str, what: str) -> tuple[str, int]:
    """`HOST:PORT` / `[V6]:PORT` -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{what} {value!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


def serve_in_thread(server: ThreadingHTTPServer) -> Callable[[], None]:
    """Serve until the returned stop function is called."""
    thread = threading.Thread(target=server.serve_forever, name=type(server).__name__, daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
    return stop
