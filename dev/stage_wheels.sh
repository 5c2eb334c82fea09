#!/usr/bin/env bash
# Build the git-ignored .stage/ folders that GPU calls carry (see dev/gpu_session.sh): run once per fresh checkout.
#   .stage/fla        fla wheels only (engine, kernel and generate checks): one call, ~1.5 MB
#   .stage/c1 .. c5, c1b, c3b, c4b, c8, c9  everything the PostNAS recipe needs, in ten calls of < 46 MB (the device takes
#                     64 MiB a call, the repository's tracked files included: 14.5 MB on 2026-12-06, 18 MB on
#                     2026-12-07, when c1, c3 and c4 no longer fitted and were split; the last lines check the sizes):
#                     tilelang + its dependencies (fla's backward of the gated delta rule on Hopper with Triton 3.6),
#                     the teacher's GGUF in four parts, gguf-py, transformers, the bench files and the corpus
#                     (c9: the articles the recall data is built from; c5: the tokenizer for the training benchmark)
#   .stage/k1         the kernel and throughput measurements' files, carried by the call that runs them (`lite`)
# The device runs Python 3.12 on x86_64 (KINDS.md); wheels are fetched for it, not for this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
WHL=.stage/wheels
mkdir -p "$WHL" .stage/fla .stage/c1 .stage/c2 .stage/c3 .stage/c4 .stage/c5 .stage/c8
dl() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHL" "$@"
}
dl fla-core==0.6.0 flash-linear-attention==0.6.0 tilelang==0.1.15 apache-tvm-ffi==0.1.12 torch-c-dlpack-ext \
   z3-solver==4.15.4.0 gguf==0.19.0 transformers==5.23.0
cp "$WHL"/fla_core-*.whl "$WHL"/flash_linear_attention-*.whl .stage/fla/
# tilelang (49.6 MB) in two halves, c1 and c1b; setup() joins them (c1 whole and the repository passed 64 MiB on
# 2026-12-07)
TL=$(ls "$WHL"/tilelang-*.whl)
split -n 2 -d -a 1 "$TL" ".stage/c1/$(basename "$TL").part"
mkdir -p .stage/c1b && mv ".stage/c1/$(basename "$TL").part1" .stage/c1b/
# the small wheels ride with c3: c1 (tilelang, 49.6 MB) plus the repository (13 MB tracked) passed 64 MiB (2026-12-06)
cp "$WHL"/apache_tvm_ffi-*.whl "$WHL"/torch_c_dlpack_ext-*.whl "$WHL"/gguf-*.whl .stage/fla/*.whl .stage/c3/
# z3 alone: beside gguf.part0 in c2 it passed 64 MiB with the repository (2026-12-06, seventh session)
cp "$WHL"/z3_solver-*.whl .stage/c8/
# pytest for `gpu_session.sh gputests` (the device image may lack it)
dl pytest pluggy iniconfig && cp "$WHL"/pytest-*.whl "$WHL"/pluggy-*.whl "$WHL"/iniconfig-*.whl .stage/c8/

# the teacher's GGUF (fetched and cached by jetnas itself), in four parts; setup() reassembles and checks it
GGUF=$(python3 -c "from jetnas.models.teachers import _smollm2_gguf; print(_smollm2_gguf())")
split -n 4 -d -a 1 "$GGUF" .stage/gguf.part
mv .stage/gguf.part0 .stage/c2/
mkdir -p .stage/c3b .stage/c4b
mv .stage/gguf.part1 .stage/c3b/  # with c3's wheels and the bench files it passed 64 MiB (2026-12-07)
mkdir -p .stage/c5
mv .stage/gguf.part2 .stage/c5/  # c3 with it and the repository passed 64 MiB (2026-12-06)
mv .stage/gguf.part3 .stage/c4b/  # c4 is carried with .stage/tilelang: with both it passed 64 MiB (2026-12-07)
cp "$WHL"/transformers-*.whl .stage/c3/
# the bench files ride with c3: c4 + .stage/tilelang (carried together) passed 64 MiB (2026-12-06)
mkdir -p .stage/c3/bench .stage/c4/corpus
cp ../shared/data/bench/* .stage/c3/bench/
cp ../shared/data/corpus/train.bin ../shared/data/corpus/val.bin .stage/c4/corpus/
# the articles the recipes' retrieval-bearing documents are built from (data.recall.corpus), in a folder of their
# own (c9): beside tilelang's second half (c1b) and the repository (24 MB tracked on 2026-12-07) they made 63.8 MiB
mkdir -p .stage/c9/corpus
cp ../shared/data/corpus/train.jsonl.gz .stage/c9/corpus/
# the teacher's tokenizer for benchmarks/train_bench.py (gpu_session.sh trainbench, before any recipe loads the teacher)
python3 -c "from jetnas.models.teachers import load_teacher; load_teacher('smollm2-135m')[1].save_pretrained('.stage/c5/prof/tok')"
# k1: everything the kernel and throughput measurements need, carried in the call that runs them
# (`gpu_session.sh lite`): fla, transformers, gguf and pytest wheels, the tokenizer, val.bin (~19 MB)
rm -rf .stage/k1 && mkdir -p .stage/k1
cp "$WHL"/fla_core-*.whl "$WHL"/flash_linear_attention-*.whl "$WHL"/transformers-*.whl "$WHL"/gguf-*.whl \
   "$WHL"/pytest-*.whl "$WHL"/pluggy-*.whl "$WHL"/iniconfig-*.whl ../shared/data/corpus/val.bin .stage/k1/
cp -r .stage/c5/prof .stage/k1/
sha256sum "$GGUF"
du -sh .stage/fla .stage/c1 .stage/c1b .stage/c2 .stage/c3 .stage/c3b .stage/c4 .stage/c4b .stage/c5 .stage/c8 .stage/c9 .stage/k1
# each call carries one folder (c4: with .stage/tilelang) plus the tracked files: all of it must stay under 64 MiB
tracked=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
for c in c1 c1b c2 c3 c3b c4 c4b c5 c8 c9 k1; do
  extra=0; [ $c = c4 ] && [ -d .stage/tilelang ] && extra=$(du -sb .stage/tilelang | cut -f1)
  total=$(( $(du -sb .stage/$c | cut -f1) + extra + tracked ))
  [ $total -lt $((62 * 1024 * 1024)) ] || echo "WARNING: .stage/$c and the repository make $((total >> 20)) MiB, over a call's 64 MiB: move a file to another folder"
done

# Optional (DENSE=1): the recall documents of smollm2-135m-gpu-final-4k-dense built here, at the path the device's run
# uses (/root/run), so the device reuses them instead of building them (~1-2 min of device time): carried in c6 and
# c7 (33 MB each), put back by `RUN_FROM=/root/stage/run_dense` (gpu_session.sh recipe). The builder is a pure
# function of corpus, tokenizer, configuration and seed: the 4K documents built here matched the device's build of
# 2026-12-06 in every count.
if [ -n "${DENSE:-}" ]; then
  rm -rf /root/run && python3 -m jetnas run smollm2-135m-gpu-final-4k-dense --out-dir /root/run \
    --set stages.stage1=skip --set stages.stage2=skip --set stages.eval=skip --set stages.bench=skip
  mkdir -p .stage/c6/run_dense/data .stage/c7/run_dense/data
  cp /root/run/pipeline.json .stage/c6/run_dense/
  cp /root/run/data/recall.bin* .stage/c6/run_dense/data/
  cp /root/run/data/recall2.bin* .stage/c7/run_dense/data/
  # the teacher's evaluation (69 s of an H100) is the same for every recipe of this family (the same arguments, so
  # the same fingerprint): the committed one rides along and is reused (2026-12-07: it was, in the aw4-lm25 run),
  # with its per-item outcomes (outcomes.json) where it has them, for the paired intervals of retention.json.
  # TEACHER_EVAL=none carries none: the device evaluates the teacher again (and writes its outcomes). The default,
  # the -aw4-docs run of 2026-12-08, is the first teacher evaluation with outcomes (46 s of an H100).
  TEACHER_EVAL=${TEACHER_EVAL:-results/h100_final_4k_dense_w1152_aw4_docs_smollm2_135m}
  if [ "$TEACHER_EVAL" != none ]; then
    [ -f "$TEACHER_EVAL/eval_teacher/outcomes.json" ] || echo "note: $TEACHER_EVAL has no teacher outcomes.json:" \
      "retention.json will have no paired intervals (TEACHER_EVAL=none evaluates the teacher on the device)"
    mkdir -p .stage/c6/run_dense/eval_teacher && cp "$TEACHER_EVAL"/eval_teacher/* .stage/c6/run_dense/eval_teacher/
    python3 - "$TEACHER_EVAL/pipeline.json" .stage/c6/run_dense/pipeline.json <<'PY'
import json, sys
src, dst = sys.argv[1:]
state = json.load(open(dst))
state["stages"]["eval_teacher"] = json.load(open(src))["stages"]["eval_teacher"]
json.dump(state, open(dst, "w"), indent=1)
PY
  fi
  du -sh .stage/c6 .stage/c7
fi
