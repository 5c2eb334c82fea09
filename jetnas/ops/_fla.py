"""Thin adapters from our op signatures to flash-linear-attention's Triton kernels (CUDA only).

fla is imported only when a CUDA tensor reaches an op whose backend is "triton", so `import jetnas` and every
CPU path work without fla or Triton. Our conventions match fla's: `[B, T, H, K]` tensors, log-space decays,
`[N, H, K, V]` float32 states, `cu_seqlens` for packed sequences.
"""

from __future__ import annotations

import torch


def chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm):
    if beta is None:
        beta = q.new_ones(q.shape[:3])
    if g is None:
        # the plain delta rule is the gated one with log-decay 0; fla's own ungated kernel refuses float32 inputs
        g = q.new_zeros(q.shape[:3], dtype=torch.float32)
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk

    return fla_chunk(q, k, v, g.float(), beta, scale=scale, initial_state=initial_state,
                     output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm, cu_seqlens=cu_seqlens)


def fused_recurrent_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                                     use_qk_l2norm):
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_recurrent

    if beta is None:
        beta = q.new_ones(q.shape[:3])
    return fla_recurrent(q, k, v, g=None if g is None else g.float(), beta=beta, scale=scale,
                         initial_state=initial_state, output_final_state=output_final_state,
                         use_qk_l2norm_in_kernel=use_qk_l2norm, cu_seqlens=cu_seqlens)


def chunk_gla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, g))
    if g.dim() == 3 and training:
        # fla 0.6 refuses chunk_simple_gla's backward with Triton < 3.7.1 on Hopper (wrong results, fla #640); the
        # per-channel kernel's backward is fine, so per-head decays are broadcast over K for training
        g = g[..., None].expand(*g.shape, q.shape[-1])
    if g.dim() == 3:
        from fla.ops.simple_gla import chunk_simple_gla

        return chunk_simple_gla(q, k, v, g=g.float(), scale=scale, initial_state=initial_state,
                                output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    from fla.ops.gla import chunk_gla as fla_chunk_gla

    return fla_chunk_gla(q, k, v, g.float(), scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def fused_recurrent_gla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
    if g.dim() == 3:
        from fla.ops.simple_gla import fused_recurrent_simple_gla

        return fused_recurrent_simple_gla(q, k, v, g=g.float(), scale=scale, initial_state=initial_state,
                                          output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    from fla.ops.gla import fused_recurrent_gla as fla_recurrent_gla

    return fla_recurrent_gla(q, k, v, gk=g.float(), scale=scale, initial_state=initial_state,
                             output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def chunk_rwkv7(r, w, k, v, a, b, scale, initial_state, output_final_state, cu_seqlens):
    # fla's RWKV-7 kernels are its DPLR delta rule: same argument names, w the log decay, [N, H, K, V] states
    from fla.ops.rwkv7 import chunk_rwkv7 as fla_chunk

    return fla_chunk(r=r, w=w.float(), k=k, v=v, a=a, b=b, scale=scale, initial_state=initial_state,
                     output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def fused_recurrent_rwkv7(r, w, k, v, a, b, scale, initial_state, output_final_state, cu_seqlens):
    if torch.is_grad_enabled() and any(t.requires_grad for t in (r, w, k, v, a, b, initial_state) if t is not None):
        # fla's fused recurrent DPLR kernel has no backward (it raises): the chunked kernel computes the same function
        return chunk_rwkv7(r, w, k, v, a, b, scale, initial_state, output_final_state, cu_seqlens)
    from fla.ops.rwkv7 import fused_recurrent_rwkv7 as fla_recurrent

    return fla_recurrent(r=r, w=w.float(), k=k, v=v, a=a, b=b, scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def is_available() -> bool:
    """True when fla and Triton import and a CUDA device exists."""
    if not torch.cuda.is_available():
        return False
    try:
        import fla.ops.gated_delta_rule  # noqa: F401
        import triton  # noqa: F401
    except Exception:  # any import-time failure means the fast path is unusable here
        return False
    return True
