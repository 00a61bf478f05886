"""Distributed training: the world a trainer process is in (torchrun's RANK / WORLD_SIZE /
LOCAL_RANK), the strategy a spec resolves to, the Trainer settings for it, and `ragtune torchrun`,
the launcher the multi-node pods run.

DDP and FSDP come from transformers/accelerate (the Trainer wraps the model); nothing here
writes collective code. What this module adds is who does what: every rank trains, rank 0 alone
writes the adapter, report, manifest, termination message and progress lines and runs the
evaluation (the other ranks wait for it, so an attempt ends for all ranks together); a checkpoint
is COMPLETE only once every rank has uploaded its part (`checkpoints.upload_checkpoint`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Optional

from ragtune.api.finetunejob import DistributedStrategy, FineTuneJobSpec

WAIT_FOR_RANK0_SECONDS = 6 * 3600
"""The process-group timeout: ranks > 0 wait this long in the final barrier while rank 0 evaluates and
publishes (the default 30 min would fail a long evaluation); a dead peer still fails a collective at
once (its sockets close)."""
FITS_DEVICE_SHARE = 0.6
"""`auto` picks DDP when the weights take at most this share of one device's memory (the rest is
for activations, the adapter's optimizer state and the CUDA context)."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world(env: Optional[dict] = None) -> World:
    """This process's place in the run, from torchrun's environment (one process: rank 0 of 1)."""
    env = os.environ if env is None else env
    try:
        return World(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))
    except ValueError as exc:
        raise SystemExit(f"torchrun environment: {exc}")


def global_batch(spec: FineTuneJobSpec, w: World) -> int:
    """Sequences per optimiser step: per-device batch x world size x accumulation."""
    t = spec.training
    return t.batch_size * w.size * t.gradient_accumulation_steps


def resolve_strategy(spec: FineTuneJobSpec, w: World, device: str, weight_bytes: Optional[int] = None,
                     device_bytes: Optional[int] = None) -> Optional[str]:
    """`ddp`, `fsdp` or None (one process). `auto`: DDP when the weights fit one device (always on
    CPU), FSDP otherwise."""
    if not w.distributed:
        return None
    chosen = spec.training.distributed.strategy
    if chosen != DistributedStrategy.AUTO:
        return chosen.value
    if device != "cuda" or weight_bytes is None or device_bytes is None:
        return "ddp"
    return "ddp" if weight_bytes <= FITS_DEVICE_SHARE * device_bytes else "fsdp"


def weight_bytes(source: str, bits: Optional[int], dtype_bytes: int) -> Optional[int]:
    """The base model's weights in memory, from its config (None when it cannot be read)."""
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
        params = sum(p.numel() for p in model.parameters())
    except Exception:  # an estimate only: DDP is the safe answer
        return None
    return int(params * (bits / 8 if bits else dtype_bytes))


def trainer_settings(strategy: Optional[str], device: str) -> dict[str, Any]:
    """TrainingArguments for the strategy (none for one process)."""
    if strategy is None:
        return {}
    settings: dict[str, Any] = {
        "ddp_backend": "nccl" if device == "cuda" else "gloo",
        "ddp_timeout": WAIT_FOR_RANK0_SECONDS,
        # Every LoRA parameter gets a gradient each step: no graph walk for unused ones.
        "ddp_find_unused_parameters": False,
    }
    if strategy == "fsdp":
        # FSDP2 (fully_shard) with full sharding: parameters re-sharded after each forward; each
        # decoder layer its own unit (the model's `_no_split_modules`). The adapter and checkpoints are
        # saved as full state dicts gathered on rank 0 (a LoRA adapter is small).
        settings["fsdp"] = True
        settings["fsdp_config"] = {"version": 2, "reshard_after_forward": True, "state_dict_type": "FULL_STATE_DICT",
                                   "cpu_ram_efficient_loading": False}
    return settings


def wait_for_everyone() -> None:
    """A barrier over all ranks (a no-op for one process). Joins the process group when no Trainer
    did yet (a retry that finds training finished), with the long timeout ranks > 0 wait for rank 0
    under."""
    from datetime import timedelta

    from accelerate import PartialState

    PartialState(timeout=timedelta(seconds=WAIT_FOR_RANK0_SECONDS)).wait_for_everyone()


def sum_over_ranks(*values: float) -> tuple[float, ...]:
    """Each value summed over all ranks (one small all-reduce through accelerate; float64, so token
    counts stay exact)."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import reduce

    local = torch.tensor([float(v) for v in values], dtype=torch.float64, device=PartialState().device)
    return tuple(reduce(local, reduction="sum").tolist())


def any_rank(*flags: bool) -> tuple[bool, ...]:
    """Each flag, true when it is true on any rank."""
    return tuple(v > 0 for v in sum_over_ranks(*(1.0 if f else 0.0 for f in flags)))


def follower_result(run_id: str, steps: int, seconds: float):
    """What a rank > 0 returns once its training is done: only the CLI's exit code reads it (rank 0
    writes the run's result)."""
    from ragtune.api.pods import TrainerResult

    return TrainerResult(outcome="Succeeded", reason="Completed", run_id=run_id, steps=steps,
                         train_seconds=seconds,
                         message=f"rank {world().rank}: trained {steps} steps; rank 0 evaluates and publishes")


_PEER_FAILURE = ("connection closed by peer", "connection reset by peer", "remote worker crashing", "broken pipe")


def peer_failure(exc: BaseException) -> Optional[str]:
    """The result message when `exc` is this rank's collective breaking because another rank died (the
    attempt fails as a whole; the other rank's pod shows why), else None."""
    text = " ".join(str(exc).split())
    if world().distributed and any(p in text.lower() for p in _PEER_FAILURE):
        return f"another rank of the attempt failed (its pod says why): {text[:300]}"
    return None


# --- `ragtune torchrun` ---------------------------------------------------------------------


def add_commands(subparsers) -> None:
    import argparse

    # prefix_chars="+": every "--flag" after `torchrun` is torchrun's, passed through untouched.
    launch = subparsers.add_parser("torchrun", prefix_chars="+", add_help=False,
                                   help="torchrun that exits with the workers' exit code (the trainer pods)")
    launch.add_argument("torchrun_args", nargs=argparse.REMAINDER)
    launch.set_defaults(func=lambda args: launch_torchrun(args.torchrun_args))


def launch_torchrun(argv: list[str]) -> int:
    """Run torchrun with `argv`; exit 0, the permanent exit 2 when any worker exited 2, else 1.
    A rendezvous that does not complete in time ends as `RendezvousTimeout` in the termination
    message (no rank ran, so nobody else writes one)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import get_args_parser, run

    from ragtune.api import pods

    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except ChildFailedError as exc:
        codes = sorted({f.exitcode for f in exc.failures.values()})
        print(f"ragtune torchrun: workers failed with exit codes {codes}", file=sys.stderr, flush=True)
        return pods.EXIT_PERMANENT if pods.EXIT_PERMANENT in codes else pods.EXIT_RETRYABLE
    except RendezvousError as exc:
        deadline = _join_timeout(args.rdzv_conf)
        within = f" within {deadline} s (training.distributed.rendezvousTimeoutSeconds)" if deadline else ""
        detail = f"{type(exc).__name__}: {exc}".rstrip(": ")
        message = (f"not all {args.nnodes} nodes joined the rendezvous at {args.rdzv_endpoint}{within}: {detail}; "
                   "a node that cannot start (unschedulable, image pull) keeps the others waiting")
        print(f"ragtune torchrun: RendezvousTimeout: {message}", file=sys.stderr, flush=True)
        result = pods.TrainerResult(outcome="Failed", reason="RendezvousTimeout", message=message[:1000],
                                    run_id=os.environ.get(pods.ENV_RUN_ID))
        path = os.environ.get(pods.ENV_TERMINATION_PATH, pods.DEFAULT_TERMINATION_PATH)
        try:
            with open(path, "w") as out:
                out.write(pods.encode_termination_message(result))
        except OSError:
            pass
        return pods.EXIT_RETRYABLE
    return 0


def _join_timeout(rdzv_conf: str) -> Optional[str]:
    """`join_timeout` of torchrun's `--rdzv-conf k=v,k=v` (None when not set: torchrun's 600 s)."""
    for item in (rdzv_conf or "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == "join_timeout" and value.strip():
            return value.strip()
    return None
