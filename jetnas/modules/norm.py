"""RMS norms: the plain one of Llama/Qwen, and the gated one that closes every linear-attention block.

Each holds the backend its owner (a layer, or the model) resolved, and runs the op of `jetnas.ops.fused` under it:
one fused Triton kernel forward and backward with a fused "triton" backend on CUDA, the PyTorch reference otherwise.
"""

from __future__ import annotations

import torch
from torch import nn

from jetnas.ops.backend import Backend, resolve_backend
from jetnas.ops.fused import add_rms_norm, gated_rms_norm, rms_norm


def autocast_output_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype a norm of float32 `x` should write under autocast: autocast's (every consumer of a model's norms is
    a matrix product, which would cast the float32 output to it anyway), else None (the op's own rule)."""
    return _autocast_output_dtype(x.dtype, x.device)


def _autocast_output_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype | None:
    if dtype == torch.float32 and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


class RMSNorm(nn.Module):
    """`weight * x / sqrt(mean(x^2) + eps)` over the last dim; normalises in float32 like the HF models
    (`jetnas.ops.fused.rms_norm`). Under autocast a float32 input is normalised straight into autocast's dtype
    (`autocast_output_dtype`): what the next projection would cast it to, so the same numbers with one pass fewer
    over the float32 residual stream in training.

    Args:
        hidden_size: N, the width of the weight.
        eps: added to the mean square.
        backend: a `Backend` or "auto" | "torch" | "triton", resolved here (`jetnas.ops.backend.resolve_backend`).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, backend: Backend | str = "auto"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.backend = resolve_backend(backend)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.backend, out_dtype=autocast_output_dtype(x))

    def add_forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(s, self(s))` for the residual add `s = x + y` (x, y `[..., N]` of one shape): one kernel each way when
        the backend has `fused_residual` on (`jetnas.ops.fused.add_rms_norm`), else exactly `x + y` then this norm.
        The normed output's dtype follows `forward`'s rule for s."""
        out_dtype = _autocast_output_dtype(torch.promote_types(x.dtype, y.dtype), x.device)
        return add_rms_norm(x, y, self.weight, self.eps, self.backend, out_dtype=out_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GatedRMSNorm(nn.Module):
    """RMS norm with a SiLU output gate: `norm(x) * silu(gate)` (fla's `FusedRMSNormGated`, per head), or with
    `norm_before_gate=False` `norm(x * silu(gate))` (Mamba2's). With `group_size` the statistics are taken over
    groups of that many channels (Mamba2 with several groups). Float32 math, returned in x's dtype
    (`jetnas.ops.fused.gated_rms_norm`).

    Args:
        hidden_size: D, the width of the weight.
        eps: added to the mean square.
        norm_before_gate: see above.
        group_size: channels per group of statistics (a divisor of D), or None for all D.
        backend: a `Backend` or "auto" | "torch" | "triton", resolved here.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, norm_before_gate: bool = True,
                 group_size: int | None = None, backend: Backend | str = "auto"):
        super().__init__()
        if group_size is not None and hidden_size % group_size:
            raise ValueError(f"hidden_size={hidden_size} must be a multiple of group_size={group_size}")
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.norm_before_gate = norm_before_gate
        self.group_size = group_size
        self.backend = resolve_backend(backend)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        return gated_rms_norm(x, gate, self.weight, self.eps, self.norm_before_gate, self.group_size, self.backend)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, norm_before_gate={self.norm_before_gate}"
