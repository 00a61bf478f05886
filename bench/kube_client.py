"""The operator's Kubernetes client against a maintained async client, same API server, same run (prints JSON).

The architecture issue asks for a maintained async client (`kubernetes_asyncio`) instead of our
raw-JSON requests over the `kubernetes` ApiClient in a bounded thread pool (`runtime/kube.py`),
unless a measurement says to keep ours. This is that measurement: the request mix a controller
makes — create, get, merge-patch, list, delete of `--n` ConfigMaps — issued `--concurrency` at a
time from one asyncio loop, as the operator's handlers do:

- `ours`: `Kube.request` run in `Kube`'s thread pool (`await kube.run(...)`), wire-form dicts;
- `kubernetes_asyncio`: its typed `CoreV1Api` (what adopting it usually means: typed models out);
- `kubernetes_asyncio_raw`: the same calls with `_preload_content=False`, the JSON parsed by hand
  (what adopting it while keeping wire-form dicts, as our controllers use, would mean).

Per client and phase: wall seconds and the process's CPU seconds (all threads) per request; the
clients take turns for `--rounds` rounds and the medians are reported, with `ours / other` ratios
(< 1: ours is cheaper). The API server's own cost is the same for both and is not counted.

Platform selection as in the tests (ragtune_local.testing.open_platform).
Usage: python bench/kube_client.py [--n 300] [--concurrency 8] [--rounds 3]
Needs `kubernetes_asyncio` (in the `dev` extra: `make install`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import time
from typing import Awaitable, Callable

import benchio

PHASES = ("create", "get", "patch", "list", "delete")
PAYLOAD = {"config.yaml": "x" * 1024}  # about the size of a small status or template


def log(message: str) -> None:
    print(f"[kube_client] {message}", file=sys.stderr, flush=True)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def bounded(calls: list[Callable[[], Awaitable[object]]], concurrency: int) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def one(call):
        async with gate:
            await call()

    await asyncio.gather(*(one(c) for c in calls))


def configmap(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": {"bench": "kube-client"}},
            "data": dict(PAYLOAD)}


class Ours:
    name = "ours"

    def __init__(self, kubeconfig: str, namespace: str, concurrency: int):
        from ragtune.runtime.kube import MERGE_PATCH, Kube

        self.kube, self.merge = Kube(kubeconfig=kubeconfig, workers=concurrency), MERGE_PATCH
        self.base = f"/api/v1/namespaces/{namespace}/configmaps"

    async def call(self, method: str, path: str, body=None, content_type: str = "application/json",
                   query=None) -> dict:
        return await self.kube.run(lambda: self.kube.request(method, path, body, query=query,
                                                             content_type=content_type))

    def phase(self, phase: str, names: list[str]) -> list[Callable[[], Awaitable[object]]]:
        if phase == "create":
            return [lambda n=n: self.call("POST", self.base, configmap(n)) for n in names]
        if phase == "get":
            return [lambda n=n: self.call("GET", f"{self.base}/{n}") for n in names]
        if phase == "patch":
            return [lambda n=n: self.call("PATCH", f"{self.base}/{n}", {"data": {"step": "2"}}, self.merge)
                    for n in names]
        if phase == "list":
            return [lambda: self.call("GET", self.base, query=[("labelSelector", "bench=kube-client")])
                    for _ in range(10)]
        return [lambda n=n: self.call("DELETE", f"{self.base}/{n}") for n in names]

    async def close(self) -> None:
        self.kube.close()


class KubernetesAsyncio:
    name = "kubernetes_asyncio"
    raw = False

    def __init__(self, kubeconfig: str, namespace: str, concurrency: int):
        self.kubeconfig, self.namespace, self.concurrency = kubeconfig, namespace, concurrency

    async def open(self) -> "KubernetesAsyncio":
        from kubernetes_asyncio import client, config

        configuration = client.Configuration()
        await config.load_kube_config(config_file=self.kubeconfig, client_configuration=configuration)
        configuration.connection_pool_maxsize = self.concurrency
        self.api_client = client.ApiClient(configuration)
        self.core = client.CoreV1Api(self.api_client)
        return self

    def _call(self, method, *args, **kwargs) -> Callable[[], Awaitable[object]]:
        if not self.raw:
            return lambda: method(*args, **kwargs)

        async def wire_form():
            response = await method(*args, _preload_content=False, **kwargs)
            try:
                return json.loads(await response.read())
            finally:
                response.release()
        return wire_form

    def phase(self, phase: str, names: list[str]) -> list[Callable[[], Awaitable[object]]]:
        core, ns = self.core, self.namespace
        if phase == "create":
            return [self._call(core.create_namespaced_config_map, ns, configmap(n)) for n in names]
        if phase == "get":
            return [self._call(core.read_namespaced_config_map, n, ns) for n in names]
        if phase == "patch":
            return [self._call(core.patch_namespaced_config_map, n, ns, {"data": {"step": "2"}},
                               _content_type="application/merge-patch+json") for n in names]
        if phase == "list":
            return [self._call(core.list_namespaced_config_map, ns, label_selector="bench=kube-client")
                    for _ in range(10)]
        return [self._call(core.delete_namespaced_config_map, n, ns) for n in names]

    async def close(self) -> None:
        await self.api_client.close()


class KubernetesAsyncioRaw(KubernetesAsyncio):
    name = "kubernetes_asyncio_raw"
    raw = True


async def measure(client, n: int, concurrency: int, round_: int) -> dict[str, dict[str, float]]:
    names = [f"{client.name.replace('_', '-')}-{round_}-{i:04d}" for i in range(n)]
    out = {}
    for phase in PHASES:
        calls = client.phase(phase, names)
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        await bounded(calls, concurrency)
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        out[phase] = {"requests": len(calls), "wall_s": wall, "cpu_ms_per_request": 1000 * cpu / len(calls)}
    return out


async def campaign(kubeconfig: str, namespace: str, args: argparse.Namespace) -> dict:
    clients = [Ours(kubeconfig, namespace, args.concurrency),
               await KubernetesAsyncio(kubeconfig, namespace, args.concurrency).open(),
               await KubernetesAsyncioRaw(kubeconfig, namespace, args.concurrency).open()]
    runs: dict[str, list[dict]] = {c.name: [] for c in clients}
    try:
        for round_ in range(args.rounds):
            order = clients[round_ % len(clients):] + clients[:round_ % len(clients)]  # rotate: drift hits all
            for client in order:
                runs[client.name].append(await measure(client, args.n, args.concurrency, round_))
                log(f"round {round_ + 1}/{args.rounds} {client.name}: "
                    + ", ".join(f"{p} {runs[client.name][-1][p]['wall_s']:.2f}s" for p in PHASES))
    finally:
        for client in clients:
            await client.close()

    def median(name: str, phase: str, key: str) -> float:
        return statistics.median(r[phase][key] for r in runs[name])

    result = {}
    for name in runs:
        result[name] = {p: {"wall_s": round(median(name, p, "wall_s"), 3),
                            "requests_per_s": round(runs[name][0][p]["requests"] / median(name, p, "wall_s"), 1),
                            "cpu_ms_per_request": round(median(name, p, "cpu_ms_per_request"), 3)}
                        for p in PHASES}
        total_wall = sum(median(name, p, "wall_s") for p in PHASES)
        total_requests = sum(runs[name][0][p]["requests"] for p in PHASES)
        result[name]["total"] = {"wall_s": round(total_wall, 3), "requests": total_requests,
                                 "requests_per_s": round(total_requests / total_wall, 1)}

    def ratios(other: str) -> dict:
        out = {p: {"wall": round(result["ours"][p]["wall_s"] / result[other][p]["wall_s"], 3),
                   "cpu_per_request": round(result["ours"][p]["cpu_ms_per_request"]
                                            / result[other][p]["cpu_ms_per_request"], 3)} for p in PHASES}
        out["total_wall"] = round(result["ours"]["total"]["wall_s"] / result[other]["total"]["wall_s"], 3)
        return out

    return {"clients": result, "ratio_ours_over": {c.name: ratios(c.name) for c in clients[1:]}}


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=300, help="ConfigMaps per phase")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (the operator's pool size)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    try:
        import kubernetes_asyncio
    except ImportError:
        raise SystemExit("bench/kube_client.py needs kubernetes_asyncio: `make install` (the dev extra) "
                         "or `pip install kubernetes_asyncio`") from None
    import kubernetes

    from ragtune_local.testing import close_platform, open_platform

    handle, owned = open_platform()
    namespace = f"bench-kube-client-{os.getpid()}"
    try:
        handle.kubectl("create", "namespace", namespace)
        doc = asyncio.run(campaign(handle.kubeconfig, namespace, args))
        handle.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
    finally:
        if owned:
            close_platform(handle)
    flags = open("/proc/cpuinfo").read()
    return {"benchmark": "kube_client", "n": args.n, "concurrency": args.concurrency, "rounds": args.rounds,
            "versions": {"kubernetes": kubernetes.__version__, "kubernetes_asyncio": kubernetes_asyncio.__version__},
            "cpu": {"cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags, "avx2": " avx2" in flags,
                    "loadavg_at_end": os.getloadavg()},
            **doc}


if __name__ == "__main__":
    sys.exit(benchio.run(main))
