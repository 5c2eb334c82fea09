#!/usr/bin/env bash
# Device-side glue of a GPU session (see dev/LOG.md, 2026-11-24): the staged files (wheels, the teacher's GGUF in
# four parts, the corpus and benchmark files) arrive in /root/stage over several calls; `setup` assembles and
# installs them, then the steps run. Files under /root survive between calls only while the machine stays warm.
#
# Autotuning: a fresh machine spends minutes benchmarking every Triton config of every fla kernel for each new
# (dtype, shape) (2026-12-02: the mamba2 block's forward + backward did not finish in 170 s). Triton writes each
# result as a small `<kernel>.autotune.json` in its cache, keyed by Triton's version, the GPU architecture, the
# kernel source and the tuning key, so it is valid on any machine with the same image (sm_90: H100 and H200).
# Every call starts from the results collected so far (dev/autotune, committed: a few KB; plus .stage/autotune when
# carried) and returns the union as $OUT/autotune.tar every 30 s and at the end; keep it:
# `tar -xf autotune.tar -C dev/autotune` and commit. (2026-12-02: in ~165 s a fresh H200 autotuned only GLA's forward
# kernels, 170 configs, each compiled; with their results restored it compiles one config per kernel.)
#
# Usage (in the repository root on the device; steps run in order):
#   bash dev/gpu_session.sh fla generate:300 prefill:300          # checks: carry .stage/fla (+ .stage/autotune)
#   (other check steps: tests:S, blocks:S [BLOCKS=a,b], kernels:S, warmup:S, convstep:S, convprefill:S, teacher_eval:S, dist:S
#    (S seconds for each of its three runs); S = seconds)
#   bash dev/gpu_session.sh setup recipe:540                      # after the staging calls (.stage/c1..c5, c1b, c3b, c4b, c8, c9)
#   RECIPE=smollm2-135m-gpu-final bash dev/gpu_session.sh setup recipe:560   # the final hybrid on the committed search
#   bash dev/gpu_session.sh setup trainbench:100 && RECIPE=... bash dev/gpu_session.sh recipe:400   # issue 16 first
# Results come back as $OUT/run.tar (the run's small outputs: unpack into results/...) and $OUT/autotune.tar.
set -uo pipefail
export PYTHONPATH=/root/site:$PWD PYTHONUNBUFFERED=1 JETNAS_CACHE=/root/jc
TRITON_CACHE=${TRITON_CACHE_DIR:-$HOME/.triton/cache}

TILELANG_CACHE=${TILELANG_CACHE_DIR:-$HOME/.tilelang/cache}

harvest_autotune() {
  [ -n "${OUT:-}" ] || return 0
  (cd "$TRITON_CACHE" 2>/dev/null && find . -name "*.autotune.json" | tar -cf "$OUT/autotune.tar.tmp" -T - \
     && mv "$OUT/autotune.tar.tmp" "$OUT/autotune.tar") 2>/dev/null
}

# TileLang's compiled kernels (fla's Hopper backward of the gated delta rule): 44-49 s per new GDN shape on a fresh
# machine (2026-12-02). Its cache is keyed by kernel source and target, so a later machine of the same image can
# reuse it: it comes back as $OUT/tilelang.tar (when under $OUT's 16 MiB per file); unpack it into .stage/tilelang
# and carry that folder.
harvest_tilelang() {
  [ -n "${OUT:-}" ] && [ -d "$TILELANG_CACHE" ] || return 0
  (cd "$TILELANG_CACHE" && tar -cf "$OUT/tilelang.tar.tmp" . && mv "$OUT/tilelang.tar.tmp" "$OUT/tilelang.tar") 2>/dev/null
  [ -f "$OUT/tilelang.tar" ] && echo "tilelang cache: $(du -h "$OUT/tilelang.tar" | cut -f1) in \$OUT/tilelang.tar"
}

restore_autotune() {
  mkdir -p "$TRITON_CACHE"
  for d in dev/autotune .stage/autotune; do
    [ -d $d ] && cp -rn $d/. "$TRITON_CACHE"/ 2>/dev/null
  done
  echo "autotune results restored: $(find "$TRITON_CACHE" -name '*.autotune.json' | wc -l)"
  if [ -d .stage/tilelang ]; then
    mkdir -p "$TILELANG_CACHE" && cp -rn .stage/tilelang/. "$TILELANG_CACHE"/ 2>/dev/null
    echo "tilelang kernels restored: $(find "$TILELANG_CACHE" -name '*.so' | wc -l)"
  fi
  (while sleep 30; do harvest_autotune; done) &
  HARVESTER=$!
  trap 'kill $HARVESTER 2>/dev/null; harvest_autotune; harvest_tilelang' EXIT
}

fla_only() {  # the engine, kernel and generate checks need fla and nothing else staged
  python3 -m pip install -q --no-index --no-deps --no-compile --target /root/site .stage/fla/*.whl 2>&1 | tail -1
}
GGUF=/root/jc/teachers/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf
# the recipe cut to fit 30 device-minutes: 2026-12-02 on an H200 three calls (26 min, compilation included) got
# through stage 2 and 3 of the evaluation's 7 tasks (results/h200_postnas_smollm2_135m)
RECIPE_SETS=(--set stages.supernet.steps=300 --set stages.supernet.eval_every=100
             --set stages.placement.beam_width=2 --set stages.placement.rows=12 --set stages.placement.lm_tokens=8192
             --set stages.placement.retrieval_length=1024
             --set stages.blocks.steps=100 --set stages.blocks.rows=16 --set stages.blocks.lm_tokens=8192
             --set stages.hardware.steps=60 --set stages.hardware.max_candidates=4 --set stages.hardware.rows=16
             --set stages.stage1.steps=400 --set stages.stage1.eval_every=200
             --set stages.stage2.steps=150 --set stages.stage2.eval_every=150)

setup() {
  mkdir -p /root/site "$(dirname $GGUF)" ../shared/data
  if [ ! -f "$GGUF" ]; then
    cat /root/stage/gguf.part0 /root/stage/gguf.part1 /root/stage/gguf.part2 /root/stage/gguf.part3 > "$GGUF"
    echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $GGUF" | sha256sum -c - || exit 3
    wheels  # a wheel staged in halves (tilelang: c1 + c1b) joined, then every staged wheel installed
  fi
  cp -r /root/stage/bench /root/stage/corpus ../shared/data/
  # teacher-sampled text from an earlier machine (gendata; staged as /root/stage/gen): the data stage finds it in
  # the cache by name (teacher, sampler, device type, seed, batch, length, size) instead of sampling for ~6 minutes
  if [ -d /root/stage/gen ]; then
    mkdir -p /root/jc/data && cp -n /root/stage/gen/* /root/jc/data/ && echo "cached teacher text: $(ls /root/stage/gen | head -1)"
  fi
}

# `lite`: the kernel and throughput measurements (prefillbench, supernetbench, swabench, gputests of the ops) in the
# same call that carries their files, no staging calls first (2026-12-07: two machines were taken back mid-staging,
# ~320 s of device time lost before any measurement). Carry .stage/k1 (~19 MB: fla, transformers, gguf and pytest
# wheels, the tokenizer in prof/tok, val.bin; dev/stage_wheels.sh) and, for supernetbench, .carry/old. No teacher
# weights and no TileLang: nothing that trains GDN or needs the real teacher.
lite() {
  mkdir -p /root/site /root/stage ../shared/data/corpus
  python3 -m pip install -q --no-index --no-deps --no-compile --target /root/site .stage/k1/*.whl 2>&1 | tail -2
  cp .stage/k1/val.bin ../shared/data/corpus/ && rm -rf /root/stage/prof && cp -r .stage/k1/prof /root/stage/
}

# `wheels`: the staged wheels alone (no teacher GGUF, which `setup` requires): the halves joined, everything in
# /root/stage/*.whl installed. With `lite` (carry .stage/k1), after staging c1, c1b, c3 and c8 (TileLang and its
# dependencies), the GDN stage-1 bench runs without the teacher's 98 MB GGUF: `lite wheels stage1bench:75`
wheels() {
  mkdir -p /root/site
  for part in /root/stage/*.whl.part0; do
    [ -f "$part" ] && cat "${part%.part0}".part* > "${part%.part0}" && rm "${part%.part0}".part*
  done
  python3 -m pip install -q --no-index --no-deps --no-compile --target /root/site /root/stage/*.whl 2>&1 | tail -2
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
  # (at its limit `timeout` sends SIGTERM: a training stage finishes its step, saves it and exits, 2026-12-07;
  # before, the steps since the last save_every checkpoint ran again in the next call)
  # A run split over sessions (machines): RUN_FROM=<a committed copy of an earlier call's $OUT/run> puts its
  # pipeline.json and small outputs back, so the finished stages (whose later consumers need only those files:
  # placement, blocks, hardware results) are reused; only stage1 -> stage2 must run within one machine.
  if [ -n "${RUN_FROM:-}" ] && [ -d "$RUN_FROM" ]; then
    mkdir -p /root/run && cp -rn "$RUN_FROM"/. /root/run/
  fi
  # 4 autotuning configs per kernel: every block type of the block selection would otherwise cost minutes of
  # compilation before its first step; the throughput columns are then "lightly tuned" (say so in the results)
  # RECIPE=smollm2-135m-gpu-final: stage 1 -> bench on the committed search's placement (issue 19, item 4)
  # EXTRA_SETS: more `--set key=value` words for any recipe, e.g. another placement for the final recipe:
  #   EXTRA_SETS="--set stages.stage1.layer_types=gdn*7,attn,gdn*9,swa,attn,gdn,swa,gdn*2,attn,gdn*6"
  # (read into an array without globbing: `gdn*7` must not match file names)
  # A SIGTERM that comes during a stage's final evaluation and save waits for them (24 s on 2026-12-08), and the
  # step's own start and the packing come on top: recipe:585 ran into the tool's 600 s limit. 560 is the most to ask.
  [ "$1" -gt 560 ] && echo "note: recipe:$1 may run past the tool's 600 s limit (a stage's last evaluation and save finish first): ask 560 at most"
  local name=${RECIPE:-smollm2-135m-gpu} sets=() extra=()
  [ "$name" = smollm2-135m-gpu ] && sets=("${RECIPE_SETS[@]}")
  read -ra extra <<< "${EXTRA_SETS:-}"
  sets+=("${extra[@]}")
  timeout "$1" python3 -m jetnas --autotune-configs 4 run "$name" --out-dir /root/run "${sets[@]}" 2>&1 \
    | tr "\r" "\n" | grep -v -E "Warn|it/s\]|s/it\]|it/s,|s/it,|row/s" | tail -40
  # one tar: $OUT brings back at most 8 files, two folders deep (2026-12-02: a tree of them lost most files).
  # RUN_TAR names it: placements trained one after another into the same /root/run (the recall data and the
  # teacher's evaluation are then reused; each retrained stage moves its previous run to <stage>/old-runs/, left
  # out of the tar), e.g. RUN_TAR=run_uniform EXTRA_SETS="--set stages.stage1.layer_types=..."
  (cd /root/run && find . \( -name "*.md" -o -name "*.json" -o -name "*.png" -o -name "*.jsonl" \) \
     ! -name "tokenizer*.json" | grep -v -e checkpoint -e old-runs | tar -cf "$OUT/${RUN_TAR:-run}.tar" -T -)
  # GEN_BACK=1: the teacher-sampled text the data stage made comes back (gen_back), so a run cut off before stage 2
  # ends need not sample it again on the next machine
  [ -n "${GEN_BACK:-}" ] && gen_back
}

# The teacher-sampled text in this machine's jetnas cache (~20 MB for 10M tokens) back in 15 MB parts with its
# header file: `cat gen.part* > .stage/gen/<cache name>` and `cp gen.json .stage/gen/<cache name>.json` (the name
# sha256sum prints), then stage .stage/gen as /root/stage/gen, which `setup` puts into the next machine's cache.
gen_back() {
  local f
  f=$(ls /root/jc/data/generated-*.bin 2>/dev/null | head -1)
  [ -n "$f" ] || { echo "gen_back: no teacher text in /root/jc/data"; return 0; }
  sha256sum "$f" && cp "$f.json" "$OUT/gen.json" && (cd "$(dirname "$f")" && split -b 15M -d "$(basename "$f")" "$OUT/gen.part")
}

# The trained model back to this machine for CPU analysis (layer ablations, per-row readings), which would otherwise
# spend device time: WEIGHTS_FROM (default /root/run/stage2/model) cast to bf16 (what the evaluation runs; 270 MB for
# the SmolLM2 hybrid) and split into 15 MiB parts, returned 7 a call (a call brings back at most 8 files, one of
# them autotune.tar):
# `weightsback:0` makes the parts and returns parts 0-6, `weightsback:1` parts 7-13, and so on; the output names the
# part count and the whole file's sha256. Here: `cat part.* > model.safetensors`, check the sha256, and put it beside
# the run's committed config.json (dev/LOG.md, 2026-12-07).
weights_back() {
  local src=${WEIGHTS_FROM:-/root/run/stage2/model} dir=/root/wback
  if [ ! -f $dir/model.safetensors ]; then
    mkdir -p $dir && python3 - "$src" "$dir/model.safetensors" <<'PY' || return 1
import glob, sys
import torch
from safetensors.torch import load_file, save_file
src, dst = sys.argv[1:]
state = {}
for f in sorted(glob.glob(src + "/*.safetensors")):
    state.update(load_file(f))
save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}, dst,
          metadata={"format": "pt"})
print(f"{len(state)} tensors, {sum(v.numel() for v in state.values()):,} values")
PY
    (cd $dir && split -b 15M -d -a 2 model.safetensors part.)
  fi
  echo "weights: $(ls $dir/part.* | wc -l) parts; $(cd $dir && sha256sum model.safetensors)"
  ls $dir/part.* | sed -n "$(( $1 * 7 + 1 )),$(( $1 * 7 + 7 ))p" | xargs -r -I{} cp {} "$OUT"/
}

dist() {  # issue 8 on one GPU: the super-network trainer plain, under torchrun with DDP, and with FSDP2 (same seed)
  for mode in plain ddp fsdp; do
    launch="python3 -m jetnas --autotune-configs 4"
    [ $mode != plain ] && launch="python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m jetnas --autotune-configs 4"
    timeout "$1" $launch supernet --teacher smollm2-135m --data ../shared/data/corpus/train.bin \
      --steps 30 --batch-size 16 --seq-len 512 --out-dir /root/dist_$mode \
      $([ $mode != plain ] && echo --distributed $mode) 2>&1 | grep -v Warn | tail -2
    cp /root/dist_$mode/log.jsonl $OUT/dist_$mode.jsonl 2>/dev/null
  done
}

restore_autotune
for step in "$@"; do
  case $step in
    setup) setup ;;
    wheels) wheels ;;
    lite) lite ;;
    fla) fla_only ;;
    # fp32 crashed once in fla's chunk_gla_fwd_kernel_o autotuning (misaligned address, 2026-12-02): GLA and the
    # model of every type run last, each configuration on its own
    generate:*) timeout "${step#*:}" python3 benchmarks/gpu_generate_check.py --autotune-configs 4 --dtypes bfloat16,float32 --per-type \
                  --out $OUT/generate_check.json 2>&1 | grep -v Warn | tail -20 ;;
    tests:*) timeout "${step#*:}" python3 -m pytest -q -p no:cacheprovider tests/ops/test_decode_ops.py tests/ops/test_fused.py \
               tests/ops/test_triton_dynamic_conv.py 2>&1 | tail -8 ;;
    # the static short convs' Triton kernel (on by default, never yet run on a GPU) against F.conv1d, in the prefill
    # of the final SmolLM2-135M hybrid's architecture (random weights): its default is jetnas.ops.backend.Backend's
    # static_conv, to turn off if it loses
    convprefill:*) timeout "${step#*:}" python3 benchmarks/prefill_profile.py --autotune-configs 4 \
                     --model results/h200_postnas_smollm2_135m/stage2/model --context 32768 --chunks 8192,32768 \
                     --profile-chunk 32768 --out $OUT/prefill_static_conv.json 2>&1 | grep -v Warn | grep -vE "^ +[0-9.]+ ms" | tail -13 ;;
    blocks:*) timeout "${step#*:}" python3 benchmarks/gpu_kernel_check.py --autotune-configs 4 --sections blocks \
                --blocks ${BLOCKS:-deltanet,mamba2} --out $OUT/kernel_check_blocks.json 2>&1 | grep -v Warn | tail -12 ;;
    convstep:*) timeout "${step#*:}" python3 benchmarks/decode_step_bench.py --out $OUT/decode_step.json 2>&1 \
                  | grep -v Warn | tail -9 ;;
    kernels:*) timeout "${step#*:}" python3 benchmarks/gpu_kernel_check.py --autotune-configs 4 --sections ops,blocks \
                 --out $OUT/kernel_check.json 2>&1 | grep -v Warn | tail -20 ;;
    warmup:*) timeout "${step#*:}" python3 benchmarks/autotune_warmup.py 2>&1 | grep -v Warn | tail -8 ;;
    # issue 16's prefill targets (benchmarks/prefill_bench.py): PB_SECTIONS=smollm2,jet2b,check (default, in that order) or long
    # PB_AFFINE=bf16,tf32: also the rows with the affine-form GDN state pass (Backend.affine_state_pass), checked
    prefillbench:*) timeout "${step#*:}" python3 benchmarks/prefill_bench.py --autotune-configs 4 \
                      --sections "${PB_SECTIONS:=smollm2,jet2b,check}" --out "$OUT/prefill_bench_${PB_SECTIONS//,/_}.json" \
                      ${PB_AFFINE:+--affine-state-pass $PB_AFFINE} 2>&1 | grep -v Warn | tail -30 ;;
    # the affine-form GDN state pass against fla's: the whole op checked and timed, the pass alone at each launch
    affinepass:*) timeout "${step#*:}" python3 benchmarks/gdn_segment_pass_bench.py --segments "" \
                    --affine "${AFFINE:-bf16,tf32}" --autotune-configs 4 --out $OUT/gdn_affine_pass.json \
                    2>&1 | grep -v Warn | tail -40 ;;
    # issue 16's training step and small-model prefill in one step (2026-12-06: 150 s on a warm H100 with the recipe's
    # kernels compiled): the stage-1 step whole and in two micro-batches with a profile, the SmolLM2 prefill at 8K and
    # 32K with the 8K profile. After setup; the tokenizer comes in .stage/c5/prof/tok (dev/stage_wheels.sh)
    # GRAPH=1: each stage-1 run times the eager step and then the step captured in a CUDA graph, in one process
    # (train_bench.py --cuda-graph; read stage1-graph.speedup_vs_eager and cuda_graph.{captured, fallback})
    trainbench:*) lines=1; [ -n "${GRAPH:-}" ] && lines=4
                  # TB_MB= (empty) skips the two-micro-batch half when device time is short; SEGMENTS=4,8 adds the
                  # hybrid's prefill rows with the GDN state pass in segments (Backend.segment_state_pass), checked
                  for mb in "" ${TB_MB-16}; do
                    timeout "${step#*:}" python3 benchmarks/train_bench.py --teacher random \
                      --tokenizer-from /root/stage/prof/tok --data ../shared/data/corpus/val.bin --linear gdn \
                      --autotune-configs 4 --modes stage1 --steps 20 --warmup 5 --label "new${mb:+_mb$mb}" \
                      ${GRAPH:+--cuda-graph} --profile-steps 2 ${mb:+--micro-batch-size $mb} \
                      --out "$OUT/train_stage1${mb:+_mb$mb}.json" 2>&1 | grep -v Warn | tail -n $lines
                  done
                  timeout "${step#*:}" python3 benchmarks/prefill_bench.py --out $OUT/prefill_smollm2.json \
                    --sections smollm2 --smollm2-contexts 8192,32768 --autotune-configs 4 \
                    ${SEGMENTS:+--segment-state-pass $SEGMENTS} \
                    --profile smollm2-hybrid@8192:static,smollm2-teacher@8192:static 2>&1 | grep -v Warn | tail -8 ;;
    # fla's GDN state pass under every launch config, BV 16 included (benchmarks/gdn_state_pass_bench.py)
    statepass:*) timeout "${step#*:}" python3 benchmarks/gdn_state_pass_bench.py --out $OUT/gdn_state_pass.json \
                   2>&1 | grep -v Warn | tail -6 ;;
    segpass:*) timeout "${step#*:}" python3 benchmarks/gdn_segment_pass_bench.py --out $OUT/gdn_segment_pass.json \
                 --autotune-configs 4 2>&1 | grep -v Warn | tail -40 ;;
    prefill:*) timeout "${step#*:}" python3 benchmarks/prefill_profile.py --out $OUT/prefill.json \
                 --chunks 32768,65536 2>&1 | grep -v Warn | tail -20 ;;
    checks) checks ;;
    convfwd:*) timeout "${step#*:}" python3 benchmarks/short_conv_bench.py --fwd-sweep 1x8192x1728 \
                 --out $OUT/short_conv_fwd_sweep.json 2>&1 | grep -v Warn | tail -8 ;;
    # the sliding-window attention kernel (jetnas.ops.triton_attention) against SDPA's masked query blocks, checked
    # and timed at the SmolLM2 hybrid's and Jet-2B's shapes (benchmarks/swa_bench.py; --sweep: its tiles)
    swabench:*) timeout "${step#*:}" python3 benchmarks/swa_bench.py --out $OUT/swa_bench.json 2>&1 | grep -v Warn \
                  | tail -16 ;;
    gatednorm:*) timeout "${step#*:}" python3 benchmarks/gated_norm_tiles_bench.py --out $OUT/gated_norm_tiles.json \
                   2>&1 | grep -v Warn | tail -24 ;;
    # pytest on the GPU (pytest wheels ride in c8): tests that take CUDA when it is there, e.g. the weighted Triton
    # LM-head loss (tests/utils.DEVICE). GPUTESTS: the test files (default: the chunked loss, weighted and not)
    gputests:*) timeout "${step#*:}" python3 -m pytest -q -x -p no:cacheprovider \
                  ${GPUTESTS:-tests/ops/test_losses_token_weight.py tests/ops/test_losses.py} 2>&1 | tail -15 ;;
    # issue 16's super-network step, new vs old (bbfe8a2: carry .carry/old = `git archive bbfe8a2 jetnas`), each in its
    # own process with the same settings (the GDN stage-1 hybrid's teacher as the super-network's base, GLA paths)
    supernetbench:*) for label in new old; do
                       tree=$PWD; [ $label = old ] && tree=$PWD/.carry/old
                       PYTHONPATH=/root/site:$tree timeout "${step#*:}" python3 benchmarks/train_bench.py --teacher random \
                         --tokenizer-from /root/stage/prof/tok --data ../shared/data/corpus/val.bin --autotune-configs 4 \
                         --modes supernet --steps "${SN_STEPS:-40}" --warmup 5 --label $label --out "$OUT/train_supernet_$label.json" \
                         2>&1 | grep -v -i -E "warn|it/s\]$" | tail -n 3
                     done
                     python3 benchmarks/train_bench.py --compare "$OUT/train_supernet_old.json,$OUT/train_supernet_new.json" ;;
    # issue 16's stage-1 step, new (eager, then captured: --cuda-graph) vs old (bbfe8a2, eager: .carry/old), each in its
    # own process with the same settings, the GDN hybrid (TileLang's backward: after setup). S1_STEPS timed steps.
    stage1bench:*) for label in new old; do
                     tree=$PWD; [ $label = old ] && tree=$PWD/.carry/old
                     PYTHONPATH=/root/site:$tree timeout "${step#*:}" python3 benchmarks/train_bench.py --teacher random \
                       --tokenizer-from /root/stage/prof/tok --data ../shared/data/corpus/val.bin --linear gdn \
                       --autotune-configs 4 --modes stage1 --steps "${S1_STEPS:-40}" --warmup 5 --label $label \
                       $([ $label = new ] && echo --cuda-graph) --out "$OUT/train_stage1_$label.json" \
                       2>&1 | grep -v -i -E "warn|it/s\]$" | tail -n 3
                   done
                   python3 benchmarks/train_bench.py --compare "$OUT/train_stage1_old.json,$OUT/train_stage1_new.json" ;;
    # the teacher-sampled text of a `data: {generate: ...}` recipe, alone (after setup; GEN_TOKENS, default 10M), timed,
    # and back in parts (gen_back): in a later machine's jetnas cache that recipe's data stage takes it instead of
    # sampling again
    gendata:*) timeout "${step#*:}" python3 -c "
import sys, time
from jetnas.runner.training import generate_data
t = time.perf_counter()  # the teacher's loading included (seconds)
r = generate_data('smollm2-135m', int(sys.argv[1]), 0, '/root/gen/generated.bin', 'cuda')
print(f'generated {r.tokens:,} tokens in {time.perf_counter() - t:.1f} s')" "${GEN_TOKENS:-10000000}" 2>&1 \
                 | tr "\r" "\n" | grep -v Warn | tail -4
               gen_back ;;
    dist:*) dist "${step#*:}" ;;
    teacher_eval:*) teacher_eval "${step#*:}" ;;
    recipe:*) recipe "${step#*:}" ;;
    # issue 19's diagnostics of a trained model (DIAG_MODEL, default /root/run/stage2/model), back in $OUT/diagnose:
    # its KL to the teacher by position from a document's start (benchmarks/position_kl.py, 16 rows of 4,096; at
    # most 150 s of its own) and each layer's mixer knocked out on the development rows (benchmarks/layer_ablation.py,
    # its default tasks unless DIAG_TASKS; at most S seconds, no layer started in the last 40)
    diagnose:*) m=${DIAG_MODEL:-/root/run/stage2/model}
                timeout 150 python3 benchmarks/position_kl.py --autotune-configs 4 --student "$m" --rows 16 --length 4096 \
                  --out $OUT/diagnose 2>&1 | grep -v -i -E "warn|loading weights" | tail -14
                timeout "${step#*:}" python3 benchmarks/layer_ablation.py --autotune-configs 4 --model "$m" --batch-size 64 \
                  --max-seconds $(( ${step#*:} - 40 )) --out $OUT/diagnose ${DIAG_TASKS:+--tasks "$DIAG_TASKS"} \
                  2>&1 | grep -v -i -E "warn|loading weights|done \(" | tail -36 ;;
    # the position KL alone, on a document's opening (HellaSwag's regime: 128 rows of 512 tokens from document
    # starts of val.bin, of the 137 it has (the file's first token and every one after an EOS)), of DIAG_MODEL (default /root/run/stage1/model), in
    # $OUT/poskl${POSKL_TAG:-}: the A/B of rows at document starts (dev/LOG.md, 2026-12-07, sixteenth session)
    poskl:*) timeout "${step#*:}" python3 benchmarks/position_kl.py --autotune-configs 4 --student "${DIAG_MODEL:-/root/run/stage1/model}" \
               --rows 128 --length 512 --out $OUT/poskl${POSKL_TAG:-} 2>&1 | grep -v -i -E "warn|loading weights" | tail -14 ;;
    weightsback:*) weights_back "${step#*:}" ;;
    # a trained stage's model to a later machine, exactly (dev/carry_model.py): `modelback:N` packs MODEL_FROM
    # (default /root/run/stage1/model) as the tensors training changed (stage 1 of the SmolLM2 hybrid: 47.1M float32
    # values, 188 MB in 12 parts by arithmetic; not yet packed on a device) and returns parts 4N..4N+3 with manifest.json and modelfiles.tar (8 files with autotune and tilelang);
    # here `python dev/carry_model.py stage --from <the files>` makes .stage/m0, m1, ...; on the next machine, after
    # those staging calls and `setup`, `modelin` rebuilds it into MODEL_TO (default /root/run/stage1/model), before
    # the `recipe` step whose RUN_FROM holds the run's pipeline.json (the stage is then reused, not retrained)
    modelback:*) n=${step#*:}
               [ -f /root/mback/manifest.json ] || python3 dev/carry_model.py pack --model "${MODEL_FROM:-/root/run/stage1/model}" \
                 --out /root/mback 2>&1 | grep -v -i -E "warn|loading weights" | tail -3
               cp /root/mback/manifest.json /root/mback/modelfiles.tar "$OUT"/
               ls /root/mback/mparts/mpart.* | sed -n "$(( n * 4 + 1 )),$(( n * 4 + 4 ))p" | xargs -r -I{} cp {} "$OUT"/
               echo "model parts: $(ls /root/mback/mparts | wc -l); returned $(ls "$OUT" | grep -c mpart) this call" ;;
    modelin) python3 dev/carry_model.py unpack --parts /root/stage/mparts --out "${MODEL_TO:-/root/run/stage1/model}" \
               2>&1 | grep -v -i -E "warn|loading weights" | tail -3 ;;
  esac
done
