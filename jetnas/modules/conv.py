"""Short causal convolutions as modules: static (Gated DeltaNet, DeltaNet, Mamba2) and dynamic (the JetBlock's).

Both follow one state contract: the state is the last `W - 1` inputs `[B, D, W - 1]`; `forward` handles a
whole chunk (prefill/training), `step` one token (decode). Both take the owning layer's backend (a
`jetnas.ops.backend.Backend`, or its name) with every call and hand it to the ops.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from jetnas.ops.conv import dynamic_conv, dynamic_conv_step, short_conv, short_conv_step
from jetnas.ops.decode import conv_step_


def _in_place(x: torch.Tensor, state: torch.Tensor | None) -> bool:
    """Whether a decode step may shift the cached inputs in place: a state of x's dtype, outside autograd."""
    return state is not None and state.dtype == x.dtype and not torch.is_grad_enabled()


def _conv1d_default_init_(w: torch.Tensor, kernel_size: int) -> None:
    # what nn.Conv1d does for a depthwise kernel: kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(W), 1/sqrt(W))
    bound = 1.0 / math.sqrt(kernel_size)
    nn.init.uniform_(w, -bound, bound)


class ShortConvolution(nn.Module):
    """Static depthwise causal conv over time. Parameters as `nn.Conv1d(D, D, W, groups=D)`: `weight [D, 1, W]`,
    optional `bias [D]` (so checkpoints of fla / HF Mamba2 load as they are)."""

    def __init__(self, hidden_size: int, kernel_size: int = 4, bias: bool = False, activation: str | None = "silu"):
        super().__init__()
        self.hidden_size, self.kernel_size, self.activation = hidden_size, kernel_size, activation
        self.weight = nn.Parameter(torch.empty(hidden_size, 1, kernel_size))
        self.bias = nn.Parameter(torch.empty(hidden_size)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _conv1d_default_init_(self.weight, self.kernel_size)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x, state=None, output_final_state=False, cu_seqlens=None, backend="torch"):
        """`x [B, T, D]`, `state [N, D, W-1]` -> `(y [B, T, D], final_state or None)`; a "triton" backend with
        `static_conv` on takes the Triton kernel on CUDA (`jetnas.ops.conv.short_conv`)."""
        return short_conv(x, self.weight[:, 0], self.bias, state, output_final_state, self.activation, cu_seqlens,
                          backend)

    def step(self, x, state, backend="torch"):
        """`x [B, D]`, `state [B, D, W-1]` or None -> `(y [B, D], new_state)`; outside autograd a given state is
        updated in place and returned (`jetnas.ops.decode.conv_step_`)."""
        if _in_place(x, state):
            return conv_step_(x, self.weight[:, 0], self.bias, state, self.activation, backend), state
        return short_conv_step(x, self.weight[:, 0], self.bias, state, self.activation)

    @torch.no_grad()
    def set_identity(self) -> None:
        """Make the conv pass its input through (before the activation): weight = e_last, bias = 0."""
        self.weight.zero_()
        self.weight[..., -1] = 1.0
        if self.bias is not None:
            self.bias.zero_()


class DynamicShortConvolution(nn.Module):
    """The JetBlock's dynamic convolution: a kernel per token and channel, made by a small generator from the
    block input, `kernel_t = w2(silu(w1(x_t)))` reshaped to `[D, W]` (channel-major, like the released weights).

    Initialisation: `w2.weight = 0` and `w2.bias` an ordinary random conv kernel (nn.Conv1d's init), so the block
    starts as a plain static short convolution. `w1` is random, not zero: with both zero, silu(0) = 0 makes the
    gradients of w1 and w2 exactly zero and the generator could never leave its start (dev/LOG.md, 2026-11-23).
    """

    def __init__(
        self,
        hidden_size: int,
        kernel_size: int = 4,
        generator_input_size: int | None = None,
        generator_reduction: int = 8,
        activation: str | None = "silu",
        initializer_range: float = 0.02,
    ):
        super().__init__()
        if hidden_size % generator_reduction:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by generator_reduction={generator_reduction}")
        self.hidden_size, self.kernel_size, self.activation = hidden_size, kernel_size, activation
        generator_input_size = generator_input_size or hidden_size
        generator_hidden = hidden_size // generator_reduction
        self.kernel_generator = nn.Sequential(OrderedDict(
            w1=nn.Linear(generator_input_size, generator_hidden, bias=False),
            act=nn.SiLU(),
            w2=nn.Linear(generator_hidden, hidden_size * kernel_size, bias=True),
        ))
        self.initializer_range = initializer_range
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.kernel_generator.w1.weight, std=self.initializer_range)
        nn.init.zeros_(self.kernel_generator.w2.weight)
        _conv1d_default_init_(self.kernel_generator.w2.bias, self.kernel_size)

    def kernels(self, generator_input: torch.Tensor) -> torch.Tensor:
        """`[..., Din]` -> `[..., D, W]`."""
        return self.kernel_generator(generator_input).unflatten(-1, (self.hidden_size, self.kernel_size))

    def forward(self, x, generator_input, state=None, output_final_state=False, cu_seqlens=None, backend="torch"):
        """`x [B, T, D]`, `generator_input [B, T, Din]`, `state [N, D, W-1]` -> `(y [B, T, D], final_state)`."""
        return dynamic_conv(x, self.kernels(generator_input), state, output_final_state, self.activation, cu_seqlens,
                            backend)

    def step(self, x, generator_input, state, backend="torch"):
        """`x [B, D]`, `generator_input [B, Din]`, `state [B, D, W-1]` or None -> `(y [B, D], new_state)`; outside
        autograd a given state is updated in place and returned."""
        if _in_place(x, state):
            return conv_step_(x, self.kernels(generator_input), None, state, self.activation, backend), state
        return dynamic_conv_step(x, self.kernels(generator_input), state, self.activation)

    @torch.no_grad()
    def set_identity(self) -> None:
        """Static part = pass-through (last tap 1), dynamic part = 0: the conv starts as the identity."""
        self.kernel_generator.w2.weight.zero_()
        bias = self.kernel_generator.w2.bias.view(self.hidden_size, self.kernel_size)
        bias.zero_()
        bias[:, -1] = 1.0
