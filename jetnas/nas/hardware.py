"""Hardware-aware search of the linear block's shape (PostNAS step 4, paper section 2.5 and Table 2).

Decode is memory-bound and the cache is what a step reads per sequence, so the cache size is held fixed and the
(key dim, value dim, heads) grid is searched at that size: throughput then stays about the same (the paper's nine
settings at 154 MB ran within 1% of each other) while parameters, and accuracy, vary. This module is the
bookkeeping: the candidates at a fixed state size, and the choice rule. Measuring and training are passed in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class BlockShape:
    """Heads and per-head key / value dims of a linear block; its recurrent state is `H * K * V` numbers."""

    num_heads: int
    head_k_dim: int
    head_v_dim: int

    @property
    def state_numbers(self) -> int:
        return self.num_heads * self.head_k_dim * self.head_v_dim

    def jet_parameters(self, hidden_size: int, conv_size: int = 4, reduction: int = 8) -> int:
        """Parameters of a JetBlock of this shape: q, k (D x HK each), v, g (D x HV each), o (HV x D), a and b
        (D x H each), the kernel generator (D x HV/r, then HV/r x HV*W + HV*W), A_log, dt_bias, o_norm."""
        D, H, K, V = hidden_size, self.num_heads, self.head_k_dim, self.head_v_dim
        value = H * V
        generator = D * (value // reduction) + (value // reduction) * value * conv_size + value * conv_size
        return 2 * D * H * K + 3 * D * value + 2 * D * H + generator + 2 * H + V

    def as_config(self) -> dict:
        """The released JetBlock config keys for this shape."""
        return {"num_heads": self.num_heads, "head_dim": self.head_k_dim, "expand_v": self.head_v_dim / self.head_k_dim}


def shapes_at_state_size(state_numbers: int, heads: Iterable[int] = (2, 4, 6, 8, 12, 16, 24, 32),
                         key_dims: Iterable[int] = (32, 48, 64, 96, 128, 192, 256), value_multiple: int = 16,
                         value_range: tuple[int, int] = (32, 1024)) -> list[BlockShape]:
    """Every (heads, key dim, value dim) whose state has exactly `state_numbers` numbers, value dims a multiple of
    `value_multiple` (kernel-friendly) within `value_range`; sorted by heads then key dim."""
    if state_numbers < 1:
        raise ValueError(f"state_numbers must be >= 1, got {state_numbers}")
    out = []
    for h in heads:
        for k in key_dims:
            if state_numbers % (h * k):
                continue
            v = state_numbers // (h * k)
            if v % value_multiple == 0 and value_range[0] <= v <= value_range[1]:
                out.append(BlockShape(h, k, v))
    return sorted(out, key=lambda s: (s.num_heads, s.head_k_dim))


def choose_shape(results: dict[BlockShape, dict], original: BlockShape, tolerance: float = 0.01,
                 accuracy: str = "accuracy", throughput: str = "decode_tokens_per_s") -> BlockShape:
    """The paper's rule: the most accurate shape whose measured throughput is within `tolerance` (a fraction) of
    the original shape's; ties go to fewer parameters when `params` is given, then to the original.

    Args:
        results: per shape, at least `{accuracy: float, throughput: float}` (and optionally "params").
        original: the shape the throughput tolerance is measured against (must be in `results`).
    """
    if original not in results:
        raise ValueError(f"the original shape {original} must be among the measured results")
    floor = (1 - tolerance) * results[original][throughput]
    eligible = [s for s, r in results.items() if r[throughput] >= floor]
    return max(eligible, key=lambda s: (results[s][accuracy], -results[s].get("params", 0), s == original))
