"""The fused kernels (`jetnas.ops.triton_fused`) against their PyTorch references (`jetnas.ops.fused`): values and
every gradient, and the dispatch that follows a layer's backend.

Triton runs on CUDA, else on CPU under the interpreter. Tolerances:
- float32: the kernels and the references do the same float32 math in another order (row sums, 1 / sqrt for rsqrt),
  so they agree to ~1e-7 relative; 1e-5 leaves margin while a wrong term would show at order 1e-2 or more.
- bfloat16 (loose): both round at the same places, but from float32 values that differ in their last bits, so an
  element can land one bf16 step (2^-8 relative) away; and Triton's CPU interpreter truncates float32 -> bfloat16
  where PyTorch rounds to nearest (seen: silu(6.156) -> 6.125), which doubles the error of each rounding and, being
  biased, adds up over two roundings. So bf16 outputs stay within two bf16 steps of the reference, and outputs and
  gradients within 2e-2 of it (norm-relative; measured 0.4-0.8% on the interpreter) and no further from the float64
  result than `TRUTH_RATIO` times the bf16 reference's own distance (interpreter: measured up to 3.4x, SwiGLU's two
  truncations; bound 4. GPU: both round to nearest, bound 2, not yet run there). An extra or misplaced rounding
  shows on the GPU; the float32 checks catch wrong math everywhere.
"""

import pytest
import torch

from jetnas.ops import fused
from jetnas.ops.backend import Backend
from jetnas.ops.fused import naive_gated_rms_norm, naive_rms_norm, naive_silu_mul
from tests.utils import DEVICE, needs_triton, rel_err

TRUTH_RATIO = 2.0 if DEVICE == "cuda" else 4.0
# what a layer built with backend="triton" passes to its norms; `interpret` lets CPU tensors reach the kernels
TRITON = Backend("triton", interpret=DEVICE == "cpu")


def close(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype == torch.float32:
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
    elif DEVICE == "cuda":  # round-to-nearest like PyTorch: at most one bf16 step apart, almost all identical
        step = want.float().abs().clamp_min(1e-3) * 2.0 ** -7
        assert bool(((got.float() - want.float()).abs() <= step).all())
        assert (got != want).float().mean().item() < 0.02
    else:  # Triton's CPU interpreter truncates float32 -> bfloat16 (seen: silu(6.156) -> 6.125, not 6.156), and
        # the kernels round up to twice (SwiGLU: the activation, then the product): two bf16 steps
        step = want.float().abs().clamp_min(1e-3) * 2.0 ** -6
        assert bool(((got.float() - want.float()).abs() <= step).all())


def outputs_and_grads(fn, inputs, dy):
    """`fn(*inputs)` and the gradients of `<fn(*inputs), dy>` w.r.t. every input (None inputs stay None)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in inputs]
    y = fn(*leaves)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad((y.double() * dy.double()).sum(), present)
    return y, list(grads)


def check_values_and_grads(fast, reference, inputs, dy):
    """The kernel's output and gradients against the reference's (see the module docstring for the tolerances)."""
    (y, grads), (y_ref, grads_ref) = (outputs_and_grads(fn, inputs, dy) for fn in (fast, reference))
    names = ["y"] + [f"d{i}" for i, t in enumerate(inputs) if t is not None]
    if all(t is None or t.dtype == torch.float32 for t in inputs):
        close(y, y_ref)
        for name, g, g_ref in zip(names, [y, *grads], [y_ref, *grads_ref]):
            assert g.dtype == g_ref.dtype and g.shape == g_ref.shape, name
            assert rel_err(g, g_ref) < 1e-5, name
        return
    if y_ref.dtype == torch.bfloat16:
        close(y, y_ref)
    y_64, grads_64 = outputs_and_grads(reference, [None if t is None else t.double() for t in inputs], dy.double())
    for name, g, g_ref, g_64 in zip(names, [y, *grads], [y_ref, *grads_ref], [y_64, *grads_64]):
        assert g.dtype == g_ref.dtype and g.shape == g_ref.shape, name
        assert rel_err(g, g_ref) < 2e-2, name
        assert rel_err(g, g_64) <= TRUTH_RATIO * rel_err(g_ref, g_64) + 1e-6, name


# -- forward kernels (inference) --------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [96, 100])  # a power of two's worth of lanes, and a masked tail
def test_rms_norm_kernel(dtype, width):
    from jetnas.ops.triton_fused import triton_rms_norm

    torch.manual_seed(0)
    x = (torch.randn(3, 7, width, device=DEVICE) * 3).to(dtype)
    w = (1 + 0.1 * torch.randn(width, device=DEVICE)).to(dtype)
    close(triton_rms_norm(x, w, 1e-6), naive_rms_norm(x, w, 1e-6))
    # a strided input (a slice of a wider tensor) reads the right elements
    wide = torch.randn(5, 2 * width, device=DEVICE).to(dtype)
    close(triton_rms_norm(wide[:, :width], w, 1e-6), naive_rms_norm(wide[:, :width], w, 1e-6))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_before_gate,group_size,gated", [(True, None, True), (True, None, False),
                                                                (False, 16, True), (False, None, True)])
def test_gated_rms_norm_kernel(dtype, norm_before_gate, group_size, gated):
    from jetnas.ops.triton_fused import triton_gated_rms_norm

    torch.manual_seed(1)
    x = torch.randn(2, 5, 3, 48, device=DEVICE).to(dtype)
    gate = torch.randn_like(x) if gated else None
    w = (1 + 0.1 * torch.randn(48, device=DEVICE)).to(dtype)
    got = triton_gated_rms_norm(x, gate, w, 1e-5, norm_before_gate, group_size)
    close(got, naive_gated_rms_norm(x, gate, w, 1e-5, norm_before_gate, group_size))


@needs_triton
@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_gated_rms_norm_kernel_many_row_tiles(norm_before_gate):
    """300 rows of 64 channels (a GDN head's width) in tiles of 64 rows: four full tiles and a partial one, the
    rows of three weight groups crossing tile boundaries."""
    from jetnas.ops.triton_fused import triton_gated_rms_norm

    torch.manual_seed(2)
    x, gate = torch.randn(2, 100, 192, device=DEVICE).unbind(0)
    w = 1 + 0.1 * torch.randn(192, device=DEVICE)
    got = triton_gated_rms_norm(x, gate, w, 1e-5, norm_before_gate, 64)
    close(got, naive_gated_rms_norm(x, gate, w, 1e-5, norm_before_gate, 64))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_kernel(dtype):
    from jetnas.ops.triton_fused import triton_silu_mul

    torch.manual_seed(2)
    g, u = (torch.randn(3, 1000, device=DEVICE) * 4).to(dtype), torch.randn(3, 1000, device=DEVICE).to(dtype)
    close(triton_silu_mul(g, u), naive_silu_mul(g, u))


# -- values and gradients (training) ----------------------------------------------------------------------------

ROWS = [1, 63, 100]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS, ids=lambda r: f"rows{r}")
@pytest.mark.parametrize("width", [576, 1536], ids=lambda w: f"N{w}")  # SmolLM2's hidden and MLP widths
def test_rms_norm_gradients(dtype, rows, width):
    from jetnas.ops.triton_fused import triton_rms_norm

    torch.manual_seed(3)
    x = (torch.randn(rows, width, device=DEVICE) * 3).to(dtype)
    w = (1 + 0.1 * torch.randn(width, device=DEVICE)).to(dtype)
    dy = torch.randn(rows, width, device=DEVICE).to(dtype)
    check_values_and_grads(lambda a, b: triton_rms_norm(a, b, 1e-5), lambda a, b: naive_rms_norm(a, b, 1e-5),
                           [x, w], dy)


@needs_triton
def test_rms_norm_gradients_mixed_dtypes_and_strides():
    # training under bf16 autocast: a bfloat16 input against a float32 weight gives a float32 output (Llama's
    # `weight * x.to(input_dtype)`); and a [B, T, N] input that is a slice of a wider tensor
    from jetnas.ops.triton_fused import triton_rms_norm

    torch.manual_seed(4)
    x = torch.randn(3, 21, 576, device=DEVICE).bfloat16()
    w = 1 + 0.1 * torch.randn(576, device=DEVICE)
    check_values_and_grads(lambda a, b: triton_rms_norm(a, b, 1e-5), lambda a, b: naive_rms_norm(a, b, 1e-5),
                           [x, w], torch.randn(3, 21, 576, device=DEVICE))
    wide = torch.randn(2, 5, 1000, device=DEVICE)
    x = wide[..., 100:676]
    check_values_and_grads(lambda a, b: triton_rms_norm(a, b, 1e-5), lambda a, b: naive_rms_norm(a, b, 1e-5),
                           [x, w], torch.randn(2, 5, 576, device=DEVICE))


@needs_triton
@pytest.mark.parametrize("rows", [1, 100], ids=lambda r: f"rows{r}")
def test_rms_norm_into_the_autocast_dtype(rows):
    # training under bf16 autocast: the float32 residual stream normalised by a float32 weight straight into bf16
    # (out_dtype), what the next matrix product would have cast it to: the reference followed by that cast, and
    # float32 gradients (x and weight) equal to those through the cast, for a bf16 gradient from above
    from jetnas.ops.triton_fused import triton_rms_norm

    torch.manual_seed(5)
    x = torch.randn(rows, 576, device=DEVICE) * 3
    w = 1 + 0.1 * torch.randn(576, device=DEVICE)
    dy = torch.randn(rows, 576, device=DEVICE).bfloat16()
    (y, grads), (y_ref, grads_ref) = (
        outputs_and_grads(fn, [x, w], dy) for fn in (
            lambda a, b: triton_rms_norm(a, b, 1e-5, torch.bfloat16),
            lambda a, b: naive_rms_norm(a, b, 1e-5).to(torch.bfloat16)))
    close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == torch.float32 and rel_err(g, g_ref) < 1e-5
    # the op's reference path takes out_dtype the same way
    assert torch.equal(fused.rms_norm(x, w, 1e-5, out_dtype=torch.bfloat16), y_ref)
    with pytest.raises(ValueError, match="out_dtype"):
        fused.rms_norm(x, w, 1e-5, out_dtype=torch.int8)


GATED_CASES = [  # as the blocks use them
    pytest.param(True, None, True, [64], id="per-head, gated (jet, gdn, gla, retnet)"),
    pytest.param(True, None, False, [96], id="per-head, no gate (deltanet)"),
    pytest.param(False, 288, True, [576], id="mamba2, 2 groups of 288"),
    pytest.param(False, None, True, [1536], id="mamba2, one group"),
]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS, ids=lambda r: f"rows{r}")
@pytest.mark.parametrize("norm_before_gate,group_size,gated,width", GATED_CASES)
def test_gated_rms_norm_gradients(dtype, rows, norm_before_gate, group_size, gated, width):
    from jetnas.ops.triton_fused import triton_gated_rms_norm

    torch.manual_seed(5)
    # per-head norms see [B, T, H, V]: rows of heads; group norms [B, T, D]
    shape = (rows, 3, *width) if group_size is None and norm_before_gate else (rows, *width)
    x = torch.randn(shape, device=DEVICE).to(dtype)
    gate = (2 * torch.randn(shape, device=DEVICE)).to(dtype) if gated else None
    w = (1 + 0.1 * torch.randn(width[0], device=DEVICE)).to(dtype)
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    check_values_and_grads(
        lambda a, g, b: triton_gated_rms_norm(a, g, b, 1e-5, norm_before_gate, group_size),
        lambda a, g, b: naive_gated_rms_norm(a, g, b, 1e-5, norm_before_gate, group_size), [x, gate, w], dy)


@needs_triton
def test_gated_rms_norm_float32_weight_under_bf16_activations():
    # stage 1 under autocast: the block's output `o` and gate in bfloat16, the norm's weight a float32 parameter
    from jetnas.ops.triton_fused import triton_gated_rms_norm

    torch.manual_seed(6)
    x, gate = torch.randn(2, 9, 3, 64, device=DEVICE).bfloat16(), torch.randn(2, 9, 3, 64, device=DEVICE).bfloat16()
    w = 1 + 0.1 * torch.randn(64, device=DEVICE)
    check_values_and_grads(lambda a, g, b: triton_gated_rms_norm(a, g, b, 1e-5, True, None),
                           lambda a, g, b: naive_gated_rms_norm(a, g, b, 1e-5, True, None), [x, gate, w],
                           torch.randn(2, 9, 3, 64, device=DEVICE).bfloat16())


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS, ids=lambda r: f"rows{r}")
def test_silu_mul_gradients(dtype, rows):
    from jetnas.ops.triton_fused import triton_silu_mul

    torch.manual_seed(7)
    g = (4 * torch.randn(rows, 1536, device=DEVICE)).to(dtype)
    u = torch.randn(rows, 1536, device=DEVICE).to(dtype)
    check_values_and_grads(triton_silu_mul, naive_silu_mul, [g, u], torch.randn(rows, 1536, device=DEVICE).to(dtype))


class _Spy:
    """Stands in for a Triton kernel: records each launch's keyword arguments (the constexprs), then launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


@needs_triton
def test_frozen_weights_skip_the_weight_gradient(monkeypatch):
    # the MLPs' and the model's norms are frozen in PostNAS stage 1: no dw partials are computed or summed
    import jetnas.ops.triton_fused as tf

    torch.manual_seed(8)
    rms, gated = _Spy(tf._rms_norm_bwd_kernel), _Spy(tf._gated_rms_norm_bwd_tile_kernel)
    monkeypatch.setattr(tf, "_rms_norm_bwd_kernel", rms)
    monkeypatch.setattr(tf, "_gated_rms_norm_bwd_tile_kernel", gated)  # the default launch (`_gated_bwd_tile`)
    x = torch.randn(10, 96, device=DEVICE, requires_grad=True)
    w = 1 + 0.1 * torch.randn(96, device=DEVICE)  # frozen
    tf.triton_rms_norm(x, w, 1e-5).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    naive_rms_norm(x_ref, w, 1e-5).square().sum().backward()
    assert [launch["HAS_DW"] for launch in rms.launches] == [False]
    assert rel_err(x.grad, x_ref.grad) < 1e-5
    gate = torch.randn(10, 96, device=DEVICE, requires_grad=True)
    tf.triton_gated_rms_norm(x, gate, w, 1e-5, True, None).sum().backward()
    w.requires_grad_(True)
    tf.triton_gated_rms_norm(x, gate, w, 1e-5, True, None).sum().backward()
    assert [launch["HAS_DW"] for launch in gated.launches] == [False, True]
    # no gradient needed at all: the forward-only kernel, no autograd node
    with torch.no_grad():
        assert tf.triton_rms_norm(x, w, 1e-5).grad_fn is None


# -- dispatch ---------------------------------------------------------------------------------------------------


def test_dispatch_follows_the_backend(monkeypatch):
    # the kernels run exactly when the caller's backend says so: a fused "triton" backend and a tensor it takes
    import jetnas.ops.triton_fused as tf

    calls = []
    monkeypatch.setattr(tf, "triton_silu_mul", lambda g, u: calls.append("silu") or naive_silu_mul(g, u))
    monkeypatch.setattr(tf, "triton_rms_norm",
                        lambda x, w, eps, out_dtype=None: calls.append("rms") or naive_rms_norm(x, w, eps, out_dtype))
    g, u = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8)
    w = torch.ones(8)
    for backend in ("torch", Backend("torch"), Backend("triton"), Backend("triton", fused=False, interpret=True)):
        # the reference (the last two: a CPU tensor without the interpreter; fusion switched off)
        fused.silu_mul(g, u, backend).sum().backward()
        fused.rms_norm(u, w, 1e-6, backend)
    assert calls == [] and g.grad is not None
    interpreted = Backend("triton", interpret=True)
    fused.silu_mul(g, u, interpreted)
    fused.rms_norm(u, w, 1e-6, interpreted)
    fused.rms_norm(u.double(), w.double(), 1e-6, interpreted)  # float64: the reference
    assert calls == ["silu", "rms"]


def test_bad_shapes_are_named():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"weight must be \[N=8\]"):
        fused.rms_norm(x, torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match=r"gate must have x's shape \[2, 8\]"):
        fused.gated_rms_norm(x, torch.randn(2, 4), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="group_size must divide D=8"):
        fused.gated_rms_norm(x, None, torch.ones(8), 1e-6, group_size=3)


@needs_triton
@pytest.mark.parametrize("tile", ["rows", "auto", (4, 1, 3), (8, 2, 1), (2, 1, 64)], ids=str)
@pytest.mark.parametrize("group_size,width,norm_before_gate", [(None, 64, True), (32, 64, False), (None, 48, True),
                                                              (16, 48, False)],
                         ids=["G1", "G2-gate-first", "G1-L48", "G3-gate-first"])
def test_gated_rms_norm_backward_launches_agree(tile, group_size, width, norm_before_gate):
    """Every launch of the backward (the one-row kernel, the tile kernel with any rows per tile, warps and
    program count, the default) gives the reference's gradients; the gate read from a column slice of a wider
    product, as the blocks pass it; G = 3 is no power of two: explicit tiles refuse it, "auto" takes the rows."""
    from jetnas.ops.triton_fused import _gated_rms_norm_bwd

    torch.manual_seed(7)
    rows, heads = 37, 3
    x = torch.randn(rows, heads, width, device=DEVICE)
    wide = 2 * torch.randn(rows, heads * width * 3, device=DEVICE)
    gate = wide[:, heads * width: 2 * heads * width].view(rows, heads, width)
    w = 1 + 0.1 * torch.randn(width, device=DEVICE)
    dy = torch.randn_like(x)
    L = group_size or width
    if isinstance(tile, tuple) and tile[0] % (width // L):
        with pytest.raises(ValueError, match="multiple of G=3"):
            _gated_rms_norm_bwd(x, gate, w, dy, 1e-5, norm_before_gate, group_size, True, tile=tile)
        return
    dx, dgate, dw = _gated_rms_norm_bwd(x, gate, w, dy, 1e-5, norm_before_gate, group_size, True, tile=tile)
    xr, gr, wr = (t.detach().clone().requires_grad_() for t in (x, gate, w))
    naive_gated_rms_norm(xr, gr, wr, 1e-5, norm_before_gate, group_size).backward(dy)
    for got, ref in ((dx, xr.grad), (dgate, gr.grad), (dw, wr.grad)):
        assert rel_err(got, ref) < 1e-5
