"""PostNAS step 1 as runs: training the super-network (`run_supernet`) and searching the placement on it
(`run_placement`). The pieces are `jetnas.nas` (super-network, sampling, distillation loss, beam search) and
`jetnas.train` (data, the trainer)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from jetnas.runner.models import resolve_device, resolve_dtype
from jetnas.runner.recipes import PlacementRecipe, SupernetRecipe
from jetnas.runner.results import PlacementResult, SupernetResult


def run_supernet(recipe: SupernetRecipe) -> SupernetResult:
    """Train a super-network (paper, section 2.2): the teacher plus a trainable linear path per layer, distilled
    on sampled sub-networks; writes `supernet.json`, `linear.safetensors`, `heldout.bin`, the log and checkpoints
    under the recipe's out_dir (resumable). Under torchrun every rank calls it."""
    import torch

    from jetnas.nas.distill import DistillConfig, make_distill_loss
    from jetnas.nas.sampling import Budget, SubnetSampler
    from jetnas.nas.supernet import SuperNetSpec, build_supernet
    from jetnas.train.data import resolve_data
    from jetnas.train.distributed import gather_full, is_main_process, local_device
    from jetnas.train.losses import distill_terms
    from jetnas.train.trainer import Trainer, TrainConfig

    r = recipe
    if r.sample == "uniform":
        mode, budget = "uniform", None
    else:
        mode, budget = "budget", Budget.parse(r.sample.split(":", 1)[1])
    out = Path(r.out_dir or f"runs/supernet-{time.strftime('%Y%m%d-%H%M%S')}")
    dev = local_device(r.device)
    spec = SuperNetSpec(r.teacher, r.linear, swa_window=r.swa_window)
    # the linear branches' initialisation: the same on every rank and in every run of this seed (2026-12-02 on
    # the H200, three same-seed runs started from losses 2.40, 0.98 and 0.65)
    torch.manual_seed(r.seed)
    net, tokenizer, teacher_spec = build_supernet(spec, device=dev)
    sampler = SubnetSampler(net.num_layers, mode=mode, budget=budget, p_attn=r.p_attn, seed=r.seed)
    distill = DistillConfig(kl_weight=r.kl_weight, subnets_per_step=r.subnets_per_step)
    stream, heldout = resolve_data(r.data, tokenizer, teacher=net.base, teacher_eos=teacher_spec.eos_token_id,
                                   heldout_tokens=r.heldout_tokens, seed=r.seed, teacher_name=teacher_spec.name)
    out.mkdir(parents=True, exist_ok=True)
    heldout_path = out / "heldout.bin"
    if is_main_process():
        heldout.save(heldout_path)
    config = TrainConfig(steps=r.steps, batch_size=r.batch_size, micro_batch_size=r.micro_batch_size,
                         seq_len=r.seq_len, lr=r.lr,
                         warmup_steps=r.warmup_steps if r.warmup_steps is not None else max(1, r.steps // 20),
                         eval_every=r.eval_every, save_every=r.save_every or max(1, r.steps // 4), seed=r.seed,
                         precision=r.precision, distributed=r.distributed, resume=r.resume, out_dir=str(out),
                         find_unused_parameters=True)
    probes = _probe_choices(net.num_layers, sampler)
    probe_batch = heldout.window_batch(4, r.seq_len, device=dev)

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
        net.save(out, state=state, extra={"teacher": teacher_spec.name, "data": r.data or "teacher-generated",
                                          "heldout": str(heldout_path),
                                          "sampling": {"mode": mode, "budget": str(budget), "p_attn": r.p_attn,
                                                       "seed": r.seed},
                                          "distill": {"kl_weight": r.kl_weight,
                                                      "subnets_per_step": r.subnets_per_step},
                                          "train": summary})
    return SupernetResult(str(out), teacher_spec.name, r.linear, summary)


def _probe_choices(num_layers: int, sampler) -> dict[str, tuple[str, ...]]:
    """Fixed sub-networks whose held-out feature loss is tracked during training."""
    from jetnas.nas.search import make_candidate, uniform_placement

    probes = {"all_linear": ("linear",) * num_layers}
    if sampler.budget is not None:
        probes["uniform_budget"] = uniform_placement(num_layers, sampler.budget)
    else:
        probes["middle_attn"] = make_candidate(num_layers, [num_layers // 2])
    return probes


def run_placement(recipe: PlacementRecipe) -> PlacementResult:
    """The placement search on a trained super-network (paper, section 2.2): heat-map, beam search, baselines;
    writes `placements.json`, `heatmap.png`, `comparison.md` / `.json` under the recipe's out_dir."""
    from jetnas.nas.objectives import CandidateEvaluator, ProbedEvaluator, build_search_tasks
    from jetnas.nas.placement import run_placement_search
    from jetnas.nas.sampling import Budget
    from jetnas.nas.supernet import load_supernet

    r = recipe
    parsed = Budget.parse(r.budget)
    specs = [t for t in r.tasks.split(",") if t]
    dev = resolve_device(r.device)
    net, tokenizer, meta = load_supernet(r.supernet, dtype=resolve_dtype(r.dtype, dev), device=dev)
    search_tasks = build_search_tasks(specs, rows=r.rows, lm_data=r.lm_data or meta.get("heldout"),
                                      lm_tokens=r.lm_tokens, retrieval_length=r.retrieval_length)
    max_length = max([r.retrieval_length + 64, 1024] + [getattr(t.task, "length", 0) + 64 for t in search_tasks])
    if r.retrieval_probe == "windowed":
        evaluator = ProbedEvaluator(net, tokenizer, search_tasks, r.probe_window, r.probe_sinks,
                                    batch_size=r.batch_size, max_length=max_length)
    else:
        evaluator = CandidateEvaluator(net, tokenizer, search_tasks, batch_size=r.batch_size, max_length=max_length)
    out = Path(r.out_dir or Path(r.supernet) / f"search-{parsed.attn}attn-{parsed.swa}swa")
    probe = (f"; retrieval through the windowed-teacher probe (window {r.probe_window}, {r.probe_sinks} sinks)"
             if r.retrieval_probe == "windowed" else "")
    print(f"jetnas: placement search, budget {parsed}, beam {r.beam_width}, tasks {specs}, {net.num_layers} layers"
          f"{probe}", file=sys.stderr)
    summary = run_placement_search(evaluator, parsed, r.beam_width, out, linear_type=net.spec.linear_type)
    return PlacementResult(supernet=r.supernet, budget=str(parsed), **summary)
