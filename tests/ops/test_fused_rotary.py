"""The rotary kernel (`jetnas.ops.triton_rotary`) against its reference (`jetnas.ops.fused.naive_rotary`, i.e.
`jetnas.ops.attention.apply_rotary`): values and the gradient of x, the layouts attention hands it (q and k as views
of their projections, tables broadcast over the batch), and the dispatch by backend.

Triton runs on CUDA, else on CPU under the interpreter. Tolerances:
- float32: the kernel does the reference's float32 products and sum, one rounding each, in the same order, so they
  agree to float32 rounding (a GPU compiler may contract the product and the sum into one FMA: one float32 step);
  1e-6 relative leaves margin while a wrong sign or a swapped half shows at order 1.
- bfloat16: the kernel rounds the tables, each product and the sum to bf16 at the reference's places, so it equals,
  bit for bit, those float32 steps with bf16 roundings written out (`stepwise`), which equal the reference itself
  when they round to nearest (asserted). On a GPU the kernel rounds to nearest: identical to the reference. Triton's
  CPU interpreter truncates float32 -> bfloat16 instead: identical to `stepwise` with truncation, and (a sanity
  bound) within 2e-2 of the reference. A missing, extra or misplaced rounding breaks the equality.
"""

import pytest
import torch

from jetnas.ops import fused
from jetnas.ops.attention import rotary_cos_sin
from jetnas.ops.backend import Backend
from jetnas.ops.fused import naive_rotary
from tests.utils import DEVICE, needs_triton, rel_err

TRITON = Backend("triton", interpret=DEVICE == "cpu")

# (B, T, H, D): one token; odd lengths; 9 heads (not a power of two, SmolLM2's); a head dim of 16 and of 64
SHAPES = {"1x1x1x16": (1, 1, 1, 16), "2x63x3x16": (2, 63, 3, 16), "2x100x9x64": (2, 100, 9, 64),
          "1x7x4x8": (1, 7, 4, 8)}


def tables(B, T, D, dtype=torch.float32, offset=0):
    """The model's tables: float32 cos / sin of positions offset..offset+T-1, `[B, T, D]`."""
    positions = torch.arange(offset, offset + T, device=DEVICE).expand(B, T)
    return rotary_cos_sin(positions, D, 10000.0, dtype)


def rotary_fast(x, cos, sin):
    return fused.rotary(x, cos, sin, TRITON)


def value_and_grad(fn, x, cos, sin, dy):
    """`fn(x, cos, sin)` and its gradient for the output gradient `dy` (x's dtype, as autograd would pass it)."""
    leaf = x.detach().clone().requires_grad_(True)
    y = fn(leaf, cos, sin)
    (dx,) = torch.autograd.grad(y, [leaf], dy)
    return y, dx


def round_nearest(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def round_truncate(t: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16 by dropping the low 16 bits (what Triton's CPU interpreter does), back as float32."""
    return (t.view(torch.int32) & -65536).view(torch.float32)


def stepwise(x, cos, sin, dy, rnd):
    """The rotation and its x-gradient in float32 with a bf16 rounding `rnd` written out where the reference (and
    its autograd) rounds: the tables, each product, the sum; backward `dy * cos`, `dy * sin`, then the sum of the
    two gradient paths."""
    c, s = rnd(cos.float())[:, :, None], rnd(sin.float())[:, :, None]
    x1, x2 = x.float().chunk(2, -1)
    y = rnd(rnd(x.float() * c) + rnd(torch.cat([-x2, x1], -1) * s))
    u1, u2 = rnd(dy.float() * s).chunk(2, -1)
    dx = rnd(rnd(dy.float() * c) + torch.cat([u2, -u1], -1))
    return y.to(torch.bfloat16), dx.to(torch.bfloat16)


def check(x, cos, sin, dy):
    """Kernel against reference, values and x's gradient (module docstring: the tolerances). `dy` in x's dtype."""
    (y, dx), (y_ref, dx_ref) = (value_and_grad(fn, x, cos, sin, dy) for fn in (rotary_fast, naive_rotary))
    for got, want in ((y, y_ref), (dx, dx_ref)):
        assert got.dtype == want.dtype == x.dtype and got.shape == want.shape
    if x.dtype == torch.float32:
        assert rel_err(y, y_ref) < 1e-6 and rel_err(dx, dx_ref) < 1e-6
        return
    # the written-out steps are the reference's when they round to nearest
    y_near, dx_near = stepwise(x, cos, sin, dy, round_nearest)
    assert torch.equal(y_near, y_ref) and torch.equal(dx_near, dx_ref)
    y_dev, dx_dev = stepwise(x, cos, sin, dy, round_nearest if DEVICE == "cuda" else round_truncate)
    assert torch.equal(y, y_dev) and torch.equal(dx, dx_dev)
    assert rel_err(y, y_ref) < 2e-2 and rel_err(dx, dx_ref) < 2e-2


@needs_triton
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rotary_matches_reference(shape, dtype):
    B, T, H, D = shape
    x = torch.randn(B, T, H, D, device=DEVICE).to(dtype)
    cos, sin = tables(B, T, D, offset=5)
    check(x, cos, sin, torch.randn(B, T, H, D, device=DEVICE).to(dtype))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rotary_layouts_attention_passes(dtype):
    """q and k as `Attention.project` makes them (views of a `[B, T, H * D]` product, here the column slices of a
    wider one, as packed projections would give), a transposed x (`[B, H, T, D]` seen as `[B, T, H, D]`), tables
    of the batch's first row broadcast over it (`[1, T, D]`), and bf16 tables."""
    B, T, H, Hkv, D = 2, 37, 9, 3, 16
    packed = torch.randn(B, T, (H + 2 * Hkv) * D, device=DEVICE).to(dtype)
    q = packed[..., : H * D].view(B, T, H, D)
    k = packed[..., H * D:(H + Hkv) * D].view(B, T, Hkv, D)
    cos, sin = tables(B, T, D)
    check(q, cos, sin, torch.randn(B, T, H, D, device=DEVICE).to(dtype))
    check(k, cos, sin, torch.randn(B, T, Hkv, D, device=DEVICE).to(dtype))
    transposed = torch.randn(B, H, T, D, device=DEVICE).to(dtype).transpose(1, 2)
    check(transposed, cos, sin, torch.randn(B, T, H, D, device=DEVICE).to(dtype))
    check(q, cos[:1], sin[:1], torch.randn(B, T, H, D, device=DEVICE).to(dtype))
    check(q, *tables(B, T, D, torch.bfloat16), torch.randn(B, T, H, D, device=DEVICE).to(dtype))


@needs_triton
def test_rotary_without_grad_and_empty():
    """No gradient wanted: the forward kernel alone, same values; an empty batch passes through."""
    B, T, H, D = 2, 5, 3, 16
    x = torch.randn(B, T, H, D, device=DEVICE, requires_grad=True)
    cos, sin = tables(B, T, D)
    with torch.no_grad():
        y = rotary_fast(x, cos, sin)
    assert y.grad_fn is None and rel_err(y, naive_rotary(x.detach(), cos, sin)) < 1e-6
    empty = torch.randn(0, T, H, D, device=DEVICE)
    assert rotary_fast(empty, cos[:0], sin[:0]).shape == (0, T, H, D)


def test_rotary_dispatch():
    """The reference runs for the torch backend, float64, tables that need a gradient, and CPU tensors without
    the interpreter: bit-identical to it there."""
    B, T, H, D = 1, 4, 2, 8
    x = torch.randn(B, T, H, D)
    cos, sin = tables(B, T, D)
    cos, sin = cos.cpu(), sin.cpu()
    want = naive_rotary(x, cos, sin)
    for backend in ("torch", Backend("triton"), Backend("triton", fused=False, interpret=True)):
        assert torch.equal(fused.rotary(x, cos, sin, backend), want)
    interpreted = Backend("triton", interpret=True)
    x64 = x.double()
    assert torch.equal(fused.rotary(x64, cos.double(), sin.double(), interpreted),
                       naive_rotary(x64, cos.double(), sin.double()))
    cos_grad = cos.clone().requires_grad_(True)
    y = fused.rotary(x, cos_grad, sin, interpreted)
    y.sum().backward()
    assert cos_grad.grad is not None


@pytest.mark.parametrize("x_shape, table_shape, match", [
    ((2, 3, 4), (2, 3, 4), r"x must be \[B, T, H, D\] with an even D, got \[2, 3, 4\]"),
    ((2, 3, 4, 5), (2, 3, 5), r"even D, got \[2, 3, 4, 5\]"),
    ((2, 3, 4, 8), (3, 3, 8), r"cos must be \[B=2 or 1, T=3, D=8\] for x \[2, 3, 4, 8\], got \[3, 3, 8\]"),
    ((2, 3, 4, 8), (2, 4, 8), r"cos must be \[B=2 or 1, T=3, D=8\]"),
])
def test_rotary_bad_shapes_named(x_shape, table_shape, match):
    with pytest.raises(ValueError, match=match):
        fused.rotary(torch.randn(x_shape), torch.randn(table_shape), torch.randn(table_shape))
