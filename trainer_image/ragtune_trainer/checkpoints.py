"""Resumable checkpoints in object storage: `<run>/checkpoints/checkpoint-<step>/` holds what the
Trainer saves (adapter, optimizer, scheduler, RNG, trainer state) and a `COMPLETE` marker written
last. Only marked checkpoints are resumed, so a pod killed mid-upload never resumes from half a
checkpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from ragtune.api.pods import CHECKPOINTS_DIR
from ragtune.storage import Storage, join, sha256_file

COMPLETE_MARKER = "COMPLETE"
KEEP_REMOTE_CHECKPOINTS = 2

_CHECKPOINT_FILE = re.compile(r"/checkpoints/checkpoint-(\d+)/(.+)$")


def _remote_checkpoints(storage: Storage, run_uri: str) -> dict[int, set[str]]:
    """step -> relative file names of every checkpoint under the run prefix."""
    found: dict[int, set[str]] = {}
    for obj in storage.list(join(run_uri, CHECKPOINTS_DIR)):
        m = _CHECKPOINT_FILE.search(obj.uri)
        if m:
            found.setdefault(int(m.group(1)), set()).add(m.group(2))
    return found


def checkpoint_uri(run_uri: str, step: int) -> str:
    return join(run_uri, CHECKPOINTS_DIR, f"checkpoint-{step}") + "/"


def latest_complete_checkpoint(storage: Storage, run_uri: str) -> Optional[tuple[int, str]]:
    """(step, uri) of the newest checkpoint whose completion marker exists."""
    complete = [step for step, files in _remote_checkpoints(storage, run_uri).items() if COMPLETE_MARKER in files]
    return (max(complete), checkpoint_uri(run_uri, max(complete))) if complete else None


def upload_checkpoint(storage: Storage, run_uri: str, local_dir: Path, step: int, world=None) -> None:
    """Upload one checkpoint folder, marker last; then prune old remote checkpoints (marker first,
    so a half-deleted checkpoint never looks complete).

    Several ranks (`world`, a `distributed.World`): each uploads what it saved (rank 0 the adapter,
    optimizer and trainer state, every rank its RNG state) into the same folder; once all have
    (a barrier), rank 0 alone writes the marker and prunes. A rank that dies first never reaches the
    barrier, so that checkpoint is never COMPLETE."""
    prefix = checkpoint_uri(run_uri, step)
    files = storage.upload_dir(local_dir, prefix) if Path(local_dir).is_dir() else []
    marker: dict = {"step": step, "files": {f: sha256_file(Path(local_dir) / f) for f in files}}
    if world is not None and world.distributed:
        from .distributed import wait_for_everyone

        wait_for_everyone()
        if not world.main:
            return
        marker["worldSize"] = world.size
        marker["rankFiles"] = sorted(_remote_checkpoints(storage, run_uri).get(step, set()) - set(files))
    storage.put_bytes(prefix + COMPLETE_MARKER, json.dumps(marker, indent=1).encode())
    for old in sorted(_remote_checkpoints(storage, run_uri))[:-KEEP_REMOTE_CHECKPOINTS]:
        old_prefix = checkpoint_uri(run_uri, old)
        storage.delete_prefix(old_prefix + COMPLETE_MARKER)
        storage.delete_prefix(old_prefix)


def restore_finished(model, local_dir: Path) -> list[dict]:
    """Load the adapter weights of a downloaded checkpoint into `model` (the PeftModel of this run)
    and return the checkpoint's log history (losses and eval losses up to its step)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    local_dir = Path(local_dir)
    weights = load_file(local_dir / "adapter_model.safetensors", device=str(model.device))
    loaded = set_peft_model_state_dict(model, weights)
    if loaded.unexpected_keys:
        raise ValueError(f"{local_dir.name}: adapter weights that do not fit this model's adapter: "
                         f"{', '.join(loaded.unexpected_keys[:5])}")
    return json.loads((local_dir / "trainer_state.json").read_text())["log_history"]
