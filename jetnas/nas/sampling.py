"""Sub-network sampling for super-network training: uniform per layer, or exactly a budget of attention layers.

Every sample is a pure function of (seed, step, index), so a run is reproducible and a resumed run samples what
an uninterrupted one would have, with no sampler state to save.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

_BUDGET = re.compile(r"^(attn|swa)=(\d+)$")


@dataclass(frozen=True)
class Budget:
    """How many layers stay softmax attention: `attn` full-attention and `swa` sliding-window layers."""

    attn: int = 0
    swa: int = 0

    @classmethod
    def parse(cls, text: str) -> "Budget":
        """`"attn=2,swa=2"` -> Budget(2, 2)."""
        counts = {}
        for part in (p.strip() for p in text.split(",") if p.strip()):
            m = _BUDGET.match(part)
            if not m:
                raise ValueError(f"budget entry {part!r} is not attn=N or swa=N (in {text!r})")
            if m.group(1) in counts:
                raise ValueError(f"budget {text!r} gives {m.group(1)} twice")
            counts[m.group(1)] = int(m.group(2))
        if not counts:
            raise ValueError(f"empty budget {text!r}; e.g. attn=2,swa=2")
        return cls(**counts)

    @property
    def total(self) -> int:
        return self.attn + self.swa

    def __str__(self) -> str:
        return f"attn={self.attn},swa={self.swa}"


@dataclass(frozen=True)
class SubnetSampler:
    """Samples per-layer choices ("attn", "swa", "linear").

    Args:
        num_layers: L.
        mode: "uniform" (each layer independently: attention with probability `p_attn`, else, when
            `with_swa`, sliding window with probability `p_swa`, else linear) or "budget" (exactly `budget.attn`
            attention and `budget.swa` sliding-window layers at uniformly random positions, the rest linear).
        budget: for mode "budget".
        p_attn, p_swa: for mode "uniform".
        with_swa: whether uniform sampling uses sliding-window attention at all.
        seed: the run's seed.
    """

    num_layers: int
    mode: str = "uniform"
    budget: Budget | None = None
    p_attn: float = 0.5
    p_swa: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.mode not in ("uniform", "budget"):
            raise ValueError(f"sampling mode must be 'uniform' or 'budget', got {self.mode!r}")
        if self.mode == "budget":
            if self.budget is None:
                raise ValueError("sampling mode 'budget' needs a budget (e.g. attn=2,swa=2)")
            if self.budget.total >= self.num_layers:
                raise ValueError(f"budget {self.budget} leaves no linear layer to train in a {self.num_layers}-layer "
                                 f"model")
        if not (0 <= self.p_attn and 0 <= self.p_swa and self.p_attn + self.p_swa <= 1):
            raise ValueError(f"p_attn={self.p_attn}, p_swa={self.p_swa} must be >= 0 and sum to <= 1")

    def sample(self, step: int, index: int = 0) -> tuple[str, ...]:
        """The `index`-th sub-network of optimizer step `step`."""
        rng = random.Random(f"{self.seed}:{step}:{index}")
        L = self.num_layers
        if self.mode == "uniform":
            out = []
            for _ in range(L):
                u = rng.random()
                out.append("attn" if u < self.p_attn else "swa" if u < self.p_attn + self.p_swa else "linear")
            if "linear" not in out:  # a sub-network with nothing to train teaches nothing: keep one linear layer
                out[rng.randrange(L)] = "linear"
            return tuple(out)
        layers = rng.sample(range(L), self.budget.total)
        choice = ["linear"] * L
        for i in layers[: self.budget.attn]:
            choice[i] = "attn"
        for i in layers[self.budget.attn:]:
            choice[i] = "swa"
        return tuple(choice)
