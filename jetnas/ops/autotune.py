"""How many of a Triton kernel's autotuning configs get benchmarked: a switch for short runs, called explicitly.

fla's kernels try up to 48 configs each, and Triton compiles every one: on a fresh GPU machine a new block type
costs minutes before its first step (2026-12-02: in ~165 s a fresh H200 got through the autotuning of GLA's forward
kernels only, 170 configs). With a few configs the kernels start in seconds and run somewhat slower than fully
tuned ones: right for short runs that compare models, wrong for throughput benchmarks. Nothing calls this at import:
a script or command that wants it says so (the benchmarks' `--autotune-configs N`).
"""

from __future__ import annotations

import warnings


def limit_autotuning(max_configs: int | None) -> None:
    """Benchmark at most `max_configs` of each Triton kernel's autotuning configs (evenly spread over the list left
    after the kernel's own pruning), or all of them again with None.

    It patches `triton.runtime.autotuner.Autotuner.prune_configs`, so it holds for every autotuned kernel of the
    process (fla's), including those already decorated; kernels tuned before the call keep their choice.

    Raises:
        ValueError: `max_configs` < 1.
    """
    if max_configs is not None and max_configs < 1:
        raise ValueError(f"max_configs must be >= 1, got {max_configs}")
    from triton.runtime.autotuner import Autotuner

    if not hasattr(Autotuner, "prune_configs"):  # the hook this relies on (Triton 2.1 to 3.9 at least)
        warnings.warn("this Triton's autotuner has no prune_configs: limit_autotuning does nothing", stacklevel=2)
        return
    original = Autotuner.__dict__.get("_jetnas_original_prune", Autotuner.prune_configs)
    Autotuner._jetnas_original_prune = original
    if max_configs is None:
        Autotuner.prune_configs = original
        return

    def prune_configs(self, kwargs):
        configs = original(self, kwargs)
        if len(configs) <= max_configs:
            return configs
        step = (len(configs) - 1) / max(max_configs - 1, 1)
        return [configs[round(i * step)] for i in range(max_configs)]

    Autotuner.prune_configs = prune_configs
