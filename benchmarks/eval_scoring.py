"""Speed of the built-in evaluation's scoring: the vectorized `score_continuations` / `token_nll` against
their one-request-at-a-time references (`_score_continuations_reference`, `_token_nll_reference`), on the same
model and rows, with the largest difference between their scores. Run from the repository root:

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/eval_scoring.py --limit 500      # tiny random Llama, CPU
    PYTHONPATH=. python benchmarks/eval_scoring.py --model smollm2-135m --device cuda --dtype bfloat16 \
        --batch-size 32 --limit 0 --tasks mc:../shared/data/bench/arc_easy_test.jsonl,ppl:../shared/data/corpus/val.bin

`--model random` is a randomly initialised Llama (`--layers`, `--hidden`) with SmolLM2-135M's tokenizer and
vocabulary (49,152 ids): a small body with the real LM head size; its scores mean nothing. Each task runs once
untimed (warm-up), then timed with each implementation (CUDA synchronised). On a CPU the time outside the model's
forward is reported too. For `mc:` tasks, the aten operations (GPU kernel launches) and device-to-host reads (GPU
synchronisations) per request outside the forward are counted on the first `--count-rows` rows, with the GPU's
log-softmax chunk size. `mc:` requests are scored directly (no metrics); `ppl:` takes `--ppl-tokens` tokens. The
last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial

import torch


def build(args):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from jetnas.evaluation.scoring import LanguageModel
    from jetnas.models.teachers import load_teacher, teacher_files

    dtype = getattr(torch, args.dtype)
    if args.model == "random":
        path, kwargs = teacher_files("smollm2-135m")
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                          num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=8192)
        model = LlamaForCausalLM(cfg).to(device=args.device, dtype=dtype).eval()
    else:
        model, tok, _ = load_teacher(args.model, dtype=dtype, device=args.device)
    lm = LanguageModel.from_hf(model, tok, max_length=args.max_length, batch_size=args.batch_size)
    lm.batch_tokens = args.batch_tokens
    return lm


def mc_requests(spec: str, limit: int | None):
    from jetnas.evaluation.tasks import parse_task

    task = parse_task(spec)
    rows = task.rows()[:limit] if limit else task.rows()
    requests, owners = [], []
    for number, row in enumerate(rows):
        from jetnas.evaluation.tasks import mc_prompt

        ctx = task.context(row)
        for cont in mc_prompt(row)[1]:
            requests.append((ctx, cont))
            owners.append(number)
    return requests, owners, len(rows)


class OpCounter:
    """Counts the aten operations (each a kernel launch on a GPU) and the device-to-host reads (`.item()`, `bool()`,
    `.tolist()`: each a synchronisation on a GPU) run outside the model's forward: a device-independent measure of
    what the GPU waits for."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if not counter.in_forward:
                    counter.ops += 1
                    counter.host_reads += func is torch.ops.aten._local_scalar_dense.default
                return func(*args, **(kwargs or {}))

        self.mode, self.ops, self.host_reads, self.in_forward = Mode(), 0, 0, False

    def wrap(self, logits_fn):
        def logits(ids, mask):
            self.in_forward = True
            try:
                return logits_fn(ids, mask)
            finally:
                self.in_forward = False

        return logits

    def run(self, fn):
        real_tolist = torch.Tensor.tolist

        def tolist(t):  # one transfer of the whole tensor (it does not go through _local_scalar_dense)
            self.host_reads += 1
            with torch.utils._python_dispatch._disable_current_modes():
                return real_tolist(t)

        torch.Tensor.tolist = tolist
        try:
            with self.mode:
                fn()
        finally:
            torch.Tensor.tolist = real_tolist


def timed(fn, device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="random")
    p.add_argument("--tasks", default="mc:/work/shared/data/bench/arc_easy_test.jsonl")
    p.add_argument("--limit", type=int, default=500, help="rows per mc task (0: all)")
    p.add_argument("--ppl-tokens", type=int, default=65536)
    p.add_argument("--ppl-window", type=int, default=1024)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batch-tokens", type=int, default=16384)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--count-rows", type=int, default=64, help="mc rows scored again under an op counter (0: none)")
    p.add_argument("--skip-reference", action="store_true", help="time only the fast path")
    args = p.parse_args(argv)

    from jetnas.evaluation import scoring
    from jetnas.evaluation.tasks import read_tokens

    lm = build(args)
    forward = [0.0]
    if args.device == "cpu":
        # on a CPU the forward's own time is known exactly (nothing is asynchronous): the rest is the scoring's
        model_logits = lm.logits

        def logits(ids, mask):
            t = time.perf_counter()
            out = model_logits(ids, mask)
            forward[0] += time.perf_counter() - t
            return out

        lm.logits = logits
    report = {"model": args.model, "device": torch.cuda.get_device_name() if args.device.startswith("cuda")
              else "cpu", "dtype": args.dtype, "batch_size": args.batch_size, "batch_tokens": args.batch_tokens,
              "threads": torch.get_num_threads(), "tasks": {}}
    for spec in [t for t in args.tasks.split(",") if t]:
        if spec.startswith("mc:"):
            requests, owners, nrows = mc_requests(spec, args.limit or None)
            t0 = time.perf_counter()
            scoring._encode_requests(lm, requests, owners)
            encode_s = time.perf_counter() - t0
            impls = {"fast": partial(scoring.score_continuations, lm, requests, rows=owners),
                     "reference": partial(scoring._score_continuations_reference, lm, requests, rows=owners)}
            row = {"rows": nrows, "requests": len(requests), "encode_s": round(encode_s, 3)}
        elif spec.startswith("ppl:"):
            ids, _ = read_tokens(spec[4:], lm, args.ppl_tokens)
            window = min(args.ppl_window, lm.max_length)
            impls = {"fast": partial(scoring.token_nll, lm, ids, window),
                     "reference": partial(scoring._token_nll_reference, lm, ids, window)}
            row = {"tokens": len(ids)}
        else:
            raise SystemExit(f"--tasks: {spec!r} is neither mc:PATH nor ppl:PATH")
        if args.skip_reference:
            impls.pop("reference")
        impls["fast"]()  # warm-up
        outs = {}
        for name, fn in impls.items():
            forward[0] = 0.0
            outs[name], seconds = timed(fn, args.device)
            row[f"{name}_s"] = round(seconds, 3)
            if args.device == "cpu":
                row[f"{name}_outside_forward_s"] = round(seconds - forward[0], 3)
            print(f"{spec} {name}: {seconds:.2f} s ({seconds - forward[0]:.2f} s outside the forward)", file=sys.stderr)
        if spec.startswith("mc:") and args.count_rows:
            # the same requests' first `count_rows` rows, once more under an operation counter
            few = [i for i, o in enumerate(owners) if o < args.count_rows]
            sub, sub_owners = [requests[i] for i in few], [owners[i] for i in few]
            for name, fn in [("fast", scoring.score_continuations),
                             ("reference", scoring._score_continuations_reference)][: len(impls)]:
                counter = OpCounter()
                inner, lm.logits = lm.logits, counter.wrap(lm.logits)
                # counted with the chunk size a GPU would use (a CPU's small chunks launch more, cheaper, kernels)
                cpu_chunk = scoring._CHUNK_BYTES["cpu"]
                scoring._CHUNK_BYTES["cpu"] = scoring._CHUNK_BYTES["cuda"]
                try:
                    counter.run(partial(fn, lm, sub, rows=sub_owners))
                finally:
                    lm.logits = inner
                    scoring._CHUNK_BYTES["cpu"] = cpu_chunk
                row[f"{name}_ops_per_request"] = round(counter.ops / len(sub), 2)
                row[f"{name}_host_reads_per_request"] = round(counter.host_reads / len(sub), 3)
        if "reference" in outs:
            row["speedup"] = round(row["reference_s"] / row["fast_s"], 2)
            if args.device == "cpu":
                row["speedup_outside_forward"] = round(row["reference_outside_forward_s"] /
                                                       row["fast_outside_forward_s"], 2)
            if spec.startswith("mc:"):
                pairs = list(zip(outs["fast"], outs["reference"]))
                row["max_abs_logprob_diff"] = max(abs(a.logprob - b.logprob) for a, b in pairs)
                row["greedy_mismatches"] = sum(a.is_greedy != b.is_greedy for a, b in pairs)
            else:
                row["abs_nll_diff"] = abs(outs["fast"][0] - outs["reference"][0])
                row["count_equal"] = outs["fast"][1] == outs["reference"][1]
        report["tasks"][spec] = row
    print(json.dumps(report))


if __name__ == "__main__":
    main()
