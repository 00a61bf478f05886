"""`ragtune adapters fetch` and `ragtune eval online`: the entry points of the pods the
AdapterDeployment controller runs (operator image, no torch)."""

from __future__ import annotations

import argparse


def _fetch(args: argparse.Namespace) -> int:
    from .fetch import main

    return main(args)


def _sync(args: argparse.Namespace) -> int:
    from .adapter_sync import main

    return main(args)


def _online(args: argparse.Namespace) -> int:
    from .online_eval import main

    return main(args)


def _group(sub, name: str, help: str):
    parser = sub.add_parser(name, help=help)
    return parser.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)


def add_commands(sub) -> None:
    adapters = _group(sub, "adapters", "adapter artifacts (the serving pods' init container)")
    fetch = adapters.add_parser(
        "fetch", help="download adapters from S3, verify every sha256 against the manifest, place them for TGI")
    fetch.add_argument("--adapter", action="append", default=[], metavar="NAME=URI#SHA256",
                       help="adapter id, run prefix and the sha256 of its manifest.json (repeatable; none: "
                            "base weights only, as for vLLM, whose sidecar loads the adapters)")
    fetch.add_argument("--dest", default="/data/adapters", help="folder that gets one sub-folder per adapter")
    fetch.add_argument("--expect-base-model", metavar="ID@REVISION",
                       help="fail unless every manifest names this base model")
    fetch.add_argument("--allowed-target-module", action="append", metavar="MODULE",
                       help="LoRA target modules the server supports (repeatable; default: any)")
    fetch.add_argument("--target-modules-from-base", metavar="DIR",
                       help="allow the base model's per-layer linear modules, read from the weights in DIR "
                            "(vLLM: LoRA on any linear layer)")
    fetch.add_argument("--max-rank", type=int, default=128, help="largest LoRA rank the server supports")
    fetch.add_argument("--base-model-uri", help="also download base weights from this s3:// prefix")
    fetch.add_argument("--base-dest", default="/data/base", help="where the base weights go")
    fetch.set_defaults(func=_fetch)

    sync = adapters.add_parser(
        "sync", help="sidecar: keep a running vLLM's adapter set equal to the desired set, verified, no restart")
    sync.add_argument("--desired", required=True, help="JSON file with the desired set (the mounted ConfigMap key)")
    sync.add_argument("--server", default="http://127.0.0.1:8000", help="vLLM on loopback (nothing else is accepted)")
    sync.add_argument("--dest", default="/data/adapters", help="folder for the verified adapters")
    sync.add_argument("--status", help="write what the pod serves here (JSON) after every change")
    sync.add_argument("--status-listen", metavar="HOST:PORT",
                      help="serve the status document (GET /status) and readiness (GET /ready) here")
    sync.add_argument("--listen", metavar="HOST:PORT",
                      help="the pod's serving port: proxy to --server, refusing vLLM's LoRA load/unload endpoints")
    sync.add_argument("--expect-base-model", metavar="ID@REVISION", help="fail adapters trained on another base")
    sync.add_argument("--allowed-target-module", action="append", metavar="MODULE", help="as for fetch")
    sync.add_argument("--target-modules-from-base", metavar="DIR", help="as for fetch")
    sync.add_argument("--max-rank", type=int, default=16, help="vLLM's --max-lora-rank")
    sync.add_argument("--interval", type=float, default=2.0, help="seconds between passes")
    sync.add_argument("--once", action="store_true", help="one pass, then exit")
    sync.set_defaults(func=_sync)

    evaluation = _group(sub, "eval", "evaluation")
    online = evaluation.add_parser("online", help="canary evaluation through the TGI API (the evaluation Job)")
    online.add_argument("--config", help="JSON config file (default: $RAGTUNE_EVAL_CONFIG)")
    online.set_defaults(func=_online)
