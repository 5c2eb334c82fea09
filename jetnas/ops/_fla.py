"""Thin adapters from our op signatures to flash-linear-attention's Triton kernels (CUDA only).

fla is imported only when a CUDA tensor reaches an op whose backend is "triton", so `import jetnas` and every
CPU path work without fla or Triton. Our conventions match fla's: `[B, T, H, K]` tensors, log-space decays,
`[N, H, K, V]` float32 states, `cu_seqlens` for packed sequences.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from jetnas.ops.backend import needs_grad, parse_affine


def chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm,
                           segments: int = 0, affine: str = "off"):
    """fla's chunked gated delta rule; with `segments` > 1 (`Backend.segment_state_pass`), no gradient needed, no
    `cu_seqlens` and a latency-bound state pass (`segment_pass.segment_count`), its state pass segment-parallel;
    with `affine` "bf16" or "tf32" (`Backend.affine_state_pass`), no gradient needed, no `cu_seqlens` and head key
    dims <= 128, its state pass in the affine form (`affine_chunk_gated_delta_rule`)."""
    if beta is None:
        beta = q.new_ones(q.shape[:3])
    if g is None:
        # the plain delta rule is the gated one with log-decay 0; fla's own ungated kernel refuses float32 inputs
        g = q.new_zeros(q.shape[:3], dtype=torch.float32)
    if (affine != "off" and cu_seqlens is None and k.shape[-1] <= 128 and v.shape[2] == k.shape[2]
            and not needs_grad(q, k, v, g, beta, initial_state)):
        precision, variant = parse_affine(affine)
        return affine_chunk_gated_delta_rule(q, k, v, g.float(), beta, scale, initial_state, output_final_state,
                                             use_qk_l2norm, precise=precision == "tf32", variant=variant)
    if segments > 1 and cu_seqlens is None and not needs_grad(q, k, v, g, beta, initial_state):
        from jetnas.ops.segment_pass import segment_count

        B, T, H, _ = q.shape
        P = segment_count(B, H, T, v.shape[-1], segments, _num_sms(q.device))
        if P > 1:
            return segment_parallel_chunk_gated_delta_rule(q, k, v, g.float(), beta, scale, initial_state,
                                                           output_final_state, use_qk_l2norm, P)
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk

    return fla_chunk(q, k, v, g.float(), beta, scale=scale, initial_state=initial_state,
                     output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm, cu_seqlens=cu_seqlens)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


# (B, T, segments, chunk, device) -> the segments' boundaries; filled only outside CUDA-graph capture, so a captured
# prefill reads tensors that outlive the graph (the warm-up before a capture fills it)
_SEGMENT_INDEX: dict = {}


def _segment_index(B: int, T: int, P: int, chunk: int, device: torch.device):
    """The segments of B sequences of T tokens, as packed sequences of the flattened `[1, B * T]` batch.

    Returns `(cu_seqlens [B * P' + 1], chunk_indices [B * NT, 2], chunk_offsets [B * P' + 1], P')`, fla's varlen
    metadata (int64), built on the device with arange arithmetic (no host-to-device copy, so CUDA graphs can capture
    it). Segments are whole chunks (`segment_layout`), so the segments' chunks are numbered exactly as the B
    sequences' chunks are in the equal-length layout: `h [1, B * NT, ...]` is `h [B, NT, ...]`, as fla's output
    kernel reads it.
    """
    from jetnas.ops.segment_pass import segment_layout

    key = (B, T, P, chunk, str(device))
    if key in _SEGMENT_INDEX:
        return _SEGMENT_INDEX[key]
    NT = -(-T // chunk)
    per, P = segment_layout(NT, P)
    i = torch.arange(B * P + 1, device=device)
    b, p = i // P, i % P  # the last entry is (B, 0): the end of the batch
    cu_seqlens = b * T + torch.clamp(p * per * chunk, max=T)
    chunk_offsets = b * NT + p * per
    j = torch.arange(B * NT, device=device)
    jb, jc = j // NT, j % NT
    chunk_indices = torch.stack([jb * P + jc // per, jc % per], 1)
    out = (cu_seqlens, chunk_indices, chunk_offsets, P)
    if device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
        _SEGMENT_INDEX[key] = out
    return out


def segment_parallel_chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm,
                                            segments: int, summary: str = "prescan"):
    """fla 0.6's chunked gated delta rule forward with its state pass split into segments (no autograd).

    The steps of `fla.ops.gated_delta_rule.chunk.chunk_gated_delta_rule_fwd`, with its one state-pass call replaced
    by `jetnas.ops.segment_pass`'s three steps (that module's docstring has the algebra and the PyTorch reference):

    1. the segments' affine maps `hm [B * P, H, K, V + K] = [N | M]` (float32), with `summary` either "prescan" (fla's
       own pre-scan kernel for this, `fla.ops.cp.chunk_fwd.chunk_cp_fwd_h`, which its intra-card context parallelism
       uses: no per-chunk states written, M's chain in float32) or "state_pass" (fla's ordinary state pass on
       `[u | 0]` from `[0 | I]`, V + K wide, its final states);
    2. the combine in PyTorch (`segment_pass.combine_segment_maps`: P - 1 batched [K, K] x [K, V] products);
    3. fla's state pass `chunk_gated_delta_rule_fwd_h` on the segments as packed sequences, each from its initial
       state, giving the per-chunk states `h` and new values `v_new` of the whole batch.

    q, k: `[B, T, H, K]`; v: `[B, T, H, V]` (H heads for all: no grouped values); g `[B, T, H]` float32 log decay;
    beta `[B, T, H]`; initial_state `[B, H, K, V]` or None. Returns `(o [B, T, H, V] in q's dtype, final_state
    [B, H, K, V] float32 or None)`, fla's `chunk_gated_delta_rule` up to float rounding.
    """
    if summary not in ("prescan", "state_pass"):
        raise ValueError(f"summary must be 'prescan' or 'state_pass', got {summary!r}")
    with torch.cuda.device(q.device):  # Triton launches on the current device (fla's input_guard does the same)
        return _segment_parallel(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, segments,
                                 summary)


def _segment_parallel(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, segments, summary):
    from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_fwd_h
    from fla.ops.common.chunk_o import chunk_fwd_o

    from jetnas.ops.segment_pass import combine_segment_maps

    chunk = 64
    B, T, H, K = k.shape
    V = v.shape[-1]
    q, k, g, w, u, scale = _chunk_local_fla(q, k, v, g, beta, scale, use_qk_l2norm, chunk)
    cu_seqlens, chunk_indices, chunk_offsets, P = _segment_index(B, T, segments, chunk, q.device)
    # the state pass sees the segments as packed sequences of the flattened batch (views: all contiguous)
    k1, w1, u1, g1 = k.view(1, B * T, H, K), w.view(1, B * T, H, K), u.view(1, B * T, H, V), g.view(1, B * T, H)
    if summary == "prescan":
        from fla.ops.cp.chunk_fwd import chunk_cp_fwd_h

        hm = k.new_empty(B * P, H, K, V + K, dtype=torch.float32)
        chunk_cp_fwd_h(k=k1, w=w1, u=u1, hm=hm, g=g1, cu_seqlens=cu_seqlens, chunk_size=chunk, multi_seqs=True)
    else:
        u_ext = torch.cat([u1, u1.new_zeros(1, B * T, H, K)], -1)
        h0 = torch.zeros(B * P, H, K, V + K, dtype=torch.float32, device=k.device)
        h0[..., V:] = torch.eye(K, dtype=torch.float32, device=k.device)
        # chunk_offsets given: fla's own intra-card backend (which reads cu_seqlens on the host) stays out of it
        _, _, hm = chunk_gated_delta_rule_fwd_h(k=k1, w=w1, u=u_ext, g=g1, initial_state=h0, output_final_state=True,
                                                chunk_size=chunk, save_new_value=False, cu_seqlens=cu_seqlens,
                                                chunk_indices=chunk_indices, chunk_offsets=chunk_offsets)
    hm = hm.view(B, P, H, K, V + K).transpose(0, 1)  # [P, B, H, K, V + K]
    starts = combine_segment_maps(hm[..., V:], hm[..., :V], None if initial_state is None else initial_state.float())
    starts = starts.transpose(0, 1).reshape(B * P, H, K, V).contiguous()
    h, v_new, finals = chunk_gated_delta_rule_fwd_h(k=k1, w=w1, u=u1, g=g1, initial_state=starts,
                                                    output_final_state=output_final_state, chunk_size=chunk,
                                                    cu_seqlens=cu_seqlens, chunk_indices=chunk_indices,
                                                    chunk_offsets=chunk_offsets)
    o = chunk_fwd_o(q=q, k=k, v=v_new.view(B, T, H, V), h=h.view(B, -1, H, K, V), g=g, scale=scale,
                    chunk_size=chunk)
    final_state = finals.view(B, P, H, K, V)[:, -1] if output_final_state else None
    return o.to(q.dtype), final_state


def _chunk_local_fla(q, k, v, g, beta, scale, use_qk_l2norm, chunk):
    """The steps of fla 0.6's chunked forward before its state pass, over the whole batch as fla computes them:
    q and k L2-normed when asked, log2-space decays cumulated per chunk, the WY form. Returns
    `(q, k, g, w, u, scale)` (scale K^-1/2 when None)."""
    from fla.modules.norm.l2norm import l2norm_fwd
    from fla.ops.gated_delta_rule.chunk_fwd import chunk_gated_delta_rule_fwd_intra
    from fla.ops.utils import chunk_local_cumsum
    from fla.ops.utils.constant import RCP_LN2

    q, k, v, beta = (t.contiguous() for t in (q, k, v, beta))
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    if use_qk_l2norm:
        q, _ = l2norm_fwd(q)
        k, _ = l2norm_fwd(k)
    g = chunk_local_cumsum(g.contiguous(), chunk_size=chunk, scale=RCP_LN2)
    w, u, _ = chunk_gated_delta_rule_fwd_intra(k=k, v=v, g=g, beta=beta, chunk_size=chunk)
    return q, k, g, w, u, scale


def affine_chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm,
                                  precise: bool = False, variant: str = "loop"):
    """fla 0.6's chunked gated delta rule forward (no autograd, equal-length sequences, H heads for all) with its
    state pass `chunk_gated_delta_rule_fwd_h` replaced by `triton_affine_pass.affine_state_pass` (same contract):
    fla's chunk-local cumsum and WY kernels before it, its output kernel after. Arguments and returns as
    `segment_parallel_chunk_gated_delta_rule`'s."""
    from fla.ops.common.chunk_o import chunk_fwd_o

    from jetnas.ops.triton_affine_pass import affine_state_pass

    chunk = 64
    # Triton launches on the current device (fla's input_guard does the same); on CPU (tests: fla's stand-ins and
    # the interpreter) there is none to set
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        q, k, g, w, u, scale = _chunk_local_fla(q, k, v, g, beta, scale, use_qk_l2norm, chunk)
        h, v_new, final_state = affine_state_pass(k, w, u, g, initial_state, output_final_state, chunk_size=chunk,
                                                  precise=precise, variant=variant)
        o = chunk_fwd_o(q=q, k=k, v=v_new, h=h, g=g, scale=scale, chunk_size=chunk)
    return o.to(q.dtype), final_state


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
