"""Layer-wise alignment ("attention transfer", LoLCATs, arXiv 2410.10254, section 3.1): before end-to-end
distillation, each linear block of a hybrid is trained to reproduce the output of the teacher's token mixer at the
same layer, from the very input that mixer received inside the teacher.

Per batch the teacher runs once without gradients; forward hooks on its token mixers capture, for every aligned
layer i, the normed input `x_i [B, T, D]` its mixer received and the mixer's output `y_i [B, T, D]` (plus the
mask and positions the model passed it). Each student block then computes `block_i(x_i)`; the loss is the mean over
layers of the relative MSE `||block_i(x_i) - y_i||^2 / ||y_i||^2`, per sequence and averaged over sequences (like
`jetnas.nas.distill.distill_terms` for hidden states: a mean of per-sequence terms, so DDP ranks and micro-batches
average to the whole batch's loss). The inputs are the teacher's, so the layers are independent and all train in
one step, and no backward runs through an LM head, an MLP or a norm: one teacher forward plus one block forward and
backward per aligned layer. The teacher's forward stops after the last aligned layer.

Use with the shared trainer (checkpoints and exact resume come with it):

    layers = alignment_layers(hybrid)                     # every linear layer by default
    aligner = LayerAligner(hybrid, layers)                # the blocks, shared with the hybrid (no copy)
    set_align_trainable(hybrid, layers)                   # only those blocks' parameters train
    Trainer(config, aligner, make_align_loss(teacher), stream, evaluate=make_align_eval(teacher, heldout)).fit()

or `train_alignment(hybrid, teacher, stream, config)`, which does the four lines. The trainer's model is the
`LayerAligner`, not the hybrid: under torchrun the gradient synchronisation of DDP (and FSDP's gathering) only
happens for modules called through the wrapped model, so the blocks must be called through a module the trainer
wraps. Its checkpoints hold the aligned blocks' parameters only (`blocks.<layer>.<name>`); the hybrid is updated in
place, and after `fit` it is the aligned hybrid (save it as stage 1 does, from the hybrid itself).

The teacher must be a jetnas model layer-aligned with the hybrid (what `jetnas.train.stages.load_stage_teacher`
returns: a Llama/Qwen teacher converted to all-attention jetnas); its mixer at layer i is the target of the
hybrid's block at layer i.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from jetnas.layers import ATTENTION_TYPES, Attention
from jetnas.train.data import TokenStream
from jetnas.train.mixture import split_answer_flags
from jetnas.train.trainer import TrainConfig, Trainer


def _decoder(model: nn.Module) -> nn.Module:
    """The `JetNemotronModel` inside a `JetNemotronForCausalLM` (or the model itself)."""
    base = getattr(model, "model", model)
    if not isinstance(getattr(base, "layers", None), nn.ModuleList):
        raise TypeError(f"expected a jetnas model with .model.layers, got {type(model).__name__}")
    return base


def alignment_layers(model: nn.Module, layers: Sequence[int] | None = None) -> list[int]:
    """The layer indices to align: `layers` checked (sorted, distinct, in range, none of type `attn`, whose block
    is the teacher's already), or by default every layer whose block type is not `attn` / `swa`."""
    types = list(model.config.block_types)
    if layers is None:
        chosen = [i for i, t in enumerate(types) if t not in ATTENTION_TYPES]
    else:
        chosen = sorted({int(i) for i in layers})
        bad = [i for i in chosen if not 0 <= i < len(types)]
        if bad:
            raise ValueError(f"layers {bad} are outside the model's {len(types)} layers")
        full = [i for i in chosen if types[i] == "attn"]
        if full:
            raise ValueError(f"layers {full} are full attention (the teacher's own weights): nothing to align")
    if not chosen:
        raise ValueError(f"no layer to align: block types {types}")
    return chosen


def set_align_trainable(model: nn.Module, layers: Sequence[int]) -> dict[str, int]:
    """Only the token mixers (`self_attn`) of `layers` train; every other parameter of `model` is frozen. Returns
    `{"parameters", "trainable_parameters"}`."""
    prefixes = tuple(f"model.layers.{i}.self_attn." for i in layers)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
    params = list(model.parameters())
    return {"parameters": sum(p.numel() for p in params),
            "trainable_parameters": sum(p.numel() for p in params if p.requires_grad)}


@dataclass
class TeacherIO:
    """What the teacher's token mixers received and returned, for the aligned layers in order.

    Attributes:
        layers: layer indices.
        inputs: per layer, `x_i [B, T, D]`, the normed hidden state the mixer received.
        outputs: per layer, `y_i [B, T, D]`, the mixer's output (before the residual add).
        attention_mask: `[B, T]` 0/1 padding mask the model passed (None: no padding).
        position_ids: `[B, T]` positions the model passed.
        position_embeddings: RoPE `(cos, sin)` the model passed to its attention layers.
    """

    layers: list[int]
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None


class _Captured(Exception):
    """Raised by the last hook: the layers after it are not needed."""


@torch.no_grad()
def capture_teacher_io(teacher: nn.Module, input_ids: torch.Tensor, layers: Sequence[int],
                       attention_mask: torch.Tensor | None = None) -> TeacherIO:
    """Run `teacher` on `input_ids [B, T]` (with an optional `[B, T]` 0/1 padding mask, left padding as
    `generate` uses) up to the last of `layers`, and capture its mixers' inputs and outputs there (see `TeacherIO`).
    The tensors are those of the teacher's own forward (no recomputation), without gradients."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got {list(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {list(attention_mask.shape)} must match input_ids {list(input_ids.shape)}")
    base = _decoder(teacher)
    layers = list(layers)
    if not layers or min(layers) < 0 or max(layers) >= len(base.layers):
        raise ValueError(f"layers {layers} must be non-empty and within the teacher's {len(base.layers)} layers")
    inputs, outputs, call = {}, {}, {}
    last = max(layers)

    def hook(i):
        def capture(module, args, kwargs, output):
            inputs[i], outputs[i] = args[0], output[0]
            if not call:
                call.update(kwargs)
            if i == last:
                raise _Captured

        return capture

    handles = [base.layers[i].self_attn.register_forward_hook(hook(i), with_kwargs=True) for i in layers]
    try:
        base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Captured:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [i for i in layers if i not in outputs]
    if missing:
        raise RuntimeError(f"the teacher's forward never called the token mixers of layers {missing}")
    return TeacherIO(layers, [inputs[i] for i in layers], [outputs[i] for i in layers],
                     call.get("attention_mask"), call.get("position_ids"), call.get("position_embeddings"))


class LayerAligner(nn.Module):
    """The token mixers of `layers` of `model` (the same modules: training them trains the hybrid), called on
    the teacher's captured inputs. This is the module the trainer optimises (see the module docstring).

    Args:
        model: the hybrid (`JetNemotronForCausalLM`).
        layers: the layers to align (`alignment_layers`).
    """

    def __init__(self, model: nn.Module, layers: Sequence[int]):
        super().__init__()
        base = _decoder(model)
        self.layers = alignment_layers(model, layers)
        self.blocks = nn.ModuleDict({str(i): base.layers[i].self_attn for i in self.layers})

    def fsdp_units(self) -> list[nn.Module]:
        """FSDP2 shards each block on its own (each is called through its own forward, so its hooks gather it)."""
        return list(self.blocks.values())

    def forward(self, io: TeacherIO) -> list[torch.Tensor]:
        """Each block on its captured input: `[B, T, D]` per layer, in `self.layers` order."""
        if io.layers != self.layers:
            raise ValueError(f"captured layers {io.layers} are not the aligner's {self.layers}")
        outs = []
        for i, x in zip(self.layers, io.inputs):
            block = self.blocks[str(i)]
            # as the decoder layer calls it: attention gets the RoPE tables, linear blocks none
            rope = io.position_embeddings if isinstance(block, Attention) else None
            out, _ = block(x, None, attention_mask=io.attention_mask, position_ids=io.position_ids,
                           position_embeddings=rope)
            outs.append(out)
        return outs


def relative_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per sequence, `mean((student - teacher)^2) / mean(teacher^2)` over the real tokens (`mask [B, T]`, 1 =
    real; None: all) and the width: `[B]` float32. Inputs `[B, T, D]`, any float dtype."""
    if student.shape != teacher.shape or student.dim() != 3:
        raise ValueError(f"student {list(student.shape)} and teacher {list(teacher.shape)} must both be [B, T, D]")
    s, t = student.float(), teacher.float()
    err, norm = (s - t).pow(2).mean(-1), t.pow(2).mean(-1)
    if mask is None:
        return err.mean(-1) / norm.mean(-1).clamp_min(1e-12)
    m = mask.to(err.dtype)
    # the token count cancels in the ratio
    return (err * m).sum(-1) / (norm * m).sum(-1).clamp_min(1e-12)


def alignment_terms(outputs: Sequence[torch.Tensor], io: TeacherIO) -> torch.Tensor:
    """`[L]`: each aligned layer's relative MSE, averaged over the sequences."""
    return torch.stack([relative_mse(o, y, io.attention_mask).mean() for o, y in zip(outputs, io.outputs)])


def _metrics(layers: Sequence[int], terms: torch.Tensor) -> dict[str, float]:
    values = terms.detach().float().cpu().tolist()
    return {"align": sum(values) / len(values), **{f"align/{i}": v for i, v in zip(layers, values)}}


def _split(batch_ids: torch.Tensor, mask: torch.Tensor | None):
    # windows are `seq_len + 1` tokens (inputs and next-token labels): the inputs are what the stages train on; a
    # batch with answer flags (`[B, 2, T + 1]`, `jetnas.train.mixture`) gives its ids (the layer-wise loss has no
    # per-token term to weight)
    batch_ids, _ = split_answer_flags(batch_ids)
    return batch_ids[:, :-1], None if mask is None else mask[:, :-1]


def make_align_loss(teacher: nn.Module):
    """`loss_fn(model, batch, step) -> (loss, metrics)` for the trainer, `model` a (possibly wrapped)
    `LayerAligner`; `batch = {"input_ids": [B, T + 1]}` (or `[B, 2, T + 1]` with answer flags, of which only the
    ids are read; and optionally `"attention_mask": [B, T + 1]`).
    `loss` is the mean over the aligned layers of the relative MSE; metrics: `align` (the same value) and
    `align/<layer>` per layer (which layers align badly)."""

    def loss_fn(model, batch, step):
        aligner = getattr(model, "module", model)  # the layer list lives on the unwrapped module
        ids, mask = _split(batch["input_ids"], batch.get("attention_mask"))
        io = capture_teacher_io(teacher, ids, aligner.layers, mask)
        terms = alignment_terms(model(io), io)
        return terms.mean(), _metrics(aligner.layers, terms)

    return loss_fn


def make_align_eval(teacher: nn.Module, heldout: torch.Tensor | None):
    """`evaluate(model) -> {"align": ..., "align/<layer>": ...}` on fixed held-out windows `heldout [N, T + 1]`
    (e.g. `TokenStream.window_batch`); None when `heldout` is None."""
    if heldout is None:
        return None

    @torch.no_grad()
    def evaluate(model):
        aligner = getattr(model, "module", model)
        io = capture_teacher_io(teacher, _split(heldout, None)[0], aligner.layers)
        return _metrics(aligner.layers, alignment_terms(model(io), io))

    return evaluate


def train_alignment(model: nn.Module, teacher: nn.Module, data: TokenStream, config: TrainConfig,
                    layers: Sequence[int] | None = None, heldout: TokenStream | None = None, eval_windows: int = 4,
                    batcher=None) -> dict:
    """Align `model`'s blocks of `layers` (default: every linear layer) to `teacher` for `config.steps` steps and
    return the trainer's summary; `model` is updated in place and left with only those blocks trainable.

    Args:
        model, teacher: the hybrid and its layer-aligned teacher, on one device.
        data: training tokens; `batcher`, if given, replaces the trainer's batcher (e.g. a weighted mixture's).
        config: the trainer's configuration (`out_dir` gets the log and the checkpoints of the blocks).
        heldout: tokens for the held-out alignment loss (up to `eval_windows` windows of `config.seq_len`, as many as
            it holds), or None.
    """
    layers = alignment_layers(model, layers)
    set_align_trainable(model, layers)
    aligner = LayerAligner(model, layers)
    # as many windows (of seq_len + 1 tokens: inputs and labels) as the held-out tail holds, up to eval_windows, as
    # the stages' held-out evaluation takes them (16,384 held-out tokens hold 3 windows of 4,096, not 4)
    n = 0 if heldout is None else min(eval_windows, (len(heldout) - 1) // config.seq_len)
    fixed = heldout.window_batch(n, config.seq_len, device=next(model.parameters()).device) if n >= 1 else None
    trainer = Trainer(config, aligner, make_align_loss(teacher), data, evaluate=make_align_eval(teacher, fixed))
    if batcher is not None:
        trainer.batcher = batcher
    return trainer.fit()
