"""`short_conv_split`: the static convolution over q|k|v with its output split by channels. The Triton kernel
(`triton_short_conv_split`, interpreted on CPU) writes each part contiguous, and its backward reads the parts'
gradients where autograd leaves them (a part without one reads as zeros, with no tensor allocated for it); the
reference returns `y.split(...)` views. Values, final states and every gradient against the reference.

Float32: both accumulate W <= 4 products in float32 in another order (and SiLU through Triton's sigmoid), so they
agree to ~1e-7 relative; TOL = 1e-5 as in test_triton_dynamic_conv.py, while a channel routed to the wrong part or
row shows at order 1. bf16: against the reference run in float32 on the same (upcast) values, BF16_TOL = 1e-2 as
test_triton_dynamic_conv.py's BF16_TOL (one bf16 rounding of each output by the kernels and one of dy by autograd,
2^-8 relative per element at most under the interpreter's truncation; measured up to 3.9e-3). Final states are
copies of inputs: exact.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from jetnas.ops.backend import Backend
from jetnas.ops.conv import short_conv_split
from tests.utils import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-5
BF16_TOL = 1e-2
TRITON = Backend("triton", interpret=DEVICE == "cpu")

pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="no CUDA device and TRITON_INTERPRET is not 1")


def run(backend, x, weight, bias, state, sizes, dys, dfinal, activation, cu=None, upcast=False):
    """Parts, final state, and the gradients of `sum <part_i, dy_i> + <final, dfinal>` (a None dy leaves that part
    out of the loss, so its gradient reaches backward as None), on copies of the inputs (float32 ones with
    `upcast`: the reference for bf16 inputs)."""
    leaves = [None if t is None else (t.detach().float() if upcast else t.detach().clone()).requires_grad_(True)
              for t in (x, weight, bias, state)]
    parts, final = short_conv_split(leaves[0], leaves[1], sizes, leaves[2], leaves[3], True, activation, cu,
                                    backend=backend)
    loss = (final.float() * dfinal).sum() + sum((p.float() * dy).sum() for p, dy in zip(parts, dys)
                                                if dy is not None)
    present = [t for t in leaves if t is not None]
    return parts, final, torch.autograd.grad(loss, present)


def check(x, weight, bias, state, sizes, dys, activation="silu", cu=None, tol=TOL):
    """The Triton path against the reference (in float32 on the same values): parts, final state, every gradient
    (in its input's dtype)."""
    N = state.shape[0] if state is not None else x.shape[0] if cu is None else cu.numel() - 1
    dfinal = torch.randn(N, x.shape[-1], weight.shape[-1] - 1, device=DEVICE)
    want = run("torch", x, weight, bias, state, sizes, dys, dfinal, activation, cu, upcast=True)
    got = run(TRITON, x, weight, bias, state, sizes, dys, dfinal, activation, cu)
    for part, ref, size in zip(got[0], want[0], sizes):
        assert part.shape == (*x.shape[:2], size) and part.is_contiguous() and part.dtype == x.dtype
        assert rel_err(part, ref) < tol
    assert torch.equal(got[1].float(), want[1])
    leaves = [t for t in (x, weight, bias, state) if t is not None]
    names = [n for n, t in zip(["dx", "dweight", "dbias", "dstate"], (x, weight, bias, state)) if t is not None]
    for name, g, ref, leaf in zip(names, got[2], want[2], leaves):
        assert g.shape == ref.shape and g.dtype == leaf.dtype, name
        assert rel_err(g, ref) < tol, (name, rel_err(g, ref))


def inputs(B, T, sizes, W=4, N=None, bias_and_state=True, dtype=torch.float32, missing=()):
    """x, weight, bias, state and the parts' output gradients (None for the indices in `missing`)."""
    D = sum(sizes)
    x = torch.randn(B, T, D, device=DEVICE).to(dtype)
    weight = torch.randn(D, W, device=DEVICE).to(dtype)
    bias = torch.randn(D, device=DEVICE).to(dtype) if bias_and_state else None
    state = torch.randn(N or B, D, W - 1, device=DEVICE).to(dtype) if bias_and_state else None
    dys = [None if i in missing else torch.randn(B, T, s, device=DEVICE) for i, s in enumerate(sizes)]
    return x, weight, bias, state, dys


def small_tiles(monkeypatch):
    """The backward in 8-row tiles (5 tokens owned each at W = 4) of 16 channels, 3 tiles a slab, the forward in
    4-token tiles: several tiles, slabs and channel blocks at tiny shapes."""
    import jetnas.ops.triton_dynamic_conv as module

    for config in ("_launch_config", "_static_fwd_config"):  # the old forward's and the new's
        monkeypatch.setattr(module, config, lambda T, D, W, on_gpu: ((4, 16), {"num_warps": 4}))
    monkeypatch.setattr(module, "_bwd_config", lambda D, W, on_gpu: (8, 16, 4))
    monkeypatch.setattr(module, "_slab_tiles", lambda *args: 3)


@pytest.mark.parametrize("activation", [None, "silu"], ids=["linear", "silu"])
@pytest.mark.parametrize("bias_and_state", [False, True], ids=["plain", "bias_and_state"])
@pytest.mark.parametrize("sizes", [(48, 48, 48), (16, 16, 40), (24, 9)], ids=["qkv", "qk-narrow-v", "two-parts"])
@pytest.mark.parametrize("T", [1, 37], ids=lambda t: f"T{t}")
def test_parts_and_gradients_match_the_reference(T, sizes, bias_and_state, activation):
    torch.manual_seed(0)
    B, D, W = 2, sum(sizes), 4
    x = torch.randn(B, T, D, device=DEVICE)
    weight = torch.randn(D, W, device=DEVICE)
    bias = torch.randn(D, device=DEVICE) if bias_and_state else None
    state = torch.randn(B, D, W - 1, device=DEVICE) if bias_and_state else None
    # the second part's gradient unused: backward must fill zeros for it
    dys = [torch.randn(B, T, s, device=DEVICE) if i != 1 else None for i, s in enumerate(sizes)]
    dfinal = torch.randn(B, D, W - 1, device=DEVICE)
    want = run("torch", x, weight, bias, state, sizes, dys, dfinal, activation)
    got = run(TRITON, x, weight, bias, state, sizes, dys, dfinal, activation)
    for part, ref, size in zip(got[0], want[0], sizes):
        assert part.shape == (B, T, size) and part.is_contiguous()
        assert rel_err(part, ref) < TOL
    assert torch.equal(got[1], want[1])
    for name, g, ref in zip(["dx", "dweight", "dbias", "dstate"] if bias_and_state else ["dx", "dweight"],
                            got[2], want[2]):
        assert g.shape == ref.shape and rel_err(g, ref) < TOL, name


# parts without a gradient: none, the first, the last, the first and last; two parts have no third to leave out (their
# "last-none" and "two-none" were the same inputs as "all" and "first-none", run twice until 2026-12-07). Every case in
# float32; bf16 (the same index arithmetic, the loads and stores of another dtype: which part, row and column is read
# does not depend on it) for the three-part case missing two gradients and the two-part one with all, not for all
# seven (~6 s each under the interpreter)
@pytest.mark.parametrize("sizes, missing, dtype", [
    ((20, 12, 9), (), torch.float32), ((20, 12, 9), (0,), torch.float32), ((20, 12, 9), (2,), torch.float32),
    ((20, 12, 9), (0, 2), torch.float32), ((7, 30), (), torch.float32), ((7, 30), (0,), torch.float32),
    ((7, 30), (1,), torch.float32), ((20, 12, 9), (0, 2), torch.bfloat16), ((7, 30), (), torch.bfloat16)],
    ids=["three-all-fp32", "three-first-none-fp32", "three-last-none-fp32", "three-two-none-fp32", "two-all-fp32",
         "two-first-none-fp32", "two-last-none-fp32", "three-two-none-bf16", "two-all-bf16"])
def test_backward_reads_parts_across_channel_blocks(monkeypatch, sizes, missing, dtype):
    # 16-channel blocks over parts of 20 | 12 | 9 (D = 41, not a multiple of the block): block [16, 32) reads two
    # parts, block [32, 48) two and its own end; 7 | 30 puts the boundary inside the first block. T = 23 is odd and
    # ends inside a tile and a slab. A part read from the wrong tensor, row or column shows at order 1.
    small_tiles(monkeypatch)
    x, weight, bias, state, dys = inputs(2, 23, sizes, dtype=dtype, missing=missing)
    check(x, weight, bias, state, sizes, dys, tol=TOL if dtype == torch.float32 else BF16_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("activation", [None, "silu"], ids=["linear", "silu"])
def test_backward_packed_sequences(monkeypatch, activation, dtype):
    # packed sequences [0, 2), [2, 2), [2, 3), [3, 13), [13, 30), [30, 50), each with its own state row: dx never
    # reads dacc past its sequence's end, and the state's gradient comes from each sequence's first W - 1 tokens
    small_tiles(monkeypatch)
    cu = torch.tensor([0, 2, 2, 3, 13, 30, 50], device=DEVICE, dtype=torch.int32)
    x, weight, bias, state, dys = inputs(1, 50, (20, 12, 9), N=6, dtype=dtype, missing=(1,))
    check(x, weight, bias, state, (20, 12, 9), dys, activation, cu, tol=TOL if dtype == torch.float32 else BF16_TOL)


def test_backward_without_dx():
    # x needs no gradient (the kernel writes no dx): the weight's, bias's and state's gradients still match
    x, weight, bias, state, dys = inputs(2, 19, (16, 16, 8), missing=(1,))
    dfinal = torch.randn(2, 40, 3, device=DEVICE)
    grads = []
    for backend in ("torch", TRITON):
        w, b, s = (t.detach().clone().requires_grad_() for t in (weight, bias, state))
        parts, final = short_conv_split(x, w, (16, 16, 8), b, s, True, backend=backend)
        loss = (final * dfinal).sum() + sum((p * dy).sum() for p, dy in zip(parts, dys) if dy is not None)
        grads.append(torch.autograd.grad(loss, (w, b, s)))
    assert all(rel_err(g, ref) < TOL for g, ref in zip(grads[1], grads[0]))


def test_backward_makes_no_cat_and_no_zeros():
    # the parts' gradients are read where they lie: no torch.cat of them, and a part whose gradient is None (here the
    # second and third: only q reaches the loss) costs no tensor of zeros, neither ours nor autograd's
    from torch.utils._python_dispatch import TorchDispatchMode

    ops = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func._schema.name.split("::")[-1])
            return func(*args, **(kwargs or {}))

    x, weight, _, _, dys = inputs(2, 21, (24, 24, 16), bias_and_state=False)
    x.requires_grad_()
    weight.requires_grad_()
    parts, _ = short_conv_split(x, weight, (24, 24, 16), backend=TRITON)
    with Record():
        dx, dweight = torch.autograd.grad(parts[0], (x, weight), dys[0])
    assert not {"cat", "zeros", "zeros_like", "new_zeros", "fill_", "zero_", "full"} & set(ops), sorted(set(ops))
    dfinal = torch.zeros(2, 64, 3, device=DEVICE)
    ref = run("torch", x, weight, None, None, (24, 24, 16), [dys[0], None, None], dfinal, "silu")
    assert rel_err(dx, ref[2][0]) < TOL and rel_err(dweight, ref[2][1]) < TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_backward_without_triton_gather(monkeypatch, packed, dtype):
    # a Triton without tl.gather (before 3.3) takes the backward through PyTorch's autograd of the same maths
    import jetnas.ops.triton_dynamic_conv as module

    monkeypatch.setattr(module, "FUSED_STATIC_BACKWARD", False)
    monkeypatch.setattr(module, "_short_conv_bwd_kernel", None)  # it must not be launched
    monkeypatch.setattr(module, "_short_conv_bwd_dstate_kernel", None)
    cu = torch.tensor([0, 2, 2, 9, 30], device=DEVICE, dtype=torch.int32) if packed else None
    x, weight, bias, state, dys = inputs(1 if packed else 2, 30, (20, 12, 9), N=4 if packed else 2, dtype=dtype,
                                         missing=(1,))
    check(x, weight, bias, state, (20, 12, 9), dys, cu=cu, tol=TOL if dtype == torch.float32 else BF16_TOL)


def test_parts_are_separate_contiguous_tensors_in_inference():
    # what the JetBlock hands fla: each part contiguous (fla copies strided inputs), no gradient bookkeeping
    x, weight = torch.randn(1, 23, 144, device=DEVICE), torch.randn(144, 4, device=DEVICE)
    with torch.inference_mode():
        parts, final = short_conv_split(x, weight, (48, 48, 48), backend=TRITON)
        ref, _ = short_conv_split(x, weight, (48, 48, 48), backend="torch")
    assert final is None and all(p.is_contiguous() for p in parts)
    assert not any(r.is_contiguous() for r in ref)  # the reference's parts are views of one output
    assert all(rel_err(p, r) < TOL for p, r in zip(parts, ref))


@pytest.mark.parametrize("sizes", [(48,), (10, 10, 10, 18), (48, 0, 0), (40, 40)], ids=str)
def test_bad_sizes_raise(sizes):
    x, weight = torch.randn(1, 5, 48, device=DEVICE), torch.randn(48, 4, device=DEVICE)
    for backend in ("torch", TRITON):
        with pytest.raises(ValueError, match="sizes"):
            short_conv_split(x, weight, sizes, backend=backend)


# `l2norm_head`: q and k (the first two parts) L2-normalised per head inside the kernel's epilogue (prompts without
# gradients). Float32: the kernel normalises its float32 activations, the reference the same values through
# `jetnas.ops.utils.l2norm` (TOL); bf16: the kernel normalises before rounding, the reference after (one more
# rounding, BF16_TOL).
@pytest.mark.parametrize("dtype, head, sizes, ragged", [
    (torch.float32, 16, (32, 32, 48), False),  # heads of 16 in a 128-channel tile; v (48 wide) left as it is
    (torch.float32, 32, (64, 64), True),  # two parts (both normalised), packed sequences with initial states
    (torch.bfloat16, 64, (64, 128, 64), False),  # q and k of different widths: every tile holds whole heads
], ids=["f32-heads16-qkv", "f32-heads32-qk-varlen", "bf16-heads64"])
def test_l2norm_heads_in_the_epilogue(dtype, head, sizes, ragged):
    torch.manual_seed(0)
    D = sum(sizes)
    T, W = 37, 4
    x = torch.randn(1 if ragged else 2, T, D, device=DEVICE).to(dtype)
    weight = torch.randn(D, W, device=DEVICE).to(dtype)
    bias = torch.randn(D, device=DEVICE).to(dtype)
    cu = torch.tensor([0, 5, 20, T], device=DEVICE) if ragged else None
    state = torch.randn(3 if ragged else 2, D, W - 1, device=DEVICE).to(dtype)
    with torch.no_grad():
        want, want_final = short_conv_split(x.float(), weight.float(), sizes, bias.float(), state.float(), True,
                                            "silu", cu, backend="torch", l2norm_head=head)
        got, final = short_conv_split(x, weight, sizes, bias, state, True, "silu", cu, backend=TRITON,
                                      l2norm_head=head)
        plain, _ = short_conv_split(x, weight, sizes, bias, state, True, "silu", cu, backend=TRITON)
    for i, (part, ref) in enumerate(zip(got, want)):
        assert part.shape == ref.shape and part.is_contiguous() and part.dtype == dtype
        assert rel_err(part, ref) < (TOL if dtype == torch.float32 else BF16_TOL), i
    norms = got[0].float().unflatten(-1, (-1, head)).norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=2e-2)
    if len(sizes) == 3:
        assert torch.equal(got[2], plain[2])  # v is not touched
    assert torch.equal(final, want_final.to(dtype))


def test_l2norm_head_is_refused_where_it_cannot_hold():
    x = torch.randn(1, 8, 96, device=DEVICE)
    weight = torch.randn(96, 4, device=DEVICE)
    with pytest.raises(ValueError, match="power of two"):
        short_conv_split(x, weight, (32, 32, 32), l2norm_head=24, backend=TRITON)
    with pytest.raises(ValueError, match="must divide the first two parts"):
        short_conv_split(x, weight, (48, 16, 32), l2norm_head=32, backend=TRITON)
    with pytest.raises(ValueError, match="no backward"):  # either backend: the reference refuses it too
        short_conv_split(x, weight.requires_grad_(True), (32, 32, 32), l2norm_head=32)


def test_the_kernels_tile_rule_for_l2norm_heads():
    """`l2norm_head_fits` is the one rule for which heads the epilogue normalises (the JetBlock asks it): a power of
    two no wider than the forward's channel tile, on a GPU 256 channels, in the interpreter D's power of two up to
    256; a head the rule refuses is refused by the kernel too."""
    from jetnas.ops.triton_dynamic_conv import l2norm_head_fits

    assert l2norm_head_fits(64, 8192, 1728, 4, on_gpu=True) and l2norm_head_fits(256, 8192, 1728, 4, on_gpu=True)
    assert not l2norm_head_fits(512, 8192, 4096, 4, on_gpu=True)      # wider than the GPU's 256-channel tile
    assert not l2norm_head_fits(48, 8192, 1728, 4, on_gpu=True)       # not a power of two
    assert l2norm_head_fits(32, 8, 96, 4, on_gpu=False) and not l2norm_head_fits(256, 8, 96, 4, on_gpu=False)
    assert not l2norm_head_fits(512, 8, 1536, 4, on_gpu=False)      # the interpreter's widest tile is 256 too
    x, weight = torch.randn(1, 8, 1536, device=DEVICE), torch.randn(1536, 4, device=DEVICE)
    with pytest.raises(ValueError, match="wider than the kernel's channel tile"):
        short_conv_split(x, weight, (512, 512, 512), l2norm_head=512, backend=TRITON)
