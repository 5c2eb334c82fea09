"""The chunked LM-head losses (`jetnas.ops.losses`) against their full-logits references: values and the gradients
of the hidden states and the head weight, and the memory they do not use.

Tolerances (relative error ||a - b|| / ||b||):
- float64: 1e-12. The same algebra summed in a different order (chunks, `G W` per chunk); ~1e-15 seen.
- float32: 1e-5. Both paths take float32 softmaxes over V = 301 terms, but the chunked one sums the loss chunk by
  chunk and forms the gradient as q - p instead of autograd's chain through log_softmax; ~5e-7 seen.
- bfloat16 inputs: 1e-2 for the loss, 3e-2 for the gradients. The logits are rounded to bf16 (2^-8 relative) by the
  matmul in both paths, but a chunk's matmul need not round exactly as the full one does; G is rounded to bf16
  before its matmuls in both, but the reference rounds G * dOut/dL while the chunked path rounds G and scales
  after; and dL/dW is accumulated in float32 over chunks instead of inside one GEMM. Each is a few 2^-9 steps;
  ~4e-3 seen.

The Triton chunk step (`step="triton"`) runs on CUDA, else on CPU tensors under Triton's interpreter (conftest sets
TRITON_INTERPRET=1); its tolerances are given where it is tested. Memory is measured by counting live tensor
storage bytes (`LiveTensorBytes` below), so the check works on CPU.
"""

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from jetnas.ops.losses import (
    BYTES_PER_CHUNK_LOGIT,
    _chunk_terms,
    chunked_linear_cross_entropy,
    chunked_linear_kl,
    chunked_linear_kl_ce,
    default_chunk_size,
    naive_linear_cross_entropy,
    naive_linear_kl,
    naive_linear_kl_ce,
)
from tests.utils import DEVICE, needs_triton, rel_err

D, V = 24, 301  # V odd: no chunk or block size divides it
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
CASES = {
    # name: (what to pass besides hidden / weight; built by make_inputs)
    "kl-logits": {"teacher": "logits"},
    "kl-hidden-t2-mask": {"teacher": "hidden", "temperature": 2.0, "mask": True},
    "ce-ignore": {"labels": True},
    "kl-ce-t1.5": {"teacher": "hidden", "labels": True, "temperature": 1.5, "kl_weight": 0.7, "ce_weight": 0.4},
}


def make_inputs(n, dtype, case, d=D, v=V, seed=0):
    """hidden [n, d] and weight [v, d] (both requiring grad) and the case's keyword arguments."""
    g = torch.Generator().manual_seed(seed)
    # logits of a few units, as a trained LM head makes: softmaxes neither uniform nor one-hot
    hidden = (torch.randn(n, d, generator=g) * 1.5).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g) / d ** 0.5 * 2).to(dtype).requires_grad_()
    spec = CASES[case]
    kwargs = {k: spec[k] for k in ("temperature", "kl_weight", "ce_weight") if k in spec}
    if spec.get("teacher") == "logits":
        kwargs["teacher_logits"] = (torch.randn(n, v, generator=g) * 3).to(dtype)
    elif spec.get("teacher") == "hidden":
        # the teacher's width differs from the student's: nothing may assume they match
        kwargs["teacher_hidden"] = (torch.randn(n, d + 8, generator=g) * 1.5).to(dtype)
        kwargs["teacher_weight"] = (torch.randn(v, d + 8, generator=g) / (d + 8) ** 0.5 * 2).to(dtype)
    if spec.get("mask"):
        kwargs["mask"] = torch.rand(n, generator=g) > 0.3
    if spec.get("labels"):
        labels = torch.randint(0, v, (n,), generator=g)
        labels[torch.rand(n, generator=g) < 0.2] = -100
        kwargs["labels"] = labels
    return hidden, weight, kwargs


def loss_and_grads(fn, hidden, weight, kwargs, scale=1.0):
    out = fn(hidden, weight, **kwargs)
    # a scale != 1 exercises the backward's multiplication by dOut/dL
    grads = torch.autograd.grad(out.loss * scale, (hidden, weight))
    return out, grads


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("n", [1, 63, 100, 1000], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_matches_reference(dtype, n, case):
    hidden, weight, kwargs = make_inputs(n, dtype, case)
    ref, (ref_h, ref_w) = loss_and_grads(naive_linear_kl_ce, hidden, weight, kwargs, scale=3.0)
    got, (got_h, got_w) = loss_and_grads(
        lambda h, w, **kw: chunked_linear_kl_ce(h, w, chunk_size=64, **kw), hidden, weight, kwargs, scale=3.0)
    assert got.loss.dtype == ref.loss.dtype and got_h.dtype == dtype and got_w.dtype == dtype
    tol = TOL[dtype]
    assert rel_err(got.loss, ref.loss) < tol
    for term in ("kl", "ce"):
        assert (getattr(got, term) is None) == (getattr(ref, term) is None)
        if getattr(ref, term) is not None:
            assert rel_err(getattr(got, term), getattr(ref, term)) < tol
            assert not getattr(got, term).requires_grad
    assert rel_err(got_h, ref_h) < tol
    assert rel_err(got_w, ref_w) < tol


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_inputs_loose(case):
    hidden, weight, kwargs = make_inputs(1000, torch.bfloat16, case)
    ref, (ref_h, ref_w) = loss_and_grads(naive_linear_kl_ce, hidden, weight, kwargs)
    got, (got_h, got_w) = loss_and_grads(
        lambda h, w, **kw: chunked_linear_kl_ce(h, w, chunk_size=100, **kw), hidden, weight, kwargs)
    assert got.loss.dtype == torch.float32 and got_h.dtype == torch.bfloat16 and got_w.dtype == torch.bfloat16
    assert rel_err(got.loss, ref.loss) < 1e-2
    assert rel_err(got_h, ref_h) < 3e-2
    assert rel_err(got_w, ref_w) < 3e-2
    # and against the float64 truth of the same (bf16-valued) inputs, the reference is no closer than we are
    # by more than the bf16 slack: the chunked path is not worse than today's
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    kw64 = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
    truth, (truth_h, _) = loss_and_grads(naive_linear_kl_ce, h64, w64, kw64)
    assert rel_err(got_h, truth_h) < 2 * rel_err(ref_h, truth_h) + 1e-3
    assert rel_err(got.loss, truth.loss) < 1e-2


def test_gradcheck_float64():
    """Finite differences of the chunked function itself (chunks of 2 rows over 5), every term on."""
    hidden, weight, kwargs = make_inputs(5, torch.float64, "kl-ce-t1.5", d=3, v=7)
    kwargs["mask"] = torch.tensor([True, False, True, True, True])

    def fn(h, w):
        return chunked_linear_kl_ce(h, w, chunk_size=2, **kwargs).loss

    assert torch.autograd.gradcheck(fn, (hidden, weight), eps=1e-6, atol=1e-8, rtol=1e-6)
    # no second derivative (the stored gradients are constants): asking for one fails instead of returning zeros
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        (g,) = torch.autograd.grad(fn(hidden, weight), hidden, create_graph=True)
        torch.autograd.grad(g.sum(), hidden)


def test_wrappers_and_definitions():
    """The one-term wrappers equal the combined op; the references equal today's formulas (distill_terms' KL,
    F.cross_entropy's mean)."""
    hidden, weight, kwargs = make_inputs(50, torch.float64, "kl-ce-t1.5")
    labels, t_h, t_w, t = kwargs["labels"], kwargs["teacher_hidden"], kwargs["teacher_weight"], 1.5
    kl = chunked_linear_kl(hidden, weight, teacher_hidden=t_h, teacher_weight=t_w, temperature=t, chunk_size=8)
    ce = chunked_linear_cross_entropy(hidden, weight, labels, chunk_size=8)
    both = chunked_linear_kl_ce(hidden, weight, labels, teacher_hidden=t_h, teacher_weight=t_w, temperature=t,
                                kl_weight=0.7, ce_weight=0.4, chunk_size=8)
    assert rel_err(both.loss, 0.7 * kl + 0.4 * ce) < 1e-14
    logits, t_logits = hidden @ weight.T, t_h @ t_w.T
    log_p, log_q = F.log_softmax(t_logits / t, -1), F.log_softmax(logits / t, -1)
    distill_kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean() * t * t
    assert rel_err(naive_linear_kl(hidden, weight, teacher_hidden=t_h, teacher_weight=t_w, temperature=t),
                   distill_kl) < 1e-14
    assert rel_err(kl, distill_kl) < 1e-12
    assert rel_err(naive_linear_cross_entropy(hidden, weight, labels), F.cross_entropy(logits, labels)) < 1e-14
    assert rel_err(ce, F.cross_entropy(logits, labels)) < 1e-12


def test_leading_dims_and_no_grad():
    """[B, T, D] hidden states with [B, T] labels / mask and [B, T, V] teacher logits; without grad mode the
    values are the same and nothing is differentiable."""
    hidden, weight, kwargs = make_inputs(2 * 37, torch.float32, "kl-ce-t1.5")
    kwargs["teacher_logits"] = kwargs.pop("teacher_hidden") @ kwargs.pop("teacher_weight").T
    kwargs["mask"] = torch.rand(2 * 37) > 0.5
    shaped = {k: v.reshape(2, 37, *v.shape[1:]) if torch.is_tensor(v) else v for k, v in kwargs.items()}
    h3 = hidden.detach().reshape(2, 37, D).requires_grad_()
    flat, (flat_h, _) = loss_and_grads(lambda h, w, **kw: chunked_linear_kl_ce(h, w, chunk_size=16, **kw),
                                       hidden, weight, kwargs)
    got, (got_h, _) = loss_and_grads(lambda h, w, **kw: chunked_linear_kl_ce(h, w, chunk_size=16, **kw),
                                     h3, weight, shaped)
    assert got_h.shape == (2, 37, D)
    assert torch.equal(got.loss, flat.loss) and torch.equal(got_h.reshape(-1, D), flat_h)
    with torch.no_grad():
        quiet = chunked_linear_kl_ce(h3, weight, chunk_size=16, **shaped)
    assert not quiet.loss.requires_grad and torch.equal(quiet.loss, flat.loss)
    assert torch.equal(quiet.kl, flat.kl) and torch.equal(quiet.ce, flat.ce)


def test_gradients_flow_upstream_and_accumulate():
    """The head is a tied embedding used elsewhere too, and the hidden states come from a layer: every parameter's
    gradient equals autograd's through the reference (what stage 2 does with a tied LM head)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (2, 40), generator=g)
    labels = torch.randint(0, V, (2, 40), generator=g)
    emb = torch.nn.Parameter(torch.randn(V, D, generator=g, dtype=torch.float64) * 0.3)
    proj = torch.nn.Parameter(torch.randn(D, D, generator=g, dtype=torch.float64) / D ** 0.5)
    t_logits = torch.randn(2, 40, V, generator=g, dtype=torch.float64)
    grads = []
    for fn in (naive_linear_kl_ce, lambda *a, **k: chunked_linear_kl_ce(*a, chunk_size=7, **k)):
        hidden = torch.tanh(emb[ids] @ proj)
        out = fn(hidden, emb, labels, t_logits, kl_weight=0.5, temperature=2.0)
        (2.5 * out.loss + emb.pow(2).sum() * 1e-3).backward()
        grads.append((emb.grad.clone(), proj.grad.clone()))
        emb.grad = proj.grad = None
    assert rel_err(grads[1][0], grads[0][0]) < 1e-12
    assert rel_err(grads[1][1], grads[0][1]) < 1e-12


def test_autocast_matches_reference():
    """Under autocast the head multiplies in autocast's dtype, as F.linear does there: float32 hidden states and
    weight, bf16 logits, float32 gradients."""
    hidden, weight, kwargs = make_inputs(200, torch.float32, "kl-ce-t1.5")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, (ref_h, ref_w) = loss_and_grads(naive_linear_kl_ce, hidden, weight, kwargs)
        got, (got_h, got_w) = loss_and_grads(
            lambda h, w, **kw: chunked_linear_kl_ce(h, w, chunk_size=64, **kw), hidden, weight, kwargs)
    assert got_h.dtype == torch.float32 and got_w.dtype == torch.float32
    # bf16 logits in both (loose, as for bf16 inputs); far from the float32 result (proves autocast was honoured)
    assert rel_err(got.loss, ref.loss) < 1e-2
    assert rel_err(got_h, ref_h) < 3e-2 and rel_err(got_w, ref_w) < 3e-2
    exact = chunked_linear_kl_ce(hidden.detach(), weight.detach(), chunk_size=64, **kwargs).loss
    assert rel_err(got.loss, exact) > 1e-5


def test_empty_means_are_zero():
    hidden, weight, kwargs = make_inputs(10, torch.float64, "kl-ce-t1.5")
    kwargs["labels"] = torch.full((10,), -100)
    kwargs["mask"] = torch.zeros(10, dtype=torch.bool)
    for fn in (naive_linear_kl_ce, lambda *a, **k: chunked_linear_kl_ce(*a, chunk_size=3, **k)):
        out, (g_h, g_w) = loss_and_grads(fn, hidden, weight, kwargs)
        assert out.loss.item() == 0.0 and out.kl.item() == 0.0 and out.ce.item() == 0.0
        assert not g_h.any() and not g_w.any()


def test_teacher_gets_no_gradient():
    hidden, weight, kwargs = make_inputs(20, torch.float64, "kl-hidden-t2-mask")
    kwargs["teacher_hidden"].requires_grad_()
    for fn in (naive_linear_kl_ce, chunked_linear_kl_ce):
        fn(hidden, weight, **kwargs).loss.backward()
        assert kwargs["teacher_hidden"].grad is None


def test_frozen_head_gets_no_gradient_work():
    """Stage 1 freezes the embeddings: the op must not build dL/dW (nor need the weight to require grad)."""
    hidden, weight, kwargs = make_inputs(30, torch.float64, "kl-logits")
    weight = weight.detach()
    ref = torch.autograd.grad(naive_linear_kl_ce(hidden, weight, **kwargs).loss, hidden)[0]
    with LiveTensorBytes() as mem:
        got = torch.autograd.grad(chunked_linear_kl_ce(hidden, weight, chunk_size=8, **kwargs).loss, hidden)[0]
    assert rel_err(got, ref) < 1e-12
    assert mem.largest < V * D * 8  # no [V, D] float64 accumulator was made


@pytest.mark.parametrize("bad,match", [
    ({"weight": torch.randn(V, D + 1)}, r"weight must be \[V, D=24\]"),
    ({"labels": torch.zeros(9, dtype=torch.long)}, "labels must have the hidden states' 10 rows"),
    ({"labels": torch.zeros(10)}, "labels must be integer"),
    ({"teacher_logits": torch.randn(10, V - 1)}, r"teacher_logits must be \[..., V=301\]"),
    ({"teacher_logits": torch.randn(10, V), "teacher_hidden": torch.randn(10, D)}, "not both"),
    ({"teacher_hidden": torch.randn(10, D)}, "teacher_weight=False"),
    ({"teacher_hidden": torch.randn(10, D), "teacher_weight": torch.randn(V + 1, D)}, "V=301 rows"),
    ({"teacher_logits": torch.randn(10, V), "mask": torch.ones(10)}, "mask must be bool"),
    ({"labels": torch.zeros(10, dtype=torch.long), "mask": torch.ones(10, dtype=torch.bool)}, "no teacher"),
    ({"teacher_logits": torch.randn(10, V), "temperature": 0.0}, "temperature must be > 0, got 0.0"),
    ({"labels": torch.zeros(10, dtype=torch.long), "chunk_size": 0}, "chunk_size must be a positive int"),
    ({}, "nothing to compute"),
    ({"hidden": torch.randn(10, D, dtype=torch.float64), "labels": torch.zeros(10, dtype=torch.long)},
     "must share one dtype"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_validation(bad, match):
    args = {"hidden": torch.randn(10, D), "weight": torch.randn(V, D)}
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        chunked_linear_kl_ce(**args)


def test_default_chunk_size():
    # SmolLM2's vocabulary in 1 GiB: 1 GiB / (49152 * 32 B) = 682 rows -> 640, a multiple of 64
    assert default_chunk_size(32 * 1024, 49152) == 640
    assert default_chunk_size(32 * 1024, 49152, step="triton") == 2688  # 8 bytes per logit: 2730 -> 2688
    assert default_chunk_size(100, 49152) == 100  # never more than the rows
    assert default_chunk_size(10, 1 << 30) == 1  # at least one row
    assert default_chunk_size(10_000, 1000, budget_bytes=50 * 1000 * 32) == 50  # < 64: as is


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of tensor storage allocated by the ops run inside it and still alive, and their peak (a
    tracemalloc for tensors). Storages are freed when their last tensor goes: a finalizer on the storage object
    (PyTorch keeps one Python object per storage) subtracts them. Outputs that alias an input (views, in-place
    ops) are not new memory and are not counted; tensors made before the mode are not counted either."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.largest = 0
        self._tracked = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or ptr in inputs or ptr in self._tracked:
                continue
            self._tracked.add(ptr)
            self.live += size
            self.peak, self.largest = max(self.peak, self.live), max(self.largest, size)
            weakref.finalize(storage, self._free, ptr, size)
        return out

    def _free(self, ptr, size):
        self._tracked.discard(ptr)
        self.live -= size


def peak_bytes(fn, n, chunk_size=None):
    hidden, weight, kwargs = make_inputs(n, torch.float32, "kl-ce-t1.5", d=16, v=2048)
    with LiveTensorBytes() as mem:
        out = fn(hidden, weight, chunk_size, **kwargs)
        torch.autograd.grad(out.loss, (hidden, weight))
        del out
    return mem.peak


def test_chunked_memory_does_not_scale_with_rows_times_vocab():
    """Forward + backward of KL + CE with the teacher as hidden states + head: the reference's peak grows with
    N x V (several float32 [N, V] tensors alive); the chunked path's is the chunk's working set plus [N, D] and
    [V, D] gradients. Measured with the live-bytes counter above; N = 4096 holds 32 MiB of float32 logits."""
    v, d = 2048, 16
    full = 4096 * v * 4

    def naive(h, w, chunk, **kw):
        return naive_linear_kl_ce(h, w, **kw)

    def chunked(h, w, chunk, **kw):
        return chunked_linear_kl_ce(h, w, chunk_size=chunk, **kw)

    # the counter sees the reference's logits (so it can fail): at least two full float32 [N, V] tensors alive
    assert peak_bytes(naive, 4096) > 2 * full
    small, large = peak_bytes(chunked, 1024, 32), peak_bytes(chunked, 4096, 32)
    # the chunk's working set (BYTES_PER_CHUNK_LOGIT["torch"] per logit, default_chunk_size's estimate) plus
    # the gradients and per-row vectors: [N, D] float32 x a few, [V, D] float32 x a few
    bound = 32 * v * BYTES_PER_CHUNK_LOGIT["torch"] + 4096 * (d + 8) * 4 * 4 + v * d * 4 * 3
    assert large < bound < full // 4
    # 4x the rows costs only the per-row [N, D] and [N] tensors, not 3 x 1024 more logit rows
    assert large - small < 3072 * (d + 8) * 4 * 4
    assert large - small < 3072 * v * 4 // 16
    # the working set grows with the chunk at no more than the BYTES_PER_CHUNK_LOGIT that default_chunk_size
    # assumes (24 bytes per logit seen for KL + CE at T != 1)
    per_logit = (peak_bytes(chunked, 4096, 256) - large) / ((256 - 32) * v)
    assert 4 < per_logit <= BYTES_PER_CHUNK_LOGIT["torch"]


@pytest.mark.slow
def test_compiled_chunk_step_matches_eager():
    """`step="compile"` runs each chunk's elementwise work through torch.compile (~1 min to compile on 2 CPU cores:
    one chunk shape only). Same float32 algebra, fused: 1e-5 as for float32."""
    hidden, weight, kwargs = make_inputs(96, torch.float32, "kl-ce-t1.5")
    eager, (e_h, e_w) = loss_and_grads(lambda h, w, **kw: chunked_linear_kl_ce(h, w, chunk_size=32, **kw),
                                       hidden, weight, kwargs)
    fused, (f_h, f_w) = loss_and_grads(
        lambda h, w, **kw: chunked_linear_kl_ce(h, w, chunk_size=32, step="compile", **kw), hidden, weight, kwargs)
    assert rel_err(fused.loss, eager.loss) < 1e-5
    assert rel_err(f_h, e_h) < 1e-5 and rel_err(f_w, e_w) < 1e-5


def chunk_arguments(case, dtype, n=40):
    """The arguments of one chunk step, built from a case's inputs: student / teacher logits, labels with the
    ignored ones at 0, and the per-row scales m_i / n_kl, valid_i / n_ce."""
    hidden, weight, kwargs = make_inputs(n, dtype, case)
    z = (hidden.detach() @ weight.detach().T).to(DEVICE)
    zt = kwargs.get("teacher_logits")
    if "teacher_hidden" in kwargs:
        zt = kwargs["teacher_hidden"] @ kwargs["teacher_weight"].T
    labels = kl_scale = ce_scale = None
    if zt is not None:
        zt = zt.to(DEVICE)
        keep = kwargs.get("mask", torch.ones(n, dtype=torch.bool)).float()
        kl_scale = (keep / keep.sum()).to(DEVICE)
    if "labels" in kwargs:
        valid = kwargs["labels"] != -100
        labels = kwargs["labels"].masked_fill(~valid, 0).to(DEVICE)
        ce_scale = (valid.float() / valid.sum()).to(DEVICE)
    return z, zt, labels, kl_scale, ce_scale, kwargs.get("temperature", 1.0), kwargs.get("kl_weight", 1.0), \
        kwargs.get("ce_weight", 1.0)


@needs_triton
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_chunk_step_matches_torch_step(dtype, case):
    """The Triton step against the eager one on one chunk, in blocks of 64 over V = 301 (four full blocks and a
    45-wide tail: the online max / sum rescaling runs across blocks). Float32: 1e-5 (sums in another order; the KL
    as A / d_t + lse_s - lse_t instead of sum p (log p - log q)). bf16 logits in, bf16 G out: the float32 math
    agrees as before, then G is rounded to bf16 once in both, except that Triton's CPU interpreter truncates
    (one bf16 step, 2^-8 relative, where PyTorch rounds to nearest): 1e-2."""
    from jetnas.ops.triton_losses import triton_chunk_terms

    args = chunk_arguments(case, dtype, n=24)
    want = _chunk_terms(*args, True)
    got = triton_chunk_terms(args[0].clone(), *args[1:], True, block_v=64)
    for g, w in zip(got[:2], want[:2]):
        assert (g is None) == (w is None)
        if w is not None:
            assert rel_err(g, w) < 1e-5
    if case == "kl-ce-t1.5":  # values only (evaluation): the same terms, no G, z left alone
        z = args[0].clone()
        values = triton_chunk_terms(z, *args[1:], False, block_v=64)
        assert values[2] is None and torch.equal(z, args[0])
        assert rel_err(values[0], want[0]) < 1e-5 and rel_err(values[1], want[1]) < 1e-5
    assert got[2].dtype == dtype
    assert rel_err(got[2], want[2]) < (1e-5 if dtype == torch.float32 else 1e-2)


@needs_triton
@pytest.mark.parametrize("case", list(CASES))
def test_triton_step_matches_reference(case):
    """The whole op with step="triton" (float32; 40 rows in chunks of 16) against the full-logits reference:
    values and both gradients, 1e-5 as for the eager step."""
    hidden, weight, kwargs = make_inputs(40, torch.float32, case)
    to = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in kwargs.items()}
    hidden = hidden.detach().to(DEVICE).requires_grad_()
    weight = weight.detach().to(DEVICE).requires_grad_()
    ref, (ref_h, ref_w) = loss_and_grads(naive_linear_kl_ce, hidden, weight, to, scale=3.0)
    got, (got_h, got_w) = loss_and_grads(
        lambda h, w, **kw: chunked_linear_kl_ce(h, w, chunk_size=16, step="triton", **kw), hidden, weight, to,
        scale=3.0)
    assert rel_err(got.loss, ref.loss) < 1e-5
    assert rel_err(got_h, ref_h) < 1e-5 and rel_err(got_w, ref_w) < 1e-5


def test_triton_step_refuses_float64():
    hidden, weight, kwargs = make_inputs(4, torch.float64, "ce-ignore")
    with pytest.raises(ValueError, match="float64 inputs take step='torch'"):
        chunked_linear_kl_ce(hidden, weight, step="triton", **kwargs)
    with pytest.raises(ValueError, match="step must be one of"):
        chunked_linear_kl_ce(hidden, weight, step="cuda", **kwargs)
