"""A hybrid of the SmolLM2 hybrid's block types (gdn, swa, attn) on our Triton kernels (interpreted on CPU): the
static prefill in chunks (a partial last one, so the conv over q|k|v also starts from cached states) and then the
static decode steps give the logits of one full forward of the same weights on the PyTorch references.

Float32, tolerance 1e-5 norm-relative: the kernels and the references do the same float32 maths in other orders
(~1e-7), which the recurrence and four layers amplify a little; a channel of q, k or v, or a gate row, read from the
wrong place shows at order 1e-1. fla's recurrences do not run on CPU (the references stand in for them).
"""

import importlib.util
import os

import pytest
import torch

from jetnas.engine import Engine
from jetnas.models import JetNemotronForCausalLM
from jetnas.ops.backend import Backend
from tests.utils import randomize_zero_init, rel_err, tiny_config


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None,
                    reason="needs Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py)")
def test_static_prefill_then_static_decode_equal_the_forward():
    # 3 heads of 16: q|k|v of 48 channels each share the conv kernel's 128-channel tiles, and g|b|a is 54 columns,
    # padded to 56
    types = ["gdn", "swa", "gdn", "attn"]
    config = tiny_config(types, head_dim=16, efficient_attention_config={
        "gdn": {"num_heads": 3, "head_k_dim": 16, "head_v_dim": 16}, "swa": {"window_size": 5}})
    torch.manual_seed(0)
    model = randomize_zero_init(JetNemotronForCausalLM(config, backend=Backend("triton", interpret=True)).eval())
    reference = JetNemotronForCausalLM(config, backend="torch").eval()
    reference.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(0)
    ids, new = torch.randint(1, 97, (2, 9), generator=g), torch.randint(1, 97, (2, 2), generator=g)
    engine = Engine(model, chunk_size=4, prefill="static")
    with torch.inference_mode():
        cache = engine.cache_for(2, 11)
        decoder = engine.decoder_for(cache)
        got = [engine.prefill(ids, cache=cache)]
        decoder.begin(torch.ones_like(ids))
        got += [decoder.step(new[:, t]).clone() for t in range(2)]
        want = reference(torch.cat([ids, new], 1)).logits[:, 8:11]
    assert engine.prefiller is not None and len(engine.prefiller.bounds) == 3
    assert rel_err(torch.stack(got, 1), want) < 1e-5
