"""Count the host work of one training step on CPU: the ops that would be device kernel launches, and the syncs.

On a GPU with a slow host, a training step of a small model is bound by how many kernels Python launches, not by
the GPU (issue 16: an H100 box was busy 190-216 ms of a 300-400 ms stage-1 step). This script measures that host
work without a GPU, for the step `benchmarks/train_bench.py` times: the stage-1 distillation step (teacher forward,
student forward and backward, clip, AdamW) and the super-network step, of a tiny model with SmolLM2-135M's *layer
structure* (30 layers; stage 1: train_bench's `H200_RUN_LAYOUT` of `attn` / `swa` layers, `gdn` elsewhere; the
super-network: GLA paths) and small widths, so it runs in seconds on CPU.

What is counted, for one step after `--warmup` steps (so autotuning, first calls and the optimizer's state
creation are not):

- **aten ops**, forward and backward, through a `TorchDispatchMode`: every op below autograd, so
  `F.linear` appears as the `mm` / `addmm` it launches and autocast's casts as `_to_copy`. Views and
  metadata-only ops (`OpOverload.is_view`, `detach`, ...) launch nothing and are left out; allocations
  (`empty*`) launch nothing either but cost host time, so they are counted apart (`alloc`).
- **our Triton kernels**: the model is built with `Backend(name="triton", interpret=True)`, so our kernels run on
  CPU under Triton's interpreter; each outermost `JITFunction` / `InterpretedFunction` / autotuner / heuristics
  `run` is one launch (the aten ops the interpreter itself runs to copy arguments are not counted).
- **fla's kernels** do not run on CPU. While counting, fla's entry points (`chunk_gated_delta_rule`, `chunk_gla`,
  `chunk_simple_gla`) are stand-ins registered as the `fla` package, and `Backend.runs_fla` is true on CPU, so
  jetnas's own adapter code around them (`jetnas/ops/_fla.py`: casts, `new_ones`) runs and is counted as it is.
  Each stand-in is an autograd function that computes the PyTorch reference without counting it and adds fla's
  number of Triton launches, forward and backward, read from fla's source (`FLA_LAUNCHES` below: the
  `fla-org/flash-linear-attention` commit bc3b101, 2026-08-22; the GPU box runs fla 0.6.0, which may differ by a
  launch or two), plus the contiguous copies its `input_guard` makes of non-contiguous inputs.
- **syncs** (the host waits for the GPU): `Tensor.item` / `tolist` / `bool` / `float` / `int` / `cpu` / `numpy`,
  `aten._local_scalar_dense` and the data-dependent-shape ops (`nonzero`, `masked_select`, `unique`, ...), each
  with the line of code that asked for it.

Every count is attributed to a module (a stack kept by forward hooks; in backward, the module whose forward made
the autograd node that runs, found by tagging each forward's new graph nodes) with layer indices folded into their
layer type (`layers[gdn].self_attn.b_proj`), so a table by module and op says where the launches come from.

    python benchmarks/launch_count.py --modes stage1,supernet --out launch_count.json

`--micro-batch-size` counts a step of gradient accumulation (the whole step: every micro-batch, one clip and one
optimizer step), to hold against the whole batch's count; `--teacher-per-step` with it runs stage 1's teacher once
per step (`StageConfig.teacher_per_step`).

Host time is *estimated*, not measured: `--aten-us` (default 10) per aten op and `--triton-us` (default 40) per
Triton launch are assumptions (the lead times the step on a GPU). The last stdout line is one JSON object.
"""

from __future__ import annotations

import os

# our Triton kernels run on CPU tensors under the interpreter; it must be on before anything imports triton
os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse
import contextlib
import dataclasses
import json
import re
import sys
import tempfile
import time
import traceback
import types
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

#: fla's Triton launches per call, (forward, backward), from fla's source at commit bc3b101 (see the docstring).
#: chunk_gated_delta_rule with use_qk_l2norm_in_kernel: forward l2norm_fwd x2, chunk_local_cumsum,
#: chunk_gated_delta_rule_fwd_intra (kkt+solve fused, then recompute_w_u: 2), fwd_h, fwd_o = 7; backward
#: recompute_w_u, fwd_h, bwd_dv_local, bwd_dhu, bwd_dqkwg, prepare_wy_repr_bwd, reverse cumsum, l2norm_bwd x2 = 9
#: (and two aten add_, counted as `FLA_ATEN`). chunk_gla (float32 g): forward cumsum, fwd_h, intra sub_inter +
#: sub_intra, fwd_o = 5 (and a zeros_like fill); backward fwd_h, bwd_dh, bwd_dv, bwd_dA, bwd_dqk_intra,
#: bwd_dqkg = 6. chunk_simple_gla is taken as chunk_gla's.
FLA_LAUNCHES = {"chunk_gated_delta_rule": (7, 9), "chunk_gla": (5, 6), "chunk_simple_gla": (5, 6)}
FLA_ATEN = {"chunk_gated_delta_rule": (0, 2), "chunk_gla": (1, 0), "chunk_simple_gla": (1, 0)}

#: ops that launch nothing: metadata, aliasing
METADATA = {"detach", "alias", "lift_fresh", "set_", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
            "is_same_size", "_reshape_alias", "resize_", "_unsafe_view", "view", "as_strided", "t", "transpose",
            "expand", "slice", "select", "unsqueeze", "squeeze", "permute", "split", "split_with_sizes", "unbind",
            "chunk", "narrow", "_has_compatible_shallow_copy_type", "prim_device", "_local_scalar_dense",
            "is_nonzero", "_nested_tensor_size", "record_stream", "promote_types", "result_type", "can_cast"}
#: ops that allocate without a kernel
ALLOC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_empty_affine_quantized"}
#: ops whose output shape depends on values: the host waits for the device to know it
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive",
            "unique_dim", "nonzero_static", "repeat_interleave", "argwhere", "_assert_async"}
#: Tensor methods that read device values on the host
SYNC_METHODS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"}

SMOL_LAYOUT = {10: "swa", 11: "swa", 23: "attn", 28: "attn"}  # benchmarks/train_bench.py's H200_RUN_LAYOUT


def _load_train_bench_layout() -> dict[int, str]:
    """train_bench's H200_RUN_LAYOUT (imported, so the two scripts cannot drift apart)."""
    try:
        sys.path.insert(0, str(Path(__file__).parent))
        import train_bench

        return dict(train_bench.H200_RUN_LAYOUT)
    except Exception:  # noqa: BLE001  (a train_bench that fails to import still leaves the copy above)
        return SMOL_LAYOUT
    finally:
        sys.path.pop(0)


def _op_name(func) -> str:
    return func._schema.name.split("::")[-1]


def _caller() -> str:
    """The innermost frame outside torch and this script: the line that asked for a sync."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        f = frame.filename
        if "/torch/" in f or f.endswith("launch_count.py") or "/triton/" in f:
            continue
        short = re.sub(r".*/(jetnas|benchmarks|site-packages)/", r"\1/", f)
        return f"{short}:{frame.lineno} ({frame.name})"
    return "?"


class Counts:
    """The step's counts: `(phase, module, kind, name) -> n`, and the sync sites."""

    def __init__(self):
        self.rows: Counter = Counter()
        self.syncs: Counter = Counter()

    def add(self, phase: str, module: str, kind: str, name: str, n: int = 1) -> None:
        self.rows[(phase, module, kind, name)] += n

    def by_kind(self) -> dict[str, int]:
        out: Counter = Counter()
        for (_, _, kind, _), n in self.rows.items():
            out[kind] += n
        out["sync"] = sum(self.syncs.values())
        return dict(out)


class Counter_:
    """Context that counts one step. Holds the module stack, the autograd-node -> module tags and the suspension
    depth (inside a Triton launch or an fla stand-in nothing below is counted)."""

    def __init__(self, names: dict[int, str]):
        self.names = names  # id(module) -> folded name
        self.stack: list[str] = []
        self.tags: dict = {}
        self.suspended = 0
        self.counts = Counts()
        self.active = False

    # -- attribution ----------------------------------------------------------------------------------------------

    def where(self) -> tuple[str, str]:
        """(phase, module) of the op running now."""
        node = torch._C._current_autograd_node()
        if node is not None:
            return "backward", self.tags.get(node, "(unattributed)") + f" <{node.name()}>"
        return "forward", self.stack[-1] if self.stack else "(top level)"

    def tag_graph(self, tensors, name: str) -> None:
        """Tag every untagged autograd node reachable from `tensors` with `name` (stopping at tagged ones)."""
        todo = [t.grad_fn for t in tensors if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        while todo:
            node = todo.pop()
            if node is None or node in self.tags:
                continue
            self.tags[node] = name
            todo.extend(n for n, _ in node.next_functions if n is not None)

    @staticmethod
    def flat(obj) -> list[torch.Tensor]:
        out, todo = [], [obj]
        while todo:
            o = todo.pop()
            if isinstance(o, torch.Tensor):
                out.append(o)
            elif isinstance(o, dict):
                todo.extend(o.values())
            elif isinstance(o, (list, tuple)):
                todo.extend(o)
            elif hasattr(o, "to_tuple"):  # a transformers ModelOutput
                todo.extend(o.to_tuple())
        return out

    def pre_hook(self, module, args, kwargs=None):
        name = self.names.get(id(module))
        if not self.active or name is None:
            return
        # what the parent computed so far is the parent's (the residual add before this child, ...)
        self.tag_graph(self.flat(args) + self.flat(kwargs or {}), self.stack[-1] if self.stack else "(top level)")
        self.stack.append(name)

    def post_hook(self, module, args, *rest):
        output = rest[-1]
        name = self.names.get(id(module))
        if not self.active or name is None:
            return
        self.tag_graph(self.flat(output), name)
        if self.stack and self.stack[-1] == name:
            self.stack.pop()

    # -- counting -------------------------------------------------------------------------------------------------

    def aten(self, func) -> None:
        if self.suspended or not self.active:
            return
        name = _op_name(func)
        if name in SYNC_OPS and name != "_local_scalar_dense":
            self.counts.syncs[f"{name} at {_caller()}"] += 1
        if name in METADATA or func.is_view:
            return
        phase, module = self.where()
        self.counts.add(phase, module, "alloc" if name in ALLOC else "aten", name)

    def triton(self, kernel_name: str) -> None:
        if not self.active:
            return
        phase, module = self.where()
        self.counts.add(phase, module, "triton", kernel_name)

    def sync(self, what: str) -> None:
        if self.active and not self.suspended:
            self.counts.syncs[f"{what} at {_caller()}"] += 1


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: Counter_):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        self.counter.aten(func)
        return func(*args, **(kwargs or {}))


class _Function(TorchFunctionMode):
    """Counts the Tensor methods that read device values on the host."""

    def __init__(self, counter: Counter_):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNC_METHODS and args and isinstance(args[0], torch.Tensor):
            self.counter.sync(f"Tensor.{name}")
        return func(*args, **(kwargs or {}))


# -- Triton launches --------------------------------------------------------------------------------------------


def _patch_triton(counter_ref: list, report=None, marker: str = "_launch_count") -> None:
    """Wrap every Triton launcher's `run`: the outermost call of a launch is reported once (`report(counter, name,
    args, kwargs)`; default `counter.triton(name)`), and nothing the interpreter does inside it is counted as aten
    work (`counter.suspended` is raised through it). `counter_ref[0]` is the counter (None: not counting); `marker`
    names this wrapping, so a second call with the same marker wraps nothing again (benchmarks/elementwise_traffic.py
    reports through its own)."""
    from triton.runtime import autotuner, interpreter, jit

    def wrap(cls):
        original = cls.run
        if getattr(original, marker, False):
            return

        def run(self, *args, **kwargs):
            counter = counter_ref[0]
            if counter is None:
                return original(self, *args, **kwargs)
            if counter.suspended == 0:
                fn = self
                while hasattr(fn, "fn") and not hasattr(fn, "__name__"):
                    fn = fn.fn
                name = getattr(fn, "__name__", None) or type(fn).__name__
                if report is None:
                    counter.triton(name)
                else:
                    report(counter, name, args, kwargs)
            counter.suspended += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                counter.suspended -= 1

        setattr(run, marker, True)
        cls.run = run

    for cls in (jit.JITFunction, interpreter.InterpretedFunction, autotuner.Autotuner, autotuner.Heuristics):
        wrap(cls)


# -- fla stand-ins ----------------------------------------------------------------------------------------------


def _count_fla_call(counter_ref: list, name: str, side: int):
    """Count one fla call's launches and own aten ops (`side` 0: forward, 1: backward) and suspend the counter while
    its PyTorch reference runs; returns the counter (None when not counting), whose `suspended` the caller lowers."""
    counter = counter_ref[0]
    if counter is not None:
        where, label = counter.where(), ("fwd", "bwd")[side]
        counter.counts.add(*where, "fla", f"{name} ({label})", FLA_LAUNCHES[name][side])
        if FLA_ATEN[name][side]:
            counter.counts.add(*where, "aten", f"{name}: fla's own aten ops ({label})", FLA_ATEN[name][side])
        counter.suspended += 1
    return counter


class _FlaCall(torch.autograd.Function):
    """One call of an fla kernel: the PyTorch reference runs uncounted (forward, and its autograd in backward) and
    fla's launches are counted (`FLA_LAUNCHES`, `FLA_ATEN`). `meta = (name, reference, kwargs, counter_ref)`."""

    @staticmethod
    def forward(ctx, meta, *tensors):
        name, reference, kwargs, counter_ref = meta
        ctx.meta = meta
        counter = _count_fla_call(counter_ref, name, 0)
        try:
            with torch.enable_grad():
                inputs = [None if t is None else t.detach().requires_grad_(t.is_floating_point()) for t in tensors]
                o, final = reference(*inputs, **kwargs)
        finally:
            if counter is not None:
                counter.suspended -= 1
        ctx.graph = (inputs, o, final)
        return o.detach(), None if final is None else final.detach()

    @staticmethod
    def backward(ctx, do, dfinal):
        name, _, _, counter_ref = ctx.meta
        counter = _count_fla_call(counter_ref, name, 1)
        try:
            inputs, o, final = ctx.graph
            outs, grads = [o], [do]
            if final is not None and dfinal is not None:
                outs.append(final)
                grads.append(dfinal)
            wanted = [t for t in inputs if t is not None and t.requires_grad]
            got = iter(torch.autograd.grad(outs, wanted, grads, allow_unused=True))
            # fla's gradients are contiguous (its kernels write them so); the reference's need not be
            result = [next(got) if t is not None and t.requires_grad else None for t in inputs]
            result = [r.contiguous() if r is not None else None for r in result]
        finally:
            if counter is not None:
                counter.suspended -= 1
        return (None, *result)


def _install_fla(counter_ref: list) -> None:
    """Register a stand-in `fla` package (the entry points jetnas/ops/_fla.py calls) whose kernels are `_FlaCall`s,
    and make `Backend.runs_fla` true on CPU so jetnas's adapters run."""
    from jetnas.ops.backend import Backend
    from jetnas.ops.delta_rule import naive_chunk_gated_delta_rule
    from jetnas.ops.gla import naive_chunk_gla

    def guard(t):
        # fla's input_guard makes every tensor argument contiguous (a copy, counted as aten, when it is not)
        return t.contiguous() if isinstance(t, torch.Tensor) else t

    def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                               use_qk_l2norm_in_kernel=False, cu_seqlens=None, **_):
        def reference(q, k, v, g, beta, initial_state):
            return naive_chunk_gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                                output_final_state=output_final_state,
                                                use_qk_l2norm=use_qk_l2norm_in_kernel)

        meta = ("chunk_gated_delta_rule", reference, {}, counter_ref)
        return _FlaCall.apply(meta, *[guard(t) for t in (q, k, v, g, beta, initial_state)])

    def make_gla(name):
        def chunk(q, k, v, g=None, gk=None, scale=None, initial_state=None, output_final_state=False,
                  cu_seqlens=None, **_):
            def reference(q, k, v, g, initial_state):
                return naive_chunk_gla(q, k, v, g, scale=scale, initial_state=initial_state,
                                       output_final_state=output_final_state)

            meta = (name, reference, {}, counter_ref)
            return _FlaCall.apply(meta, *[guard(t) for t in (q, k, v, g if g is not None else gk, initial_state)])

        return chunk

    fla = types.ModuleType("fla")
    ops = types.ModuleType("fla.ops")
    gdn = types.ModuleType("fla.ops.gated_delta_rule")
    gla = types.ModuleType("fla.ops.gla")
    simple = types.ModuleType("fla.ops.simple_gla")
    gdn.chunk_gated_delta_rule = chunk_gated_delta_rule
    gla.chunk_gla = make_gla("chunk_gla")
    simple.chunk_simple_gla = make_gla("chunk_simple_gla")
    fla.ops, ops.gated_delta_rule, ops.gla, ops.simple_gla = ops, gdn, gla, simple
    sys.modules.update({"fla": fla, "fla.ops": ops, "fla.ops.gated_delta_rule": gdn, "fla.ops.gla": gla,
                        "fla.ops.simple_gla": simple})
    Backend.runs_fla = lambda self, x: self.name == "triton"


# -- the step ---------------------------------------------------------------------------------------------------


def tiny_teacher_dir(target: Path, args) -> Path:
    """A Llama with SmolLM2-135M's layer structure (30 layers, grouped-query attention 3:1, tied embeddings) and
    small widths, random weights, saved as a model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=max(1, args.heads // 3), head_dim=args.hidden // args.heads,
                         max_position_embeddings=4 * args.seq_len, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         attention_bias=False, mlp_bias=False, hidden_act="silu")
    LlamaForCausalLM(config).save_pretrained(target)
    return target


def use_backend(model: torch.nn.Module, backend) -> None:
    """Give every module of `model` that holds a `Backend` this one (as train_bench's `apply_fusions` does: each
    layer, norm and MLP keeps the value it resolved at construction)."""
    from jetnas.ops.backend import Backend

    for module in model.modules():
        if isinstance(getattr(module, "backend", None), Backend):
            module.backend = backend


def folded_names(model: torch.nn.Module, prefix: str) -> dict[int, str]:
    """id(module) -> name with layer indices folded into the layer's type: `layers[gdn].self_attn.b_proj`."""
    kinds = {}
    for name, module in model.named_modules():
        m = re.search(r"layers\.(\d+)$", name)
        if m:
            kinds[name] = getattr(module, "block_type", None) or type(getattr(module, "self_attn", module)).__name__
    out = {}
    for name, module in model.named_modules():
        folded = name
        for m in re.finditer(r"layers\.(\d+)", name):
            key = name[: m.end()]
            folded = folded.replace(f"layers.{m.group(1)}", f"layers[{kinds.get(key, '?')}]", 1)
        out[id(module)] = prefix + (folded or "(root)")
    return out


def build(mode: str, args, teacher, work: Path, backend):
    """(trainer, names) of one mode, built as train_bench builds it."""
    import numpy as np

    from jetnas.train.data import TokenStream
    from jetnas.train.trainer import TrainConfig, Trainer

    rng = np.random.default_rng(0)
    stream = TokenStream(rng.integers(1, args.vocab, 1 << 16).astype(np.uint16), "random")
    common = {"steps": 10, "batch_size": args.batch_size, "micro_batch_size": args.micro_batch_size,
              "seq_len": args.seq_len, "seed": 0,
              "precision": args.precision, "out_dir": str(work / mode), "resume": False}
    if mode == "supernet":
        from jetnas.nas.distill import DistillConfig, make_distill_loss
        from jetnas.nas.sampling import SubnetSampler
        from jetnas.nas.supernet import SuperNet, SuperNetSpec

        torch.manual_seed(0)
        net = SuperNet(teacher.model, SuperNetSpec(args.teacher_dir, "gla", swa_window=args.swa_window))
        use_backend(net, backend)
        sampler = SubnetSampler(net.num_layers, mode="uniform", p_attn=0.5, seed=0)
        loss_fn = make_distill_loss(sampler, DistillConfig(kl_weight=args.supernet_kl))
        trainer = Trainer(TrainConfig(lr=1e-3, warmup_steps=1, find_unused_parameters=True, **common), net, loss_fn,
                          stream)
        return trainer, folded_names(net, "")
    from jetnas.train.stages import StageConfig, build_student, forward_teacher, make_stage_loss

    layout = _load_train_bench_layout()
    types_ = ",".join(layout.get(i, args.linear) for i in range(args.layers))
    cfg = StageConfig(stage=1, teacher=args.teacher_dir, layer_types=types_,
                      block_config={"swa": {"window_size": args.swa_window}}, warmup_steps=1, **common,
                      **({"teacher_per_step": True} if args.teacher_per_step else {}))  # (older jetnas: no such field)
    model, _, _ = build_student(cfg, teacher)
    use_backend(model, backend)
    # as train_stage runs it: under --precision bf16 a copy with the Linear weights cast once
    teacher_model = forward_teacher(cfg, teacher.model, "cpu")
    loss_fn = make_stage_loss(cfg, teacher_model)
    trainer = Trainer(cfg.train_config(), model, loss_fn, stream)
    return trainer, {**folded_names(teacher_model, "teacher:"), **folded_names(model, "")}


@contextlib.contextmanager
def module_tags(counter: "Counter_", counter_ref: list):
    """`counter` as the one the patched kernels report to, with every module's forward and the loss's backward
    tagged for it (the module hooks, and `Tensor.backward` tagging the loss's own ops outside every module); all
    undone on exit."""
    counter_ref[0] = counter
    pre = torch.nn.modules.module.register_module_forward_pre_hook(counter.pre_hook)
    post = torch.nn.modules.module.register_module_forward_hook(counter.post_hook, always_call=True)
    original_backward = torch.Tensor.backward

    def backward(self, *a, **k):
        counter.tag_graph([self], "(loss, outside modules)")
        return original_backward(self, *a, **k)

    torch.Tensor.backward = backward
    try:
        yield counter
    finally:
        torch.Tensor.backward = original_backward
        pre.remove()
        post.remove()
        counter_ref[0] = None


def count_step(trainer, names: dict[int, str], step: int, counter_ref: list) -> Counts:
    """Run `trainer._train_step(step)` under the counters; returns the counts."""
    with module_tags(Counter_(names), counter_ref) as counter:
        _count_step(trainer, counter, step)
    return counter.counts


def _count_step(trainer, counter: "Counter_", step: int) -> None:
    """`trainer._train_step(step)` counted, the code outside modules labelled by what runs it."""
    def labelled(fn, label):
        def call(*a, **k):
            counter.stack.append(label)
            try:
                return fn(*a, **k)
            finally:
                counter.stack.pop()

        return call

    # the code outside modules, by what runs it
    patches = [(trainer, "loss_fn", "(loss, outside modules)"), (trainer.optimizer, "step", "(optimizer.step)"),
               (torch.nn.utils, "clip_grad_norm_", "(clip_grad_norm_)"), (trainer.batcher, "batch", "(data)")]
    # (object, attribute, its own value or None when it came from the class)
    saved = [(obj, attr, vars(obj).get(attr) if hasattr(obj, "__dict__") else None) for obj, attr, _ in patches]
    for obj, attr, label in patches:
        setattr(obj, attr, labelled(getattr(obj, attr), label))
    counter.active = True
    try:
        with _Function(counter), _Dispatch(counter):
            trainer._train_step(step)
    finally:
        counter.active = False
        for obj, attr, value in saved:
            if value is None:
                delattr(obj, attr)
            else:
                setattr(obj, attr, value)


def summarize(counts: Counts, aten_us: float, triton_us: float) -> dict:
    kinds = counts.by_kind()
    launches = kinds.get("aten", 0) + kinds.get("triton", 0) + kinds.get("fla", 0)
    by_module: dict[str, Counter] = defaultdict(Counter)
    by_op: Counter = Counter()
    for (phase, module, kind, name), n in counts.rows.items():
        base = re.sub(r" <.*>$", "", module)
        by_module[f"{phase}: {base}"][kind] += n
        by_op[f"{kind}: {name}"] += n
    est_ms = (kinds.get("aten", 0) * aten_us + (kinds.get("triton", 0) + kinds.get("fla", 0)) * triton_us) / 1e3
    return {
        "launches": launches, "by_kind": kinds,
        "estimated_host_ms": round(est_ms, 1),
        "by_phase": {p: sum(n for (ph, _, k, _), n in counts.rows.items() if ph == p and k != "alloc")
                     for p in ("forward", "backward")},
        "by_module": {m: dict(c) for m, c in sorted(by_module.items(), key=lambda x: -sum(x[1].values()))},
        "by_op": dict(by_op.most_common()),
        "rows": [{"phase": p, "module": m, "kind": k, "op": o, "n": n}
                 for (p, m, k, o), n in sorted(counts.rows.items(), key=lambda x: -x[1])],
        "syncs": dict(counts.syncs.most_common()),
    }


def print_tables(mode: str, s: dict, top: int) -> None:
    out = sys.stderr
    k = s["by_kind"]
    print(f"\n=== {mode}: {s['launches']} launches per step (aten {k.get('aten', 0)}, our Triton "
          f"{k.get('triton', 0)}, fla {k.get('fla', 0)}), {k.get('alloc', 0)} allocations, {k.get('sync', 0)} syncs; "
          f"forward {s['by_phase']['forward']}, backward {s['by_phase']['backward']}; est. host "
          f"{s['estimated_host_ms']} ms", file=out)
    print(f"--- by module (top {top})", file=out)
    for m, c in list(s["by_module"].items())[:top]:
        cells = ", ".join(f"{kk} {v}" for kk, v in sorted(c.items()))
        print(f"  {sum(v for kk, v in c.items() if kk != 'alloc'):>6}  {m}  [{cells}]", file=out)
    print(f"--- by op (top {top})", file=out)
    for name, n in list(s["by_op"].items())[:top]:
        print(f"  {n:>6}  {name}", file=out)
    print(f"--- by module and op (top {top})", file=out)
    for r in s["rows"][:top]:
        print(f"  {r['n']:>6}  {r['phase']:<8} {r['kind']:<6} {r['op']:<40} {r['module']}", file=out)
    print("--- syncs", file=out)
    for site, n in s["syncs"].items():
        print(f"  {n:>6}  {site}", file=out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default="stage1,supernet")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=48)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--micro-batch-size", type=int, default=None,
                    help="sequences per forward (gradient accumulation; default: the whole batch): the step's counts "
                         "with A micro-batches are about A times a whole-batch step's forward and backward")
    ap.add_argument("--teacher-per-step", action="store_true",
                    help="stage 1: the teacher's forward once per step, not per micro-batch (StageConfig)")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--swa-window", type=int, default=16)
    ap.add_argument("--linear", default="gdn", help="stage 1's linear block (train_bench's default)")
    ap.add_argument("--supernet-kl", type=float, default=0.0)
    ap.add_argument("--precision", default="bf16", help="bf16: CPU autocast, so the casts of a GPU step appear")
    ap.add_argument("--fusions", default="", help="Backend fields to switch on, e.g. fused_residual,fused_projections")
    ap.add_argument("--aten-us", type=float, default=10.0, help="assumed host cost of one aten op (us)")
    ap.add_argument("--triton-us", type=float, default=40.0, help="assumed host cost of one Triton launch (us)")
    ap.add_argument("--optimizer", default="fused", choices=("fused", "trainer"),
                    help="fused: AdamW(fused=True), as the trainer builds it on CUDA; trainer: as it builds it here")
    ap.add_argument("--warmup", type=int, default=None,
                    help="steps run before the counted one (default: 1; the super-network 3, so that most sampled "
                         "paths have their optimizer state)")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)

    import jetnas
    from jetnas.models.convert import as_jetnas
    from jetnas.models.hf_compat import load_pretrained
    from jetnas.ops.backend import Backend
    from jetnas.train.stages import StageTeacher

    counter_ref: list = [None]
    _patch_triton(counter_ref)
    _install_fla(counter_ref)
    fusions = {f: True for f in args.fusions.split(",") if f}
    backend = Backend(name="triton", interpret=True, **fusions)
    work = Path(tempfile.mkdtemp(prefix="launch_count_"))
    args.teacher_dir = str(tiny_teacher_dir(work / "teacher", args))
    # as `jetnas.train.stages.load_stage_teacher` loads a teacher, without a tokenizer (random weights need none)
    teacher = StageTeacher(as_jetnas(load_pretrained(args.teacher_dir, dtype=torch.float32)).requires_grad_(False)
                           .eval(), None, None, None)
    use_backend(teacher.model, backend)
    report = {"jetnas": str(Path(jetnas.__file__).parent), "backend": dataclasses.asdict(backend),
              "assumed_us": {"aten": args.aten_us, "triton": args.triton_us},
              "args": {k: v for k, v in vars(args).items()}, "modes": {}}
    for mode in args.modes.split(","):
        t0 = time.perf_counter()
        trainer, names = build(mode, args, teacher, work, backend)
        if args.optimizer == "fused":
            # what the trainer builds on CUDA (`fused=True`), so the count is a GPU step's (on CPU it builds the
            # per-parameter loop, which no GPU run uses)
            trainer.optimizer = torch.optim.AdamW(
                [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in trainer.optimizer.param_groups],
                lr=trainer.config.lr, betas=trainer.config.betas, fused=True)
        with contextlib.redirect_stdout(sys.stderr):
            # warm-up: autotuning, first calls, and the optimizer's state of every parameter (a super-network step
            # trains only the sampled paths, so a path's state is made the first step it is sampled)
            warmup = args.warmup if args.warmup is not None else (3 if mode == "supernet" else 1)
            for step in range(warmup):
                trainer._train_step(step)
        counts = count_step(trainer, names, warmup, counter_ref)
        s = summarize(counts, args.aten_us, args.triton_us)
        s["seconds"] = round(time.perf_counter() - t0, 1)
        report["modes"][mode] = s
        print_tables(mode, s, args.top)
        if args.out:  # after each mode, so a slow second mode leaves the first's counts
            Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({m: {"launches": s["launches"], **s["by_kind"], "estimated_host_ms": s["estimated_host_ms"]}
                      for m, s in report["modes"].items()}))


if __name__ == "__main__":
    main()
