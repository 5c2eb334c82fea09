"""RMS norms: the plain one of Llama/Qwen, and the gated one that closes every linear-attention block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """`weight * x / sqrt(mean(x^2) + eps)` over the last dim; normalises in float32 like the HF models."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x if x.dtype == torch.float64 else x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GatedRMSNorm(nn.Module):
    """RMS norm with a SiLU output gate: `norm(x) * silu(gate)` (fla's `FusedRMSNormGated`, per head), or with
    `norm_before_gate=False` `norm(x * silu(gate))` (Mamba2's). With `group_size` the statistics are taken over
    groups of that many channels (Mamba2 with several groups). Float32 math, returned in x's dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, norm_before_gate: bool = True,
                 group_size: int | None = None):
        super().__init__()
        if group_size is not None and hidden_size % group_size:
            raise ValueError(f"hidden_size={hidden_size} must be a multiple of group_size={group_size}")
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.norm_before_gate = norm_before_gate
        self.group_size = group_size

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        dtype = x.dtype
        x = x if x.dtype == torch.float64 else x.float()
        if gate is not None and not self.norm_before_gate:
            x = x * F.silu(gate.to(x.dtype))
        groups = x.unflatten(-1, (-1, self.group_size)) if self.group_size else x
        groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)
        x = (groups.flatten(-2) if self.group_size else groups) * self.weight.to(x.dtype)
        if gate is not None and self.norm_before_gate:
            x = x * F.silu(gate.to(x.dtype))
        return x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, norm_before_gate={self.norm_before_gate}"
