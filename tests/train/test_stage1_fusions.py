"""The stage-1 loss of a tiny hybrid with the elementwise fusions of 2026-12-06 (the rotary kernel,
`jetnas.ops.fused.rotary`; the hidden loss's gradient summed into the residual stream's, `distill_terms`'
`shared`; the input gradients of the JetBlock's and the attention layers' products summed by `addmm_`,
`jetnas.ops.fused.shared_input_linear`) against the same step without them and against the PyTorch references:
loss, terms and every gradient.

The student has the stage-1 benchmark's layer kinds (GDN, full and sliding-window attention) and the teacher is all
attention, so both fusions run in the student (forward and backward) and the rotary one in the teacher. Our Triton
kernels run under the interpreter on CPU (tests/conftest.py). Tolerances:
- float32: each fusion does the reference's float32 math with the same or fewer roundings (the rotary kernel:
  identical; the two gradient sums: one float32 rounding instead of two), so the step with them equals the
  step without them to float32 rounding: 1e-6 relative on the loss and every gradient (measured: ~1e-7). Against
  the all-PyTorch step (every other fused kernel replaced by its reference too): 1e-5, as the other model-level
  fusion tests (tests/ops/test_fused_residual.py).
- bf16 autocast (how training runs): both steps carry bf16 noise against the float32 step (a few % per gradient);
  the fused one rounds at other places (fewer, and truncating under the interpreter), so it must be no further
  from the float32 step than 4x the unfused one (`TRUTH_RATIO` of tests/ops/test_fused.py on CPU).
"""

import pytest
import torch

from jetnas.ops.backend import Backend
from jetnas.train.stages import StageConfig, stage_losses
from tests.utils import DEVICE, needs_triton, randomize_zero_init, rel_err, tiny_config

FUSED = Backend("triton", interpret=DEVICE == "cpu")
TRUTH_RATIO = 2.0 if DEVICE == "cuda" else 4.0


def models(backend):
    """(teacher, student) with the given backend: the teacher all attention, the student GDN / attention / sliding
    window; the same weights for every backend (fixed seeds)."""
    from jetnas.models import JetNemotronForCausalLM

    kw = dict(hidden_size=40, num_attention_heads=5, num_key_value_heads=1, head_dim=8,
              efficient_attention_config={"swa": {"window_size": 5}})
    torch.manual_seed(1)
    teacher = JetNemotronForCausalLM(tiny_config(["attn"] * 4, **kw), backend=backend).eval().requires_grad_(False)
    torch.manual_seed(2)
    student = randomize_zero_init(JetNemotronForCausalLM(tiny_config(["gdn", "attn", "swa", "gdn"], **kw),
                                                         backend=backend))
    for name, p in student.named_parameters():  # stage 1: only the token mixers train
        p.requires_grad_(".self_attn." in name)
    return teacher.to(DEVICE), student.to(DEVICE)


def step(backend, ids, autocast=False, fusions=True, monkeypatch=None):
    """The stage-1 loss, its terms and the trainable parameters' gradients. `fusions=False` takes the three fusions
    out (the rotary reference in the attention layers, the plain hidden-loss kernel for every layer, autograd's
    adds of the JetBlock's and the attention layers' products' input gradients)."""
    import jetnas.layers.attention as attention
    import jetnas.layers.jet as jet
    import jetnas.ops.triton_hidden_loss as hidden_loss
    from jetnas.ops.fused import naive_rotary, naive_shared_input_linear

    if not fusions:
        monkeypatch.setattr(attention, "rotary", lambda x, cos, sin, backend: naive_rotary(x, cos, sin))
        monkeypatch.setattr(jet, "shared_input_linear", naive_shared_input_linear)
        monkeypatch.setattr(attention, "shared_input_linear", naive_shared_input_linear)
        monkeypatch.setattr(hidden_loss, "triton_sequence_square_sums_into_grad",
                            hidden_loss.triton_sequence_square_sums)
    teacher, student = models(backend)
    config = StageConfig(stage=1, layer_types="attn*4")
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        loss, terms = stage_losses(config, student, teacher, ids)
    loss.backward()
    if monkeypatch is not None:
        monkeypatch.undo()
    grads = {n: p.grad for n, p in student.named_parameters() if p.requires_grad}
    return loss.detach(), {k: v.detach() for k, v in terms.items()}, grads


@needs_triton
def test_stage1_loss_with_the_fusions_equals_without_float32(monkeypatch):
    import jetnas.ops.triton_hidden_loss as hidden_loss
    import jetnas.ops.triton_rotary as triton_rotary

    calls = []
    for module, name in ((triton_rotary, "triton_rotary"), (hidden_loss, "triton_sequence_square_sums_into_grad")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    ids = torch.randint(1, 97, (2, 12), device=DEVICE)
    fused = step(FUSED, ids)
    monkeypatch.undo()
    # q and k of the teacher's 4 layers and the student's 2 attention layers; the student's 4 layer inputs but the
    # first (the embeddings, not in the loss): 3 shared states, the final norm's output not
    assert calls.count("triton_rotary") == 2 * 6 and calls.count("triton_sequence_square_sums_into_grad") == 3
    unfused = step(FUSED, ids, fusions=False, monkeypatch=monkeypatch)
    reference = step("torch", ids)
    for other, tol in ((unfused, 1e-6), (reference, 1e-5)):
        assert rel_err(fused[0], other[0]) < tol
        assert set(fused[1]) == set(other[1]) == {"hidden", "kl", "lm"}
        for k in fused[1]:
            assert rel_err(fused[1][k], other[1][k]) < tol, k
        assert fused[2].keys() == other[2].keys()
        for name, g in fused[2].items():
            assert g is not None and rel_err(g, other[2][name]) < tol, name


@needs_triton
def test_stage1_loss_with_the_fusions_under_bf16_autocast(monkeypatch):
    ids = torch.randint(1, 97, (2, 12), device=DEVICE)
    fused = step(FUSED, ids, autocast=True)
    unfused = step(FUSED, ids, autocast=True, fusions=False, monkeypatch=monkeypatch)
    exact = step("torch", ids)  # float32, references: what both approximate
    assert abs(fused[0] - exact[0]) <= TRUTH_RATIO * abs(unfused[0] - exact[0]) + 1e-6 * exact[0]
    for name, g in fused[2].items():
        assert rel_err(g, exact[2][name]) <= TRUTH_RATIO * rel_err(unfused[2][name], exact[2][name]) + 1e-6, name
        assert rel_err(g, unfused[2][name]) < 5e-2, name
