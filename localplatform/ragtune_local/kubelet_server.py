"""The runner's kubelet API subset: `/containerLogs/{ns}/{pod}/{container}` over mutual TLS.

The API server's pods/log subresource proxies here (node daemonEndpoints port, InternalIP), so
`kubectl logs` and `read_namespaced_pod_log` work for pods on the runner's node.
"""

from __future__ import annotations

import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import parse_qs, urlparse

# (namespace, pod, container, previous) -> (log path, still running?) or an error message
LogLookup = Callable[[str, str, str, bool], "tuple[Optional[Path], Callable[[], bool], str]"]


def _tail_bytes(data: bytes, lines: int) -> bytes:
    if lines <= 0:
        return b""
    parts = data.splitlines(keepends=True)
    return b"".join(parts[-lines:])


class _Handler(BaseHTTPRequestHandler):
    lookup: LogLookup

    def log_message(self, fmt: str, *args) -> None:  # the runner's own log stays readable
        pass

    def _fail(self, code: int, message: str) -> None:
        body = message.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        url = urlparse(self.path)
        if url.path == "/healthz":
            return self._fail(200, "ok")
        parts = url.path.strip("/").split("/")
        if len(parts) != 4 or parts[0] != "containerLogs":
            return self._fail(404, f"{url.path}: the local runner serves only /containerLogs")
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        previous = q.get("previous") == "true"
        path, running, error = type(self).lookup(parts[1], parts[2], parts[3], previous)
        if path is None:
            return self._fail(404 if "not found" in error else 400, error)
        data = path.read_bytes() if path.exists() else b""
        offset = len(data)  # where following continues, whatever part of `data` is sent
        if "tailLines" in q:
            data = _tail_bytes(data, int(q["tailLines"]))
        limit = int(q["limitBytes"]) if "limitBytes" in q else None
        if limit is not None:
            data = data[:limit]
        follow = q.get("follow") == "true" and not previous
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        if not follow:
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        # HTTP/1.0 response without Content-Length: the body runs until we close the connection.
        self.end_headers()
        sent = 0
        try:
            self._send(data)
            sent += len(data)
            while limit is None or sent < limit:
                alive = running()
                with open(path, "rb") as f:
                    f.seek(offset)
                    more = f.read()
                if more:
                    more = more if limit is None else more[: limit - sent]
                    self._send(more)
                    offset += len(more)
                    sent += len(more)
                elif not alive:
                    break
                else:
                    time.sleep(0.2)
        except (BrokenPipeError, ConnectionResetError, FileNotFoundError):
            pass
        self.close_connection = True

    def _send(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()


def serve(port: int, cert: Path, key: Path, ca: Path, lookup: LogLookup) -> ThreadingHTTPServer:
    """Starts the HTTPS server in a daemon thread; only clients with a cert from our CA get in."""
    handler = type("Handler", (_Handler,), {"lookup": staticmethod(lookup)})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, name="kubelet-api", daemon=True).start()
    return server
