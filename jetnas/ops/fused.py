"""The elementwise tails of a layer: RMS norm, the residual add fused into the next RMS norm, the gated RMS norm
that closes the linear-attention blocks, SwiGLU's `silu(gate) * up`, and the rotary embedding of attention's queries
and keys, each as a readable PyTorch reference and a dispatcher to a fused Triton kernel.

The kernel (`jetnas.ops.triton_fused`, `jetnas.ops.triton_rotary`; forward and backward) runs when the caller's
backend says so: a
`jetnas.ops.backend.Backend` named "triton" with `fused` on (and `fused_residual` too, for `add_rms_norm`), and a
tensor it takes (CUDA, or CPU under the interpreter), in float16 / bfloat16 / float32. Otherwise, and for float64,
the reference runs. Results agree with the references to float32 rounding before each rounding to a low-precision
dtype that the reference makes (tests/ops/test_fused.py, tests/ops/test_fused_residual.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jetnas.ops.attention import apply_rotary
from jetnas.ops.backend import Backend, as_backend

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _fused(backend: Backend | str, *tensors: torch.Tensor | None) -> bool:
    """Whether the fused kernel takes these tensors under this backend."""
    backend = as_backend(backend)
    present = [t for t in tensors if t is not None]
    first = present[0]
    if not (backend.fused and backend.runs_triton(first)):
        return False
    return all(t.dtype in _KERNEL_DTYPES and t.device == first.device for t in present)


def _row_fits(width: int) -> bool:
    from jetnas.ops.triton_fused import MAX_WIDTH

    return width <= MAX_WIDTH


def naive_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                   out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`weight * round(x / sqrt(mean(x^2) + eps))`: float32 statistics, rounded to x's dtype before the weight
    (Llama / Qwen's order); float64 stays float64. `out_dtype`: the result rounded once more, to that dtype."""
    dtype = x.dtype
    x = x if x.dtype == torch.float64 else x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * x.to(dtype)
    return y if out_dtype is None else y.to(out_dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: Backend | str = "torch",
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """RMS norm over the last dim (`naive_rms_norm`; one fused kernel each way under a fused "triton" backend).

    Args:
        x: `[..., N]`.
        weight: `[N]`.
        eps: added to the mean square.
        backend: a `Backend` or its name (default "torch": the reference).
        out_dtype: round the result to this dtype (None: the promoted dtype of x and weight). Under autocast the
            model passes the autocast dtype, so that a float32 residual stream is normalised straight into the bf16
            the next matrix product would cast it to anyway: the same numbers, one pass instead of two.

    Returns:
        `[..., N]` in `out_dtype`, else the promoted dtype of x and weight (Llama's `weight * x.to(input_dtype)`).
    """
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be [N={x.shape[-1]}] for x {list(x.shape)}, got {list(weight.shape)}")
    if out_dtype is not None and out_dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"out_dtype must be a floating dtype, got {out_dtype}")
    if _fused(backend, x, weight) and _row_fits(x.shape[-1]) and out_dtype in (None, *_KERNEL_DTYPES):
        from jetnas.ops.triton_fused import triton_rms_norm

        return triton_rms_norm(x, weight, eps, out_dtype)
    return naive_rms_norm(x, weight, eps, out_dtype)


def naive_add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float,
                       out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(s, naive_rms_norm(s))` for `s = x + y` (PyTorch's add: the promoted dtype of x and y)."""
    s = x + y
    return s, naive_rms_norm(s, weight, eps, out_dtype)


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float,
                 backend: Backend | str = "torch",
                 out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A residual add and the RMS norm of its result: `s = x + y; (s, rms_norm(s, weight, eps, out_dtype))`.

    The pre-norm layer's `h = h + mixer(...)` then `norm(h)`: under a "triton" backend with `fused` and
    `fused_residual` on, one kernel reads x and y once and writes both outputs, and one backward kernel turns the
    gradients of both into dx (= dy: the sum's gradient plus the norm's backward) and dweight. Otherwise
    `x + y` then `rms_norm(..., backend)`: exactly the unfused code.

    Args:
        x, y: `[..., N]` of one shape (the residual stream and the block's output; their dtypes may differ: a
            float32 stream plus a bf16 output under autocast).
        weight: `[N]`.
        eps: added to the mean square.
        backend: a `Backend` or its name (default "torch": the reference).
        out_dtype: the normed output's dtype, as `rms_norm`'s.

    Returns:
        `(s, normed)`: s `[..., N]` in the promoted dtype of x and y (the fused kernel writes it contiguous);
        normed `[..., N]` in `out_dtype`, else the promoted dtype of s and weight.
    """
    if x.shape != y.shape:
        raise ValueError(f"x and y must have one shape, got {list(x.shape)} and {list(y.shape)}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be [N={x.shape[-1]}] for x {list(x.shape)}, got {list(weight.shape)}")
    if out_dtype is not None and out_dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"out_dtype must be a floating dtype, got {out_dtype}")
    sum_dtype = torch.promote_types(x.dtype, y.dtype)
    product = torch.promote_types(sum_dtype, weight.dtype)
    # the kernel rounds the normed product once, to out_dtype; the reference rounds it to the product's dtype, then
    # to out_dtype: the same unless out_dtype is the wider (a bf16 product asked for in float32), left to it
    widening = out_dtype is not None and out_dtype.itemsize > product.itemsize
    if (as_backend(backend).fused_residual and _fused(backend, x, y, weight) and _row_fits(x.shape[-1])
            and out_dtype in (None, *_KERNEL_DTYPES) and not widening):
        from jetnas.ops.triton_fused import triton_add_rms_norm

        return triton_add_rms_norm(x, y, weight, eps, out_dtype)
    s = x + y
    return s, rms_norm(s, weight, eps, backend, out_dtype)


def naive_gated_rms_norm(x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor, eps: float,
                         norm_before_gate: bool = True, group_size: int | None = None) -> torch.Tensor:
    """`norm(x) * weight * silu(gate)` (or `norm(x * silu(gate)) * weight` with `norm_before_gate=False`), the
    statistics over the last dim or over groups of `group_size` channels; float32 math, returned in x's dtype."""
    dtype = x.dtype
    x = x if x.dtype == torch.float64 else x.float()
    if gate is not None and not norm_before_gate:
        x = x * F.silu(gate.to(x.dtype))
    groups = x.unflatten(-1, (-1, group_size)) if group_size else x
    groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + eps)
    x = (groups.flatten(-2) if group_size else groups) * weight.to(x.dtype)
    if gate is not None and norm_before_gate:
        x = x * F.silu(gate.to(x.dtype))
    return x.to(dtype)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor, eps: float,
                   norm_before_gate: bool = True, group_size: int | None = None,
                   backend: Backend | str = "torch") -> torch.Tensor:
    """The gated RMS norm (`naive_gated_rms_norm`; one fused kernel each way under a fused "triton" backend).

    Args:
        x: `[..., D]`.
        gate: x's shape, or None (no gate).
        weight: `[D]`.
        eps: added to the mean square.
        norm_before_gate: `norm(x) * weight * silu(gate)` (True) or `norm(x * silu(gate)) * weight`.
        group_size: statistics over groups of this many channels (D a multiple), or None for all D.
        backend: a `Backend` or its name (default "torch": the reference).

    Returns:
        `[..., D]` in x's dtype.
    """
    D = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != D:
        raise ValueError(f"weight must be [D={D}] for x {list(x.shape)}, got {list(weight.shape)}")
    if gate is not None and gate.shape != x.shape:
        raise ValueError(f"gate must have x's shape {list(x.shape)}, got {list(gate.shape)}")
    if group_size is not None and (group_size < 1 or D % group_size):
        raise ValueError(f"group_size must divide D={D}, got {group_size}")
    if _fused(backend, x, gate, weight) and _row_fits(group_size or D):
        from jetnas.ops.triton_fused import triton_gated_rms_norm

        return triton_gated_rms_norm(x, gate, weight, eps, norm_before_gate, group_size)
    return naive_gated_rms_norm(x, gate, weight, eps, norm_before_gate, group_size)


def naive_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def silu_mul(gate: torch.Tensor, up: torch.Tensor, backend: Backend | str = "torch") -> torch.Tensor:
    """SwiGLU's `silu(gate) * up` (`naive_silu_mul`; one fused kernel each way under a fused "triton" backend,
    for gate and up of one shape and dtype; otherwise the reference, which broadcasts)."""
    if _fused(backend, gate, up) and gate.shape == up.shape and gate.dtype == up.dtype:
        from jetnas.ops.triton_fused import triton_silu_mul

        return triton_silu_mul(gate, up)
    return naive_silu_mul(gate, up)


def naive_silu_mul_packed(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, -1)
    return F.silu(gate) * up


def silu_mul_packed(gate_up: torch.Tensor, backend: Backend | str = "torch") -> torch.Tensor:
    """SwiGLU on gate and up packed side by side, as one matrix product with `cat([gate_proj.weight,
    up_proj.weight])` makes them: `silu(gate_up[..., :I]) * gate_up[..., I:]` (`naive_silu_mul_packed`).

    Under a fused "triton" backend one kernel each way, the backward writing the gradient of the packed input as
    one contiguous `[..., 2I]` tensor (what the matrix product's backward reads; the reference's autograd would
    assemble it from two halves with a copy). Same rounding as `silu_mul`.

    Args:
        gate_up: `[..., 2I]` (float16 / bfloat16 / float32 for the kernel; any floating dtype for the reference).
        backend: a `Backend` or its name (default "torch": the reference).

    Returns:
        `[..., I]` in gate_up's dtype.
    """
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up must be [..., 2I] with an even last dim, got {list(gate_up.shape)}")
    if _fused(backend, gate_up):
        from jetnas.ops.triton_fused import triton_silu_mul_packed

        return triton_silu_mul_packed(gate_up)
    return naive_silu_mul_packed(gate_up)


def naive_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The reference: `jetnas.ops.attention.apply_rotary` (`x * cos + cat([-x2, x1]) * sin` in x's dtype)."""
    return apply_rotary(x, cos, sin)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: Backend | str = "torch") -> torch.Tensor:
    """Rotary position embedding of queries or keys, rotate-half convention (`naive_rotary`; one fused kernel each
    way under a fused "triton" backend, `jetnas.ops.triton_rotary`, for x in float16 / bfloat16 / float32 and
    tables that need no gradient).

    Args:
        x: `[B, T, H, D]`, D even (any strides: q and k are views of their projections).
        cos, sin: `[B, T, D]` or `[1, T, D]` (broadcast over the batch), any floating dtype: rounded to x's dtype
            first, as the reference does (the model keeps them in float32).
        backend: a `Backend` or its name (default "torch": the reference).

    Returns:
        `[B, T, H, D]` in x's dtype (contiguous from the kernel).
    """
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"x must be [B, T, H, D] with an even D, got {list(x.shape)}")
    B, T, _, D = x.shape
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dim() != 3 or table.shape[0] not in (1, B) or tuple(table.shape[1:]) != (T, D):
            raise ValueError(f"{name} must be [B={B} or 1, T={T}, D={D}] for x {list(x.shape)}, got "
                             f"{list(table.shape)}")
    tables_grad = torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad)
    if _fused(backend, x, cos, sin) and not tables_grad:
        from jetnas.ops.triton_rotary import triton_rotary

        return triton_rotary(x, cos.expand(B, T, D), sin.expand(B, T, D))
    return naive_rotary(x, cos, sin)


def naive_shared_input_linear(x: torch.Tensor, weights: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The reference: `F.linear(x, w)` for each weight (autograd adds the products' gradients for x)."""
    return tuple(F.linear(x, w) for w in weights)


class _SharedInputLinear(torch.autograd.Function):
    """Products of one input, `x2 [M, D] @ w_i^T`; backward sums x's gradient inside the matrix products, the first
    into a new tensor and each next one added to it by `addmm_` (beta = 1), instead of one product each and
    autograd's adds of them."""

    @staticmethod
    def forward(ctx, x2, *weights):
        ctx.save_for_backward(x2, *weights)
        # an output nobody differentiates arrives as None (no product for it), not as zeros
        ctx.set_materialize_grads(False)
        return tuple(x2 @ w.t() for w in weights)

    @staticmethod
    def backward(ctx, *grads):
        x2, *weights = ctx.saved_tensors
        dx = None
        dws = []
        for i, (dy, w) in enumerate(zip(grads, weights)):
            dws.append(None if dy is None or not ctx.needs_input_grad[1 + i] else dy.t() @ x2)
            if dy is None or not ctx.needs_input_grad[0]:
                continue
            if dx is None:
                dx = dy @ w
            else:
                dx.addmm_(dy, w)
        return (dx, *dws)


def shared_input_linear(x: torch.Tensor, weights: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Several bias-free products of one input, `x @ w_i^T` (`naive_shared_input_linear`), whose backward sums x's
    gradient inside the matrix products: `dx = dy_0 w_0`, then `dx += dy_i w_i` by `addmm_` (the matrix product
    adds into its output as it writes it). Autograd would write each product's gradient as a tensor of its own and
    add them: per extra product one `[..., D]` write and an add that reads two and writes one. The JetBlock family
    runs two such products per layer (`Backend.fused_projections`: q|k|v and g|b|a).

    Computes in the dtype `F.linear` would (autocast's, for float32 / bf16 / fp16 inputs under autocast: x and the
    weights are cast to it first, and those casts take the gradients back to the weights' dtype as autocast's do).
    Numerics: x's gradient is rounded once, where autograd rounds each product and their sum: in bf16, at most one
    bf16 step from autograd's per element, and closer to the exact sum. Any backend, any device.

    Args:
        x: `[..., D]`.
        weights: `[N_i, D]` each, of one dtype and device.

    Returns:
        one `[..., N_i]` per weight.
    """
    if not weights:
        raise ValueError("shared_input_linear needs at least one weight")
    D = x.shape[-1]
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != D:
            raise ValueError(f"weights[{i}] must be [N, D={D}] for x {list(x.shape)}, got {list(w.shape)}")
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights))
    if not needs_grad or len(weights) == 1:
        return naive_shared_input_linear(x, weights)
    device = x.device.type
    dtype = torch.promote_types(x.dtype, weights[0].dtype)
    if torch.is_autocast_enabled(device) and dtype in (torch.float32, torch.bfloat16, torch.float16):
        dtype = torch.get_autocast_dtype(device)
    x2 = x.reshape(-1, D).to(dtype)
    with torch.autocast(device, enabled=False):
        outs = _SharedInputLinear.apply(x2, *[w.to(dtype) for w in weights])
    return tuple(o.view(*x.shape[:-1], o.shape[-1]) for o in outs)
