"""Triton kernels for the per-layer relative hidden-state MSE of distillation (`jetnas.train.losses.distill_terms`,
whose PyTorch code is the reference): each sequence's sum of squared errors `sum (hs - ht)^2` and of teacher squares
`sum ht^2` in one read of the student's and the teacher's hidden states, and the gradient `d hs = 2 (hs - ht) g[b]`
(g: the gradient of the sequence's error sum) in one more.

The PyTorch code makes, per layer, a float32 copy of hs (and of ht when it is bf16), the difference, its square, the
teacher's square and two reductions, and keeps the float32 difference for the backward, which is two more float32
passes; on the stage-1 step of the SmolLM2-135M hybrid (30 layers of `[32, 1024, 576]`) these were a good part of
the 61 ms of elementwise GPU time per step (H200 profile, benchmarks/results/2026-12-06_h200_chunked). Here: one
read of hs and ht forward, one read of hs and ht and one write of d hs backward, nothing saved but the inputs
(which the caller holds anyway).

Sums are float32: program (b, c) of a `(B, C)` grid adds the blocks c, c + C, ... of sequence b into a float32
vector, reduced once at its end; the C partials of a sequence are added by PyTorch (no atomics: deterministic).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _square_sums_kernel(hs_ptr, ht_ptr, sse_ptr, sst_ptr, N, C, BLOCK: tl.constexpr):
    """Program (b, c): partial sums of (hs - ht)^2 and ht^2 over the blocks c, c + C, ... of row b of the
    contiguous `[B, N]` hs and ht; written to `sse [B, C]`, `sst [B, C]` (float32)."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    err = tl.zeros([BLOCK], dtype=tl.float32)
    sq = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(c * BLOCK, N, C * BLOCK):
        idx = start + offs
        inside = idx < N
        s = tl.load(hs_ptr + b * N + idx, mask=inside, other=0.0).to(tl.float32)
        t = tl.load(ht_ptr + b * N + idx, mask=inside, other=0.0).to(tl.float32)
        d = s - t
        err += d * d
        sq += t * t
    tl.store(sse_ptr + b * C + c, tl.sum(err, 0))
    tl.store(sst_ptr + b * C + c, tl.sum(sq, 0))


@triton.jit
def _square_sums_bwd_kernel(hs_ptr, ht_ptr, g_ptr, acc_ptr, dhs_ptr, N, BLOCK: tl.constexpr, HAS_ACC: tl.constexpr):
    """`d hs = g[b] * (2 (hs - ht))` over block c of row b (grid `(B, cdiv(N, BLOCK))`), float32 math, written in
    hs's dtype (the reference's order: autograd of `pow(2)` is `grad * (2 * base)`); with HAS_ACC, plus the
    gradient `acc` that hs gets from the rest of the graph (contiguous `[B, N]`), rounded once."""
    b = tl.program_id(0).to(tl.int64)
    idx = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = idx < N
    s = tl.load(hs_ptr + b * N + idx, mask=inside, other=0.0).to(tl.float32)
    t = tl.load(ht_ptr + b * N + idx, mask=inside, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + b).to(tl.float32)
    d = g * (2.0 * (s - t))
    if HAS_ACC:
        d += tl.load(acc_ptr + b * N + idx, mask=inside, other=0.0).to(tl.float32)
    tl.store(dhs_ptr + b * N + idx, d.to(dhs_ptr.dtype.element_ty), mask=inside)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _chunks(rows: int, n: int, device: torch.device) -> int:
    """Programs per sequence: on a GPU about four per SM over the whole batch (each loops over its blocks); under
    the interpreter (CPU tensors, programs run one after another) up to two, which the tests' sizes reach, so that
    the partial sums are exercised there too."""
    blocks = triton.cdiv(n, BLOCK)
    target = triton.cdiv(4 * _sm_count(device), rows) if device.type == "cuda" else 2
    return max(1, min(blocks, target))


def _square_sums_fwd(hs2: torch.Tensor, ht2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, N = hs2.shape
    C = _chunks(B, N, hs2.device)
    sse = torch.empty(B, C, dtype=torch.float32, device=hs2.device)
    sst = torch.empty(B, C, dtype=torch.float32, device=hs2.device)
    if B and N:
        _square_sums_kernel[(B, C)](hs2, ht2, sse, sst, N, C, BLOCK=BLOCK, num_warps=8)
    else:
        sse.zero_(), sst.zero_()
    return sse.sum(1), sst.sum(1)


class _SquareSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs2, ht2):
        sse, sst = _square_sums_fwd(hs2, ht2)
        ctx.save_for_backward(hs2, ht2)
        ctx.mark_non_differentiable(sst)
        return sse, sst

    @staticmethod
    def backward(ctx, dsse, dsst):
        hs2, ht2 = ctx.saved_tensors
        B, N = hs2.shape
        dhs = torch.empty_like(hs2)
        if dsse is None:
            return dhs.zero_(), None
        if B and N:
            _square_sums_bwd_kernel[(B, triton.cdiv(N, BLOCK))](hs2, ht2, dsse.contiguous(), hs2, dhs, N,
                                                               BLOCK=BLOCK, HAS_ACC=False, num_warps=8)
        return dhs, None


def triton_sequence_square_sums(hs: torch.Tensor, ht: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence (the first dim), `sum (hs - ht)^2` and `sum ht^2` over the rest, in float32, as `[B]` each.

    hs: `[B, ...]` (the student's hidden states; float16 / bfloat16 / float32), ht of hs's shape (the teacher's,
    any of those dtypes, on hs's device; it gets no gradient). The error sum is differentiable in hs (its gradient
    `2 (hs - ht) g[b]`, in hs's dtype, from one kernel); the teacher's sum is not. Shapes and the choice of this
    path are checked by `jetnas.train.losses.distill_terms`.
    """
    B = hs.shape[0]
    hs2, ht2 = hs.reshape(B, -1).contiguous(), ht.reshape(B, -1).contiguous()
    if torch.is_grad_enabled() and hs.requires_grad:
        sse, sst = _SquareSums.apply(hs2, ht2)
        return sse, sst
    return _square_sums_fwd(hs2, ht2)


class _PendingGrad:
    """What the tensor hook on hs needs: hs and ht as `[B, N]` (detached views: the hook holds no reference to hs
    itself, so hs, its hook and this holder form no reference cycle and go with hs), and `dsse`, the per-sequence
    gradient of the error sum that `_SquareSumsIntoGrad.backward` leaves here."""

    def __init__(self, hs2: torch.Tensor, ht2: torch.Tensor):
        self.hs2, self.ht2 = hs2, ht2
        self.dsse: torch.Tensor | None = None

    def add_grad(self, grad: torch.Tensor | None) -> torch.Tensor | None:
        """The hook: `grad + 2 (hs - ht) dsse[b]` in grad's dtype, one kernel (grad as it came when the error sum
        took no gradient)."""
        if grad is None:  # autograd cannot take a gradient from a hook where there was none (see below)
            raise RuntimeError("triton_sequence_square_sums_into_grad: hs got no gradient from the rest of the "
                               "graph; give a hidden state that nothing else uses to triton_sequence_square_sums")
        dsse, self.dsse = self.dsse, None
        if dsse is None:
            return grad
        hs2, ht2 = self.hs2, self.ht2
        B, N = hs2.shape
        acc = grad.reshape(B, N).contiguous()
        out = torch.empty(B, N, dtype=grad.dtype, device=grad.device)
        if B and N:
            _square_sums_bwd_kernel[(B, triton.cdiv(N, BLOCK))](hs2, ht2, dsse.contiguous(), acc, out, N,
                                                               BLOCK=BLOCK, HAS_ACC=True, num_warps=8)
        return out.view(grad.shape)


class _SquareSumsIntoGrad(torch.autograd.Function):
    """As `_SquareSums`, but the backward gives hs no gradient through this node: it leaves `dsse` in `pending` for
    the hook that `triton_sequence_square_sums_into_grad` puts on hs (`_PendingGrad.add_grad`). hs is the input
    itself, not a view of it, so that hs's producer waits for this backward (autograd runs a node after every
    consumer of its outputs has given its gradient) and the hook finds dsse."""

    @staticmethod
    def forward(ctx, hs, pending):
        ctx.pending = pending
        sse, sst = _square_sums_fwd(pending.hs2, pending.ht2)
        ctx.mark_non_differentiable(sst)
        return sse, sst

    @staticmethod
    def backward(ctx, dsse, dsst):
        ctx.pending.dsse = dsse
        return None, None


def triton_sequence_square_sums_into_grad(hs: torch.Tensor, ht: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`triton_sequence_square_sums` for an hs that the rest of the graph also differentiates (a residual-stream
    state that the next layer reads): the same sums, and the error sum's gradient `2 (hs - ht) g[b]` added inside
    the backward kernel to the gradient hs gets from there (read once more), instead of written as a tensor of its
    own that autograd then adds to that gradient (one write, then an add that reads two tensors and writes one: per
    layer of the stage-1 step, benchmarks/results/2026-12-06_cpu_elementwise). The sum is rounded once, to the
    gradient's dtype (autograd rounds the two terms, then their sum).

    How: a tensor hook on hs, which autograd calls with hs's gradient from everything else after this op's backward
    has run (hs's producer waits for all of hs's consumers). A hook cannot make a gradient where there is none, so
    an hs that nothing else differentiates raises in backward: give such a state to `triton_sequence_square_sums`.
    Without grad mode, or for an hs that needs no gradient or is not contiguous (the hook must sit on the tensor
    the graph uses), it is `triton_sequence_square_sums`.
    """
    if not (torch.is_grad_enabled() and hs.requires_grad and hs.is_contiguous()):
        return triton_sequence_square_sums(hs, ht)
    B = hs.shape[0]
    pending = _PendingGrad(hs.detach().reshape(B, -1), ht.detach().reshape(B, -1).contiguous())
    sse, sst = _SquareSumsIntoGrad.apply(hs, pending)
    hs.register_hook(pending.add_grad)
    return sse, sst
