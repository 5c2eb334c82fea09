"""Training throughput of the PostNAS stages: the super-network step, the stage-1 distillation step and the stage-2
step of a teacher / hybrid, timed per optimizer step, with MFU and a kernel profile.

Each mode builds what `jetnas supernet` / `jetnas train --stage 1|2` build (the same loss functions and the one
`Trainer`), runs `--warmup` steps (compilation, autotuning), then times `--steps` optimizer steps (CUDA synchronised
around each) and logs every step's loss, so two code versions can be compared step by step:

    python benchmarks/train_bench.py --modes supernet,stage1,stage2 --teacher smollm2-135m \
        --data ../shared/data/corpus/train.bin --steps 20 --out $OUT/new.json
    PYTHONPATH=/path/to/old/checkout python benchmarks/train_bench.py ... --label old --out $OUT/old.json
    python benchmarks/train_bench.py --compare $OUT/old.json,$OUT/new.json     # the side-by-side table

`--cuda-graph` times each stage mode twice in the same process: eagerly (`stage1`), then with the step captured in a
CUDA graph (`stage1-graph`, `TrainConfig.cuda_graph`), from the same initial weights, data and step indices, so their
losses compare step by step (`max_abs_loss_diff_vs_eager`). Both get at least `graph_step.WARMUP_STEPS + 2` warm-up
steps, so that the graphed run's timed steps are all plain replays (its warm-up, capture and checked first replay
come before).

`--fusions residual,hidden_loss,projections` switches on training fusions that are off by default
(`Backend.fused_residual`, `Backend.fused_hidden_loss`, `Backend.fused_projections`: written and checked on CPU,
to be timed here) in the teacher's and every student's (or the super-network's) modules, so that one checkout can be
run with and without them (`--label fused`).

The script itself only uses what every jetnas version since 2026-12-02 has (`jetnas.train.stages`,
`jetnas.nas.supernet`, `jetnas.train.trainer.Trainer`), through `Api` below, so it runs against an older checkout
put first on PYTHONPATH.

MFU: the FLOPs of one optimizer step as counted by `torch.utils.flop_counter.FlopCounterMode` (every aten matrix
product and attention call, forward and backward; fla's and our Triton kernels for the linear-attention recurrences
are *not* counted, so MFU is slightly understated), over the step time, over the bf16 matrix-product rate measured
in the same run (an 8192^3 product). `--teacher random` builds a randomly initialised teacher with SmolLM2-135M's
architecture (throughput only: its losses mean nothing). The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=100000.0, attention_bias=False,
                    mlp_bias=False, hidden_act="silu")
#: the layer types of the 2026-12-02 H200 run's final hybrid (results/h200_postnas_smollm2_135m/stage1)
H200_RUN_LAYOUT = {10: "swa", 11: "swa", 23: "attn", 28: "attn"}

KINDS = [  # kernel name -> what it is (first match wins)
    ("attention (SDPA / flash)", r"flash|fmha|attention|sdpa|efficient_attention"),
    ("linear attention (fla / TileLang)", r"chunk|recurrent|fwd_h|bwd_|wy|solve_tril|l2norm|kkt|cumsum|gated_delta|"
                                          r"tilelang|tl_|gla|delta_rule"),
    ("short convs", r"conv"),
    ("GEMM", r"gemm|nvjet|cutlass|sm90|xmma|matmul|cublas|splitk"),
    ("softmax / cross-entropy / KL", r"softmax|log_softmax|nll|cross_entropy|xlogy|kl_div"),
    ("norms / activations / elementwise", r"elementwise|vectorized|reduce|norm|silu|sigmoid|softplus|mul|add|exp|pow"),
    ("copies / casts / indexing", r"copy|cat|index|gather|scatter|fill|cast|transpose|to_copy"),
    ("optimizer", r"adam|multi_tensor|foreach|clip"),
]


def log(*args) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *args, file=sys.stderr, flush=True)


def kind(name: str) -> str:
    low = name.lower()
    for label, pattern in KINDS:
        if re.search(pattern, low):
            return label
    return "other"


class Api:
    """The jetnas entry points this benchmark needs, wherever the checkout on PYTHONPATH keeps them."""

    def __init__(self):
        import jetnas

        self.jetnas = jetnas
        self.version = getattr(jetnas, "__version__", "?")
        self.path = str(Path(jetnas.__file__).parent)
        stages = importlib.import_module("jetnas.train.stages")
        self.StageConfig = stages.StageConfig
        self.load_stage_teacher = stages.load_stage_teacher
        self.build_student = stages.build_student
        self.forward_teacher = getattr(stages, "forward_teacher", None)  # (older checkouts: none)
        self.make_stage_loss = stages.make_stage_loss
        self.Trainer = importlib.import_module("jetnas.train.trainer").Trainer
        self.TrainConfig = importlib.import_module("jetnas.train.trainer").TrainConfig
        supernet = importlib.import_module("jetnas.nas.supernet")
        self.SuperNet, self.SuperNetSpec = supernet.SuperNet, supernet.SuperNetSpec
        sampling = importlib.import_module("jetnas.nas.sampling")
        self.SubnetSampler = sampling.SubnetSampler
        distill = importlib.import_module("jetnas.nas.distill")
        self.DistillConfig, self.make_distill_loss = distill.DistillConfig, distill.make_distill_loss
        self.TokenStream = importlib.import_module("jetnas.train.data").TokenStream


def random_teacher_dir(target: Path, tokenizer_from: str | None, seed: int = 0) -> Path:
    """A SmolLM2-135M-shaped Llama with random weights, saved as a model directory (with a tokenizer copied from
    `tokenizer_from` when given, since older jetnas teachers load one)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (target / "config.json").exists():
        return target
    torch.manual_seed(seed)
    fields = dict(SMOLLM2_135M)
    theta = fields.pop("rope_theta")
    config = LlamaConfig(**fields, rope_parameters={"rope_theta": theta, "rope_type": "default"})
    LlamaForCausalLM(config).save_pretrained(target)
    if tokenizer_from:
        for f in Path(tokenizer_from).glob("tokenizer*"):
            (target / f.name).write_bytes(f.read_bytes())
    return target


def gemm_tflops(device: torch.device) -> float:
    """The bf16 rate of an 8192^3 product in TFLOP/s (as `jetnas.bench.costs.matmul_rate`, written out here so that
    this script runs against checkouts older than that function)."""
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12


#: `--fusions` names -> the `jetnas.ops.backend.Backend` field each switches on
FUSIONS = {"residual": "fused_residual", "hidden_loss": "fused_hidden_loss", "projections": "fused_projections"}


def apply_fusions(model: torch.nn.Module, names: list[str]) -> None:
    """Switch on the named fusions in the backend every module of `model` holds. A model resolves its `Backend`
    once, at construction, and each layer, norm and MLP keeps that value, so the bench replaces it in all of them
    (ops read only their own module's). Exits when the jetnas on the path has no such field (an older checkout)."""
    if not names:
        return
    import dataclasses

    from jetnas.ops.backend import Backend

    fields = {f.name for f in dataclasses.fields(Backend)}
    missing = [FUSIONS[n] for n in names if FUSIONS[n] not in fields]
    if missing:
        raise SystemExit(f"--fusions: this jetnas's Backend has no field {missing} (a checkout without them)")
    changes = {FUSIONS[n]: True for n in names}
    for module in model.modules():
        backend = getattr(module, "backend", None)
        if isinstance(backend, Backend):
            module.backend = dataclasses.replace(backend, **changes)


def layer_types(linear: str, num_layers: int) -> str:
    return ",".join(H200_RUN_LAYOUT.get(i, linear) for i in range(num_layers))


def build(api: Api, mode: str, args, teacher, out_dir: Path, device: torch.device):
    """(trainer, description) for one mode, built as the commands build it (`<mode>-graph`: the stage mode with
    `cuda_graph`)."""
    graphed = mode.endswith("-graph")
    mode = mode.removesuffix("-graph")
    stream = api.TokenStream.from_file(args.data) if args.data else random_stream(api, teacher, args.seed)
    common = dict(steps=args.warmup + args.steps + args.profile_steps + 1, batch_size=args.batch_size,
                  micro_batch_size=args.micro_batch_size, seq_len=args.seq_len, seed=args.seed,
                  precision=args.precision, out_dir=str(out_dir / (mode + ("-graph" if graphed else ""))),
                  resume=False)
    if mode == "supernet":
        if graphed:
            raise SystemExit("--cuda-graph: the super-network step samples a sub-network per step; only the stage "
                             "modes are captured")
        spec = api.SuperNetSpec(args.teacher_name, args.supernet_linear, swa_window=args.swa_window)
        torch.manual_seed(args.seed)
        net = api.SuperNet(teacher.model, spec)
        apply_fusions(net, args.fusion_names)
        sampler = api.SubnetSampler(net.num_layers, mode="uniform", p_attn=0.5, seed=args.seed)
        loss_fn = api.make_distill_loss(sampler, api.DistillConfig(kl_weight=args.supernet_kl))
        config = api.TrainConfig(lr=1e-3, warmup_steps=1, find_unused_parameters=True, **common)
        return api.Trainer(config, net, loss_fn, stream), f"super-network ({args.supernet_linear} paths)"
    stage = 1 if mode == "stage1" else 2
    types = layer_types(args.linear, teacher.model.config.num_hidden_layers)
    extra = {}
    if args.teacher_per_step:
        if "teacher_per_step" not in {f.name for f in dataclasses.fields(api.StageConfig)}:
            raise SystemExit("--teacher-per-step: this jetnas's StageConfig has no teacher_per_step (older checkout)")
        extra["teacher_per_step"] = True
    has_graph = "cuda_graph" in {f.name for f in dataclasses.fields(api.StageConfig)}
    if graphed:
        if not has_graph:
            raise SystemExit("--cuda-graph: this jetnas's StageConfig has no cuda_graph (older checkout)")
        extra["cuda_graph"] = True
    elif has_graph:
        # the eager row is eager: StageConfig's default became "auto" (captured on one GPU), which made this row a
        # second graphed run (2026-12-06, eighth session: "speedup_vs_eager" 1.001, graph against graph)
        extra["cuda_graph"] = False
    cfg = api.StageConfig(stage=stage, teacher=args.teacher_name, layer_types=types,
                          block_config={"swa": {"window_size": args.swa_window}}, warmup_steps=1, **common, **extra)
    model, _, _ = api.build_student(cfg, teacher)
    model.to(device)
    apply_fusions(model, args.fusion_names)
    # the teacher module the stage's loss runs: where the checkout has it (forward_teacher), the cast copy
    # train_stage uses under bf16; an older checkout runs the float32 teacher under autocast as its train_stage did
    forward = getattr(api, "forward_teacher", None)
    teacher_model = teacher.model if cfg.needs_teacher_forward else None
    if forward is not None:
        teacher_model = forward(cfg, teacher_model, device)
    loss_fn = api.make_stage_loss(cfg, teacher_model)
    return api.Trainer(cfg.train_config(), model, loss_fn, stream), \
        f"stage {stage} ({args.linear} hybrid{', CUDA graph' if graphed else ''})"


def random_stream(api: Api, teacher, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    return api.TokenStream(rng.integers(1, teacher.model.config.vocab_size, 1 << 22).astype(np.uint16), "random")


def profile_steps(trainer, first_step: int, n: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(n):
            trainer._train_step(first_step + i)
        torch.cuda.synchronize()
    by_kernel: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by_kernel[e.name] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    total = sum(by_kernel.values())
    by_kind: dict[str, float] = defaultdict(float)
    for name, us in by_kernel.items():
        by_kind[kind(name)] += us
    # which operators launched that GPU time (aten::copy_, aten::mul, autograd nodes, fla's functions, ...)
    ops = [(e.key, e.self_device_time_total) for e in prof.key_averages() if e.self_device_time_total > 0]
    ops.sort(key=lambda x: -x[1])
    return {"steps": n, "top_ops": [{"op": k[:120], "ms_per_step": v / 1e3 / n, "share": v / total}
                                    for k, v in ops[:30]], "gpu_ms_per_step": total / 1e3 / n,
            "by_kind": {k: {"ms_per_step": v / 1e3 / n, "share": v / total}
                        for k, v in sorted(by_kind.items(), key=lambda x: -x[1])},
            "top_kernels": [{"name": k[:160], "ms_per_step": v / 1e3 / n, "share": v / total, "kind": kind(k)}
                            for k, v in sorted(by_kernel.items(), key=lambda x: -x[1])[:30]]}


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """q.k^T and p.v of an attention call, grouped-query heads broadcast to the query's (torch 2.11's own formula
    rejects GQA shapes); like torch's, it does not halve for causal masks."""
    b, h, s_q, d = query_shape
    s_k, d_v = key_shape[2], value_shape[3]
    return 2 * b * h * s_q * s_k * (d + d_v)


def _sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """The backward: the scores again, dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q."""
    b, h, s_q, d = query_shape
    s_k, d_v = key_shape[2], value_shape[3]
    return 2 * b * h * s_q * s_k * (3 * d + 2 * d_v)


def count_flops(trainer, step: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {}
    for name in ("flash", "efficient", "cudnn"):
        if hasattr(aten, f"_scaled_dot_product_{name}_attention"):
            mapping[getattr(aten, f"_scaled_dot_product_{name}_attention")] = _sdpa_flops
            mapping[getattr(aten, f"_scaled_dot_product_{name}_attention_backward")] = _sdpa_backward_flops
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with counter:
        trainer._train_step(step)
    return int(counter.get_total_flops())


def run_mode(api: Api, mode: str, args, teacher, out_dir: Path, device: torch.device, peak_tflops: float,
             flops: int | None = None) -> dict:
    """Time one mode. `flops`: the step's FLOPs when known (a graphed mode takes its eager twin's: the counter sees
    nothing of a replay)."""
    trainer, what = build(api, mode, args, teacher, out_dir, device)
    tokens = args.batch_size * args.seq_len
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    micro = trainer.micro if trainer.accumulation > 1 else None
    log(f"{mode}: {what}, {args.batch_size} x {args.seq_len} tokens per step"
        + (f" in {trainer.accumulation} micro-batches of {micro}" if micro else "") + f"; {args.warmup} warm-up steps")
    step = 0
    for _ in range(args.warmup):
        trainer._train_step(step)
        step += 1
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        metrics = trainer._train_step(step)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        step += 1
    median = statistics.median(times)
    result = {"what": what, "tokens_per_step": tokens, "micro_batches": trainer.accumulation,
              "step_seconds": times, "median_step_s": median,
              "tokens_per_s": tokens / median, "losses": losses, "warmup_steps": args.warmup,
              "peak_memory_GB": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None}
    if hasattr(trainer, "graph_failure"):
        static = getattr(trainer, "_static", None)
        result["cuda_graph"] = {"requested": bool(getattr(trainer.config, "cuda_graph", False)),
                                "captured": bool(static is not None and static.captured),
                                "first_replay_checked": bool(static is not None and static.checked),
                                "fallback": trainer.graph_failure}
    try:
        if flops is None:
            flops = count_flops(trainer, step)
            step += 1
        result["flops_per_step"] = flops
        result["flops_per_token"] = flops / tokens
        result["mfu"] = flops / median / (peak_tflops * 1e12) if peak_tflops == peak_tflops else None
    except Exception as err:  # noqa: BLE001  (a version whose ops the counter cannot trace still gets timed)
        result["flops_error"] = repr(err)[:500]
    if args.profile_steps and device.type == "cuda":
        result["profile"] = profile_steps(trainer, step, args.profile_steps)
    log(f"{mode}: {tokens / median:,.0f} tok/s (median of {len(times)} steps, {median * 1e3:.1f} ms/step)"
        + (f", MFU {100 * result['mfu']:.1f}%" if result.get("mfu") else ""))
    del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def compare(paths: list[str]) -> dict:
    """Side-by-side tokens/s, MFU and loss agreement of runs of several code versions (the first is the base).

    A later run's captured step (`<mode>-graph`, from `--cuda-graph`) is compared with the base's `<mode>` as a
    column of its own (`<label>-graph`)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    base = runs[0]
    columns = [(base["label"], base, "")]
    for run in runs[1:]:
        columns.append((run["label"], run, ""))
        if any(m.endswith("-graph") for m in run["modes"]):
            columns.append((run["label"] + "-graph", run, "-graph"))
    table = {}
    for mode in base["modes"]:
        row = {}
        b = base["modes"][mode]
        for label, run, suffix in columns:
            m = run["modes"].get(mode + suffix)
            if not m or "tokens_per_s" not in m:
                continue
            row[label] = {"tokens_per_s": m["tokens_per_s"], "mfu": m.get("mfu")}
            if run is not base and "tokens_per_s" in b:
                row[label]["speedup_vs_" + base["label"]] = m["tokens_per_s"] / b["tokens_per_s"]
                n = min(len(m["losses"]), len(b["losses"]))
                diffs = [abs(m["losses"][i]["loss"] - b["losses"][i]["loss"]) for i in range(n)]
                row[label]["max_abs_loss_diff_vs_" + base["label"]] = max(diffs) if diffs else None
                row[label]["mean_abs_loss_diff_vs_" + base["label"]] = sum(diffs) / n if diffs else None
        table[mode] = row
    print(f"{'mode':<10} " + " ".join(f"{label + ' tok/s':>16} {'MFU':>6}" for label, _, _ in columns)
          + " speed-up")
    for mode, row in table.items():
        cells = []
        for label, _, _ in columns:
            v = row.get(label, {})
            mfu = v.get("mfu")
            cells.append(f"{v.get('tokens_per_s', float('nan')):>16,.0f} {100 * mfu if mfu else float('nan'):>5.1f}%")
        ups = [f"{row[label]['speedup_vs_' + base['label']]:.2f}x" for label, _, _ in columns[1:]
               if "speedup_vs_" + base["label"] in row.get(label, {})]
        print(f"{mode:<10} " + " ".join(cells) + " " + " / ".join(ups))
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default="supernet,stage1,stage2")
    ap.add_argument("--teacher", default="smollm2-135m",
                    help="smollm2-135m, a model directory, or 'random' (SmolLM2-135M's shape, random weights)")
    ap.add_argument("--tokenizer-from", default=None, help="with --teacher random: a directory with tokenizer files")
    ap.add_argument("--data", default=None, help="a token .bin (default: random token ids)")
    ap.add_argument("--linear", default="gdn", help="the stage-1/2 hybrid's linear block")
    ap.add_argument("--supernet-linear", default="gla")
    ap.add_argument("--supernet-kl", type=float, default=0.0)
    ap.add_argument("--swa-window", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--micro-batch-size", type=int, default=None,
                    help="sequences per forward (gradient accumulation); with --profile-steps, GPU ms well below the "
                         "wall ms says the step is host-bound (each micro-batch launches a whole pass's kernels)")
    ap.add_argument("--teacher-per-step", action="store_true",
                    help="stage 1/2 with micro-batches: the teacher's forward once per step on the whole batch "
                         "(StageConfig.teacher_per_step)")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="also time each stage mode with its step captured in a CUDA graph (<mode>-graph), after "
                         "its eager run in this process (TrainConfig.cuda_graph)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile-steps", type=int, default=0)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--autotune-configs", type=int, default=None,
                    help="benchmark at most N of each Triton kernel's autotuning configs (old and new code alike)")
    ap.add_argument("--fusions", default="",
                    help=f"comma-separated training fusions to switch on (off by default): {', '.join(FUSIONS)}")
    ap.add_argument("--label", default="new")
    ap.add_argument("--out", default=None)
    ap.add_argument("--compare", default=None, help="comma-separated result files: print the side-by-side table")
    args = ap.parse_args()
    if args.compare:
        print(json.dumps(compare(args.compare.split(","))))
        return
    args.fusion_names = [n for n in args.fusions.split(",") if n]
    unknown = sorted(set(args.fusion_names) - set(FUSIONS))
    if unknown:
        ap.error(f"--fusions: unknown {unknown}; known: {', '.join(FUSIONS)}")
    device = torch.device(args.device)
    modes = args.modes.split(",")
    if args.cuda_graph:
        try:
            from jetnas.train.graph_step import WARMUP_STEPS
        except ImportError:
            raise SystemExit("--cuda-graph: this jetnas has no jetnas.train.graph_step (older checkout)") from None
        modes = [m for mode in modes for m in ([mode, mode + "-graph"] if mode in ("stage1", "stage2") else [mode])]
        # eager and graphed runs alike, so that both time the same step indices (same learning rates, same batches):
        # the graphed run's eager warm-up, its capture step and its checked first replay all come before the timing
        if args.warmup < WARMUP_STEPS + 2:
            log(f"--cuda-graph: {WARMUP_STEPS + 2} warm-up steps instead of {args.warmup}")
            args.warmup = WARMUP_STEPS + 2
    if args.autotune_configs is not None:
        # jetnas before 2026-12-06 read this variable when it loaded fla; later versions take the explicit call
        os.environ["JETNAS_AUTOTUNE_CONFIGS"] = str(args.autotune_configs)
    api = Api()
    if args.autotune_configs is not None:
        try:
            from jetnas.ops.autotune import limit_autotuning
        except ImportError:
            pass
        else:
            limit_autotuning(args.autotune_configs)
    log(f"jetnas {api.version} from {api.path}")
    work = Path(tempfile.mkdtemp(prefix="train_bench_"))
    teacher_arg = args.teacher
    if args.teacher == "random":
        teacher_arg = str(random_teacher_dir(work / "teacher_random", args.tokenizer_from, args.seed))
    args.teacher_name = teacher_arg
    teacher = api.load_stage_teacher(teacher_arg, device)
    apply_fusions(teacher.model, args.fusion_names)  # its forward runs the same fused adds (the super-network's base)
    peak = gemm_tflops(device)
    report = {"label": args.label, "jetnas_path": api.path, "device": torch.cuda.get_device_name(device)
              if device.type == "cuda" else "cpu", "torch": torch.__version__, "gemm_TFLOPs": peak,
              "args": {k: v for k, v in vars(args).items() if k != "compare"}, "modes": {}}
    for mode in modes:
        eager = report["modes"].get(mode.removesuffix("-graph")) if mode.endswith("-graph") else None
        try:
            report["modes"][mode] = run_mode(api, mode, args, teacher, work, device, peak,
                                             flops=(eager or {}).get("flops_per_step"))
        except Exception as err:  # noqa: BLE001  (one failing mode, e.g. a kernel refused, keeps the others)
            log(f"{mode}: FAILED {err!r}")
            report["modes"][mode] = {"error": repr(err)[:2000]}
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        r = report["modes"][mode]
        if eager and "losses" in eager and "losses" in r:
            diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(r["losses"], eager["losses"])]
            r["max_abs_loss_diff_vs_eager"] = max(diffs) if diffs else None
            r["speedup_vs_eager"] = r["tokens_per_s"] / eager["tokens_per_s"]
            log(f"{mode}: {r['speedup_vs_eager']:.3f}x the eager step; losses differ by at most "
                f"{r['max_abs_loss_diff_vs_eager']:.3g}" + (f"; FELL BACK: {r['cuda_graph']['fallback']}"
                                                             if r.get("cuda_graph", {}).get("fallback") else ""))
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1))
    for mode, r in report["modes"].items():
        if "profile" in r:
            print(f"--- {args.label} {mode}: GPU {r['profile']['gpu_ms_per_step']:.1f} ms/step of "
                  f"{1e3 * r['median_step_s']:.1f} ms wall")
            for k, v in r["profile"]["by_kind"].items():
                print(f"  {k:<36} {v['ms_per_step']:>8.2f} ms {100 * v['share']:>5.1f}%")
            for row in r["profile"]["top_kernels"][:10]:
                print(f"  {row['ms_per_step']:>8.2f} ms {100 * row['share']:>5.1f}%  {row['name'][:100]}")
            for row in r["profile"]["top_ops"][:12]:
                print(f"  {row['ms_per_step']:>8.2f} ms {100 * row['share']:>5.1f}%  op {row['op'][:90]}")
    summary = {m: {"tokens_per_s": round(r["tokens_per_s"]), "mfu": round(r["mfu"], 4) if r.get("mfu") else None,
                   "loss_first": r["losses"][0].get("loss"), "loss_last": r["losses"][-1].get("loss"),
                   **({k: r[k] for k in ("speedup_vs_eager", "max_abs_loss_diff_vs_eager") if k in r}),
                   **({"cuda_graph": r["cuda_graph"]} if r.get("cuda_graph", {}).get("requested") else {})}
               if "tokens_per_s" in r else {"error": r.get("error", "")[:200]} for m, r in report["modes"].items()}
    print(json.dumps({"label": args.label, "gemm_TFLOPs": round(peak, 1) if peak == peak else None,
                      "modes": summary}))


if __name__ == "__main__":
    main()
