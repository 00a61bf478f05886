"""The serving backend behind a small interface: TGI (adapters fixed at start via `LORA_ADAPTERS`,
selected per request) and vLLM (`vllm serve --enable-lora`, adapters named as models). Rendering
uses what is here; `backend_for(spec.server)` picks one. Requests to either server go through one
client (`pods/online_eval.Completions`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Protocol

if TYPE_CHECKING:
    from ragtune.api.adapterdeployment import ServerSpec, VllmSettings


class ServingBackend(Protocol):
    name: str
    container_name: str
    health_path: str
    max_lora_rank: int
    supported_target_modules: tuple[str, ...]
    """Empty: read from the base model's weights where the fetcher has them (vLLM)."""

    def env(self, *, model_id: str, revision: Optional[str], adapters: dict[str, str], port: int,
            offline: bool, limits: dict[str, Optional[int]]) -> list[dict]:
        """Container environment that makes the server load `model_id` and `adapters` (name -> path)."""

    def args(self, *, model_id: str, served_name: str, revision: Optional[str], adapters: dict[str, str],
             port: int) -> list[str]:
        """Container args (the image's ENTRYPOINT runs them); empty for a server configured by env."""


@dataclass(frozen=True)
class TgiBackend:
    name: str = "tgi"
    container_name: str = "text-generation-inference"
    health_path: str = "/health"
    # TGI's LoRA layers cover the attention and MLP projections of Llama-family models; an
    # adapter on other modules fails at server start, so the fetcher rejects it before.
    supported_target_modules: tuple[str, ...] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )
    max_lora_rank: int = 128

    def env(self, *, model_id: str, revision: Optional[str], adapters: dict[str, str], port: int,
            offline: bool, limits: dict[str, Optional[int]]) -> list[dict]:
        env = [
            {"name": "MODEL_ID", "value": model_id},
            {"name": "LORA_ADAPTERS", "value": ",".join(f"{n}={p}" for n, p in adapters.items())},
            # CUDA graph replay can skip adapter weights: TGI docs recommend 0 with LoRA.
            {"name": "CUDA_GRAPHS", "value": "0"},
            {"name": "PORT", "value": str(port)},
            {"name": "HF_HOME", "value": "/data/hf"},
        ]
        if revision:
            env.append({"name": "REVISION", "value": revision})
        if offline:
            env.append({"name": "HF_HUB_OFFLINE", "value": "1"})
        env += [{"name": k, "value": str(v)} for k, v in limits.items() if v is not None]
        return env

    def args(self, *, model_id: str, served_name: str, revision: Optional[str], adapters: dict[str, str],
             port: int) -> list[str]:
        return []


TGI = TgiBackend()


def _default_vllm_settings() -> "VllmSettings":
    from ragtune.api.adapterdeployment import VllmSettings

    return VllmSettings()


@dataclass(frozen=True)
class VllmBackend:
    """vLLM's OpenAI-compatible server (`vllm serve`, the image's ENTRYPOINT), on loopback. Its
    adapters are loaded at run time by the adapter-sync sidecar (verified like the fetch init
    container's), so the pod template does not depend on the set. An adapter is a model name:
    unknown names are a 404, not TGI's silent fallback to the base."""

    settings: "VllmSettings" = field(default_factory=_default_vllm_settings)
    name: str = "vllm"
    container_name: str = "vllm"
    health_path: str = "/health"
    # vLLM applies LoRA to the base model's linear layers, whatever the architecture calls them: the
    # fetcher reads them from the base weights instead of a fixed list (render passes the folder).
    supported_target_modules: tuple[str, ...] = ()

    @property
    def max_lora_rank(self) -> int:
        return self.settings.max_lora_rank

    def env(self, *, model_id: str, revision: Optional[str], adapters: dict[str, str], port: int,
            offline: bool, limits: dict[str, Optional[int]]) -> list[dict]:
        env = [
            {"name": "HF_HOME", "value": "/data/hf"},
            # Caches (compiled kernels, torch.compile) on the writable data volume, not in $HOME.
            {"name": "VLLM_CACHE_ROOT", "value": "/data/cache/vllm"},
            {"name": "XDG_CACHE_HOME", "value": "/data/cache"},
            # vLLM reports usage to its maintainers by default: a cluster operator did not ask for that.
            {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
            {"name": "DO_NOT_TRACK", "value": "1"},
            # The adapter-sync sidecar loads and unloads adapters at run time, on loopback only.
            {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"},
        ]
        if offline:
            env.append({"name": "HF_HUB_OFFLINE", "value": "1"})
        return env

    def args(self, *, model_id: str, served_name: str, revision: Optional[str], adapters: dict[str, str],
             port: int) -> list[str]:
        s = self.settings
        # Loopback only: the pod's serving port is the sidecar's proxy, which keeps the runtime LoRA
        # endpoints inside the pod (render.VLLM_LOOPBACK).
        args = [model_id, "--served-model-name", served_name, "--host", "localhost", "--port", str(port),
                "--enable-lora", "--max-loras", str(s.max_loras), "--max-cpu-loras", str(s.capacity),
                "--max-lora-rank", str(s.max_lora_rank), "--dtype", s.dtype]
        if revision:
            args += ["--revision", revision]
        if s.max_model_len:
            args += ["--max-model-len", str(s.max_model_len)]
        if adapters:
            args += ["--lora-modules", *(f"{n}={p}" for n, p in adapters.items())]
        return args + list(s.extra_args)


def backend_for(server: "ServerSpec") -> ServingBackend:
    """The backend `spec.server.backend` names, with its settings."""
    if server.backend.value == "vllm":
        return VllmBackend(server.vllm_settings)
    return TGI
