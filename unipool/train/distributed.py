"""Process groups from the torchrun environment, rank-0 printing, and data-parallel wrapping.

    torchrun --nproc_per_node N -m unipool.train ...   (or `unipool train ...` under torchrun)

Backends: NCCL on CUDA, gloo on CPU. Two data-parallel modes:
- ddp: DistributedDataParallel with broadcast_buffers=False. The routing statistics (the pool loss's
  f-bar, aux-free biases) are buffers; each rank keeps its own, as Megatron does.
- fsdp: FSDP2 (`fully_shard`). Each expert pool is sharded first, as its own unit, so every pool
  parameter lives in exactly one FSDP group although several layers call it; then each block, then
  the root. A pool shared by several layers stays unsharded through the forward pass
  (reshard_after_forward=False): resharding would all-gather it again for every calling layer.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device_type: str) -> DistInfo:
    """Join the process group torchrun describes (a no-op for a single process)."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        # NCCL's object collectives (broadcast_object) and our scalar reductions use the current device:
        # without this every rank would use GPU 0
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size())


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(n: int) -> int:
    if not dist.is_initialized():
        return n
    t = torch.tensor([n], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda(torch.cuda.current_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def broadcast_object(obj):
    """Rank 0's value of a picklable object, on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def resolve_mode(requested: str, info: DistInfo) -> str:
    """The data-parallel mode: as requested, and DDP when torchrun started several processes without
    saying which ("none" is a single process)."""
    return requested if requested != "none" or not info.enabled else "ddp"


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, mode: str) -> tuple[dict, dict]:
    """The whole (unsharded) model and optimizer state, as rank 0 saves them. Under FSDP2 every rank
    takes part in gathering them; the result is on the CPU."""
    if mode != "fsdp" or not dist.is_initialized():
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, mode: str) -> None:
    """Load a full optimizer state (as `full_state_dicts` returns it), sharding it under FSDP2."""
    if mode != "fsdp" or not dist.is_initialized():
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm (0: measure only) and return it, the same on every rank (under
    FSDP2 the norm is a DTensor over the shards)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else math.inf)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def wrap(model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """Return the module to call in training: the model itself, a DDP wrapper, or (FSDP) the model
    sharded in place. The caller keeps the unwrapped model for update_routing_state and config."""
    if mode == "none" or not dist.is_initialized():
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    from torch.distributed.fsdp import fully_shard

    shared = model.config.layers_per_pool > 1
    for pool in model.experts:  # pools first: each is one FSDP unit
        fully_shard(pool, reshard_after_forward=not shared)
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def no_sync(model: nn.Module, mode: str, skip: bool):
    """Skip the gradient all-reduce / reduce-scatter on micro-batches before the last one."""
    if not skip or not dist.is_initialized():
        return contextlib.nullcontext()
    if mode == "ddp":
        return model.no_sync()
    if mode == "fsdp":
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
