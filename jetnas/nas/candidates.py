"""The candidates of PostNAS steps 2-4 and running each of them once (paper, sections 2.3-2.5).

A candidate is a linear block as written in the layer-types grammar (`jetnas.models.layer_types.BlockSpec`:
`gdn`, `jet-dyn-qk`, `jet:qk_conv=dynamic+v_conv=static`, ...). Training, evaluating and measuring one is a callable
passed in, `run(candidate, candidate_dir) -> record`, so this module never imports the trainer and is tested with
fakes; `run_candidates` runs each candidate once and reuses a finished one's record when the same search runs again.

A record (what `run` returns) holds at least `tasks: {task: {metric: value}}`, and usually `train_tokens_per_s`,
`decode_tokens_per_s`, `prefill_tokens_per_s`, `cache_bytes_per_sequence`, `params`, `trainable_params`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from jetnas.files import write_json_atomic
from jetnas.models.layer_types import BlockSpec, parse_block, split_entries

DEFAULT_BLOCKS = "gdn,gla,mamba2,retnet,deltanet,rwkv7,jet"

#: per block type, the options that give it the teacher's attention shape (heads x head_dim for keys and values:
#: the defaults of gdn, deltanet, gla and retnet) where its own default differs: the JetBlock's value dim is
#: 2 x head_dim (expand_v, as released) and Mamba2's width 2 x hidden (expand)
MATCHED_SHAPE: dict[str, dict] = {"jet": {"expand_v": 1.0}, "mamba2": {"expand": 1}}
#: options that set a block's shape (a candidate giving any of them keeps its own)
SHAPE_KEYS = {"num_heads", "head_dim", "head_k_dim", "head_v_dim", "expand_v", "expand", "state_size"}


def matched_shape(candidate: BlockSpec) -> BlockSpec:
    """The candidate at the teacher's attention shape, so that block selection compares blocks, not sizes: every
    candidate then holds the same recurrent state per layer and inherits the attention's q/k/v/o (a JetBlock with
    value dim 2 x head_dim cannot inherit v and o; in the 2026-12-02 H200 run it had 2x GDN's state and fresh v/o,
    and trailed GDN). A candidate that sets a shape option itself is left as it is."""
    extra = MATCHED_SHAPE.get(candidate.block_type)
    if not extra or SHAPE_KEYS & set(candidate.kwargs):
        return candidate
    return BlockSpec(candidate.name, candidate.block_type, tuple({**candidate.kwargs, **extra}.items()))


def parse_candidates(spec: str | Sequence[str]) -> list[BlockSpec]:
    """Candidates from a comma-separated list (or a list of written forms); names must be distinct."""
    entries = split_entries(spec) if isinstance(spec, str) else [str(s) for s in spec]
    candidates = [parse_block(e) for e in entries]
    if not candidates:
        raise ValueError(f"no block candidates in {spec!r}")
    names = [c.name for c in candidates]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"block candidates {duplicates} are listed twice")
    slugs = [c.slug for c in candidates]
    if len(set(slugs)) != len(slugs):
        raise ValueError(f"block candidates {names} collide as directory names {slugs}")
    return candidates


def fingerprint(recipe: Mapping) -> str:
    """A short hash of everything that decides a result (key order does not matter)."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


def log_progress(msg: str) -> None:
    """The searches' progress line on stderr."""
    print(f"jetnas: {msg}", file=sys.stderr, flush=True)


def _fingerprint_of(path: Path) -> str | None:
    return json.loads(path.read_text()).get("fingerprint")


def run_candidates(candidates: Sequence[BlockSpec], run: Callable[[BlockSpec, Path], dict],
                   out_dir: str | Path, recipe: Mapping, log: Callable[[str], None] = log_progress) -> dict[str, dict]:
    """Run every candidate once: `run(candidate, out_dir/candidates/<slug>)` returns its record, written to
    `result.json` there. A candidate whose `result.json` was written under the same `recipe` (everything that
    decides the result: data, steps, learning rate, seed, tasks...) is reused; one written under another recipe is
    stale, and its directory is cleared and run again. An unfinished candidate's directory is left to `run` (the
    trainer resumes from its checkpoints). Returns `{name: record}` in candidate order."""
    root = Path(out_dir) / "candidates"
    records = {}
    for index, cand in enumerate(candidates):
        cdir = root / cand.slug
        result_path = cdir / "result.json"
        stamp = fingerprint({"recipe": recipe, "candidate": cand.describe()})
        if result_path.exists():
            saved = json.loads(result_path.read_text())
            if saved.get("fingerprint") == stamp:
                log(f"[{index + 1}/{len(candidates)}] {cand.name}: finished earlier, reusing {result_path}")
                records[cand.name] = saved["record"]
                continue
            log(f"[{index + 1}/{len(candidates)}] {cand.name}: {result_path} is from a different recipe; rerunning")
            shutil.rmtree(cdir)
        elif (cdir / "recipe.json").exists() and _fingerprint_of(cdir / "recipe.json") != stamp:
            log(f"[{index + 1}/{len(candidates)}] {cand.name}: unfinished run of a different recipe; starting over")
            shutil.rmtree(cdir)
        cdir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cdir / "recipe.json", {"fingerprint": stamp, "recipe": recipe, "candidate": cand.describe()})
        log(f"[{index + 1}/{len(candidates)}] {cand.name}: running")
        record = {**run(cand, cdir), **cand.describe()}
        write_json_atomic(result_path, {"fingerprint": stamp, "record": record})
        records[cand.name] = record
    return records
