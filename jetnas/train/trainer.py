"""The one trainer of jetnas (super-network distillation; stage-1/2 training): AdamW on the trainable parameters,
warm-up + cosine, gradient accumulation, bf16 autocast on GPU, progress bar and JSONL log, periodic evaluation,
atomic safetensors checkpoints, exact resume, and torchrun data parallelism (DDP or FSDP2) with the same code.

What is trained and how is the caller's: `loss_fn(model, batch, step) -> (loss, metrics)` gets the (possibly
wrapped) model and `batch = {"input_ids": [micro_batch, seq_len + 1], "step_input_ids": [per_rank_batch, seq_len + 1],
"rows": (first, end)}` on the model's device: the micro-batch, the rank's whole batch of this optimizer step, and
the micro-batch's rows in it (`input_ids` is `step_input_ids[first:end]`; the micro-batches of a step come in order,
one `loss_fn` call each, and the step's tensor is the same object in all of them), so a loss can do per-step work
once (`jetnas.train.stages`: the teacher's forward on the whole batch). The batch is what the batcher returns, rows
first: a batcher may add channels after them (answer flags, `[B, 2, seq_len + 1]`: `jetnas.train.mixture`), which
the trainer passes on untouched and the loss reads.

What keeps a run's folder trustworthy (`jetnas.train.checkpoint`): one writer at a time (`run.lock`); the run's
identity in `run.json` (the arguments that change what it computes: `Trainer.identity`), so a resume with other
ones is refused, naming each; `resume=False` moves an old run aside instead of mixing with it; checkpoints verified
by their sha256 manifest, a damaged one skipped for the newest good one; a non-finite loss or gradient stops the run
(or skips the step: `on_nonfinite`) before the optimizer step, so nothing non-finite is ever saved; token ids beyond
the model's vocabulary are refused before the first step.

With `cuda_graph`, the step's forward, backward and gradient clipping are captured once in a CUDA graph and replayed
(`jetnas.train.graph_step`: static batch buffer and gradients, eager warm-up steps, a checked first replay, an eager
fallback when the capture fails); the host read, the non-finite handling and the optimizer step stay as they are.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from jetnas.files import write_text_atomic
from jetnas.manifest import write_json_durably
from jetnas.train import distributed as dist_utils
from jetnas.train.checkpoint import (
    NonFiniteError,
    RunIdentityError,
    acquire_run_lock,
    all_finite,
    checkpoint_dirs,
    choose_checkpoint,
    clean_partials,
    identity_changes,
    load_checkpoint,
    move_run_aside,
    read_run_identity,
    release_run_lock,
    save_checkpoint,
    write_run_identity,
)
from jetnas.train.data import TokenStream, WindowBatcher
from jetnas.train.graph_step import StaticStep, check_graph_step
from jetnas.validation import InputError, check_token_ids

PRECISIONS = ("auto", "fp32", "bf16")
DISTRIBUTED = ("auto", "ddp", "fsdp")
ON_NONFINITE = ("error", "skip")
#: the TrainConfig fields that change what a run computes (its identity); the others are cadence, placement or
#: memory (micro-batching changes only rounding), which a resume may change
IDENTITY_FIELDS = ("steps", "batch_size", "seq_len", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "betas",
                   "grad_clip", "seed")


@dataclass
class TrainConfig:
    """Training hyper-parameters (every field is written to `out_dir/train_config.json`).

    Attributes:
        steps: optimizer steps.
        batch_size: sequences per optimizer step, all ranks together.
        micro_batch_size: sequences per forward pass on each rank (None: the whole per-rank share).
        seq_len: tokens per sequence.
        lr, min_lr_ratio, warmup_steps: peak learning rate; cosine decay to lr * min_lr_ratio after a linear warm-up.
        weight_decay, betas, grad_clip: AdamW and gradient-norm clipping (0 disables clipping).
        precision: "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32" or "bf16".
        seed: data order (and whatever the loss samples with it).
        log_every, eval_every, save_every, keep_checkpoints: cadence (None: at the end only).
        out_dir: where log.jsonl, train_config.json, run.json, run.lock and checkpoints go.
        resume: continue from the newest checkpoint of out_dir that verifies (refused if the run's identity
            differs); False: move the old run aside (`out_dir/old-runs/<time>/`, nothing deleted) and start clean.
        distributed: "auto" (DDP when launched with torchrun), "ddp" or "fsdp".
        find_unused_parameters: for DDP when a step leaves parameters unused (super-network branches).
        on_nonfinite: a step whose loss or gradient norm is NaN or infinite: "error" stops the run before its
            optimizer step (the weights and the checkpoints on disk are the last good step's); "skip" drops that
            step's update (logged with `"skipped": true`) and goes on.
        cuda_graph: capture each step's forward, backward and gradient clipping in a CUDA graph and replay it
            (`jetnas.train.graph_step`), so the host no longer launches every kernel of the step. For a loss the
            same every step that says so (`loss_fn.graph_safe`: stages 1 and 2, not the super-network); one
            process on CUDA (else the Trainer raises ValueError). The same numbers as the eager step (how, not
            what, is computed: not part of the run's identity). Default off until a GPU measurement says it pays.
    """

    steps: int
    batch_size: int = 8
    micro_batch_size: int | None = None
    seq_len: int = 512
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    precision: str = "auto"
    seed: int = 0
    log_every: int = 1
    eval_every: int | None = None
    save_every: int | None = None
    keep_checkpoints: int = 2
    out_dir: str = "runs/train"
    resume: bool = True
    distributed: str = "auto"
    find_unused_parameters: bool = False
    on_nonfinite: str = "error"
    cuda_graph: bool = False

    def __post_init__(self):
        ints = {"steps": 1, "batch_size": 1, "seq_len": 1, "warmup_steps": 0, "seed": 0, "log_every": 1,
                "keep_checkpoints": 1}
        for name, minimum in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InputError(f"TrainConfig.{name}={value!r} is not an integer")
            if value < minimum:
                raise InputError(f"TrainConfig.{name}={value!r} is out of range: must be >= {minimum}")
        for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"TrainConfig.{name}={value!r} is not a finite number")
        checks = [("lr", self.lr > 0), ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1),
                  ("warmup_steps", self.warmup_steps <= self.steps), ("weight_decay", self.weight_decay >= 0),
                  ("grad_clip", self.grad_clip >= 0)]
        for name, ok in checks:
            if not ok:
                raise InputError(f"TrainConfig.{name}={getattr(self, name)!r} is out of range")
        for name in ("micro_batch_size", "eval_every", "save_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InputError(f"TrainConfig.{name}={value!r} must be an integer >= 1 or None")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise InputError(f"TrainConfig.betas={self.betas!r} must be two numbers in [0, 1)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision={self.precision!r} must be one of {PRECISIONS}")
        if self.distributed not in DISTRIBUTED:
            raise ValueError(f"TrainConfig.distributed={self.distributed!r} must be one of {DISTRIBUTED}")
        if self.on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"TrainConfig.on_nonfinite={self.on_nonfinite!r} must be one of {ON_NONFINITE}")
        if not isinstance(self.cuda_graph, bool):
            raise ValueError(f"TrainConfig.cuda_graph={self.cuda_graph!r} must be True or False")
        self.betas = tuple(self.betas)

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim < 2 or name.endswith("bias") or getattr(p, "_no_weight_decay", False)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _batcher_streams(batcher) -> list[tuple[TokenStream, float | None]]:
    """`(stream, weight)` of each source a batcher draws from (weight None for a plain `WindowBatcher`)."""
    if isinstance(batcher, WindowBatcher):
        return [(batcher.stream, None)]
    sources, weights = getattr(batcher, "sources", None), getattr(batcher, "weights", None)
    if sources is not None and weights is not None:  # a MixtureBatcher: one WindowBatcher per source
        return [(b.stream, float(w)) for b, w in zip(sources, weights)]
    return []


def _vocab_size(model: torch.nn.Module) -> int | None:
    """The number of token ids `model` embeds, when it says (an input embedding, or `config.vocab_size`)."""
    model = getattr(model, "module", model)
    for candidate in (model, getattr(model, "base", None)):
        if candidate is None:
            continue
        embeddings = candidate.get_input_embeddings() if hasattr(candidate, "get_input_embeddings") else None
        if isinstance(embeddings, torch.nn.Embedding):
            return embeddings.num_embeddings
        vocab = getattr(getattr(candidate, "config", None), "vocab_size", None)
        if isinstance(vocab, int):
            return vocab
    return None


def _read_scalars(values: list[torch.Tensor | float]) -> list[float]:
    """The numbers of `values` (one-element tensors, or Python numbers) as floats, with one device-to-host read for all
    the tensors of each device instead of one per tensor (`torch.stack` promotes them to one dtype, float32 for the
    losses: a bfloat16 or float32 value comes back exact)."""
    out: list[float | None] = [None if isinstance(v, torch.Tensor) else float(v) for v in values]
    by_device: dict[torch.device, list[int]] = {}
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                raise ValueError(f"a loss metric must be one number, got a tensor of shape {list(v.shape)}")
            by_device.setdefault(v.device, []).append(i)
    for indices in by_device.values():
        stacked = torch.stack([values[i].detach().reshape(()) for i in indices])
        for i, x in zip(indices, stacked.tolist()):
            out[i] = x
    return out


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether a trainer with this `precision` ("auto" | "bf16" | "fp32") runs its steps under bf16 autocast on
    `device`: "bf16" always, "auto" on CUDA."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


class Trainer:
    """Runs `config.steps` optimizer steps of `loss_fn` over `data` (see the module docstring).

    Args:
        config: a `TrainConfig`.
        model: the module whose trainable parameters (requires_grad) are optimised; on its device already.
        loss_fn: `(model, batch, step) -> (loss tensor, {name: float})`.
        data: a `TokenStream` of training tokens.
        evaluate: `(model) -> {name: float}`, called every `eval_every` steps and at the end.
        identity: what else decides this run, from the caller (model source, layer types, loss weights, data
            spec...): JSON-able values, merged into `identity()`. Only arguments that change what the run
            computes belong here, not its cadence, devices or output paths.
    """

    def __init__(self, config: TrainConfig, model: torch.nn.Module,
                 loss_fn: Callable[[torch.nn.Module, dict, int], tuple[torch.Tensor, dict]], data: TokenStream,
                 evaluate: Callable[[torch.nn.Module], dict] | None = None, identity: dict | None = None):
        self.config, self.loss_fn, self.evaluate_fn = config, loss_fn, evaluate
        # the run's identity is the configuration the trainer was built with (a caller may shorten `steps` later to
        # stop early, as an interruption would)
        self._config_at_start = copy.deepcopy(config)
        self.caller_identity = dict(identity or {})
        self.device = next(model.parameters()).device
        self.rank, self.world_size = dist_utils.setup(self.device)
        per_rank = config.batch_size // self.world_size
        if config.batch_size % self.world_size:
            raise ValueError(f"batch_size={config.batch_size} is not divisible by {self.world_size} processes")
        self.micro = config.micro_batch_size or per_rank
        if per_rank % self.micro:
            raise ValueError(f"each rank's {per_rank} sequences are not a multiple of micro_batch_size={self.micro}")
        self.accumulation = per_rank // self.micro
        if config.cuda_graph:
            check_graph_step(self.device, loss_fn, self.world_size,
                             torch.distributed.is_available() and torch.distributed.is_initialized())
        # the static-buffer step (`_static_step`): captured in a CUDA graph on CUDA; tests set it on CPU, where the
        # same object runs the same region eagerly
        self._graph_on = config.cuda_graph
        self._static: StaticStep | None = None
        self._static_names: list[str] = []  # the names of the captured region's outputs (loss and metrics)
        self.graph_failure: str | None = None  # why the graph path fell back to eager steps, if it did
        self.graph_replays = 0  # steps of this process's fits that replayed the captured region
        self.batcher = WindowBatcher(data, config.seq_len, config.batch_size, seed=config.seed)
        mode = config.distributed if config.distributed != "auto" else "ddp"
        # micro-batches' gradients summed by one foreach add (`_backward_folded`) in a plain process; not under DDP
        # or FSDP (`wrap` leaves the model as it is only without a process group), whose hooks read or reduce each
        # parameter's .grad as autograd accumulates it
        self.fold_gradients = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        self.model = dist_utils.wrap(model, mode, config.find_unused_parameters)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters (requires_grad)")
        groups = [{"params": [p for n, p in named if not _no_decay(n, p)], "weight_decay": config.weight_decay},
                  {"params": [p for n, p in named if _no_decay(n, p)], "weight_decay": 0.0}]
        params = [p for p in self.model.parameters() if p.requires_grad]
        if params and params[0] is not named[0][1]:  # FSDP2 replaced the parameters with sharded ones
            by_name = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
            groups = [{"params": [by_name[n] for n, p in named if not _no_decay(n, p)],
                       "weight_decay": config.weight_decay},
                      {"params": [by_name[n] for n, p in named if _no_decay(n, p)], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=config.betas,
                                           fused=self.device.type == "cuda" or None)
        self.out = Path(config.out_dir)
        self.step = 0
        self.skipped_steps = 0
        # `_train_seconds`: the run's training time before this process (None: unknown), and this process's start
        self._seconds_before: float | None = 0.0
        self._clock: float | None = None
        self._locked = False
        self._evaluated: set[int] = set()  # steps whose evaluation log.jsonl holds already
        self._chosen: tuple[Path | None] | None = None  # (checkpoint to resume from,) once `prepare` ran

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _use_bf16(self) -> bool:
        return uses_bf16(self.config.precision, self.device)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self._use_bf16() else nullcontext()

    # -- the run folder -------------------------------------------------------------------------------------------

    def identity(self) -> dict:
        """What decides this run's results, recorded in `out_dir/run.json` and compared on resume: the training
        fields of `IDENTITY_FIELDS` (as constructed), the resolved precision, the data (per source: tokens and a
        digest of its first and last 64K ids, so a moved or re-cached copy of the same data still matches), the
        trainable parameters (count, numbers, digest of names and shapes), and the caller's `identity`."""
        cfg = self._config_at_start
        ident = {name: getattr(cfg, name) for name in IDENTITY_FIELDS}
        ident["precision"] = "bf16" if self._use_bf16() else "fp32"
        streams = _batcher_streams(self.batcher)
        ident["data"] = ([{"tokens": len(s), "digest": s.digest(), **({"weight": round(w, 6)} if w is not None
                                                                         else {})} for s, w in streams]
                         if streams else type(self.batcher).__name__)
        shapes = [(n, tuple(p.shape)) for n, p in getattr(self.model, "module", self.model).named_parameters()
                  if p.requires_grad]
        ident["trainable"] = {"tensors": len(shapes), "numbers": sum(math.prod(s) for _, s in shapes),
                              "digest": hashlib.sha256(repr(shapes).encode()).hexdigest()[:12]}
        ident.update(self.caller_identity)
        return ident

    def _check_tokens(self) -> None:
        """Every id of every training source (held-out tails included: they share the arrays) is < the vocabulary."""
        vocab = _vocab_size(self.model)
        if vocab is None:
            return
        seen = set()
        for stream, _ in _batcher_streams(self.batcher):
            if id(stream.array) not in seen:
                seen.add(id(stream.array))
                check_token_ids(stream.array, vocab, f"training data {stream.name}")

    def _claim(self) -> Path | None:
        """(main process) Take the run folder and decide where training starts: check the data, lock, clean up
        after killed writers, move an old run aside (resume off) or check its identity (resume on), then choose
        the newest checkpoint that verifies. Returns it, or None to start at step 0."""
        cfg = self.config
        self._check_tokens()  # before anything on disk changes
        self.out.mkdir(parents=True, exist_ok=True)
        acquire_run_lock(self.out)
        self._locked = True
        clean_partials(self.out)
        identity = self.identity()

        def log(msg: str) -> None:
            print(f"jetnas: {self.out}: {msg}", file=sys.stderr)

        if not cfg.resume:
            moved = move_run_aside(self.out)
            if moved is not None:
                log(f"starting over (resume off); the old run is moved to {moved}")
        else:
            old = read_run_identity(self.out)
            has_checkpoints = bool(checkpoint_dirs(self.out))
            changes = identity_changes(old, identity) if old is not None else []
            if changes and has_checkpoints:
                raise RunIdentityError(
                    f"{self.out} holds a run with other arguments, so it cannot be resumed with these: "
                    f"{'; '.join(changes)}. Resume it with its own arguments, or start over with --no-resume "
                    f"(resume=False), which moves the old run aside")
            if changes:
                moved = move_run_aside(self.out)
                log(f"an earlier run with other arguments ({'; '.join(changes)}) left no checkpoint; its files are "
                    f"moved to {moved}")
            elif old is None and has_checkpoints:
                log("its checkpoints predate run.json (an older jetnas): their arguments cannot be checked")
        chosen = None
        if cfg.resume:
            chosen, skipped = choose_checkpoint(self.out)
            for path, reason, moved in skipped:
                log(f"skipping damaged checkpoint {path.name}: {reason} (moved to {moved})")
            if skipped and chosen is None:
                log("no intact checkpoint is left: starting from step 0")
        write_run_identity(self.out, identity)
        write_json_durably(self.out / "train_config.json", {
            **asdict(cfg), "world_size": self.world_size, "micro_batch_size": self.micro,
            "accumulation": self.accumulation})
        return chosen

    def _start(self) -> Path | None:
        """Run `_claim` on the main process and make every rank agree on its outcome (a collective)."""
        chosen, error = None, None
        if self.is_main:
            try:
                chosen = self._claim()
            except BaseException as err:  # every rank must reach the collective below before anyone raises
                error = err
        if self.world_size > 1:
            # only rank 0 contributes: the mean times the world size is its value
            step = -1 if chosen is None else int(chosen.name.split("-")[1])
            agreed = dist_utils.mean_over_ranks({"failed": float(error is not None), "step": float(step)
                                                 if self.is_main else 0.0}, self.device)
            failed = agreed["failed"] > 0
            step = round(agreed["step"] * self.world_size)
            if not self.is_main:
                if failed:  # an InputError, so that each rank prints one line, not a traceback
                    raise InputError(f"rank {self.rank}: rank 0 could not start the run in {self.out} (its error "
                                     f"is above)")
                chosen = None if step < 0 else self.out / "checkpoints" / f"step-{step:08d}"
        if error is not None:
            self._release()
            raise error
        return chosen

    def _release(self) -> None:
        if self.is_main and self._locked:
            release_run_lock(self.out)
            self._locked = False

    # -- logging --------------------------------------------------------------------------------------------------

    def _log(self, record: dict) -> None:
        if self.is_main:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _read_log(self, path: Path) -> tuple[list[tuple[str, dict]], bool]:
        """`(line, row)` of each row of a log, and whether its last line was cut (a kill mid-write: dropped with a
        warning). Any other unreadable line is an error naming the file and line."""
        lines = [(i, line) for i, line in enumerate(path.read_bytes().decode("utf-8", "replace").splitlines(), 1)
                 if line.strip()]
        rows, cut = [], False
        for k, (number, line) in enumerate(lines):
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not an object")
            except ValueError as err:
                if k == len(lines) - 1:
                    print(f"jetnas: {path}: dropping its cut last line {number} ({show_line(line)}), as a kill "
                          f"mid-write leaves it", file=sys.stderr)
                    cut = True
                    break
                raise InputError(f"{path} line {number}: not a JSON object ({err}): {show_line(line)}") from None
            rows.append((line, row))
        return rows, cut

    def _trim_log(self) -> None:
        """Drop the log rows of steps this run will (re)do: those after its checkpoint, or all of an earlier run when
        it starts afresh (e.g. a run directory copied without its checkpoints), so log.jsonl describes the model this
        run writes. The old log is appended whole to log.replaced.jsonl. A cut last line is dropped."""
        path = self.out / "log.jsonl"
        if not self.is_main or not path.exists():
            return
        rows, cut = self._read_log(path)
        kept = [line for line, row in rows if row.get("step", 0) <= self.step]
        self._evaluated = {row.get("step") for _, row in rows if row.get("step", 0) <= self.step
                           and any(k.startswith("eval/") for k in row)}
        if len(kept) == len(rows) and not cut:
            return
        if len(kept) != len(rows):
            with open(self.out / "log.replaced.jsonl", "a") as f:  # after any earlier replaced rows, not over them
                f.write("".join(line + "\n" for line, _ in rows))
            print(f"jetnas: {path}: dropped an earlier run's rows of steps after {self.step} (the old log is kept "
                  f"as {self.out / 'log.replaced.jsonl'})", file=sys.stderr)
        write_text_atomic(path, "".join(line + "\n" for line in kept))

    # -- training -------------------------------------------------------------------------------------------------

    def _check_weights(self, what: str) -> None:
        """Raise `NonFiniteError` on every rank when any rank's parameters (its shards, under FSDP) hold a NaN or
        infinity; a collective."""
        model = getattr(self.model, "module", self.model)
        bad = [n for n, p in model.named_parameters() if not all_finite(_local(p.detach()))]
        count = dist_utils.mean_over_ranks({"bad": float(len(bad))}, self.device)["bad"]
        if count > 0:
            names = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "") if bad else \
                "another rank's shards"
            raise NonFiniteError(f"{what}: non-finite weights in {names}: not saved; the newest checkpoint in "
                                 f"{self.out / 'checkpoints'} holds the last good state")

    def _save(self) -> None:
        self._check_weights(f"step {self.step}")
        extras = {"data_step": self.step, "seed": self.config.seed, "world_size": self.world_size}
        seconds = self._train_seconds()
        if seconds is not None:
            extras["train_seconds"] = round(seconds, 2)
        save_checkpoint(self.out, self.step, self.model, self.optimizer, extras,
                        keep=self.config.keep_checkpoints, is_main=self.is_main)
        dist_utils.barrier()

    def _train_seconds(self) -> float | None:
        """Wall seconds this run has trained so far, over every process that resumed it (the seconds of the steps
        a checkpoint holds; steps lost to a kill and done again count once). None before `fit` starts its clock, or
        when an earlier process's share is unknown (a checkpoint from before this was recorded)."""
        if self._clock is None or self._seconds_before is None:
            return None
        return self._seconds_before + time.perf_counter() - self._clock

    def _evaluate(self) -> dict:
        if self.evaluate_fn is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        with self._autocast():
            metrics = self.evaluate_fn(self.model)
        self.model.train(was_training)
        return dist_utils.mean_over_ranks(metrics, self.device)

    def _forward_backward(self, batch: torch.Tensor, step: int
                          ) -> tuple[list[tuple[str, torch.Tensor | float]], torch.Tensor]:
        """The differentiable part of step `step` on the rank's `batch [per_rank, seq_len + 1]` (on the device):
        `loss_fn` and the backward of each micro-batch (gradients summed into the trainable parameters' `.grad`),
        then the gradient clipping. Returns `(values, norm)`: each micro-batch's `("loss", loss)` and metrics, and
        the gradient norm before clipping, all unread (what a CUDA graph captures)."""
        cfg = self.config
        values: list[tuple[str, torch.Tensor | float]] = []
        params = [p for p in self.model.parameters() if p.requires_grad]
        for i in range(self.accumulation):
            rows = (i * self.micro, (i + 1) * self.micro)
            micro = {"input_ids": batch[rows[0] : rows[1]], "step_input_ids": batch, "rows": rows}
            sync = i == self.accumulation - 1 or not hasattr(self.model, "no_sync")
            with (nullcontext() if sync else self.model.no_sync()), self._autocast():
                loss, metrics = self.loss_fn(self.model, micro, step)
            values.extend({"loss": loss.detach(), **metrics}.items())
            # (x / 1 is x: no division, and no launch, without accumulation)
            scaled = loss / self.accumulation if self.accumulation > 1 else loss
            if i > 0 and self.fold_gradients:
                self._backward_folded(scaled, params)
            else:
                scaled.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        return values, norm

    def _static_region(self, batch: torch.Tensor, step: int) -> list[torch.Tensor]:
        """`_forward_backward` as the captured region: its values and the gradient norm as one list of tensors."""
        values, norm = self._forward_backward(batch, step)
        numbers = [k for k, v in values if not isinstance(v, torch.Tensor)]
        if numbers:
            raise ValueError(f"TrainConfig.cuda_graph=True: the loss function returns {sorted(set(numbers))} as "
                             f"Python numbers; a captured step would report their values at the capture forever. "
                             f"Return tensors (the trainer reads them once per step)")
        self._static_names = [k for k, _ in values]
        return [v for _, v in values] + [norm]

    def _static_step(self, batch: torch.Tensor, step: int):
        """Step `step`'s `(values, norm)` through the static-buffer step (`jetnas.train.graph_step`), or None when
        the graph path falls back to eager steps (from now on; one message)."""
        if self._static is None:
            params = [p for p in self.model.parameters() if p.requires_grad]
            self._static = StaticStep(self._static_region, tuple(batch.shape), params, self.device,
                                      use_graph=self.device.type == "cuda")
        out = self._static.run(batch, step)
        if out is None:
            self.graph_failure = self._static.failure
            if self.is_main:
                print(f"jetnas: {self.graph_failure}; running every step eagerly from here on", file=sys.stderr)
            self._drop_static()
            self._graph_on = False
            return None
        return list(zip(self._static_names, out[:-1])), out[-1]

    def _drop_static(self) -> None:
        """Forget the static step (its graph and gradient tensors): every `.grad` None, as after an eager step."""
        if self._static is not None:
            self.graph_replays += self._static.replays
            self._static.release()
            self._static = None
            self.optimizer.zero_grad(set_to_none=True)

    def _train_step(self, step: int) -> dict:
        cfg = self.config
        batch = self.batcher.batch(step, self.rank, self.world_size)
        if self.device.type == "cuda":
            # from pinned memory the copy is queued behind the GPU's work; a pageable one waits for all of it
            batch = batch.pin_memory()
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr_at(step)
        # each micro-batch's loss and metrics, read on the host once, after the clip: every read of a device value
        # waits for the GPU to finish all work queued so far, so one read per step instead of one per value
        static = self._static_step(batch, step) if self._graph_on else None
        if static is not None:
            values, norm = static
        else:
            values, norm = self._forward_backward(batch.to(self.device, non_blocking=True), step)
        read = _read_scalars([v for _, v in values] + [norm])
        totals: dict[str, float] = {}
        for (k, _), v in zip(values, read):
            totals[k] = totals.get(k, 0.0) + v / self.accumulation
        # every rank sees the same mean loss and global gradient norm, so all take the same branch below
        totals = dist_utils.mean_over_ranks(totals, self.device)
        grad_norm = read[-1]
        # the static step's gradients stay attached: its captured region zeroes them in place before the next one
        finite = math.isfinite(totals["loss"]) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        if static is None:
            self.optimizer.zero_grad(set_to_none=True)
        if not finite:
            if cfg.on_nonfinite == "error":
                raise NonFiniteError(
                    f"step {step + 1}: the loss is {totals['loss']} and the gradient norm {grad_norm}: stopped "
                    f"before its optimizer step, so the weights and the checkpoints in {self.out / 'checkpoints'} "
                    f"are those of step {step} or earlier. Lower the learning rate or check the data, or skip "
                    f"such steps (on_nonfinite='skip')")
            self.skipped_steps += 1
            totals["skipped"] = True
            if self.is_main:
                print(f"jetnas: step {step + 1}: loss {totals['loss']}, gradient norm {grad_norm}: update "
                      f"skipped ({self.skipped_steps} so far)", file=sys.stderr)
        totals["grad_norm"] = grad_norm
        totals["lr"] = cfg.lr_at(step)
        return totals

    @staticmethod
    def _backward_folded(loss: torch.Tensor, params: list[torch.Tensor]) -> None:
        """`loss.backward()` into the gradients the earlier micro-batches left in `params`, with one
        `torch._foreach_add_` for all of them instead of autograd's add per parameter: on a host-bound GPU each of
        those adds is a launch the host pays (354 per extra micro-batch in the stage-1 step of the SmolLM2-135M
        hybrid, a tenth of a micro-batch's launches; issue 16). The same sums (earlier + this micro-batch's, in
        float32 per element), bit for bit; the cost is holding this micro-batch's gradients beside the earlier
        ones until the add, one more set of trainable-parameter gradients at the end of the backward (when the
        activations are gone)."""
        held = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            loss.backward()
        except BaseException:
            for p, g in zip(params, held):
                p.grad = g
            raise
        earlier, new = [], []
        for p, g in zip(params, held):
            if g is None:  # no gradient before this micro-batch: its own (or none) stays
                continue
            if p.grad is not None:
                earlier.append(g)
                new.append(p.grad)
            p.grad = g
        if earlier:
            torch._foreach_add_(earlier, new)

    @property
    def resume_point(self) -> Path | None:
        """The checkpoint `fit` will resume from (None: a fresh start); takes the run folder (`prepare`) first."""
        self.prepare()
        return self._chosen[0]

    def prepare(self) -> None:
        """Take the run folder now: lock it, move an old run aside or check the run's identity, choose the checkpoint
        to resume from. `fit` does this itself; a caller that writes its own records into `out_dir` calls it first,
        so that nothing is written when the run is refused (another writer, other arguments, bad data). The lock is
        held until `fit` returns (or this process ends: a dead holder's lock is taken over)."""
        if self._chosen is None:
            self._chosen = (self._start(),)

    def fit(self) -> dict:
        """Train (resuming from the newest good checkpoint when `resume`); returns a summary dict. Holds the run
        folder's lock throughout."""
        self.prepare()
        try:
            return self._fit(self._chosen[0])
        finally:
            self._chosen = None
            self._release()

    def _fit(self, ckpt: Path | None) -> dict:
        cfg = self.config
        # a captured step is rebuilt from here: its warm-up runs again on the loaded weights (loading copies into the
        # same parameters, but the optimizer's state is replaced, and the loader wants .grad None on a fresh one)
        self._drop_static()
        self._seconds_before = 0.0
        if ckpt is not None:
            meta = load_checkpoint(ckpt, self.model, self.optimizer, verify=False)  # verified by _claim
            self.step = meta["step"]
            self._seconds_before = meta.get("train_seconds")
            if self.is_main:
                print(f"jetnas: resuming from {ckpt} (step {self.step})", file=sys.stderr)
        self._trim_log()
        self.model.train()
        tokens_per_step = cfg.batch_size * cfg.seq_len
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", disable=not self.is_main, file=sys.stderr,
                   dynamic_ncols=True)
        start, start_step, last = time.perf_counter(), self.step, {}
        self._clock = start
        stop = _SigtermStop(enabled=self.world_size == 1)
        try:
            self._train_loop(stop, start_step, tokens_per_step, bar, last)
            final_eval = self._evaluate()
            if final_eval and self.step not in self._evaluated:  # a finished run resumed: its evaluation is logged
                self._log({"step": self.step, **{f"eval/{k}": v for k, v in final_eval.items()}})
            if self.step > start_step or ckpt is None:
                self._save()
            else:
                self._check_weights(f"the model resumed at step {self.step}")
        finally:
            # a SIGTERM that came during the last step or the final evaluation and save is delivered now, to the
            # handler before ours, with everything saved
            stop.restore()
        elapsed = time.perf_counter() - start
        total = self._train_seconds()
        self._clock = None
        done = self.step - start_step
        # `seconds`: the whole run's, over the processes that resumed it (this one's alone when an earlier share is
        # unknown); `tokens_per_s`: this process's steps over its own time. A resumed run says where it resumed.
        resumed = {"resumed_at_step": start_step, "seconds_this_process": round(elapsed, 2)} if ckpt is not None else {}
        return {"steps": self.step, "final_loss": last.get("loss"), "tokens": self.step * tokens_per_step,
                "seconds": round(elapsed if total is None else total, 2), **resumed,
                "tokens_per_s": round(done * tokens_per_step / elapsed, 1) if done else None,
                "eval": final_eval, "world_size": self.world_size, "skipped_steps": self.skipped_steps,
                **({"cuda_graph": self.graph_summary()} if cfg.cuda_graph else {})}

    def _train_loop(self, stop: _SigtermStop, start_step: int, tokens_per_step: int, bar, last: dict) -> None:
        """The steps from `self.step` to the config's end (`last`: filled with the newest step's metrics); saves and
        re-raises on Ctrl-C, saves and raises `TrainingStopped` on SIGTERM between steps (`stop`)."""
        cfg = self.config
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                last.clear()
                last.update(self._train_step(self.step))
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                last["tokens_per_s"] = tokens_per_step / (time.perf_counter() - t0)
                self.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
                # wall time (epoch seconds): where a device call's time goes besides the steps (evaluations,
                # checkpoints, start-up), read from the gaps between rows
                record = {"step": self.step, **last, "time": round(time.time(), 2)}
                evaluating = bool(cfg.eval_every) and self.step % cfg.eval_every == 0 and self.step < cfg.steps
                if evaluating:
                    record.update({f"eval/{k}": v for k, v in self._evaluate().items()})
                if evaluating or self.step % cfg.log_every == 0:
                    self._log(record)
                if stop.signal is not None and self.step < cfg.steps:
                    stop.handled = True
                    raise TrainingStopped(f"stopped by signal {stop.signal} after step {self.step} of {cfg.steps}; "
                                          f"saved in {self.out / 'checkpoints'}: the same command resumes there")
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self._save()
        except KeyboardInterrupt:
            # keep what was trained (Ctrl-C or SIGTERM): checkpoint the last completed step, then stop
            if self.step > start_step:
                self._save()
            raise
        finally:
            bar.close()

    def graph_summary(self) -> dict:
        """What the captured step did in this process: how many steps replayed it, and why it fell back if it did
        (a run that says `cuda_graph: true` but replayed nothing ran eagerly)."""
        live = self._static.replays if self._static is not None else 0
        return {"replayed_steps": self.graph_replays + live, "fallback": self.graph_failure}


class TrainingStopped(KeyboardInterrupt):
    """A run stopped between two steps by SIGTERM (a scheduler's preemption, `timeout`, a device call's time
    limit), its last completed step saved: an interruption, as Ctrl-C is, that lost nothing."""


class _SigtermStop:
    """While a single-process run trains: SIGTERM asks the loop to stop after the step it is in (the step finishes,
    is saved, and `TrainingStopped` is raised) instead of killing the process mid-step, which loses every step since
    the last checkpoint. Off in multi-process runs (the ranks could stop after different steps and block in each
    other's collectives) and outside the main thread (where Python cannot set a handler); `restore` puts the
    previous handler back."""

    def __init__(self, enabled: bool):
        self.signal: int | None = None
        self.handled = False  # the loop stopped for it (TrainingStopped)
        self._installed = enabled and threading.current_thread() is threading.main_thread()
        if self._installed:
            self._previous = signal.signal(signal.SIGTERM, self._note)

    def _note(self, signum, frame) -> None:
        self.signal = signum

    def restore(self) -> None:
        """Put the previous handler back; a signal noted but not acted on (it came during the last step or after)
        is sent again, to that handler."""
        if not self._installed:
            return
        # None: the previous handler was not set from Python; the default is the closest to it
        signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
        self._installed = False
        if self.signal is not None and not self.handled:
            signal.raise_signal(self.signal)


def show_line(line: str, limit: int = 60) -> str:
    return repr(line if len(line) <= limit else line[: limit - 3] + "...")
