"""`ragtune operator run`: the composition root of the operator process — kopf with ragtune's
settings and the handlers of both controllers (`ragtune.finetunejob.controller`,
`ragtune.adapterdeployment.controller`)."""

from __future__ import annotations

import argparse
import sys

OPTIONAL_CLIENTS_KOPF_PROBES = ("kubernetes_asyncio", "pykube")
"""Client libraries kopf imports, when installed, to recognise their objects in what handlers
return. The operator returns none of them, and kubernetes_asyncio's generated models alone cost
~30 MB of RSS and seconds of start-up wherever it is installed (the dev environment has it for
`bench/kube_client.py`; the operator image does not), so the operator process skips them.
`kubernetes` stays: `runtime.kube` uses its ApiClient."""


def skip_optional_clients() -> None:
    """Make kopf's optional-import probes fail fast (before kopf is imported)."""
    for name in OPTIONAL_CLIENTS_KOPF_PROBES:
        sys.modules.setdefault(name, None)


def register_handlers() -> None:
    """Import kopf's startup settings and every controller module: importing registers handlers."""
    skip_optional_clients()
    from ragtune.runtime import kopf_setup  # noqa: F401
    from ragtune.adapterdeployment import controller as _ad  # noqa: F401
    from ragtune.finetunejob import controller as _ftj  # noqa: F401


def _lead(config, liveness_url: str) -> None:
    """Block until this replica holds the operator's Lease (answering liveness probes meanwhile:
    a standby is healthy), then keep renewing it; losing it ends the process (docs/architecture.md)."""
    import logging
    import os

    from .runtime.kube import Kube
    from .runtime.leader import LeaderElector, default_identity

    log = logging.getLogger("ragtune.leader")
    elector = LeaderElector(Kube(workers=2), config.leader_election_namespace, default_identity(),
                            lease_seconds=config.lease_seconds, renew_seconds=max(1.0, config.lease_seconds / 3),
                            retry_seconds=max(0.5, config.lease_seconds / 7))
    with _standby_health(liveness_url):
        elector.acquire()
    log.info("leading as %s (Lease %s/%s)", elector.identity, elector.namespace, elector.name)

    def lost(why: str) -> None:
        log.error("leadership lost: %s; exiting so that exactly one replica reconciles", why)
        logging.shutdown()
        os._exit(1)

    elector.keep(lost)


class _standby_health:
    """A minimal `/healthz` on the liveness address while the replica waits for the Lease (kopf
    serves the real one once it runs)."""

    def __init__(self, url: str) -> None:
        self.url, self.server = url, None

    def __enter__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        if not self.url:
            return self

        class Standby(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                body = b'{"standby": true}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_):
                pass

        parts = urlsplit(self.url)
        self.server = ThreadingHTTPServer((parts.hostname or "0.0.0.0", parts.port or 80), Standby)
        threading.Thread(target=self.server.serve_forever, name="standby-health", daemon=True).start()
        return self

    def __exit__(self, *_):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def _cmd_run(args: argparse.Namespace) -> int:
    # Heavy imports only when the command runs (the CLI must stay cheap).
    import dataclasses

    import kopf

    from .runtime.settings import ConfigError, OperatorConfig, set_config

    try:
        config = OperatorConfig.from_env()
    except ConfigError as exc:
        raise SystemExit(f"ragtune operator run: {exc}")
    namespaces = tuple(args.namespace or ()) or config.namespaces
    if args.all_namespaces:
        namespaces = ()
    config = dataclasses.replace(
        config,
        namespaces=namespaces,
        metrics_port=config.metrics_port if args.metrics_port is None else args.metrics_port,
        log_format=args.log_format or config.log_format,
    )
    set_config(config)
    kopf.configure(
        verbose=args.verbose,
        log_format=kopf.LogFormat.JSON if config.log_format == "json" else kopf.LogFormat.FULL,
        log_prefix=config.log_format != "json",
    )

    register_handlers()
    if config.leader_election:
        _lead(config, args.liveness)

    kopf.run(
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=True,
        liveness_endpoint=args.liveness or None,
    )
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    operator = subparsers.add_parser("operator", help="run the ragtune operator")
    sub = operator.add_subparsers(dest="operator_command", metavar="COMMAND", required=True)
    run = sub.add_parser(
        "run",
        help="reconcile FineTuneJobs and AdapterDeployments (kopf), serve metrics and a liveness probe",
        description="Configuration comes from RAGTUNE_* environment variables "
                    "(see ragtune.runtime.settings); flags override them.",
    )
    scope = run.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", metavar="NS",
                       help="serve this namespace (repeatable; default: RAGTUNE_WATCH_NAMESPACES, else all)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="serve every namespace (cluster mode)")
    run.add_argument("--metrics-port", type=int, default=None,
                     help="Prometheus metrics port (default: RAGTUNE_METRICS_PORT or 8080; 0 disables)")
    run.add_argument("--liveness", default="http://0.0.0.0:8081/healthz",
                     help="kopf liveness endpoint URL (empty disables; default: %(default)s)")
    run.add_argument("--log-format", choices=("json", "text"), default=None,
                     help="log format (default: RAGTUNE_LOG_FORMAT or json)")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    run.set_defaults(func=_cmd_run)
