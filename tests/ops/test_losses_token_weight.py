"""Per-token weights of the chunked LM-head losses (`chunked_linear_kl_ce(token_weight=...)`, answer-weighted
distillation): the loss and both gradients against the full-logits references (`naive_linear_kl_ce` and
`jetnas.train.losses.logits_kl` / `lm_loss`), the eager and the Triton chunk step, with zeros among the weights and
a KL mask together; the terms returned stay the unweighted means; weights of 1 change nothing, bit for bit.

Tolerance (float32): 1e-5 relative, as for the unweighted op (tests/ops/test_losses.py): both paths take float32
softmaxes over V = 301 terms; the chunked one sums the loss chunk by chunk and forms G as w (q - p) instead of
autograd's chain through log_softmax and the weighted mean. The weights (0 to 5) multiply each row's term once in
both, so they add at most a few float32 roundings per row (~5e-7 seen, as without weights).
"""

import pytest
import torch

from jetnas.ops.losses import _chunk_terms, chunked_linear_kl_ce, naive_linear_kl_ce
from jetnas.train.losses import head_terms, lm_loss, logits_kl
from tests.ops.test_losses import chunk_arguments, loss_and_grads, make_inputs
from tests.utils import DEVICE, needs_triton, rel_err

TOL = 1e-5
CASES = ["kl-logits", "kl-hidden-t2-mask", "ce-ignore", "kl-ce-t1.5", "kl-ce-mask"]


def weighted_inputs(n, case, seed=0, device="cpu"):
    """A case of tests/ops/test_losses.py (plus "kl-ce-mask": KL + CE at T = 1.5 with a KL mask), and per-token
    weights: 4 on a third of the tokens (answers), 0 on a sixth, 1 on the rest, plus a spread in [0, 5)."""
    hidden, weight, kwargs = make_inputs(n, torch.float32, "kl-ce-t1.5" if case == "kl-ce-mask" else case,
                                         seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    if case == "kl-ce-mask":
        kwargs["mask"] = torch.rand(n, generator=g) > 0.3
    u = torch.rand(n, generator=g)
    w = torch.where(u < 1 / 3, 4.0, torch.where(u < 0.5, 0.0, 1.0))
    w[: n // 4] = torch.rand(n // 4, generator=g) * 5
    kwargs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()}
    hidden = hidden.detach().to(device).requires_grad_()
    weight = weight.detach().to(device).requires_grad_()
    return hidden, weight, kwargs, w.to(device)


def check_against_reference(step, n, chunk, case):
    hidden, weight, kwargs, w = weighted_inputs(n, case, device=DEVICE if step == "triton" else "cpu")
    ref, (ref_h, ref_w) = loss_and_grads(naive_linear_kl_ce, hidden, weight, {**kwargs, "token_weight": w},
                                         scale=3.0)
    got, (got_h, got_w) = loss_and_grads(
        lambda h, v, **kw: chunked_linear_kl_ce(h, v, chunk_size=chunk, step=step, **kw), hidden, weight,
        {**kwargs, "token_weight": w}, scale=3.0)
    assert rel_err(got.loss, ref.loss) < TOL
    assert rel_err(got_h, ref_h) < TOL and rel_err(got_w, ref_w) < TOL
    # the terms are the unweighted means, as without weights (the reference's terms ignore token_weight)
    plain = naive_linear_kl_ce(hidden, weight, **kwargs)
    for term in ("kl", "ce"):
        assert (getattr(got, term) is None) == (getattr(plain, term) is None)
        if getattr(plain, term) is not None:
            assert rel_err(getattr(got, term), getattr(plain, term)) < TOL
    # and the weights did change the loss (else the comparison above could not fail on them)
    assert rel_err(ref.loss, plain.loss) > 1e-2


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("n", [1, 63, 100], ids=lambda n: f"N{n}")
def test_torch_step_with_token_weights_matches_reference(n, case):
    if n == 1:  # one row: a weight that is not 1 (the check that the weights matter needs one)
        hidden, weight, kwargs, _ = weighted_inputs(n, case)
        w = torch.tensor([2.5])
        ref, (ref_h, ref_w) = loss_and_grads(naive_linear_kl_ce, hidden, weight, {**kwargs, "token_weight": w})
        got, (got_h, got_w) = loss_and_grads(lambda h, v, **kw: chunked_linear_kl_ce(h, v, chunk_size=64, **kw),
                                             hidden, weight, {**kwargs, "token_weight": w})
        assert rel_err(got.loss, ref.loss) < TOL and rel_err(got_h, ref_h) < TOL and rel_err(got_w, ref_w) < TOL
        return
    check_against_reference("torch", n, 16, case)


@needs_triton
@pytest.mark.parametrize("case", CASES)
def test_triton_step_with_token_weights_matches_reference(case):
    """40 rows in chunks of 16 (the interpreter is slow)."""
    check_against_reference("triton", 40, 16, case)


@needs_triton
@pytest.mark.parametrize("case", ["kl-ce-t1.5", "kl-hidden-t2-mask", "ce-ignore"])
def test_triton_chunk_step_with_weighted_scales_matches_torch_step(case):
    """One chunk, blocks of 64 over V = 301: the weighted terms, the unweighted ones and G; 1e-5 (float32)."""
    from jetnas.ops.triton_losses import triton_chunk_terms

    z, zt, labels, kl_scale, ce_scale, *rest = chunk_arguments(case, torch.float32, n=24)
    w = torch.linspace(0, 5, z.shape[0], device=z.device)
    scales = {"kl_wscale": None if kl_scale is None else kl_scale * w,
              "ce_wscale": None if ce_scale is None else ce_scale * w}
    want = _chunk_terms(z, zt, labels, kl_scale, ce_scale, *rest, True, **scales)
    got = triton_chunk_terms(z.clone(), zt, labels, kl_scale, ce_scale, *rest, True, **scales, block_v=64)
    for name in ("kl", "ce", "kl_weighted", "ce_weighted", "grad"):
        g, e = getattr(got, name), getattr(want, name)
        assert (g is None) == (e is None), name
        if e is not None:
            assert rel_err(g, e) < TOL, name
    assert want.kl_weighted is not None or want.ce_weighted is not None


@pytest.mark.parametrize("step", ["torch", pytest.param("triton", marks=needs_triton)])
def test_weights_of_one_change_nothing_bit_for_bit(step):
    """token_weight all ones against None: the loss, the terms and both gradients equal bit for bit (x * 1 is x
    in floating point, and the weighted path sums the same per-row products in the same order)."""
    device = DEVICE if step == "triton" else "cpu"
    hidden, weight, kwargs, _ = weighted_inputs(40, "kl-ce-mask", device=device)
    run = lambda h, v, **kw: chunked_linear_kl_ce(h, v, chunk_size=16, step=step, **kw)  # noqa: E731
    plain, (p_h, p_w) = loss_and_grads(run, hidden, weight, kwargs)
    ones, (o_h, o_w) = loss_and_grads(run, hidden, weight, {**kwargs, "token_weight": torch.ones(40, device=device)})
    for a, b in [(plain.loss, ones.loss), (plain.kl, ones.kl), (plain.ce, ones.ce), (p_h, o_h), (p_w, o_w)]:
        assert torch.equal(a, b)


def test_zero_weights_train_nothing_and_constant_weights_scale_the_gradient():
    """Weights 0 everywhere: loss and gradients 0, the terms unchanged; weights c everywhere: c times the unweighted
    loss and gradients (float32: 1e-6, one rounding of the scale per row)."""
    hidden, weight, kwargs, _ = weighted_inputs(50, "kl-ce-t1.5")
    run = lambda h, v, **kw: chunked_linear_kl_ce(h, v, chunk_size=16, **kw)  # noqa: E731
    plain, (p_h, p_w) = loss_and_grads(run, hidden, weight, kwargs)
    zero, (z_h, z_w) = loss_and_grads(run, hidden, weight, {**kwargs, "token_weight": torch.zeros(50)})
    assert zero.loss.item() == 0 and not z_h.any() and not z_w.any()
    assert torch.equal(zero.kl, plain.kl) and torch.equal(zero.ce, plain.ce)
    three, (t_h, t_w) = loss_and_grads(run, hidden, weight, {**kwargs, "token_weight": torch.full((50,), 3.0)})
    assert rel_err(three.loss, 3 * plain.loss) < 1e-6
    assert rel_err(t_h, 3 * p_h) < 1e-6 and rel_err(t_w, 3 * p_w) < 1e-6


@pytest.mark.parametrize("step", ["torch", pytest.param("triton", marks=needs_triton)])
def test_head_terms_with_token_weights_match_the_full_logits_losses(step):
    """`head_terms` (the stages' fused head) against `logits_kl` / `lm_loss` on full logits, `[B, T]` shaped, with
    weights 1 and 4 (answer tokens) and a T of 1.5: loss, both gradients; the metrics unweighted; 1e-5."""
    device = DEVICE if step == "triton" else "cpu"
    hidden, weight, kwargs, _ = weighted_inputs(48, "kl-ce-t1.5", device=device)
    labels = kwargs["labels"].clamp_min(0).reshape(3, 16)  # the stages' labels: no ignored ids
    t_h, t_w = kwargs["teacher_hidden"].reshape(3, 16, -1), kwargs["teacher_weight"]
    h = hidden.detach().reshape(3, 16, -1).requires_grad_()
    w = torch.where(torch.rand(3, 16, generator=torch.Generator().manual_seed(3)) < 0.2, 4.0, 1.0).to(device)

    def reference(h, v):
        z, zt = h @ v.T, t_h @ t_w.T
        loss = 0.7 * logits_kl(z, zt, 1.5, token_weight=w) + 0.4 * lm_loss(z, labels, token_weight=w)
        return loss, {"kl": logits_kl(z, zt, 1.5).detach(), "lm": lm_loss(z, labels).detach()}

    backend = "torch"
    if step == "triton":
        from jetnas.ops.backend import Backend

        backend = Backend("triton", fused=True)
    ref_loss, ref_metrics = reference(h, weight)
    ref_grads = torch.autograd.grad(ref_loss, (h, weight))
    if step == "triton" and not h.is_cuda:  # head_terms takes the Triton step on CUDA only: call it directly
        out = chunked_linear_kl_ce(h, weight, labels, teacher_hidden=t_h, teacher_weight=t_w, kl_weight=0.7,
                                   ce_weight=0.4, temperature=1.5, step="triton", token_weight=w)
        loss, metrics = out.loss, {"kl": out.kl, "lm": out.ce}
    else:
        loss, metrics = head_terms(h, weight, labels, t_h, t_w, kl_weight=0.7, lm_weight=0.4, temperature=1.5,
                                   backend=backend, token_weight=w)
    grads = torch.autograd.grad(loss, (h, weight))
    assert rel_err(loss, ref_loss) < TOL
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < TOL
    for k in ("kl", "lm"):
        assert rel_err(metrics[k], ref_metrics[k]) < TOL
    assert rel_err(ref_loss, 0.7 * ref_metrics["kl"] + 0.4 * ref_metrics["lm"]) > 1e-2


def test_token_weight_is_validated():
    hidden, weight, kwargs, _ = weighted_inputs(10, "kl-ce-t1.5")
    with pytest.raises(ValueError, match="token_weight must be floating point"):
        chunked_linear_kl_ce(hidden, weight, **kwargs, token_weight=torch.ones(10, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token_weight must have the hidden states' 10 rows, got shape \(9,\)"):
        chunked_linear_kl_ce(hidden, weight, **kwargs, token_weight=torch.ones(9))
    z = torch.randn(2, 5, 7)
    with pytest.raises(ValueError, match=r"token_weight must be a float tensor of the tokens' shape \[2, 5\]"):
        logits_kl(z, z, token_weight=torch.ones(2, 4))
    with pytest.raises(ValueError, match="lm_loss: token_weight"):
        lm_loss(z, torch.zeros(2, 5, dtype=torch.long), token_weight=torch.ones(2, 5, dtype=torch.long))
