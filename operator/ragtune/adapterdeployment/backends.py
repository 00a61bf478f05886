"""The serving backend behind a small interface: TGI now (adapters fixed at start, selected per
request), vLLM later (runtime `/v1/load_lora_adapter`). Rendering and the online evaluator only
use what is here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol


class ServingBackend(Protocol):
    name: str
    container_name: str
    health_path: str
    max_lora_rank: int
    supported_target_modules: tuple[str, ...]

    def env(self, *, model_id: str, revision: Optional[str], adapters: dict[str, str], port: int,
            offline: bool, limits: dict[str, Optional[int]]) -> list[dict]:
        """Container environment that makes the server load `model_id` and `adapters` (name -> path)."""

    def generate(self, base_url: str, prompt: str, *, adapter: Optional[str], max_new_tokens: int,
                 timeout: float = 120.0) -> str:
        """Greedy completion of `prompt` with `adapter` (None: the base model)."""


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

    def generate(self, base_url: str, prompt: str, *, adapter: Optional[str], max_new_tokens: int,
                 timeout: float = 120.0) -> str:
        from huggingface_hub import InferenceClient

        client = InferenceClient(base_url=base_url, timeout=timeout)
        return client.text_generation(prompt, adapter_id=adapter, max_new_tokens=max_new_tokens,
                                      details=False, do_sample=False)


TGI = TgiBackend()
