#!/usr/bin/env bash
# The training-step benchmark of issue 16, old (bbfe8a2) / new / new with the optional fusions, in one call on a
# machine that already has fla and TileLang in /root/site (the first two staging calls of dev/gpu_session.sh:
# .stage/c1 and .stage/c2 installed), the old code in /root/old (`.carry/old`) and a tokenizer + val.bin in
# /root/prof (`.carry/prof`). Each version runs in its own process, the same settings, new first:
#   FUSIONS=residual,hidden_loss STEPS=100 bash dev/gpu_train_bench.sh
# The last lines are the side-by-side table (old is the base; the fused run's loss curve is compared with new's by
# `train_bench.py --compare $OUT/train_new.json,$OUT/train_fused.json`).
set -uo pipefail
export PYTHONUNBUFFERED=1
mkdir -p ~/.triton/cache && cp -rn dev/autotune/. ~/.triton/cache/ 2>/dev/null
TB=(benchmarks/train_bench.py --teacher random --tokenizer-from /root/prof/tok --data /root/prof/val.bin --linear gdn
    --autotune-configs 4 --modes "${MODES:-stage1,supernet}" --steps "${STEPS:-100}" --warmup 5)
for label in new old fused; do
  tree=$PWD extra=(--profile-steps 2)
  [ $label = old ] && tree=/root/old extra=()
  [ $label = fused ] && extra+=(--fusions "${FUSIONS:-residual,hidden_loss}")
  PYTHONPATH=/root/site:$tree timeout "${TRAIN_S:-170}" python3 "${TB[@]}" --label $label "${extra[@]}" \
    --out "$OUT/train_$label.json" 2>&1 | grep -v -i -E "warn|it/s\]$" | grep -E "^---|^  [a-z(]|FAILED|Error|^\{" | head -40
done
(cd ~/.triton/cache && find . -name "*.autotune.json" | tar -cf "$OUT/autotune.tar" -T -) 2>/dev/null
PYTHONPATH=$PWD python3 benchmarks/train_bench.py --compare "$OUT/train_new.json,$OUT/train_fused.json" | tail -4
PYTHONPATH=$PWD python3 benchmarks/train_bench.py --compare "$OUT/train_old.json,$OUT/train_new.json,$OUT/train_fused.json"
