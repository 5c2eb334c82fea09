"""torchrun multi-process training: process group set-up, devices, model wrapping (DDP or FSDP2), reductions.

The same code runs single-process (nothing is initialised when WORLD_SIZE is unset or 1) and under
`torchrun --nproc-per-node N` (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    return world()[0] == 0


def local_device(device: str | None = None) -> torch.device:
    """This process's device: under torchrun with CUDA, GPU LOCAL_RANK; else `device`, or cuda when available."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def setup(device: torch.device) -> tuple[int, int]:
    """Join the process group torchrun describes (no-op for a single process); returns (rank, world size)."""
    size = int(os.environ.get("WORLD_SIZE", 1))
    if size > 1 and not dist.is_initialized():
        # never NVLink multicast (NVLS): on shared hosts it can take the GPUs out of service
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return world()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _decoder_layers(model: nn.Module):
    for path in ("layers", "model.layers", "base.model.layers"):
        module = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):
            return module
    return None


def wrap(model: nn.Module, mode: str, find_unused_parameters: bool = False) -> nn.Module:
    """Wrap for data parallelism: `mode` "ddp" or "fsdp" (FSDP2 `fully_shard` on each decoder layer and each
    module list of trainable blocks, then the root); unchanged when not distributed."""
    rank, size = world()
    if size == 1:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=find_unused_parameters)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        layers = _decoder_layers(model)
        for layer in layers if layers is not None else []:
            fully_shard(layer)
        for child in model.modules():
            if isinstance(child, nn.ModuleList) and child is not layers and any(p.requires_grad for p in child.parameters()):
                for block in child:
                    fully_shard(block)
        return fully_shard(model)
    raise ValueError(f"distributed mode must be 'ddp' or 'fsdp', got {mode!r}")


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar metrics over all ranks (identity for one process)."""
    if world()[1] == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= world()[1]
    return dict(zip(keys, t.tolist()))


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()
