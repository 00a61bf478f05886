"""`ragtune adapters sync`: the sidecar that changes a running vLLM's adapter set without a restart.

Each tick it reads the desired set (`--desired`, a JSON file: the key of the ConfigMap the operator
writes, mounted into the pod), and for every adapter that is new or whose manifest digest changed:
downloads it with the pod's own S3 credentials and verifies it exactly like the fetch init
container (manifest sha256 pinned, every file's sha256 and size, base model, rank, target modules:
`ragtune.pods.fetch.fetch_adapter`), into a folder named by its digest, then asks vLLM on loopback
to load it (`/v1/load_lora_adapter` with `load_inplace`, so requests for a name being replaced
never see a gap). Adapters no longer desired are unloaded (`/v1/unload_lora_adapter`)
and their files removed. An adapter that fails any check is not loaded: the version already
served (if any) keeps serving, and the failure is reported with its reason.

vLLM's runtime LoRA endpoints are only enabled with `VLLM_ALLOW_RUNTIME_LORA_UPDATING`, which vLLM
calls risky: the sidecar talks to the server on a loopback address only (`--server` must be one),
and the rendered pod keeps those endpoints off the Service port.

What the pod serves (`api.pods.AdapterSyncStatus`: desired generation and set digest, `name ->
digest` loaded, per-adapter errors) is served on `--status-listen` (`GET /status`; `GET /ready` is
200 once the desired set was loaded since start and vLLM answers: the pod's readiness probe) and
written to `--status`. In a rendered pod the sidecar also owns the serving port (`--listen`): the
proxy in `serving_proxy.py` forwards everything to vLLM on loopback except the LoRA endpoints.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import shutil
import signal
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Optional

from ragtune.api.pods import SYNC_READY_PATH, SYNC_STATUS_PATH

from .fetch import FetchError, base_target_modules, fetch_adapter, parse_adapter_arg
from .serving_proxy import ServingProxy, parse_hostport, serve_in_thread

log = logging.getLogger("ragtune.adapter_sync")


@dataclass(frozen=True)
class Desired:
    generation: int
    adapters: dict[str, tuple[str, str]]
    """name -> (run uri, manifest sha256)."""
    digest: str = ""
    """The operator's digest of the set (`api.pods.AdapterSetDocument.digest`)."""


def read_desired(path: Path) -> Desired:
    """The ConfigMap key (`api.pods.AdapterSetDocument`): `{"generation": N, "digest": D,
    "adapters": [{"name", "uri", "sha256"}]}`."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"{path}: not a desired adapter set ({exc})") from None
    return read_desired_text(text, path)


def read_desired_text(text: str, path) -> Desired:
    try:
        raw = json.loads(text)
        adapters = {}
        for a in raw["adapters"]:
            name, uri, digest = parse_adapter_arg(f"{a['name']}={a['uri']}#{a['sha256']}")
            adapters[name] = (uri, digest)
        return Desired(int(raw.get("generation", 0)), adapters, str(raw.get("digest") or ""))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a desired adapter set ({exc})") from None


def loopback_url(url: str) -> str:
    """The server URL, refused unless it is on loopback (the LoRA endpoints must stay in the pod)."""
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"--server {url!r}: the runtime LoRA endpoints may only be called on a loopback address")
    return url.rstrip("/")


class VllmAdmin:
    """vLLM's runtime LoRA endpoints."""

    def __init__(self, base_url: str, timeout: float = 120.0):
        self.base_url, self.timeout = loopback_url(base_url), timeout

    def _post(self, path: str, body: dict) -> None:
        req = urllib.request.Request(self.base_url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode(errors="replace")
            raise FetchError("LoadFailed", f"vLLM {path} answered {exc.code}: {detail}", body.get("lora_name")) \
                from None
        except OSError as exc:
            raise FetchError("ServerUnreachable", f"vLLM {path}: {exc}", body.get("lora_name")) from None

    def load(self, name: str, path: Path) -> None:
        # In place: a name already served (by the sidecar, or by `--lora-modules` at start) is
        # swapped without a moment in which requests for it would be a 404; a new name is added.
        self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path), "load_inplace": True})

    def unload(self, name: str) -> None:
        self._post("/v1/unload_lora_adapter", {"lora_name": name})

    def served_loras(self) -> dict[str, str]:
        """LoRA adapters vLLM serves now: name -> the folder it was loaded from."""
        with urllib.request.urlopen(self.base_url + "/v1/models", timeout=self.timeout) as resp:
            models = json.loads(resp.read())["data"]
        return {m["id"]: m.get("root") or "" for m in models if m.get("parent")}

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=5) as resp:
                return resp.status == 200
        except OSError:
            return False


@dataclass
class Syncer:
    storage: object
    admin: VllmAdmin
    dest: Path
    max_rank: int
    allowed_modules: set[str] = field(default_factory=set)
    expect_base: Optional[tuple[str, str]] = None
    loaded: dict[str, str] = field(default_factory=dict)
    """name -> manifest sha256 served now."""
    errors: dict[str, dict[str, str]] = field(default_factory=dict)
    generation: int = 0
    desired_digest: str = ""
    synced: bool = False
    """The desired set was fully loaded once since start (the pod may then take traffic)."""

    def folder(self, name: str, digest: str) -> Path:
        return self.dest / f"{name}@{digest}"

    def recover(self) -> None:
        """What the server already serves (a restarted sidecar, or `--lora-modules` at start): a
        folder of ours names its digest; anything else counts as unknown and is replaced in place
        by a verified copy. Also after vLLM restarted (it came back without run-time adapters)."""
        self.loaded, self.synced = {}, False
        for name, root in self.admin.served_loras().items():
            folder = Path(root)
            prefix = f"{name}@"
            ours = folder.parent == self.dest and folder.name.startswith(prefix)
            self.loaded[name] = folder.name[len(prefix):] if ours else ""

    def sync(self, desired: Desired) -> bool:
        """One pass towards `desired`; True when everything desired is loaded."""
        self.errors = {k: v for k, v in self.errors.items() if k in desired.adapters}
        for name in sorted(set(self.loaded) - set(desired.adapters)):
            try:
                self.admin.unload(name)
            except FetchError as exc:
                self.errors[name] = {"reason": exc.reason, "message": str(exc)}
                continue
            shutil.rmtree(self.folder(name, self.loaded.pop(name)), ignore_errors=True)
            log.info("unloaded %s", name)
        for name, (uri, digest) in sorted(desired.adapters.items()):
            if self.loaded.get(name) == digest:
                continue
            failed = self.errors.get(name)
            if failed and failed.get("sha256") == digest and failed["reason"] != "ServerUnreachable":
                continue  # the same artifact fails the same checks: report it, do not download it again
            target = self.folder(name, digest)
            try:
                fetch_adapter(self.storage, name, uri, digest, target, expect_base=self.expect_base,
                              allowed_modules=self.allowed_modules, max_rank=self.max_rank)
                self.admin.load(name, target)
            except FetchError as exc:
                shutil.rmtree(target, ignore_errors=True)
                self.errors[name] = {"reason": exc.reason, "message": str(exc), "sha256": digest}
                log.error("adapter %s@%s not loaded: %s: %s", name, digest[:12], exc.reason, exc)
                continue
            old = self.loaded.get(name)
            self.loaded[name] = digest
            self.errors.pop(name, None)
            if old and old != digest:
                shutil.rmtree(self.folder(name, old), ignore_errors=True)
            log.info("loaded %s@%s%s", name, digest[:12], f" (replacing {old[:12]})" if old else "")
        self.generation, self.desired_digest = desired.generation, desired.digest
        done = all(self.loaded.get(n) == d for n, (_, d) in desired.adapters.items())
        self.synced = self.synced or done
        return done

    def report(self) -> dict:
        return {"generation": self.generation, "loaded": dict(sorted(self.loaded.items())),
                "errors": dict(sorted(self.errors.items()))}

    def status(self, healthy: bool) -> dict:
        """`api.pods.AdapterSyncStatus` in wire form."""
        return {**self.report(), "desired": self.desired_digest, "ready": bool(healthy and self.synced)}


class StatusServer(ThreadingHTTPServer):
    """`GET /status` (the status document) and `GET /ready` (the pod's readiness) of the sidecar."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, listen: tuple[str, int]):
        super().__init__(listen, _StatusHandler)
        self.lock = threading.Lock()
        self.document: dict = {"generation": 0, "desired": "", "loaded": {}, "errors": {}, "ready": False}

    def publish(self, document: dict) -> None:
        with self.lock:
            self.document = document


class _StatusHandler(BaseHTTPRequestHandler):
    server: StatusServer

    def log_message(self, fmt, *args) -> None:  # probes every few seconds: not worth a log line
        pass

    def do_GET(self) -> None:
        with self.server.lock:
            doc = self.server.document
        path = self.path.split("?", 1)[0]
        if path == SYNC_STATUS_PATH:
            code, body = 200, doc
        elif path == SYNC_READY_PATH:
            code, body = (200 if doc["ready"] else 503), {"ready": doc["ready"]}
        else:
            code, body = 404, {"error": f"{path}: not found (try {SYNC_STATUS_PATH} or {SYNC_READY_PATH})"}
        data = json.dumps(body, sort_keys=True).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def write_status(path: Optional[Path], report: dict) -> None:
    if path is None:
        return
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(report, sort_keys=True))
    os.replace(tmp, path)  # readers never see half a report


def run(args, storage=None, stop: Optional[threading.Event] = None,
        on_report: Optional[Callable[[dict], None]] = None) -> int:
    from ragtune.api.common import S3Config
    from ragtune.storage import Storage

    storage = storage or Storage(S3Config(region=os.environ.get("AWS_REGION", "us-east-1")))
    stop = stop or threading.Event()
    expect = None
    if args.expect_base_model:
        model_id, _, revision = args.expect_base_model.rpartition("@")
        expect = (model_id, revision)
    allowed = set(args.allowed_target_module or [])
    if args.target_modules_from_base:
        allowed |= base_target_modules(Path(args.target_modules_from_base))
    syncer = Syncer(storage, VllmAdmin(args.server), Path(args.dest), args.max_rank, allowed, expect)
    syncer.dest.mkdir(parents=True, exist_ok=True)
    status = Path(args.status) if args.status else None
    stoppers = []
    server: Optional[StatusServer] = None
    if getattr(args, "status_listen", None):
        server = StatusServer(parse_hostport(args.status_listen, "--status-listen"))
        stoppers.append(serve_in_thread(server))
    if getattr(args, "listen", None):
        upstream = urllib.parse.urlsplit(syncer.admin.base_url)
        stoppers.append(serve_in_thread(ServingProxy(parse_hostport(args.listen, "--listen"),
                                                     (upstream.hostname, upstream.port or 80))))
    last: Optional[dict] = None
    recovered = False
    try:
        while not stop.is_set():
            healthy = syncer.admin.healthy()
            if not healthy:  # starting or restarting: read what it serves again once it answers
                recovered = False
            else:
                try:
                    if not recovered:
                        syncer.recover()
                        recovered = True
                    syncer.sync(read_desired(Path(args.desired)))
                except (ValueError, OSError) as exc:
                    log.error("%s", exc)
            report = syncer.status(healthy)
            if server is not None:
                server.publish(report)
            if report != last:
                write_status(status, report)
                if on_report:
                    on_report(report)
                last = report
            if args.once and healthy:
                break
            stop.wait(args.interval)
    finally:
        for stop_server in stoppers:
            stop_server()
    return 0


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        return run(args, stop=stop)
    except (ValueError, FetchError) as exc:
        print(f"adapter sync: {exc}", file=sys.stderr)
        return 2
