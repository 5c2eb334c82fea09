"""Small shared helpers for the ops: input validation, compute dtypes, packed (variable-length) sequences."""

from __future__ import annotations

import torch


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype a reference op computes in: float64 if any input is float64, else float32.

    The references exist to be exact; they never accumulate in half precision.
    """
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`x / sqrt(sum(x^2) + eps)` over the last dimension (the same definition and eps as fla's kernels)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def check_l2norm_head(head: int, sizes: tuple[int, ...], grad: bool) -> None:
    """`short_conv_split`'s `l2norm_head`: a power of two dividing the first two parts' widths, and no gradient
    (the normalisation has no backward here: training normalises in the recurrence's own kernels)."""
    if isinstance(head, bool) or not isinstance(head, int) or head < 1 or head & (head - 1):
        raise ValueError(f"l2norm_head must be a power of two, got {head!r}")
    if sizes[0] % head or sizes[1] % head:
        raise ValueError(f"l2norm_head={head} must divide the first two parts' widths, got {list(sizes[:2])}")
    if grad:
        raise ValueError("l2norm_head: the normalisation inside the conv has no backward; it is for prompts without "
                         "gradients (prefill, evaluation)")


def check_cu_seqlens(cu_seqlens: torch.Tensor | None, batch_size: int, seq_len: int, name: str = "cu_seqlens") -> int:
    """Validate packed-sequence boundaries and return the number of sequences N.

    Args:
        cu_seqlens: `[N + 1]` int tensor of cumulative lengths starting at 0 and ending at `seq_len`, or None.
        batch_size: B of the packed input; must be 1 when `cu_seqlens` is given.
        seq_len: T of the packed input.
    """
    if cu_seqlens is None:
        return batch_size
    if batch_size != 1:
        raise ValueError(f"packed inputs ({name} given) must have batch size 1, got B={batch_size}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must be a 1-D tensor [N+1] with N >= 1, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype.is_floating_point:
        raise ValueError(f"{name} must be an integer tensor, got {cu_seqlens.dtype}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != seq_len:
        raise ValueError(f"{name} must start at 0 and end at T={seq_len}, got {bounds[0]} ... {bounds[-1]}")
    if any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"{name} must be non-decreasing, got {bounds}")
    return len(bounds) - 1


CONV_ACTIVATIONS = (None, "silu")


def check_conv_inputs(x: torch.Tensor, W: int, initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                      activation: str | None) -> tuple[int, int, int, int]:
    """The short convolutions' common checks (`jetnas.ops.conv`, `jetnas.ops.triton_dynamic_conv`): x `[B, T, D]`,
    W >= 1, a known activation, packed-sequence bounds and an `[N, D, W - 1]` state. Returns (B, T, D, N)."""
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, D], got shape {list(x.shape)}")
    if W < 1:
        raise ValueError(f"kernel width W must be >= 1, got {W}")
    if activation not in CONV_ACTIVATIONS:
        raise ValueError(f"activation must be one of {CONV_ACTIVATIONS}, got {activation!r}")
    B, T, D = x.shape
    N = check_cu_seqlens(cu_seqlens, B, T)
    check_state(initial_state, (N, D, W - 1), "initial_state")
    return B, T, D, N


def check_short_conv_inputs(x, weight, bias, initial_state, cu_seqlens, activation) -> tuple[int, int, int]:
    """The static convolution's checks (`short_conv`, `triton_short_conv`): weight `[D, W]`, bias `[D]` or None, and
    `check_conv_inputs`. Returns (T, D, W)."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be [D, W], got shape {list(weight.shape)}")
    W = weight.shape[-1]
    _, T, D, _ = check_conv_inputs(x, W, initial_state, cu_seqlens, activation)
    if weight.shape[0] != D or (bias is not None and tuple(bias.shape) != (D,)):
        raise ValueError(f"weight must be [D={D}, W] and bias [D], got {list(weight.shape)} and "
                         f"{None if bias is None else list(bias.shape)}")
    return T, D, W


def check_state(state: torch.Tensor | None, expected: tuple[int, ...], name: str) -> None:
    if state is not None and tuple(state.shape) != expected:
        raise ValueError(f"{name} must have shape {list(expected)}, got {list(state.shape)}")


def check_same_leading(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, ndim: int) -> None:
    """Check that `a` and `b` agree on their first `ndim` dimensions."""
    if a.shape[:ndim] != b.shape[:ndim]:
        raise ValueError(
            f"{name_a} and {name_b} must agree on their first {ndim} dims, got {list(a.shape)} and {list(b.shape)}"
        )
