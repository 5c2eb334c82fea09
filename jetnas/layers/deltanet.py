"""DeltaNet (Schlag et al., 2021; Yang et al., 2024): the delta rule without decay, static short convs on q, k, v.

Parameter names follow fla's `DeltaNet` (no output gate: `o_norm` is a plain per-head RMS norm).
"""

from __future__ import annotations

from jetnas.layers.jet import JetBlock
from jetnas.ops.backend import Backend


class DeltaNet(JetBlock):
    """DeltaNet. Args as `JetBlock`; convolutions static on q, k, v; no decay; no output gate."""

    layer_type = "deltanet"

    def __init__(self, hidden_size: int, num_heads: int = 12, head_k_dim: int = 96, head_v_dim: int = 96,
                 conv_size: int = 4, norm_eps: float = 1e-5, backend: Backend | str = "auto"):
        super().__init__(hidden_size, num_heads, head_k_dim, head_v_dim, conv_size=conv_size, norm_eps=norm_eps,
                         qk_conv="static", v_conv="static", use_decay=False, use_output_gate=False, backend=backend)
