"""The two training stages after the search (paper, section 2.1; DESIGN.md, "Training after the search"), as
recipes on the shared `Trainer` (resume, gradient accumulation, bf16 autocast on GPU, DDP/FSDP under torchrun).

**Stage 1** (paper: 50B tokens). The hybrid (converted from the teacher with the searched layer types, or an
existing hybrid directory) with embeddings, norms, MLPs and LM head frozen: only the token mixers (every layer's
`self_attn`, the kept attention layers included) train, on distillation from the teacher:
`hidden_weight` x mean over layers of the relative hidden-state MSE (`jetnas.train.losses.distill_terms`) +
`kl_weight` x KL(teacher || student) of the next-token distributions (+ `lm_weight` x cross-entropy, 0 by default).

**Stage 2** (paper: 350B tokens, more math and code). Every parameter trains on `lm_weight` x cross-entropy
(1 by default) + optional `kl_weight` x KL (and `hidden_weight` x hidden MSE), over a weighted data mixture
(`jetnas.train.mixture`: `data="web.bin:0.7,math.jsonl:0.3"`).

The teacher, when a loss term needs it, runs without gradients once per micro-batch, or once per optimizer step on the
rank's whole batch (`teacher_per_step`); it is the teacher converted to an all-attention jetnas model (identical
logits), so its hidden states line up with the student's layer by layer.

A stage writes under `out_dir`: `stage_config.json` (the resolved `StageConfig`, layer types and block options),
the trainer's `train_config.json`, `log.jsonl` and `checkpoints/` (exact resume), and `model/`: a
`save_pretrained` directory (safetensors, config, tokenizer, `jetnas_stage.json`) that
`AutoModelForCausalLM.from_pretrained` loads after `import jetnas`.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from jetnas.files import atomic_dir, write_json_atomic
from jetnas.models.layer_types import merge_block_configs, resolve_layer_types
from jetnas.train import distributed as dist_utils
from jetnas.train.losses import distill_terms, head_terms, lm_loss_terms, logits_kl_terms
from jetnas.train.mixture import Mixture, carries_answer_spans, data_sources, resolve_mixture, split_answer_flags
from jetnas.train.checkpoint import check_finite
from jetnas.train.data import check_doc_starts
from jetnas.train.frozen import autocast_copy
from jetnas.train.trainer import TrainConfig, Trainer, uses_bf16
from jetnas.validation import read_json

#: per stage, the defaults of the fields left None
STAGE_DEFAULTS = {
    1: {"lr": 1e-3, "hidden_weight": 1.0, "kl_weight": 1.0, "lm_weight": 0.0},
    2: {"lr": 3e-4, "hidden_weight": 0.0, "kl_weight": 0.0, "lm_weight": 1.0},
}


@dataclass
class StageConfig:
    """One training stage (written to `out_dir/stage_config.json`).

    Attributes:
        stage: 1 (frozen MLPs, distillation) or 2 (everything trains, language-model loss).
        teacher: the teacher (registry name, model directory, .gguf, hub id): the distillation target, the source
            of the converted hybrid, and of the tokenizer and generated text when needed.
        model: an existing hybrid directory to start from (e.g. stage 1's `model/` for stage 2); or None, to
            convert the teacher with `layer_types`.
        layer_types: per layer `attn`, `swa` or a linear block / block candidate (`jet`, `gdn`, `jet-dyn-qk`,
            `jet:qk_conv=static`, `jet*12`; see `jetnas.models.layer_types`), or a preset name.
        block_config: `efficient_attention_config` overrides per block type, e.g. `{"jet": {"num_heads": 12,
            "head_dim": 96, "expand_v": 2.6667}, "swa": {"window_size": 1152}}`.
        swa_window: the window of `swa` layers (merged into block_config).
        data: a data spec or weighted mixture (`jetnas.train.mixture`); None: text the teacher generates.
        steps, batch_size, micro_batch_size, seq_len, lr, min_lr_ratio, warmup_steps, weight_decay, grad_clip:
            as `TrainConfig`; lr None: the stage's default (1e-3, 3e-4); warmup None: 5% of the steps.
        hidden_weight, kl_weight, lm_weight: loss weights; None: the stage's defaults (stage 1: 1, 1, 0;
            stage 2: 0, 0, 1). Stage 1 needs a distillation term, stage 2 a positive lm_weight.
        temperature: of the KL term.
        answer_weight: answer-weighted distillation: the KL and cross-entropy terms of every position whose label
            (the next token) lies inside an answer span of a recall document (`jetnas.train.recall_data`'s
            `<bin>.spans.npy`) count `answer_weight` times in the loss (`sum_t w_t term_t / N`, N every position as
            in the plain means: ordinary tokens keep exactly their gradient, answer tokens get answer_weight times
            theirs), so the gradient leans on the tokens that need looking back. The hidden-state term, the
            logged `kl` / `lm` (unweighted means, comparable with any run) and the held-out evaluation are
            unchanged. > 0; 1 (the default) is the plain loss, bit for bit the same batches and losses. Any other
            value needs a source of `data` that carries answer spans (a recall .bin with its .spans.npy).
        doc_starts: the share of the rows of text sources that start at a document's first token (the token after
            an end-of-document id) instead of on the fixed grid of `seq_len` (`jetnas.train.data.WindowBatcher`):
            rows that read a document's opening from a fresh state, as an evaluation's prompts are read (HellaSwag's
            fit in 128 tokens). In [0, 1]; 0 (the default): the grid, bit for bit the same batches. Recall
            documents keep their grid. Both the alignment phase's and the stage's batches use it.
        heldout_tokens: held out of every data source's tail for the held-out loss (0: none).
        eval_windows: held-out windows of `seq_len` per source scored at each evaluation.
        eval_tasks: built-in evaluation tasks (`jetnas.evaluation.tasks.parse_task` specs, comma-separated, e.g.
            `retrieval:needle@4096?n=50&seed=1,retrieval:mqar@1024?n=50&seed=1`) scored on the student at each
            evaluation beside the held-out losses, as `task/<spec>/<metric>`: how an ability grows with tokens, and a
            development set to steer a recipe by (another seed's retrieval rows than the ones reported). None: none.
        eval_batch_size: sequences per forward pass of `eval_tasks`.
        generated_tokens: how much teacher text to generate when `data` is None.
        eval_every, save_every, keep_checkpoints, log_every: cadence (save_every None: a quarter of the steps).
        teacher_per_step: with micro-batches (`micro_batch_size` below the rank's share of `batch_size`), run the
            teacher once per optimizer step on the rank's whole batch and give each micro-batch its rows, instead of
            once per micro-batch. The same numbers (up to the rounding of a larger matrix product); a step with A
            micro-batches then launches A - 1 fewer teacher forwards, which a host-bound GPU step pays for in time
            (a teacher forward is 28% of the launches of the SmolLM2-135M hybrid's whole-batch stage-1 step,
            benchmarks/launch_count.py; issue 16). It holds the teacher's hidden states of the whole batch through
            the step instead of a micro-batch's: (layers + 1) x hidden x 4 bytes per token (float32), 71 KB for
            SmolLM2-135M, so 16 more sequences of 1,024 tokens are 1.2 GB beside the 15.6 GB peak measured for its
            stage-1 step in micro-batches of 16 (H100, 2026-12-06). Off by default, since micro-batching is there
            to bound memory. No effect without micro-batches or without a teacher term.
        seed: initialisation of new blocks, data order, mixture sampling.
        precision, distributed, resume: as `TrainConfig`.
        cuda_graph: the step captured in a CUDA graph and replayed (`jetnas.train.graph_step`; not the alignment
            phase): True, False, or "auto" (the default): on for one process on a CUDA device, where it measured
            1.24x the eager stage-1 step (one H100, 2026-12-06, `benchmarks/results/2026-12-06_h100_graph_step`),
            off on CPU and under torchrun. A capture that fails or disagrees with the eager step falls back to
            eager steps with one message.
        out_dir: the stage's directory.
        device: cpu, cuda, ...; None: cuda when available (torchrun: each rank's GPU).
        save_model: write `out_dir/model` at the end.
    """

    stage: int
    teacher: str = "smollm2-135m"
    model: str | None = None
    layer_types: str | list[str] | None = None
    block_config: dict | None = None
    swa_window: int | None = None
    data: str | None = None
    steps: int = 1000
    batch_size: int = 8
    micro_batch_size: int | None = None
    seq_len: int = 512
    lr: float | None = None
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    hidden_weight: float | None = None
    kl_weight: float | None = None
    lm_weight: float | None = None
    temperature: float = 1.0
    answer_weight: float = 1.0
    doc_starts: float = 0.0
    align_steps: int = 0
    align_lr: float = 1e-2
    heldout_tokens: int = 16384
    eval_windows: int = 4
    eval_tasks: str | None = None
    eval_batch_size: int = 16
    generated_tokens: int = 200_000
    teacher_per_step: bool = False
    cuda_graph: bool | str = "auto"
    eval_every: int | None = None
    save_every: int | None = None
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0
    precision: str = "auto"
    distributed: str = "auto"
    on_nonfinite: str = "error"
    resume: bool = True
    out_dir: str = "runs/stage"
    device: str | None = None
    save_model: bool = True

    def __post_init__(self):
        if self.stage not in STAGE_DEFAULTS:
            raise ValueError(f"StageConfig.stage={self.stage!r} must be 1 or 2")
        for name, value in STAGE_DEFAULTS[self.stage].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if (self.model is None) == (self.layer_types is None):
            raise ValueError(f"stage {self.stage}: give exactly one of model (a hybrid directory) and layer_types "
                             f"(to convert the teacher); got model={self.model!r}, layer_types={self.layer_types!r}")
        for name in ("hidden_weight", "kl_weight", "lm_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"StageConfig.{name}={getattr(self, name)!r} must be >= 0")
        if self.stage == 1 and self.hidden_weight + self.kl_weight == 0:
            raise ValueError("stage 1 distils from the teacher: hidden_weight and kl_weight cannot both be 0")
        if self.stage == 2 and self.lm_weight <= 0:
            raise ValueError(f"stage 2 trains on the language-model loss: lm_weight={self.lm_weight!r} must be > 0")
        if self.temperature <= 0:
            raise ValueError(f"StageConfig.temperature={self.temperature!r} must be > 0")
        self.check_answer_weight()
        check_doc_starts(self.doc_starts)
        if self.heldout_tokens < 0 or self.eval_windows < 0:
            raise ValueError(f"heldout_tokens={self.heldout_tokens} and eval_windows={self.eval_windows} must be >= 0")
        if self.eval_batch_size < 1:
            raise ValueError(f"StageConfig.eval_batch_size={self.eval_batch_size!r} must be >= 1")
        self.stage_tasks()  # a bad task spec fails now, not at the first evaluation
        if self.swa_window is not None and self.swa_window < 1:
            raise ValueError(f"StageConfig.swa_window={self.swa_window!r} must be >= 1")
        if self.align_steps < 0 or self.align_lr <= 0:
            raise ValueError(f"StageConfig.align_steps={self.align_steps!r} must be >= 0 and align_lr="
                             f"{self.align_lr!r} > 0")
        if not isinstance(self.teacher_per_step, bool):
            raise ValueError(f"StageConfig.teacher_per_step={self.teacher_per_step!r} must be True or False")
        if self.cuda_graph not in (True, False, "auto"):
            raise ValueError(f"StageConfig.cuda_graph={self.cuda_graph!r} must be true, false or 'auto'")
        if self.cuda_graph is True and dist_utils.local_device(self.device).type != "cuda":
            raise ValueError(f"StageConfig.cuda_graph=True needs a CUDA device, got device={self.device!r} (resolved "
                             f"to {dist_utils.local_device(self.device)})")
        if self.align_steps and self.stage != 1:
            raise ValueError(f"the alignment phase belongs to stage 1 (align_steps={self.align_steps}, stage "
                             f"{self.stage})")
        self.train_config()  # validate the trainer's fields now, not after loading models

    def check_answer_weight(self) -> None:
        """`answer_weight` > 0 and finite; when not 1, some source of `data` must carry answer spans (else the
        option would silently train the plain loss). ValueError naming the value or the sources."""
        w = self.answer_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and w > 0):
            raise ValueError(f"StageConfig.answer_weight={w!r} must be a finite number > 0")
        if w == 1:
            return
        sources = data_sources(self.data)
        if not any(carries_answer_spans(source) for source in sources):
            raise ValueError(f"StageConfig.answer_weight={w!r} weights the answer tokens of recall documents, but no "
                             f"source of the data carries answer spans (a recall .bin with its .spans.npy beside "
                             f"it): {sources or ['text the teacher generates (data=None)']}")

    @property
    def answer_flags(self) -> bool:
        """Whether the stage's batches carry answer flags (`answer_weight` != 1)."""
        return self.answer_weight != 1

    @property
    def needs_teacher_forward(self) -> bool:
        """Whether the loss runs the teacher (any distillation term)."""
        return self.hidden_weight > 0 or self.kl_weight > 0

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            steps=self.steps, batch_size=self.batch_size, micro_batch_size=self.micro_batch_size,
            seq_len=self.seq_len, lr=self.lr, min_lr_ratio=self.min_lr_ratio,
            warmup_steps=self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 20),
            weight_decay=self.weight_decay, grad_clip=self.grad_clip, precision=self.precision, seed=self.seed,
            log_every=self.log_every, eval_every=self.eval_every,
            save_every=self.save_every or max(1, self.steps // 4), keep_checkpoints=self.keep_checkpoints,
            out_dir=self.out_dir, resume=self.resume, distributed=self.distributed, on_nonfinite=self.on_nonfinite,
            cuda_graph=self.graph_step())

    def graph_step(self) -> bool:
        """Whether the stage's steps are captured (`cuda_graph` with "auto" resolved here)."""
        if self.cuda_graph == "auto":
            # not under torchrun, even with one process: the captured step refuses a process group
            launched = "RANK" in os.environ or (torch.distributed.is_available() and torch.distributed.is_initialized())
            return dist_utils.local_device(self.device).type == "cuda" and not launched
        return bool(self.cuda_graph)

    def align_config(self) -> TrainConfig:
        """The alignment phase's trainer (`out_dir/align`): the stage's batches, its own steps and learning rate
        (eager steps: its layer-wise loss is not captured)."""
        return dataclasses.replace(
            self.train_config(), steps=self.align_steps, lr=self.align_lr, cuda_graph=False,
            warmup_steps=max(1, self.align_steps // 20), eval_every=None,
            save_every=self.save_every or max(1, self.align_steps // 4), out_dir=str(Path(self.out_dir) / "align"))

    def stage_tasks(self) -> list:
        """The `eval_tasks` as built-in tasks (`parse_eval_tasks`)."""
        return parse_eval_tasks(self.eval_tasks)

    def identity(self, types: list[str], block_config: dict, teacher_name: str) -> dict:
        """What decides the run besides the trainer's own fields (the trainer refuses to resume under others)."""
        return {"stage": self.stage, "teacher": teacher_name, "model": self.model, "layer_types": types,
                "block_config": block_config, "data": self.data, "hidden_weight": self.hidden_weight,
                "kl_weight": self.kl_weight, "lm_weight": self.lm_weight, "temperature": self.temperature,
                "heldout_tokens": self.heldout_tokens, "align_steps": self.align_steps, "align_lr": self.align_lr,
                # only when set: the runs from before the option keep their identity (and resume)
                **({"answer_weight": self.answer_weight} if self.answer_flags else {}),
                **({"doc_starts": self.doc_starts} if self.doc_starts else {})}


def parse_eval_tasks(spec: str | None) -> list:
    """Comma-separated built-in task specs (`jetnas.evaluation.tasks.parse_task`) as tasks; ValueError names a bad
    spec, or one that is a harness task (those load their own data and belong to `jetnas eval`)."""
    from jetnas.evaluation.names import is_builtin
    from jetnas.evaluation.tasks import parse_task

    specs = [t.strip() for t in (spec or "").split(",") if t.strip()]
    harness = [t for t in specs if not is_builtin(t)]
    if harness:
        raise ValueError(f"eval_tasks: {harness} are not built-in tasks (ppl:, mc:, cloze:, retrieval:); harness "
                         f"tasks belong to `jetnas eval`")
    return [parse_task(t) for t in specs]


@dataclass
class StageTeacher:
    """A loaded teacher: the all-attention jetnas model (frozen, eval), its tokenizer, its registry entry, and the
    end-of-document id of its training data."""

    model: torch.nn.Module
    tokenizer: object
    spec: object
    eos_token_id: int | None


def load_stage_teacher(name: str, device: str | torch.device = "cpu") -> StageTeacher:
    """Load a teacher for the stages and searches: as a jetnas model (`jetnas.models.convert.as_jetnas`: a
    Llama/Qwen teacher converted to all attention, same logits, hidden states layer-aligned with a hybrid's; a jetnas
    hybrid as it is), frozen, in eval mode. Kept in float32: it is also the source the students' frozen weights are
    copied from."""
    from jetnas.models.convert import as_jetnas
    from jetnas.models.teachers import load_teacher

    model, tokenizer, spec = load_teacher(name, dtype=torch.float32, device=device)
    model = as_jetnas(model).requires_grad_(False).eval()
    eos = spec.eos_token_id if spec.eos_token_id is not None else tokenizer.eos_token_id
    return StageTeacher(model, tokenizer, spec, eos)


def forward_teacher(config: StageConfig, teacher_model: torch.nn.Module | None,
                    device: str | torch.device) -> torch.nn.Module | None:
    """The teacher module a stage's loss and held-out evaluation run (None when the stage runs no teacher forward).
    Under bf16 autocast, a copy with its Linear weights cast to bf16 once (`jetnas.train.frozen.autocast_copy`):
    autocast does not cache the casts of frozen weights, so the original would be cast again in every forward (332
    cast kernels per stage-1 step of SmolLM2-135M), to the same values. The float32 original stays the source of the
    students' weights and the alignment phase's teacher."""
    if teacher_model is None or not config.needs_teacher_forward:
        return None
    if uses_bf16(config.precision, torch.device(device)):
        return autocast_copy(teacher_model, torch.bfloat16)
    return teacher_model


def set_trainable(model: torch.nn.Module, stage: int) -> dict[str, int]:
    """Stage 1: only the token mixers (`.self_attn.` parameters) train; stage 2: every parameter. Returns the
    parameter counts `{"parameters", "trainable_parameters"}`."""
    if stage not in STAGE_DEFAULTS:
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    for name, p in model.named_parameters():
        p.requires_grad_(stage == 2 or ".self_attn." in name)
    params = list(model.parameters())
    return {"parameters": sum(p.numel() for p in params),
            "trainable_parameters": sum(p.numel() for p in params if p.requires_grad)}


def build_student(config: StageConfig, teacher: StageTeacher | None) -> tuple[torch.nn.Module, list[str], dict]:
    """The model a stage trains, in float32 and train mode, with `set_trainable` applied: the directory
    `config.model`, or the teacher converted with `config.layer_types` (new blocks seeded by `config.seed`;
    linear blocks inherit Q/K/V/O where shapes match). Returns `(model, layer types, block options used)`."""
    swa = {"swa": {"window_size": config.swa_window}} if config.swa_window else {}
    if config.model is not None:
        from jetnas.models.hf_compat import load_pretrained

        path = Path(config.model).expanduser()
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model directory {config.model!r} has no config.json")
        # strictly: a config.json that does not match the weights is an error, not layers initialised at random
        model = load_pretrained(path, dtype=torch.float32)
        types = list(getattr(model.config, "block_types", None) or ["attn"] * model.config.num_hidden_layers)
        block_config = dict(getattr(model.config, "efficient_attention_config", None) or {})
    else:
        from jetnas.models.convert import convert_model

        if teacher is None:
            raise ValueError("converting the teacher with layer_types needs the teacher loaded")
        num_layers = teacher.model.config.num_hidden_layers
        types, implied = resolve_layer_types(config.layer_types, num_layers)
        block_config = merge_block_configs(implied, swa, config.block_config)
        torch.manual_seed(config.seed)
        model, _ = convert_model(teacher.model, types, block_config or None, freeze=False)
        model = model.float()
    set_trainable(model, config.stage)
    return model.train(), types, block_config


def _head_weight(model) -> torch.Tensor:
    return getattr(model, "module", model).get_output_embeddings().weight


def _backend(model):
    """The kernels a jetnas model resolved (`JetNemotronModel.backend`); the references for anything else."""
    return getattr(getattr(getattr(model, "module", model), "model", None), "backend", "torch")


@dataclass
class TeacherOutputs:
    """What the stage loss takes from the teacher: `hidden_states` (the embeddings, then one `[B, T, D]` per layer,
    the last one normed) and `logits` (`[B, T, V]` when the loss needs the teacher's full logits, else its last
    position's or None)."""

    hidden_states: tuple[torch.Tensor, ...]
    logits: torch.Tensor | None

    def rows(self, first: int, end: int) -> TeacherOutputs:
        """The outputs of sequences `first:end` (views, no copies)."""
        return TeacherOutputs(tuple(h[first:end] for h in self.hidden_states),
                              None if self.logits is None else self.logits[first:end])


def _fused_head(model) -> bool:
    """Whether the LM-head terms come from the final normed states (`head_terms`): not for a head sharded by FSDP2
    (a DTensor), which is only whole inside the model's forward."""
    return not hasattr(_head_weight(model), "full_tensor")


def teacher_outputs(config: StageConfig, model, teacher_model, input_ids: torch.Tensor) -> TeacherOutputs:
    """The teacher's forward (no gradients) on `input_ids [B, T + 1]` (or a batch with answer flags,
    `[B, 2, T + 1]`: its ids) as `stage_losses` needs it for `model`'s loss: every hidden state, and the full
    logits only where the student's head is sharded and the KL is on."""
    input_ids, _ = split_answer_flags(input_ids)
    with torch.no_grad():
        out = teacher_model(input_ids=input_ids[:, :-1], use_cache=False, output_hidden_states=True,
                            logits_to_keep=1 if _fused_head(model) or config.kl_weight == 0 else 0)
    return TeacherOutputs(tuple(out.hidden_states), out.logits)


def stage_losses(config: StageConfig, model, teacher_model, input_ids: torch.Tensor,
                 teacher_out: TeacherOutputs | None = None) -> tuple[torch.Tensor, dict]:
    """The stage's loss on `input_ids [B, T + 1]` (inputs and next-token labels) and its terms as detached
    tensors (so nothing waits for the GPU before the backward): `hidden` (relative hidden MSE, whenever the teacher
    runs), `kl` and `lm` (cross-entropy), each present when computed.

    A batch with answer flags, `[B, 2, T + 1]` (`jetnas.train.mixture`), weights the KL and cross-entropy of each
    position t whose label `ids[:, t + 1]` is flagged by `config.answer_weight` (`StageConfig.answer_weight`); the
    metrics stay the unweighted means.

    The LM-head terms come from the final normed hidden states through `jetnas.train.losses.head_terms`, which
    never holds the `[B, T, V]` float32 logits (a 32 x 1024-token batch of SmolLM2 would need 6.4 GB per copy); the
    models run with `logits_to_keep=1`. A head sharded by FSDP2 is only whole inside the model's forward, so there
    the logits are made by the forward, as before.

    `teacher_out`: the teacher's outputs for these sequences (`teacher_outputs`, made once for a larger batch and
    cut with `TeacherOutputs.rows`); None runs the teacher here when a term needs it."""
    input_ids, flags = split_answer_flags(input_ids)
    inputs, labels = input_ids[:, :-1], input_ids[:, 1:]
    # the weight of position t is its label's flag: made on the device, no host read (a captured step replays it)
    token_weight = None
    if flags is not None and config.answer_weight != 1:
        token_weight = torch.where(flags[:, 1:] != 0, float(config.answer_weight), 1.0).float()
    head = config.kl_weight > 0 or config.lm_weight > 0
    weight = _head_weight(model)
    fused_head = _fused_head(model)
    keep = 1 if fused_head or not head else 0
    t_out = None
    if config.needs_teacher_forward:
        t_out = teacher_out if teacher_out is not None else teacher_outputs(config, model, teacher_model, input_ids)
        if t_out.hidden_states[0].shape[:2] != inputs.shape:
            raise ValueError(f"teacher_out holds {list(t_out.hidden_states[0].shape[:2])} sequences x tokens, the "
                             f"inputs are {list(inputs.shape)}")
    s_out = model(input_ids=inputs, use_cache=False, output_hidden_states=t_out is not None or fused_head,
                  logits_to_keep=keep)
    loss = torch.zeros((), device=inputs.device)
    metrics = {}
    if t_out is not None:
        # hidden states after every layer (the embeddings, identical or nearly, would only dilute the mean); all but
        # the last (the final norm's output) are layer inputs that the next layer also reads, so their two
        # gradients can be summed inside the hidden loss's backward kernel (`distill_terms`' `shared`)
        student_hidden = s_out.hidden_states[1:]
        shared = [True] * (len(student_hidden) - 1) + [False]
        with torch.set_grad_enabled(torch.is_grad_enabled() and config.hidden_weight > 0):
            hidden = distill_terms(student_hidden, t_out.hidden_states[1:], backend=_backend(model),
                                   shared=shared)["hidden"]
        if config.hidden_weight > 0:
            loss = loss + config.hidden_weight * hidden
        metrics["hidden"] = hidden.detach()
    if head and fused_head:
        teacher = t_out is not None and config.kl_weight > 0
        terms_loss, terms = head_terms(
            s_out.hidden_states[-1], weight, labels, t_out.hidden_states[-1] if teacher else None,
            _head_weight(teacher_model) if teacher else None, kl_weight=config.kl_weight if teacher else 0.0,
            lm_weight=config.lm_weight, temperature=config.temperature,
            backend=_backend(model), token_weight=token_weight)
        loss = loss + terms_loss
        metrics.update(terms)
    elif head:
        # the full-logits path (a head sharded by FSDP2): each term's weighted loss and plain metric from one pass
        if t_out is not None and config.kl_weight > 0:
            weighted, metrics["kl"] = logits_kl_terms(s_out.logits, t_out.logits, config.temperature,
                                                      token_weight=token_weight)
            loss = loss + config.kl_weight * weighted
        with torch.set_grad_enabled(torch.is_grad_enabled() and config.lm_weight > 0):
            weighted, metrics["lm"] = lm_loss_terms(s_out.logits, labels, token_weight=token_weight)
        if config.lm_weight > 0:
            loss = loss + config.lm_weight * weighted
    return loss, metrics


def make_stage_loss(config: StageConfig, teacher_model):
    """`loss_fn(model, batch, step) -> (loss, metrics)` for the trainer (see `stage_losses`). With
    `config.teacher_per_step` and micro-batches, the first micro-batch of a step runs the teacher on the step's
    whole batch (`batch["step_input_ids"]`, from the trainer) and every micro-batch takes its rows
    (`batch["rows"]`); the outputs are dropped with the step's last micro-batch. The batches may carry answer flags
    (`[B, 2, T + 1]`: rows are still the first dimension; `stage_losses` and `teacher_outputs` read them)."""
    held: dict = {}  # while a step's micro-batches run: "ids" (the step's batch) and "out" (its teacher outputs)

    def loss_fn(model, batch, step):
        ids, whole, rows = batch["input_ids"], batch.get("step_input_ids"), batch.get("rows")
        if not (config.teacher_per_step and config.needs_teacher_forward and whole is not None and rows is not None
                and whole.shape[0] > ids.shape[0]):
            return stage_losses(config, model, teacher_model, ids)
        first, end = rows
        if held.get("ids") is not whole:  # a new step (or a micro-batch called on its own): the teacher runs
            held.clear()
            held.update(ids=whole, out=teacher_outputs(config, model, teacher_model, whole))
        t_out = held["out"].rows(first, end)
        if end >= whole.shape[0]:  # the step's last micro-batch: let its outputs go with its backward
            held.clear()
        return stage_losses(config, model, teacher_model, ids, teacher_out=t_out)

    # capturable (`jetnas.train.graph_step`): no host reads, `step` unused, the same shapes every step. `held` is
    # Python state: a replay does not touch it, and the graph itself hands the teacher's outputs between micro-batches
    loss_fn.graph_safe = True
    return loss_fn


def make_stage_eval(config: StageConfig, teacher_model, mixture: Mixture, device: torch.device, tokenizer=None):
    """`evaluate(model) -> metrics` on fixed held-out windows of every source: `heldout/<term>` (mean over sources)
    and, with several sources, `heldout/<term>/<source>`; plus `task/<spec>/<metric>` for each of `config.eval_tasks`
    (scored with `tokenizer`). None when nothing is held out and no task is asked for."""
    names = [Path(s.name).name for s in mixture.sources]
    if len(set(names)) < len(names):  # file names collide: keep the specs as given
        names = [s.name for s in mixture.sources]
    batches = {}
    for name, source in zip(names, mixture.sources):
        if source.heldout is None:
            continue
        n = min(config.eval_windows, (len(source.heldout) - 1) // config.seq_len)
        if n >= 1:
            batches[name] = source.heldout.window_batch(n, config.seq_len, device=device)
    tasks = config.stage_tasks()
    if tasks and tokenizer is None:
        raise ValueError(f"StageConfig.eval_tasks={config.eval_tasks!r} needs the student's tokenizer")
    if not batches and not tasks:
        return None

    @torch.no_grad()
    def evaluate(model):
        out = {}
        if batches:
            per_source = {name: {k: float(v) for k, v in stage_losses(config, model, teacher_model, ids)[1].items()}
                          for name, ids in batches.items()}
            terms = sorted({k for m in per_source.values() for k in m})
            out = {f"heldout/{k}": sum(m[k] for m in per_source.values()) / len(per_source) for k in terms}
            if len(per_source) > 1:
                out.update({f"heldout/{k}/{name}": m[k] for name, m in per_source.items() for k in m})
        if tasks:
            from jetnas.evaluation.scoring import LanguageModel

            # the bare model (DDP / FSDP wrappers forward only `forward`); every rank scores the same rows
            lm = LanguageModel.from_hf(getattr(model, "module", model), tokenizer, batch_size=config.eval_batch_size)
            for task in tasks:
                metrics = task.evaluate(lm)
                out.update({f"task/{task.name}/{k}": float(v) for k, v in metrics.items() if k != "n"})
        return out

    return evaluate


def save_model_dir(trainer_model: torch.nn.Module, model: torch.nn.Module, tokenizer, target: str | Path,
                   meta: dict) -> Path:
    """Write `target` as a `save_pretrained` directory (safetensors) with the tokenizer and `jetnas_stage.json`,
    atomically (assembled as `<target>.partial`, then renamed). Every rank must call it: the full state dict of a
    DDP/FSDP-wrapped model is gathered collectively; the main process writes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    target = Path(target)
    state = get_model_state_dict(trainer_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist_utils.is_main_process():
        check_finite(state, f"model directory {target}")  # a model with NaN weights is never written
        with atomic_dir(target) as partial:
            model.save_pretrained(partial, state_dict=state)
            if tokenizer is not None:
                tokenizer.save_pretrained(partial)
            write_json_atomic(partial / "jetnas_stage.json", meta)
    dist_utils.barrier()
    return target


def step_throughput(out_dir: str | Path) -> float | None:
    """Training tokens/s of a run: the median over its logged steps of the per-step throughput, the first step
    (warm-up: allocation, kernel selection) left out when there are others."""
    log = Path(out_dir) / "log.jsonl"
    if not log.exists():
        return None
    rates = [r["tokens_per_s"] for r in map(json.loads, log.read_text().splitlines()) if "tokens_per_s" in r]
    rates = rates[1:] if len(rates) > 1 else rates
    return statistics.median(rates) if rates else None


@dataclass
class StageResult:
    """What a stage returns in-process: the trained model (unwrapped, on its device), its tokenizer, the trainer's
    summary, the saved directory (None unless saved), the layer types and block options, and the data."""

    model: torch.nn.Module
    tokenizer: object
    summary: dict
    model_dir: Path | None
    layer_types: list[str]
    block_config: dict
    mixture: Mixture
    counts: dict = field(default_factory=dict)


def _model_tokenizer(path: str):
    """The tokenizer saved in a model directory, or None."""
    from transformers import AutoTokenizer

    p = Path(path).expanduser()
    if (p / "tokenizer.json").exists() or (p / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(p)
    return None


def train_stage(config: StageConfig, teacher: StageTeacher | None = None) -> StageResult:
    """Run one stage (see the module docstring); resumes from `config.out_dir`'s checkpoints when `resume`.

    Args:
        config: the stage.
        teacher: an already loaded teacher (searches train many candidates against one); loaded from
            `config.teacher` when needed and not given.
    """
    device = dist_utils.local_device(config.device)
    # join the process group now (the trainer would later): data preparation below is ordered across ranks
    dist_utils.setup(device)
    tokenizer = eos = None
    if config.model is not None:
        tokenizer = _model_tokenizer(config.model)
        meta_path = Path(config.model).expanduser() / "jetnas_stage.json"
        if meta_path.exists():
            eos = read_json(meta_path).get("eos_token_id")
    needs_teacher = (config.model is None or config.needs_teacher_forward or config.data is None
                     or tokenizer is None)
    loaded_here = teacher is None and needs_teacher
    if loaded_here:
        teacher = load_stage_teacher(config.teacher, device)
    if teacher is not None:
        teacher.model.to(device)
        tokenizer = tokenizer or teacher.tokenizer
        eos = teacher.eos_token_id if eos is None else eos
    eos = eos if eos is not None else tokenizer.eos_token_id
    model, types, block_config = build_student(config, teacher)
    model.to(device)
    counts = {"parameters": sum(p.numel() for p in model.parameters()),
              "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    teacher_name = teacher.spec.name if teacher is not None else config.teacher
    # the main process tokenises or generates the (cached) data first; the others then read its cache, instead of
    # every rank writing the same cache file at once
    if not dist_utils.is_main_process():
        dist_utils.barrier()
    mixture = resolve_mixture(config.data, tokenizer, teacher=teacher.model if teacher is not None else None,
                              teacher_eos=eos, heldout_tokens=config.heldout_tokens,
                              generated_tokens=config.generated_tokens, seed=config.seed, teacher_name=teacher_name,
                              answer_spans=config.answer_flags)
    if dist_utils.is_main_process():
        dist_utils.barrier()
    teacher_model = forward_teacher(config, teacher.model if teacher is not None else None, device)
    if loaded_here and teacher_model is None:
        # loaded only for the tokenizer, the conversion or the data: free it before training
        teacher = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    out = Path(config.out_dir)
    resolved = {**asdict(config), "layer_types": types, "block_config": block_config,
                "data_sources": mixture.describe(), "teacher_name": teacher_name, "eos_token_id": eos, **counts}
    trainer = Trainer(config.train_config(), model, make_stage_loss(config, teacher_model), mixture.sources[0].stream,
                      evaluate=make_stage_eval(config, teacher_model, mixture, device, tokenizer),
                      identity=config.identity(types, block_config, teacher_name))
    # the trainer reads batches through `batcher.batch(step, rank, world)`; a weighted mixture supplies its own, and
    # with answer_weight != 1 its batches carry the answer flags (`[B, 2, T + 1]`, read by `stage_losses`)
    trainer.batcher = mixture.batcher(config.seq_len, config.batch_size, config.seed, answers=config.answer_flags,
                                      doc_starts=config.doc_starts, eos_id=eos)
    # take the run folder (lock, identity, resume point) before writing into it: a refused run leaves it as it was
    trainer.prepare()
    if dist_utils.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "stage_config.json", resolved)
    weights = ", ".join(f"{s['source']} x{s['weight']:.3g}" for s in mixture.describe())
    if dist_utils.is_main_process():
        print(f"jetnas: stage {config.stage}: {counts['trainable_parameters']:,} of {counts['parameters']:,} "
              f"parameters train; layers {_layout(types)}; data {weights}", file=sys.stderr)
    align = _align(config, model, teacher, mixture, trainer, eos) if config.align_steps else None
    summary = trainer.fit()
    if align is not None:
        summary["align"] = align
    summary["step_tokens_per_s"] = step_throughput(out)
    model_dir = None
    if config.save_model:
        meta = {"stage": config.stage, "teacher": teacher_name, "layer_types": types, "block_config": block_config,
                "eos_token_id": eos, "data": mixture.describe(), "train": summary,
                "stage_config": str(out / "stage_config.json")}
        model_dir = save_model_dir(trainer.model, model, tokenizer, out / "model", meta)
    model.eval()
    return StageResult(model, tokenizer, summary, model_dir, types, block_config, mixture, counts)


def _align(config: StageConfig, model, teacher: StageTeacher | None, mixture: Mixture, trainer: Trainer,
           eos: int | None) -> dict:
    """Stage 1's alignment phase (`jetnas.train.align`): each linear block learns its teacher layer's attention
    output from the teacher's inputs, `align_steps` steps at `align_lr` on the stage's batches, in `out_dir/align`
    (resumable like any run). Skipped when the stage resumes from a checkpoint of its own (that already holds the
    aligned blocks, trained further). Leaves the stage-1 parameters trainable again."""
    from jetnas.train.align import train_alignment

    if teacher is None:
        raise ValueError("the alignment phase needs the teacher (align_steps > 0)")
    if trainer.resume_point is not None:
        return {"skipped": f"stage 1 resumes from {trainer.resume_point}"}
    align = config.align_config()
    if dist_utils.is_main_process():
        print(f"jetnas: stage 1: aligning the linear blocks to the teacher's layers first ({config.align_steps} steps "
              f"at lr {config.align_lr:g}, {align.out_dir})", file=sys.stderr)
    heldout = next((s.heldout for s in mixture.sources if s.heldout is not None), None)
    # plain ids (no answer flags): the alignment's layer-wise loss has no per-token terms to weight
    summary = train_alignment(model, teacher.model, mixture.sources[0].stream, align, heldout=heldout,
                              eval_windows=config.eval_windows,
                              batcher=mixture.batcher(config.seq_len, config.batch_size, config.seed + 1,
                                                      doc_starts=config.doc_starts, eos_id=eos))
    set_trainable(model, config.stage)
    return summary


def _layout(types: list[str]) -> str:
    counts = {t: types.count(t) for t in dict.fromkeys(types)}
    return ", ".join(f"{n} {t}" for t, n in counts.items())
