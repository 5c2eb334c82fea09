"""Gated DeltaNet (Yang et al., 2024): the gated delta rule with static short convolutions on q, k and v.

The best of the existing linear blocks in PostNAS step 2 (paper, Table 1), and the JetBlock's starting point: it is
the JetBlock with static convolutions on q, k and v instead of a dynamic one on v. Parameter names follow fla's
`GatedDeltaNet` (`q_conv1d, k_conv1d, v_conv1d`, `o_norm`).
"""

from __future__ import annotations

from jetnas.layers.jet import JetBlock
from jetnas.ops.backend import Backend


class GatedDeltaNet(JetBlock):
    """Gated DeltaNet. Args as `JetBlock` without the conv placement, which is fixed: static on q, k, v."""

    layer_type = "gdn"

    def __init__(self, hidden_size: int, num_heads: int = 12, head_k_dim: int = 96, head_v_dim: int = 256,
                 conv_size: int = 4, norm_eps: float = 1e-5, backend: Backend | str = "auto"):
        super().__init__(hidden_size, num_heads, head_k_dim, head_v_dim, conv_size=conv_size, norm_eps=norm_eps,
                         qk_conv="static", v_conv="static", backend=backend)
