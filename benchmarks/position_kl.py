"""Where along a sequence a hybrid departs from its teacher: KL(teacher || student) and each model's NLL by position.

    OMP_NUM_THREADS=2 python benchmarks/position_kl.py --student runs/x/stage2/model --teacher smollm2-135m \\
        --data ../shared/data/corpus/val.bin --rows 8 --length 2048 --out results/x/position_kl

Each row starts at a document's first token (the file's first, or one just after an end-of-document id in `--data`), so position 0 has no
earlier text, as a benchmark prompt has none: HellaSwag's context and longest ending fit 128 tokens in 98.9% of its
rows (SmolLM2's tokenizer), scored from a fresh state. Training cuts its token streams into 4,096-token rows at fixed
offsets, not at document starts (Wikipedia articles average ~4,000 tokens), so a fresh state starts each row mostly
mid-document (the first 128 positions are 3% of the trained tokens) and a document's opening tokens mostly follow
another document's text. A hybrid whose linear layers learned to lean on what came before would show it here, as a
KL that is high at the first positions and falls along the row; a hybrid that is as good everywhere shows a flat KL.
Positions are bucketed by doubling from 16 (0-15, 16-31, 32-63, ...). Held-out
text only (`--data`, default Wikipedia's validation tokens); never an evaluation set. Writes `position_kl.json` and
`position_kl.png`; prints a table last. `--compare A.json B.json --out DIR` pairs two students measured on the same
rows: B - A per bucket with its standard error over rows (`position_kl_compare.json`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def document_rows(tokens: np.ndarray, eos: int, rows: int, length: int) -> torch.Tensor:
    """`[rows, length]` ids, each starting at a document's first token (the file's first and every token after an
    `eos`; `jetnas.train.data.document_starts`, the training rows' own definition), spread evenly over the file and
    running on through later documents as packed text does. A row is taken only where `length` tokens follow the
    start."""
    from jetnas.train.data import TokenStream, document_starts

    starts = document_starts(TokenStream(tokens), eos, length)
    if len(starts) < rows:
        raise ValueError(f"{len(starts)} document starts have {length} tokens after them; asked for {rows} rows")
    picks = starts[np.linspace(0, len(starts) - 1, rows).round().astype(int)]
    return torch.from_numpy(np.stack([tokens[s:s + length] for s in picks]).astype(np.int64))


def buckets(length: int, first: int = 16) -> list[tuple[int, int]]:
    """`[(lo, hi), ...]`, half-open position ranges doubling from `first`: (0, 16), (16, 32), (32, 64), ..."""
    out, lo, hi = [], 0, first
    while lo < length:
        out.append((lo, min(hi, length)))
        lo, hi = hi, hi * 2
    return out


@torch.inference_mode()
def per_position(teacher, student, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per position `[rows, length - 1]`: `kl` = KL(teacher || student) of the next-token distributions, and each
    model's NLL of the next token (`teacher_nll`, `student_nll`), in float32, one row at a time."""
    out = {"kl": [], "teacher_nll": [], "student_nll": []}
    for row in rows:
        ids = row[None]
        lt = torch.log_softmax(teacher(ids).logits[0, :-1].float(), -1)
        ls = torch.log_softmax(student(ids).logits[0, :-1].float(), -1)
        target = row[1:, None]
        out["kl"].append((lt.exp() * (lt - ls)).sum(-1))
        out["teacher_nll"].append(-lt.gather(-1, target)[:, 0])
        out["student_nll"].append(-ls.gather(-1, target)[:, 0])
    return {k: torch.stack(v) for k, v in out.items()}


def summarise(values: dict[str, torch.Tensor]) -> list[dict]:
    """Each bucket's means over rows and the positions in it (position p predicts token p + 1), and each row's own
    mean KL and student NLL in the bucket (`row_kl`, `row_student_nll`: what `compare` pairs two students on)."""
    length = values["kl"].shape[1]
    return [{"positions": [lo, hi], "n": values["kl"][:, lo:hi].numel(),
             **{k: v[:, lo:hi].mean().item() for k, v in values.items()},
             "row_kl": values["kl"][:, lo:hi].mean(1).tolist(),
             "row_student_nll": values["student_nll"][:, lo:hi].mean(1).tolist()} for lo, hi in buckets(length)]


def compare(a: dict, b: dict) -> list[dict]:
    """Two students' `position_kl.json` on the same rows (same data, rows, length, teacher), bucket by bucket: the
    mean of B - A over rows of the KL and of the student NLL, with the standard error of that paired difference
    (pairing takes out the variation between rows, which both students share).
    ValueError when the two were not measured on the same rows."""
    keys = ("data", "rows", "length", "teacher")
    if any(a.get(k) != b.get(k) for k in keys):
        raise ValueError(f"not the same rows: {[(k, a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)]}")
    out = []
    for x, y in zip(a["buckets"], b["buckets"]):
        row = {"positions": x["positions"]}
        for name in ("kl", "student_nll"):
            d = np.asarray(y[f"row_{name}"]) - np.asarray(x[f"row_{name}"])
            row[f"{name}_a"], row[f"{name}_b"] = x[name], y[name]
            row[f"{name}_diff"] = float(d.mean())
            row[f"{name}_se"] = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
        out.append(row)
    return out


def print_comparison(table: list[dict], a: str, b: str) -> None:
    print(f"B - A, paired over rows (A: {a}; B: {b})")
    print("| positions | KL A | KL B | KL B - A (se) | NLL B - A (se) |\n|---|---|---|---|---|")
    for t in table:
        lo, hi = t["positions"]
        print(f"| {lo}-{hi - 1} | {t['kl_a']:.4f} | {t['kl_b']:.4f} | {t['kl_diff']:+.4f} ({t['kl_se']:.4f}) | "
              f"{t['student_nll_diff']:+.4f} ({t['student_nll_se']:.4f}) |")


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [f"{b['positions'][0]}-{b['positions'][1] - 1}" for b in table]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.4))
    a.plot(xs, [t["kl"] for t in table], marker="o")
    a.set_ylabel("KL(teacher || student), nats/token")
    b.plot(xs, [t["teacher_nll"] for t in table], marker="o", label="teacher")
    b.plot(xs, [t["student_nll"] for t in table], marker="o", label="student")
    b.set_ylabel("next-token NLL")
    b.legend()
    for ax in (a, b):
        ax.set_xlabel("position in the row (a document's start is 0)")
        ax.tick_params(axis="x", rotation=45, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", help="the hybrid's model directory")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="instead of measuring: pair two position_kl.json files of the same rows (B - A per bucket)")
    p.add_argument("--teacher", default="smollm2-135m")
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/corpus/val.bin"))
    p.add_argument("--eos", type=int, default=None, help="end-of-document id in --data (default: the teacher's)")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", required=True)
    p.add_argument("--autotune-configs", type=int, default=None, metavar="N",
                   help="benchmark at most N of each Triton kernel's autotuning configs (a fresh GPU machine's first "
                        "run of new shapes: minutes less, barely slower kernels; the values are the same)")
    a = p.parse_args(argv)
    if a.autotune_configs is not None:
        if a.autotune_configs < 1:
            p.error(f"--autotune-configs={a.autotune_configs} must be >= 1")
        from jetnas.ops.autotune import limit_autotuning

        limit_autotuning(a.autotune_configs)
    if a.compare:
        import json

        first, second = (json.loads(Path(f).read_text()) for f in a.compare)
        try:
            table = compare(first, second)
        except ValueError as e:
            p.error(f"--compare {a.compare[0]} {a.compare[1]}: {e}")
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        from jetnas.files import write_json_atomic

        write_json_atomic(out / "position_kl_compare.json", {"a": a.compare[0], "b": a.compare[1], "buckets": table})
        print_comparison(table, *a.compare)
        return 0
    if not a.student:
        p.error("--student is required (or --compare A B)")

    from jetnas.files import write_json_atomic
    from jetnas.models.teachers import load_teacher
    from jetnas.runner.models import load_model, resolve_device
    from jetnas.validation import open_token_file

    device = resolve_device(a.device)
    teacher, _, spec = load_teacher(a.teacher, device=device)
    student = load_model(a.student, device, torch.float32)
    eos = spec.eos_token_id if a.eos is None else a.eos
    rows = document_rows(np.asarray(open_token_file(a.data)), eos, a.rows, a.length).to(device)
    start = time.perf_counter()
    table = summarise(per_position(teacher.eval(), student.eval(), rows))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "position_kl.json", {
        "student": a.student, "teacher": a.teacher, "data": a.data, "rows": a.rows, "length": a.length,
        "device": device, "dtype": "float32", "seconds": round(time.perf_counter() - start, 1), "buckets": table})
    plot(table, out / "position_kl.png")
    print("| positions | n | KL | teacher NLL | student NLL |\n|---|---|---|---|---|")
    for t in table:
        lo, hi = t["positions"]
        print(f"| {lo}-{hi - 1} | {t['n']} | {t['kl']:.4f} | {t['teacher_nll']:.3f} | {t['student_nll']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
