#!/usr/bin/env bash
# Device-side steps of the chunked-path work (issue 16): GPU tests of the new kernels, the loss benchmark, prefill
# profiles, and the training-step benchmark of old and new code side by side. Carry .stage/fla (fla wheels),
# .stage/extra (liger-kernel, cut-cross-entropy: the loss benchmark's comparisons), .carry/old (the code before the
# change: `git archive bbfe8a2 jetnas | tar -x -C .carry/old`) and .carry/prof (val.bin and SmolLM2's tokenizer
# files, for a random-weight teacher of SmolLM2-135M's shape).
#   bash dev/gpu_chunked.sh tests loss prefill train
set -uo pipefail
export PYTHONPATH=/root/site:$PWD PYTHONUNBUFFERED=1
# TileLang (fla's gated-delta-rule backward on Hopper with Triton 3.6) travels in two calls: .stage/tl into
# /root/stage by a first call (`mkdir -p /root/stage && cp .stage/tl/*.whl /root/stage/`), .stage/z3 with this one
wheels=(.stage/fla/*.whl .stage/extra/*.whl)
[ -d .stage/z3 ] && ls /root/stage/tilelang-*.whl >/dev/null 2>&1 && wheels+=(/root/stage/*.whl .stage/z3/*.whl)
python3 -m pip install -q --no-index --no-deps --no-compile --target /root/site "${wheels[@]}" 2>&1 | tail -1
python3 -c "import tilelang" 2>/dev/null && echo "tilelang: importable" || echo "tilelang: absent (GDN's backward refused)"
mkdir -p ~/.triton/cache && cp -rn dev/autotune/. ~/.triton/cache/ 2>/dev/null
harvest() { (cd ~/.triton/cache && find . -name "*.autotune.json" | tar -cf "$OUT/autotune.tar" -T -) 2>/dev/null; }
trap harvest EXIT
quiet() { grep -v -i -E "warn|it/s\]$" ; }
TB="benchmarks/train_bench.py --teacher random --tokenizer-from .carry/prof/tok --data .carry/prof/val.bin"
for step in "$@"; do
  case $step in
    tests) timeout 240 python3 -m pytest -q -p no:cacheprovider tests/ops/test_fused.py tests/ops/test_rwkv7.py \
             tests/ops/test_triton_dynamic_conv.py tests/ops/test_decode_ops.py tests/ops/test_losses.py 2>&1 | tail -6 ;;
    quicktests) timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/ops/test_fused.py \
                  tests/ops/test_losses.py -k "triton or kernel or gradients or autocast" 2>&1 | tail -4 ;;
    loss) timeout 200 python3 benchmarks/loss_bench.py --out $OUT/loss_bench.json 2>&1 | quiet | tail -30 ;;
    prefill)
      for ctx in 8192 32768; do
        for bt in "" "--block-types attn"; do
          timeout 100 python3 benchmarks/prefill_profile.py --model results/h200_postnas_smollm2_135m/stage2/model \
            --context $ctx --chunks $ctx --profile-chunk $ctx --autotune-configs 4 $bt \
            --out $OUT/prefill_135m_${ctx}${bt:+_attn}.json 2>&1 | quiet | tail -3
        done
      done ;;
    train)  # LINEAR=gdn needs TileLang (see above); gla runs on fla alone
      for label in old new; do
        tree=$PWD; [ $label = old ] && tree=$PWD/.carry/old
        PYTHONPATH=/root/site:$tree timeout ${TRAIN_S:-240} python3 $TB --linear ${LINEAR:-gdn} \
          --modes supernet,stage1,stage2 --steps ${STEPS:-8} --warmup 3 --profile-steps 2 --autotune-configs 4 \
          --label $label --out $OUT/train_$label.json 2>&1 | quiet | tail -40
      done
      python3 benchmarks/train_bench.py --compare $OUT/train_old.json,$OUT/train_new.json ;;
  esac
done
