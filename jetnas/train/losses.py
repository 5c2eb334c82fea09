"""The losses jetnas trains with: feature distillation against a teacher (per-layer relative hidden-state MSE and KL
on next-token distributions) and the language-model cross-entropy. Training stage 1 and the super-network's loss
distil with the same terms.

The per-layer MSE is relative: divided by the mean square of the teacher's hidden state at that layer, because
residual-stream norms grow with depth and an absolute MSE would let the last layers dominate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from jetnas.ops.backend import Backend, as_backend
from jetnas.ops.losses import chunked_linear_kl_ce


def distill_terms(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                  student_logits: torch.Tensor | None = None, teacher_logits: torch.Tensor | None = None,
                  temperature: float = 1.0, backend: Backend | str = "torch",
                  shared: Sequence[bool] | None = None) -> dict[str, torch.Tensor]:
    """`{"hidden": mean over layers of the relative MSE, "kl": KL(teacher || student) per token}` (kl only with
    logits). The relative MSE of a layer is each sequence's squared error over its teacher's mean square, averaged
    over the sequences: a mean of per-sequence terms, so a batch split over ranks or micro-batches gives the
    whole batch's loss and gradient (a ratio of batch means would not: 2026-12-02, DDP != one process).

    Args:
        student_hidden, teacher_hidden: one `[B, T, D]` tensor per layer each, paired in order.
        student_logits, teacher_logits: `[B, T, V]`, for the KL term.
        temperature: of both distributions; the KL is scaled by its square (gradients keep their size).
        backend: the student's kernels (default "torch": the code below, the reference). A "triton" backend with
            `fused_hidden_loss` on takes each layer's two per-sequence sums from one Triton kernel, and the
            student's gradient from one more (`jetnas.ops.triton_hidden_loss`), where it takes the tensors (CUDA,
            or CPU with `interpret`; float16 / bfloat16 / float32; a teacher that needs no gradient). The same
            numbers up to the order of the float32 sums.
        shared: per layer, whether the student's hidden state also feeds the rest of the graph that is
            differentiated (a layer input the model's next layer reads: `jetnas.train.stages` passes True for all
            but the final normed state). On the fused path such a layer's gradient is added to the one from there
            inside the backward kernel (`triton_sequence_square_sums_into_grad`), instead of autograd adding two
            float32 tensors: the same sum, rounded once instead of twice. A state marked shared that nothing else
            differentiates makes the backward raise. None: no layer is.
    """
    backend = as_backend(backend)
    # each layer's per-sequence mean squared error and teacher mean square, `[B]` each; the ratios and their mean
    # are taken once for all layers (`[L, B]`), not per layer: the same mean of L * B equal-weight terms, in ~5
    # launches instead of ~3 per layer, forward and backward
    errs, dens = [], []
    sizes = []  # per layer: n when errs / dens hold the kernel's sums over n values per sequence, None for means
    if shared is not None and len(shared) != len(student_hidden):
        raise ValueError(f"shared must have one entry per layer ({len(student_hidden)}), got {len(shared)}")
    for i, (hs, ht) in enumerate(zip(student_hidden, teacher_hidden)):
        if hs.shape != ht.shape or hs.dim() < 2:
            raise ValueError(f"layer {i}: student and teacher hidden states must be [B, ...] of one shape, got "
                             f"{list(hs.shape)} and {list(ht.shape)}")
        if errs and hs.shape[0] != errs[0].shape[0]:
            raise ValueError(f"layer {i}: {hs.shape[0]} sequences, layer 0 has {errs[0].shape[0]}")
        if _fused_hidden(backend, hs, ht):
            from jetnas.ops import triton_hidden_loss

            square_sums = (triton_hidden_loss.triton_sequence_square_sums_into_grad if shared is not None and shared[i]
                           else triton_hidden_loss.triton_sequence_square_sums)
            sse, sst = square_sums(hs, ht)
            errs.append(sse)
            dens.append(sst)
            sizes.append(hs[0].numel())
            continue
        ht = ht.float()
        dims = tuple(range(1, ht.dim()))
        errs.append((hs.float() - ht).pow(2).mean(dims))
        dens.append(ht.pow(2).mean(dims))
        sizes.append(None)
    if not errs:
        raise ValueError("distill_terms needs at least one layer's hidden states")
    floor = 1e-12  # of the teacher's mean square
    if sizes[0] is not None and sizes.count(sizes[0]) == len(sizes):
        # sums over one n in every layer (the fused path): (sse / n) / (sst / n) is sse / sst, so the two divisions
        # per layer (and one more backward), launched once per layer per micro-batch, are left out; the floor
        # scales with n
        floor *= sizes[0]
    else:
        errs = [e if n is None else e / n for e, n in zip(errs, sizes)]
        dens = [d if n is None else d / n for d, n in zip(dens, sizes)]
    out = {"hidden": (torch.stack(errs) / torch.stack(dens).clamp_min(floor)).mean()}
    if student_logits is not None and teacher_logits is not None:
        out["kl"] = logits_kl(student_logits, teacher_logits, temperature)
    return out


def _fused_hidden(backend: Backend, hs: torch.Tensor, ht: torch.Tensor) -> bool:
    """Whether the hidden-MSE kernel takes this layer's pair (see `distill_terms`)."""
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    return (backend.fused_hidden_loss and backend.runs_triton(hs) and hs.dtype in dtypes and ht.dtype in dtypes
            and ht.device == hs.device and not (ht.requires_grad and torch.is_grad_enabled()))


def _check_token_weight(token_weight: torch.Tensor, shape: torch.Size, name: str) -> torch.Tensor:
    if token_weight.shape != shape or not token_weight.dtype.is_floating_point:
        raise ValueError(f"{name}: token_weight must be a float tensor of the tokens' shape {list(shape)}, got "
                         f"{token_weight.dtype} {list(token_weight.shape)}")
    return token_weight.detach().float()


def logits_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
              token_weight: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) of next-token distributions at `temperature`, per token (mean), times T^2; from
    `[..., V]` logits in float32 (the reference of `head_terms`' KL). `token_weight` (`[...]`, float): each token's
    KL times its weight, still divided by the number of tokens (`sum_t w_t KL_t / N`; None: every weight 1)."""
    return logits_kl_terms(student_logits, teacher_logits, temperature, token_weight)[0]


def logits_kl_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                    token_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(logits_kl with token_weight, the plain mean KL detached)` from one pass over the `[..., V]` logits: a
    weighted loss and its unweighted metric without a second float32 softmax of the full vocabulary."""
    t = temperature
    log_p = F.log_softmax(teacher_logits.float() / t, -1)
    log_q = F.log_softmax(student_logits.float() / t, -1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    weighted = per_token if token_weight is None else (
        per_token * _check_token_weight(token_weight, per_token.shape, "logits_kl"))
    return weighted.mean() * t * t, per_token.detach().mean() * t * t


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, token_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of `logits [B, T, V]` (computed in float32) against `labels [B, T]`.
    `token_weight` (`[B, T]`, float): each token's cross-entropy times its weight, still divided by the number of
    labels (`sum_t w_t CE_t / N`, labels -100 left out of both; None: every weight 1, `F.cross_entropy`'s mean)."""
    flat_logits, flat_labels = logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1)
    if token_weight is None:
        return F.cross_entropy(flat_logits, flat_labels)
    return lm_loss_terms(logits, labels, token_weight)[0]


def lm_loss_terms(logits: torch.Tensor, labels: torch.Tensor, token_weight: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """`(lm_loss with token_weight, the plain mean cross-entropy detached)` from one pass over the logits (as
    `logits_kl_terms`)."""
    flat_logits, flat_labels = logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1)
    per_token = F.cross_entropy(flat_logits, flat_labels, reduction="none")  # 0 at labels -100
    count = (flat_labels != -100).sum().clamp_min(1)
    weighted = per_token if token_weight is None else (
        per_token * _check_token_weight(token_weight, labels.shape, "lm_loss").reshape(-1))
    return weighted.sum() / count, per_token.detach().sum() / count


def head_terms(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None = None,
               teacher_hidden: torch.Tensor | None = None, teacher_weight: torch.Tensor | None = None, *,
               kl_weight: float = 0.0, lm_weight: float = 0.0, temperature: float = 1.0,
               backend: Backend | str = "torch", token_weight: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The LM-head terms of a distillation or language-model loss from the final normed hidden states, without the
    `[B, T, V]` logits: `kl_weight * KL(teacher || student) + lm_weight * cross-entropy` (the KL as in
    `distill_terms`, the cross-entropy as in `lm_loss`), through `jetnas.ops.losses.chunked_linear_kl_ce`.

    Args:
        hidden: `[B, T, D]` the student's LM-head input; weight: `[V, D]` its head (tied embeddings get their
            gradient when they require one).
        labels: `[B, T]` next-token ids; the cross-entropy is computed (and reported) whenever they are given,
            also at `lm_weight` 0, as a metric.
        teacher_hidden, teacher_weight: the teacher's LM-head input and head, for the KL (both, or neither).
        kl_weight, lm_weight, temperature: as in the stages' configs.
        backend: the student's kernels: a fused "triton" backend runs each chunk's softmax work as one Triton
            kernel (`step="triton"`), anything else the eager reference of it (same numbers up to float32 order).
        token_weight: `[B, T]` float, a weight per position on both terms in the loss (`sum_t w_t term_t / N`, as
            `logits_kl` / `lm_loss` with their token_weight); None: every weight 1.

    Returns:
        `(loss, metrics)`: the weighted sum (differentiable) and the detached terms `kl` / `lm` that were computed,
        unweighted by token_weight (comparable with runs without it).
    """
    backend = as_backend(backend)
    step = "triton" if backend.name == "triton" and backend.fused and hidden.is_cuda else "torch"
    out = chunked_linear_kl_ce(hidden, weight, labels, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                               kl_weight=kl_weight, ce_weight=lm_weight, temperature=temperature, step=step,
                               token_weight=token_weight)
    metrics = {name: value for name, value in (("kl", out.kl), ("lm", out.ce)) if value is not None}
    return out.loss, metrics
