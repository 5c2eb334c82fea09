"""`jetnas supernet` and `jetnas search placement`: PostNAS step 1 from the command line."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from jetnas.commands.models import _device, _dtype


def supernet(teacher: str = "smollm2-135m", data: str | None = None, steps: int = 200, out_dir: str | None = None,
             linear: str = "gla", swa_window: int = 512, sample: str = "uniform", p_attn: float = 0.5,
             subnets_per_step: int = 1, kl_weight: float = 0.0, batch_size: int = 8,
             micro_batch_size: int | None = None, seq_len: int = 512, lr: float = 1e-3, warmup_steps: int | None = None,
             heldout_tokens: int = 32768, eval_every: int | None = None, save_every: int | None = None, seed: int = 0,
             precision: str = "auto", distributed: str = "auto", resume: bool = True, device: str | None = None) -> dict:
    """Train a PostNAS super-network: the teacher plus a linear path per layer, distilled on sampled sub-networks.

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
    from jetnas.nas.distill import DistillConfig, distill_terms, make_distill_loss
    from jetnas.nas.sampling import Budget, SubnetSampler
    from jetnas.nas.supernet import SuperNetSpec, build_supernet
    from jetnas.train.data import resolve_data
    from jetnas.train.distributed import gather_full, is_main_process, local_device
    from jetnas.train.trainer import Trainer, TrainConfig

    if sample == "uniform":
        mode, budget = "uniform", None
    elif sample.startswith("budget:"):
        mode, budget = "budget", Budget.parse(sample.split(":", 1)[1])
    else:
        raise ValueError(f"--sample must be 'uniform' or 'budget:attn=N,swa=M', got {sample!r}")
    out = Path(out_dir or f"runs/supernet-{time.strftime('%Y%m%d-%H%M%S')}")
    dev = local_device(device)
    spec = SuperNetSpec(teacher, linear, swa_window=swa_window)
    # the linear branches' initialisation: the same on every rank and in every run of this seed (2026-12-02 on
    # the H200, three same-seed runs started from losses 2.40, 0.98 and 0.65)
    torch.manual_seed(seed)
    net, tokenizer, teacher_spec = build_supernet(spec, device=dev)
    sampler = SubnetSampler(net.num_layers, mode=mode, budget=budget, p_attn=p_attn, seed=seed)
    distill = DistillConfig(kl_weight=kl_weight, subnets_per_step=subnets_per_step)
    stream, heldout = resolve_data(data, tokenizer, teacher=net.base, teacher_eos=teacher_spec.eos_token_id,
                                   heldout_tokens=heldout_tokens, seed=seed, teacher_name=teacher_spec.name)
    out.mkdir(parents=True, exist_ok=True)
    heldout_path = out / "heldout.bin"
    if is_main_process():
        heldout.save(heldout_path)
    config = TrainConfig(steps=steps, batch_size=batch_size, micro_batch_size=micro_batch_size, seq_len=seq_len,
                         lr=lr, warmup_steps=warmup_steps if warmup_steps is not None else max(1, steps // 20),
                         eval_every=eval_every, save_every=save_every or max(1, steps // 4), seed=seed,
                         precision=precision, distributed=distributed, resume=resume, out_dir=str(out),
                         find_unused_parameters=True)
    probes = _probe_choices(net.num_layers, sampler)
    probe_batch = heldout.window_batch(4, seq_len, device=dev)

    @torch.no_grad()
    def evaluate(model):
        model = getattr(model, "module", model)
        ids = probe_batch[:, :-1]
        _, t_hidden = model(ids, model.teacher_choice(), output_hidden_states=True)
        return {f"heldout_hidden_mse/{name}": distill_terms(model(ids, choice, output_hidden_states=True)[1],
                                                            t_hidden)["hidden"].item()
                for name, choice in probes.items()}

    trainer = Trainer(config, net, make_distill_loss(sampler, distill), stream, evaluate=evaluate)
    summary = trainer.fit()
    state = gather_full(net.trainable_state_dict())  # every rank: FSDP's shards of the branches are gathered
    if is_main_process():
        net.save(out, state=state, extra={"teacher": teacher_spec.name, "data": data or "teacher-generated",
                             "heldout": str(heldout_path), "sampling": {"mode": mode, "budget": str(budget),
                                                                        "p_attn": p_attn, "seed": seed},
                             "distill": {"kl_weight": kl_weight, "subnets_per_step": subnets_per_step},
                             "train": summary})
    return {"out_dir": str(out), "teacher": teacher_spec.name, "linear": linear, **summary}


def _probe_choices(num_layers: int, sampler) -> dict[str, tuple[str, ...]]:
    """Fixed sub-networks whose held-out feature loss is tracked during training."""
    from jetnas.nas.search import make_candidate, uniform_placement

    probes = {"all_linear": ("linear",) * num_layers}
    if sampler.budget is not None:
        probes["uniform_budget"] = uniform_placement(num_layers, sampler.budget)
    else:
        probes["middle_attn"] = make_candidate(num_layers, [num_layers // 2])
    return probes


def search_placement(supernet: str, budget: str = "attn=2,swa=2", tasks: str = "lm,retrieval", beam_width: int = 4,
                     out_dir: str | None = None, rows: int = 16, lm_data: str | None = None, lm_tokens: int = 8192,
                     retrieval_length: int = 1024, batch_size: int = 8, device: str | None = None,
                     dtype: str = "auto") -> dict:
    """Search which layers stay full / sliding-window attention, on a trained super-network.

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
    """
    from jetnas.nas.objectives import CandidateEvaluator, build_search_tasks
    from jetnas.nas.placement import run_placement_search
    from jetnas.nas.sampling import Budget
    from jetnas.nas.supernet import load_supernet

    parsed = Budget.parse(budget)
    specs = [t for t in tasks.split(",") if t]
    dev = _device(device)
    net, tokenizer, meta = load_supernet(supernet, dtype=_dtype(dtype, dev), device=dev)
    search_tasks = build_search_tasks(specs, rows=rows, lm_data=lm_data or meta.get("heldout"), lm_tokens=lm_tokens,
                                      retrieval_length=retrieval_length)
    max_length = max([retrieval_length + 64, 1024] + [getattr(t.task, "length", 0) + 64 for t in search_tasks])
    evaluator = CandidateEvaluator(net, tokenizer, search_tasks, batch_size=batch_size, max_length=max_length)
    out = Path(out_dir or Path(supernet) / f"search-{parsed.attn}attn-{parsed.swa}swa")
    print(f"jetnas: placement search, budget {parsed}, beam {beam_width}, tasks {specs}, {net.num_layers} layers",
          file=sys.stderr)
    summary = run_placement_search(evaluator, parsed, beam_width, out, linear_type=net.spec.linear_type)
    return {"supernet": supernet, "budget": str(parsed), **summary}
