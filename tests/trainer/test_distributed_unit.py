"""distributed.py without processes: the world from torchrun's env, the strategy, the settings."""

from __future__ import annotations

import pytest

from ragtune.api.finetunejob import FineTuneJobSpec
from ragtune_trainer import distributed
from ragtune_trainer.distributed import World, global_batch, resolve_strategy, trainer_settings

BASE = {"baseModel": {"id": "m"}, "dataset": {"train": "s3://data/t.jsonl"}, "output": {"uri": "s3://out/r"}}


def _spec(**training) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate({**BASE, "training": training})


def test_world_from_torchrun_env():
    assert distributed.world({}) == World(0, 0, 1) and distributed.world({}).main
    w = distributed.world({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    assert (w.rank, w.local_rank, w.size, w.main, w.distributed) == (3, 1, 4, False, True)


def test_global_batch_is_per_device_times_world_times_accumulation():
    assert global_batch(_spec(batchSize=2, gradientAccumulationSteps=3), World(0, 0, 4)) == 24


@pytest.mark.parametrize("chosen, device, weights, memory, expected", [
    ("auto", "cpu", None, None, "ddp"),              # CPU: always DDP
    ("auto", "cuda", 10 * 2**30, 80 * 2**30, "ddp"),  # fits one device
    ("auto", "cuda", 70 * 2**30, 80 * 2**30, "fsdp"),  # does not
    ("auto", "cuda", None, 80 * 2**30, "ddp"),        # size unknown: the safe answer
    ("fsdp", "cpu", None, None, "fsdp"),
    ("ddp", "cuda", 70 * 2**30, 80 * 2**30, "ddp"),
])
def test_strategy(chosen, device, weights, memory, expected):
    spec = _spec(distributed={"strategy": chosen})
    assert resolve_strategy(spec, World(0, 0, 2), device, weights, memory) == expected
    assert resolve_strategy(spec, World(0, 0, 1), device, weights, memory) is None  # one process


def test_trainer_settings():
    assert trainer_settings(None, "cpu") == {}
    ddp = trainer_settings("ddp", "cpu")
    assert ddp["ddp_backend"] == "gloo" and ddp["ddp_find_unused_parameters"] is False
    assert ddp["ddp_timeout"] >= 3600 and "fsdp" not in ddp
    assert trainer_settings("fsdp", "cuda")["ddp_backend"] == "nccl"
    fsdp = trainer_settings("fsdp", "cuda")
    assert fsdp["fsdp"] is True and fsdp["fsdp_config"]["version"] == 2  # FSDP2, not the deprecated string form
    assert fsdp["fsdp_config"]["reshard_after_forward"] is True  # full shard


def test_a_broken_collective_is_another_ranks_failure(monkeypatch):
    err = RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:22404. This is "
                       "typically caused by a remote worker crashing.")
    assert distributed.peer_failure(err) is None  # one process: not a peer's failure
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.peer_failure(err).startswith("another rank of the attempt failed")
    assert distributed.peer_failure(RuntimeError("shape mismatch")) is None
