"""Causal short convolutions over time, per channel: dynamic (a kernel per token, the JetBlock's) and static.

For input `x` of shape `[B, T, D]` and width `W`:

    y_t[d] = act( sum_{i < W} kernel_t[d, i] * x_{t-W+1+i}[d] )

where inputs before the first token come from the conv state (the previous `W - 1` inputs, oldest first,
shape `[N, D, W - 1]`) or are zero. A static convolution has one kernel `[D, W]` for every token (plus an optional
bias). The final state is the last `W - 1` inputs, so prefill + `*_step` decoding == one full pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jetnas.ops.backend import Backend, as_backend, needs_grad
from jetnas.ops.utils import CONV_ACTIVATIONS as ACTIVATIONS
from jetnas.ops.utils import check_conv_inputs, check_l2norm_head, check_short_conv_inputs, check_state, l2norm


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return y
    if activation == "silu":
        return F.silu(y)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _segments(T: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int]]:
    if cu_seqlens is None:
        return [(0, T)]
    b = cu_seqlens.tolist()
    return list(zip(b[:-1], b[1:]))


def _history(x: torch.Tensor, state: torch.Tensor | None, W: int) -> torch.Tensor:
    """Prepend the conv state (or zeros) to `x [B, T, D]`: returns `[B, T + W - 1, D]`."""
    if state is None:
        return F.pad(x, (0, 0, W - 1, 0))
    return torch.cat([state.transpose(1, 2).to(x.dtype), x], 1)


def naive_dynamic_conv(
    x: torch.Tensor,
    kernels: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    activation: str | None = "silu",
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dynamic causal convolution, in PyTorch (float32 math, float64 for float64 inputs).

    Args:
        x: `[B, T, D]` input.
        kernels: `[B, T, D, W]`; `kernels[b, t, d, i]` multiplies `x[b, t - W + 1 + i, d]`.
        initial_state: `[N, D, W - 1]` previous inputs (oldest first), or None for zeros.
        output_final_state: also return the last `W - 1` inputs `[N, D, W - 1]` (x's dtype).
        activation: None or "silu", applied to the sum.
        cu_seqlens: `[N + 1]` packed-sequence boundaries (B == 1); no sequence sees another's inputs.

    Returns:
        `(y [B, T, D] in x's dtype, final_state or None)`.
    """
    W = kernels.shape[-1]
    B, T, D, N = check_conv_inputs(x, W, initial_state, cu_seqlens, activation)
    if kernels.dim() != 4 or tuple(kernels.shape[:3]) != (B, T, D):
        raise ValueError(f"kernels must be [B, T, D, W] = [{B}, {T}, {D}, W], got {list(kernels.shape)}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    ys, finals = [], []
    for n, (s, e) in enumerate(_segments(T, cu_seqlens)):
        state = None if initial_state is None else initial_state if cu_seqlens is None else initial_state[n : n + 1]
        xp = _history(x[:, s:e].to(dtype), state, W)  # [B, t + W - 1, D]
        if e > s:
            windows = xp.unfold(1, W, 1)  # [B, t, D, W]: windows[:, t, :, i] = x_{t - W + 1 + i}
            ys.append(_activate((windows * kernels[:, s:e].to(dtype)).sum(-1), activation))
        finals.append(xp[:, xp.shape[1] - (W - 1):].transpose(1, 2))
    y = torch.cat(ys, 1).to(x.dtype) if ys else x.new_empty(B, 0, D)
    return y, (torch.cat(finals, 0).to(x.dtype) if output_final_state else None)


def dynamic_conv_step(
    x: torch.Tensor,
    kernels: torch.Tensor,
    state: torch.Tensor | None,
    activation: str | None = "silu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of the dynamic convolution.

    Args:
        x: `[B, D]` the new input.
        kernels: `[B, D, W]` its kernel.
        state: `[B, D, W - 1]` previous inputs, or None for zeros.

    Returns:
        `(y [B, D], new_state [B, D, W - 1])` in x's dtype.
    """
    if x.dim() != 2 or kernels.dim() != 3 or kernels.shape[:2] != x.shape:
        raise ValueError(f"expected x [B, D] and kernels [B, D, W], got {list(x.shape)} and {list(kernels.shape)}")
    B, D = x.shape
    W = kernels.shape[-1]
    check_state(state, (B, D, W - 1), "state")
    if state is None:
        state = x.new_zeros(B, D, W - 1)
    window = torch.cat([state.to(x.dtype), x[..., None]], -1)  # [B, D, W]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = _activate((window.to(dtype) * kernels.to(dtype)).sum(-1), activation)
    return y.to(x.dtype), window[..., 1:]


def short_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    activation: str | None = "silu",
    cu_seqlens: torch.Tensor | None = None,
    backend: Backend | str = "torch",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Static causal depthwise convolution (one kernel for all tokens), via `F.conv1d`; with a "triton" backend
    whose `static_conv` is on and a CUDA tensor, `jetnas.ops.triton_dynamic_conv.triton_short_conv` instead (same
    contract and gradients, no transposed copies).

    Args:
        x: `[B, T, D]`.
        weight: `[D, W]`.
        bias: `[D]` or None.
        initial_state, output_final_state, activation, cu_seqlens: as in `naive_dynamic_conv`.
        backend: a `jetnas.ops.backend.Backend` (or its name), default "torch".

    Returns:
        `(y [B, T, D], final_state [N, D, W - 1] or None)`, both in x's dtype.
    """
    backend = as_backend(backend)
    if backend.static_conv and backend.runs_triton(x):
        from jetnas.ops.triton_dynamic_conv import triton_short_conv

        return triton_short_conv(x, weight, bias, initial_state, output_final_state, activation, cu_seqlens)
    T, D, W = check_short_conv_inputs(x, weight, bias, initial_state, cu_seqlens, activation)
    ys, finals = [], []
    for n, (s, e) in enumerate(_segments(T, cu_seqlens)):
        state = None if initial_state is None else initial_state if cu_seqlens is None else initial_state[n : n + 1]
        xp = _history(x[:, s:e], state, W)  # [B, t + W - 1, D]
        if e > s:
            y = F.conv1d(xp.transpose(1, 2), weight.to(x.dtype)[:, None, :],
                         None if bias is None else bias.to(x.dtype), groups=D)
            ys.append(_activate(y.transpose(1, 2), activation))
        finals.append(xp[:, xp.shape[1] - (W - 1):].transpose(1, 2))
    y = torch.cat(ys, 1) if ys else x[:, :0]
    return y, (torch.cat(finals, 0) if output_final_state else None)


def short_conv_split(
    x: torch.Tensor,
    weight: torch.Tensor,
    sizes: tuple[int, ...],
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    activation: str | None = "silu",
    cu_seqlens: torch.Tensor | None = None,
    backend: Backend | str = "torch",
    l2norm_head: int = 0,
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """`short_conv` over channels that belong to 2 or 3 consumers (the JetBlock family's q|k|v), its output
    returned split by channels: `y.split(sizes, -1)`, the reference (strided views of one `[B, T, D]` output).

    `l2norm_head` > 0 (a power of two dividing the first two widths; only without gradients): the first two parts
    come back L2-normalised per head of that many channels (`jetnas.ops.utils.l2norm`, eps 1e-6), as the gated
    delta rule's `use_qk_l2norm` would normalise q and k. Under the Triton kernel this happens in the conv's
    epilogue, on the float32 activations before rounding: the prompt's q and k are not read and written a second
    time (fla's `l2norm_fwd_kernel`: 0.37 of the SmolLM2 hybrid's 14.4 GPU-ms at 8K, one H100, 2026-12-07). The
    reference normalises the rounded parts in float32, so the two differ by about one rounding of x's dtype.

    Under the Triton kernel (`short_conv`'s dispatch rule) each part is written contiguous instead
    (`jetnas.ops.triton_dynamic_conv.triton_short_conv_split`): what fla's chunked kernels read without first
    copying each strided part (their `input_guard`). Same values and gradients as the reference.

    Args:
        x, weight, bias, initial_state, output_final_state, activation, cu_seqlens, backend: as `short_conv`.
        sizes: the parts' channel widths, 2 or 3 positive numbers summing to D.

    Returns:
        `((y_0 [B, T, sizes[0]], y_1, ...), final_state [N, D, W - 1] or None)`, in x's dtype.
    """
    sizes = tuple(int(s) for s in sizes)
    if not 2 <= len(sizes) <= 3 or min(sizes) < 1 or x.dim() != 3 or sum(sizes) != x.shape[-1]:
        raise ValueError(f"sizes must be 2 or 3 positive widths summing to the channels of x {list(x.shape)}, "
                         f"got {list(sizes)}")
    backend = as_backend(backend)
    if backend.static_conv and backend.runs_triton(x):
        from jetnas.ops.triton_dynamic_conv import triton_short_conv_split

        return triton_short_conv_split(x, weight, sizes, bias, initial_state, output_final_state, activation,
                                       cu_seqlens, l2norm_head)
    if l2norm_head:  # (the Triton path checks it itself)
        check_l2norm_head(l2norm_head, sizes, needs_grad(x, weight, bias, initial_state))
    y, final = short_conv(x, weight, bias, initial_state, output_final_state, activation, cu_seqlens, backend)
    parts = y.split(sizes, -1)
    if l2norm_head:
        parts = (*(_l2norm_heads(p, l2norm_head) for p in parts[:2]), *parts[2:])
    return parts, final


def _l2norm_heads(x: torch.Tensor, head: int) -> torch.Tensor:
    """`x [..., H * head]` L2-normalised per head, in float32, returned in x's dtype."""
    return l2norm(x.float().unflatten(-1, (-1, head))).flatten(-2).to(x.dtype)


def short_conv_step(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    state: torch.Tensor | None,
    activation: str | None = "silu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of the static convolution: `x [B, D]`, `weight [D, W]`, `state [B, D, W - 1]`."""
    B, D = x.shape
    y, new_state = dynamic_conv_step(x, weight.expand(B, *weight.shape), state, activation=None)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return _activate(y, activation), new_state


def dynamic_conv(
    x: torch.Tensor,
    kernels: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    activation: str | None = "silu",
    cu_seqlens: torch.Tensor | None = None,
    backend: Backend | str = "torch",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dynamic causal convolution: our Triton kernel (forward and backward) on CUDA with a "triton" backend, the
    PyTorch reference otherwise. Arguments and returns as in `naive_dynamic_conv`."""
    if as_backend(backend).runs_triton(x):
        from jetnas.ops.triton_dynamic_conv import triton_dynamic_conv

        return triton_dynamic_conv(x, kernels, initial_state, output_final_state, activation, cu_seqlens)
    return naive_dynamic_conv(x, kernels, initial_state, output_final_state, activation, cu_seqlens)
