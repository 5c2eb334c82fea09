"""Compile our Triton kernels for Hopper (sm_90) on a machine without a GPU; run by `test_sm90_compile.py` in a
process of its own (the tests' Triton interpreter replaces every `@triton.jit` function at import, and compiled
kernels must come from a process where it is off).

    TRITON_INTERPRET=0 python tests/ops/sm90_compile.py     # prints {"case": "ok" | "<error>"} as JSON

The signature is written out per kernel: pointers with their dtypes, the rest 32-bit ints (float scalars by
name), constexprs as the wrappers launch them.
"""

from __future__ import annotations

import json
import os
import sys

FLOATS = {"scale", "eps"}


#: the most shared memory one block may use on an H100 / H200 (227 KiB)
HOPPER_SHARED = 232448


def compile_for_hopper(fn, pointers: dict[str, str], constexprs: dict, options: dict | None = None) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(fn.arg_names)
    unknown = set(constexprs) - set(names)
    if unknown:
        raise ValueError(f"{fn.__name__} has no parameters {sorted(unknown)}")
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointers.get(name, "*fp32")
        else:
            signature[name] = "fp32" if name in FLOATS else "i32"
    source = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    if not kernel.asm.get("ptx"):
        raise RuntimeError("no PTX produced")
    if kernel.metadata.shared > HOPPER_SHARED:
        raise RuntimeError(f"needs {kernel.metadata.shared} bytes of shared memory, more than sm_90's {HOPPER_SHARED}")


def cases():
    """(name, kernel, pointer dtypes, constexprs) for the variants the wrappers launch."""
    from jetnas.ops import triton_decode as dec
    from jetnas.ops import triton_dynamic_conv as conv

    for static in (False, True):
        for varlen in (False, True):
            io = {n: "*bf16" for n in ("x_ptr", "k_ptr", "bias_ptr", "state_ptr", "y_ptr", "dy_ptr", "dx_ptr",
                                       "dstate_ptr")}
            io.update({"dacc_ptr": "*fp32", "dk_ptr": "*fp32" if static else "*bf16", "tok_start_ptr": "*i32",
                       "tok_seq_ptr": "*i32", "tok_end_ptr": "*i32", "cu_ptr": "*i64"})
            tiles = {"W": 4, "W_POW2": 4, "BLOCK_T": 4, "BLOCK_D": 128, "IS_VARLEN": varlen}
            flags = {"HAS_STATE": True, "SILU": True, "STATIC": static, "HAS_BIAS": static}
            tag = f"{'static' if static else 'dynamic'}, {'packed' if varlen else 'dense'}"
            yield f"conv fwd ({tag})", conv._dynamic_conv_fwd_kernel, io, {**tiles, **flags, "SPLIT": False}
            if static and not varlen:  # q|k|v written as three contiguous tensors (triton_short_conv_split)
                yield "conv fwd (static, dense, split)", conv._dynamic_conv_fwd_kernel, io, {**tiles, **flags,
                                                                                            "SPLIT": True}
            if static:  # the static forward tap by tap (the default), at its GPU tile, with and without a state
                (block_t, block_d), _ = conv._static_fwd_config(8192, 1728, 4, True)
                per_tap = {**tiles, "BLOCK_T": block_t, "BLOCK_D": block_d, "SILU": True, "HAS_BIAS": True,
                           "NORM_HEAD": 0}
                for state, split in ((True, False), (True, True), (False, True)):
                    yield (f"conv fwd per tap ({tag}, {'state' if state else 'no state'}"
                           f"{', split' if split else ''})", conv._short_conv_fwd_kernel, io,
                           {**per_tap, "HAS_STATE": state, "SPLIT": split})
                for head in (64, 128):  # q and k L2-normalised per head in the epilogue (prefill, no gradient)
                    yield (f"conv fwd per tap ({tag}, state, split, l2norm heads of {head})",
                           conv._short_conv_fwd_kernel, io,
                           {**per_tap, "HAS_STATE": True, "SPLIT": True, "NORM_HEAD": head})
            if static:  # one backward kernel reading q|k|v's three gradients where they lie, and the state's
                bwd = {**io, "dy0_ptr": "*bf16", "dy1_ptr": "*bf16", "dy2_ptr": "*bf16", "db_ptr": "*fp32"}
                parts = {"IS_VARLEN": varlen, "SILU": True, "HAS_BIAS": True, "HAS_DY0": True, "HAS_DY1": True,
                         "HAS_DY2": True}
                yield (f"conv bwd ({tag})", conv._short_conv_bwd_kernel, bwd,
                       {"W": 4, "W_POW2": 4, "BLOCK_T": 32, "BLOCK_D": 32, "HAS_STATE": True, "WRITE_DX": True,
                        **parts})
                yield (f"conv bwd dstate ({tag})", conv._short_conv_bwd_dstate_kernel, bwd,
                       {"W": 4, "W_POW2": 4, "BLOCK_D": 128, **parts})
                continue
            yield (f"conv bwd dk ({tag})", conv._dynamic_conv_bwd_dk_kernel, io,
                   {**tiles, "HAS_STATE": True, "SILU": True})
            yield f"conv bwd dx ({tag})", conv._dynamic_conv_bwd_dx_kernel, io, tiles
            yield (f"conv bwd dstate ({tag})", conv._dynamic_conv_bwd_dstate_kernel, io,
                   {"W": 4, "W_POW2": 4, "BLOCK_D": 128, "IS_VARLEN": varlen})
    for dtype, precision in (("bf16", "tf32"), ("fp32", "ieee")):
        for ring in (False, True):
            pointers = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "lo_ptr": "*i32",
                        "hi_ptr": "*i32"}
            yield (f"decode attention ({dtype}, {'ring' if ring else 'full'})", dec._decode_attention_kernel,
                   pointers, {"HKV": 2, "G": 3, "G_PAD": 16, "D": 64, "DV": 64, "BLOCK_N": 64, "RING": ring,
                              "TILES": 4, "PRECISION": precision})


def more_cases():
    """The decode steps' recurrences and convolution, and the fused norms / SwiGLU; the affine state pass."""
    from jetnas.ops import triton_affine_pass as affine
    from jetnas.ops import triton_decode as dec
    from jetnas.ops import triton_fused as fused

    # the affine-form GDN state pass: the SmolLM2 hybrid's heads (K = V = 64) and Jet-2B's (K = 96 in a 128 tile,
    # V = 256 in blocks of 64), M in bf16 or float32 (TF32 products)
    for precise in (False, True):
        for K, BK in ((64, 64), (96, 128)):
            pointers = {n: "*bf16" for n in ("k_ptr", "w_ptr", "u_ptr", "h_ptr", "v_new_ptr")}
            pointers.update({"g_ptr": "*fp32", "m_ptr": "*fp32" if precise else "*bf16", "n_ptr": "*fp32",
                             "h0_ptr": "*fp32", "ht_ptr": "*fp32"})
            shape = {"H": 9, "K": K, "V": 64 if K == 64 else 256, "BT": 64, "BK": BK, "BV": 64, "UPCAST": False}
            tag = f"K {K}, {'tf32' if precise else 'bf16'}"
            for pre_n in (False, True):
                yield (f"affine pass M ({tag}{', N' if pre_n else ''})", affine._affine_m_kernel, pointers,
                       {**shape, "PRECISE": precise, "PRE_N": pre_n})
            for variant in affine.VARIANTS:
                yield (f"affine pass ({tag}, {variant})", affine._affine_pass_kernel, pointers,
                       {**shape, "USE_H0": True, "STORE_HT": True, "PRECISE": precise, "SAVE_V": variant == "loop",
                        "PRE_N": variant == "pre-n"},
                       {"num_warps": 4, "num_stages": affine.default_stages(BK, precise)})
            if not precise:
                yield f"affine pass v_new after (K {K})", affine._affine_v_new_kernel, pointers, shape

    bf16 = {n: "*bf16" for n in ("q_ptr", "k_ptr", "v_ptr", "g_ptr", "beta_ptr", "o_ptr", "alog_ptr", "dtb_ptr")}
    for name, flags in (("GLA, per-key decay", {"DELTA": False, "USE_G": True, "G_PER_KEY": True, "USE_BETA": False,
                                                    "L2NORM": False, "RAW_GATES": False}),
                        ("gated delta rule", {"DELTA": True, "USE_G": True, "G_PER_KEY": False, "USE_BETA": True,
                                                  "L2NORM": True, "RAW_GATES": False}),
                        ("gated delta rule, raw gates", {"DELTA": True, "USE_G": True, "G_PER_KEY": False,
                                                             "USE_BETA": True, "L2NORM": True, "RAW_GATES": True})):
        yield (f"recurrent step ({name})", dec._recurrent_step_kernel, {**bf16, "s_ptr": "*fp32"},
               {"K": 64, "V": 64, "BK": 64, "BV": 32, **flags})
    for bias in (False, True):
        yield (f"conv step ({'bias' if bias else 'no bias'})", dec._conv_step_kernel,
               {n: "*bf16" for n in ("x_ptr", "w_ptr", "bias_ptr", "s_ptr", "y_ptr")},
               {"W": 4, "WP": 4, "HAS_BIAS": bias, "SILU": True, "BLOCK_D": 256})
    io = {n: "*bf16" for n in ("x_ptr", "g_ptr", "w_ptr", "y_ptr", "u_ptr", "dy_ptr", "dx_ptr", "dg_ptr", "du_ptr")}
    yield "rms norm", fused._rms_norm_kernel, io, {"BLOCK_N": 1024}
    for before in (False, True):
        yield (f"gated rms norm (norm {'before' if before else 'after'} gate)", fused._gated_rms_norm_kernel, io,
               {"HAS_GATE": True, "NORM_BEFORE_GATE": before, "BLOCK_R": 32, "BLOCK_L": 128})
    yield "silu * up", fused._silu_mul_kernel, io, {"BLOCK": 2048}
    # the backward kernels: an fp32 residual stream normed by an fp32 weight (training under bf16 autocast), and
    # bf16 everywhere (inference dtypes); the weight's gradient partials are fp32
    for dw in (False, True):
        for dtype in ("fp32", "bf16"):
            pointers = {**{n: f"*{dtype}" for n in ("x_ptr", "w_ptr", "dy_ptr", "dx_ptr")}, "dw_ptr": "*fp32"}
            yield (f"rms norm backward ({dtype}, {'with' if dw else 'no'} dw)", fused._rms_norm_bwd_kernel, pointers,
                   {"BLOCK_N": 1024, "HAS_DW": dw, "PROD_ROUND": 0 if dtype == "fp32" else 1})
    # the float32 residual stream normalised straight into bf16 (out_dtype under autocast): dy is bf16
    pointers = {"x_ptr": "*fp32", "w_ptr": "*fp32", "dy_ptr": "*bf16", "dx_ptr": "*fp32", "dw_ptr": "*fp32"}
    yield ("rms norm backward (fp32 -> bf16 output, with dw)", fused._rms_norm_bwd_kernel, pointers,
           {"BLOCK_N": 1024, "HAS_DW": True, "PROD_ROUND": 0})
    for gate, before, dw in ((True, True, True), (True, False, True), (False, True, True), (True, True, False)):
        yield (f"gated rms norm backward ({'gate' if gate else 'no gate'}, norm {'before' if before else 'after'},"
               f" {'with' if dw else 'no'} dw)", fused._gated_rms_norm_bwd_kernel, {**io, "dw_ptr": "*fp32"},
               {"HAS_GATE": gate, "NORM_BEFORE_GATE": before, "HAS_DW": dw, "BLOCK_L": 256})
        # the tile backward (the default launch): 32 rows of 64-channel heads, as at the GDN blocks' shape
        yield (f"gated rms norm tile backward ({'gate' if gate else 'no gate'}, norm {'before' if before else 'after'},"
               f" {'with' if dw else 'no'} dw)", fused._gated_rms_norm_bwd_tile_kernel, {**io, "dw_ptr": "*fp32"},
               {"HAS_GATE": gate, "NORM_BEFORE_GATE": before, "HAS_DW": dw, "BLOCK_R": 32, "BLOCK_L": 64})
    yield "silu * up backward", fused._silu_mul_bwd_kernel, io, {"BLOCK": 2048}
    # SwiGLU on the packed gate|up product (Backend.fused_projections), both ways
    yield "packed silu * up", fused._silu_mul_packed_kernel, {"gu_ptr": "*bf16", "y_ptr": "*bf16"}, {"BLOCK": 2048}
    yield ("packed silu * up backward", fused._silu_mul_packed_bwd_kernel,
           {"gu_ptr": "*bf16", "dy_ptr": "*bf16", "dgu_ptr": "*bf16"}, {"BLOCK": 2048})
    # the training fusions: add + norm of a float32 stream and a bf16 mixer output, normed into bf16; its backward
    # with both gradients, two outputs and the weight's partials
    yield ("add + rms norm", fused._add_rms_norm_kernel,
           {"x_ptr": "*fp32", "y_ptr": "*bf16", "w_ptr": "*fp32", "s_ptr": "*fp32", "n_ptr": "*bf16"}, {"BLOCK_N": 1024})
    yield ("add + rms norm backward", fused._add_rms_norm_bwd_kernel,
           {"s_ptr": "*fp32", "w_ptr": "*fp32", "dn_ptr": "*bf16", "ds_ptr": "*fp32", "dx_ptr": "*fp32",
            "dy_ptr": "*bf16", "dw_ptr": "*fp32"},
           {"BLOCK_N": 1024, "HAS_DS": True, "TWO_OUT": True, "HAS_DW": True, "PROD_ROUND": 0})
    from jetnas.ops import triton_hidden_loss as hidden

    yield ("hidden loss square sums", hidden._square_sums_kernel, {"hs_ptr": "*fp32", "ht_ptr": "*bf16"},
           {"BLOCK": 4096})
    for acc in (False, True):  # with acc: the gradient from the rest of the graph added in (shared states)
        yield (f"hidden loss backward ({'into grad' if acc else 'own grad'})", hidden._square_sums_bwd_kernel,
               {"hs_ptr": "*fp32", "ht_ptr": "*bf16", "g_ptr": "*fp32", "acc_ptr": "*fp32", "dhs_ptr": "*fp32"},
               {"BLOCK": 4096, "HAS_ACC": acc})
    from jetnas.ops import triton_rotary as rotary

    # rotary embedding of bf16 q / k with the model's float32 tables (9 heads of 64, SmolLM2's), both ways
    for transpose in (False, True):
        yield (f"rotary ({'backward' if transpose else 'forward'})", rotary._rotary_kernel,
               {"x_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "y_ptr": "*bf16"},
               {"BLOCK_H": 16, "BLOCK_D": 64, "TRANSPOSE": transpose})
    from jetnas.ops import triton_gates as gates

    # the GDN gates (beta, g) of a bf16 projection, with and without a padding mask; g float32, beta bf16
    for mask in (False, True):
        io = {"a_ptr": "*bf16", "b_ptr": "*bf16", "alog_ptr": "*fp32", "dtb_ptr": "*fp32", "m_ptr": "*fp32",
              "g_ptr": "*fp32", "beta_ptr": "*bf16", "dg_ptr": "*fp32", "dbeta_ptr": "*bf16", "da_ptr": "*bf16",
              "db_ptr": "*bf16", "part_ptr": "*fp32"}
        yield (f"gdn gates ({'mask' if mask else 'no mask'})", gates._gdn_gates_fwd_kernel, io,
               {"HAS_MASK": mask, "BLOCK_M": gates.BLOCK_M, "BLOCK_H": 16})
        yield (f"gdn gates backward ({'mask' if mask else 'no mask'})", gates._gdn_gates_bwd_kernel, io,
               {"HAS_MASK": mask, "BLOCK_M": gates.BLOCK_M, "BLOCK_H": 16})
    from jetnas.ops import triton_rwkv7

    yield ("rwkv7 step", triton_rwkv7._rwkv7_step_kernel,
           {**{n: "*bf16" for n in ("r_ptr", "w_ptr", "k_ptr", "v_ptr", "a_ptr", "b_ptr", "o_ptr")}, "s_ptr": "*fp32"},
           {"K": 64, "V": 64, "BK": 64, "BV": 64})


def attention_cases():
    """The sliding-window attention forward, bf16, at the launches `triton_swa_forward` makes by default (with
    their warps and pipeline stages, which set its shared memory): 9 query heads over 3 (SmolLM2's GQA)."""
    from jetnas.ops import triton_attention as ta

    pointers = {n: "*bf16" for n in ("q_ptr", "k_ptr", "v_ptr", "o_ptr")}
    for D in ta.HEAD_DIMS:
        tiles = ta.default_tiles(D)
        yield (f"sliding-window attention (bf16, D={D})", ta._swa_fwd_kernel, pointers,
               {"G": 3, "BLOCK_M": tiles["block_m"], "BLOCK_N": tiles["block_n"], "BLOCK_D": D, "PRECISION": "tf32",
                "UPCAST": False},
               {"num_warps": tiles["num_warps"], "num_stages": tiles["num_stages"]})


def memory_ops(fn, signature: dict[str, str], constexprs: dict, divisible: list[str], options: dict) -> dict[str, int]:
    """The global loads and stores of `fn` compiled for sm_90, the arguments in `divisible` hinted divisible by 16
    (as Triton specialises a pointer or integer that is, at launch): `{instruction: count}`."""
    import re
    from collections import Counter

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(fn.arg_names)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    source = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()}, attrs=attrs)
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
    return dict(Counter(re.findall(r"(?:ld|st)\.global[.\w]*", ptx)))


def gate_loads(stride_divisible: bool) -> dict[str, int]:
    """The global loads of the gated norm's forward for sm_90 (GDN shape: rows of 64, 64 rows a program, bf16), its
    pointers 16-byte aligned and `g_stride` (the fused product's row stride) either hinted divisible by 16, as
    Triton specialises such an integer at launch, or not: `{instruction: count}`."""
    from jetnas.ops import triton_fused as fused

    fn = fused._gated_rms_norm_kernel
    names = list(fn.arg_names)
    constexprs = {"HAS_GATE": True, "NORM_BEFORE_GATE": True, "BLOCK_R": 64, "BLOCK_L": 64}
    signature = {n: "constexpr" if n in constexprs else "*fp32" if n == "w_ptr" else "*bf16" if n.endswith("_ptr")
                 else "fp32" if n in FLOATS else "i32" for n in names}
    divisible = [n for n in names if n.endswith("_ptr")] + ["L"] + ["g_stride"] * stride_divisible
    ops = memory_ops(fn, signature, constexprs, divisible, {"num_warps": 4})
    return {k: v for k, v in ops.items() if k.startswith("ld.")}


def check_gate_loads() -> None:
    """The reason `jetnas.layers.jet._aligned` pads the g|b|a product to 16 columns: with its row stride divisible
    by 16 every load of the gated norm is a 16-byte vector; without, the gate's are two-byte scalars."""
    aligned, unaligned = gate_loads(True), gate_loads(False)
    if set(aligned) != {"ld.global.v4.b32"}:
        raise AssertionError(f"a stride divisible by 16 left scalar loads: {aligned}")
    if not unaligned.get("ld.global.b16"):
        raise AssertionError(f"an unaligned stride vectorized too (the padding may no longer be needed): {unaligned}")


def conv_fwd_memory_ops(norm_head: int = 0) -> dict[str, int]:
    """The global loads and stores of the static forward tap by tap for sm_90, as the GDN layers launch it: q|k|v
    split, bf16, W = 4, SiLU, no bias or state, at its GPU tile and warps, the pointers 16-byte aligned and the sizes
    divisible by 16 (1,728 = 3 x 576 channels), q and k L2-normalised per head of `norm_head` channels when > 0
    (a prompt without gradients): `{instruction: count}`."""
    from jetnas.ops import triton_dynamic_conv as conv

    fn = conv._short_conv_fwd_kernel
    names = list(fn.arg_names)
    (block_t, block_d), opts = conv._static_fwd_config(8192, 1728, 4, True)
    constexprs = {"W": 4, "W_POW2": 4, "BLOCK_T": block_t, "BLOCK_D": block_d, "HAS_STATE": False,
                  "IS_VARLEN": False, "SILU": True, "HAS_BIAS": False, "SPLIT": True, "NORM_HEAD": norm_head}
    signature = {n: "constexpr" if n in constexprs else ("*i32" if n.startswith("tok_") else "*bf16")
                 if n.endswith("_ptr") else "i32" for n in names}
    divisible = [n for n in names if n.endswith("_ptr")] + ["D1", "D2", "ROWS", "T", "D"]
    return memory_ops(fn, signature, constexprs, divisible, opts)


def check_conv_fwd_vectors() -> None:
    """Why the static forward goes tap by tap: its x loads and its split stores are 16-byte vectors (the old forward
    compiled the same way: 8-byte loads, two-byte stores of the split parts). Two-byte loads are left only for the
    weight's columns (W apart in memory, read once a tile). The same with q and k L2-normalised per head of 64 in
    the epilogue (the per-head sums must not cost the vectors, nor spill to local memory)."""
    for head in (0, 64):
        ops = conv_fwd_memory_ops(head)
        if not ops.get("ld.global.v4.b32") or set(k for k in ops if k.startswith("st.")) != {"st.global.v4.b32"}:
            raise AssertionError(f"the per-tap forward's x loads or stores are not 16-byte vectors "
                                 f"(l2norm heads {head}): {ops}")
        if ops.get("ld.global.b16", 0) > 2 * 4 or any(k.startswith("ld.local") for k in ops):
            raise AssertionError(f"more scalar loads than the weight's columns need (l2norm heads {head}): {ops}")


def main() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run with TRITON_INTERPRET=0: interpreted kernels cannot be compiled")
    results = {}
    for name, fn, pointers, constexprs, *options in [*cases(), *more_cases(), *attention_cases()]:
        try:
            compile_for_hopper(fn, pointers, constexprs, *options)
            results[name] = "ok"
        except Exception as err:  # noqa: BLE001 - every case is reported
            results[name] = f"{type(err).__name__}: {str(err)[-1500:]}"
    for name, check in (("gated rms norm: vector loads at a 16-divisible gate stride", check_gate_loads),
                        ("static conv fwd per tap: 16-byte x loads and split stores", check_conv_fwd_vectors)):
        try:
            check()
            results[name] = "ok"
        except Exception as err:  # noqa: BLE001
            results[name] = f"{type(err).__name__}: {err}"
    print(json.dumps(results))


if __name__ == "__main__":
    main()
