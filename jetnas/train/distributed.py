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
    """Join the process group torchrun describes (no-op for a plain single process; under torchrun also for one
    process, so that `--nproc-per-node 1` runs the DDP / FSDP code path); returns (rank, world size)."""
    if "WORLD_SIZE" in os.environ and dist.is_available() and not dist.is_initialized():
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


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 shards one by one (each gathered just for its own forward): the model's `fsdp_units()` when
    it has one (a model that calls parts of a layer directly, like the PostNAS super-network, must not have that
    layer sharded on its own: no forward hook would gather it), else each decoder layer and each block of a module
    list of trainable blocks."""
    if hasattr(model, "fsdp_units"):
        return list(model.fsdp_units())
    layers = _decoder_layers(model)
    units = list(layers) if layers is not None else []
    for child in model.modules():
        trainable = any(p.requires_grad for p in child.parameters())
        if isinstance(child, nn.ModuleList) and child is not layers and trainable:
            units.extend(child)
    return units


def wrap(model: nn.Module, mode: str, find_unused_parameters: bool = False) -> nn.Module:
    """Wrap for data parallelism: `mode` "ddp" or "fsdp" (FSDP2 `fully_shard` on each of `fsdp_units`, then the
    root); unchanged when no process group is set up (a plain single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=find_unused_parameters)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for unit in fsdp_units(model):
            fully_shard(unit)
        return fully_shard(model)
    raise ValueError(f"distributed mode must be 'ddp' or 'fsdp', got {mode!r}")


def gather_full(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with every FSDP2 shard (DTensor) gathered into its full tensor; a collective: every rank calls it,
    with the same keys in the same order. Plain tensors (one process, DDP) pass through."""
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}


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
