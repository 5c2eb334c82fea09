"""Short convolutions: the dynamic reference against the step form, static against dynamic, packed sequences.
Float64, exact algebra: 1e-12 relative."""

import pytest
import torch
import torch.nn.functional as F

from jetnas.ops.conv import dynamic_conv_step, naive_dynamic_conv, short_conv, short_conv_step
from tests.utils import rel_err

TOL = 1e-12


@pytest.mark.parametrize("T", [1, 2, 63, 100], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("W", [1, 2, 4], ids=lambda w: f"W{w}")
def test_dynamic_prefill_then_steps_equals_full(T, W):
    x = torch.randn(2, T, 6, dtype=torch.float64)
    kern = torch.randn(2, T, 6, W, dtype=torch.float64)
    h0 = torch.randn(2, 6, W - 1, dtype=torch.float64)
    y, s = naive_dynamic_conv(x, kern, h0, output_final_state=True)
    split = T // 2
    y1, state = naive_dynamic_conv(x[:, :split], kern[:, :split], h0, output_final_state=True)
    ys = [y1]
    for t in range(split, T):
        y_t, state = dynamic_conv_step(x[:, t], kern[:, t], state)
        ys.append(y_t[:, None])
    assert rel_err(torch.cat(ys, 1), y) < TOL
    assert torch.equal(state, s)


def test_definition_by_hand():
    # y_t = silu(sum_i kernel_t[i] * x_{t-W+1+i}), zeros before the first token
    x = torch.randn(1, 5, 1, dtype=torch.float64)
    kern = torch.randn(1, 5, 1, 3, dtype=torch.float64)
    y, _ = naive_dynamic_conv(x, kern)
    xp = F.pad(x[0, :, 0], (2, 0))
    expect = torch.stack([F.silu(sum(kern[0, t, 0, i] * xp[t + i] for i in range(3))) for t in range(5)])
    assert rel_err(y[0, :, 0], expect) < TOL


def test_static_equals_dynamic_with_constant_kernel():
    x = torch.randn(2, 30, 8, dtype=torch.float64)
    w, b = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    h0 = torch.randn(2, 8, 3, dtype=torch.float64)
    y, s = short_conv(x, w, b, h0, output_final_state=True)
    y_dyn, s_dyn = naive_dynamic_conv(x, w.expand(2, 30, 8, 4), h0, output_final_state=True, activation=None)
    assert rel_err(y, F.silu(y_dyn + b)) < TOL and torch.equal(s, s_dyn)
    y_step, _ = short_conv_step(x[:, -1], w, b, naive_dynamic_conv(x[:, :-1], w.expand(2, 29, 8, 4), h0, True)[1])
    assert rel_err(y_step, y[:, -1]) < TOL


def test_packed_sequences_do_not_leak():
    cu = torch.tensor([0, 2, 2, 11, 12])  # lengths 2, 0, 9, 1
    x = torch.randn(1, 12, 3, dtype=torch.float64)
    kern = torch.randn(1, 12, 3, 4, dtype=torch.float64)
    h0 = torch.randn(4, 3, 3, dtype=torch.float64)
    y, s = naive_dynamic_conv(x, kern, h0, output_final_state=True, cu_seqlens=cu)
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        y_n, s_n = naive_dynamic_conv(x[:, a:b], kern[:, a:b], h0[n : n + 1], output_final_state=True)
        assert torch.equal(y[:, a:b], y_n) and torch.equal(s[n : n + 1], s_n)
    ys, _ = short_conv(x, kern[0, 0], None, h0, cu_seqlens=cu)
    assert torch.equal(ys[:, 2:11], short_conv(x[:, 2:11], kern[0, 0], None, h0[2:3])[0])


def test_bad_input_names_values():
    with pytest.raises(ValueError, match=r"kernels must be \[B, T, D, W\] = \[1, 4, 3, W\]"):
        naive_dynamic_conv(torch.randn(1, 4, 3), torch.randn(1, 4, 2, 4))
    with pytest.raises(ValueError, match="activation must be one of"):
        naive_dynamic_conv(torch.randn(1, 4, 3), torch.randn(1, 4, 3, 4), activation="relu")


def test_the_triton_conv_module_does_not_import_the_dispatcher():
    # ops/conv.py dispatches to ops/triton_dynamic_conv.py; the kernels' module takes its shared checks from
    # ops/utils.py, so the two never import each other (at module level or inside a function)
    import ast
    from pathlib import Path

    import jetnas.ops

    source = Path(jetnas.ops.__file__).with_name("triton_dynamic_conv.py").read_text()
    imported = {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Import)
                 for alias in node.names}
    assert "jetnas.ops.conv" not in imported and "jetnas.ops.utils" in imported
