"""JetBlock: the gated delta rule with a dynamic convolution on V (Jet-Nemotron, arXiv 2508.15884, section 2.3).

For input x (tokens x D), H heads, key dim K, value dim V, conv width W:

    q = silu(x Wq), k = silu(x Wk)                      L2-normalised per head inside the op
    v = silu(dynamic_conv(x Wv; kernels from x))        kernel_t = w2(silu(w1 x_t)), [H*V, W] per token
    beta = sigmoid(x Wb), g = -exp(A_log) * softplus(x Wa + dt_bias)
    o = gated_delta_rule(q, k, v, g, beta), scale K^-1/2
    out = Wo( rmsnorm_per_head(o) * silu(x Wg) )

Parameter names are the released checkpoints' (`q_proj, k_proj, v_proj, a_proj, b_proj, g_proj, o_proj, A_log,
dt_bias, o_norm.weight, dynamic_conv1d.kernel_generator.{w1,w2}`). The design ablations of PostNAS step 3 are
options: where the convolutions sit (`qk_conv`, `v_conv`) and whether the decay and the output gate exist. With
`qk_conv="static", v_conv="static"` the block is Gated DeltaNet; without decay and gate it is DeltaNet (those two
are registered as their own layer types in `gdn.py` and `deltanet.py`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from jetnas.layers.base import (
    RecurrentState,
    TokenMixer,
    begin_linear,
    dtype_bytes,
    inherit_qkvo,
    updatable,
)
from jetnas.modules.conv import DynamicShortConvolution, ShortConvolution
from jetnas.modules.norm import GatedRMSNorm
from jetnas.ops.backend import Backend, needs_grad, resolve_backend
from jetnas.ops.conv import short_conv_split
from jetnas.ops.decode import gated_delta_rule_step_, gated_delta_rule_step_raw_
from jetnas.ops.delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
from jetnas.ops.fused import shared_input_linear
from jetnas.ops.gates import gdn_gates

CONV_KINDS = ("none", "static", "dynamic")


def initial_a_log(num_heads: int) -> torch.Tensor:
    """log(A) with A ~ U(0, 16) per head (Gated DeltaNet's decay-rate init)."""
    return torch.empty(num_heads).uniform_(0, 16).log()


def initial_dt_bias(num_heads: int, dt_min: float = 1e-3, dt_max: float = 0.1) -> torch.Tensor:
    """softplus^-1(dt) with dt log-uniform in [dt_min, dt_max] (Mamba2's time-step init)."""
    dt = torch.exp(torch.rand(num_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
    return dt + torch.log(-torch.expm1(-dt))


def _aligned(weights: list[torch.Tensor], multiple: int = 16) -> tuple[list[torch.Tensor], list[int]]:
    """The weights of one fused product (`[N_i, D]` each) and their widths, with rows appended so that the product
    has a multiple of `multiple` output columns. 16 columns: cuBLAS's vectorized kernels need a 16-byte-aligned
    output row stride (8 bf16 columns), and our Triton kernels that read a slice of the product where it lies (the
    gated norm's gate, the GDN gates' b and a) get vectorized loads only when the row stride, an integer argument,
    is a multiple of 16: Triton specialises such integers as divisible by 16 and nothing less. At a stride of 600
    (9 heads of 64 padded to 8) the gated norm's forward compiles for sm_90 to 32 two-byte gate loads per thread
    where 608 gives 16-byte ones (tests/ops/sm90_compile.py checks it; on an H100 the kernel alone is ~3% faster,
    the 8K prefill unchanged: benchmarks/results/2026-12-07_h100_gate_stride). The appended rows are the first
    rows of the widest weight, detached (a view: nothing allocated or filled): their output columns are never read,
    so their values do not matter, and their gradient is zero, so x's gradient gets exactly zero from them (finite
    weights) and no weight gets any. A weight with too few rows for that leaves zeros instead."""
    widths = [w.shape[0] for w in weights]
    pad = -sum(widths) % multiple
    if not pad:
        return weights, widths
    donor = max(weights, key=lambda w: w.shape[0])
    rows = donor[:pad].detach() if donor.shape[0] >= pad else donor.new_zeros(pad, donor.shape[1])
    return [*weights, rows], [*widths, pad]


class JetBlock(TokenMixer):
    """The JetBlock (and, through its options, the rest of the delta-rule family).

    Args:
        hidden_size: model width D.
        num_heads: H (Jet-Nemotron-2B: 12).
        head_k_dim: K (2B: 96).
        head_v_dim: V (2B: 256).
        conv_size: W of the short convolutions (4).
        generator_reduction: the dynamic-conv kernel generator's hidden width is H*V / this (8).
        norm_eps: eps of the per-head output norm.
        qk_conv: "none" (the JetBlock), "static" (Gated DeltaNet's short convs) or "dynamic", on q and k.
        v_conv: "dynamic" (the JetBlock), "static" or "none", on v.
        use_decay: data-dependent decay g (off: the plain delta rule).
        use_output_gate: `o_norm(o) * silu(g_proj(x))` (off: `o_norm(o)`).
        initializer_range: std of the kernel generator's first layer.
        backend: a `jetnas.ops.backend.Backend` or "auto" | "torch" | "triton", resolved once here and passed to
            every op the block calls (recurrence, convolutions, decode steps, output norm).
    """

    layer_type = "jet"

    def __init__(
        self,
        hidden_size: int,
        num_heads: int = 12,
        head_k_dim: int = 96,
        head_v_dim: int = 256,
        conv_size: int = 4,
        generator_reduction: int = 8,
        norm_eps: float = 1e-5,
        qk_conv: str = "none",
        v_conv: str = "dynamic",
        use_decay: bool = True,
        use_output_gate: bool = True,
        initializer_range: float = 0.02,
        backend: Backend | str = "auto",
    ):
        super().__init__()
        for name, kind in (("qk_conv", qk_conv), ("v_conv", v_conv)):
            if kind not in CONV_KINDS:
                raise ValueError(f"{name} must be one of {CONV_KINDS}, got {kind!r}")
        self.hidden_size, self.num_heads, self.head_k_dim, self.head_v_dim = hidden_size, num_heads, head_k_dim, head_v_dim
        self.conv_size, self.qk_conv, self.v_conv = conv_size, qk_conv, v_conv
        self.use_decay, self.use_output_gate = use_decay, use_output_gate
        self.backend = resolve_backend(backend)
        key_dim, value_dim = num_heads * head_k_dim, num_heads * head_v_dim

        self.q_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)
        if use_decay:
            self.a_proj = nn.Linear(hidden_size, num_heads, bias=False)
            self.A_log = nn.Parameter(initial_a_log(num_heads))
            self.dt_bias = nn.Parameter(initial_dt_bias(num_heads))
            self.A_log._no_weight_decay = True
            self.dt_bias._no_weight_decay = True

        def make_conv(kind: str, channels: int, dynamic_name: str, static_name: str):
            if kind == "static":
                setattr(self, static_name, ShortConvolution(channels, conv_size, activation="silu"))
            elif kind == "dynamic":
                setattr(self, dynamic_name, DynamicShortConvolution(
                    channels, conv_size, generator_input_size=hidden_size, generator_reduction=generator_reduction,
                    activation="silu", initializer_range=initializer_range))

        make_conv(qk_conv, key_dim, "q_dynamic_conv1d", "q_conv1d")
        make_conv(qk_conv, key_dim, "k_dynamic_conv1d", "k_conv1d")
        make_conv(v_conv, value_dim, "dynamic_conv1d", "v_conv1d")
        self._convs = {
            "q": ("q_dynamic_conv1d" if qk_conv == "dynamic" else "q_conv1d") if qk_conv != "none" else None,
            "k": ("k_dynamic_conv1d" if qk_conv == "dynamic" else "k_conv1d") if qk_conv != "none" else None,
            "v": ("dynamic_conv1d" if v_conv == "dynamic" else "v_conv1d") if v_conv != "none" else None,
        }
        if use_output_gate:
            self.g_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.o_norm = GatedRMSNorm(head_v_dim, eps=norm_eps, backend=self.backend)
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False)

    def initial_values(self) -> dict[str, torch.Tensor]:
        """Fresh values of the parameters with a non-standard init (for model-level re-initialisation)."""
        if not self.use_decay:
            return {}
        return {"A_log": initial_a_log(self.num_heads), "dt_bias": initial_dt_bias(self.num_heads)}

    def _mix(self, name: str, u: torch.Tensor, x: torch.Tensor, state: RecurrentState | None, step: bool):
        """Apply the short conv (and SiLU) of path `name` ("q", "k" or "v") to its projection `u [B, T, C]`."""
        attr = self._convs[name]
        if attr is None:
            return F.silu(u)
        conv = getattr(self, attr)
        dynamic = isinstance(conv, DynamicShortConvolution)
        conv_state = None if state is None else state.conv.get(name)
        if step:
            args = (u[:, 0], x[:, 0]) if dynamic else (u[:, 0],)
            y, new_state = conv.step(*args, conv_state, backend=self.backend)
            y = y[:, None]
        elif dynamic:
            y, new_state = conv(u, x, conv_state, state is not None, backend=self.backend)
        else:
            y, new_state = conv(u, conv_state, state is not None, backend=self.backend)
        if state is not None:
            state.conv[name] = new_state
        return y

    def _one_conv(self) -> bool:
        """Whether the q, k and v convolutions can run as one over their concatenated channels: all three static,
        with one activation and bias on all or none (a depthwise conv treats each channel alone, so this is the
        same maths)."""
        convs = [None if self._convs[n] is None else getattr(self, self._convs[n]) for n in "qkv"]
        if not all(isinstance(c, ShortConvolution) for c in convs):
            return False
        return len({c.activation for c in convs}) == 1 and len({c.bias is None for c in convs}) == 1

    def _fused_projections(self, x: torch.Tensor, state: RecurrentState | None, normalized: bool = False):
        """q, k, v (after their convolutions), b, a and the output gate of a prompt (not a decode step) from two
        matrix products, `x [B, T, D]` times the concatenated weights of q|k|v and of g|b|a (padded to a multiple
        of 16 columns, see `_aligned`) (`Backend.fused_projections`): backward computes x's gradient in two products
        instead of six, the second adding into the first's output (`jetnas.ops.fused.shared_input_linear`) instead
        of five adds. Returns
        `(q [B, T, H*K], k, v [B, T, H*V], b [B, T, H], a or None, gate [B, T, H*V] or None)`; b, a and the gate
        are column slices of their product (the gate norm and the gates kernel read them where they lie).
        `normalized` (from `_norm_in_conv`): q and k come back L2-normalised per head by the one conv's kernel.

        Two products, not one: the short conv reads its input contiguous, and q|k|v is that only as a product of
        its own (a slice of a wider one would be copied forward, and its gradient assembled by a copy backward).
        b and a are H columns wide each, too narrow for a product of their own, so they share g's.
        When all three convolutions are static, one conv runs over the `[B, T, 2HK + HV]` product with the
        concatenated conv weights (and initial states), writing q, k and v as three contiguous tensors
        (`short_conv_split`), and its final state is split back by channels, so the cache holds what the separate
        convolutions would have left; otherwise each path's conv runs on its slice.
        """
        HK, HV = self.num_heads * self.head_k_dim, self.num_heads * self.head_v_dim
        sizes = [HK, HK, HV]
        # the gate first, at column 0, and the product's width padded to a multiple of 16 (`_aligned`): a row stride
        # of H*V + 2H columns (594 for 9 heads of 64) left cuBLAS only its 2-element-aligned kernels for it, one of
        # 600 left the gated norm two-byte loads of the gate (3% slower alone; 46 us per layer under the profiler,
        # 9 at 608: benchmarks/results/2026-12-07_h100_gate_stride), and the
        # gated norm reads the gate where it lies (H*V columns of every row)
        names = ["g_proj"] * self.use_output_gate + ["b_proj"] + ["a_proj"] * self.use_decay
        weights, widths = _aligned([getattr(self, n).weight for n in names])
        # both products read x: their gradients for x are summed inside the second backward product
        qkv, bag = shared_input_linear(x, [torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]),
                                           torch.cat(weights)])
        if self._one_conv():
            convs = [getattr(self, self._convs[n]) for n in "qkv"]
            weight = torch.cat([c.weight[:, 0] for c in convs])
            bias = None if convs[0].bias is None else torch.cat([c.bias for c in convs])
            initial = None if state is None else [state.conv.get(n) for n in "qkv"]
            if initial is not None and all(s is None for s in initial):
                initial = None
            elif initial is not None:
                # a path without a state starts from zeros, as the conv itself would start it
                present = next(s for s in initial if s is not None)
                initial = torch.cat([present.new_zeros(present.shape[0], c, present.shape[2]) if s is None else s
                                     for s, c in zip(initial, sizes)], 1)
            # q, k and v each come back contiguous from the Triton kernel: fla's kernels would copy strided ones;
            # without a gradient q and k come back L2-normalised from it too (`_norm_in_conv`)
            (q, k, v), final = short_conv_split(qkv, weight, sizes, bias, initial, state is not None,
                                                convs[0].activation, backend=self.backend,
                                                l2norm_head=self.head_k_dim if normalized else 0)
            if state is not None:
                for name, part in zip("qkv", final.split(sizes, 1)):
                    state.conv[name] = part
        else:
            q, k, v = (self._mix(name, u, x, state, False) for name, u in zip("qkv", qkv.split(sizes, -1)))
        parts = dict(zip(names, bag.split(widths, -1)))
        return q, k, v, parts["b_proj"], parts.get("a_proj"), parts.get("g_proj")

    def _norm_in_conv(self, x: torch.Tensor) -> bool:
        """Whether `_fused_projections` hands q and k over L2-normalised by the one short conv's kernel (its
        epilogue: `short_conv_split`'s `l2norm_head`) rather than the recurrence normalising them in a pass of its
        own: the conv runs on our Triton kernel, no gradient flows (the epilogue has no backward) and the head is a
        power of two within the kernel's channel tile (`Backend.conv_l2norm`; the kernel's own rule,
        `triton_dynamic_conv.l2norm_head_fits`, asked for the conv's input of 2HK + HV channels)."""
        if not (self.backend.conv_l2norm and self.backend.static_conv and self.backend.runs_triton(x)
                and self._one_conv() and not needs_grad(x, *self.parameters())):
            return False
        from jetnas.ops.triton_dynamic_conv import l2norm_head_fits  # Triton runs here: importable

        H, K = self.num_heads, self.head_k_dim
        return l2norm_head_fits(K, x.shape[1], H * (2 * K + self.head_v_dim), self.conv_size, x.is_cuda)

    def _recurrence(self, q, k, v, a, b, mask, state: RecurrentState | None, step: bool, normalized: bool = False):
        """The gated delta rule of a prompt (chunked), or of a decode step whose state cannot be updated in place
        or whose batch has padding; `normalized`: q and k come L2-normalised already. Returns `(o, final_state)`."""
        # g in float32, beta in q's dtype; padded tokens (mask 0): no write (beta = 0) and no decay (g = 0)
        decay = a is not None
        g, beta = gdn_gates(a, b, self.A_log if decay else None, self.dt_bias if decay else None, mask, q.dtype,
                            backend=self.backend)
        if step and updatable(state.recurrent):
            o = gated_delta_rule_step_(q[:, 0], k[:, 0], v[:, 0], None if g is None else g[:, 0],
                                       beta[:, 0], state.recurrent, backend=self.backend)[:, None]
            return o, state.recurrent
        rule = fused_recurrent_gated_delta_rule if step else chunk_gated_delta_rule
        return rule(q, k, v, g, beta, initial_state=None if state is None else state.recurrent,
                    output_final_state=state is not None, use_qk_l2norm=not normalized, backend=self.backend)

    def forward(self, hidden_states, state=None, *, attention_mask=None, position_ids=None,
                position_embeddings=None, use_cache=False):
        x = hidden_states
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        # padded tokens become zeros: no conv input, and below no write (beta = 0) and no decay (g = 0)
        x, mask, state, step = begin_linear(x, state, attention_mask, use_cache)

        fused = self.backend.fused_projections and not step
        normalized = fused and self._norm_in_conv(x)
        if fused:
            q, k, v, b, a, gate = self._fused_projections(x, state, normalized)
        else:
            q = self._mix("q", self.q_proj(x), x, state, step)
            k = self._mix("k", self.k_proj(x), x, state, step)
            v = self._mix("v", self.v_proj(x), x, state, step)
            b = self.b_proj(x)
            a = self.a_proj(x) if self.use_decay else None
        q, k, v = q.view(B, T, H, K), k.view(B, T, H, K), v.view(B, T, H, V)
        if step and updatable(state.recurrent) and mask is None:
            # decode: update the memory in place (one read and one write of it per step), gates made in the step
            o = gated_delta_rule_step_raw_(
                q[:, 0], k[:, 0], v[:, 0], None if a is None else a[:, 0], b[:, 0],
                self.A_log if self.use_decay else None, self.dt_bias if self.use_decay else None, state.recurrent,
                backend=self.backend)[:, None]
            final = state.recurrent
        else:
            o, final = self._recurrence(q, k, v, a, b, mask, state, step, normalized)
        if state is not None:
            state.recurrent = final
            state.seq_length += T
        if not fused:
            gate = self.g_proj(x) if self.use_output_gate else None
        o = self.o_norm(o, None if gate is None else gate.view(B, T, H, V))
        return self.o_proj(o.reshape(B, T, H * V)), state

    def cache_bytes(self, context_length, dtype=torch.bfloat16, state_dtype=torch.float32):
        H, K, V, W = self.num_heads, self.head_k_dim, self.head_v_dim, self.conv_size
        conv_channels = {"q": H * K, "k": H * K, "v": H * V}
        conv = sum(c for name, c in conv_channels.items() if self._convs[name] is not None) * (W - 1)
        return H * K * V * dtype_bytes(state_dtype) + conv * dtype_bytes(dtype)

    def init_from_attention(self, attn: nn.Module) -> list[str]:
        """Inheritance rule: `jetnas.layers.base.inherit_qkvo` (q/k/v/o where the head split matches); the short
        convolution of an inherited path starts as the identity, so the inherited projection is what the
        recurrence sees first."""
        inherited = inherit_qkvo(self, attn, self.num_heads, self.head_k_dim, self.head_v_dim)
        for name in ("q", "k", "v"):
            if f"{name}_proj.weight" in inherited and self._convs[name] is not None:
                getattr(self, self._convs[name]).set_identity()
        return inherited
