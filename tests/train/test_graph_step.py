"""The captured training step (`TrainConfig.cuda_graph`, `jetnas.train.graph_step`) on CPU: everything but the
`torch.cuda.graph` capture and `replay` calls. Without CUDA, `StaticStep` runs the same region eagerly on the same
static batch buffer and static gradients (zeroed in place, accumulated into), with the step index frozen at the
"capture" as a graph freezes it; the trainer reaches it through the config flag once the CUDA check is patched out.

Float32 on CPU, so "equal" is bit for bit: the static path runs the same ops in the same order as the eager step,
and its only extra arithmetic is 0 + g (exact) where the eager step takes g itself as the first micro-batch's
gradient."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from jetnas.runner.fields import check_value
from jetnas.runner.recipes import TrainRecipe
from jetnas.train.data import TokenStream
from jetnas.train.graph_step import WARMUP_STEPS, StaticStep, check_graph_step
from jetnas.train.stages import StageConfig, make_stage_loss, set_trainable
from jetnas.train.trainer import IDENTITY_FIELDS, TrainConfig, Trainer
from tests.utils import record_gradients

BATCH, SEQ = 4, 16
SENTINEL = 0  # a token id the test stream never holds (it draws 1..96)
STEPS = 6  # a run of `make` unless told
CAPTURE = WARMUP_STEPS  # the 0-based step at which the region is recorded and its replay checked




def stream() -> TokenStream:
    return TokenStream(np.random.default_rng(0).integers(1, 97, 4096).astype(np.uint16), "random")


def make(models, out_dir, *, graph, stage=1, micro=None, steps=STEPS, save_every=None, on_nonfinite="error",
         loss=None):
    """A stage trainer on a copy of the tiny student; `graph` sets `TrainConfig.cuda_graph` (needs `cpu_graph`)."""
    teacher, student = models
    config = StageConfig(stage=stage, layer_types="attn*4", batch_size=BATCH, micro_batch_size=micro, seq_len=SEQ,
                         steps=steps, warmup_steps=1, save_every=save_every, on_nonfinite=on_nonfinite,
                         precision="fp32", out_dir=str(out_dir))
    model = copy.deepcopy(student)
    set_trainable(model, stage)
    train = config.train_config()
    train.cuda_graph = graph
    trainer = Trainer(train, model, loss or make_stage_loss(config, teacher if stage == 1 else None), stream())
    return trainer, model


def log_rows(out_dir) -> list[dict]:
    rows = [json.loads(x) for x in (out_dir / "log.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("tokens_per_s", None)  # wall time
        r.pop("time", None)
    return rows


def assert_same_run(a, b, ta, tb, ga, gb):
    """Same log rows (losses, metrics, gradient norms, skips), gradients and final weights, bit for bit."""
    assert log_rows(ta.out) == log_rows(tb.out)
    assert len(ga) == len(gb) and ga
    for step, (x, y) in enumerate(zip(ga, gb)):
        assert x.keys() == y.keys(), step
        for name in x:
            assert torch.equal(x[name], y[name]), (step, name)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize(("stage", "micro"), [(1, None), (1, 2), (2, None)],
                         ids=["stage1", "stage1-two-micro-batches", "stage2"])
def test_static_steps_equal_eager_steps_bit_for_bit(models, tmp_path, cpu_graph, stage, micro):
    """Six steps: two eager warm-ups, the capture step (eager, then a checked replay), three replays."""
    eager, eager_model = make(models, tmp_path / "eager", graph=False, stage=stage, micro=micro)
    static, static_model = make(models, tmp_path / "static", graph=True, stage=stage, micro=micro)
    ge, gs = record_gradients(eager, eager_model), record_gradients(static, static_model)
    assert "cuda_graph" not in eager.fit()
    # the run's summary says the graph ran: every step from the capture on came from the recorded region
    assert static.fit()["cuda_graph"] == {"replayed_steps": STEPS - CAPTURE, "fallback": None}
    assert static._static is not None and static._static.captured and static._static.checked
    assert static._static.captured_step == CAPTURE and static.graph_failure is None
    assert eager._static is None
    assert_same_run(eager_model, static_model, eager, static, ge, gs)
    # the static gradients stay attached between steps (zeroed in place by the next region), as on the GPU
    assert all(p.grad is g for p, g in zip(static._static.params, static._static.grads))


def test_a_jetblock_student_steps_the_same_static_and_eager(tmp_path, cpu_graph):
    """The -aw4-jet recipe's block (dynamic value convolution, its kernel generator) on the static path: the same
    losses, gradients and weights as the eager steps, bit for bit (what the GPU capture records is that region)."""
    from jetnas.models import JetNemotronForCausalLM
    from tests.utils import tiny_config

    torch.manual_seed(0)
    teacher = JetNemotronForCausalLM(tiny_config(["attn"] * 4)).eval().requires_grad_(False)
    student = JetNemotronForCausalLM(tiny_config(["attn", "jet", "swa", "jet"]))
    eager, eager_model = make((teacher, student), tmp_path / "eager", graph=False)
    static, static_model = make((teacher, student), tmp_path / "static", graph=True)
    ge, gs = record_gradients(eager, eager_model), record_gradients(static, static_model)
    eager.fit()
    assert static.fit()["cuda_graph"] == {"replayed_steps": STEPS - CAPTURE, "fallback": None}
    assert_same_run(eager_model, static_model, eager, static, ge, gs)


def test_resume_rebuilds_the_static_step_and_matches_the_eager_run(models, tmp_path, cpu_graph):
    """Nine steps eagerly, against five static steps (then a Ctrl-C, which checkpoints them) resumed to nine: the
    resumed trainer warms up and captures again on the loaded weights. cuda_graph is not the run's identity, so the
    eager first half of a run also resumes with it on."""
    full, full_model = make(models, tmp_path / "full", graph=False, steps=9)
    full.fit()
    for first in (True, False):
        out = tmp_path / f"split-{first}"
        part, _ = make(models, out, graph=first, steps=9)
        interrupt_at(part, 5)
        with pytest.raises(KeyboardInterrupt):
            part.fit()  # which saves the last completed step
        resumed, resumed_model = make(models, out, graph=True, steps=9)
        assert resumed.resume_point.name == "step-00000005"
        resumed.fit()
        assert resumed._static.captured_step == 5 + CAPTURE and resumed._static.checked
        assert log_rows(out) == log_rows(full.out)
        for (n, p), (_, q) in zip(full_model.named_parameters(), resumed_model.named_parameters()):
            assert torch.equal(p, q), n
    assert "cuda_graph" not in IDENTITY_FIELDS


def interrupt_at(trainer, step):
    """A Ctrl-C when `trainer` asks for the batch of `step`."""
    batch = trainer.batcher.batch

    def patched(s, rank=0, world_size=1):
        if s == step:
            raise KeyboardInterrupt
        return batch(s, rank, world_size)

    trainer.batcher.batch = patched


def poisoned(loss_fn):
    """`loss_fn`, NaN for a batch holding `SENTINEL`: data-dependent, with no host read, so capturable."""

    def loss(model, batch, step):
        value, metrics = loss_fn(model, batch, step)
        bad = (batch["input_ids"] == SENTINEL).any()
        return value * torch.where(bad, torch.nan, 1.0), metrics

    loss.graph_safe = True
    return loss


def poison_step(trainer, step):
    batch = trainer.batcher.batch

    def patched(s, rank=0, world_size=1):
        b = batch(s, rank, world_size)
        if s == step:
            b[1, 5] = SENTINEL
        return b

    trainer.batcher.batch = patched


def test_a_non_finite_replay_is_skipped_as_an_eager_step_is(models, tmp_path, cpu_graph):
    config = StageConfig(stage=1, layer_types="attn*4", seq_len=SEQ)
    runs = []
    for graph in (False, True):
        trainer, model = make(models, tmp_path / str(graph), graph=graph, on_nonfinite="skip",
                              loss=poisoned(make_stage_loss(config, models[0])))
        poison_step(trainer, CAPTURE + 2)  # a plain replay
        runs.append((trainer, model, record_gradients(trainer, model)))
        trainer.fit()
        assert trainer.skipped_steps == 1
        assert [r.get("skipped", False) for r in log_rows(trainer.out)] == [False] * (CAPTURE + 2) + [True, False]
    (eager, eager_model, ge), (static, static_model, gs) = runs
    assert static._static.checked and static.graph_failure is None
    assert_same_run(eager_model, static_model, eager, static, ge, gs)


def run_fallback_pair(models, tmp_path, capsys):
    """An eager run and a graph run whose graph path fails (the caller patches how): the same losses, gradients and
    weights, step for step; returns the graph run's trainer and model, and what it printed."""
    eager, eager_model = make(models, tmp_path / "eager", graph=False)
    static, static_model = make(models, tmp_path / "static", graph=True)
    ge, gs = record_gradients(eager, eager_model), record_gradients(static, static_model)
    eager.fit()
    capsys.readouterr()
    static.fit()
    err = capsys.readouterr().err
    assert_same_run(eager_model, static_model, eager, static, ge, gs)
    return static, static_model, err


def test_a_failed_capture_falls_back_to_eager_steps_with_one_message(models, tmp_path, cpu_graph, monkeypatch,
                                                                     capsys):
    def refuse(self, step):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\n(the kernel's launch)")

    monkeypatch.setattr(StaticStep, "_capture", refuse)
    static, static_model, err = run_fallback_pair(models, tmp_path, capsys)
    # (the progress bar shares stderr: its updates end in carriage returns)
    err = err.replace("\r", "\n")
    lines = [x[x.index("jetnas: "):] for x in err.splitlines() if "CUDA graph" in x]
    want = (f"jetnas: CUDA graph capture of the training step failed at step {CAPTURE + 1} (RuntimeError: CUDA "
            f"error: operation not permitted when stream is capturing (the kernel's launch)); running every step "
            f"eagerly from here on")
    assert lines == [want]
    assert static._static is None and not static._graph_on and static.graph_failure
    assert all(p.grad is None for p in static_model.parameters())  # as after any eager step


def test_a_replay_that_disagrees_with_the_eager_step_falls_back(models, tmp_path, cpu_graph, monkeypatch, capsys):
    """A graph that computes something else (here a replay whose loss is 1% off) is caught by the replay at the
    capture step, against that step's eager run; that step and the rest then run eagerly, as if never captured."""
    replay = StaticStep._replay

    def off(self):
        out = replay(self)
        return [out[0] * 1.01, *out[1:]]

    monkeypatch.setattr(StaticStep, "_replay", off)
    static, _, err = run_fallback_pair(models, tmp_path, capsys)
    assert f"first replay (step {CAPTURE + 1}) disagrees with the eager run of the same step: output 0: replay" in err
    assert static._static is None and static.graph_failure
    assert static.graph_summary() == {"replayed_steps": 0, "fallback": static.graph_failure}


def test_replays_freeze_the_step_index_as_a_graph_does(models, tmp_path, cpu_graph):
    """Why a loss must not use `step` (`graph_safe`): from the first plain replay on, the emulated replays run with
    the capture step's index, as a graph replays what Python computed at the capture; the CPU tests of a loss
    therefore show it."""
    config = StageConfig(stage=1, layer_types="attn*4", seq_len=SEQ)
    stage_loss = make_stage_loss(config, models[0])

    def scheduled(model, batch, step):
        loss, metrics = stage_loss(model, batch, step)
        return loss * (1 + 0.1 * step), metrics

    scheduled.graph_safe = True  # wrongly
    rows = []
    for graph in (False, True):
        trainer, _ = make(models, tmp_path / str(graph), graph=graph, loss=scheduled, steps=CAPTURE + 2)
        trainer.fit()
        rows.append(log_rows(trainer.out))
    assert rows[0][: CAPTURE + 1] == rows[1][: CAPTURE + 1]
    assert rows[0][-1]["loss"] != rows[1][-1]["loss"]


class HostReads:
    """Records what in a block of code reads a tensor's value on the host (a synchronisation on CUDA, which a
    capture refuses) or makes a tensor from host data (a host-to-device copy on CUDA): Tensor methods through a
    TorchFunctionMode, value-dependent aten ops through a TorchDispatchMode."""

    METHODS = frozenset({"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy",
                         "__array__"})
    OPS = frozenset({"_local_scalar_dense", "is_nonzero", "equal", "allclose", "nonzero", "masked_select", "unique",
                     "_unique", "_unique2", "unique_consecutive", "unique_dim", "bincount", "lift_fresh",
                     "lift_fresh_copy"})

    def __init__(self):
        self.found: list[str] = []
        found = self.found

        class Methods(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if getattr(func, "__name__", "") in HostReads.METHODS and args and isinstance(args[0], torch.Tensor):
                    found.append(func.__name__)
                return func(*args, **(kwargs or {}))

        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if name in HostReads.OPS or (name == "repeat_interleave" and func._overloadname == "Tensor"
                                             and (kwargs or {}).get("output_size") is None):
                    found.append(name)
                return func(*args, **(kwargs or {}))

        self.modes = (Methods(), Ops())

    def __enter__(self):
        for mode in self.modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self.modes):
            mode.__exit__(*exc)


def scan_region(monkeypatch) -> list[list[str]]:
    """Run every call of the captured region (`StaticStep._region`) under `HostReads`; one list per call."""
    calls = []
    region = StaticStep._region

    def scanned(self, step):
        with HostReads() as reads:
            out = region(self, step)
        calls.append(reads.found)
        return out

    monkeypatch.setattr(StaticStep, "_region", scanned)
    return calls


@pytest.mark.parametrize(("stage", "micro"), [(1, None), (1, 2), (2, None)],
                         ids=["stage1", "stage1-two-micro-batches", "stage2"])
def test_the_stage_losses_read_nothing_on_the_host_inside_the_captured_region(models, tmp_path, cpu_graph,
                                                                             monkeypatch, stage, micro):
    """The region (forward and backward of every micro-batch, the stage loss, gradient clipping) on the reference
    kernels: no value read, no tensor from host data. (The GPU's fla / TileLang / Triton kernels are not run
    here: their launches are asynchronous, and the capture itself is their test.)"""
    calls = scan_region(monkeypatch)
    trainer, _ = make(models, tmp_path, graph=True, stage=stage, micro=micro, steps=CAPTURE + 3)
    trainer.fit()
    # warm-ups, the capture step's eager run and checking replay, two replays
    assert len(calls) == CAPTURE + 4
    assert calls == [[]] * len(calls)


def test_the_host_read_scan_catches_a_read(models, tmp_path, cpu_graph, monkeypatch):
    """The scan above can fail: a loss that reads a metric with `.item()` (as tests/train/test_trainer.py's does)
    and one that makes a tensor from a Python list are caught."""
    config = StageConfig(stage=1, layer_types="attn*4", seq_len=SEQ)
    stage_loss = make_stage_loss(config, models[0])

    def reading(model, batch, step):
        loss, metrics = stage_loss(model, batch, step)
        weights = torch.tensor([1.0, 0.5])
        return loss * weights[0], {**metrics, "kl": metrics["kl"] * (loss.item() > 0)}

    calls = scan_region(monkeypatch)
    trainer, _ = make(models, tmp_path, graph=True, loss=reading, steps=1)
    trainer.fit()
    assert "item" in calls[0] and "lift_fresh" in calls[0]


def test_python_number_metrics_are_refused_on_the_static_path(models, tmp_path, cpu_graph):
    config = StageConfig(stage=1, layer_types="attn*4", seq_len=SEQ)
    stage_loss = make_stage_loss(config, models[0])

    def numbers(model, batch, step):
        loss, metrics = stage_loss(model, batch, step)
        return loss, {**metrics, "ppl": math.e}

    trainer, _ = make(models, tmp_path, graph=True, loss=numbers, steps=1)
    with pytest.raises(ValueError, match=r"returns \['ppl'\] as Python numbers"):
        trainer.fit()


def test_cuda_graph_is_refused_where_it_cannot_run(models, tmp_path):
    model = copy.deepcopy(models[1])
    config = StageConfig(stage=1, layer_types="attn*4", seq_len=SEQ, align_steps=4, out_dir=str(tmp_path))
    loss = make_stage_loss(config, models[0])
    assert loss.graph_safe
    train = TrainConfig(steps=2, batch_size=BATCH, seq_len=SEQ, cuda_graph=True, out_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"cuda_graph=True .* needs the model on a CUDA device, got cpu"):
        Trainer(train, model, loss, stream())
    with pytest.raises(ValueError, match=r"StageConfig.cuda_graph=True needs a CUDA device, got device='cpu'"):
        StageConfig(stage=1, layer_types="attn*4", cuda_graph=True, device="cpu")
    with pytest.raises(ValueError, match=r"TrainConfig.cuda_graph='yes' must be True or False"):
        TrainConfig(steps=1, cuda_graph="yes")
    cuda = torch.device("cuda")

    def supernet_like(model, batch, step):  # no graph_safe: e.g. a sub-network sampled per step
        raise AssertionError("not called")

    with pytest.raises(ValueError, match=r"'.*supernet_like' does not declare loss_fn.graph_safe = True"):
        check_graph_step(cuda, supernet_like, 1)
    with pytest.raises(ValueError, match=r"runs in one plain process; this run has 2 under torchrun"):
        check_graph_step(cuda, loss, 2)
    with pytest.raises(ValueError, match=r"runs in one plain process; this run has 1 under torchrun"):
        check_graph_step(cuda, loss, 1, process_group=True)
    check_graph_step(cuda, loss, 1)
    # the alignment phase (its own layer-wise loss) stays eager whatever the stage says
    config.cuda_graph = True
    assert config.train_config().cuda_graph and not config.align_config().cuda_graph


def test_auto_captures_on_one_cuda_process_only(monkeypatch):
    """`cuda_graph: auto` (the stages' and recipes' default): on for one process on CUDA, off on CPU and under
    torchrun; an explicit true or false wins. (Deciding needs no GPU: the config is only built, not run.)"""
    def stage(**kw):
        return StageConfig(stage=1, layer_types="attn*4", **kw)

    assert stage().cuda_graph == "auto"
    assert not stage(device="cpu").graph_step() and not stage(device="cpu").train_config().cuda_graph
    assert stage(device="cuda").graph_step() and stage(device="cuda").train_config().cuda_graph
    assert not stage(device="cuda", cuda_graph=False).graph_step()
    # under torchrun (its RANK), even with one process: the captured step refuses a process group
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not stage(device="cuda").graph_step()
    assert stage(device="cuda", cuda_graph=True).graph_step()  # then the trainer refuses it, naming torchrun
    with pytest.raises(ValueError, match=r"StageConfig.cuda_graph='yes' must be true, false or 'auto'"):
        stage(cuda_graph="yes")
    # a recipe or the command line writes it as a word
    assert check_value(TrainRecipe, "cuda_graph", "true") == (True, None)
    assert check_value(TrainRecipe, "cuda_graph", "auto") == ("auto", None)
    assert check_value(TrainRecipe, "cuda_graph", False) == (False, None)
    assert check_value(TrainRecipe, "cuda_graph", "maybe") == ("maybe", "must be one of true, false, auto")


def test_static_step_checks_the_batch_shape(models):
    p = torch.nn.Parameter(torch.ones(3))
    step = StaticStep(lambda batch, s: [(p * batch.sum()).sum()], (2, 5), [p], torch.device("cpu"), use_graph=False)
    with pytest.raises(ValueError, match=r"batches of shape \[2, 5\], got \[2, 6\]"):
        step.run(torch.zeros(2, 6, dtype=torch.long), 0)
