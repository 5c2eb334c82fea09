"""The PostNAS once-for-all super-network (paper, section 2.2, step 1).

Every layer keeps its pretrained attention, usable as full attention (`attn`) or, with the same weights and a
window, as sliding-window attention (`swa`), and gains a trainable linear-attention path (GLA by default, any zoo
block by name). Embeddings, norms, MLPs and the attention weights are the teacher's and frozen: only the linear
paths train. A sub-network is a per-layer choice among "attn", "swa" and "linear"; the all-"attn" sub-network is
the teacher itself.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from jetnas.files import atomic_path, write_json_atomic
from jetnas.layers import LINEAR_LAYERS, build_layer

CHOICES = ("attn", "swa", "linear")


def layer_inputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, start: int,
                 hidden: torch.Tensor | None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The input of layer `start` (the embeddings when start is 0, else `hidden`, which must then be given) and the
    rotary `(cos, sin)` of `input_ids [B, T]`'s positions (right-padded rows count from their first token)."""
    B, T = input_ids.shape
    if (start == 0) != (hidden is None):
        raise ValueError(f"give the input hidden state exactly when starting after layer 0 (start={start})")
    h = model.embed_tokens(input_ids) if hidden is None else hidden
    if attention_mask is not None:
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    else:
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
    return h, model.rotary_emb(h, positions)


@dataclass
class SuperNetSpec:
    """What a super-network is, enough to rebuild it: the teacher (registry name or path), the linear block type
    and its arguments, the sliding window, and whether linear paths inherited the attention weights."""

    teacher: str
    linear_type: str = "gla"
    linear_kwargs: dict = field(default_factory=dict)
    swa_window: int = 512
    inherit: bool = True

    def __post_init__(self):
        if self.linear_type not in LINEAR_LAYERS:
            raise ValueError(f"linear_type must be one of {', '.join(LINEAR_LAYERS)}, got {self.linear_type!r}")
        if self.swa_window < 1:
            raise ValueError(f"swa_window must be >= 1, got {self.swa_window}")


class SuperNet(nn.Module):
    """A teacher with a linear path beside every attention layer.

    Args:
        base: the teacher as a jetnas model with every layer `attn` (see `jetnas.models.convert.as_jetnas`);
            it is frozen here.
        spec: the linear block and window (see `SuperNetSpec`).
    """

    def __init__(self, base: nn.Module, spec: SuperNetSpec):
        super().__init__()
        if any(t != "attn" for t in base.config.block_types):
            raise ValueError(f"the super-network's base must be all-attention, got {base.config.block_types}")
        self.spec = spec
        self.base = base.requires_grad_(False)
        config = base.config
        kwargs = {**self._default_linear_kwargs(config, spec.linear_type), **spec.linear_kwargs}
        param = next(base.parameters())
        with torch.device(param.device):
            self.linear = nn.ModuleList(build_layer(spec.linear_type, config.hidden_size, **kwargs)
                                        for _ in range(config.num_hidden_layers))
        self.linear.to(param.dtype)
        # under low-precision autocast the forward runs a copy of the frozen base whose Linear weights are cast once
        # (`forward_base`); off: every forward casts them again, as autocast does for frozen weights
        self.cast_frozen = True
        self.inherited = []
        if spec.inherit:
            for layer, block in zip(base.model.layers, self.linear):
                self.inherited.append(block.init_from_attention(layer.self_attn))

    def forward_base(self) -> nn.Module:
        """The frozen base as a forward runs it. Under bf16 / fp16 autocast on its device, a copy whose `nn.Linear`
        weights are stored in the autocast dtype (`jetnas.train.frozen.autocast_copy`, made once and kept while the
        base's device and dtype stay; everything else shared): autocast caches no cast of a frozen weight, so each
        forward would cast the base's float32 Linear weights again (the teacher pass and the sub-network's, every
        step), to the same values; the copy's results are the original's bit for bit. The base itself otherwise,
        with `cast_frozen` off, or when its parameters are sharded (FSDP's DTensors: the copy would hold whole
        weights beside the shards)."""
        head = self.base.lm_head.weight
        device = head.device.type
        if not (self.cast_frozen and torch.is_autocast_enabled(device)):
            return self.base
        dtype = torch.get_autocast_dtype(device)
        if dtype not in (torch.bfloat16, torch.float16) or head.dtype == dtype or type(head.data) is not torch.Tensor:
            return self.base
        key = (dtype, head.device, head.dtype)
        cached = self.__dict__.get("_cast_base")
        if cached is None or cached[0] != key:
            from jetnas.train.frozen import autocast_copy

            # kept out of the module tree (no parameters, state dict or device moves of its own)
            self.__dict__["_cast_base"] = cached = (key, autocast_copy(self.base, dtype))
        return cached[1]

    @staticmethod
    def _default_linear_kwargs(config, linear_type: str) -> dict:
        """Linear paths shaped like the attention they sit beside (so they can inherit its Q/K/V/O)."""
        heads, hd = config.num_attention_heads, config.head_dim
        if linear_type == "mamba2":
            return dict(num_heads=heads, head_dim=hd, state_size=hd, n_groups=heads)
        if linear_type == "jet":
            return dict(num_heads=heads, head_k_dim=hd, head_v_dim=2 * hd)
        return dict(num_heads=heads, head_k_dim=hd, head_v_dim=hd)

    @property
    def num_layers(self) -> int:
        return len(self.linear)

    def check_choice(self, choice: Sequence[str]) -> tuple[str, ...]:
        choice = tuple(choice)
        if len(choice) != self.num_layers or not set(choice) <= set(CHOICES):
            raise ValueError(f"a sub-network is one of {CHOICES} per layer ({self.num_layers} layers), got {choice}")
        return choice

    def forward(
        self,
        input_ids: torch.Tensor,
        choice: Sequence[str],
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        logits: bool = True,
    ) -> tuple[torch.Tensor | None, tuple[torch.Tensor, ...] | None]:
        """Run one sub-network.

        Args:
            input_ids: `[B, T]`.
            choice: per layer "attn", "swa" or "linear".
            attention_mask: `[B, T]` padding mask (1 = real token).
            output_hidden_states: also return the hidden state after each layer (`[B, T, D]` each, L of them).
            logits: compute the LM head's logits (False when only the hidden states are distilled: the `[B, T, V]`
                product and its buffer are the largest of the step's).

        Returns:
            `(logits [B, T, V] or None, hidden states or None)`.
        """
        out, states = self.run_layers(input_ids, choice, attention_mask, logits=logits)
        return out, tuple(states[1:]) if output_hidden_states else None

    def run_layers(self, input_ids: torch.Tensor, choice: Sequence[str], attention_mask: torch.Tensor | None = None,
                   start: int = 0, hidden: torch.Tensor | None = None, logits: bool = True,
                   positions: torch.Tensor | None = None) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """`forward` from layer `start` on, given `hidden`, the input of that layer (from an earlier run whose
        choices agree on layers `0 .. start - 1`: the placement search's sub-networks differ in one layer from the
        one before them). Returns `(logits or None, states)`: states[j] is the input of layer start + j, the last
        one the output of the last layer. `positions` (`[N]` int64 into the flattened `[B * T]` positions): the
        logits of those positions only, `[N, V]` (the LM head is a fifth of a SmolLM2-135M forward per position;
        a retrieval task scores a few positions of each row)."""
        choice = self.check_choice(choice)
        base = self.forward_base()
        model = base.model
        h, rope = layer_inputs(model, input_ids, attention_mask, start, hidden)
        states = [h]
        # each residual add runs inside the norm after it (`RMSNorm.add_forward`: one kernel each way with the
        # backend's `fused_residual`, else the plain add then the norm, as before): the MLP's add inside the next
        # layer's input norm, the last one inside the final norm, as the model's own loop does. Before, the step ran
        # 2 adds and 2 norms per layer each way; float32 add kernels took ~16 of the super-network step's 158 GPU-ms
        # (H100, 2026-12-06_h100_train_prefill_after; the profile does not say how many of them are these adds)
        x = model.layers[start].input_layernorm(h) if start < self.num_layers else model.norm(h)
        for i in range(start, self.num_layers):
            layer, block, c = model.layers[i], self.linear[i], choice[i]
            if c == "linear":
                mixed, _ = block(x, attention_mask=attention_mask)
            else:
                window = self.spec.swa_window if c == "swa" else None
                mixed, _ = layer.self_attn.attend(x, None, window, attention_mask=attention_mask,
                                                  position_embeddings=rope)
            h, normed = layer.post_attention_layernorm.add_forward(h, mixed)
            out = layer.mlp(normed)
            if i + 1 < self.num_layers:
                h, x = model.layers[i + 1].input_layernorm.add_forward(h, out)
            elif logits:
                h, x = model.norm.add_forward(h, out)
            else:
                h = h + out
            states.append(h)
        if not logits:
            return None, states
        return base.lm_head(x if positions is None else x.reshape(-1, x.shape[-1])[positions]), states

    def fsdp_units(self) -> list[nn.Module]:
        """What FSDP2 shards block by block: the linear paths (called through their own forward). The teacher's
        layers are used piecewise (`run_layers` calls their norms, attention and MLP directly), so they stay with
        the root, gathered for the whole forward; they are frozen, so no optimizer state is lost to that."""
        return list(self.linear)

    def teacher_choice(self) -> tuple[str, ...]:
        return ("attn",) * self.num_layers

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The linear paths: all a super-network adds to its teacher."""
        return {f"linear.{k}": v for k, v in self.linear.state_dict().items()}

    def save(self, out_dir: str | Path, extra: dict | None = None,
             state: dict[str, torch.Tensor] | None = None) -> None:
        """`supernet.json` (spec) and `linear.safetensors` (the trained linear paths), written atomically. `state`:
        the linear paths' tensors when they had to be gathered first (FSDP shards: `distributed.gather_full`)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu()
                 for k, v in (self.trainable_state_dict() if state is None else state).items()}
        with atomic_path(out / "linear.safetensors") as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        write_json_atomic(out / "supernet.json", {"spec": asdict(self.spec), **(extra or {})})


def build_supernet(spec: SuperNetSpec, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The teacher from the registry as an all-attention jetnas model (`jetnas.models.convert.as_jetnas`), with
    linear paths: returns `(supernet, tokenizer, teacher)`."""
    from jetnas.models.convert import as_jetnas
    from jetnas.models.teachers import load_teacher

    model, tokenizer, teacher = load_teacher(spec.teacher, dtype=dtype, device=device)
    return SuperNet(as_jetnas(model), spec), tokenizer, teacher


def load_supernet(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Rebuild a saved super-network (its teacher comes from the registry again): `(supernet, tokenizer, meta)`."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "supernet.json").exists():
        raise FileNotFoundError(f"{str(path)!r} is not a super-network directory (no supernet.json)")
    meta = json.loads((path / "supernet.json").read_text())
    spec = SuperNetSpec(**meta["spec"])
    supernet, tokenizer, _ = build_supernet(spec, dtype=dtype, device=device)
    state = load_file(str(path / "linear.safetensors"), device=str(device))
    supernet.linear.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})
    return supernet, tokenizer, meta
