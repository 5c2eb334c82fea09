"""`limit_autotuning`: how many of a Triton kernel's autotuning configs get benchmarked (and compiled)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")


def test_limit_spreads_over_the_configs_and_restores():
    import triton.language as tl

    from jetnas.ops.autotune import limit_autotuning

    configs = [triton.Config({"B": b}, num_warps=w) for b in (16, 32, 64) for w in (2, 4, 8, 16)]

    @triton.autotune(configs=configs, key=["n"])
    @triton.jit
    def kernel(x_ptr, n, B: tl.constexpr):
        pass

    try:
        limit_autotuning(3)
        picked = kernel.prune_configs({})
        assert picked == [configs[0], configs[6], configs[11]]  # first, middle, last of the 12
        limit_autotuning(20)
        assert kernel.prune_configs({}) == configs
        with pytest.raises(ValueError, match="max_configs"):
            limit_autotuning(0)
    finally:
        limit_autotuning(None)
    assert kernel.prune_configs({}) == configs


def test_importing_jetnas_leaves_the_autotuner_alone():
    # the limit is a call, never an import-time side effect of an environment variable (the old switch's name is
    # set here to show it no longer counts)
    code = ("import jetnas, jetnas.ops._fla, jetnas.ops.autotune, jetnas.ops.delta_rule\n"
            "from triton.runtime.autotuner import Autotuner\n"
            "assert not hasattr(Autotuner, '_jetnas_original_prune')\n")
    env = {**os.environ, "JETNAS_AUTOTUNE_CONFIGS": "2"}
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
