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


def distill_terms(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                  student_logits: torch.Tensor | None = None, teacher_logits: torch.Tensor | None = None,
                  temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """`{"hidden": mean over layers of the relative MSE, "kl": KL(teacher || student) per token}` (kl only with
    logits). The relative MSE of a layer is each sequence's squared error over its teacher's mean square, averaged
    over the sequences: a mean of per-sequence terms, so a batch split over ranks or micro-batches gives the
    whole batch's loss and gradient (a ratio of batch means would not: 2026-12-02, DDP != one process).

    Args:
        student_hidden, teacher_hidden: one `[B, T, D]` tensor per layer each, paired in order.
        student_logits, teacher_logits: `[B, T, V]`, for the KL term.
        temperature: of both distributions; the KL is scaled by its square (gradients keep their size).
    """
    terms = []
    for hs, ht in zip(student_hidden, teacher_hidden):
        ht = ht.float()
        dims = tuple(range(1, ht.dim()))
        err = (hs.float() - ht).pow(2).mean(dims)
        terms.append((err / ht.pow(2).mean(dims).clamp_min(1e-12)).mean())
    out = {"hidden": torch.stack(terms).mean()}
    if student_logits is not None and teacher_logits is not None:
        t = temperature
        log_p = F.log_softmax(teacher_logits.float() / t, -1)
        log_q = F.log_softmax(student_logits.float() / t, -1)
        out["kl"] = (log_p.exp() * (log_p - log_q)).sum(-1).mean() * t * t
    return out


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of `logits [B, T, V]` (computed in float32) against `labels [B, T]`."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
