"""Typed recipes: one dataclass per PostNAS stage, the single statement of what a stage takes.

A recipe's fields are the stage's arguments: the flags of its `jetnas` command (built from these fields, see
`jetnas.commands.recipe_command`), the keys of its section in a `jetnas run` YAML recipe, and what the runner
functions (`jetnas.runner`) read. Each field has a type, a default, a range where one applies (`arg(...)`) and a
line of documentation (the class docstring's `Args:` section, which becomes the flag's help): `jetnas.runner.fields`.
Constructing a recipe validates every value, so a bad one is refused before anything loads; `fields.check_value`
applies the same rules to one value, which is how `jetnas run --check` names the bad key of a YAML recipe.

Nothing here imports torch: the CLI reads these classes to build `--help`, and a misspelled recipe or a bad value
must be answered in well under a second.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from jetnas.runner.fields import Recipe, arg
from jetnas.runner.measures import check_measure

PRECISIONS = ("auto", "fp32", "bf16")
DISTRIBUTED = ("auto", "ddp", "fsdp")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_TASKS = "lm,retrieval"
RETRIEVAL_PROBES = ("none", "windowed")


@dataclass
class SupernetRecipe(Recipe):
    """PostNAS step 1a: train a super-network (the teacher plus a linear path per layer) on sampled sub-networks.

    Args:
        teacher: smollm2-135m, a model directory, a .gguf file or a hub id.
        data: training text: a token .bin, .txt/.jsonl(.gz) files, hf:NAME; none = text the teacher generates.
        steps: optimizer steps.
        out_dir: where checkpoints, log.jsonl and the super-network go (default runs/supernet-<time>).
        linear: the linear path's block (gla as in the paper; jet, gdn, deltanet, retnet, mamba2).
        swa_window: the sliding window of the swa choice.
        sample: uniform (each layer attention with probability --p-attn) or budget:attn=2,swa=2 (exactly that).
        p_attn: per-layer attention probability for uniform sampling.
        subnets_per_step: sub-networks trained on each batch.
        kl_weight: weight of KL(teacher || sub-network) on logits, added to the per-layer feature MSE.
        batch_size: sequences per optimizer step (all ranks together).
        micro_batch_size: sequences per forward pass on each rank (gradient accumulation covers the rest).
        seq_len: tokens per sequence.
        lr: peak learning rate (AdamW, warm-up then cosine).
        warmup_steps: default 5% of steps.
        heldout_tokens: tokens kept out of training for the search's language-model objective.
        eval_every: steps between held-out evaluations (default: at the end only).
        save_every: steps between checkpoints (default: steps / 4).
        seed: seed of sampling, data order and initialisation.
        precision: auto (bf16 autocast on GPU), fp32 or bf16.
        distributed: auto, ddp or fsdp when launched with torchrun.
        resume: continue from the newest checkpoint in out_dir.
        device: cpu, cuda, ...; default cuda when available (torchrun: each rank's own GPU).
    """

    teacher: str = "smollm2-135m"
    data: str | None = None
    steps: int = arg(200, min=1)
    out_dir: str | None = None
    linear: str = "gla"
    swa_window: int = arg(512, min=1)
    sample: str = "uniform"
    p_attn: float = arg(0.5, min=0, max=1)
    subnets_per_step: int = arg(1, min=1)
    kl_weight: float = arg(0.0, min=0)
    batch_size: int = arg(8, min=1)
    micro_batch_size: int | None = arg(None, min=1)
    seq_len: int = arg(512, min=1)
    lr: float = arg(1e-3, above=0)
    warmup_steps: int | None = arg(None, min=0)
    heldout_tokens: int = arg(32768, min=0)
    eval_every: int | None = arg(None, min=1)
    save_every: int | None = arg(None, min=1)
    seed: int = 0
    precision: str = arg("auto", choices=PRECISIONS)
    distributed: str = arg("auto", choices=DISTRIBUTED)
    resume: bool = True
    device: str | None = None

    def check(self) -> None:
        if self.sample != "uniform" and not self.sample.startswith("budget:"):
            raise ValueError(f"--sample must be 'uniform' or 'budget:attn=N,swa=M', got {self.sample!r}")


@dataclass
class PlacementRecipe(Recipe):
    """PostNAS step 1b: which layers stay full / sliding-window attention, searched on a trained super-network.

    Args:
        supernet: a directory written by `jetnas supernet`.
        budget: layers kept as softmax attention, e.g. attn=2,swa=2.
        tasks: comma-separated objectives: lm (loss on the super-network's held-out text), mc:PATH (loss on the
            correct answer), retrieval (needle accuracy), or any built-in task (retrieval:kv@2048, cloze:PATH, ...).
        beam_width: candidates kept per level of the beam search.
        out_dir: where placements.json, heatmap.png and comparison.md go (default: <supernet>/search-<budget>).
        rows: rows per multiple-choice / retrieval task (each candidate runs them all).
        lm_data: held-out text for the lm objective (default: the super-network's held-out split).
        lm_tokens: tokens of held-out text per candidate.
        retrieval_length: context length of the default retrieval task.
        batch_size: sequences per forward pass.
        device: cpu, cuda, ...; default cuda when available.
        dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16.
        retrieval_probe: none (the super-network scores every task) or windowed: retrieval tasks are scored on the
            teacher whose layers outside the candidate's full-attention set run its own attention limited to
            --probe-window tokens plus --probe-sinks first tokens, on rows of their own seed (the other tasks
            still on the super-network).
        probe_window: tokens each windowed layer of the probe sees (default 512 with --retrieval-probe windowed).
        probe_sinks: first tokens every windowed layer of the probe also sees (default 4 with --retrieval-probe
            windowed).
    """

    supernet: str
    budget: str = "attn=2,swa=2"
    tasks: str = DEFAULT_TASKS
    beam_width: int = arg(4, min=1)
    out_dir: str | None = None
    rows: int = arg(16, min=1)
    lm_data: str | None = None
    lm_tokens: int = arg(8192, min=1)
    retrieval_length: int = arg(1024, min=1)
    batch_size: int = arg(8, min=1)
    device: str | None = None
    dtype: str = arg("auto", choices=DTYPES)
    retrieval_probe: str = arg("none", choices=RETRIEVAL_PROBES)
    probe_window: int | None = arg(None, min=1)
    probe_sinks: int | None = arg(None, min=0)

    #: the probe's window and sinks when --retrieval-probe windowed leaves them unset (results/
    #: cpu_teacher_retrieval_layers: a 512-token window with 4 sinks keeps the teacher's retrieval only where its
    #: circuit's layers are full)
    PROBE_DEFAULTS: ClassVar[dict] = {"probe_window": 512, "probe_sinks": 4}

    def check(self) -> None:
        if self.retrieval_probe == "none":
            given = [f"--{n.replace('_', '-')} {getattr(self, n)}" for n in self.PROBE_DEFAULTS
                     if getattr(self, n) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} given without --retrieval-probe windowed (it is 'none')")
            return
        specs = [t for t in self.tasks.split(",") if t]
        if not any(t == "retrieval" or t.startswith("retrieval:") for t in specs):
            raise ValueError(f"--retrieval-probe {self.retrieval_probe} scores retrieval tasks, and --tasks "
                             f"{self.tasks!r} has none (add retrieval or retrieval:KIND@LENGTH)")
        for name, default in self.PROBE_DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, default)


@dataclass
class CandidateRecipe(Recipe):
    """What the block search (steps 2-3) and the shape search (step 4) share: the teacher, the placement the
    candidates fill, the stage-1 recipe each candidate trains with, the tasks it is evaluated on and the decode
    measurement (`jetnas.runner.candidates.CandidateRunner` runs one candidate with them).

    Args:
        teacher: smollm2-135m, a model directory, a .gguf file or a hub id.
        placement: a placements.json from `jetnas search placement` (its best entry), or layer types
            (attn,swa kept; every other entry becomes the candidate block).
        tasks: comma-separated: lm (loss on held-out text), retrieval (needle at --retrieval-length), mc:PATH,
            cloze:PATH, ppl:PATH, retrieval:KIND@LENGTH.
        data: training text (as `jetnas train`); none = text the teacher generates.
        steps: optimizer steps per candidate (identical for all).
        batch_size: sequences per optimizer step.
        micro_batch_size: sequences per forward pass (gradient accumulation covers the rest).
        seq_len: tokens per sequence.
        lr: peak learning rate.
        warmup_steps: default steps / 20 (at least 1).
        hidden_weight: weight of the per-layer hidden-state MSE against the teacher.
        kl_weight: weight of KL(teacher || candidate) on next-token distributions.
        swa_window: window of the placement's swa layers (default: from the placements file or its
            super-network).
        rows: rows per multiple-choice / retrieval task.
        lm_tokens: held-out tokens scored by the lm task.
        retrieval_length: context length of the default retrieval task.
        heldout_tokens: tokens held out of the training data (the lm task's text).
        generated_tokens: tokens of teacher text to generate when no data is given.
        eval_batch_size: sequences per forward pass when evaluating.
        decode_batch_size: batch of the decode-throughput measurement.
        decode_context: context length (prompt tokens) of the decode-throughput measurement.
        decode_tokens: tokens decoded per measurement.
        decode_repeats: measurements per model; the median counts (one takes ~0.2 s on a GPU, and the
            hardware search's 1% tolerance is finer than one measurement's noise).
        measure: the decode-throughput measurement by name: replicated (`jetnas.bench.measure`'s protocol), or a
            plugin's (`jetnas.runner.measures`).
        keep_models: save every candidate's trained model (candidates/<name>/train/model).
        out_dir: where the search's table, records, figure and candidates/ go.
        seed: seed of new blocks and data order (identical for all candidates).
        precision: auto (bf16 autocast on GPU), fp32 or bf16.
        device: cpu, cuda, ...; default cuda when available.
    """

    teacher: str
    placement: str
    tasks: str = DEFAULT_TASKS
    data: str | None = None
    steps: int = arg(200, min=1)
    batch_size: int = arg(8, min=1)
    micro_batch_size: int | None = arg(None, min=1)
    seq_len: int = arg(512, min=1)
    lr: float = arg(1e-3, above=0)
    warmup_steps: int | None = arg(None, min=0)
    hidden_weight: float = arg(1.0, min=0)
    kl_weight: float = arg(1.0, min=0)
    swa_window: int | None = arg(None, min=1)
    rows: int = arg(16, min=1)
    lm_tokens: int = arg(8192, min=1)
    retrieval_length: int = arg(1024, min=1)
    heldout_tokens: int = arg(32768, min=0)
    generated_tokens: int = arg(200_000, min=1)
    eval_batch_size: int = arg(8, min=1)
    decode_batch_size: int = arg(8, min=1)
    decode_context: int = arg(2048, min=1)
    decode_tokens: int = arg(32, min=1)
    decode_repeats: int = arg(3, min=1)
    measure: str = "replicated"
    keep_models: bool = False
    out_dir: str | None = None
    seed: int = 0
    precision: str = arg("auto", choices=PRECISIONS)
    device: str | None = None

    #: whether the search needs a decode measurement (the shape search chooses by it)
    measure_required: ClassVar[bool] = False

    def check(self) -> None:
        check_measure(self.measure, self.measure_required)

    def train_args(self) -> dict:
        """The stage-1 recipe every candidate trains with (the `jetnas.train.stages.StageConfig` fields it sets)."""
        return {"steps": self.steps, "batch_size": self.batch_size, "micro_batch_size": self.micro_batch_size,
                "seq_len": self.seq_len, "lr": self.lr, "warmup_steps": self.warmup_steps,
                "hidden_weight": self.hidden_weight, "kl_weight": self.kl_weight, "precision": self.precision}

    def decode(self) -> dict:
        """The decode-throughput measurement of every candidate."""
        return {"batch_size": self.decode_batch_size, "context_length": self.decode_context,
                "new_tokens": self.decode_tokens, "repeats": self.decode_repeats}


@dataclass
class BlockSearchRecipe(CandidateRecipe):
    """PostNAS step 2 (and 3): each linear block (and JetBlock design variant) trained in the fixed placement with
    one recipe, evaluated, measured and ranked.

    Args:
        blocks: comma-separated candidates: gdn, gla, mamba2, retnet, deltanet, jet; JetBlock variants
            jet-static-qk, jet-dyn-qk, jet-dyn-qkv, jet-static-v; or TYPE:KEY=VALUE+KEY=VALUE
            (e.g. jet:qk_conv=dynamic+v_conv=static; options may also be comma-separated).
        teacher_reference: also evaluate and measure the teacher, as the table's reference row.
        matched_shapes: give every candidate the teacher's attention shape (heads x head_dim keys and values; the
            JetBlock's value dim and Mamba2's width are otherwise 2x), so all hold the same state and inherit
            q/k/v/o; a candidate's own shape options win.
        measure: the decode-throughput measurement by name: replicated (`jetnas.bench.measure`'s protocol), none
            (only the cache size), or a plugin's (`jetnas.runner.measures`).
        out_dir: where blocks.md, blocks.json, blocks.png and candidates/ go (default runs/blocks-<time>).
    """

    # the paper's Table 1 candidates and the JetBlock (`jetnas.nas.candidates.DEFAULT_BLOCKS`, written out here so
    # that reading a recipe does not import torch)
    blocks: str = "gdn,gla,mamba2,retnet,deltanet,rwkv7,jet"
    teacher_reference: bool = True
    matched_shapes: bool = True


@dataclass
class ShapeSearchRecipe(CandidateRecipe):
    """PostNAS step 4: at a fixed state size, the block's (d_k, d_v, heads) chosen by measured decode speed and
    accuracy (each shape trains briefly with the block search's recipe).

    Args:
        block: the block whose shape is searched (jet, a JetBlock variant like jet-dyn-qk, gdn, ...; the block
            search's best).
        state_bytes: bytes of one linear layer's recurrent state per sequence (float32: 4 bytes a number);
            default: the original shape's (the block's default for this teacher, or the --block options).
        tolerance: the chosen shape's decode throughput must be within this fraction of the original's.
        heads: head counts to try (default 2,4,6,8,12,16,24,32, plus the original's).
        key_dims: key dims to try (default 32,48,64,96,128,192,256, plus the original's).
        max_candidates: try at most this many shapes (the original and an even spread of the others).
        steps: optimizer steps per shape (the block search's recipe, briefly).
        out_dir: where hardware.md, hardware.json, hardware.png and candidates/ go (default runs/hardware-<time>).
    """

    block: str = "jet"
    state_bytes: int | None = None
    tolerance: float = arg(0.01, min=0, below=1)
    heads: list[int] | None = arg(None, min=1)
    key_dims: list[int] | None = arg(None, min=1)
    max_candidates: int | None = arg(None, min=1)
    steps: int = arg(100, min=1)

    measure_required: ClassVar[bool] = True

    def check(self) -> None:
        if self.state_bytes is not None and (self.state_bytes < 4 or self.state_bytes % 4):
            raise ValueError(f"--state-bytes={self.state_bytes} must be a positive multiple of 4 (float32 state "
                             f"numbers)")
        super().check()


@dataclass
class TrainRecipe(Recipe):
    """Training stage 1 (MLPs frozen, distillation from the teacher) or stage 2 (everything, LM loss); the fields
    of `jetnas.train.stages.StageConfig` a user sets.

    Args:
        stage: 1: only the token mixers train, on hidden-state MSE + KL against the teacher; 2: every parameter
            trains on cross-entropy (+ optional KL), over a data mixture.
        teacher: smollm2-135m, a model directory, a .gguf file or a hub id (distillation target, conversion
            source, tokenizer).
        model: a hybrid directory to start from (stage 2: stage 1's out-dir/model); instead of --layer-types.
        layer_types: convert the teacher with these layers: attn, swa and linear blocks or block variants
            (jet, gdn, jet-dyn-qk, jet:qk_conv=static, jet*12), comma-separated; or a preset name.
        block_config: JSON of per-block-type options, e.g. '{"jet": {"num_heads": 12, "head_dim": 96,
            "expand_v": 2.6667}}' (the hardware search's block_config).
        swa_window: the sliding window of swa layers.
        data: training text: a token .bin, .txt/.jsonl(.gz), hf:NAME, or a weighted mixture like
            web.bin:0.7,math.jsonl:0.3; none = text the teacher generates.
        steps: optimizer steps.
        out_dir: where stage_config.json, log.jsonl, checkpoints and model/ go (default runs/stage<N>-<time>).
        batch_size: sequences per optimizer step (all ranks together).
        micro_batch_size: sequences per forward pass on each rank (gradient accumulation covers the rest).
        teacher_per_step: with micro-batches, the teacher's forward once per step on the rank's whole batch (fewer
            launches; holds the whole batch's teacher hidden states) instead of once per micro-batch.
        cuda_graph: capture the step's forward, backward and clipping in a CUDA graph and replay it: true, false or
            "auto" (default: on for one GPU process, off on CPU and under torchrun; falls back to eager steps, with
            a message, if the capture fails).
        seq_len: tokens per sequence.
        lr: peak learning rate (default: stage 1 1e-3, stage 2 3e-4).
        warmup_steps: default steps / 20 (at least 1).
        min_lr_ratio: the cosine schedule ends at lr * this.
        weight_decay: AdamW weight decay.
        grad_clip: gradient-norm clipping (0: none).
        hidden_weight: weight of the per-layer relative hidden-state MSE (default: stage 1 1, stage 2 0).
        kl_weight: weight of KL(teacher || student) on next-token distributions (default: stage 1 1, stage 2 0).
        lm_weight: weight of the cross-entropy (default: stage 1 0, stage 2 1).
        temperature: temperature of the KL term.
        answer_weight: answer-weighted distillation: the KL and cross-entropy of positions whose next token lies
            in an answer span of a recall document count this many times in the loss (the logged kl / lm and the
            held-out loss stay unweighted); > 0, 1 = off. Other values need a recall .bin with its .spans.npy among
            the data sources.
        doc_starts: the share of rows of text sources that start at a document's first token instead of on the
            fixed grid of seq_len (a document's opening read from a fresh state, as evaluation prompts are); 0-1,
            0 = off (recall documents keep their grid).
        align_steps: stage 1: first align each linear block to its teacher layer's attention output, from the
            teacher's own inputs, for this many steps (layer-wise, cheap; 0: no alignment phase).
        align_lr: peak learning rate of the alignment phase.
        heldout_tokens: tokens held out of each data source for the held-out loss.
        eval_tasks: built-in tasks (ppl:, mc:, cloze:, retrieval: specs, comma-separated) scored on the student at
            each evaluation beside the held-out loss, e.g. another seed's retrieval rows as a development set:
            retrieval:mqar@1024?n=50&seed=1.
        eval_batch_size: sequences per forward pass when scoring `eval_tasks`.
        generated_tokens: tokens of teacher text to generate when no data is given.
        eval_every: steps between held-out evaluations (default: at the end only).
        save_every: steps between checkpoints (default: steps / 4).
        keep_checkpoints: how many of the newest checkpoints to keep (older ones are deleted as new ones verify).
        log_every: steps between log lines (evaluations are always logged).
        eval_windows: held-out windows of `seq_len` per data source scored at each evaluation.
        seed: seed of new blocks, data order and mixture sampling.
        precision: auto (bf16 autocast on GPU), fp32 or bf16.
        distributed: auto, ddp or fsdp when launched with torchrun.
        on_nonfinite: a step whose loss or gradient norm is NaN or infinite: error (stop before its update) or
            skip (drop that update and go on).
        resume: continue from the newest checkpoint in out-dir.
        device: cpu, cuda, ...; default cuda when available (torchrun: each rank's own GPU).
    """

    stage: int = arg(choices=(1, 2))
    teacher: str = "smollm2-135m"
    model: str | None = None
    layer_types: str | None = None
    block_config: str | dict | None = None
    swa_window: int | None = arg(None, min=1)
    data: str | None = None
    steps: int = arg(1000, min=1)
    out_dir: str | None = None
    batch_size: int = arg(8, min=1)
    micro_batch_size: int | None = arg(None, min=1)
    teacher_per_step: bool = False
    cuda_graph: bool | str = arg("auto", choices=(True, False, "auto"))
    seq_len: int = arg(512, min=1)
    lr: float | None = arg(None, above=0)
    warmup_steps: int | None = arg(None, min=0)
    min_lr_ratio: float = arg(0.1, min=0, max=1)
    weight_decay: float = arg(0.01, min=0)
    grad_clip: float = arg(1.0, min=0)
    hidden_weight: float | None = arg(None, min=0)
    kl_weight: float | None = arg(None, min=0)
    lm_weight: float | None = arg(None, min=0)
    temperature: float = arg(1.0, above=0)
    answer_weight: float = arg(1.0, above=0)
    doc_starts: float = arg(0.0, min=0, max=1)
    align_steps: int = arg(0, min=0)
    align_lr: float = arg(1e-2, above=0)
    heldout_tokens: int = arg(16384, min=0)
    eval_tasks: str | None = None
    eval_batch_size: int = arg(16, min=1)
    generated_tokens: int = arg(200_000, min=1)
    eval_every: int | None = arg(None, min=1)
    save_every: int | None = arg(None, min=1)
    keep_checkpoints: int = arg(2, min=1)
    log_every: int = arg(1, min=1)
    eval_windows: int = arg(4, min=0)
    seed: int = 0
    precision: str = arg("auto", choices=PRECISIONS)
    distributed: str = arg("auto", choices=DISTRIBUTED)
    on_nonfinite: str = arg("error", choices=("error", "skip"))
    resume: bool = True
    device: str | None = None

    def check(self) -> None:
        from jetnas.validation import parse_block_config

        # JSON, block types and their options checked here, so a bad one fails before any model loads
        self.block_config = parse_block_config(self.block_config)
        if self.eval_tasks:  # (imports torch: only when asked, so that checking other recipes stays light)
            from jetnas.train.stages import parse_eval_tasks

            parse_eval_tasks(self.eval_tasks)


@dataclass
class EvalRecipe(Recipe):
    """Evaluation on built-in tasks (ppl:, mc:, cloze:, retrieval:) and lm-evaluation-harness tasks or groups.

    Args:
        model: a model directory, a preset (random weights) or a teacher name (smollm2-135m).
        tasks: comma-separated; built-in names like mc:PATH, cloze:PATH, ppl:PATH, retrieval:needle@4096;
            anything else goes to lm-evaluation-harness (its task names, jetnas_* offline tasks, or a paper group:
            mmlu, mmlu_pro, bbh, math, commonsense, retrieval, code, longbench).
        limit: at most this many rows per task (quick runs).
        out_dir: where eval.json and eval.md go (default runs/eval-<time>).
        batch_size: sequences per forward pass.
        max_length: longest sequence scored (default: the model's max positions).
        num_fewshot: few-shot examples for harness tasks.
        data_dir: the folder of local benchmark files for jetnas_* harness tasks.
        tokenizer: the tokenizer of a model directory that holds none (a directory holding one, a hub id, or a
            teacher name); never guessed.
        device: cpu, cuda, ...; default cuda when available.
        dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.
        resume: keep the results of tasks already in out_dir/eval.json (same weights and limit) and skip them;
            eval.json is rewritten after every task, so an interrupted run loses at most the task in progress.
    """

    model: str
    tasks: str
    limit: int | None = arg(None, min=1)
    out_dir: str | None = None
    batch_size: int = arg(8, min=1)
    max_length: int | None = arg(None, min=1)
    num_fewshot: int | None = arg(None, min=0)
    data_dir: str | None = None
    tokenizer: str | None = None
    device: str | None = None
    dtype: str = arg("auto", choices=DTYPES)
    resume: bool = True

    def check(self) -> None:
        if not [t for t in self.tasks.split(",") if t]:
            raise ValueError("--tasks is empty")


@dataclass
class BenchRecipe(Recipe):
    """Prefill and decode throughput at each context length, against the memory-bandwidth roofline.

    Args:
        model: a model directory, a preset (random weights: jet-nemotron-2b, jet-nemotron-4b) or a teacher name.
        context: comma-separated prompt lengths.
        batch: sequences decoded together: a number, or auto (`jetnas.bench.measure.largest_batch`: the largest whose
            cache and logits fit in 85% of the free memory, GPU memory on CUDA, available system memory on CPU,
            predicted from the model's cost accounting, a multiple of 8 from 8 up; halved while it still runs out
            of memory).
        batch_cap: the largest batch auto picks; default 1024 on GPU, 8 on CPU (where memory is plentiful and
            compute is not: a larger batch would only make the run long).
        chunk: prompt tokens per prefill pass: a number, none (the whole prompt), or auto (on a GPU the largest
            chunk predicted to fit next to the cache, up to the whole prompt; 1024 on CPU).
        new_tokens: tokens decoded per measurement (the first comes from the prefill and is not counted).
        baseline: hf: also run transformers generate() (dynamic cache), prefilling every row, at the engine's
            batch capped at 64 and halved while it runs out of memory (each system at the batch it can run).
        out_dir: where bench.json and bench.png go (default runs/bench-<time>).
        device: cpu, cuda, ...; default cuda when available.
        dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16.
    """

    model: str
    context: Sequence[int] = arg((4096, 16384, 65536), min=1)
    batch: str = "auto"
    batch_cap: int | None = arg(None, min=1)
    chunk: str = "auto"
    new_tokens: int = arg(32, min=1)
    baseline: str | None = arg(None, choices=("hf",))
    out_dir: str | None = None
    device: str | None = None
    dtype: str = arg("auto", choices=DTYPES)

    def check(self) -> None:
        if not self.context:
            raise ValueError(f"--context needs lengths >= 1, got {self.context!r}")
        if self.batch != "auto" and not (self.batch.isdigit() and int(self.batch) >= 1):
            raise ValueError(f"--batch must be a positive integer or auto, got {self.batch!r}")
        if self.chunk not in ("auto", "none") and not (self.chunk.isdigit() and int(self.chunk) >= 1):
            raise ValueError(f"--chunk must be a positive integer, none or auto, got {self.chunk!r}")
