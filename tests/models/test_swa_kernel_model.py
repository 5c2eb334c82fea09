"""A hybrid's prefill with the Triton sliding-window kernel (`jetnas.ops.triton_attention`) against the same model
on the old path (SDPA with masks, query blocks of 2W), under no_grad: the kernel as the layer reaches it (q and k
from the fused rotary, v a view of the projections, grouped heads, a window shorter than the prompt), and the cache
contract through it (a prompt prefilled in two chunks, the second after cached keys, == one-shot).

Tolerances (norm-relative over the logits): float32 1e-5 (both paths sum float32 products in other orders: 3e-7
measured); bfloat16 2e-2 (the kernel rounds the probabilities to bf16 before P V, as FlashAttention does, where the
old CPU path does not: ~4e-3 on each swa layer's output, carried through the bf16 layers after it; measured 7e-3
between the paths, and 8.2e-3 / 8.8e-3 from each to the float32 model: the kernel is no further from float32).
"""

import importlib.util
import os

import pytest
import torch

import jetnas.ops.attention as attention_ops
from jetnas.models import JetNemotronForCausalLM
from jetnas.ops.backend import Backend
from tests.ops.test_triton_attention import kernel_calls  # noqa: F401 - a fixture: the kernel's calls
from tests.utils import DEVICE, randomize_zero_init, rel_err, tiny_config

pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not (os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton")),
    reason="needs CUDA or Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py)")

TRITON = Backend("triton", interpret=DEVICE == "cpu")


def hybrid(dtype):
    torch.manual_seed(0)
    # SmolLM2's attention geometry, shrunk: 3 query heads over 1 key/value head of 64 channels, window 5
    config = tiny_config(["swa", "gdn", "swa"], hidden_size=96, num_attention_heads=3, num_key_value_heads=1,
                         head_dim=64)
    model = randomize_zero_init(JetNemotronForCausalLM(config, backend=TRITON))
    return model.to(device=DEVICE, dtype=dtype).eval()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_prefill_logits_match_the_old_path(kernel_calls, monkeypatch, dtype, tol):
    model = hybrid(dtype)
    ids = torch.randint(1, 97, (2, 23), device=DEVICE)
    with torch.no_grad():
        new = model(ids).logits
        assert len(kernel_calls) == 2  # both swa layers, a 23-token prompt through a window of 5
        monkeypatch.setattr(attention_ops, "_swa_kernel_takes", lambda *a: False)
        old = model(ids).logits
    assert len(kernel_calls) == 2
    assert rel_err(new, old) < tol


def test_chunked_prefill_through_the_kernel_equals_one_shot(kernel_calls):
    model = hybrid(torch.float32)
    ids = torch.randint(1, 97, (2, 23), device=DEVICE)
    with torch.no_grad():
        whole = model(ids).logits
        first = model(ids[:, :15], use_cache=True)
        second = model(ids[:, 15:], past_key_values=first.past_key_values, use_cache=True)
    # the second chunk's 8 queries after the cache's 4 kept keys (window - 1) went to the kernel too
    assert len(kernel_calls) == 6 and kernel_calls[-1][1] == 8
    assert rel_err(torch.cat([first.logits, second.logits], 1), whole) < 1e-5
