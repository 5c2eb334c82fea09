"""The affine-form state pass (`jetnas.ops.triton_affine_pass`) against its contract's PyTorch reference (fla 0.6's
`chunk_gated_delta_rule_fwd_h` for equal-length sequences), on CUDA or under Triton's interpreter.

Inputs are what fla's intra-chunk kernel hands the state pass: k L2-normed, w and u its WY form of random beta and
log decays (computed here in float64 by the reference's own algebra), g log2 decays cumulated per chunk. Decays are
~1e-3 per token so that a chunk's state reaches far ahead: with fast decays every earlier state is forgotten
within a chunk and a wrong carried state could not show (2026-12-06: the segment pass's checks passed that way).

Tolerances (norm-relative):
- float32 inputs, `precise=True` (M and the state multiplied in float32: exact products under the interpreter):
  1e-5 against the float64 reference; measured ~1e-7 (float32 sums in another order).
- bf16 inputs: 2e-2 against the float64 reference of the same bf16 inputs, for both roundings. The state is
  rounded to bf16 (as fla does) for W S and, with `precise=False`, M is too (~2e-3 relative each), and h and v_new
  are stored as bf16 (~2e-3): measured 5e-3 to 7e-3 with M in bf16, 3e-3 to 5e-3 with `precise`. A chunk started
  from the wrong state is off by 0.2-0.8 here (`test_a_lost_carried_state_would_show`).
"""

import pytest
import torch

from jetnas.ops.triton_affine_pass import affine_state_pass, reference_state_pass
from tests.ops.test_segment_pass_fla_adapter import fake_fla  # noqa: F401 (the fixture)
from tests.utils import DEVICE, needs_triton, rel_err

pytestmark = needs_triton

C = 64


def wy_inputs(B, T, H, K, V, seed=0, decay=1e-3, dtype=torch.float64):
    """`(k, w, u, g, h0)` as fla's intra-chunk kernel gives them (its algebra in float64), cast to `dtype`."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    g_nat = -decay * torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    NT = -(-T // C)
    pad = NT * C - T
    kp, vp = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in (k, v))
    gp, bp = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (g_nat, beta))
    g2 = (gp.view(B, NT, C, H).cumsum(2) / torch.log(torch.tensor(2.0, dtype=torch.float64))).view(B, NT * C, H)
    kc, vc = kp.view(B, NT, C, H, K).transpose(2, 3), vp.view(B, NT, C, H, V).transpose(2, 3)
    gc, bc = g2.view(B, NT, C, H).transpose(2, 3), bp.view(B, NT, C, H).transpose(2, 3)
    lower = torch.ones(C, C, dtype=torch.bool).tril(-1)
    A = (bc[..., None] * (kc @ kc.transpose(-1, -2)) * torch.exp2(gc[..., :, None] - gc[..., None, :])) * lower
    tri = torch.eye(C, dtype=torch.float64) + A
    u = torch.linalg.solve_triangular(tri, bc[..., None] * vc, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(tri, (bc * torch.exp2(gc))[..., None] * kc, upper=False, unitriangular=True)

    def back(x):
        return x.transpose(2, 3).reshape(B, NT * C, H, -1)[:, :T]

    h0 = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    out = [back(w), back(u), g2[:, :T]]
    return ([k.to(dtype).to(DEVICE)] + [x.to(dtype).to(DEVICE) for x in out[:2]] + [out[2].float().to(DEVICE)],
            h0.float().to(DEVICE))


def f64(*xs):
    return [x.double().cpu() for x in xs]


@pytest.mark.parametrize(("B", "T", "H", "K", "V", "with_state", "block_v", "variant"), [
    (1, 200, 2, 32, 32, True, None, "loop"),     # ragged last chunk, initial state
    (2, 128, 3, 16, 48, False, 16, "loop"),      # K != V, three value blocks, batch 2
    (1, 64 * 3 + 1, 1, 64, 16, True, None, "loop"),  # a one-token last chunk
    (2, 200, 2, 32, 48, True, 16, "v-after"),   # the new values in a kernel of their own
    (2, 200, 2, 32, 48, True, 16, "pre-n"),     # and Kt^T U with M, value block by value block
])
def test_precise_float32_matches_the_reference(B, T, H, K, V, with_state, block_v, variant):
    (k, w, u, g), h0 = wy_inputs(B, T, H, K, V, dtype=torch.float32)
    h0 = h0 if with_state else None
    h, v_new, final = affine_state_pass(k, w, u, g, h0, True, precise=True, block_v=block_v, variant=variant)
    rh, rv, rf = reference_state_pass(*f64(k, w, u, g), None if h0 is None else h0.double().cpu(), True)
    assert h.shape == rh.shape and v_new.shape == rv.shape and final.dtype == torch.float32
    for ours, ref in ((h, rh), (v_new, rv), (final, rf)):
        assert rel_err(ours.double().cpu(), ref) < 1e-5


@pytest.mark.parametrize(("precise", "variant"), [(False, "loop"), (True, "loop"), (False, "pre-n")])
def test_bf16_within_rounding_of_the_float64_reference(precise, variant):
    (k, w, u, g), h0 = wy_inputs(1, 256 + 17, 2, 64, 64, seed=1, dtype=torch.bfloat16)
    h, v_new, final = affine_state_pass(k, w, u, g, h0, True, precise=precise, variant=variant)
    rh, rv, rf = reference_state_pass(*f64(k, w, u, g), h0.double().cpu(), True)
    assert h.dtype == torch.bfloat16 and v_new.dtype == torch.bfloat16
    for ours, ref in ((h, rh), (v_new, rv), (final, rf)):
        assert rel_err(ours.double().cpu(), ref) < 2e-2


def test_a_lost_carried_state_would_show():
    # the slow decays keep the state across chunks, so a chunk started from the wrong state is far outside the
    # tolerances: from a zero initial state instead of h0 the chunks' states differ by ~0.76 and the new values by
    # ~0.37 (the delta rule's own overwriting, not the decay, is what fades h0: the final state still differs 0.15)
    (k, w, u, g), h0 = wy_inputs(1, 192, 1, 32, 32, seed=2, dtype=torch.float32)
    with_h0 = reference_state_pass(*f64(k, w, u, g), h0.double().cpu(), True)
    without = reference_state_pass(*f64(k, w, u, g), None, True)
    assert rel_err(without[0], with_h0[0]) > 0.5 and rel_err(without[1], with_h0[1]) > 0.2


def test_bad_shapes_are_refused_with_the_values():
    (k, w, u, g), _ = wy_inputs(1, 64, 1, 16, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="key dim 256"):
        affine_state_pass(k.new_zeros(1, 64, 1, 256), k.new_zeros(1, 64, 1, 256), u, g)
    with pytest.raises(ValueError, match=r"w \(1, 63, 1, 16\)"):
        affine_state_pass(k, w[:, :63], u, g)
    with pytest.raises(ValueError, match="'fused'"):
        affine_state_pass(k, w, u, g, variant="fused")


@pytest.mark.skipif(DEVICE != "cpu", reason="fla's stand-ins are CPU PyTorch; on CUDA the GPU benchmark judges it")
@pytest.mark.parametrize(("B", "T", "with_state", "precise", "variant"), [(1, 200, True, False, "loop"),
                                                                          (2, 128, False, True, "pre-n")])
def test_the_fla_adapter_with_the_affine_pass_matches_the_reference(fake_fla, B, T, with_state, precise, variant):
    # `_fla.affine_chunk_gated_delta_rule` on fla 0.6's contracts (test_segment_pass_fla_adapter's stand-ins): the
    # whole op (normalisation, cumsum, WY form, the affine pass, the output) against the PyTorch chunked reference
    from jetnas.ops import _fla
    from jetnas.ops.delta_rule import naive_chunk_gated_delta_rule

    gen = torch.Generator().manual_seed(3)
    H, K, V = 2, 32, 16
    q, k = (torch.randn(B, T, H, K, generator=gen) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen)
    g = -1e-3 * torch.rand(B, T, H, generator=gen)
    beta = torch.rand(B, T, H, generator=gen)
    h0 = torch.randn(B, H, K, V, generator=gen) if with_state else None
    o, final = _fla.affine_chunk_gated_delta_rule(q, k, v, g, beta, None, h0, True, True, precise=precise,
                                                  variant=variant)
    ro, rf = naive_chunk_gated_delta_rule(q, k, v, g, beta, None, h0, True, None, True)
    assert rel_err(o, ro) < 1e-4 and rel_err(final, rf) < 1e-4


def test_the_backend_names_a_bad_affine_precision():
    from jetnas.ops.backend import Backend

    from jetnas.ops.backend import parse_affine

    assert Backend("triton").affine_state_pass == "off"  # off by default until a GPU has judged it
    assert parse_affine("bf16") == ("bf16", "loop") and parse_affine("tf32:pre-n") == ("tf32", "pre-n")
    for bad in ("fp8", "bf16:fused", "on"):
        with pytest.raises(ValueError, match=repr(bad)):
            Backend("triton", affine_state_pass=bad)
