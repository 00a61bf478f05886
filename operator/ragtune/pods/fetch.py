"""`ragtune adapters fetch`: the init container of every TGI pod ragtune renders.

For each `--adapter name=<run-uri>#<manifest-sha256>`: download `manifest.json`, check its sha256
against the pinned digest, check the base model and the adapter's shape against what the server
supports, download every `adapter/` file listed in the manifest, verify each file's sha256 and
size, and place the folder at `<dest>/<name>` (atomically: a half-downloaded adapter is never
visible). Any failure exits non-zero with a `FetchResult` JSON termination message that names the
adapter, the file and the reason, which the operator surfaces in the AdapterDeployment's status.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

from pydantic import ValidationError

from ragtune.api.base import ApiModel
from ragtune.api.pods import (
    ADAPTER_DIR,
    DEFAULT_TERMINATION_PATH,
    ENV_TERMINATION_PATH,
    MANIFEST,
    FetchedAdapter,
    FetchResult,
    Manifest,
    encode_termination_message,
)

log = logging.getLogger("ragtune.fetch")


class FetchError(Exception):
    def __init__(self, reason: str, message: str, adapter: Optional[str] = None):
        super().__init__(message)
        self.reason, self.adapter = reason, adapter


def parse_adapter_arg(value: str) -> tuple[str, str, str]:
    """`name=<uri>#<sha256>` -> (name, uri, sha256)."""
    name, sep, rest = value.partition("=")
    uri, hash_sep, digest = rest.rpartition("#")
    if not sep or not name or not hash_sep or not uri or len(digest) != 64:
        raise ValueError(f"--adapter {value!r} must be name=<run-uri>#<64-hex sha256 of manifest.json>")
    return name, uri.rstrip("/") + "/", digest.lower()


def check_adapter_config(name: str, config: dict, allowed_modules: set[str], max_rank: int) -> None:
    """What TGI can load: LoRA (not DoRA / other PEFT types, no trained biases), rank within limits,
    known modules."""
    remedy = "retrain with method lora or qlora, or merge the adapter into the base model and serve the merged model"
    if config.get("peft_type", "LORA") != "LORA":
        raise FetchError("UnsupportedAdapter", f"adapter {name}: peft_type {config.get('peft_type')!r} is not LORA "
                                               f"(TGI and vLLM load LoRA adapters only): {remedy}", name)
    if config.get("use_dora"):
        raise FetchError("UnsupportedAdapter", f"adapter {name}: DoRA adapters are not supported by TGI or vLLM: "
                                               f"{remedy}", name)
    if config.get("bias", "none") != "none":
        raise FetchError("UnsupportedAdapter", f"adapter {name}: trained biases (bias {config['bias']!r}) are not "
                                               "loaded by TGI or vLLM: retrain with lora.bias none, or merge the "
                                               "adapter into the base model and serve the merged model", name)
    ranks = [config.get("r", 0)] + list((config.get("rank_pattern") or {}).values())
    if not all(isinstance(r, int) and 1 <= r <= max_rank for r in ranks):
        raise FetchError("UnsupportedAdapter", f"adapter {name}: LoRA rank {max(ranks)} outside 1..{max_rank}", name)
    modules = config.get("target_modules") or []
    if isinstance(modules, str):  # a regex: cannot be checked statically, TGI decides at load
        return
    if allowed_modules:
        unknown = sorted(set(modules) - allowed_modules)
        if unknown:
            raise FetchError("UnsupportedAdapter",
                             f"adapter {name}: target modules {unknown} are not supported by the server "
                             f"(supported: {sorted(allowed_modules)})", name)
    if config.get("modules_to_save"):
        raise FetchError("UnsupportedAdapter", f"adapter {name}: modules_to_save "
                                               f"{config['modules_to_save']} cannot be served as a LoRA adapter", name)


def base_target_modules(base_dir: Path) -> set[str]:
    """LoRA-able modules of the base model, read from its weights: the leaf names of the 2-D
    `.weight` tensors inside numbered blocks (`model.layers.3.self_attn.q_proj.weight` -> `q_proj`),
    i.e. its per-layer linear projections, whatever the architecture calls them. Only the
    safetensors headers are read."""
    import re
    import struct

    base_dir = Path(base_dir)
    index = base_dir / "model.safetensors.index.json"
    files = sorted({base_dir / f for f in json.loads(index.read_text())["weight_map"].values()}) if index.is_file() \
        else sorted(base_dir.glob("*.safetensors"))
    if not files:
        raise FetchError("BaseModelUnreadable", f"base model {base_dir}: no *.safetensors weights to read the "
                                                "LoRA-able modules from")
    modules = set()
    for path in files:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for tensor, meta in header.items():
            m = re.search(r"\.\d+\.(?:[^.]+\.)*?([^.]+)\.weight$", tensor)
            if m and isinstance(meta, dict) and len(meta.get("shape", ())) == 2:
                modules.add(m.group(1))
    return modules


def check_base_model(name: str, manifest: Manifest, base_files: dict[str, tuple[str, int]]) -> None:
    """The downloaded base weights are exactly those the adapter was trained on (when its
    manifest lists them): every listed file present with its digest, nothing else beside them."""
    if not manifest.base_model_files:
        return
    expected = {f.path: (f.sha256, f.size) for f in manifest.base_model_files}
    for path, (digest, size) in expected.items():
        got = base_files.get(path)
        if got is None:
            raise FetchError("BaseModelMismatch", f"adapter {name}: base model file {path} is missing from the "
                                                  "downloaded base weights", name)
        if got != (digest, size):
            raise FetchError("BaseModelMismatch", f"adapter {name}: base model file {path} has sha256 "
                                                  f"{got[0][:16]}… ({got[1]} bytes), the run trained on "
                                                  f"{digest[:16]}… ({size} bytes)", name)
    extra = sorted(set(base_files) - set(expected))
    if extra:
        raise FetchError("BaseModelMismatch", f"adapter {name}: the base weights hold files the run did not "
                                              f"train with: {', '.join(extra[:5])}", name)


def fetch_adapter(storage, name: str, uri: str, digest: str, dest: Path, *,
                  expect_base: Optional[tuple[str, str]], allowed_modules: set[str], max_rank: int,
                  base_files: Optional[dict[str, tuple[str, int]]] = None) -> FetchedAdapter:
    from ragtune.storage import StorageError, contained_path, sha256_bytes, sha256_file

    manifest_uri = uri + MANIFEST
    try:
        raw = storage.get_bytes(manifest_uri)
    except StorageError as err:
        if err.reason == "S3ObjectNotFound":
            raise FetchError("ManifestMissing", f"adapter {name}: {manifest_uri} not found: the run is "
                                                "incomplete (manifest.json is written last)", name) from None
        raise FetchError(err.reason, f"adapter {name}: {err}", name) from None
    actual = sha256_bytes(raw)
    if actual != digest:
        raise FetchError("DigestMismatch", f"adapter {name}: sha256 of {manifest_uri} is {actual}, "
                                           f"but {digest} is pinned", name)
    try:
        manifest = Manifest.model_validate_json(raw)
    except ValidationError as exc:
        raise FetchError("InvalidManifest", f"adapter {name}: {manifest_uri}: {exc.errors()[0]['loc']}: "
                                            f"{exc.errors()[0]['msg']}", name) from None
    if expect_base:
        got = (manifest.base_model.get("id"), manifest.base_model.get("revision"))
        if got != expect_base:
            raise FetchError("BaseModelMismatch", f"adapter {name} was trained on {got[0]}@{got[1]}, but the "
                                                  f"server runs {expect_base[0]}@{expect_base[1]}", name)
    if base_files is not None:
        check_base_model(name, manifest, base_files)
    files = [f for f in manifest.files if f.path.startswith(ADAPTER_DIR)]
    top = {f.path[len(ADAPTER_DIR):] for f in files}
    if "adapter_config.json" not in top or not any(p.endswith(".safetensors") and "/" not in p for p in top):
        raise FetchError("IncompleteAdapter", f"adapter {name}: the manifest lists no adapter/adapter_config.json "
                                              "or no top-level adapter/*.safetensors (TGI needs both)", name)

    staging = dest.parent / f".{dest.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    total = 0
    for f in files:
        try:
            target = contained_path(staging, f.path[len(ADAPTER_DIR):])
        except ValueError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise FetchError("InvalidManifest", f"adapter {name}: manifest entry {f.path!r}: {exc}", name) from None
        try:
            storage.download(uri + f.path, target)
        except StorageError as err:
            raise FetchError(err.reason, f"adapter {name}: {err}", name) from None
        size, got = target.stat().st_size, sha256_file(target)
        if got != f.sha256 or size != f.size:
            shutil.rmtree(staging, ignore_errors=True)
            raise FetchError("ChecksumMismatch", f"adapter {name}: {f.path} has sha256 {got[:16]}… ({size} bytes), "
                                                 f"the manifest says {f.sha256[:16]}… ({f.size} bytes)", name)
        total += size
    try:
        config = json.loads((staging / "adapter_config.json").read_text())
    except json.JSONDecodeError as exc:
        raise FetchError("UnsupportedAdapter", f"adapter {name}: adapter_config.json is not JSON: {exc}", name) from None
    check_adapter_config(name, config, allowed_modules, max_rank)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(staging, dest)
    return FetchedAdapter(name=name, sha256=digest, files=len(files), bytes=total)


def run(args) -> FetchResult:
    from ragtune.api.common import S3Config
    from ragtune.storage import Storage, StorageError, folder_digests

    storage = Storage(S3Config(region=os.environ.get("AWS_REGION", "us-east-1")))
    dest_root = Path(args.dest)
    expect = None
    if args.expect_base_model:
        model_id, _, revision = args.expect_base_model.rpartition("@")
        expect = (model_id, revision)
    fetched = []
    try:
        specs = [parse_adapter_arg(a) for a in args.adapter]
        names = [s[0] for s in specs]
        if len(set(names)) != len(names):
            raise FetchError("InvalidArguments", f"adapter names repeat: {names}")
        dest_root.mkdir(parents=True, exist_ok=True)
        if args.base_model_uri:
            log.info("downloading base model %s -> %s", args.base_model_uri, args.base_dest)
            try:
                storage.download_prefix(args.base_model_uri, args.base_dest)
            except StorageError as err:
                raise FetchError(err.reason, f"base model: {err}") from None
        # Verified against every adapter's manifest below (adapters trained on these exact weights).
        base_files = folder_digests(args.base_dest) if args.base_model_uri else None
        allowed = set(args.allowed_target_module or [])
        if getattr(args, "target_modules_from_base", None):
            allowed |= base_target_modules(Path(args.target_modules_from_base))
            log.info("LoRA-able modules of the base model: %s", sorted(allowed))
        for name, uri, digest in specs:
            log.info("fetching adapter %s from %s", name, uri)
            fetched.append(fetch_adapter(storage, name, uri, digest, dest_root / name, expect_base=expect,
                                         allowed_modules=allowed, max_rank=args.max_rank, base_files=base_files))
    except ValueError as exc:
        return FetchResult(outcome="Failed", reason="InvalidArguments", message=str(exc))
    except FetchError as exc:
        return FetchResult(outcome="Failed", reason=exc.reason, message=str(exc), adapter=exc.adapter, adapters=fetched)
    return FetchResult(outcome="Succeeded", reason="Fetched",
                       message=f"verified {len(fetched)} adapter(s)", adapters=fetched)


def write_termination_message(result: ApiModel) -> None:
    path = Path(os.environ.get(ENV_TERMINATION_PATH, DEFAULT_TERMINATION_PATH))
    try:
        path.write_text(encode_termination_message(result))
    except OSError as exc:  # e.g. running outside a pod
        log.warning("cannot write termination message to %s: %s", path, exc)


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    result = run(args)
    write_termination_message(result)
    if result.outcome == "Succeeded":
        log.info("%s", result.message)
        return 0
    print(f"{result.reason}: {result.message}", file=sys.stderr)
    return 1
