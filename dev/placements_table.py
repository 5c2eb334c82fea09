"""The placement comparison (issue 19, item 3) from separate runs: one run folder per placement, each trained and
evaluated by the same recipe (e.g. `smollm2-135m-gpu-compare` with `--set compare_placements=false --set
stages.stage1.layer_types=...`, one placement per GPU session when three do not fit one), as the pipeline's own
`compare_placements` would tabulate them in one run.

    python dev/placements_table.py searched=results/a uniform=results/b "one-layer ranking=results/c" \\
        --out results/placements_compared

Each folder is a run's returned files (`run.tar` unpacked): `stage1/stage_config.json` (the layer types),
`eval/eval.json` (the hybrid) and, in at least one, `eval_teacher/eval.json`. Writes `placements.json` (as
`compare/placements.json`) and `placements.md` (the report's table: accuracy and share of the teacher's margin per
task, held-out nll gap), and prints the table. Refuses runs whose evaluations ran different tasks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jetnas.files import write_json_atomic  # noqa: E402
from jetnas.report import placements_retention_table  # noqa: E402


def read_run(folder: Path) -> dict:
    """attn / swa layers and the hybrid's task results of one run folder."""
    config = json.loads((folder / "stage1" / "stage_config.json").read_text())
    types = config["layer_types"]
    results = json.loads((folder / "eval" / "eval.json").read_text())["tasks"]
    return {"attn": [i for i, t in enumerate(types) if t == "attn"],
            "swa": [i for i, t in enumerate(types) if t == "swa"], "results": results}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="NAME=RUN_FOLDER, one per placement (the first is the searched one)")
    ap.add_argument("--out", default=None, help="folder for placements.json / placements.md")
    args = ap.parse_args(argv)
    rows, teacher = {}, None
    for item in args.runs:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise SystemExit(f"{item!r}: expected NAME=RUN_FOLDER")
        path = Path(folder)
        if not (path / "eval" / "eval.json").exists():
            raise SystemExit(f"{item!r}: {path / 'eval' / 'eval.json'} does not exist (a run's unpacked run.tar?)")
        rows[name] = read_run(path)
        if teacher is None and (path / "eval_teacher" / "eval.json").exists():
            teacher = json.loads((path / "eval_teacher" / "eval.json").read_text())["tasks"]
    tasks = {name: sorted(row["results"]) for name, row in rows.items()}
    if len({tuple(t) for t in tasks.values()}) > 1:
        raise SystemExit(f"the runs evaluated different tasks, so they are not comparable: {tasks}")
    if teacher is not None:
        rows["teacher"] = {"attn": None, "swa": None, "results": teacher}
    table = "\n".join(placements_retention_table(rows))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "placements.json", rows)
        (out / "placements.md").write_text(
            "# Placements trained into final hybrids\n\nEach placement trained by the same recipe and evaluated the "
            "same way (separate runs: " + ", ".join(f"{n} = `{r.partition('=')[2]}`" for n, r in
                                                  zip(rows, args.runs)) + ").\n\n" + table + "\n")
    print(table)
    return rows


if __name__ == "__main__":
    main()
