"""The decode-step ops of the inference engine, each a PyTorch reference plus a Triton kernel
(`jetnas.ops.triton_decode`) with the same contract:

- `decode_attention`: one query token per sequence against a preallocated key/value buffer, for full attention
  (the buffer holds every column) and sliding windows (a ring buffer: column c lives in slot c % R). Row b attends
  over the columns `[lo[b], hi[b])`, with `hi[b] - lo[b] <= R`; the bounds are tensors, so one captured CUDA graph
  serves every step. The kernel splits each row's columns over programs (flash-decoding) and merges the partial
  softmaxes.
- `gated_delta_rule_step_`: the gated delta rule's one-token step, updating the float32 state in place (a decode
  step then reads and writes each state once; an out-of-place step would also write a new state and copy it back).
- `gated_delta_rule_step_raw_`: the same with Gated DeltaNet's / the JetBlock's gates made from their projections
  inside the kernel.
- `gla_step_`: the same for gated linear attention (GLA, RetNet, Mamba2), per-key-channel or per-head decay.
- `rwkv7_step_`: the same for RWKV-7's generalised delta rule (kernel in `jetnas.ops.triton_rwkv7`).
- `conv_step_`: a short convolution's one-token step (static kernel or the JetBlock's per-token kernels), shifting
  its cached inputs in place.

All take a `backend` (a `jetnas.ops.backend.Backend` or its name, default "torch"): with "triton" the Triton kernels
run on CUDA tensors, and on CPU tensors too when the backend says `interpret` (Triton's interpreter: how the tests
check them). With "torch", decode attention is one grouped SDPA call over the cache in place
(`sdpa_decode_attention`, the CPU engine's path), checked against the reference like the kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jetnas.ops.backend import Backend, as_backend
from jetnas.ops.conv import dynamic_conv_step, short_conv_step
from jetnas.ops.delta_rule import gated_delta_rule_step
from jetnas.ops.gla import gla_step
from jetnas.ops.rwkv7 import rwkv7_step


def _use_triton(backend: Backend | str, x: torch.Tensor) -> bool:
    return as_backend(backend).runs_triton(x)


def ring_columns(R: int, hi: torch.Tensor) -> torch.Tensor:
    """The column each of the R slots holds when the newest column is `hi - 1`: the latest `c <= hi - 1` with
    `c % R == slot` (negative for a slot not written yet). `[B, R]`."""
    slot = torch.arange(R, device=hi.device)
    last = hi.long()[:, None] - 1
    return last - torch.remainder(last - slot, R)


def naive_decode_attention(q, k_cache, v_cache, lo, hi, scale=None):
    """Reference: `q [B, H, D]`, `k_cache [B, Hkv, R, D]`, `v_cache [B, Hkv, R, Dv]`, `lo, hi [B]` ->
    `o [B, H, Dv]` in q's dtype, computed in float32 (float64 for float64 inputs)."""
    H, D = q.shape[1:]
    Hkv, R = k_cache.shape[1], k_cache.shape[2]
    scale = D**-0.5 if scale is None else scale
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    cols = ring_columns(R, hi)
    visible = (cols >= lo.long()[:, None]) & (cols >= 0)  # [B, R]
    k = k_cache.to(dtype).repeat_interleave(H // Hkv, 1)
    v = v_cache.to(dtype).repeat_interleave(H // Hkv, 1)
    scores = torch.einsum("bhd,bhrd->bhr", q.to(dtype), k) * scale
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    return torch.einsum("bhr,bhrd->bhd", scores.softmax(-1), v).to(q.dtype)


def sdpa_decode_attention(q, k_cache, v_cache, lo, hi, scale=None, ring: bool = True):
    """The PyTorch fast path of `decode_attention` (CPU): one SDPA call with grouped-query heads, reading the cache
    in place (the reference repeats every KV head over its group, a copy of the whole cache per step). A full cache
    is cut to its filled prefix `max(hi)` (a host sync, fine off the GPU)."""
    B, H, D = q.shape
    R = k_cache.shape[2]
    n = R if ring else int(hi.max())
    cols = ring_columns(R, hi)[:, :n] if ring else torch.arange(n, device=q.device).expand(B, n)
    visible = (cols >= lo.long()[:, None]) & (cols >= 0) & (cols < hi.long()[:, None])
    o = F.scaled_dot_product_attention(q[:, :, None], k_cache[:, :, :n], v_cache[:, :, :n],
                                       attn_mask=visible[:, None, None], scale=scale,
                                       enable_gqa=H != k_cache.shape[1])
    return o[:, :, 0]


def _check_decode_attention(q, k_cache, v_cache, lo, hi):
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"expected q [B, H, D], k/v caches [B, Hkv, R, D]; got {list(q.shape)}, "
                         f"{list(k_cache.shape)}, {list(v_cache.shape)}")
    B, H, D = q.shape
    if k_cache.shape[0] != B or k_cache.shape[3] != D or H % k_cache.shape[1]:
        raise ValueError(f"q {list(q.shape)} does not match k_cache {list(k_cache.shape)} (GQA needs H % Hkv == 0)")
    if lo.shape != (B,) or hi.shape != (B,):
        raise ValueError(f"lo and hi must be [B={B}], got {list(lo.shape)} and {list(hi.shape)}")


def decode_attention(q, k_cache, v_cache, lo, hi, scale=None, ring: bool = True, backend: Backend | str = "torch",
                     num_splits: int | None = None):
    """Attention of one query per row over the cached columns `[lo, hi)` (see the module docstring). `ring=False`
    promises `hi <= R` (a full cache: column = slot), which lets the kernel skip the modulo."""
    _check_decode_attention(q, k_cache, v_cache, lo, hi)
    if _use_triton(backend, q):
        from jetnas.ops.triton_decode import triton_decode_attention

        return triton_decode_attention(q, k_cache, v_cache, lo, hi, scale, num_splits, ring)
    return sdpa_decode_attention(q, k_cache, v_cache, lo, hi, scale, ring)


def gated_delta_rule_step_(q, k, v, g, beta, state, scale=None, use_qk_l2norm=True, backend: Backend | str = "torch"):
    """`gated_delta_rule_step` writing the new state into `state [B, H, K, V]` (float32) in place; returns o
    `[B, H, V]` in v's dtype. q, k `[B, H, K]`, v `[B, H, V]`, g and beta `[B, H]` or None."""
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"the state must be a contiguous float32 tensor, got {state.dtype}")
    if _use_triton(backend, q):
        from jetnas.ops.triton_decode import triton_gated_delta_rule_step_

        return triton_gated_delta_rule_step_(q, k, v, g, beta, state, scale, use_qk_l2norm)
    o, new = gated_delta_rule_step(q, k, v, g, beta, state, scale, use_qk_l2norm)
    state.copy_(new)
    return o


def gated_delta_rule_step_raw_(q, k, v, a, b, A_log, dt_bias, state, scale=None, use_qk_l2norm=True,
                               backend: Backend | str = "torch"):
    """`gated_delta_rule_step_` with the gates of Gated DeltaNet and the JetBlock given as their projections:
    `g = -exp(A_log) * softplus(a + dt_bias)` and `beta = sigmoid(b)`, `a, b [B, H]`, `A_log, dt_bias [H]` (A_log
    None: no decay, as DeltaNet). The Triton kernel makes them itself, saving a decode step about eight small
    launches per layer (casts, exp, softplus, sums, sigmoid); the reference computes them in float32 first. The
    kernel keeps beta in float32 where the layer's unfused path rounded it to q's dtype."""
    if _use_triton(backend, q):
        from jetnas.ops.triton_decode import triton_gated_delta_rule_step_raw_

        if state.dtype != torch.float32 or not state.is_contiguous():
            raise ValueError(f"the state must be a contiguous float32 tensor, got {state.dtype}")
        return triton_gated_delta_rule_step_raw_(q, k, v, a, b, A_log, dt_bias, state, scale, use_qk_l2norm)
    g = None if A_log is None else -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    return gated_delta_rule_step_(q, k, v, g, b.float().sigmoid(), state, scale, use_qk_l2norm, backend)


def gla_step_(q, k, v, g, state, scale=None, backend: Backend | str = "torch"):
    """`jetnas.ops.gla.gla_step` writing the new state into `state [B, H, K, V]` (float32) in place; returns o
    `[B, H, V]` in v's dtype. q, k `[B, H, K]`, v `[B, H, V]`, g the log decay `[B, H, K]` or `[B, H]`."""
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"the state must be a contiguous float32 tensor, got {state.dtype}")
    if _use_triton(backend, q):
        from jetnas.ops.triton_decode import triton_gla_step_

        return triton_gla_step_(q, k, v, g, state, scale)
    o, new = gla_step(q, k, v, g, state, scale)
    state.copy_(new)
    return o


def rwkv7_step_(r, w, k, v, a, b, state, scale=1.0, backend: Backend | str = "torch"):
    """`jetnas.ops.rwkv7.rwkv7_step` writing the new state into `state [B, H, K, V]` (float32) in place; returns o
    `[B, H, V]` in v's dtype. r, w (log decay), k, a, b `[B, H, K]`, v `[B, H, V]`."""
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"the state must be a contiguous float32 tensor, got {state.dtype}")
    if _use_triton(backend, r):
        from jetnas.ops.triton_rwkv7 import triton_rwkv7_step_

        return triton_rwkv7_step_(r, w, k, v, a, b, state, scale)
    o, new = rwkv7_step(r, w, k, v, a, b, state, scale)
    state.copy_(new)
    return o


def conv_step_(x, kernels, bias, state, activation="silu", backend: Backend | str = "torch"):
    """One decode step of a short causal convolution, writing the new window into `state [B, D, W - 1]` in place
    (any strides; the oldest input is dropped, x kept). `x [B, D]`; `kernels [D, W]` (static) or `[B, D, W]`
    (per token); `bias [D]` or None; the activation after the bias. Returns `y [B, D]` in x's dtype.

    The Triton kernel accumulates in float32 and rounds once; the reference (`jetnas.ops.conv.short_conv_step` /
    `dynamic_conv_step`) rounds the sum to x's dtype before adding the bias and activating, so in half precision
    the two can differ by that rounding (the tests compare them in float32)."""
    W = kernels.shape[-1]
    if state.shape != (*x.shape, W - 1) or state.dtype != x.dtype:
        raise ValueError(f"state must be {[*x.shape, W - 1]} in {x.dtype}, got {list(state.shape)} {state.dtype}")
    if _use_triton(backend, x) and W >= 2:
        from jetnas.ops.triton_decode import triton_conv_step_

        return triton_conv_step_(x, kernels, bias, state, activation)
    if kernels.dim() == 2:
        y, new = short_conv_step(x, kernels, bias, state, activation)
    else:
        y, new = dynamic_conv_step(x, kernels, state, activation)
    state.copy_(new)
    return y
