"""TEST DOUBLE of Hugging Face TGI's HTTP API (see the package docstring).

Routes: `POST /` (compat: array of GenerateResponse), `POST /generate`, `POST /generate_stream`
(SSE), `POST /v1/chat/completions` and `POST /v1/completions` (non-streaming; `model` other than
"tgi" is the adapter id, as TGI's router reads it since 2.2), `GET /health`, `GET /info`, `GET /v1/models`,
`GET /metrics` (Prometheus text under TGI's own names: `tgi_request_count`, `tgi_request_success`,
`tgi_request_failure{err}`, histograms `tgi_request_duration` (seconds) and
`tgi_request_generated_tokens`; generation routes only, as TGI counts them).

Fault injection (not TGI's): `STANDIN_FAIL_WITH_ADAPTER=<name>` makes every generation request fail
(424, counted as a failure) while adapter `<name>` is loaded: a candidate set whose server fails.
`STANDIN_FAIL_WHILE_FILE=<path>` does the same while the file `<path>` exists (looked up on every
request): a server that goes bad after it passed its checks, e.g. after promotion.
Requests are served one at a time under a lock: peft switches the active adapter on the shared
model (`set_adapter`), so two concurrent requests must not interleave.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional

from ragtune.rag.prompt import FALLBACK_CHAT_TEMPLATE

log = logging.getLogger("tgi-standin")

VERSION = "3.3.6-standin"
ADAPTERS_HEADER = "X-Standin-Adapters"
MAX_CLIENT_BATCH_SIZE = 4  # TGI's default --max-client-batch-size (also in /info)


class ConfigError(ValueError):
    """Bad environment configuration (names the variable)."""


@dataclass
class Config:
    model_id: str
    adapters: dict[str, str]
    port: int = 3000
    hostname: str = "0.0.0.0"
    max_input_tokens: int = 1024
    max_total_tokens: int = 2048
    max_concurrent_requests: int = 128
    extra: dict[str, str] = field(default_factory=dict)
    fail_with_adapter: str = ""
    fail_while_file: str = ""

    @classmethod
    def from_env(cls, env: dict[str, str]) -> "Config":
        model_id = env.get("MODEL_ID", "")
        if not model_id:
            raise ConfigError("MODEL_ID is not set (the stand-in needs a local model folder)")
        if not Path(model_id).is_dir():
            raise ConfigError(f"MODEL_ID={model_id!r} is not a local folder (the stand-in has no Hub access)")
        return cls(
            model_id=model_id,
            adapters=parse_lora_adapters(env.get("LORA_ADAPTERS", "")),
            port=_int(env, "PORT", 3000),
            hostname=env.get("HOSTNAME") or "0.0.0.0",
            max_input_tokens=_int(env, "MAX_INPUT_TOKENS", 1024),
            max_total_tokens=_int(env, "MAX_TOTAL_TOKENS", 2048),
            max_concurrent_requests=_int(env, "MAX_CONCURRENT_REQUESTS", 128),
            fail_with_adapter=env.get("STANDIN_FAIL_WITH_ADAPTER", ""),
            fail_while_file=env.get("STANDIN_FAIL_WHILE_FILE", ""),
        )


def _int(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None


def parse_lora_adapters(value: str) -> dict[str, str]:
    """`name=/path,name2=/path2` -> {name: path}, as TGI's launcher reads LORA_ADAPTERS.
    Bare ids (Hub downloads in TGI) are refused: the stand-in is offline."""
    adapters: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"LORA_ADAPTERS entry {item!r} must be name=/local/path")
        if name in adapters:
            raise ConfigError(f"LORA_ADAPTERS names adapter {name!r} twice")
        folder = Path(path)
        if not (folder / "adapter_config.json").is_file() or not list(folder.glob("*.safetensors")):
            # TGI refuses adapter folders without these at top level; so do we.
            raise ConfigError(f"LORA_ADAPTERS {name}={path}: needs adapter_config.json and *.safetensors at top level")
        adapters[name] = path
    return adapters


DURATION_BUCKETS = tuple(round(0.001 * 2 ** i, 6) for i in range(16))  # 1 ms .. 32.8 s
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class Metrics:
    """TGI's request metrics (its router's names), for `GET /metrics`."""

    def __init__(self):
        self.lock = threading.Lock()
        self.count = self.success = 0
        self.failures: dict[str, int] = {}
        self.duration = [0] * len(DURATION_BUCKETS)
        self.duration_sum = 0.0
        self.tokens = [0] * len(TOKEN_BUCKETS)
        self.tokens_sum = 0

    def record(self, seconds: float, tokens: Optional[int], err: Optional[str]) -> None:
        with self.lock:
            self.count += 1
            if err is not None:
                self.failures[err] = self.failures.get(err, 0) + 1
                return
            self.success += 1
            self.duration_sum += seconds
            for i, b in enumerate(DURATION_BUCKETS):
                self.duration[i] += seconds <= b
            self.tokens_sum += tokens or 0
            for i, b in enumerate(TOKEN_BUCKETS):
                self.tokens[i] += (tokens or 0) <= b

    def text(self) -> str:
        with self.lock:
            out = ["# TYPE tgi_request_count counter", f"tgi_request_count {self.count}",
                   "# TYPE tgi_request_success counter", f"tgi_request_success {self.success}",
                   "# TYPE tgi_request_failure counter"]
            out += [f'tgi_request_failure{{err="{e}"}} {n}' for e, n in sorted(self.failures.items())]
            for name, buckets, counts, total in (
                    ("tgi_request_duration", DURATION_BUCKETS, self.duration, self.duration_sum),
                    ("tgi_request_generated_tokens", TOKEN_BUCKETS, self.tokens, self.tokens_sum)):
                out.append(f"# TYPE {name} histogram")
                out += [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(buckets, counts)]
                out += [f'{name}_bucket{{le="+Inf"}} {self.success}', f"{name}_sum {total}",
                        f"{name}_count {self.success}"]
            return "\n".join(out) + "\n"


class ApiError(Exception):
    def __init__(self, status: int, message: str, error_type: str):
        super().__init__(message)
        self.status, self.message, self.error_type = status, message, error_type


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    prompt_tokens: int
    seed: Optional[int]


class Engine:
    """Base model + LoRA adapters (peft), one generation at a time."""

    def __init__(self, config: Config):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(config.model_id)
        model = AutoModelForCausalLM.from_pretrained(config.model_id, dtype=torch.float32)
        if config.adapters:
            from peft import PeftModel

            items = list(config.adapters.items())
            model = PeftModel.from_pretrained(model, items[0][1], adapter_name=items[0][0])
            for name, path in items[1:]:
                model.load_adapter(path, adapter_name=name)
        model.eval()
        self.model = model
        self.lock = threading.Lock()

    def generate(self, prompt: str, params: dict[str, Any]) -> Generation:
        torch = self.torch
        max_new = params.get("max_new_tokens")
        max_new = 1024 if max_new is None else int(max_new)
        if max_new < 0:
            raise ApiError(422, "Input validation error: `max_new_tokens` must be >= 0", "validation")
        ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=True)["input_ids"]
        if ids.shape[1] > self.config.max_input_tokens:
            raise ApiError(422, f"Input validation error: `inputs` must have less than {self.config.max_input_tokens} tokens. Given: {ids.shape[1]}", "validation")
        max_new = min(max_new, max(self.config.max_total_tokens - ids.shape[1], 0))
        do_sample = bool(params.get("do_sample")) or any(
            params.get(k) not in (None, 1.0) for k in ("temperature", "top_p"))
        seed = params.get("seed")
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new, do_sample=do_sample,
                                      return_dict_in_generate=True, output_scores=True,
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        if do_sample:
            for key in ("temperature", "top_p", "top_k"):
                if params.get(key) is not None:
                    kwargs[key] = params[key]
            seed = int(seed) if seed is not None else int(time.time_ns() % (2**31))
        if params.get("repetition_penalty") is not None:
            kwargs["repetition_penalty"] = params["repetition_penalty"]
        adapter = params.get("adapter_id")
        with self.lock:
            if seed is not None:
                torch.manual_seed(seed)
            with torch.no_grad(), self._adapter(adapter):
                if max_new == 0:
                    new_ids: list[int] = []
                    scores: list = []
                else:
                    out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
                    new_ids = out.sequences[0, ids.shape[1]:].tolist()
                    scores = list(out.scores)
        logprobs = [float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in zip(scores, new_ids)]
        finish = "length"
        if new_ids and new_ids[-1] == self.tokenizer.eos_token_id:
            finish = "eos_token"
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        for stop in params.get("stop") or []:
            if stop and stop in text:
                text, finish = text[: text.index(stop) + len(stop)], "stop_sequence"
        return Generation(text, new_ids, logprobs, finish, int(ids.shape[1]), seed)

    def _adapter(self, adapter_id: Optional[str]):
        """Context selecting the adapter; unknown or empty ids run the base model, like TGI."""
        import contextlib

        if adapter_id and adapter_id in self.config.adapters:
            self.model.set_adapter(adapter_id)
            return contextlib.nullcontext()
        if self.config.adapters:
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        plain = []
        for i, m in enumerate(messages):
            content = m.get("content")
            if isinstance(content, list):  # chunks: keep the text parts
                content = "".join(c.get("text", "") for c in content if isinstance(c, dict))
            if not isinstance(content, str) or "role" not in m:
                raise ApiError(422, f"Input validation error: messages[{i}] needs role and content", "validation")
            plain.append({"role": m["role"], "content": content})
        template = self.tokenizer.chat_template or FALLBACK_CHAT_TEMPLATE
        return self.tokenizer.apply_chat_template(plain, chat_template=template, tokenize=False,
                                                  add_generation_prompt=True)


def generate_response(engine: Engine, gen: Generation, params: dict[str, Any], prompt: str) -> dict[str, Any]:
    text = prompt + gen.text if params.get("return_full_text") else gen.text
    body: dict[str, Any] = {"generated_text": text}
    if params.get("details", True):
        special = set(engine.tokenizer.all_special_ids)
        body["details"] = {
            "finish_reason": gen.finish_reason,
            "generated_tokens": len(gen.token_ids),
            "seed": gen.seed,
            "prefill": [],
            "tokens": [
                {"id": t, "text": engine.tokenizer.decode([t]), "logprob": lp, "special": t in special}
                for t, lp in zip(gen.token_ids, gen.logprobs)
            ],
        }
    return body


def make_handler(engine: Engine):
    config = engine.config
    metrics = Metrics()
    faulty = bool(config.fail_with_adapter) and config.fail_with_adapter in config.adapters

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "tgi-standin"

        def log_message(self, fmt, *args):  # route through logging, not stderr spam
            log.debug("%s " + fmt, self.address_string(), *args)

        def _send(self, status: int, body: Any = None, content_type: str = "application/json") -> None:
            data = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            # Not TGI's: which adapter set answered, so traffic-split tests can tell stable from canary.
            self.send_header(ADAPTERS_HEADER, ",".join(sorted(config.adapters)))
            self.end_headers()
            self.wfile.write(data)

        def _json(self) -> dict[str, Any]:
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except json.JSONDecodeError as exc:
                raise ApiError(422, f"Failed to deserialize the JSON body: {exc}", "validation") from None
            if not isinstance(body, dict):
                raise ApiError(422, "Failed to deserialize the JSON body: expected an object", "validation")
            return body

        def do_GET(self):
            if self.path == "/health":
                self._send(200)
            elif self.path == "/info":
                self._send(200, {
                    "model_id": config.model_id, "model_sha": None, "model_pipeline_tag": "text-generation",
                    "max_concurrent_requests": config.max_concurrent_requests, "max_best_of": 2,
                    "max_stop_sequences": 4, "max_input_tokens": config.max_input_tokens,
                    "max_total_tokens": config.max_total_tokens, "validation_workers": 2,
                    "max_client_batch_size": MAX_CLIENT_BATCH_SIZE, "router": "text-generation-router",
                    "version": VERSION,
                    "sha": None, "docker_label": None,
                })
            elif self.path == "/metrics":
                self._send(200, metrics.text().encode(), content_type="text/plain; version=0.0.4")
            elif self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [
                    {"id": config.model_id, "object": "model", "created": 0, "owned_by": config.model_id}]})
            else:
                self._send(404, {"error": f"no route {self.path}", "error_type": "not_found"})

        def do_POST(self):
            routes = {"/": self._generate, "/generate": self._generate, "/generate_stream": self._generate,
                      "/v1/chat/completions": self._chat, "/v1/completions": self._completions}
            route = routes.get(self.path)
            started, self.generated = time.monotonic(), None
            err = None
            try:
                body = self._json()
                if route is None:
                    self._send(404, {"error": f"no route {self.path}", "error_type": "not_found"})
                    return
                if faulty:
                    raise ApiError(424, f"Request failed during generation: injected fault "
                                   f"(STANDIN_FAIL_WITH_ADAPTER={config.fail_with_adapter})", "generation")
                if config.fail_while_file and os.path.exists(config.fail_while_file):
                    raise ApiError(424, f"Request failed during generation: injected fault "
                                   f"(STANDIN_FAIL_WHILE_FILE={config.fail_while_file})", "generation")
                route(body)
            except ApiError as exc:
                err = exc.error_type
                self._send(exc.status, {"error": exc.message, "error_type": exc.error_type})
            except Exception as exc:  # report generation failures the way TGI does (424)
                err = "generation"
                log.exception("generation failed")
                self._send(424, {"error": f"Request failed during generation: {exc}", "error_type": "generation"})
            finally:
                if route is not None:
                    metrics.record(time.monotonic() - started, self.generated, err)

        def _generate(self, body: dict[str, Any]) -> None:
            inputs = body.get("inputs")
            if not isinstance(inputs, str) or not inputs:
                raise ApiError(422, "Input validation error: `inputs` cannot be empty", "validation")
            params = body.get("parameters") or {}
            stream = self.path == "/generate_stream" or (self.path == "/" and body.get("stream"))
            gen = engine.generate(inputs, params)
            self.generated = len(gen.token_ids)
            if stream:
                self._stream(gen, params)
            elif self.path == "/":
                self._send(200, [generate_response(engine, gen, params, inputs)])
            else:
                self._send(200, generate_response(engine, gen, params, inputs))

        def _stream(self, gen: Generation, params: dict[str, Any]) -> None:
            # Generated up front, sent as SSE events in TGI's StreamResponse shape.
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            special = set(engine.tokenizer.all_special_ids)
            for i, (t, lp) in enumerate(zip(gen.token_ids, gen.logprobs)):
                last = i == len(gen.token_ids) - 1
                event = {
                    "index": i,
                    "token": {"id": t, "text": engine.tokenizer.decode([t]), "logprob": lp, "special": t in special},
                    "generated_text": gen.text if last else None,
                    "details": {"finish_reason": gen.finish_reason, "generated_tokens": len(gen.token_ids),
                                "seed": gen.seed} if last and params.get("details", True) else None,
                    "top_tokens": None,
                }
                self.wfile.write(b"data:" + json.dumps(event).encode() + b"\n\n")
            self.wfile.flush()
            self.close_connection = True

        def _chat(self, body: dict[str, Any]) -> None:
            if body.get("stream"):
                raise ApiError(422, "Input validation error: the stand-in does not stream chat completions", "validation")
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ApiError(422, "Input validation error: `messages` cannot be empty", "validation")
            model = body.get("model") or "tgi"
            params = {
                # TGI: `model` names the adapter; anything else (e.g. "tgi") is the base model.
                "adapter_id": model,
                "max_new_tokens": body.get("max_tokens") if body.get("max_tokens") is not None else 1024,
                "temperature": body.get("temperature"), "top_p": body.get("top_p"),
                "seed": body.get("seed"), "stop": body.get("stop"),
            }
            gen = engine.generate(engine.chat_prompt(messages), params)
            self.generated = len(gen.token_ids)
            self._send(200, {
                "id": "", "object": "chat.completion", "created": int(time.time()),
                "model": model if model in config.adapters else config.model_id,
                "system_fingerprint": f"{VERSION}-native",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text},
                             "logprobs": None, "finish_reason": gen.finish_reason}],
                "usage": {"prompt_tokens": gen.prompt_tokens, "completion_tokens": len(gen.token_ids),
                          "total_tokens": gen.prompt_tokens + len(gen.token_ids)},
            })

        def _completions(self, body: dict[str, Any]) -> None:
            """TGI's `/v1/completions`: one generation per prompt (a string or a list of up to
            `max_client_batch_size`), greedy only at temperature 0 (TGI samples when it is unset),
            `suffix` refused, the answer in `CompletionFinal`'s shape with the base model's id."""
            if body.get("stream"):
                raise ApiError(422, "Input validation error: the stand-in does not stream completions", "validation")
            if body.get("suffix") is not None:
                raise ApiError(422, "Suffix is not supported and can be achieved by preprocessing the prompt.",
                               "suffix not supported")
            prompts = body.get("prompt")
            prompts = [prompts] if isinstance(prompts, str) else prompts
            if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
                raise ApiError(422, "Failed to deserialize the JSON body: `prompt` must be a string or a non-empty "
                               "list of strings", "validation")
            if len(prompts) > MAX_CLIENT_BATCH_SIZE:
                raise ApiError(422, f"Number of prompts exceeds the maximum allowed batch size of "
                               f"{MAX_CLIENT_BATCH_SIZE}", "batch size exceeded")
            model = body.get("model")
            temperature = body.get("temperature")
            params = {
                "adapter_id": model if model != "tgi" else None,
                "max_new_tokens": body.get("max_tokens"),
                "do_sample": temperature != 0, "temperature": temperature or None,
                "top_p": body.get("top_p"), "seed": body.get("seed"), "stop": body.get("stop"),
                "repetition_penalty": body.get("repetition_penalty"),
            }
            gens = [engine.generate(p, params) for p in prompts]
            self.generated = sum(len(g.token_ids) for g in gens)
            self._send(200, {
                "object": "text_completion", "id": "", "created": int(time.time()), "model": config.model_id,
                "system_fingerprint": f"{VERSION}-native",
                "choices": [{"index": i, "text": g.text, "logprobs": None,
                             "finish_reason": "stop" if g.finish_reason == "eos_token" else g.finish_reason}
                            for i, g in enumerate(gens)],
                "usage": {"prompt_tokens": sum(g.prompt_tokens for g in gens),
                          "completion_tokens": sum(len(g.token_ids) for g in gens),
                          "total_tokens": sum(g.prompt_tokens + len(g.token_ids) for g in gens)},
            })

    return Handler


def main(env: Optional[dict[str, str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s tgi-standin %(levelname)s %(message)s")
    try:
        config = Config.from_env(dict(os.environ if env is None else env))
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    started = time.monotonic()
    log.info("loading %s with adapters %s", config.model_id, sorted(config.adapters) or "none")
    try:
        engine = Engine(config)
    except Exception as exc:  # TGI's shard fails to start: exit non-zero, the pod restarts
        log.error("failed to load model or adapters: %s", exc)
        return 1
    # Only now open the port: probes fail until everything is loaded, as with TGI.
    server = ThreadingHTTPServer((config.hostname, config.port), make_handler(engine))
    server.daemon_threads = True
    log.info("ready in %.1fs, listening on %s:%d", time.monotonic() - started, config.hostname, config.port)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    server.server_close()
    log.info("shut down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
