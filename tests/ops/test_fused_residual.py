"""The two training fusions of `Backend.fused_residual` / `Backend.fused_hidden_loss` against their references:
`jetnas.ops.triton_fused.triton_add_rms_norm` (a residual add and the RMS norm after it) against
`jetnas.ops.fused.naive_add_rms_norm`, and `jetnas.ops.triton_hidden_loss` (the relative hidden-state MSE's
per-sequence sums) inside `jetnas.train.losses.distill_terms` against its PyTorch code: values and every gradient,
the dispatch, and a tiny model's loss and gradients with the fusions on and off.

Triton runs on CUDA, else on CPU under the interpreter (tests/conftest.py). Tolerances:
- float32: kernel and reference do the same float32 math, the sums in another order and 1 / sqrt for rsqrt, so
  they agree to ~1e-7 relative (measured: at most 1.1e-7 here); 1e-6 leaves a margin while a wrong or missing term
  (a dropped gradient of the sum, a wrong factor) shows at 1e-2 or more. The residual sum itself is one float32 add,
  exactly PyTorch's: compared bit for bit.
- bfloat16: as tests/ops/test_fused.py (`close`, `TRUTH_RATIO`): one rounding step of bf16 apart on a GPU, two
  under the interpreter (it truncates float32 -> bfloat16 where PyTorch rounds), gradients within 2e-2 of the
  reference and no further from the float64 result than `TRUTH_RATIO` times the reference's own distance.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from jetnas.ops import fused
from jetnas.ops.backend import Backend
from jetnas.ops.fused import naive_add_rms_norm
from jetnas.train.losses import distill_terms
from tests.ops.test_fused import DEVICE, TRUTH_RATIO, _Spy, close, needs_triton
from tests.utils import rel_err, tiny_config

TRITON = Backend("triton", interpret=DEVICE == "cpu", fused_residual=False, fused_hidden_loss=False)
FUSED = Backend("triton", interpret=DEVICE == "cpu", fused_residual=True, fused_hidden_loss=True)


def outputs_and_grads(fn, inputs, douts):
    """`fn(*inputs)` (a tuple of outputs) and the gradients of `sum_i <out_i, douts[i]>` (a None dout: that output
    unused) w.r.t. every input that is a floating tensor."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*leaves)
    used = sum((o.double() * d.double()).sum() for o, d in zip(outs, douts) if d is not None)
    grads = torch.autograd.grad(used, leaves, allow_unused=True)  # the weight, when only the sum is used
    return list(outs), [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]


def check(fast, reference, inputs, douts, exact_first=False):
    (outs, grads), (outs_ref, grads_ref) = (outputs_and_grads(fn, inputs, douts) for fn in (fast, reference))
    if exact_first and outs[0].dtype != torch.float32:
        # a low-precision sum: under the interpreter it is truncated where PyTorch rounds, and the norm of a sum one
        # step away lands up to three steps away after its own two roundings; so the norm is held against the
        # reference's norm of the kernel's own sum (each rounding checked once; on a GPU the sums are identical)
        outs_ref[1] = reference(outs[0].detach(), torch.zeros_like(outs[0]), *inputs[2:])[1]
    for i, (o, o_ref) in enumerate(zip(outs, outs_ref)):
        assert o.dtype == o_ref.dtype and o.shape == o_ref.shape, f"output {i}"
        if exact_first and i == 0 and o.dtype == torch.float32:
            assert torch.equal(o, o_ref)  # the residual sum: one float32 add, PyTorch's
        elif o.dtype == torch.float32:
            assert rel_err(o, o_ref) < 1e-6, f"output {i}"
        else:
            close(o, o_ref)
    low = any(t.dtype != torch.float32 for t in inputs) or any(o.dtype != torch.float32 for o in outs_ref)
    if not low:
        for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
            assert g.dtype == g_ref.dtype and g.shape == g_ref.shape, f"grad {i}"
            assert rel_err(g, g_ref) < 1e-6, f"grad {i}"
        return
    _, grads_64 = outputs_and_grads(reference, [t.double() for t in inputs],
                                    [None if d is None else d.double() for d in douts])
    for i, (g, g_ref, g_64) in enumerate(zip(grads, grads_ref, grads_64)):
        assert g.dtype == g_ref.dtype and g.shape == g_ref.shape, f"grad {i}"
        assert rel_err(g, g_ref) < 2e-2, f"grad {i}"
        assert rel_err(g, g_64) <= TRUTH_RATIO * rel_err(g_ref, g_64) + 1e-6, f"grad {i}"


# -- the residual add fused into the RMS norm -------------------------------------------------------------------

ADD_CASES = [  # (x, y, weight, out_dtype): the dtypes the layers meet
    pytest.param(torch.float32, torch.float32, torch.float32, None, id="fp32"),
    pytest.param(torch.bfloat16, torch.bfloat16, torch.bfloat16, None, id="bf16"),
    # training under bf16 autocast: the float32 residual stream plus a block's bf16 output, a float32 weight, the
    # norm written straight into bf16 (what `RMSNorm.add_forward` passes)
    pytest.param(torch.float32, torch.bfloat16, torch.float32, torch.bfloat16, id="autocast"),
]
SHAPES = [pytest.param((1, 1, 576), id="T1"), pytest.param((3, 7, 100), id="B3-D100"),
          pytest.param((2, 33, 576), id="B2-T33")]


def add_inputs(shape, x_dtype, y_dtype, w_dtype, seed=0):
    torch.manual_seed(seed)
    x = (3 * torch.randn(shape, device=DEVICE)).to(x_dtype)
    y = torch.randn(shape, device=DEVICE).to(y_dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], device=DEVICE)).to(w_dtype)
    return x, y, w


@needs_triton
@pytest.mark.parametrize("x_dtype,y_dtype,w_dtype,out_dtype", ADD_CASES)
@pytest.mark.parametrize("shape", SHAPES)
def test_add_rms_norm_values_and_gradients(x_dtype, y_dtype, w_dtype, out_dtype, shape):
    from jetnas.ops.triton_fused import triton_add_rms_norm

    x, y, w = add_inputs(shape, x_dtype, y_dtype, w_dtype)
    s_dtype = torch.promote_types(x_dtype, y_dtype)
    n_dtype = out_dtype or torch.promote_types(s_dtype, w_dtype)
    douts = [torch.randn(shape, device=DEVICE).to(s_dtype), torch.randn(shape, device=DEVICE).to(n_dtype)]
    check(lambda a, b, c: triton_add_rms_norm(a, b, c, 1e-5, out_dtype),
          lambda a, b, c: naive_add_rms_norm(a, b, c, 1e-5, out_dtype), [x, y, w], douts, exact_first=True)


@needs_triton
@pytest.mark.parametrize("used", ["norm only", "sum only"])
def test_add_rms_norm_with_one_output_unused(used):
    # the final norm: its sum feeds nothing (its gradient arrives as None, not as zeros); and the other way round
    from jetnas.ops.triton_fused import triton_add_rms_norm

    x, y, w = add_inputs((2, 5, 100), torch.float32, torch.bfloat16, torch.float32, seed=1)
    dn = torch.randn(2, 5, 100, device=DEVICE).bfloat16()
    ds = torch.randn(2, 5, 100, device=DEVICE)
    douts = [None, dn] if used == "norm only" else [ds, None]
    check(lambda a, b, c: triton_add_rms_norm(a, b, c, 1e-5, torch.bfloat16),
          lambda a, b, c: naive_add_rms_norm(a, b, c, 1e-5, torch.bfloat16), [x, y, w], douts)


@needs_triton
def test_add_rms_norm_strided_inputs():
    # a block's output may be a slice of a wider tensor: rows of any stride are read where they are
    from jetnas.ops.triton_fused import triton_add_rms_norm

    torch.manual_seed(2)
    wide = torch.randn(2, 5, 300, device=DEVICE)
    x, y = wide[..., :100], wide[..., 150:250]
    w = 1 + 0.1 * torch.randn(100, device=DEVICE)
    douts = [torch.randn(2, 5, 100, device=DEVICE), torch.randn(2, 5, 100, device=DEVICE)]
    check(lambda a, b, c: triton_add_rms_norm(a, b, c, 1e-5), lambda a, b, c: naive_add_rms_norm(a, b, c, 1e-5),
          [x, y, w], douts, exact_first=True)


@needs_triton
def test_add_rms_norm_frozen_weight_and_inference(monkeypatch):
    # stage 1 freezes the norms: no dw partials; without any gradient, the forward kernel alone (no autograd node)
    import jetnas.ops.triton_fused as tf

    spy = _Spy(tf._add_rms_norm_bwd_kernel)
    monkeypatch.setattr(tf, "_add_rms_norm_bwd_kernel", spy)
    x, y, w = add_inputs((3, 4, 96), torch.float32, torch.float32, torch.float32, seed=3)
    x.requires_grad_(True)
    s, n = tf.triton_add_rms_norm(x, y, w, 1e-5)
    (s.sum() + n.square().sum()).backward()
    x_ref = x.detach().clone().requires_grad_(True)
    s_ref, n_ref = naive_add_rms_norm(x_ref, y, w, 1e-5)
    (s_ref.sum() + n_ref.square().sum()).backward()
    assert [launch["HAS_DW"] for launch in spy.launches] == [False]
    assert rel_err(x.grad, x_ref.grad) < 1e-6
    with torch.no_grad():
        s, n = tf.triton_add_rms_norm(x, y, w, 1e-5)
    assert s.grad_fn is None and n.grad_fn is None


def test_add_rms_norm_dispatch_follows_the_backend(monkeypatch):
    import jetnas.ops.triton_fused as tf

    calls = []
    monkeypatch.setattr(tf, "triton_add_rms_norm",
                        lambda *a: calls.append("add") or naive_add_rms_norm(*a))
    x, y, w = torch.randn(4, 8), torch.randn(4, 8), torch.ones(8)
    interpret = DEVICE == "cpu"
    for backend in ("torch", TRITON, Backend("triton", fused=False, fused_residual=True, interpret=interpret),
                    Backend("triton", fused_residual=True)):  # the last: a CPU tensor without the interpreter
        s, n = fused.add_rms_norm(x, y, w, 1e-6, backend)
        assert torch.equal(s, x + y) and torch.equal(n, fused.rms_norm(x + y, w, 1e-6, backend))
    assert calls == []
    if interpret:
        fused.add_rms_norm(x, y, w, 1e-6, FUSED)
        fused.add_rms_norm(x.double(), y.double(), w.double(), 1e-6, FUSED)  # float64: the reference
        fused.add_rms_norm(x.bfloat16(), y.bfloat16(), w.bfloat16(), 1e-6, FUSED, torch.float32)  # widening
        assert calls == ["add"]


def test_add_rms_norm_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"x and y must have one shape, got \[2, 8\] and \[8\]"):
        fused.add_rms_norm(torch.randn(2, 8), torch.randn(8), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match=r"weight must be \[N=8\]"):
        fused.add_rms_norm(torch.randn(2, 8), torch.randn(2, 8), torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="out_dtype"):
        fused.add_rms_norm(torch.randn(2, 8), torch.randn(2, 8), torch.ones(8), 1e-6, out_dtype=torch.int8)


# -- the relative hidden-state MSE ------------------------------------------------------------------------------


def reference_sums(hs, ht):
    dims = tuple(range(1, hs.dim()))
    ht = ht.float() if ht.dtype != torch.float64 else ht
    hs = hs.float() if hs.dtype != torch.float64 else hs
    return (hs - ht).pow(2).sum(dims), ht.pow(2).sum(dims)


@needs_triton
@pytest.mark.parametrize("hs_dtype,ht_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float32, torch.bfloat16)], ids=["fp32", "bf16", "mixed"])
@pytest.mark.parametrize("shape", [(1, 1, 7), (3, 5, 100), (2, 9, 576)], ids=["T1", "B3-D100", "B2-T9"])
def test_sequence_square_sums(hs_dtype, ht_dtype, shape):
    from jetnas.ops.triton_hidden_loss import triton_sequence_square_sums

    torch.manual_seed(4)
    ht = (2 * torch.randn(shape, device=DEVICE)).to(ht_dtype)
    hs = (ht.float() + torch.randn(shape, device=DEVICE)).to(hs_dtype).requires_grad_(True)
    sse, sst = triton_sequence_square_sums(hs, ht)
    want_sse, want_sst = reference_sums(hs.detach(), ht)
    assert sse.dtype == sst.dtype == torch.float32 and sse.shape == (shape[0],)
    assert rel_err(sse, want_sse) < 1e-6 and rel_err(sst, want_sst) < 1e-6
    assert sst.grad_fn is None  # the teacher's sum takes no gradient
    g = torch.randn(shape[0], device=DEVICE)
    (dhs,) = torch.autograd.grad((sse * g).sum(), hs)
    hs_ref = hs.detach().clone().requires_grad_(True)
    (dhs_ref,) = torch.autograd.grad((reference_sums(hs_ref, ht)[0] * g).sum(), hs_ref)
    assert dhs.dtype == hs.dtype
    if hs_dtype == torch.float32:
        assert rel_err(dhs, dhs_ref) < 1e-6
    else:  # both round the same float32 product to bf16 once
        close(dhs, dhs_ref)


@needs_triton
@pytest.mark.parametrize("hs_dtype,ht_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float32, torch.bfloat16)], ids=["fp32", "bf16", "mixed"])
@pytest.mark.parametrize("shape", [(1, 1, 7), (3, 5, 100), (2, 9, 576)], ids=["T1", "B3-D100", "B2-T9"])
def test_sequence_square_sums_into_grad(hs_dtype, ht_dtype, shape):
    """The error sum's gradient added to hs's gradient from another consumer inside the kernel (a tensor hook)
    against autograd's sum of the reference's two gradients. hs is made from a leaf x (so the hook's tensor has a
    producer, as a residual-stream state has) and also feeds `(hs * w).sum()`. float32: 1e-6 as above (the two terms
    summed in float32, rounded once instead of twice: one float32 step). bf16: the reference rounds each term and
    their sum, the kernel only the sum of the float32 terms, so each element is within one rounding of the exact
    sum, 2^-7 of its size (a truncation, as the interpreter's, stays under one bf16 step, 2^-7 relative; round to
    nearest under half that), where a rounded term would be off by a step of the term, far more than that when the
    two terms cancel."""
    from jetnas.ops.triton_hidden_loss import triton_sequence_square_sums_into_grad

    torch.manual_seed(4)
    ht = (2 * torch.randn(shape, device=DEVICE)).to(ht_dtype)
    x0 = (ht.float() + torch.randn(shape, device=DEVICE)).to(hs_dtype)
    w = torch.randn(shape, device=DEVICE).to(hs_dtype)
    g = torch.randn(shape[0], device=DEVICE)
    results = []
    for sums in (triton_sequence_square_sums_into_grad, reference_sums):
        x = x0.clone().requires_grad_(True)
        hs = x * 1.0  # a non-leaf, as a layer's output is
        sse, sst = sums(hs, ht)
        other = (hs * w).float().sum()
        (dx,) = torch.autograd.grad((sse * g).sum() + other, x)
        results.append((sse.detach(), sst, dx))
    (sse, sst, dx), (want_sse, want_sst, want_dx) = results
    assert rel_err(sse, want_sse) < 1e-6 and rel_err(sst, want_sst) < 1e-6 and sst.grad_fn is None
    assert dx.dtype == hs_dtype
    if hs_dtype == torch.float32:
        assert rel_err(dx, want_dx) < 1e-6
    else:
        exact = 2 * g.double().view(-1, *[1] * (len(shape) - 1)) * (x0.double() - ht.double()) + w.double()
        assert bool(((dx.double() - exact).abs() <= 2.0 ** -7 * exact.abs() + 1e-30).all())
        assert rel_err(dx, want_dx) < 2e-2


@needs_triton
def test_sequence_square_sums_into_grad_edges():
    """Without grad mode, for a non-contiguous hs, and when the error sum takes no gradient: the plain results; an hs
    that nothing else differentiates: backward says so (a hook cannot make a gradient from none)."""
    from jetnas.ops.triton_hidden_loss import triton_sequence_square_sums, triton_sequence_square_sums_into_grad

    torch.manual_seed(5)
    ht = torch.randn(2, 3, 8, device=DEVICE)
    x = torch.randn(2, 3, 8, device=DEVICE, requires_grad=True)
    with torch.no_grad():
        got = triton_sequence_square_sums_into_grad(x * 1.0, ht)
    want = triton_sequence_square_sums(x.detach(), ht)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    # a transposed hs: the hook would sit on a copy; the plain path runs (its gradient through autograd)
    hs = (x * 1.0).transpose(0, 1)
    sse, _ = triton_sequence_square_sums_into_grad(hs, ht.transpose(0, 1))
    (dx,) = torch.autograd.grad(sse.sum(), x)
    (dx_ref,) = torch.autograd.grad(reference_sums(x.transpose(0, 1), ht.transpose(0, 1))[0].sum(), x)
    assert rel_err(dx, dx_ref) < 1e-6
    # the error sum unused (only the teacher's sum, which has no gradient, and another consumer): hs's own gradient
    hs = x * 1.0
    _, sst = triton_sequence_square_sums_into_grad(hs, ht)
    (dx,) = torch.autograd.grad(sst.sum() + (3 * hs).sum(), x)
    assert torch.equal(dx, torch.full_like(x, 3.0))
    hs = x * 1.0
    sse, _ = triton_sequence_square_sums_into_grad(hs, ht)
    with pytest.raises(RuntimeError, match="hs got no gradient from the rest of the graph"):
        sse.sum().backward()


def layers_of(shapes_dtypes, seed):
    torch.manual_seed(seed)
    student, teacher = [], []
    for shape, s_dtype, t_dtype in shapes_dtypes:
        t = ((1 + len(teacher)) * torch.randn(shape, device=DEVICE)).to(t_dtype)
        teacher.append(t)
        student.append((t.float() + 0.3 * torch.randn(shape, device=DEVICE)).to(s_dtype))
    return student, teacher


@needs_triton
@pytest.mark.parametrize("shape", [(1, 1, 100), (3, 7, 100), (2, 16, 576)], ids=["T1", "B3-D100", "B2-T16"])
def test_distill_terms_fused_matches_the_reference(shape):
    # as the stage-1 step has them: float32 residual-stream layers, the last one the bf16 final norm's output
    student, teacher = layers_of([(shape, torch.float32, torch.float32), (shape, torch.float32, torch.float32),
                                  (shape, torch.bfloat16, torch.bfloat16)], seed=5)
    results = []
    for backend in ("torch", FUSED):
        leaves = [s.clone().requires_grad_(True) for s in student]
        hidden = distill_terms(leaves, teacher, backend=backend)["hidden"]
        results.append((hidden, torch.autograd.grad(hidden, leaves)))
    (hidden, grads), (hidden_ref, grads_ref) = results[1], results[0]
    assert rel_err(hidden, hidden_ref) < 1e-6
    for g, g_ref in zip(grads[:2], grads_ref[:2]):
        assert g.dtype == torch.float32 and rel_err(g, g_ref) < 1e-6
    assert grads[2].dtype == torch.bfloat16
    close(grads[2], grads_ref[2])


@needs_triton
def test_distill_terms_shared_matches_the_reference():
    """`shared` layers (states the rest of the graph also differentiates, as a model's layer inputs are) take the
    into-grad kernel: the same loss and gradients as the reference (float32: 1e-6); the unshared ones keep the plain
    kernel; a wrong-length `shared` is refused."""
    shapes = [((2, 16, 576), torch.float32, torch.float32)] * 2 + [((2, 16, 576), torch.bfloat16, torch.bfloat16)]
    student, teacher = layers_of(shapes, seed=8)
    results = []
    for backend, shared in (("torch", None), (FUSED, [True, False, False])):
        x = [s.clone().requires_grad_(True) for s in student]
        # the first state feeds the second (a residual stream) and the loss; the others only the loss (the last in
        # bf16, as the final norm's output)
        states = [x[0] * 1.0]
        states.append(x[1] + 0.5 * states[0])
        states.append(x[2] * 1.0)
        hidden = distill_terms(states, teacher, backend=backend, shared=shared)["hidden"]
        results.append((hidden, torch.autograd.grad(hidden, x)))
    (hidden, grads), (hidden_ref, grads_ref) = results[1], results[0]
    assert rel_err(hidden, hidden_ref) < 1e-6
    for g, g_ref in zip(grads[:2], grads_ref[:2]):
        assert g.dtype == torch.float32 and rel_err(g, g_ref) < 1e-6
    close(grads[2], grads_ref[2])
    with pytest.raises(ValueError, match=r"shared must have one entry per layer \(3\), got 2"):
        distill_terms(student, teacher, backend=FUSED, shared=[True, True])


def test_distill_terms_dispatch(monkeypatch):
    import jetnas.ops.triton_hidden_loss as th

    calls = []
    real = th.triton_sequence_square_sums
    monkeypatch.setattr(th, "triton_sequence_square_sums", lambda hs, ht: calls.append(1) or real(hs, ht))
    student, teacher = layers_of([((2, 3, 8), torch.float32, torch.float32)], seed=6)
    for backend in ("torch", TRITON, Backend("triton", fused_hidden_loss=True)):  # off; off; CPU, no interpreter
        distill_terms(student, teacher, backend=backend)
    assert calls == []
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        distill_terms(student, teacher, backend=FUSED)
        assert calls == [1]
        # a teacher that wants a gradient is left to the reference (the kernel gives it none)
        distill_terms(student, [t.requires_grad_(True) for t in teacher], backend=FUSED)
        assert calls == [1]
    with pytest.raises(ValueError, match=r"layer 0: .* got \[2, 3, 8\] and \[2, 3, 7\]"):
        distill_terms(student, [teacher[0][..., :7]])


# -- a model with both fusions on --------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_a_model_with_the_fusions_equals_the_model_without(monkeypatch, autocast):
    # the same weights, fusions off and on (both with our other kernels, interpreted): the loss (LM cross-entropy
    # plus the relative hidden MSE against fixed "teacher" states) and every parameter's gradient. In float32 they
    # agree to float32 rounding. Under bf16 autocast (float32 weights, as training runs) both carry bf16 noise (here
    # 1-3% per gradient against the float32 model); the fused one rounds its bf16 gradients at other places under
    # the interpreter (truncating), so it must be no further from the float32 model than TRUTH_RATIO times the
    # unfused one (measured: 1.8x at most)
    import jetnas.ops.triton_fused as tf
    import jetnas.ops.triton_hidden_loss as th
    from jetnas.models import JetNemotronForCausalLM
    from tests.utils import randomize_zero_init

    calls = []

    def counted(name, fn):
        return lambda *a: calls.append(name) or fn(*a)

    for module, name in ((tf, "triton_add_rms_norm"), (th, "triton_sequence_square_sums")):
        monkeypatch.setattr(module, name, counted(name, getattr(module, name)))
    torch.manual_seed(7)
    config = tiny_config(["gdn", "swa"], hidden_size=40, num_attention_heads=5,
                         num_key_value_heads=1, head_dim=8)
    reference = randomize_zero_init(JetNemotronForCausalLM(config, backend=TRITON)).to(DEVICE)
    model = JetNemotronForCausalLM(config, backend=FUSED).to(DEVICE)
    model.load_state_dict(reference.state_dict())
    models = [reference, model]
    if autocast:
        models.append(JetNemotronForCausalLM(config, backend="torch").to(DEVICE))
        models[-1].load_state_dict(reference.state_dict())
    ids = torch.randint(1, 97, (2, 6), device=DEVICE)
    with torch.no_grad():
        targets = [h + 0.5 * torch.randn_like(h) for h in reference(ids, output_hidden_states=True).hidden_states]
    losses = []
    for i, m in enumerate(models):
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast and i < 2):
            out = m(ids, labels=ids, output_hidden_states=True)
            loss = out.loss + distill_terms(out.hidden_states[1:], targets[1:], backend=m.model.backend)["hidden"]
        loss.backward()
        losses.append(loss.detach())
    # the fused model: per layer one add into the post-mixer norm and one into the next input norm (the last into
    # the final norm); one hidden-MSE kernel per layer
    n = config.num_hidden_layers
    assert calls.count("triton_add_rms_norm") == 2 * n and calls.count("triton_sequence_square_sums") == n
    params = [list(m.named_parameters()) for m in models]
    if not autocast:
        assert rel_err(losses[1], losses[0]) < 1e-6
        for (name, p_ref), (_, p) in zip(*params):
            assert rel_err(p.grad, p_ref.grad) < 1e-5, name
        return
    assert abs(losses[1] - losses[2]) <= TRUTH_RATIO * abs(losses[0] - losses[2]) + 1e-6 * losses[2]
    for (name, p_ref), (_, p), (_, p_32) in zip(*params):
        assert rel_err(p.grad, p_ref.grad) < 5e-2, name
        assert rel_err(p.grad, p_32.grad) <= TRUTH_RATIO * rel_err(p_ref.grad, p_32.grad) + 1e-6, name


@needs_triton
def test_gradient_checkpointing_keeps_the_in_layer_fusion():
    # checkpointing recomputes one layer at a time: the adds between layers stay unfused there, the one inside
    # each layer is fused; the same gradients as without checkpointing
    from jetnas.models import JetNemotronForCausalLM

    torch.manual_seed(8)
    config = tiny_config(["attn", "swa"])
    model = JetNemotronForCausalLM(config, backend=FUSED).to(DEVICE).train()
    ids = torch.randint(1, 97, (2, 6), device=DEVICE)
    model(ids, labels=ids, use_cache=False).loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model(ids, labels=ids, use_cache=False).loss.backward()
    for g, p in zip(grads, model.parameters()):
        assert rel_err(p.grad, g) < 1e-5
