"""`JETNAS_AUTOTUNE_CONFIGS`: how many of a Triton kernel's autotuning configs get benchmarked (and compiled)."""

import pytest

triton = pytest.importorskip("triton")


def test_limit_spreads_over_the_configs_and_restores():
    import triton.language as tl

    from jetnas.ops._fla import limit_autotuning

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
