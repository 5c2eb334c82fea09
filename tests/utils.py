"""Helpers shared by the tests."""

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, the error measure every comparison in this suite uses."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


ALL_TYPES = ["attn", "swa", "jet", "gdn", "deltanet", "gla", "retnet", "mamba2"]


def tiny_config(block_types=None, **overrides):
    """A small JetNemotronConfig (one layer per block type by default)."""
    from jetnas.models import JetNemotronConfig

    block_types = block_types or ALL_TYPES
    fields = dict(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=len(block_types),
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, block_types=block_types,
        efficient_attention_config={
            "swa": {"window_size": 5},
            "jet": {"num_heads": 2, "head_dim": 8, "expand_v": 2.0},
            "mamba2": {"num_heads": 4, "head_dim": 8, "state_size": 8},
        },
    )
    fields.update(overrides)
    return JetNemotronConfig(**fields)


def randomize_zero_init(model):
    """Give zero-initialised parts (the JetBlock generator's w2, conv biases) values so tests exercise them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "kernel_generator.w2.weight" in name or name.endswith("conv1d.bias"):
                p.normal_(std=0.05)
    return model
