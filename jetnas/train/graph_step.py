"""The differentiable part of a training step (forward, backward, gradient clipping) over fixed buffers, captured
once in a CUDA graph and replayed every step (`TrainConfig.cuda_graph`; issue 16).

Why: the stage-1 step of the SmolLM2-135M hybrid (batch 32 x 1,024) keeps an H100 busy 155 ms of its 186 ms of wall
time; the rest is the host launching ~1,400 kernels one by one. A replayed graph launches them all at once.

What is captured, and what is not (the layout of PyTorch's "whole network capture" and of
`torch.cuda.make_graphed_callables`, with the optimizer step left out):

- **Inputs**: the rank's batch `[per_rank, seq_len + 1]` is copied into one static buffer before each step; every
  micro-batch is a view of it, so its address and shapes never change.
- **Gradients**: each trainable parameter's `.grad` is one static tensor, allocated here once. The captured region
  starts by zeroing them in place (`zero_grad(set_to_none=False)` semantics, one foreach launch inside the graph),
  and autograd then adds each micro-batch's gradient into them (its in-place `grad += new` when a `.grad` exists).
  Zero plus a gradient is that gradient exactly, so the values are the eager step's bit for bit (tested on CPU).
  The alternative (gradients allocated inside the capture, from the graph's pool, as the PyTorch example does)
  saves the zeroing and one add per parameter (well under 1 ms of an H100 at 135M parameters) but cannot be
  emulated on CPU by the same code: there, a second eager pass would add into the first one's gradients.
- **Outputs**: the loss and metric tensors of every micro-batch and the gradient norm are the graph's static
  outputs, overwritten by each replay; the trainer reads them on the host once per step, after the replay, and
  decides there (non-finite: skip or stop) exactly as in the eager step.
- **Not captured: the optimizer step.** It must come after that host read anyway (the skip decision), fused AdamW
  is a handful of launches (one per parameter group and dtype, plus the step counts), the learning rate stays a
  Python float set per step, and a checkpoint's optimizer state loads as before. Capturing it would need
  `capturable=True`, the learning rate as a device tensor and the skip moved into the graph (`torch.where`), for
  no measurable gain.
- **Not captured: `step`.** A graph bakes in everything Python computed while it was recorded, the step index
  passed to the loss included. So only loss functions that declare `loss_fn.graph_safe = True` are accepted:
  no host reads (`.item()`, `.tolist()`, Python branches on tensor values), no use of `step`, no tensors made from
  host data, the same shapes every step (`jetnas.train.stages.make_stage_loss` does; the super-network's loss,
  which samples a sub-network per step, does not and is refused).

Order of steps (`WARMUP_STEPS` = 2):

1. Steps 0 and 1 of the static path run the region eagerly on a side stream (as the PyTorch documentation asks
   before a capture): Triton compiles and autotunes, fla / TileLang build their kernels, cuBLAS gets its handle
   and workspace for that stream, and every kernel the capture will record has run once at its shapes. One
   eager step would do that; the second is the first steady-state step (gradients and optimizer state exist),
   so nothing first-call-only is left for the capture to meet. They are real training steps: nothing is thrown
   away.
2. Step 2 runs eagerly once more (on the side stream), then the region is recorded (a capture runs no kernel)
   and replayed at once on the same batch: every output of the replay (the loss, the metrics, the gradient norm)
   must agree with the eager run's to `CHECK_RTOL` (1e-3) relative. The replay runs the same kernels on the same
   inputs in the same grad mode, so they agree to the last bit, or to float32 rounding where a backward kernel
   accumulates with atomics (a gradient norm ~1e-6 apart); a graph that misses work or writes gradients nobody
   reads (a `.grad` replaced during the capture is also checked directly) is off by far more. The replay's
   outputs and gradients are the step's. A capture or replay that raises (an op that synchronises, a kernel
   launched on the legacy default stream, a Triton autotune meeting new shapes) or a disagreement ends the graph
   path: the trainer prints one line naming the exception and recomputes this step and every later one eagerly.
   (Why not check against an eager forward without gradients, on the next batch: several ops take other kernels
   without grad mode, e.g. `shared_input_linear`'s separate products, whose bf16 rounding differs by about as
   much as such a check could resolve.)
3. Later steps only replay. What this check cannot see is a graph that ignores its input, e.g. a Python-side
   cache keyed by tensor identity (the static buffer is the same object every step): none in jetnas's stage
   path (fla's `tensor_cache` keys only `cu_seqlens`, which training does not pass); `benchmarks/train_bench.py
   --cuda-graph` compares the graphed run's losses with the eager run's step by step.

Without CUDA (`use_graph=False`, the CPU tests) the same object runs the same region eagerly on the same static
buffers, with the gradients zeroed in place and the step index frozen at the "capture" step, so the tests check
everything but the `torch.cuda.graph` and `replay` calls themselves.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

#: eager steps of the static path before the capture (see the module docstring)
WARMUP_STEPS = 2
#: relative agreement of the first replay's outputs with the eager run of the same step (see the module docstring)
CHECK_RTOL = 1e-3


def check_graph_step(device: torch.device, loss_fn: Callable, world_size: int, process_group: bool = False) -> None:
    """Raise `ValueError` unless a captured step can run here: a CUDA device, one process without a process group
    (`process_group`: torchrun started one, so the model is wrapped in DDP / FSDP, even for one process), and a loss
    function that declares itself capturable (`loss_fn.graph_safe = True`; see the module docstring)."""
    if device.type != "cuda":
        raise ValueError(f"TrainConfig.cuda_graph=True captures the step in a CUDA graph: it needs the model on a "
                         f"CUDA device, got {device}; set cuda_graph=False")
    if not getattr(loss_fn, "graph_safe", False):
        name = getattr(loss_fn, "__qualname__", loss_fn)
        raise ValueError(f"TrainConfig.cuda_graph=True: the loss function {name!r} does not declare "
                         f"loss_fn.graph_safe = True. A captured step replays what the loss did at the capture (its "
                         f"step, its shapes, any Python value): only a loss that reads nothing on the host and is the "
                         f"same every step may be captured (stage 1 / stage 2; not the super-network, which samples "
                         f"a sub-network per step)")
    if world_size > 1 or process_group:
        raise ValueError(f"TrainConfig.cuda_graph=True runs in one plain process; this run has {world_size} under "
                         f"torchrun (DDP / FSDP reduce gradients from hooks and collectives that the capture does not "
                         f"handle); set cuda_graph=False")


class StaticStep:
    """A training step's differentiable region over a fixed batch buffer and fixed gradient tensors, run eagerly
    for `warmup` steps, then captured in a CUDA graph and replayed (see the module docstring).

    Args:
        body: `(batch, step) -> [tensor, ...]`: the region (forward and backward of every micro-batch, gradient
            clipping) on the static `batch [B, T + 1]`, adding the gradients into the parameters' `.grad`; returns
            its outputs (one-element tensors), the same number every call.
        batch_shape: the batch's shape; every step's batch must have it.
        params: the trainable parameters, whose `.grad` become the static gradient tensors.
        device: where the buffers live.
        use_graph: capture and replay (CUDA); False runs the same region eagerly every step (the CPU tests).
        warmup: eager steps before the capture.

    `run(batch, step)` returns the step's outputs, or None when the graph path has just failed (`failure` says
    why): the caller then runs this step and every later one its own eager way, after `release()`.
    """

    def __init__(self, body: Callable[[torch.Tensor, int], list[torch.Tensor]], batch_shape: tuple[int, ...],
                 params: list[torch.Tensor], device: torch.device, use_graph: bool, warmup: int = WARMUP_STEPS):
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        self.body = body
        self.params = list(params)
        self.batch = torch.zeros(batch_shape, dtype=torch.long, device=device)
        self.grads = [torch.zeros_like(p) for p in self.params]
        self.use_graph, self.warmup = use_graph, warmup
        self.calls = 0
        self.replays = 0  # steps whose region came from the recorded one (the first replay included)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: list[torch.Tensor] | None = None  # the graph's static outputs
        self.captured_step: int | None = None  # the step index the captured region was recorded with
        self.checked = False  # the first replay agreed with the eager run of its step
        self.failure: str | None = None
        self._side: torch.cuda.Stream | None = None

    @property
    def captured(self) -> bool:
        return self.captured_step is not None and self.failure is None

    def attach_grads(self) -> None:
        """Make every parameter's `.grad` its static tensor again (code outside may have set it to None)."""
        for p, g in zip(self.params, self.grads):
            if p.grad is not g:
                p.grad = g

    def release(self) -> None:
        """Drop the graph (its memory pool goes with it) and detach the static gradients (`.grad` None)."""
        for p, g in zip(self.params, self.grads):
            if p.grad is g:
                p.grad = None
        self.graph = self.outputs = None

    def _region(self, step: int) -> list[torch.Tensor]:
        torch._foreach_zero_(self.grads)
        out = list(self.body(self.batch, step))
        if not all(isinstance(t, torch.Tensor) for t in out):
            raise TypeError(f"the captured region must return tensors, got {[type(t).__name__ for t in out]}")
        return out

    def _eager(self, step: int) -> list[torch.Tensor]:
        if not self.use_graph:
            return self._region(step)
        if self._side is None:
            self._side = torch.cuda.Stream(self.batch.device)
        current = torch.cuda.current_stream(self.batch.device)
        self._side.wait_stream(current)
        with torch.cuda.stream(self._side):
            out = self._region(step)
        current.wait_stream(self._side)
        return out

    def _capture(self, step: int) -> None:
        """Record the region (CUDA); without a graph, remember the step it was recorded at."""
        if self.use_graph:
            graph = torch.cuda.CUDAGraph()
            # (entering synchronises, collects garbage and empties the allocator's cache: the side stream's blocks
            # from the eager steps go back to the device before the graph's private pool grows)
            with torch.cuda.graph(graph):
                outputs = self._region(step)
            self.graph, self.outputs = graph, outputs
        moved = [p for p, g in zip(self.params, self.grads) if p.grad is not g]
        if moved:
            # autograd replaced a .grad instead of adding into it: the graph would write tensors nobody reads
            raise RuntimeError(f"the capture replaced the .grad of {len(moved)} parameters instead of adding into "
                               f"the static ones")
        self.captured_step = step

    def _replay(self) -> list[torch.Tensor]:
        if self.use_graph:
            self.graph.replay()
            return self.outputs
        return self._region(self.captured_step)

    def _fail(self, why: str) -> None:
        self.failure = why
        self.graph = self.outputs = None

    def run(self, batch: torch.Tensor, step: int) -> list[torch.Tensor] | None:
        """Step `step` on `batch` (host or device tensor of `batch_shape`): its outputs, or None on a fallback."""
        if tuple(batch.shape) != tuple(self.batch.shape):
            raise ValueError(f"a captured step takes batches of shape {list(self.batch.shape)}, got "
                             f"{list(batch.shape)}")
        if self.failure is not None:
            return None
        self.batch.copy_(batch, non_blocking=True)
        self.attach_grads()
        self.calls += 1
        if self.calls <= self.warmup:
            return self._eager(step)
        if self.captured_step is None:
            expected = self._eager(step)
            try:
                self._capture(step)
                got = self._replay()
                problem = _disagreement(got, expected)
            except Exception as err:  # noqa: BLE001  (any capture failure: the run goes on eagerly)
                self._fail(f"CUDA graph capture of the training step failed at step {step + 1} "
                           f"({type(err).__name__}: {_one_line(err)})")
                return None
            if problem:
                self._fail(f"the CUDA graph's first replay (step {step + 1}) disagrees with the eager run of the "
                           f"same step: {problem}")
                return None
            self.checked = True
            self.replays += 1
            return got
        self.replays += 1
        return self._replay()


def _disagreement(got: list[torch.Tensor], expected: list[torch.Tensor]) -> str | None:
    """None when each pair agrees to `CHECK_RTOL` (NaN with NaN), else which values differ; one host read."""
    if len(got) != len(expected) or not expected:
        return f"{len(got)} outputs against {len(expected)}"
    values = torch.stack([t.detach().reshape(()).float() for t in got + expected]).tolist()
    a, b = values[: len(got)], values[len(got):]
    bad = [(i, x, y) for i, (x, y) in enumerate(zip(a, b))
           if not (x == y or (math.isnan(x) and math.isnan(y)) or abs(x - y) <= CHECK_RTOL * max(abs(x), abs(y)))]
    if not bad:
        return None
    return ", ".join(f"output {i}: replay {x!r}, eager {y!r}" for i, x, y in bad[:4])


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
