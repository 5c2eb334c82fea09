"""benchmarks/prefill_copies.py's bookkeeping, in process on a few ops of known sizes (the script's own run, over
the SmolLM2 hybrid's 30 layers, patches Triton and fla for its process, so it is not imported into this one)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from prefill_copies import Recorder


def test_copies_are_counted_with_their_bytes_and_views_are_not():
    x = torch.randn(4, 10)  # float32: 160 bytes
    with torch.inference_mode(), Recorder() as rec:
        x[:, :5].contiguous()  # a copy: 80 bytes read, 80 written
        x.contiguous()  # already contiguous: no copy
        x.reshape(2, 20)  # a view
        torch.cat([x, x])  # 320 read, 320 written
        torch.empty(3).copy_(x[0, :3])  # 12 + 12
    got = [(r["op"], r["read"], r["written"]) for r in rec.rows]
    assert got == [("contiguous", 80, 80), ("cat", 320, 320), ("copy_", 12, 12)]


def test_matrix_products_are_checked_for_alignment():
    x, w = torch.randn(5, 16, dtype=torch.bfloat16), torch.randn(18, 16, dtype=torch.bfloat16)
    with torch.inference_mode(), Recorder() as rec:
        torch.nn.functional.linear(x, w)  # an output row of 18 bf16 = 36 bytes: not 16-byte aligned
        torch.nn.functional.linear(x, w[:16])
    assert [g["aligned"] for g in rec.gemms] == [False, True]
    assert rec.gemms[0]["operands"][0]["shape"] == [5, 16]  # input, weight, output in that order
