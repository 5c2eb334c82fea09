"""An LM head and its loss without the full logits: the distillation KL and the cross-entropy, computed over chunks
of rows, with the gradients made in the forward pass.

Why: stage-1 distillation ran the student and the teacher with `logits_to_keep=0` and took the KL of two full
float32 `[N, V]` logits tensors (N = 32 x 1024 tokens, V = 49,152 for SmolLM2: 6.4 GB each, and autograd keeps
several: log-softmaxes, their gradient). Here the logits exist one chunk of rows at a time, so the working set is
`chunk_size x V`; the caller passes the hidden states that feed the LM head (after the final norm) and the head's
weight `[V, D]` (tied to the embeddings in Llama / Qwen; no bias).

## What is computed

Rows i = 1..N, vocabulary v = 1..V, temperature T, student logits `z = h W^T`, teacher logits `z_t` (given, or
`h_t W_t^T` from the teacher's hidden states and head), `p = softmax(z_t / T)`, `q = softmax(z / T)`, a row mask m
(n_kl = sum m) for the KL and labels y with an ignore index (n_ce valid labels, valid_i = [y_i != ignore]):

    KL = T^2 / n_kl * sum_i m_i sum_v p_iv (log p_iv - log q_iv)          (jetnas.nas.distill.distill_terms)
    CE = 1 / n_ce * sum_i valid_i (logsumexp_v z_iv - z_iy_i)             (F.cross_entropy, mean)
    L  = a KL_w + b CE_w                                                    (a = kl_weight, b = ce_weight)

where KL_w and CE_w are the same sums with each row's term times a per-token weight w_i (`token_weight`, default 1:
then KL_w = KL and CE_w = CE), still divided by the unweighted counts n_kl, n_ce: a row of weight 1 keeps exactly
its gradient, a row of weight w gets w times its own (answer-weighted distillation, `jetnas.train.stages`). The
terms returned beside L are the unweighted KL and CE, comparable with any run without weights.

An empty mean (n = 0) is 0, not NaN (so a batch of padding trains nothing rather than poisoning the step).

## Gradients (the derivation the chunked pass relies on)

With s = z / T, `log q_v = s_v - logsumexp(s)`, so `d log q_v / d s_u = [u == v] - q_u`. The teacher term
`sum_v p_v log p_v` does not depend on z, and `sum_v p_v = 1`:

    d/ds_u ( -sum_v p_v log q_v ) = -sum_v p_v ([u == v] - q_u) = q_u - p_u
    dKL/dz_iv = T^2 / n_kl * m_i * (1 / T) (q_iv - p_iv) = T m_i (q_iv - p_iv) / n_kl
    dKL_w/dz_iv = T w_i m_i (q_iv - p_iv) / n_kl

(the T^2 factor of Hinton et al. keeps the gradient's scale independent of T to first order). Likewise
`dCE_w/dz_iv = w_i valid_i (softmax(z_i)_v - [v == y_i]) / n_ce`. So G = dL/dz is known row by row in the forward pass,
and the chain rule through `z = h W^T` gives

    dL/dh = G W        [N, D]
    dL/dW = G^T h      [V, D]

L is a scalar at the end of the graph, so `chunked_*` computes, for each chunk of rows: the chunk's logits, its
loss terms, its rows of G, then `G W` and `G^T h` (the fused-linear approach of liger-kernel), keeping only dL/dh
and dL/dW. Backward multiplies them by the incoming scalar gradient. Memory: `O(chunk x V)` working set plus
`[N, D]` and `[V, D]` gradients, instead of `O(N x V)`; work: the same three matmuls autograd would do (one forward,
two backward), all in the forward pass, nothing recomputed. Without grad mode (evaluation) only the values are made.

A chunk's elementwise work (softmaxes, loss terms, G) runs as eager PyTorch (`step="torch"`, `_chunk_terms`, the
readable version: ~20 passes over float32 `[chunk, V]` tensors), through `torch.compile` (`step="compile"`), or as
one Triton kernel (`step="triton"`, `jetnas.ops.triton_losses`: two passes over each row, G written over the
student's logits). The matmuls are ATen's (cuBLAS) in every case.

## Numerics (the same as the reference, i.e. as today's `distill_terms` / `F.cross_entropy` path)

Logits come from a matmul in the compute dtype (the inputs' dtype, or autocast's dtype when autocast is on, as
`F.linear` would), then are upcast to float32 (float64 stays float64, for gradcheck) for every softmax and sum.
G is rounded to the compute dtype before its two matmuls, as autograd rounds the gradient of `logits.float()`.
dL/dW is accumulated over chunks in float32 (autograd's single matmul accumulates in float32 inside the GEMM and
rounds once) and returned in W's dtype; dL/dh is returned in h's dtype. The teacher is a constant: its tensors
are detached and get no gradient.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

STEPS = ("torch", "compile", "triton")
# Working-set bytes per logit of a chunk, by chunk step. The eager step keeps about six float32 [chunk, V] tensors
# alive at its peak (logits, teacher logits, the two log-softmaxes, p, G) plus the two compute-dtype matmul
# outputs: 32 is a safe bound (24 measured for KL + CE at T != 1, tests/ops/test_losses.py); the compiled step is
# given the same. The Triton step holds only the two matmul outputs (G overwrites the student's logits): 8 covers
# float32 logits.
BYTES_PER_CHUNK_LOGIT = {"torch": 32, "compile": 32, "triton": 8}
# 1 GiB of working set: 640 rows at V = 49,152 for the eager step, 2,688 for the Triton one; the benchmark sweeps
# other sizes.
DEFAULT_CHUNK_BUDGET_BYTES = 1 << 30


class LinearLosses(NamedTuple):
    """`loss = kl_weight * kl + ce_weight * ce` (differentiable, a 0-dim float32 tensor; float64 for float64
    inputs) and the two terms, detached, or None where not computed."""

    loss: torch.Tensor
    kl: torch.Tensor | None
    ce: torch.Tensor | None


def default_chunk_size(n_rows: int, vocab_size: int, budget_bytes: int = DEFAULT_CHUNK_BUDGET_BYTES,
                       step: str = "torch") -> int:
    """Rows per chunk so that the chunk's working set (`BYTES_PER_CHUNK_LOGIT[step]` per logit) fits
    `budget_bytes`: a multiple of 64 when at least 64 rows fit, never more than `n_rows`, at least 1."""
    if n_rows < 1 or vocab_size < 1 or budget_bytes < 1:
        raise ValueError(f"n_rows, vocab_size and budget_bytes must be >= 1, got {n_rows}, {vocab_size}, "
                         f"{budget_bytes}")
    if step not in STEPS:
        raise ValueError(f"step must be one of {STEPS}, got {step!r}")
    rows = budget_bytes // (vocab_size * BYTES_PER_CHUNK_LOGIT[step])
    if rows >= 64:
        rows -= rows % 64
    return max(1, min(n_rows, rows))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclasses.dataclass
class _Inputs:
    """Validated, flattened inputs: everything but the differentiable hidden states and weight."""

    n: int
    vocab: int
    compute_dtype: torch.dtype
    teacher_logits: torch.Tensor | None  # [N, V]
    teacher_hidden: torch.Tensor | None  # [N, Dt], in the teacher's compute dtype
    teacher_weight: torch.Tensor | None  # [V, Dt], same
    labels: torch.Tensor | None  # [N] int64, ignored positions replaced by 0
    kl_scale: torch.Tensor | None  # [N] m_i / n_kl in the accumulation dtype
    ce_scale: torch.Tensor | None  # [N] valid_i / n_ce
    # with token weights: [N] w_i m_i / n_kl and w_i valid_i / n_ce, each row's share of L and of G (None: no
    # weights, the unweighted scales serve both)
    kl_wscale: torch.Tensor | None
    ce_wscale: torch.Tensor | None
    temperature: float
    kl_weight: float
    ce_weight: float
    chunk_size: int
    step: str


def _compute_dtype(name: str, *tensors: torch.Tensor) -> torch.dtype:
    """The dtype `F.linear` would multiply in: autocast's for float32/bf16/fp16 inputs under autocast, else the
    inputs' own (which must agree)."""
    dtypes = {t.dtype for t in tensors}
    for dtype in dtypes:
        if not dtype.is_floating_point:
            raise ValueError(f"{name} must be floating point, got {dtype}")
    device = tensors[0].device.type
    if torch.is_autocast_enabled(device) and torch.float64 not in dtypes:
        return torch.get_autocast_dtype(device)
    if len(dtypes) > 1:
        raise ValueError(f"{name} must share one dtype (or run under autocast), got {sorted(map(str, dtypes))}")
    return dtypes.pop()


def _rows(t: torch.Tensor, n: int, name: str, per_token: bool = False) -> torch.Tensor:
    """`t` with its leading dimensions flattened (all of them for a per-token vector: labels, mask), checked to
    hold `n` rows."""
    flat = t.reshape(-1) if per_token else t.reshape(-1, t.shape[-1])
    if flat.shape[0] != n:
        raise ValueError(f"{name} must have the hidden states' {n} rows, got shape {tuple(t.shape)}")
    return flat


def _check_head(hidden: torch.Tensor, weight: torch.Tensor, name: str) -> None:
    if hidden.dim() < 2:
        raise ValueError(f"{name}hidden must be [..., D], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{name}weight must be [V, D={hidden.shape[-1]}], got shape {tuple(weight.shape)}")


def _teacher_rows(weight, teacher_logits, teacher_hidden, teacher_weight, n):
    """Validate the teacher's inputs (logits, or hidden states + head): the flattened, detached tensors."""
    vocab = weight.shape[0]
    if teacher_logits is not None:
        if teacher_hidden is not None or teacher_weight is not None:
            raise ValueError("give the teacher as teacher_logits or as teacher_hidden + teacher_weight, not both")
        if teacher_logits.shape[-1] != vocab:
            raise ValueError(f"teacher_logits must be [..., V={vocab}], got shape {tuple(teacher_logits.shape)}")
        if not teacher_logits.dtype.is_floating_point:
            raise ValueError(f"teacher_logits must be floating point, got {teacher_logits.dtype}")
        return _rows(teacher_logits.detach(), n, "teacher_logits"), None, None
    if teacher_hidden is None or teacher_weight is None:
        raise ValueError("the KL needs the teacher: teacher_logits, or both teacher_hidden and teacher_weight "
                         f"(got teacher_hidden={teacher_hidden is not None}, "
                         f"teacher_weight={teacher_weight is not None})")
    _check_head(teacher_hidden, teacher_weight, "teacher_")
    if teacher_weight.shape[0] != vocab:
        raise ValueError(f"teacher_weight must have the student's V={vocab} rows, got shape "
                         f"{tuple(teacher_weight.shape)}")
    return None, _rows(teacher_hidden.detach(), n, "teacher_hidden"), teacher_weight.detach()


def _check_labels(labels: torch.Tensor, n: int) -> torch.Tensor:
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
    return _rows(labels, n, "labels", per_token=True)


def _check_mask(mask: torch.Tensor, n: int) -> torch.Tensor:
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool (True = the token counts), got {mask.dtype}")
    return _rows(mask, n, "mask", per_token=True)


def _check_token_weight(token_weight: torch.Tensor, n: int) -> torch.Tensor:
    if not token_weight.dtype.is_floating_point:
        raise ValueError(f"token_weight must be floating point (a weight per token), got {token_weight.dtype}")
    return _rows(token_weight.detach(), n, "token_weight", per_token=True)


def _check_temperature(temperature: float) -> float:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return float(temperature)


def _prepare(hidden, weight, labels, teacher_logits, teacher_hidden, teacher_weight, kl_weight, ce_weight,
             temperature, mask, ignore_index, chunk_size, step, token_weight=None) -> _Inputs:
    _check_head(hidden, weight, "")
    n, vocab = hidden.shape[0], weight.shape[0]
    if n < 1:
        raise ValueError(f"hidden must have at least one row, got shape {tuple(hidden.shape)}")
    if labels is None and teacher_logits is None and teacher_hidden is None and teacher_weight is None:
        raise ValueError("nothing to compute: give labels (cross-entropy), the teacher (KL), or both")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if step not in STEPS:
        raise ValueError(f"step must be one of {STEPS}, got {step!r}")
    compute = _compute_dtype("hidden and weight", hidden, weight)
    if step == "triton" and compute == torch.float64:
        raise ValueError("step='triton' computes in float32: float64 inputs take step='torch'")
    acc = _acc_dtype(compute)
    inputs = _Inputs(n=n, vocab=vocab, compute_dtype=compute, teacher_logits=None, teacher_hidden=None,
                     teacher_weight=None, labels=None, kl_scale=None, ce_scale=None, kl_wscale=None, ce_wscale=None,
                     temperature=_check_temperature(temperature), kl_weight=float(kl_weight),
                     ce_weight=float(ce_weight), step=step,
                     chunk_size=chunk_size or default_chunk_size(n, vocab, step=step))
    if teacher_logits is not None or teacher_hidden is not None or teacher_weight is not None:
        t_logits, t_hidden, t_weight = _teacher_rows(weight, teacher_logits, teacher_hidden, teacher_weight, n)
        inputs.teacher_logits = t_logits
        if t_hidden is not None:
            t_compute = _compute_dtype("teacher_hidden and teacher_weight", t_hidden, t_weight)
            inputs.teacher_hidden, inputs.teacher_weight = t_hidden.to(t_compute), t_weight.to(t_compute)
        keep = torch.ones(n, dtype=acc, device=hidden.device) if mask is None else _check_mask(mask, n).to(acc)
        inputs.kl_scale = keep / keep.sum().clamp_min(1)
    elif mask is not None:
        raise ValueError("mask selects the KL's tokens, but no teacher was given (labels use ignore_index)")
    if labels is not None:
        labels = _check_labels(labels, n)
        valid = labels != ignore_index
        inputs.labels = labels.masked_fill(~valid, 0).long()
        inputs.ce_scale = valid.to(acc) / valid.sum().clamp_min(1)
    if token_weight is not None:
        w = _check_token_weight(token_weight, n).to(acc)
        inputs.kl_wscale = None if inputs.kl_scale is None else inputs.kl_scale * w
        inputs.ce_wscale = None if inputs.ce_scale is None else inputs.ce_scale * w
    return inputs


class ChunkTerms(NamedTuple):
    """What a chunk step returns: `kl`, `ce` (this chunk's shares of the unweighted means, 0-dim in the
    accumulation dtype; None where not asked for), `grad` (G = dL/dz in z's dtype, None without want_grad), and
    `kl_weighted`, `ce_weighted` (the shares of the token-weighted sums that L takes; None without weighted
    scales, when L takes kl and ce themselves)."""

    kl: torch.Tensor | None
    ce: torch.Tensor | None
    grad: torch.Tensor | None
    kl_weighted: torch.Tensor | None = None
    ce_weighted: torch.Tensor | None = None


def _chunk_terms(z: torch.Tensor, zt: torch.Tensor | None, labels: torch.Tensor | None,
                 kl_scale: torch.Tensor | None, ce_scale: torch.Tensor | None, temperature: float,
                 kl_weight: float, ce_weight: float, want_grad: bool, kl_wscale: torch.Tensor | None = None,
                 ce_wscale: torch.Tensor | None = None) -> ChunkTerms:
    """One chunk (`ChunkTerms`) for student logits `z [C, V]`, teacher logits `zt [C, V]` or None, labels `[C]` or
    None, per-row scales `m_i / n_kl`, `valid_i / n_ce`, and optionally the token-weighted ones `w_i m_i / n_kl`,
    `w_i valid_i / n_ce` (`kl_wscale`, `ce_wscale`: both or neither; they then scale G and the weighted terms).
    In-place operations only touch tensors made here (z and zt may be views of the caller's)."""
    out_dtype = z.dtype
    z = z.to(_acc_dtype(out_dtype))
    weighted = kl_wscale is not None or ce_wscale is not None
    kl = ce = grad = kl_w = ce_w = None
    if labels is not None:
        lse = torch.logsumexp(z, -1)
        per_row = lse - z.gather(1, labels[:, None]).squeeze(1)
        ce = (per_row * ce_scale).sum()
        if weighted:
            ce_w = (per_row * ce_wscale).sum()
        del per_row
        if want_grad:
            row = (ce_weight * (ce_wscale if weighted else ce_scale))[:, None]
            # b w_i valid_i / n_ce * (softmax(z) - onehot(y))
            grad = (z - lse[:, None]).exp_().mul_(row)
            grad.scatter_add_(1, labels[:, None], -row)
    if zt is not None:
        inv_t = 1.0 / temperature
        s = z * inv_t if temperature != 1.0 else z
        log_q = s - torch.logsumexp(s, -1, keepdim=True)
        del s
        st = zt.to(z.dtype) * inv_t if temperature != 1.0 else zt.to(z.dtype)
        log_p = st - torch.logsumexp(st, -1, keepdim=True)
        del st
        p = log_p.exp()
        # sum_v p (log p - log q), made in log_p's storage
        per_row = log_p.sub_(log_q).mul_(p).sum(-1)
        kl = (per_row * kl_scale).sum() * (temperature * temperature)
        if weighted:
            kl_w = (per_row * kl_wscale).sum() * (temperature * temperature)
        del log_p, per_row
        if want_grad:
            # a T w_i m_i / n_kl * (q - p), made in log_q's storage
            row = kl_weight * temperature * (kl_wscale if weighted else kl_scale)
            g_kl = log_q.exp_().sub_(p).mul_(row[:, None])
            grad = g_kl if grad is None else grad.add_(g_kl)
    return ChunkTerms(kl, ce, None if grad is None else grad.to(out_dtype), kl_w, ce_w)


@functools.cache
def _compiled_chunk_terms():
    # the last chunk's row count differs: dynamic=None compiles it static first and turns dynamic on a second shape
    return torch.compile(_chunk_terms)


def _run(hidden: torch.Tensor, weight: torch.Tensor, inp: _Inputs, need_h: bool, need_w: bool):
    """The chunk loop: `(loss, kl, ce, dL/dh or None, dL/dW or None)`, kl / ce zeros where not computed; dL/dh in
    h's dtype, dL/dW in the accumulation dtype (float32, or float64)."""
    compute, acc = inp.compute_dtype, _acc_dtype(inp.compute_dtype)
    h, w = hidden.detach().to(compute), weight.detach().to(compute)
    if inp.step == "triton":
        from jetnas.ops.triton_losses import triton_chunk_terms as chunk_step
    else:
        chunk_step = _compiled_chunk_terms() if inp.step == "compile" else _chunk_terms
    want_grad = need_h or need_w
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    kl_total = torch.zeros((), dtype=acc, device=hidden.device)
    ce_total = torch.zeros((), dtype=acc, device=hidden.device)
    weighted = inp.kl_wscale is not None or inp.ce_wscale is not None
    # the token-weighted sums L is made of (with token weights; else L takes kl_total and ce_total)
    kl_w_total = torch.zeros((), dtype=acc, device=hidden.device)
    ce_w_total = torch.zeros((), dtype=acc, device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, inp.n, inp.chunk_size):
            rows = slice(start, min(inp.n, start + inp.chunk_size))
            h_c = h[rows]
            z = h_c @ w.t()
            if inp.teacher_logits is not None:
                zt = inp.teacher_logits[rows]
            elif inp.teacher_hidden is not None:
                zt = inp.teacher_hidden[rows] @ inp.teacher_weight.t()
            else:
                zt = None
            kl, ce, grad, kl_w, ce_w = chunk_step(
                z, zt, *(None if t is None else t[rows] for t in (inp.labels, inp.kl_scale, inp.ce_scale)),
                inp.temperature, inp.kl_weight, inp.ce_weight, want_grad,
                *(None if t is None else t[rows] for t in (inp.kl_wscale, inp.ce_wscale)))
            del z, zt
            if kl is not None:
                kl_total += kl
            if ce is not None:
                ce_total += ce
            if kl_w is not None:
                kl_w_total += kl_w
            if ce_w is not None:
                ce_w_total += ce_w
            if need_h:
                grad_h[rows] = grad @ w
            if need_w:
                if grad.dtype == acc:
                    grad_w.addmm_(grad.t(), h_c)
                else:  # a compute-dtype product added into the float32 accumulator
                    grad_w += grad.t() @ h_c
            del grad
    if weighted:
        loss = inp.kl_weight * kl_w_total + inp.ce_weight * ce_w_total
    else:
        loss = inp.kl_weight * kl_total + inp.ce_weight * ce_total
    return loss, kl_total, ce_total, grad_h, grad_w


class _ChunkedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, inp: _Inputs):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, kl, ce, grad_h, grad_w = _run(hidden, weight, inp, need_h, need_w)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(kl, ce)
        return loss, kl, ce

    @staticmethod
    @once_differentiable  # the stored gradients are constants: a second derivative would be silently wrong
    def backward(ctx, grad_loss, _grad_kl, _grad_ce):
        grad_h, grad_w = ctx.saved_tensors
        # the stored gradients are of L itself: scale by dOut/dL in float32 (grad_loss rounded to bf16 first would
        # be off by up to 2^-9), then round once to h's / W's dtype
        acc = grad_loss.dtype
        return (None if grad_h is None else (grad_h.to(acc) * grad_loss).to(grad_h.dtype),
                None if grad_w is None else (grad_w * grad_loss).to(ctx.weight_dtype), None)


def chunked_linear_kl_ce(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None = None,
                         teacher_logits: torch.Tensor | None = None, teacher_hidden: torch.Tensor | None = None,
                         teacher_weight: torch.Tensor | None = None, *, kl_weight: float = 1.0,
                         ce_weight: float = 1.0, temperature: float = 1.0, mask: torch.Tensor | None = None,
                         ignore_index: int = -100, chunk_size: int | None = None, step: str = "torch",
                         token_weight: torch.Tensor | None = None) -> LinearLosses:
    """KL(teacher || student) and / or the cross-entropy of the student's LM head in one pass over chunks of rows,
    never holding the `[N, V]` logits (see the module docstring for the definitions and the gradients).

    Args:
        hidden: `[..., D]` the student's LM-head input (after the final norm); float32 / bf16 / fp16 / float64.
        weight: `[V, D]` the student's LM head (no bias); gets a gradient when it requires one (stage 2's tied
            embedding).
        labels: `[...]` (the hidden states' leading shape) next-token ids, or None for no cross-entropy.
        teacher_logits: `[..., V]` the teacher's logits, or None.
        teacher_hidden, teacher_weight: `[..., Dt]` and `[V, Dt]`, the teacher's LM-head input and head, in place
            of teacher_logits (the teacher's logits are then also made one chunk at a time). None for no KL.
        kl_weight, ce_weight: a and b in `loss = a KL + b CE` (default 1, 1).
        temperature: T > 0 of the KL (the CE uses the raw logits); the KL carries the T^2 factor.
        mask: `[...]` bool, the tokens the KL averages over (default: all). Only with a teacher.
        ignore_index: labels equal to it are left out of the cross-entropy (default -100).
        chunk_size: rows per chunk; None picks `default_chunk_size(N, V, step=step)` (a 1 GiB working set).
        step: how each chunk's elementwise work runs (the matmuls are always cuBLAS / ATen): "torch" (eager
            PyTorch, the default until the GPU benchmark says otherwise), "compile" (`torch.compile` of the same
            function), or "triton" (`jetnas.ops.triton_losses`, two passes per row; CUDA, or CPU tensors under
            Triton's interpreter; not float64).
        token_weight: `[...]` (like labels) float, a weight w_i per token that scales its KL and cross-entropy
            terms in the loss and so in both gradients (`sum_i w_i term_i / n`, n the unweighted count: see the
            module docstring); a constant (no gradient), taken as given (zeros allowed; not checked for sign on
            the host, so that the op stays capturable). None: every weight 1 (the same computation as before the
            argument existed, bit for bit).

    Returns:
        `LinearLosses(loss, kl, ce)`: loss differentiable (w.r.t. hidden and weight), the terms detached and
        unweighted (token_weight only changes the loss); float32 (float64 for float64 inputs). The teacher's
        tensors are constants and get no gradient.
    """
    _check_head(hidden, weight, "")
    h = hidden.reshape(-1, hidden.shape[-1])
    inp = _prepare(h, weight, labels, teacher_logits, teacher_hidden, teacher_weight, kl_weight, ce_weight,
                   temperature, mask, ignore_index, chunk_size, step, token_weight)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        loss, kl, ce = _ChunkedLinearLoss.apply(h, weight, inp)
    else:  # evaluation: values only
        loss, kl, ce, _, _ = _run(h, weight, inp, False, False)
    return LinearLosses(loss, kl if inp.kl_scale is not None else None, ce if inp.labels is not None else None)


def chunked_linear_kl(student_hidden: torch.Tensor, weight: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                      *, teacher_hidden: torch.Tensor | None = None, teacher_weight: torch.Tensor | None = None,
                      temperature: float = 1.0, mask: torch.Tensor | None = None, chunk_size: int | None = None,
                      step: str = "torch") -> torch.Tensor:
    """`T^2 * mean over (masked) tokens of KL(softmax(teacher / T) || softmax(student / T))`, differentiable,
    chunked: `chunked_linear_kl_ce` with the KL only (same arguments)."""
    return chunked_linear_kl_ce(student_hidden, weight, None, teacher_logits, teacher_hidden, teacher_weight,
                                kl_weight=1.0, ce_weight=0.0, temperature=temperature, mask=mask,
                                chunk_size=chunk_size, step=step).loss


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                                 ignore_index: int = -100, chunk_size: int | None = None,
                                 step: str = "torch") -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against labels (ignore_index left out; 0 when all are), chunked:
    `chunked_linear_kl_ce` with the CE only (same arguments)."""
    return chunked_linear_kl_ce(hidden, weight, labels, kl_weight=0.0, ce_weight=1.0, ignore_index=ignore_index,
                                chunk_size=chunk_size, step=step).loss


def naive_linear_kl(student_hidden: torch.Tensor, weight: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                    *, teacher_hidden: torch.Tensor | None = None, teacher_weight: torch.Tensor | None = None,
                    temperature: float = 1.0, mask: torch.Tensor | None = None,
                    token_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The reference KL, as `distill_terms` computes it: full logits `student_hidden @ weight.T` (under the
    ambient autocast), float32 log-softmaxes of both (float64 for float64 inputs), `T^2 * mean over (masked)
    tokens of sum_v p (log p - log q)`; with `token_weight`, each token's term times its weight, over the same
    unweighted count. Shapes as `chunked_linear_kl_ce`; the teacher is detached."""
    _check_head(student_hidden, weight, "")
    n = student_hidden.reshape(-1, student_hidden.shape[-1]).shape[0]
    t_logits, t_hidden, t_weight = _teacher_rows(weight, teacher_logits, teacher_hidden, teacher_weight, n)
    t = _check_temperature(temperature)
    z = F.linear(student_hidden.reshape(n, -1), weight)
    zt = t_logits if t_logits is not None else F.linear(t_hidden, t_weight)
    acc = _acc_dtype(z.dtype)
    log_p = F.log_softmax(zt.to(acc) / t, -1)
    log_q = F.log_softmax(z.to(acc) / t, -1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    w = None if token_weight is None else _check_token_weight(token_weight, n).to(acc)
    if mask is None:
        return (per_token if w is None else per_token * w).mean() * t * t
    keep = _check_mask(mask, n).to(acc)
    return (per_token * (keep if w is None else keep * w)).sum() / keep.sum().clamp_min(1) * t * t


def naive_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               ignore_index: int = -100, token_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The reference cross-entropy: full logits `hidden @ weight.T` (ambient autocast), upcast to float32
    (float64 stays), `F.cross_entropy` summed over labels != ignore_index (each token's term times its
    `token_weight` when given), divided by their count (the mean; 0 rather than NaN when every label is ignored)."""
    _check_head(hidden, weight, "")
    h = hidden.reshape(-1, hidden.shape[-1])
    labels = _check_labels(labels, h.shape[0])
    z = F.linear(h, weight)
    acc = _acc_dtype(z.dtype)
    if token_weight is None:
        total = F.cross_entropy(z.to(acc), labels.long(), ignore_index=ignore_index, reduction="sum")
    else:
        per_token = F.cross_entropy(z.to(acc), labels.long(), ignore_index=ignore_index, reduction="none")
        total = (per_token * _check_token_weight(token_weight, h.shape[0]).to(acc)).sum()
    return total / (labels != ignore_index).sum().clamp_min(1)


def naive_linear_kl_ce(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None = None,
                       teacher_logits: torch.Tensor | None = None, teacher_hidden: torch.Tensor | None = None,
                       teacher_weight: torch.Tensor | None = None, *, kl_weight: float = 1.0, ce_weight: float = 1.0,
                       temperature: float = 1.0, mask: torch.Tensor | None = None,
                       ignore_index: int = -100, token_weight: torch.Tensor | None = None) -> LinearLosses:
    """The reference for `chunked_linear_kl_ce`: `naive_linear_kl` and `naive_linear_cross_entropy`, weighted by
    kl_weight and ce_weight (and, in the loss only, by `token_weight`: the terms returned are unweighted)."""
    has_teacher = teacher_logits is not None or teacher_hidden is not None or teacher_weight is not None
    if labels is None and not has_teacher:
        raise ValueError("nothing to compute: give labels (cross-entropy), the teacher (KL), or both")
    kl = ce = None
    loss = 0.0
    teacher = {"teacher_hidden": teacher_hidden, "teacher_weight": teacher_weight, "temperature": temperature,
               "mask": mask}
    if has_teacher:
        kl = naive_linear_kl(hidden, weight, teacher_logits, **teacher)
        loss = loss + kl_weight * (kl if token_weight is None else
                                   naive_linear_kl(hidden, weight, teacher_logits, **teacher,
                                                   token_weight=token_weight))
    if labels is not None:
        ce = naive_linear_cross_entropy(hidden, weight, labels, ignore_index)
        loss = loss + ce_weight * (ce if token_weight is None else
                                   naive_linear_cross_entropy(hidden, weight, labels, ignore_index, token_weight))
    return LinearLosses(loss, None if kl is None else kl.detach(), None if ce is None else ce.detach())
