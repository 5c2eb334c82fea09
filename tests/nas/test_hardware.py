"""Hardware-aware search bookkeeping: candidates at a fixed state size, parameter counts, the choice rule."""

import pytest

from jetnas.layers import JetBlock
from jetnas.nas.hardware import BlockShape, choose_shape, shapes_at_state_size

ORIGINAL = BlockShape(12, 96, 256)  # Jet-Nemotron-2B


def test_candidates_keep_the_state_size_and_include_the_papers_settings():
    shapes = shapes_at_state_size(ORIGINAL.state_numbers)
    assert all(s.state_numbers == 12 * 96 * 256 for s in shapes)
    # the (d_k, d_v, heads) settings of the paper's Table 2 that fit our grid
    for k, v, h in [(256, 288, 4), (192, 384, 4), (128, 576, 4), (256, 144, 8), (192, 192, 8), (128, 288, 8),
                    (128, 192, 12), (96, 256, 12), (64, 384, 12)]:
        assert BlockShape(h, k, v) in shapes
    assert all(s.head_v_dim % 16 == 0 for s in shapes)
    with pytest.raises(ValueError):
        shapes_at_state_size(0)


@pytest.mark.parametrize("shape", [ORIGINAL, BlockShape(4, 128, 576), BlockShape(8, 64, 48)])
def test_parameter_formula_matches_the_module(shape):
    block = JetBlock(256, shape.num_heads, shape.head_k_dim, shape.head_v_dim)
    assert shape.jet_parameters(256) == sum(p.numel() for p in block.parameters())


def test_choice_rule_is_most_accurate_within_the_throughput_tolerance():
    a, b, c = BlockShape(4, 128, 576), BlockShape(8, 128, 288), BlockShape(16, 64, 288)
    results = {
        ORIGINAL: {"accuracy": 0.50, "decode_tokens_per_s": 1000.0, "params": 10},
        a: {"accuracy": 0.58, "decode_tokens_per_s": 950.0, "params": 9},     # best, but 5% slower
        b: {"accuracy": 0.55, "decode_tokens_per_s": 995.0, "params": 12},    # within 1%
        c: {"accuracy": 0.55, "decode_tokens_per_s": 1001.0, "params": 11},   # as accurate, fewer params
    }
    assert choose_shape(results, ORIGINAL, tolerance=0.01) == c
    assert choose_shape(results, ORIGINAL, tolerance=0.06) == a
    with pytest.raises(ValueError, match="original shape"):
        choose_shape({a: results[a]}, ORIGINAL)
