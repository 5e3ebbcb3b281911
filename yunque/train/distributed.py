"""Everything that knows about torch.distributed: process group, DDP / FSDP2, collectives, state dicts.

A run started by `torchrun` has RANK / WORLD_SIZE / LOCAL_RANK in its environment; anything
else is one process and every helper here degrades to a no-op. Backend: NCCL when training
on CUDA, gloo otherwise (CPU tests and CPU clusters).

Data parallelism in yunque is "same stream, own slice": every rank runs the same packer and
takes its own rows of each global micro-batch, so all ranks agree on the data position and
on the trained-token count of a step without communicating, and N processes see exactly
the rows one process with the same global batch sees.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from yunque.errors import ConfigError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    kind: str = "none"  # none | ddp | fsdp

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init(kind: str, device_type: str) -> Dist:
    """Join the process group torchrun describes (one process: nothing to join).

    kind `auto` is DDP under torchrun and none otherwise. `none` with several processes is
    refused: each rank would train its own slice of the data into its own, diverging weights.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(kind="none" if kind == "auto" else kind)
    if kind == "none":
        raise ConfigError(
            f"parallel: none, but torchrun started {world} processes (WORLD_SIZE={world}): they would "
            "train unsynchronised copies with no gradient all-reduce; use parallel: auto or ddp "
            "(data parallel) or fsdp (sharded), or run one process"
        )
    if kind == "auto":
        kind = "ddp"
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" and dist.is_nccl_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), kind)


def device_for(d: Dist, requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def all_reduce_sum(d: Dist, t: torch.Tensor) -> torch.Tensor:
    if d.active:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(d: Dist, obj):
    if not d.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(d: Dist, module: nn.Module, layers: nn.ModuleList, device: torch.device) -> nn.Module:
    """DDP replicates `module`; FSDP2 shards each layer and the rest (embeddings, head) as the root."""
    if d.kind == "ddp" and d.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        return DDP(module, device_ids=ids, broadcast_buffers=False)
    if d.kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in layers:
            fully_shard(layer)
        fully_shard(module)
    return module


def no_sync(d: Dist, module: nn.Module):
    """Context factory: skip the gradient all-reduce on all but the last micro-batch of a step."""
    if d.kind == "ddp" and d.active:
        return lambda skip: module.no_sync() if skip else contextlib.nullcontext()
    if d.kind == "fsdp" and d.active:

        def ctx(skip: bool):
            module.set_requires_gradient_sync(not skip)
            return contextlib.nullcontext()

        return ctx
    return lambda skip: contextlib.nullcontext()


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in sd.items()}


def gather_model_state(module: nn.Module, prefix: str) -> dict:
    """Unsharded model state on CPU, keyed without `prefix`. Collective under FSDP (rank 0 holds it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return _strip(get_model_state_dict(module, options=_options()), prefix)


def gather_optim_state(module: nn.Module, optimizer: torch.optim.Optimizer, prefix: str) -> dict:
    """Optimizer state keyed by parameter name (not position), unsharded, on CPU."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(module, optimizer, options=_options())
    if not osd:  # full_state_dict + cpu_offload: only rank 0 receives it
        return {}
    return {
        "state": _strip(osd["state"], prefix),
        "param_groups": [
            dict(g, params=[p[len(prefix) :] if p.startswith(prefix) else p for p in g["params"]])
            for g in osd["param_groups"]
        ],
    }


def set_model_state(module: nn.Module, prefix: str, msd: dict) -> None:
    """Every rank passes the full dict it read; FSDP keeps its own shard. Missing keys stay as they are."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(module, {prefix + k: v for k, v in msd.items()}, options=_options(strict=False))


def set_optim_state(module: nn.Module, optimizer: torch.optim.Optimizer, prefix: str, osd: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    osd = {
        "state": {prefix + k: v for k, v in osd["state"].items()},
        "param_groups": [dict(g, params=[prefix + p for p in g["params"]]) for g in osd["param_groups"]],
    }
    set_optimizer_state_dict(module, optimizer, osd, options=_options())
