"""The gated delta rule's gate kernel (`jetnas.ops.triton_gates`) against its PyTorch reference
(`jetnas.ops.gates.naive_gdn_gates`): g and beta, and the gradients of a, b, A_log and dt_bias; the dispatch; and a
JetBlock whose gates run on the kernel against one on the reference.

Triton runs on CUDA, else on CPU under the interpreter. Tolerances:
- float32 inputs: kernel and reference do the same float32 math (the kernel writes sigmoid, softplus and log1p out;
  Triton's exp and log may differ from PyTorch's in the last bits; A_log's gradient is summed as sum(dg * g) rather
  than -(sum dg * softplus) * exp(A_log), over rows in another order), so they agree to ~1e-6 relative; 1e-5 leaves
  margin, while a wrong term (a missing mask, sigmoid's derivative) shows at 1e-2 or more.
- bfloat16 a, b and beta: the rounding to bf16 happens at the same place, from float32 values that may differ in
  their last bits, and Triton's CPU interpreter truncates float32 -> bfloat16 where PyTorch rounds to nearest
  (tests/ops/test_fused.py), so beta and the bf16 gradients land within two bf16 steps (2^-6 relative) of the
  reference's. g stays float32 (1e-5).
"""

import pytest
import torch

from jetnas.ops.backend import Backend
from jetnas.ops.gates import gdn_gates, naive_gdn_gates
from tests.utils import DEVICE, needs_triton

TRITON = Backend("triton", interpret=DEVICE == "cpu")


def close(got, want, what=""):
    assert got.dtype == want.dtype and got.shape == want.shape, what
    if want.dtype == torch.float32:
        err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
        assert err < 1e-5, f"{what}: relative error {err}"
    else:
        step = want.float().abs().clamp_min(1e-3) * 2.0 ** -6
        assert bool(((got.float() - want.float()).abs() <= step).all()), what


def inputs(B, T, H, dtype, sliced, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if sliced:
        # a and b as column slices of one wider projection, as JetBlock._fused_projections makes them
        bag = torch.randn(B, T, 2 * H + 7, generator=gen) * 3
        a, b = bag[..., :H], bag[..., H : 2 * H]
    else:
        a, b = torch.randn(B, T, H, generator=gen) * 3, torch.randn(B, T, H, generator=gen) * 3
    # A in (0, 16) and dt_bias = softplus^-1 of dt in [1e-3, 0.1], as JetBlock initialises them
    A_log = torch.empty(H).uniform_(0, 16, generator=gen).log()
    dt = torch.exp(torch.rand(H, generator=gen) * (torch.tensor(0.1).log() - torch.tensor(1e-3).log())
                   + torch.tensor(1e-3).log())
    dt_bias = dt + torch.log(-torch.expm1(-dt))
    return [t.to(DEVICE) for t in (a.to(dtype), b.to(dtype), A_log, dt_bias)]


def run(fn, a, b, A_log, dt_bias, mask, beta_dtype, dg, dbeta):
    leaves = [t.detach().clone().requires_grad_(True) for t in (a, b, A_log, dt_bias)]
    g, beta = fn(*leaves, mask, beta_dtype)
    loss = (g.double() * dg).sum() + (beta.double() * dbeta).sum()
    return g, beta, torch.autograd.grad(loss, leaves)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("sliced", [False, True], ids=["contiguous", "sliced"])
@pytest.mark.parametrize("B,T,H", [(1, 1, 1), (2, 63, 5), (3, 100, 12)], ids=["1x1x1", "2x63x5", "3x100x12"])
def test_kernel_matches_reference(B, T, H, dtype, masked, sliced):
    a, b, A_log, dt_bias = inputs(B, T, H, dtype, sliced)
    mask = None
    if masked:  # left padding, as a batch of prompts of different lengths has it (an integer attention mask)
        mask = torch.ones(B, T, dtype=torch.long, device=DEVICE)
        mask[0, : T // 3] = 0
    gen = torch.Generator().manual_seed(1)
    dg = torch.randn(B, T, H, generator=gen, dtype=torch.float64).to(DEVICE)
    dbeta = torch.randn(B, T, H, generator=gen, dtype=torch.float64).to(DEVICE)

    def fused(*args):
        return gdn_gates(*args, backend=TRITON)

    g, beta, grads = run(fused, a, b, A_log, dt_bias, mask, dtype, dg, dbeta)
    g_ref, beta_ref, grads_ref = run(naive_gdn_gates, a, b, A_log, dt_bias, mask, dtype, dg, dbeta)
    assert g.grad_fn is not None and "GdnGates" in type(g.grad_fn).__name__  # the kernel ran, not the reference
    close(g, g_ref, "g")
    close(beta, beta_ref, "beta")
    if masked:
        assert bool((g[0, : T // 3] == 0).all()) and bool((beta[0, : T // 3] == 0).all())
    for name, got, want in zip(("da", "db", "dA_log", "ddt_bias"), grads, grads_ref):
        close(got, want, name)


@needs_triton
def test_softplus_extremes():
    """Above softplus's threshold (x > 20) and far below it (log1p of a tiny exp(x)), value and gradient."""
    H = 4
    a = torch.tensor([[[30.0, 20.5, -30.0, -80.0]]], device=DEVICE)
    b = torch.tensor([[[40.0, -40.0, 0.0, 1e-6]]], device=DEVICE)
    A_log, dt_bias = torch.zeros(H, device=DEVICE), torch.zeros(H, device=DEVICE)
    dg, dbeta = torch.ones(1, 1, H, dtype=torch.float64), torch.ones(1, 1, H, dtype=torch.float64)

    def fused(*args):
        return gdn_gates(*args, backend=TRITON)

    g, beta, grads = run(fused, a, b, A_log, dt_bias, None, None, dg.to(DEVICE), dbeta.to(DEVICE))
    g_ref, beta_ref, grads_ref = run(naive_gdn_gates, a, b, A_log, dt_bias, None, None, dg.to(DEVICE),
                                     dbeta.to(DEVICE))
    # elementwise relative: softplus(-80) is 1.8e-35, and it must not read as 0 (log(1 + u) would)
    assert bool(((g - g_ref).abs() <= 1e-6 * g_ref.abs()).all()), (g, g_ref)
    assert bool(((beta - beta_ref).abs() <= 1e-6 * beta_ref.abs() + 1e-30).all())
    for got, want in zip(grads, grads_ref):
        assert bool(((got - want).abs() <= 1e-5 * want.abs() + 1e-30).all()), (got, want)


def test_dispatch():
    """The reference runs for the "torch" backend, float64, and a block without decay (g None)."""
    a, b, A_log, dt_bias = inputs(2, 5, 3, torch.float32, False)
    a.requires_grad_(True)
    g, _ = gdn_gates(a, b, A_log, dt_bias, backend="torch")
    assert "GdnGates" not in type(g.grad_fn).__name__
    a64 = a.detach().double().requires_grad_(True)
    g64, beta64 = gdn_gates(a64, b.double(), A_log.double(), dt_bias.double(), backend=TRITON)
    assert g64.dtype == beta64.dtype == torch.float64 and "GdnGates" not in type(g64.grad_fn).__name__
    g0, beta0 = gdn_gates(None, b, None, None, beta_dtype=torch.bfloat16, backend=TRITON)
    assert g0 is None and beta0.dtype == torch.bfloat16
    torch.testing.assert_close(beta0, b.sigmoid().to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("bad", ["b_rank", "a_shape", "params", "mask"])
def test_shapes_are_checked(bad):
    a, b, A_log, dt_bias = inputs(2, 5, 3, torch.float32, False)
    mask = None
    if bad == "b_rank":
        b = b[0]
    elif bad == "a_shape":
        a = a[:, :4]
    elif bad == "params":
        A_log = A_log[:2]
    else:
        mask = torch.ones(2, 4, device=DEVICE)
    for backend in ("torch", TRITON):
        with pytest.raises(ValueError):
            gdn_gates(a, b, A_log, dt_bias, mask, backend=backend)


@needs_triton
@pytest.mark.parametrize("fused_projections", [False, True], ids=["separate", "fused-proj"])
def test_jetblock_gates_on_kernel(fused_projections):
    """A JetBlock (Gated DeltaNet's options) with the "triton" backend under the interpreter: its output and every
    parameter gradient equal the "torch" backend's within float32 rounding (the recurrence is the reference on
    both: fla does not run on CPU; the norms and convs take our kernels on one)."""
    if DEVICE == "cuda":
        pytest.skip("compares against the CPU reference of the recurrence")
    from jetnas.layers.jet import JetBlock

    torch.manual_seed(0)
    kwargs = {"hidden_size": 32, "num_heads": 3, "head_k_dim": 8, "head_v_dim": 16, "qk_conv": "static",
              "v_conv": "static"}
    ref = JetBlock(**kwargs, backend=Backend("torch", fused_projections=fused_projections))
    fast = JetBlock(**kwargs, backend=Backend("triton", interpret=True, fused_projections=fused_projections))
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 37, 32)
    y_ref, _ = ref(x)
    y, _ = fast(x)
    dy = torch.randn_like(y)
    (y_ref * dy).sum().backward()
    (y * dy).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
