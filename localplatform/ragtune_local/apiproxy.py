"""A transparent recording proxy in front of the real API server.

The operator under test talks plain HTTP to the proxy with its ServiceAccount bearer token; the
proxy forwards every request unchanged over TLS (watch streams included) and records what was
asked and what the API server answered. The API server still authenticates and authorises every
call, so a missing permission shows as a recorded 403 and a surplus one as a granted verb that
no recorded call used. Works against any cluster, unlike an audit log that needs apiserver flags.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from dataclasses import dataclass
from typing import Optional
from urllib.parse import parse_qs

# Hop-by-hop headers a proxy must not forward (RFC 9110 7.6.1), plus what aiohttp recomputes.
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "trailer",
        "host", "content-length"}


@dataclass(frozen=True)
class ApiCall:
    method: str
    path: str
    query: str
    status: int

    @property
    def rbac(self) -> Optional[tuple[str, str, str]]:
        """(apiGroup, resource[/subresource], verb) as RBAC sees it; None for discovery/non-resource URLs."""
        parts = [p for p in self.path.split("/") if p]
        if parts[:2] == ["api", "v1"]:
            group, rest = "", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            group, rest = parts[1], parts[3:]
        else:
            return None
        if rest[:1] == ["namespaces"] and len(rest) >= 3:
            rest = rest[2:]  # a namespaced resource (else: the namespaces resource itself)
        if not rest:
            return None
        resource, name, sub = rest[0], rest[1] if len(rest) > 1 else None, rest[2] if len(rest) > 2 else None
        query = parse_qs(self.query)
        watching = query.get("watch", ["false"])[0] in ("true", "1")
        verb = {
            "GET": "watch" if watching else ("get" if name else "list"),
            "POST": "create", "PUT": "update", "PATCH": "patch",
            "DELETE": "delete" if name else "deletecollection",
        }[self.method]
        return group, f"{resource}/{sub}" if sub else resource, verb


class RecordingProxy:
    def __init__(self, upstream: str, ca_file: str):
        self.upstream = upstream.rstrip("/")
        self._ssl = ssl.create_default_context(cafile=ca_file)
        self.calls: list[ApiCall] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread = threading.Thread(target=self._run, name="api-recording-proxy", daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "RecordingProxy":
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("recording proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop:
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def recorded(self) -> list[ApiCall]:
        with self._lock:
            return list(self.calls)

    def _run(self) -> None:
        import aiohttp
        from aiohttp import web

        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)

        async def handle(request: web.Request) -> web.StreamResponse:
            headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
            body = await request.read()
            async with session.request(request.method, self.upstream + request.rel_url.path_qs, headers=headers,
                                       data=body or None, ssl=self._ssl, allow_redirects=False) as upstream:
                with self._lock:
                    self.calls.append(ApiCall(request.method, request.path, request.query_string, upstream.status))
                response = web.StreamResponse(status=upstream.status, headers={
                    k: v for k, v in upstream.headers.items() if k.lower() not in _HOP | {"content-encoding"}})
                await response.prepare(request)
                try:
                    async for chunk in upstream.content.iter_any():
                        await response.write(chunk)
                except (ConnectionResetError, aiohttp.ClientError):
                    pass  # the client went away mid-watch
                return response

        session: aiohttp.ClientSession

        async def start() -> web.AppRunner:
            nonlocal session
            session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
                                            auto_decompress=False)
            app = web.Application(client_max_size=64 * 1024 * 1024)
            app.router.add_route("*", "/{tail:.*}", handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]
            return runner

        runner = self._loop.run_until_complete(start())
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(session.close())
            self._loop.run_until_complete(runner.cleanup())
            self._loop.close()
