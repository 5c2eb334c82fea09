"""`autocast_copy`: a frozen teacher's forward copy with its Linear weights cast once (issue 16)."""

import pytest
import torch
from torch import nn

from jetnas.train.frozen import autocast_copy
from tests.train.test_trainer import tiny_model


def test_the_copy_equals_the_original_under_autocast_and_shares_all_but_the_linear_weights():
    model = tiny_model(block_types=("attn", "attn")).requires_grad_(False).eval()
    fast = autocast_copy(model, torch.bfloat16)
    ids = torch.randint(0, 64, (2, 24))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(input_ids=ids, output_hidden_states=True)
        out = fast(input_ids=ids, output_hidden_states=True)
    # autocast rounds a float32 weight to bfloat16 exactly as the one-time cast did: equal, not merely close
    assert torch.equal(out.logits, ref.logits)
    assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, ref.hidden_states))
    original = dict(model.named_parameters(remove_duplicate=False))
    linears = {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, nn.Linear)
               for p, _ in m.named_parameters(recurse=False)}
    head = {f"lm_head.{p}" for p, _ in model.get_output_embeddings().named_parameters()}
    cast = 0
    for name, p in fast.named_parameters(remove_duplicate=False):
        if name in linears - head:
            assert p.dtype == torch.bfloat16 and not p.requires_grad, name
            cast += 1
        else:  # embeddings, norms, the (tied) head: the very same tensors, no copy
            assert p is original[name], name
    assert cast >= 8  # q, k, v, o, gate, up, down of two layers at least
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the original is untouched


def test_refuses_a_model_with_trainable_parameters_and_a_bad_dtype():
    model = tiny_model(block_types=("attn",))
    with pytest.raises(ValueError, match="require grad"):
        autocast_copy(model)
    with pytest.raises(ValueError, match="floating dtype"):
        autocast_copy(model.requires_grad_(False), torch.int8)
