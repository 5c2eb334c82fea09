"""The one trainer of jetnas (super-network distillation; stage-1/2 training): AdamW on the trainable parameters,
warm-up + cosine, gradient accumulation, bf16 autocast on GPU, progress bar and JSONL log, periodic evaluation,
atomic safetensors checkpoints, exact resume, and torchrun data parallelism (DDP or FSDP2) with the same code.

What is trained and how is the caller's: `loss_fn(model, batch, step) -> (loss, metrics)` gets the (possibly
wrapped) model and `batch = {"input_ids": [micro_batch, seq_len + 1]}` on the model's device.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from jetnas.train import distributed as dist_utils
from jetnas.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from jetnas.train.data import TokenStream, WindowBatcher

PRECISIONS = ("auto", "fp32", "bf16")
DISTRIBUTED = ("auto", "ddp", "fsdp")


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
        out_dir: where log.jsonl, train_config.json and checkpoints go.
        resume: continue from the newest complete checkpoint in out_dir.
        distributed: "auto" (DDP when launched with torchrun), "ddp" or "fsdp".
        find_unused_parameters: for DDP when a step leaves parameters unused (super-network branches).
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

    def __post_init__(self):
        checks = [("steps", self.steps >= 1), ("batch_size", self.batch_size >= 1), ("seq_len", self.seq_len >= 1),
                  ("lr", self.lr > 0), ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1),
                  ("warmup_steps", 0 <= self.warmup_steps <= self.steps), ("weight_decay", self.weight_decay >= 0),
                  ("grad_clip", self.grad_clip >= 0), ("log_every", self.log_every >= 1),
                  ("keep_checkpoints", self.keep_checkpoints >= 1)]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is out of range")
        for name in ("micro_batch_size", "eval_every", "save_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"TrainConfig.{name}={value!r} must be >= 1 or None")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision={self.precision!r} must be one of {PRECISIONS}")
        if self.distributed not in DISTRIBUTED:
            raise ValueError(f"TrainConfig.distributed={self.distributed!r} must be one of {DISTRIBUTED}")
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


class Trainer:
    """Runs `config.steps` optimizer steps of `loss_fn` over `data` (see the module docstring).

    Args:
        config: a `TrainConfig`.
        model: the module whose trainable parameters (requires_grad) are optimised; on its device already.
        loss_fn: `(model, batch, step) -> (loss tensor, {name: float})`.
        data: a `TokenStream` of training tokens.
        evaluate: `(model) -> {name: float}`, called every `eval_every` steps and at the end.
    """

    def __init__(self, config: TrainConfig, model: torch.nn.Module,
                 loss_fn: Callable[[torch.nn.Module, dict, int], tuple[torch.Tensor, dict]], data: TokenStream,
                 evaluate: Callable[[torch.nn.Module], dict] | None = None):
        self.config, self.loss_fn, self.evaluate_fn = config, loss_fn, evaluate
        self.device = next(model.parameters()).device
        self.rank, self.world_size = dist_utils.setup(self.device)
        per_rank = config.batch_size // self.world_size
        if config.batch_size % self.world_size:
            raise ValueError(f"batch_size={config.batch_size} is not divisible by {self.world_size} processes")
        self.micro = config.micro_batch_size or per_rank
        if per_rank % self.micro:
            raise ValueError(f"each rank's {per_rank} sequences are not a multiple of micro_batch_size={self.micro}")
        self.accumulation = per_rank // self.micro
        self.batcher = WindowBatcher(data, config.seq_len, config.batch_size, seed=config.seed)
        mode = config.distributed if config.distributed != "auto" else "ddp"
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

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _autocast(self):
        use_bf16 = self.config.precision == "bf16" or (self.config.precision == "auto" and self.device.type == "cuda")
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    def _log(self, record: dict) -> None:
        if self.is_main:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _trim_log(self) -> None:
        """Drop the log rows of steps this run will (re)do: those after its checkpoint, or all of an earlier run when
        it starts afresh (e.g. a run directory copied without its checkpoints), so log.jsonl describes the model this
        run writes. The old log is appended whole to log.replaced.jsonl."""
        path = self.out / "log.jsonl"
        if not self.is_main or not path.exists():
            return
        rows = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [line for line in rows if json.loads(line).get("step", 0) <= self.step]
        if len(kept) == len(rows):
            return
        with open(self.out / "log.replaced.jsonl", "a") as f:  # after any earlier replaced rows, not over them
            f.write("".join(line + "\n" for line in rows))
        tmp = self.out / "log.jsonl.partial"
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
        print(f"jetnas: {path}: dropped an earlier run's rows of steps after {self.step} (the old log is kept as "
              f"{self.out / 'log.replaced.jsonl'})", file=sys.stderr)

    def _save(self) -> None:
        save_checkpoint(self.out, self.step, self.model, self.optimizer,
                        {"data_step": self.step, "seed": self.config.seed, "world_size": self.world_size},
                        keep=self.config.keep_checkpoints, is_main=self.is_main)
        dist_utils.barrier()

    def _evaluate(self) -> dict:
        if self.evaluate_fn is None:
            return {}
        was_training = self.model.training
        self.model.eval()
        with self._autocast():
            metrics = self.evaluate_fn(self.model)
        self.model.train(was_training)
        return dist_utils.mean_over_ranks(metrics, self.device)

    def _train_step(self, step: int) -> dict:
        cfg = self.config
        batch = self.batcher.batch(step, self.rank, self.world_size).to(self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr_at(step)
        totals: dict[str, float] = {}
        for i in range(self.accumulation):
            micro = {"input_ids": batch[i * self.micro : (i + 1) * self.micro]}
            sync = i == self.accumulation - 1 or not hasattr(self.model, "no_sync")
            with (nullcontext() if sync else self.model.no_sync()), self._autocast():
                loss, metrics = self.loss_fn(self.model, micro, step)
            (loss / self.accumulation).backward()
            for k, v in {"loss": loss.detach().item(), **metrics}.items():
                totals[k] = totals.get(k, 0.0) + float(v) / self.accumulation
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        totals = dist_utils.mean_over_ranks(totals, self.device)
        totals["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        totals["lr"] = cfg.lr_at(step)
        return totals

    def fit(self) -> dict:
        """Train (resuming if a checkpoint exists and `resume`); returns a summary dict."""
        cfg = self.config
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_config.json").write_text(json.dumps(
                {**asdict(cfg), "world_size": self.world_size, "micro_batch_size": self.micro,
                 "accumulation": self.accumulation}, indent=2))
        ckpt = latest_checkpoint(self.out) if cfg.resume else None
        if ckpt is not None:
            meta = load_checkpoint(ckpt, self.model, self.optimizer)
            self.step = meta["step"]
            if self.is_main:
                print(f"jetnas: resuming from {ckpt} (step {self.step})", file=sys.stderr)
        self._trim_log()
        self.model.train()
        tokens_per_step = cfg.batch_size * cfg.seq_len
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", disable=not self.is_main, file=sys.stderr,
                   dynamic_ncols=True)
        start, start_step, last = time.perf_counter(), self.step, {}
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                last = self._train_step(self.step)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                last["tokens_per_s"] = tokens_per_step / (time.perf_counter() - t0)
                self.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
                record = {"step": self.step, **last}
                evaluating = bool(cfg.eval_every) and self.step % cfg.eval_every == 0 and self.step < cfg.steps
                if evaluating:
                    record.update({f"eval/{k}": v for k, v in self._evaluate().items()})
                if evaluating or self.step % cfg.log_every == 0:
                    self._log(record)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self._save()
        except KeyboardInterrupt:
            # keep what was trained: checkpoint the last completed step, then stop
            if self.step > start_step:
                self._save()
            bar.close()
            raise
        bar.close()
        final_eval = self._evaluate()
        if final_eval:
            self._log({"step": self.step, **{f"eval/{k}": v for k, v in final_eval.items()}})
        if self.step > start_step or ckpt is None:
            self._save()
        elapsed = time.perf_counter() - start
        done = self.step - start_step
        return {"steps": self.step, "final_loss": last.get("loss"), "tokens": self.step * tokens_per_step,
                "seconds": round(elapsed, 2),
                "tokens_per_s": round(done * tokens_per_step / elapsed, 1) if done else None,
                "eval": final_eval, "world_size": self.world_size}
