"""Micro-batching (gradient accumulation) of the stage-1 step, issue 16: a step of two micro-batches does two
micro-batches' work and no more (aten ops and host reads counted on CPU: the H100's 2.25x slowdown was its host
launching twice a pass's kernels, not anything done per micro-batch beyond that), `teacher_per_step` runs the
teacher once per step, and every variant gives the whole batch's gradients."""

import copy

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from jetnas.models import JetNemotronForCausalLM
from jetnas.ops.backend import Backend
from jetnas.train.data import TokenStream
from jetnas.train.losses import distill_terms
from jetnas.train.stages import StageConfig, make_stage_loss, set_trainable, stage_losses, teacher_outputs
from jetnas.train.trainer import TrainConfig, Trainer
from tests.ops.test_fused import DEVICE, needs_triton
from tests.utils import rel_err, tiny_config

BATCH, SEQ = 4, 16
FUSED = Backend("triton", interpret=DEVICE == "cpu", fused_hidden_loss=True)
#: metadata-only ops (no kernel on a GPU): not counted
FREE = {"detach", "alias", "lift_fresh", "_unsafe_view", "view", "_reshape_alias", "t", "transpose", "expand", "slice",
        "select", "unsqueeze", "squeeze", "permute", "split", "split_with_sizes", "unbind", "chunk", "narrow",
        "as_strided", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "prim_device"}
#: what makes the host wait for the device: Tensor methods that read values, and ops whose output shape depends
#: on the values (as benchmarks/launch_count.py counts them)
SYNC_METHODS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"}
SYNC_OPS = {"nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive"}


class Count(TorchDispatchMode):
    """Counts the aten ops that launch something (`ops`) and the host reads (`syncs`) while active."""

    def __init__(self):
        super().__init__()
        self.ops = self.syncs = 0
        counter = self

        class Reads(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if getattr(func, "__name__", "") in SYNC_METHODS and args and isinstance(args[0], torch.Tensor):
                    counter.syncs += 1
                return func(*args, **(kwargs or {}))

        self.reads = Reads()

    def __enter__(self):
        self.reads.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self.reads.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.syncs += 1
        if name not in FREE and name != "_local_scalar_dense" and not func.is_view:
            self.ops += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    teacher = JetNemotronForCausalLM(tiny_config(["attn"] * 4)).eval().requires_grad_(False)
    student = JetNemotronForCausalLM(tiny_config(["attn", "gdn", "swa", "gdn"]))
    set_trainable(student, 1)  # stage 1: only the token mixers train
    return teacher, student


def trainer_for(models, tmp_path, micro, teacher_per_step=False, precision="fp32"):
    teacher, student = models
    config = StageConfig(stage=1, layer_types="attn*4", batch_size=BATCH, micro_batch_size=micro, seq_len=SEQ,
                         teacher_per_step=teacher_per_step, precision=precision, out_dir=str(tmp_path / "run"))
    stream = TokenStream(np.random.default_rng(0).integers(1, 97, 4096).astype(np.uint16), "random")
    model = copy.deepcopy(student)
    trainer = Trainer(config.train_config(), model, make_stage_loss(config, teacher), stream)
    # the optimizer the trainer builds on CUDA (fused AdamW); on CPU it builds the per-parameter loop, which reads
    # each parameter's step count on the host
    trainer.optimizer = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]}
                                           for g in trainer.optimizer.param_groups], lr=1e-3, fused=True)
    return trainer, model


def step_gradients(trainer, model, step=0):
    """The gradients the trainer's step `step` hands its optimizer, and the step's metrics."""
    grads = []
    trainer.optimizer.step = lambda: grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                                                  if p.grad is not None})
    metrics = trainer._train_step(step)
    return grads[0], metrics


@pytest.mark.parametrize("teacher_per_step", [False, True], ids=["teacher-per-micro-batch", "teacher-per-step"])
def test_micro_batches_give_the_whole_batch_gradients(models, tmp_path, teacher_per_step):
    """Two micro-batches of two sequences against one of four, float32: the stage-1 terms are means of
    per-sequence (hidden MSE) or per-token (KL) terms, so the accumulated gradients are the whole batch's up to
    float32 summation order (1e-5 relative)."""
    teacher = models[0]
    calls = []
    hook = teacher.register_forward_pre_hook(lambda m, a, k: calls.append(k["input_ids"].shape[0]), with_kwargs=True)
    try:
        want, want_metrics = step_gradients(*trainer_for(models, tmp_path / "whole", None))
        calls.clear()
        got, got_metrics = step_gradients(*trainer_for(models, tmp_path / "micro", 2, teacher_per_step))
    finally:
        hook.remove()
    # the teacher runs once on the whole batch per step, or once per micro-batch
    assert calls == ([BATCH] if teacher_per_step else [2, 2])
    assert want.keys() == got.keys() and want and all(".self_attn." in n for n in want)
    for name in want:
        assert rel_err(got[name], want[name]) < 1e-5, name
    for term in ("loss", "hidden", "kl"):
        assert abs(got_metrics[term] - want_metrics[term]) <= 1e-5 * abs(want_metrics[term]), term


def count_step(trainer, step, monkeypatch):
    """The counts of `trainer._train_step(step)`, and `per_step`: the ops of its once-a-step part (gradient
    clipping, the optimizer, the host read of the metrics), left out of `ops`."""
    import jetnas.train.trainer as trainer_module

    counter = Count()
    counter.per_step = 0

    def once(fn):
        def call(*args, **kwargs):
            before = counter.ops
            try:
                return fn(*args, **kwargs)
            finally:
                counter.per_step += counter.ops - before
                counter.ops = before

        return call

    with monkeypatch.context() as m:
        m.setattr(torch.nn.utils, "clip_grad_norm_", once(torch.nn.utils.clip_grad_norm_))
        m.setattr(trainer_module, "_read_scalars", once(trainer_module._read_scalars))
        m.setattr(trainer.optimizer, "step", once(trainer.optimizer.step))
        with counter:
            trainer._train_step(step)
    return counter


def test_a_step_of_two_micro_batches_launches_twice_a_whole_batch_step_and_no_more(models, tmp_path, monkeypatch):
    """bf16 autocast, as on a GPU (so the weight casts are counted). A step of two micro-batches runs a whole
    pass's ops twice (forward and backward), plus the division of each micro-batch's loss by 2 (forward and
    backward) and one foreach add of the second micro-batch's gradients into the first's (autograd's own
    accumulation was one add per trainable parameter); the clip, the optimizer and the host read run once a step,
    as for the whole batch. Anything else done per micro-batch (a teacher forward or a cast repeated, a cache
    rebuilt, a host read per micro-batch) breaks the bound. With teacher_per_step the step saves exactly one
    teacher forward's ops."""
    teacher, student = models
    counts = {}
    for name, micro, per_step in (("whole", None, False), ("micro", 2, False), ("micro-teacher-per-step", 2, True)):
        trainer, _ = trainer_for(models, tmp_path / name, micro, per_step, precision="bf16")
        trainer._train_step(0)  # the optimizer's state, first calls
        counts[name] = count_step(trainer, 1, monkeypatch)
    ids = torch.randint(1, 97, (2, SEQ))
    teacher_forward = Count()
    with teacher_forward, torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        teacher(input_ids=ids, use_cache=False, output_hidden_states=True, logits_to_keep=1)
    whole, micro, per_step = counts["whole"], counts["micro"], counts["micro-teacher-per-step"]
    assert whole.syncs == micro.syncs == per_step.syncs == 1  # the trainer's one read of the step's metrics
    assert whole.per_step == micro.per_step == per_step.per_step > 0
    assert 2 * whole.ops < micro.ops <= 2 * whole.ops + 2 * 2 + 1, (whole.ops, micro.ops)
    assert per_step.ops <= micro.ops - teacher_forward.ops, (per_step.ops, micro.ops, teacher_forward.ops)


def test_teacher_outputs_must_match_the_inputs(models):
    teacher, student = models
    config = StageConfig(stage=1, layer_types="attn*4")
    ids = torch.randint(1, 97, (4, SEQ + 1))
    out = teacher_outputs(config, student, teacher, ids)
    with torch.no_grad():
        loss, _ = stage_losses(config, student, teacher, ids[:2], teacher_out=out.rows(0, 2))
        want, _ = stage_losses(config, student, teacher, ids[:2])
        assert rel_err(loss, want) < 1e-6
        with pytest.raises(ValueError, match=r"teacher_out holds \[4, 16\] sequences x tokens, the inputs are "
                                             r"\[2, 16\]"):
            stage_losses(config, student, teacher, ids[:2], teacher_out=out)
    with pytest.raises(ValueError, match="teacher_per_step"):
        StageConfig(stage=1, layer_types="attn*4", teacher_per_step="yes")


def test_folded_gradients_are_autograds_sums_bit_for_bit(tmp_path):
    """The trainer adds each later micro-batch's gradients into the earlier ones with one foreach add: the same
    float32 sums as autograd's accumulation, exactly, also where a parameter gets a gradient in some micro-batches
    only (a super-network's sampled paths) or in none."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"shared": torch.nn.Linear(8, 8), "first": torch.nn.Linear(8, 8),
                                 "second": torch.nn.Linear(8, 8), "never": torch.nn.Linear(8, 8)})

    def loss_fn(m, batch, step):
        x = torch.nn.functional.one_hot(batch["input_ids"][:, :8] % 8, 8).float().mean(1)
        branch = m["first"] if batch["rows"][0] < 2 else m["second"]  # micro-batches 0 and 1, then 2 and 3
        return (branch(m["shared"](x)) ** 2).mean(), {}

    stream = TokenStream(np.arange(4096, dtype=np.uint16) % 97, "counting")
    grads = {}
    for fold in (False, True):
        trainer = Trainer(TrainConfig(steps=1, batch_size=4, micro_batch_size=1, seq_len=16, precision="fp32",
                                      out_dir=str(tmp_path / str(fold))), copy.deepcopy(model), loss_fn, stream)
        trainer.fold_gradients = fold
        # the gradients the optimizer is handed
        trainer.optimizer.step = lambda t=trainer, fold=fold: grads.update({fold: {
            n: None if p.grad is None else p.grad.clone() for n, p in t.model.named_parameters()}})
        trainer._train_step(0)
    assert grads[True].keys() == grads[False].keys()
    for name, g in grads[False].items():
        if name.startswith("never"):
            assert g is None and grads[True][name] is None
        else:
            assert torch.equal(grads[True][name], g), name


@needs_triton
@pytest.mark.parametrize("widths", [(16, 16, 16), (16, 24, 16)], ids=["one-width", "widths-differ"])
def test_hidden_loss_from_the_kernels_sums_equals_the_reference(widths):
    """The fused hidden loss takes each layer's ratio as sse / sst (the kernel's sums; n cancels, the floor scaled by
    n) when every layer has one size, and divides by each layer's n otherwise: the reference's mean of per-sequence
    ratios of means either way, values and gradients, up to float32 rounding (1e-6 relative). A teacher layer of
    zeros (mean square 0) meets the floor in both."""
    torch.manual_seed(3)
    teacher = [torch.randn(3, 5, w, device=DEVICE) for w in widths]
    teacher[1][1] = 0.0  # sequence 1 of layer 1: mean square 0, the floor's case
    student = [(t + 0.1 * torch.randn_like(t)).requires_grad_(True) for t in teacher]
    results = []
    for backend in ("torch", FUSED):
        hidden = distill_terms(student, teacher, backend=backend)["hidden"]
        results.append((hidden, torch.autograd.grad(hidden, student)))
    (want, want_grads), (got, got_grads) = results
    assert rel_err(got, want) < 1e-6
    for g, g_want in zip(got_grads, want_grads):
        assert rel_err(g, g_want) < 1e-6
