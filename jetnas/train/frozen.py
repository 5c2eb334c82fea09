"""A frozen model's forward copy for bf16 autocast: its Linear weights cast once, not at every call.

Under `torch.autocast(dtype=bfloat16)` every `F.linear` casts its float32 weight (and bias) to bfloat16. For a
parameter that requires grad autocast caches the cast for the duration of the autocast region; for a frozen one
(a distillation teacher) it does not, so each forward launches one cast kernel per Linear and reads the float32
weight from memory: 332 casts per stage-1 step of the SmolLM2-135M hybrid (`benchmarks/launch_count.py`).

`autocast_copy(model, dtype)` returns a copy of the module tree whose `nn.Linear` weights and biases are stored in
`dtype`, made once; every other parameter and buffer (embeddings, norms, and any weight tied to a non-Linear module
or used as the output head) is the original tensor, shared, not copied. Under autocast to that dtype the copy's
forward equals the original's bit for bit (autocast's own cast of a float32 weight is the same rounding); outside
autocast it would mix dtypes, so use it only inside the autocast region it was made for. The original stays float32:
it remains the source students copy their frozen weights from, and the reference.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def autocast_copy(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A copy of frozen `model` for forwards under `torch.autocast(dtype=dtype)`: its `nn.Linear` weights and biases
    stored in `dtype`, everything else shared with `model`.

    Kept shared (not cast): parameters and buffers of non-Linear modules, a Linear parameter also registered on a
    non-Linear module (tied embeddings), and the output head (`get_output_embeddings()`, read directly by the
    distillation losses). Raises ValueError for a model with a parameter that requires grad (the copy would not
    receive its updates) or a non-floating `dtype`."""
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(f"autocast_copy is for frozen models: {len(trainable)} parameters require grad "
                         f"(first: {trainable[0]!r}); the copy would not see their updates")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    owned_elsewhere = {id(p) for m in model.modules() if not isinstance(m, nn.Linear)
                       for p in m.parameters(recurse=False)}
    if head is not None:
        owned_elsewhere |= {id(p) for p in head.parameters(recurse=False)}
    memo: dict[int, object] = {}
    for module in model.modules():
        castable = isinstance(module, nn.Linear)
        for p in module.parameters(recurse=False):
            if castable and id(p) not in owned_elsewhere and p.dtype.is_floating_point:
                memo[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
            else:
                memo[id(p)] = p
        for b in module.buffers(recurse=False):
            memo[id(b)] = b
    # deepcopy takes every tensor from the memo: the cast ones new, all others the originals themselves
    return copy.deepcopy(model, memo)
