"""Token mixers (what fills a layer's attention slot), one file per block type, and the registry keyed by layer type.

| type | block | state per sequence |
|---|---|---|
| `attn` | full causal GQA attention (`Attention`) | K/V of every token |
| `swa` | the same, sliding window (`Attention(window_size=...)`) | K/V of the last `window` tokens |
| `jet` | JetBlock: gated delta rule + dynamic conv on V | H*K*V + conv inputs |
| `gdn` | Gated DeltaNet | H*K*V + conv inputs |
| `deltanet` | DeltaNet (no decay) | H*K*V + conv inputs |
| `gla` | Gated Linear Attention | H*K*V |
| `retnet` | multi-scale retention | H*K*V |
| `mamba2` | Mamba2 (SSD) | H*N*P + conv inputs |
| `rwkv7` | RWKV-7 time mixing (generalised delta rule), no cross-layer value residual | H*K*V + last token |
"""

from __future__ import annotations

from jetnas.layers.attention import Attention
from jetnas.layers.base import KVState, RecurrentState, TokenMixer
from jetnas.layers.deltanet import DeltaNet
from jetnas.layers.gdn import GatedDeltaNet
from jetnas.layers.gla import GatedLinearAttention
from jetnas.layers.jet import JetBlock
from jetnas.layers.mamba2 import Mamba2
from jetnas.layers.retnet import MultiScaleRetention
from jetnas.layers.rwkv7 import RWKV7

LINEAR_LAYERS: dict[str, type[TokenMixer]] = {
    "jet": JetBlock,
    "gdn": GatedDeltaNet,
    "deltanet": DeltaNet,
    "gla": GatedLinearAttention,
    "retnet": MultiScaleRetention,
    "mamba2": Mamba2,
    "rwkv7": RWKV7,
}
ATTENTION_TYPES = ("attn", "swa")
LAYER_TYPES = (*ATTENTION_TYPES, *LINEAR_LAYERS)


def build_layer(layer_type: str, hidden_size: int, **kwargs) -> TokenMixer:
    """Build the token mixer for `layer_type` with the block's own keyword arguments (see each class).

    `swa` needs `window_size`; `attn` must not get one.
    """
    if layer_type == "attn":
        if kwargs.get("window_size") is not None:
            raise ValueError(f"layer type 'attn' takes no window_size (got {kwargs['window_size']}); use 'swa'")
        return Attention(hidden_size, **kwargs)
    if layer_type == "swa":
        if kwargs.get("window_size") is None:
            raise ValueError("layer type 'swa' needs window_size")
        return Attention(hidden_size, **kwargs)
    if layer_type not in LINEAR_LAYERS:
        raise ValueError(f"unknown layer type {layer_type!r}; known: {', '.join(LAYER_TYPES)}")
    return LINEAR_LAYERS[layer_type](hidden_size, **kwargs)


__all__ = [
    "Attention", "DeltaNet", "GatedDeltaNet", "GatedLinearAttention", "JetBlock", "KVState", "LAYER_TYPES",
    "LINEAR_LAYERS", "Mamba2", "MultiScaleRetention", "RWKV7", "RecurrentState", "TokenMixer", "build_layer",
]
