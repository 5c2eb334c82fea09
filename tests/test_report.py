"""The pipeline report's throughput section: both benchmarks side by side per context, found even when the run
directory was moved after the records were written."""

from __future__ import annotations

import json

from jetnas.report import _bench_comparison, _local


def _bench(tmp_path, name, decode, cache):
    rows = [{"system": "jetnas engine", "context_length": c, "decode_tokens_per_s": decode * f,
             "prefill_tokens_per_s": 1000.0 * f, "batch_size": 8, "cache_bytes_per_sequence": cache * c,
             "roofline_fraction": 0.5} for c, f in ((256, 1.0), (512, 0.5))]
    rows.append({"system": "transformers generate", "context_length": 256, "decode_tokens_per_s": 1.0})
    path = tmp_path / "run" / name / "bench.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"device": "cpu", "rows": rows}))
    # as recorded on the machine that wrote it: another root
    return {"outputs": {"json": f"/root/elsewhere/run/{name}/bench.json"}}


def test_local_finds_moved_outputs(tmp_path):
    (tmp_path / "run" / "a").mkdir(parents=True)
    (tmp_path / "run" / "a" / "f.json").write_text("{}")
    assert _local("/root/x/run/a/f.json", tmp_path / "run") == tmp_path / "run" / "a" / "f.json"
    assert _local("/root/x/run/a/missing.json", tmp_path / "run") is None
    assert _local(None, tmp_path) is None


def test_bench_comparison_table_and_figure(tmp_path):
    hybrid = _bench(tmp_path, "bench", 300.0, 10)
    teacher = _bench(tmp_path, "bench_teacher", 100.0, 100)
    lines = _bench_comparison(hybrid, teacher, tmp_path / "run")
    table = "\n".join(lines)
    # decode 300 vs 100 (3x), prefill equal (1x), cache per sequence in MB
    assert "| 256 | 300 | 100 | 3.00x | 1,000 | 1,000 | 1.00x | 8 | 8 | 0.00256 | 0.0256 | 0.5 | 0.5 |" in table
    assert "| 512 | 150 | 50 | 3.00x |" in table
    assert (tmp_path / "run" / "bench_vs_teacher.png").stat().st_size > 0
    # a benchmark without its file: no comparison (the caller falls back to the summaries)
    assert _bench_comparison({"outputs": {}}, teacher, tmp_path / "run") == []
