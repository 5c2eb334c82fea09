"""The gates of the gated delta rule (Gated DeltaNet, the JetBlock): the write strength `beta` and the log-space
decay `g` from their projections, as a readable PyTorch reference and a dispatcher to one fused Triton kernel.

    beta = sigmoid(b)                                   per token and head
    g    = -exp(A_log) * softplus(a + dt_bias)          log decay, <= 0
    padded tokens (mask 0): beta = 0 (no write), g = 0 (no decay)

In PyTorch this is about 9 kernels forward and 12 backward per layer (casts, sigmoid, exp, neg, softplus, add,
mul, the mask multiplies, and the reductions of A_log's and dt_bias's gradients); the kernel
(`jetnas.ops.triton_gates`) is one launch forward and one plus a sum backward. A training step of a 30-layer hybrid
launches that code once per linear layer each way, and with a small model on a GPU the host's launches, not the
GPU, bound the step (issue 16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jetnas.ops.backend import Backend, as_backend

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision tensors, float64 kept (as `jetnas.layers.base.upcast`; ops never import layers)."""
    return x if x.dtype == torch.float64 else x.float()


def _check(a, b, A_log, dt_bias, mask) -> None:
    if b.dim() != 3:
        raise ValueError(f"b must be [B, T, H], got shape {list(b.shape)}")
    H = b.shape[-1]
    if a is not None:
        if a.shape != b.shape:
            raise ValueError(f"a must have b's shape {list(b.shape)}, got {list(a.shape)}")
        if A_log is None or dt_bias is None:
            raise ValueError("a decay projection `a` needs A_log and dt_bias")
        if tuple(A_log.shape) != (H,) or tuple(dt_bias.shape) != (H,):
            raise ValueError(f"A_log and dt_bias must be [H] = [{H}], got {list(A_log.shape)} and "
                             f"{list(dt_bias.shape)}")
    if mask is not None and tuple(mask.shape) != tuple(b.shape[:2]):
        raise ValueError(f"mask must be [B, T] = {list(b.shape[:2])}, got {list(mask.shape)}")


def naive_gdn_gates(a: torch.Tensor | None, b: torch.Tensor, A_log: torch.Tensor | None,
                    dt_bias: torch.Tensor | None, mask: torch.Tensor | None = None,
                    beta_dtype: torch.dtype | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """`(g, beta)` of the gated delta rule (the reference; see the module docstring).

    Args:
        a: `[B, T, H]` the decay projection `x Wa`, or None (no decay: g is None).
        b: `[B, T, H]` the write-strength projection `x Wb`.
        A_log, dt_bias: `[H]` (with `a`).
        mask: `[B, T]` 1 for real tokens, 0 for padding, or None.
        beta_dtype: beta's dtype (default: float32, float64 for float64 b).

    Returns:
        `(g [B, T, H] float32 (float64 for float64 inputs) or None, beta [B, T, H] in beta_dtype)`, computed in
        float32 (float64) whatever the inputs' dtypes.
    """
    _check(a, b, A_log, dt_bias, mask)
    beta = _upcast(b).sigmoid()
    g = None if a is None else -_upcast(A_log).exp() * F.softplus(_upcast(a) + _upcast(dt_bias))
    if mask is not None:
        # padded tokens: no write (beta = 0) and no decay (g = 0)
        beta = beta * mask[..., None]
        g = None if g is None else g * mask[..., None]
    return g, beta if beta_dtype is None else beta.to(beta_dtype)


def _fused(backend: Backend, a, b, A_log, dt_bias, mask) -> bool:
    """Whether the kernel takes these tensors: a "triton" backend that runs our kernels on b's device, a decay, the
    kernel's dtypes (float64 stays on the reference), one device."""
    if a is None or not backend.runs_triton(b):
        return False
    tensors = (a, b, A_log, dt_bias)
    return (all(t.dtype in _KERNEL_DTYPES and t.device == b.device for t in tensors)
            and (mask is None or mask.device == b.device))


def gdn_gates(a: torch.Tensor | None, b: torch.Tensor, A_log: torch.Tensor | None, dt_bias: torch.Tensor | None,
              mask: torch.Tensor | None = None, beta_dtype: torch.dtype | None = None,
              backend: Backend | str = "torch") -> tuple[torch.Tensor | None, torch.Tensor]:
    """`naive_gdn_gates` (same arguments and returns), as one Triton kernel each way
    (`jetnas.ops.triton_gates.triton_gdn_gates`) under a "triton" backend on tensors it takes (CUDA, or CPU with
    `interpret`; float16 / bfloat16 / float32), with a decay. Same numbers up to float32 rounding: the kernel's
    sigmoid, softplus and log1p are written out (tests/ops/test_gates.py)."""
    backend = as_backend(backend)
    if _fused(backend, a, b, A_log, dt_bias, mask):
        _check(a, b, A_log, dt_bias, mask)
        from jetnas.ops.triton_gates import triton_gdn_gates

        return triton_gdn_gates(a, b, A_log, dt_bias, mask, beta_dtype)
    return naive_gdn_gates(a, b, A_log, dt_bias, mask, beta_dtype)
