"""A Gated DeltaNet prefill under the "triton" backend (our kernels interpreted on CPU) copies no activation: the
one conv over q|k|v writes each contiguous (fla's kernels copy strided inputs first), the gated norm reads the gate
where the fused product left it, and every matrix product has a 16-byte-aligned output row (the g|b|a product of
9 heads was 594 columns wide: cuBLAS's 2-element-aligned kernels, 0.97 of 17.7 GPU-ms of the SmolLM2 hybrid's 8K
prefill on an H100). Values of the fused path against the separate projections are tests/layers/
test_fused_projections.py's; here, the layouts. benchmarks/prefill_copies.py counts the whole model's copies.
"""

import importlib.util
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from jetnas.layers import build_layer, jet
from jetnas.layers.jet import _aligned
from jetnas.ops.backend import Backend
from jetnas.ops.delta_rule import naive_chunk_gated_delta_rule
from tests.utils import rel_err

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="needs Triton's interpreter (TRITON_INTERPRET=1, "
                                                               "set by tests/conftest.py)")
COPIES = {"copy_", "_to_copy", "clone", "contiguous", "cat", "reshape", "index", "constant_pad_nd"}
T = 37  # no width of the layer is 37: a copy of an activation is a copy with a 37 in its shape


class Copies(TorchDispatchMode):
    """Activation copies (outputs with T in their shape; composite ops only when they made new storage) and the
    matrix products' output row strides."""

    def __init__(self):
        super().__init__()
        self.copies, self.strides = [], []

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name.split("::")[-1]
        if name in ("linear", "mm", "addmm", "matmul"):
            self.strides.append(out.stride(-2))
        elif name in COPIES and isinstance(out, torch.Tensor) and T in out.shape:
            src = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if src is None or out.untyped_storage().data_ptr() != src.untyped_storage().data_ptr():
                self.copies.append((name, tuple(out.shape)))
        return out


def test_aligned_pads_the_product_to_multiples_of_16_with_rows_it_never_reads():
    g, b, a = torch.randn(72, 16), torch.randn(9, 16), torch.randn(9, 16)
    weights, widths = _aligned([g, b, a])
    assert widths == [72, 9, 9, 6] and weights[3].data_ptr() == g.data_ptr()  # g's first rows, a view
    assert _aligned([g, g]) == ([g, g], [72, 72])  # already aligned: nothing added
    small, widths = _aligned([b[:2], a[:2]])  # no weight has the 12 rows: zeros
    assert widths == [2, 2, 12] and torch.equal(small[2], torch.zeros(12, 16))
    # the model's widths: SmolLM2's 9 heads of 64 (594 -> 608) and Jet-Nemotron-2B's 12 of 256 (3,096 -> 3,104)
    for heads, dv in ((9, 64), (12, 256)):
        assert sum(_aligned([torch.empty(heads * dv, 1), torch.empty(heads, 1), torch.empty(heads, 1)])[1]) % 16 == 0
    # the padded product's gradients are the unpadded one's: the extra columns are never read. Equal up to float64
    # summation order (MKL blocks the [96, 16] and [90, 16] weight-gradient products differently on some CPUs: 4.4e-16
    # seen on an AMD EPYC box, bit-equal on others), so 1e-13 relative, far below any column read by mistake (~1)
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    ws = [w.double().requires_grad_(True) for w in (g, b, a)]
    grads = []
    for pad in (False, True):
        cat = torch.cat(_aligned(ws)[0] if pad else ws)
        y = torch.nn.functional.linear(x, cat)[:, :90]
        grads.append(torch.autograd.grad((y * torch.linspace(-1, 1, 90, dtype=torch.float64)).sum(), [x, *ws]))
    assert all(rel_err(p, q) < 1e-13 for p, q in zip(*grads))


@needs_interpreter
@pytest.mark.parametrize("cached", [False, True], ids=["no-cache", "cache"])
def test_gdn_prefill_copies_no_activation(monkeypatch, cached):
    # SmolLM2's hybrid has 9 heads: H*V + 2H = 9 * 8 + 18 = 90 columns, not a multiple of 8
    layer = build_layer("gdn", 32, backend=Backend("triton", interpret=True), num_heads=9, head_k_dim=8,
                        head_v_dim=8).eval()
    seen = {}

    def recurrence(q, k, v, g, beta, **kwargs):
        # what fla would receive; the reference stands in for it outside the count, its output contiguous as fla's
        seen.update(q=q, k=k, v=v, g=g, beta=beta)
        with counter.paused():
            o, final = naive_chunk_gated_delta_rule(q, k, v, g, beta, **{n: kwargs[n] for n in (
                "initial_state", "output_final_state", "use_qk_l2norm")})
            return o.contiguous(), final

    monkeypatch.setattr(jet, "chunk_gated_delta_rule", recurrence)
    counter = PausableCopies()
    x = torch.randn(1, T, 32)
    with torch.inference_mode(), counter:
        layer(x, use_cache=cached)
    assert all(seen[n].is_contiguous() for n in "qkv"), {n: seen[n].stride() for n in "qkv"}
    assert counter.copies == []
    assert counter.strides and all(s % 8 == 0 for s in counter.strides), counter.strides


class PausableCopies(Copies):
    def __init__(self):
        super().__init__()
        self.off = 0

    def paused(self):
        mode = self

        class _Pause:
            def __enter__(self):
                mode.off += 1

            def __exit__(self, *exc):
                mode.off -= 1

        return _Pause()

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        if self.off:
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types_, args, kwargs)
