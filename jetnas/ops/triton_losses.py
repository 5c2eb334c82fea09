"""A Triton kernel for one chunk of `jetnas.ops.losses`: the KL / cross-entropy terms of a block of rows of logits
and their gradient G = dL/dz, in two passes over each row (contract and reference: `jetnas.ops.losses._chunk_terms`).

The eager chunk step makes ~20 passes over `[chunk, V]` tensors, most of them float32 (~150 bytes moved per logit);
this kernel reads the student's and the teacher's logits twice and writes G once, over the student's logits
(~10 bytes per logit in bf16), and keeps no float32 `[chunk, V]` tensor at all.

Pass 1, online over the row's vocabulary blocks (running maxima, rescaled sums): logsumexp of s = z / T and of
s_t = z_t / T, the raw logsumexp of z when T != 1 (the cross-entropy's), and A = sum_v e^(s_t - m_t) (s_t - s),
so that sum_v p (log p - log q) = A / d_t + lse(s) - lse(s_t) (with sum_v p = d_t / d_t = 1). Pass 2 writes
G = a T m_i / n_kl (q - p) + b valid_i / n_ce (softmax(z) - onehot(y)), in z's dtype. Float32 math throughout.
With token weights (`kl_wscale`, `ce_wscale`: w_i m_i / n_kl and w_i valid_i / n_ce), G takes those scales and each
row also stores its weighted terms beside the unweighted ones (one more float32 per row and term).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from jetnas.ops.losses import ChunkTerms


@triton.jit
def _linear_loss_chunk_kernel(z_ptr, zt_ptr, labels_ptr, kl_scale_ptr, ce_scale_ptr, kl_row_ptr, ce_row_ptr,
                              kl_wscale_ptr, ce_wscale_ptr, kl_wrow_ptr, ce_wrow_ptr,
                              V, stride_z, stride_zt, inv_t, t2, kl_coef, ce_coef,
                              HAS_KL: tl.constexpr, HAS_CE: tl.constexpr, WANT_GRAD: tl.constexpr,
                              SEPARATE_CE_LSE: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    zt_row = zt_ptr + row * stride_zt
    cols = tl.arange(0, BLOCK_V)
    # running maxima start at a large negative finite value: exp(-inf - -inf) would be NaN
    m_s = -1e30
    d_s = 0.0
    m_t = -1e30
    d_t = 0.0
    acc = 0.0
    m_z = -1e30
    d_z = 0.0
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        inside = idx < V
        # lanes past V: 0 where a value is used in arithmetic (no inf - inf), -inf where it enters a max / sum of exp
        z = tl.load(z_row + idx, mask=inside, other=0.0).to(tl.float32)
        s = z * inv_t
        s_in = tl.where(inside, s, float("-inf"))
        new_m = tl.maximum(m_s, tl.max(s_in, 0))
        d_s = d_s * tl.exp(m_s - new_m) + tl.sum(tl.exp(s_in - new_m), 0)
        m_s = new_m
        if HAS_KL:
            st = tl.load(zt_row + idx, mask=inside, other=0.0).to(tl.float32) * inv_t
            st_in = tl.where(inside, st, float("-inf"))
            new_t = tl.maximum(m_t, tl.max(st_in, 0))
            e_t = tl.exp(st_in - new_t)
            scale = tl.exp(m_t - new_t)
            d_t = d_t * scale + tl.sum(e_t, 0)
            acc = acc * scale + tl.sum(e_t * (st - s), 0)
            m_t = new_t
        if SEPARATE_CE_LSE:
            z_in = tl.where(inside, z, float("-inf"))
            new_z = tl.maximum(m_z, tl.max(z_in, 0))
            d_z = d_z * tl.exp(m_z - new_z) + tl.sum(tl.exp(z_in - new_z), 0)
            m_z = new_z
    lse_s = m_s + tl.log(d_s)
    if SEPARATE_CE_LSE:
        lse_z = m_z + tl.log(d_z)
    else:
        lse_z = lse_s
    if HAS_KL:
        lse_t = m_t + tl.log(d_t)
        kl_scale = tl.load(kl_scale_ptr + row)
        tl.store(kl_row_ptr + row, (acc / d_t + lse_s - lse_t) * t2 * kl_scale)
        if WEIGHTED:
            kl_wscale = tl.load(kl_wscale_ptr + row)
            tl.store(kl_wrow_ptr + row, (acc / d_t + lse_s - lse_t) * t2 * kl_wscale)
            g_kl = kl_coef * kl_wscale
        else:
            g_kl = kl_coef * kl_scale
    if HAS_CE:
        label = tl.load(labels_ptr + row)
        ce_scale = tl.load(ce_scale_ptr + row)
        z_label = tl.load(z_row + label).to(tl.float32)
        tl.store(ce_row_ptr + row, (lse_z - z_label) * ce_scale)
        if WEIGHTED:
            ce_wscale = tl.load(ce_wscale_ptr + row)
            tl.store(ce_wrow_ptr + row, (lse_z - z_label) * ce_wscale)
            g_ce = ce_coef * ce_wscale
        else:
            g_ce = ce_coef * ce_scale
    if WANT_GRAD:
        # G overwrites z block by block: each block is read before it is written, and z[label] was read above
        for start in range(0, V, BLOCK_V):
            idx = start + cols
            inside = idx < V
            z = tl.load(z_row + idx, mask=inside, other=0.0).to(tl.float32)
            g = tl.zeros([BLOCK_V], dtype=tl.float32)
            if HAS_KL:
                st = tl.load(zt_row + idx, mask=inside, other=0.0).to(tl.float32) * inv_t
                g += g_kl * (tl.exp(z * inv_t - lse_s) - tl.exp(st - lse_t))
            if HAS_CE:
                g += g_ce * (tl.exp(z - lse_z) - tl.where(idx == label, 1.0, 0.0))
            tl.store(z_row + idx, g.to(z_ptr.dtype.element_ty), mask=inside)


def triton_chunk_terms(z: torch.Tensor, zt: torch.Tensor | None, labels: torch.Tensor | None,
                       kl_scale: torch.Tensor | None, ce_scale: torch.Tensor | None, temperature: float,
                       kl_weight: float, ce_weight: float, want_grad: bool, kl_wscale: torch.Tensor | None = None,
                       ce_wscale: torch.Tensor | None = None, block_v: int | None = None) -> ChunkTerms:
    """`jetnas.ops.losses._chunk_terms` as one kernel launch: its `ChunkTerms` for the chunk, G written over `z`
    (which must be the caller's own scratch tensor: `[C, V]`, unit stride along V, float32 / bf16 / fp16).
    kl and ce (and kl_weighted, ce_weighted with the token-weighted scales `kl_wscale`, `ce_wscale`) are float32
    0-dim tensors (None where not asked for); G is z, or None without want_grad.
    `block_v`: vocabulary entries per step of the row loops (a power of two; default min(4096, next pow2 of V)),
    set small by the tests to exercise the online rescaling across blocks."""
    if z.dtype == torch.float64:
        raise ValueError("the Triton chunk step computes in float32; float64 inputs take the PyTorch step")
    if z.stride(-1) != 1:
        raise ValueError(f"z must have unit stride along V, got strides {z.stride()}")
    if zt is not None and zt.stride(-1) != 1:  # the caller's teacher logits, e.g. a transposed view
        zt = zt.contiguous()
    C, V = z.shape
    has_kl, has_ce = zt is not None, labels is not None
    weighted = kl_wscale is not None or ce_wscale is not None
    if weighted and ((kl_wscale is None) == has_kl or (ce_wscale is None) == has_ce):
        raise ValueError(f"token-weighted scales go with the terms computed: KL {has_kl}, CE {has_ce}, got "
                         f"kl_wscale={kl_wscale is not None}, ce_wscale={ce_wscale is not None}")

    def rows(on: bool):
        return torch.empty(C, dtype=torch.float32, device=z.device) if on else None

    kl_rows, ce_rows = rows(has_kl), rows(has_ce)
    kl_wrows, ce_wrows = rows(has_kl and weighted), rows(has_ce and weighted)
    dummy = z  # an unused pointer argument still needs a tensor

    def arg(t):
        return dummy if t is None else t

    _linear_loss_chunk_kernel[(C,)](
        z, zt if has_kl else dummy, labels if has_ce else dummy,
        kl_scale.float() if has_kl else dummy, ce_scale.float() if has_ce else dummy, arg(kl_rows), arg(ce_rows),
        arg(None if kl_wscale is None else kl_wscale.float()), arg(None if ce_wscale is None else ce_wscale.float()),
        arg(kl_wrows), arg(ce_wrows),
        V, z.stride(0), zt.stride(0) if has_kl else 0, 1.0 / temperature, temperature * temperature,
        kl_weight * temperature, ce_weight,
        HAS_KL=has_kl, HAS_CE=has_ce, WANT_GRAD=want_grad, SEPARATE_CE_LSE=has_ce and temperature != 1.0,
        WEIGHTED=weighted, BLOCK_V=block_v or min(4096, triton.next_power_of_2(V)), num_warps=8)

    def total(t):
        return None if t is None else t.sum()

    return ChunkTerms(total(kl_rows), total(ce_rows), z if want_grad else None, total(kl_wrows), total(ce_wrows))
