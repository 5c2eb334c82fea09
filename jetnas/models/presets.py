"""Named architectures: the released Jet-Nemotron models (DESIGN.md, "Released layouts")."""

from __future__ import annotations

import torch

from jetnas.models.configuration import JetNemotronConfig


def _layout(num_layers: int, attn: tuple[int, ...], swa: tuple[int, ...]) -> list[str]:
    return ["attn" if i in attn else "swa" if i in swa else "jet" for i in range(num_layers)]


PRESETS: dict[str, dict] = {
    # Qwen2.5-1.5B dimensions; full attention in layers 14, 19; sliding window (1152) in 20, 21
    "jet-nemotron-2b": dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=True,
        bos_token_id=151643, eos_token_id=151643,
        block_types=_layout(28, attn=(14, 19), swa=(20, 21)),
        efficient_attention_config={
            "jet": {"num_heads": 12, "head_dim": 96, "expand_v": 256 / 96, "conv_size": 4,
                    "dconv_generator_reduction": 8, "norm_eps": 1e-5},
            "swa": {"window_size": 1152},
        },
    ),
    # Qwen2.5-3B dimensions; full attention in 17, 20, 32; sliding window (2048) in 5, 16, 19, 21, 22, 25, 27
    "jet-nemotron-4b": dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=2, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=True,
        bos_token_id=151643, eos_token_id=151643,
        block_types=_layout(36, attn=(17, 20, 32), swa=(5, 16, 19, 21, 22, 25, 27)),
        efficient_attention_config={
            "jet": {"num_heads": 16, "head_dim": 128, "expand_v": 2.0, "conv_size": 4,
                    "dconv_generator_reduction": 8, "norm_eps": 1e-5},
            "swa": {"window_size": 2048},
        },
    ),
}


def preset_config(name: str, **overrides) -> JetNemotronConfig:
    """The config of a named architecture (see `PRESETS`), with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return JetNemotronConfig(**{**PRESETS[name], **overrides})


def count_parameters(config: JetNemotronConfig) -> int:
    """Parameters of the model a config describes (tied embeddings counted once), without allocating weights."""
    from jetnas.models.modeling import JetNemotronForCausalLM

    with torch.device("meta"):
        model = JetNemotronForCausalLM(config)
    return sum(p.numel() for p in model.parameters())
