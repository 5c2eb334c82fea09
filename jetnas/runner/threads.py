"""How many CPU threads torch uses, chosen once per `jetnas` command, deliberately (`jetnas info` shows the choice).

Measured on the 2-core development box (`benchmarks/cpu_threads.py`; `benchmarks/results/2026-12-06_cpu_threads/`):
on the idle box two threads ran a Gated DeltaNet layer's forward, an MLP and a decode-sized step 1.8-2.0x faster
than one; with another torch job on the box (torch's default threads) they ran them 1.35x, 1.6x and 41x slower, and
under the other engineers' test runs 55x, 2x and 17x slower (threads waiting for each other at every op while the
other core is taken). Winning at most 2x against losing up to 55x, threads are used only where cores are free:

    threads = max(1, min(cores, floor(cores - load + 0.5)))

with `cores` the CPUs this process may run on and `load` the 1-minute load average (processes running or waiting
for a CPU): one thread on the busy box, both on an idle one, most of a 16-core GPU machine's. `JETNAS_THREADS=N`,
or `OMP_NUM_THREADS=N` (torch's own), set by the user, wins. Torch reads `OMP_NUM_THREADS` when it is imported, so
the choice is made before it is (the CLI imports torch only inside commands).
"""

from __future__ import annotations

import math
import os
import sys

#: the choice `apply_threads` made in this process, `(threads, why)` (what `jetnas info` reports)
applied: tuple[int, str] | None = None


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def choose_threads(environ: dict | None = None, cores: int | None = None, load: float | None = None
                   ) -> tuple[int, str]:
    """`(threads, why)` by the rule of the module docstring; `environ`, `cores` and `load` default to this
    process's (given for tests)."""
    env = os.environ if environ is None else environ
    for name in ("JETNAS_THREADS", "OMP_NUM_THREADS"):
        value = env.get(name, "").strip()
        # OpenMP allows a list for nested levels ("4,2"): the first is the one torch's ops use
        first = value.split(",")[0].strip() if name == "OMP_NUM_THREADS" else value
        if value:
            if not first.isdigit() or int(first) < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer (the number of CPU threads)")
            return int(first), f"{name}={value} from the environment"
    cores = _cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:  # no load average on this system: assume a busy one
            load = float(cores)
    threads = max(1, min(cores, math.floor(cores - load + 0.5)))
    return threads, (f"{cores} cores with a 1-minute load of {load:.2f}: {threads} free (threads on busy cores wait "
                     f"for each other; JETNAS_THREADS=N overrides)")


def apply_threads() -> tuple[int, str]:
    """Choose (`choose_threads`) and apply: through `OMP_NUM_THREADS` when torch is not imported yet (so torch and
    its children start with it), else `torch.set_num_threads`. Returns the choice."""
    global applied
    threads, why = choose_threads()
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(threads)
    else:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    applied = (threads, why)
    return applied
