#!/usr/bin/env bash
# Device-side glue of a GPU session (see dev/LOG.md, 2026-11-24): the staged files (wheels, the teacher's GGUF in
# four parts, the corpus and benchmark files) arrive in /root/stage over several calls; `setup` assembles and
# installs them, then the steps run. Files under /root survive between calls only while the machine stays warm.
set -uo pipefail
export PYTHONPATH=/root/site:$PWD PYTHONUNBUFFERED=1 JETNAS_CACHE=/root/jc
GGUF=/root/jc/teachers/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf
RECIPE_SETS=(--set stages.supernet.steps=300 --set stages.supernet.eval_every=100
             --set stages.blocks.steps=150 --set stages.hardware.steps=100 --set stages.hardware.max_candidates=6
             --set stages.stage1.steps=600 --set stages.stage1.eval_every=200
             --set stages.stage2.steps=200 --set stages.stage2.eval_every=100)

setup() {
  mkdir -p /root/site "$(dirname $GGUF)" ../shared/data
  if [ ! -f "$GGUF" ]; then
    cat /root/stage/gguf.part0 /root/stage/gguf.part1 /root/stage/gguf.part2 /root/stage/gguf.part3 > "$GGUF"
    echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $GGUF" | sha256sum -c - || exit 3
    python3 -m pip install -q --no-index --no-deps --no-compile --target /root/site /root/stage/*.whl 2>&1 | tail -2
  fi
  cp -r /root/stage/bench /root/stage/corpus ../shared/data/
}

checks() {  # issue 2 (deltanet, mamba2 blocks), issue 3 (generate on GPU), issue 7 (prefill after the attention fix)
  timeout 200 python3 benchmarks/gpu_kernel_check.py --sections blocks --blocks deltanet,mamba2,jet,swa \
    --out $OUT/kernel_check_blocks.json 2>&1 | grep -v Warn | tail -12
  timeout 200 python3 benchmarks/gpu_generate_check.py --out $OUT/generate_check.json 2>&1 | grep -v Warn | tail -6
  timeout 150 python3 benchmarks/engine_h100.py --out $OUT/engine_prefill.json --contexts 65536 \
    --skip kernels,hf,4b 2>&1 | grep -v Warn | tail -8
}

teacher_eval() {  # issue 6: the full HellaSwag and MMLU, and the retrieval lengths the CPU run did not reach
  timeout "$1" python3 -m jetnas eval --model smollm2-135m --batch-size 64 --out-dir $OUT/teacher_eval \
    --tasks mc:../shared/data/bench/hellaswag_val.jsonl.gz,mc:../shared/data/bench/mmlu_test.jsonl.gz,retrieval:mqar@4096,retrieval:needle@16384,retrieval:kv@8192 \
    2>&1 | grep -v Warn | tail -12
}

recipe() {  # issues 4 and 5: the SmolLM2-135M recipe with fewer steps; resumes where the last call stopped
  timeout "$1" python3 -m jetnas run smollm2-135m-gpu --out-dir /root/run "${RECIPE_SETS[@]}" 2>&1 | grep -v Warn | tail -25
  mkdir -p $OUT/run
  (cd /root/run && find . -name "*.md" -o -name "*.json" -o -name "*.png" -o -name "*.jsonl" | grep -v checkpoint \
     | tar -cf - -T - | tar -xf - -C $OUT/run)
}

setup
for step in "$@"; do
  case $step in
    checks) checks ;;
    teacher_eval:*) teacher_eval "${step#*:}" ;;
    recipe:*) recipe "${step#*:}" ;;
  esac
done
