"""Which kernels a layer's ops run, decided once, when the layer (or the model) is built.

A layer resolves a `Backend` at construction and passes it to every op it calls: its recurrences, short
convolutions, decode steps, norms and SwiGLU. The value says everything that picks a kernel; no module global or
environment variable changes the choice afterwards. Ops run the PyTorch reference on CPU tensors whatever the
backend (unless `interpret` asks for our Triton kernels there), so a model built on one device can move to another.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "torch", "triton")
#: `Backend.affine_state_pass`: "off", or the precision of the state pass's one product per chunk, optionally with
#: where its side work goes after a colon ("bf16:pre-n"; `jetnas.ops.triton_affine_pass`, default "loop")
AFFINE_PRECISIONS = ("bf16", "tf32")
AFFINE_VARIANTS = ("loop", "v-after", "pre-n")


def parse_affine(value: str) -> tuple[str, str] | None:
    """`Backend.affine_state_pass` as `(precision, variant)`, None for "off".

    Raises:
        ValueError: another value (named).
    """
    if value == "off":
        return None
    precision, _, variant = value.partition(":")
    if precision not in AFFINE_PRECISIONS or (variant and variant not in AFFINE_VARIANTS):
        raise ValueError(f"affine_state_pass must be 'off' or one of {AFFINE_PRECISIONS}, optionally ':' and one of "
                         f"{AFFINE_VARIANTS}, got {value!r}")
    return precision, variant or "loop"


@dataclass(frozen=True)
class Backend:
    """The kernels of a layer (or of a whole model: the model passes its backend to every layer).

    Attributes:
        name: "torch" (the PyTorch references everywhere) or "triton" (for CUDA tensors: fla's kernels for the
            linear-attention recurrences and our own Triton kernels); "auto" only before `resolve_backend`.
        fused: with "triton", RMS norms, the gated RMS norms, SwiGLU's `silu(gate) * up` and attention's rotary
            embedding run as one fused Triton kernel each, forward and backward (`jetnas.ops.fused`); False keeps
            their PyTorch references.
        static_conv: with "triton", static short convolutions run on our Triton kernel
            (`jetnas.ops.triton_dynamic_conv.triton_short_conv`) instead of `F.conv1d`. Its default here is the one
            place the project decides it.
        fused_residual: with "triton" and `fused`, a residual add and the RMS norm after it run as one kernel each
            way (`jetnas.ops.fused.add_rms_norm`): in each decoder layer after the mixer, and between layers (the
            MLP's output added into the next layer's input norm, or the final norm).
        fused_hidden_loss: with "triton", the per-layer relative hidden-state MSE of distillation
            (`jetnas.train.losses.distill_terms`) sums each sequence's squared error and teacher squares in one
            kernel, and its backward is one more (`jetnas.ops.triton_hidden_loss`).
        fused_projections: the projections that read one input run as one matrix product with their weights
            concatenated at forward time (parameter names and checkpoints unchanged), so backward computes one
            input gradient instead of one per projection plus the adds that sum them: the MLP's gate and up when a
            gradient is computed (then `jetnas.ops.fused.silu_mul_packed` on the packed `[..., 2I]`; without one,
            e.g. in a decode step, the weight cat would cost more than it saves), and in the JetBlock family (JetBlock,
            Gated DeltaNet, DeltaNet) outside decode steps q|k|v in one product (then, when all three convolutions
            are static, one short conv over all their channels) and g|b|a in another; in GLA outside decode steps
            its five products of x (q, k, v, gate, the decay's low-rank half) as one `shared_input_linear`. Any
            backend name.
        segment_state_pass: with "triton", the most segments the chunked gated delta rule's state pass splits each
            sequence into when no gradient is needed (prefill), no `cu_seqlens` are given and the pass is
            latency-bound (`jetnas.ops.segment_pass.segment_count`): a segment-parallel pass on fla's own kernels
            (`jetnas.ops._fla`). 0 or 1: off, fla's sequential pass.
        window_kernel: with "triton", sliding-window attention over a prompt with no gradient needed runs on our
            Triton kernel (`jetnas.ops.triton_attention`, one launch visiting only the key blocks each window
            reaches) instead of SDPA over masked query blocks (`jetnas.ops.attention.causal_attention`).
        conv_l2norm: with "triton" and `static_conv`, a JetBlock-family layer's one short conv over q|k|v
            L2-normalises q and k per head in its kernel's epilogue when no gradient is needed (prefill,
            evaluation), and the gated delta rule then skips its own normalisation pass (fla's `l2norm_fwd`: two
            reads and writes of the prompt's q and k per layer) (`jetnas.ops.conv.short_conv_split`'s
            `l2norm_head`).
        affine_state_pass: with "triton", the chunked gated delta rule's state pass when no gradient is needed and no
            `cu_seqlens` are given, for head key dims <= 128: "off" (fla's pass, two chained products per chunk),
            "bf16" or "tf32" (`jetnas.ops.triton_affine_pass`: the chunks' state matrices computed in parallel first,
            one product per chunk on the sequential path; the name is the precision of that product), optionally
            with the kernel's variant after a colon (`parse_affine`). Off by default: slower than fla's on an H200
            (0.86x in the SmolLM2 hybrid's 8K prefill; benchmarks/results/2026-12-07_h200_affine).
        interpret: our Triton kernels (not fla's) also take CPU tensors, which Triton runs in its interpreter; that
            must be on (`TRITON_INTERPRET=1` before Triton is imported, as tests/conftest.py does). For tests.
    """

    name: str = "torch"
    fused: bool = True
    # The static conv kernel: on an H200 (2026-12-06) it ran in training (forward and backward) and made the 135M
    # hybrid's captured prefill 1.5x faster than F.conv1d at 8K and 32K (benchmarks/results/2026-12-06_h200_prefill);
    # as close to a float32 reference as F.conv1d (measured on CPU with the same kernel code).
    static_conv: bool = True
    # The three training fusions, timed on one H100 (2026-12-06, benchmarks/results/2026-12-06_h100_train_fusions:
    # SmolLM2-135M GDN hybrid, 32 x 1,024 tokens): together they cut the stage-1 step's GPU time from 212-216 to
    # 190-194 ms and the super-network's from 174-181 to 163 ms, with loss curves within run-to-run noise; each
    # also checked against its reference on CPU (values and gradients, Triton's interpreter).
    fused_residual: bool = True
    fused_hidden_loss: bool = True
    fused_projections: bool = True
    # Off, and not to be turned on: on one H100 (2026-12-06, benchmarks/results/2026-12-06_h100_gated_norm_segpass)
    # it moved the SmolLM2 hybrid's 8K prefill logits 0.156 (relative, max) from the sequential pass's, against
    # 0.008 of chunking noise, while its kernel check passed on inputs whose states did not reach across segments
    # (since made able to fail). The PyTorch algebra is checked on CPU (tests/ops/test_segment_pass.py), and the fla
    # adapter matched fla's own op to 4e-7 in float32 on fla 0.6's kernels under Triton's interpreter (ragged
    # segments, initial states; dev/LOG.md, eighth session): what goes wrong on the GPU (bf16, or the model's use of
    # it) is not found. Its gain, where it ran: the GDN op at 8K 0.224 -> 0.210 ms graphed (1.07x).
    segment_state_pass: int = 0
    # On: checked on CPU under Triton's interpreter against the SDPA mask path (float32 2e-7, bf16 4e-3, a tiny
    # hybrid's logits); on one H100 (2026-12-07, benchmarks/results/2026-12-07_h100_window_conv) its tests passed on
    # CUDA and it ran 10-14x the block path at 8K-64K with the same error against float32. The model-level prefill
    # with it is not yet measured (`prefill_bench.py` compares the model's logits with it off).
    window_kernel: bool = True
    # On: CPU-tested against the reference (values; the interpreter) and compiled for sm_90, not yet run on a GPU
    # (2026-12-07). Expected (arithmetic): fla's l2norm pass took 0.37 of the SmolLM2 hybrid's 14.4 GPU-ms at 8K.
    conv_l2norm: bool = True
    # Off: CPU-tested against the state pass's contract (float32 1e-5 under the interpreter, bf16 within rounding:
    # tests/ops/test_affine_pass.py), not yet run on a GPU (2026-12-07); `benchmarks/gdn_segment_pass_bench.py
    # --affine bf16,tf32` and `benchmarks/prefill_bench.py --affine-state-pass bf16,tf32` measure and judge it there.
    affine_state_pass: str = "off"
    interpret: bool = False

    def __post_init__(self) -> None:
        if self.name not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.name!r}")
        if not isinstance(self.segment_state_pass, int) or self.segment_state_pass < 0:
            raise ValueError(f"segment_state_pass must be an int >= 0, got {self.segment_state_pass!r}")
        parse_affine(self.affine_state_pass)
        if self.segment_state_pass > 1 and self.name == "triton":
            warnings.warn("Backend.segment_state_pass is experimental: on a GPU (2026-12-06) the fla path moved a "
                          "model's logits far beyond rounding noise; results may be wrong", stacklevel=3)

    def runs_triton(self, x: torch.Tensor) -> bool:
        """Whether our Triton kernels take `x`: backend "triton" and x on CUDA (or on CPU with `interpret`)."""
        return self.name == "triton" and (x.is_cuda or (self.interpret and x.device.type == "cpu"))

    def runs_fla(self, x: torch.Tensor) -> bool:
        """Whether fla's kernels take `x`: backend "triton" and x on CUDA."""
        return self.name == "triton" and x.is_cuda


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will record an op on these tensors: grad mode on and one of them requiring a gradient. The
    one test for "a backward will follow" that picks forward-only kernels (inference) over ones that save for
    backward."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def as_backend(backend: Backend | str) -> Backend:
    """An op's `backend` argument as a `Backend`: a name stands for `Backend(name)` (the default options)."""
    if isinstance(backend, Backend):
        return backend
    if isinstance(backend, str):
        return Backend(backend)
    raise ValueError(f"backend must be a Backend or one of {BACKENDS}, got {backend!r}")


@functools.cache
def fla_usable() -> bool:
    from jetnas.ops import _fla

    return _fla.is_available()


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # a broken triton install must not break the CPU paths
        return False
    return True


@functools.cache
def triton_usable() -> bool:
    return torch.cuda.is_available() and triton_importable()


@functools.cache
def _warn_missing_fla() -> None:
    warnings.warn(
        "CUDA is available but flash-linear-attention is not importable: layers fall back to the PyTorch "
        "references (correct, much slower). Install the GPU extra: pip install 'jetnas[gpu]'.",
        stacklevel=3,
    )


def resolve_backend(backend: Backend | str = "auto") -> Backend:
    """Resolve a layer's backend to one named "torch" or "triton", keeping its options.

    "auto" picks "triton" (fla's kernels and ours) when CUDA, Triton and fla are all usable, warning once when
    only fla is missing, and "torch" otherwise. "triton" needs them too (or, with `interpret`, an importable Triton).
    A resolved backend comes back as it is.
    """
    backend = as_backend(backend)
    if backend.name == "torch":
        return backend
    if fla_usable() or (backend.name == "triton" and backend.interpret and triton_importable()):
        return backend if backend.name == "triton" else dataclasses.replace(backend, name="triton")
    if backend.name == "triton":
        raise ValueError("backend='triton' needs CUDA and flash-linear-attention (pip install 'jetnas[gpu]')")
    if torch.cuda.is_available():
        _warn_missing_fla()
    return dataclasses.replace(backend, name="torch")
