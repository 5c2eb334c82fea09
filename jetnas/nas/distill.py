"""The distillation objective of super-network training: the sampled sub-network's hidden states after every
layer should match the teacher's (feature distillation, per-layer relative MSE), optionally plus KL on the logits.
The terms are training stage 1's (`jetnas.train.losses.distill_terms`); what is the super-network's own is the
sampling of sub-networks per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from jetnas.nas.sampling import SubnetSampler
from jetnas.train.losses import distill_terms, head_terms


@dataclass(frozen=True)
class DistillConfig:
    """Loss weights: `hidden_weight` * mean over layers of relative MSE + `kl_weight` * KL(teacher || student) on
    next-token distributions at `temperature`; `subnets_per_step` sub-networks share each batch."""

    hidden_weight: float = 1.0
    kl_weight: float = 0.0
    temperature: float = 1.0
    subnets_per_step: int = 1

    def __post_init__(self):
        if self.hidden_weight < 0 or self.kl_weight < 0 or self.hidden_weight + self.kl_weight == 0:
            raise ValueError(f"hidden_weight={self.hidden_weight}, kl_weight={self.kl_weight}: need >= 0, not both 0")
        if self.subnets_per_step < 1:
            raise ValueError(f"subnets_per_step must be >= 1, got {self.subnets_per_step}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


def make_distill_loss(sampler: SubnetSampler, config: DistillConfig):
    """`loss_fn(model, batch, step) -> (loss, metrics)` for the trainer: one teacher pass (no grad), then each
    sampled sub-network's pass, losses averaged over the `subnets_per_step` sub-networks.

    No pass makes the `[B, T, V]` logits: the hidden terms need none, and the KL (`kl_weight > 0`) comes from the
    final normed states through `jetnas.train.losses.head_terms`. The metrics stay tensors (detached): reading them
    here would make the step wait for the GPU before its backward; the trainer reads them after."""

    def loss_fn(model, batch, step):
        supernet = getattr(model, "module", model)  # unwrapped for the teacher pass (no gradient sync needed)
        ids = batch["input_ids"][:, :-1]
        with torch.no_grad():
            _, t_hidden = supernet(ids, supernet.teacher_choice(), output_hidden_states=True, logits=False)
        kl = config.kl_weight > 0
        base = supernet.base
        if kl:
            with torch.no_grad():
                t_normed = base.model.norm(t_hidden[-1])
        n = config.subnets_per_step
        total = 0.0
        metrics = {"hidden": 0.0, "kl": 0.0, "linear_layers": 0.0}
        for index in range(n):
            choice = sampler.sample(step, index)
            _, s_hidden = model(ids, choice, output_hidden_states=True, logits=False)
            hidden = distill_terms(s_hidden, t_hidden, backend=supernet.base.model.backend)["hidden"]
            loss = config.hidden_weight * hidden
            if kl:
                kl_loss, terms = head_terms(base.model.norm(s_hidden[-1]), base.lm_head.weight,
                                            teacher_hidden=t_normed, teacher_weight=base.lm_head.weight,
                                            kl_weight=config.kl_weight, temperature=config.temperature,
                                            backend=base.model.backend)
                loss = loss + kl_loss
                metrics["kl"] = metrics["kl"] + terms["kl"] / n
            total = total + loss / n
            metrics["hidden"] = metrics["hidden"] + hidden.detach() / n
            metrics["linear_layers"] += choice.count("linear") / n
        return total, metrics

    return loss_fn
