"""How many CPU threads should torch use? Times small forwards at each thread count, on the box as it is and with
busy processes competing for its cores (`--busy N`: N competitors started here and stopped by pid: pure-Python spin
loops, or `--competitor torch`: torch matmul loops on torch's default threads, as another training job runs).

    env -u OMP_NUM_THREADS python benchmarks/cpu_threads.py --busy 0,1 --competitor torch --out RESULT.json

Workloads: a Gated DeltaNet layer's forward (the PyTorch reference: many small ops, what CPU training and the
searches run), an MLP forward at SmolLM2-135M's width (large matmuls), and a decode-sized step (batch 1, one token:
what teacher-text generation runs). Prints one line per (busy, workload, threads) and, last, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SPIN = "while True: pass"
# another engineer's job: torch with its default threads (one per core), matmuls back to back
TORCH_SPIN = "import torch\nx = torch.randn(512, 512)\nwhile True: x = torch.tanh(x @ x)"


def workloads():
    import torch

    from jetnas.layers.gdn import GatedDeltaNet

    torch.manual_seed(0)
    gdn = GatedDeltaNet(576, num_heads=9, head_k_dim=64, head_v_dim=64).eval()
    x = torch.randn(2, 256, 576)
    mlp = torch.nn.Sequential(torch.nn.Linear(576, 1536), torch.nn.SiLU(), torch.nn.Linear(1536, 576)).eval()
    big = torch.randn(4, 256, 576)
    one = torch.randn(1, 1, 576)

    def decode_step():
        h = one
        for _ in range(30):  # SmolLM2's 30 layers, MLP only: the weight-streaming part of a decode step
            h = mlp(h)
        return h

    return {"gdn_forward": lambda: gdn(x)[0], "mlp_forward": lambda: mlp(big), "decode_step": decode_step}


def timed(fn, repeats: int) -> float:
    import torch

    with torch.no_grad():
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--busy", default="0,1", help="comma-separated numbers of competing spin processes")
    parser.add_argument("--competitor", choices=("python", "torch"), default="python",
                        help="what a busy process runs: a pure-Python loop (one core), or torch matmuls with torch's "
                             "default threads (every core, like another training or test job)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    import torch

    cores = len(os.sched_getaffinity(0))
    work = workloads()
    rows = []
    for busy in [int(b) for b in args.busy.split(",")]:
        code = SPIN if args.competitor == "python" else TORCH_SPIN
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        spinners = [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(busy)]
        try:
            time.sleep(3.0 if busy else 0.0)  # the competitors start (torch's import takes seconds)
            for name, fn in work.items():
                for threads in range(1, cores + 1):
                    torch.set_num_threads(threads)
                    seconds = timed(fn, args.repeats)
                    load = os.getloadavg()[0]
                    rows.append({"busy": busy, "competitor": args.competitor, "workload": name, "threads": threads,
                                 "seconds": seconds, "loadavg_1min": load})
                    print(f"busy {busy} {name:12s} threads {threads}: {1e3 * seconds:8.1f} ms (load {load:.2f})",
                          file=sys.stderr)
        finally:
            for p in spinners:
                p.kill()
                p.wait()
    result = {"cores": cores, "torch": torch.__version__, "default_threads": torch.get_num_threads(), "rows": rows,
              "date": time.strftime("%Y-%m-%d %H:%M")}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
