#!/usr/bin/env bash
# Everything we check and time on a GPU (an H100 for the numbers in docs/performance.md).
#   bash scripts/gpu_suite.sh [STEP]...        (no step: all of them, in this order)
# Steps (each writes STEP's logs and JSON files under $OUT, default ./gpu_out):
#   tests      GPU-only tests (tests/test_gpu_*.py)
#   tests_kernels  Triton kernel and VL correctness tests at GPU sizes
#   attention  paged-attention kernels vs the torch reference and FlashInfer  (performance.md: attention)
#   prefill_hopper  the Hopper (sm_90) prefill kernel: GPU test, prefill sweep next to the portable kernel and
#              FlashInfer, alternative tiles per case and a suggested default
#   w1         W1 throughput, no transformers run (quick re-check of the engine)
#   w2         W2 latency at batch 1 and 64
#   engine     the end-to-end rows exactly as docs/performance.md gives them: W1 with
#              --compare transformers, W2 batch 1 and 64, DeepSeek-V3 batch 32 x 8k decode with
#              --mla-decode gluon and its reference --mla-decode triton
#   w1moe      W1's workload on Qwen3-30B-A3B
#   moe        fused MoE at DeepSeek-V3 dims (gpu_check_moe.py --quick)
#   tune_moe   fused-MoE tile search at DeepSeek-V3 and Qwen3-30B-A3B dims (long)
#   mla        Triton MLA kernels vs the torch reference, FlashInfer MLA
#   mladecode  the Hopper Gluon MLA decode kernel: correctness, sweep vs FlashInfer
#   probe      where the Gluon MLA decode kernel's time goes (timelines, per-tile fit)
#   sm90       sm_90 build resources of the MLA decode kernels (registers, spills, shared memory)
#   fp8        block-scaled FP8 GEMMs and MoE, tiny FP8 engine
#   fp8kv      FP8 vs bf16 KV cache: decode at batch 64 x 8k and 32 x 32k, Qwen3-8B dims (8 layers),
#              DeepSeek-V3 dims (4 layers) and DeepSeek-V3.2-Exp dims (3 layers, 32 x 32k), dummy weights
#              (docs/fp8_kv.md)
#   dsv3       DeepSeek-V3 dims, 4 layers, batch 1 and 64 x 1k
#   dsa        DeepSeek-V3.2-Exp (sparse attention) vs DeepSeek-V3 decode, 3 layers, 32 x 32k and 64 x 64k
#              (synthetic contexts: decode only)
#   v4         DeepSeek-V4-Flash dims, 4 layers, decode at 32 x 64k (synthetic context)
#   mtp        MTP verify step vs plain decode step, DeepSeek-V3 dims, 4 layers, batch 1 and 32 x 1k, k = 1..3,
#              real and forced (0.6 / 0.8) acceptance
#   parallel   parallel engine vs single process (NCCL; one GPU: a one-rank NCCL world)
#   kvmig      KV migration between two processes: DLSlime (CUDA and host caches), CUDA IPC
#   vision     Qwen3-VL-8B dims (dummy weights): vision encoder image-token throughput, TTFT of a
#              one-image request with the encoder in the engine and as a separate encoder engine (EPD)
#   profile    GPU time per kernel of a W2 decode step (profile_kernels.py)
#   profile_prefill  W2's prefill (Qwen3-8B dims, 512 tokens) per iteration: wall time vs kernel time, top kernels
#   profile_dsa  GPU time per kernel of a DeepSeek-V3.2-Exp and a DeepSeek-V3 decode step, 3 layers, 32 x 32k
#   serve      W1's workload through `dlengine serve` + `dlengine bench serve` at rising request
#              rates, then W1 offline in the same call (the reference)
#   gdn        Gated DeltaNet: kernel tests (Triton vs torch reference vs fla-core), then W1's workload
#              and batch-1 / batch-64 decode on Qwen3.5-MoE dims, first 4 layers (3 DeltaNet + 1 full
#              attention), dummy bf16 weights; MBU counts the recurrent state read and written per step
# Extra options per step: TEST_ARGS, TEST_TIMEOUT_S (per test, default 120), SERVE_RATES, ATTN_ARGS, W1_ARGS, W2_ARGS, W1MOE_ARGS, MOE_ARGS, TUNE_TOKENS, MLA_ARGS,
# FP8_ARGS, DSV3_ARGS, DSA_ARGS, V4_ARGS, MTP_K, MTP_BATCHES, MTP_RATES, PARALLEL_ARGS, VISION_ARGS, GDN_ARGS. FlashInfer is used when its wheels are in .whl/
# (flashinfer-python + apache-tvm-ffi, installed with --no-deps); DLSlime when importable.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export DLENGINE_CACHE=${DLENGINE_CACHE:-/tmp/dlengine-cache}
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site/flashinfer ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
[ -d /tmp/site ] && export PYTHONPATH=$PYTHONPATH:/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"

run_tests() {  # the GPU-only tests (newest first), then the kernel and VL tests at GPU sizes
  # -v: each result lands in the log as it finishes; a test past TEST_TIMEOUT_S fails and the run goes on
  DLENGINE_TEST_TIMEOUT_S=${TEST_TIMEOUT_S:-120} python3 -m pytest -v -p no:cacheprovider --durations=15 tests/test_gpu_gdn.py tests/test_gpu_spec_gdn.py \
    tests/test_gpu_spec_graphs.py tests/test_gpu_fp8_kv_dsa.py tests/test_gpu_prefill_hopper.py tests/test_gpu_v4.py tests/test_gpu_kv_ipc.py tests/test_gpu_fp8_kv.py tests/test_gpu_engine.py tests/test_gpu_mla_engine.py \
    tests/test_gpu_mla_decode_kernel.py ${TEST_ARGS:-} 2>&1 | tee "$OUT/tests.log" | tail -40
}
run_tests_kernels() {
  DLENGINE_TEST_TIMEOUT_S=${TEST_TIMEOUT_S:-120} python3 -m pytest -q -p no:cacheprovider --durations=15 tests/test_triton_ops.py tests/test_triton_attention.py \
    tests/test_triton_mla.py tests/test_dsa_kernels.py tests/test_fp8_kv.py tests/test_v4_kernels.py \
    tests/test_correctness_qwen3_5_vl.py tests/test_video_qwen3_vl.py ${TEST_ARGS:-} 2>&1 | tee "$OUT/tests_kernels.log" | tail -40
}
run_attention() {
  python3 scripts/gpu_check_attention.py ${ATTN_ARGS:-} --json "$OUT/attention.json" 2>&1 | tee "$OUT/attention.log" | tail -60
}
run_prefill_hopper() {  # the Hopper prefill kernel: exactness, sweep vs the portable kernel and FlashInfer, tile search
  python3 -m pytest -q -p no:cacheprovider tests/test_gpu_prefill_hopper.py 2>&1 | tee "$OUT/prefill_hopper_tests.log" | tail -8
  python3 scripts/gpu_check_attention.py --sections prefill --hopper-configs --json "$OUT/prefill_hopper.json" 2>&1 \
    | tee "$OUT/prefill_hopper.log" | tail -60
}
run_w1() {  # nano-vllm shape: Qwen3-0.6B, 256 requests, input/output uniform in [100, 1024]
  python3 -m dlengine.cli bench throughput --model qwen3-0.6b --load-format dummy --dtype bfloat16 \
    --num-prompts 256 --input-len 562 --output-len 562 --range-ratio 0.822 --max-model-len 2048 \
    --no-progress ${W1_ARGS:-} --json "$OUT/w1.json" 2>&1 | tee "$OUT/w1.log" | tail -40
}
run_w2() {  # Qwen3-8B, batch 1 and 64, 512-token prompt, 256 output tokens
  for bsz in 1 64; do
    python3 -m dlengine.cli bench latency --model qwen3-8b --load-format dummy --dtype bfloat16 \
      --batch-size $bsz --input-len 512 --output-len 256 --max-model-len 1024 --no-progress ${W2_ARGS:-} \
      --json "$OUT/w2_b$bsz.json" 2>&1 | tee "$OUT/w2_b$bsz.log" | tail -30
  done
}
run_engine() {  # the end-to-end rows of docs/performance.md, with the commands it gives
  local w1="--model qwen3-0.6b --load-format dummy --dtype bfloat16 --num-prompts 256 --input-len 562 --output-len 562 --range-ratio 0.822 --max-model-len 2048"
  local w2="--model qwen3-8b --load-format dummy --dtype bfloat16 --input-len 512 --output-len 256 --max-model-len 1024"
  local dsv3="--model deepseek-v3 --load-format dummy --num-layers 4 --dtype bfloat16 --batch-size 32 --input-len 8192 --output-len 64 --max-model-len 8448"
  python3 -m dlengine.cli bench throughput $w1 --compare transformers --compare-num-prompts 32 \
    --no-progress --json "$OUT/engine_w1.json" 2>&1 | tee "$OUT/engine_w1.log" | tail -40
  for bsz in 1 64; do
    python3 -m dlengine.cli bench latency $w2 --batch-size $bsz \
      --no-progress --json "$OUT/engine_w2_b$bsz.json" 2>&1 | tee "$OUT/engine_w2_b$bsz.log" | tail -30
  done
  for k in gluon triton; do  # the Gluon kernel and its reference, one after the other in one call
    python3 -m dlengine.cli bench latency $dsv3 --mla-decode $k \
      --no-progress --json "$OUT/engine_dsv3_$k.json" 2>&1 | tee "$OUT/engine_dsv3_$k.log" | tail -30
  done
}
run_moe() {  # fused MoE at DeepSeek-V3 dims: correctness, CUDA graphs, timings vs copy BW and GEMM peak
  python3 scripts/gpu_check_moe.py ${MOE_ARGS:---quick} --json "$OUT/moe.json" 2>&1 | tee "$OUT/moe.log" | tail -30
}
run_w1moe() {  # W1's workload on Qwen3-30B-A3B (128 experts, top-8) with dummy weights
  python3 -m dlengine.cli bench throughput --model qwen3-30b-a3b --load-format dummy --dtype bfloat16 \
    --num-prompts 256 --input-len 562 --output-len 562 --range-ratio 0.822 --max-model-len 2048 \
    --no-progress ${W1MOE_ARGS:-} --json "$OUT/w1moe.json" 2>&1 | tee "$OUT/w1moe.log" | tail -40
}
run_tune_moe() {  # tile search for the fused MoE at DeepSeek-V3 and Qwen3-30B-A3B dims
  python3 scripts/tune_moe.py --tokens ${TUNE_TOKENS:-1,16,128,512,2048,4096} --json "$OUT/tune_moe_dsv3.json" 2>&1 \
    | tee "$OUT/tune_moe_dsv3.log" | tail -12
  python3 scripts/tune_moe.py --experts 128 --top-k 8 --hidden 2048 --inter 768 \
    --tokens ${TUNE_TOKENS:-1,16,128,512,2048,4096} --json "$OUT/tune_moe_q3moe.json" 2>&1 | tee "$OUT/tune_moe_q3moe.log" | tail -12
}
run_mla() {  # MLA decode/extend kernels at DeepSeek-V3 dims vs the torch reference, decode sweep vs copy BW
  python3 scripts/gpu_check_mla.py ${MLA_ARGS:-} 2>&1 | tee "$OUT/mla.log" | tail -60
}
run_mladecode() {  # the Hopper Gluon MLA decode kernel: correctness + speed vs copy BW and FlashInfer
  python3 scripts/bench_mla_decode.py 2>&1 | tee "$OUT/mla_decode.log" | tail -40
}
run_fp8() {  # block-scaled FP8 GEMMs at DeepSeek-V3 shapes; tiny FP8 engine on CUDA
  python3 scripts/gpu_check_fp8.py ${FP8_ARGS:-} 2>&1 | tee "$OUT/fp8.log" | tail -40
}
run_fp8kv() {  # FP8 vs bf16 KV cache, one after the other in one call: step time, tokens in the cache, MBU
  # decode only (--synthetic-context): with a real 64 x 8k prefill in 8k-token chunks the first requests
  # finish before the last one starts, so no decode step would run the whole batch
  local q8="--model qwen3-8b --load-format dummy --num-layers 8 --dtype bfloat16 --output-len 64 --synthetic-context --num-iters 2"
  local ds="--model deepseek-v3 --load-format dummy --num-layers 4 --dtype bfloat16 --output-len 64 --synthetic-context --num-iters 2"
  # sparse attention: FP8 latent, bf16 indexer keys; 3 layers = the dense-FFN ones, as run_dsa
  local dsa="--model deepseek-v3.2-exp --load-format dummy --num-layers 3 --dtype bfloat16 --output-len 64 --synthetic-context --num-iters 2"
  for kv in auto fp8_e4m3; do
    python3 -m dlengine.cli bench latency $q8 --batch-size 64 --input-len 8192 --max-model-len 8448 \
      --kv-cache-dtype $kv --no-progress --json "$OUT/fp8kv_qwen3_8b_b64x8k_$kv.json" 2>&1 \
      | tee "$OUT/fp8kv_qwen3_8b_b64x8k_$kv.log" | tail -25
    python3 -m dlengine.cli bench latency $q8 --batch-size 32 --input-len 32768 --max-model-len 33024 \
      --kv-cache-dtype $kv --no-progress --json "$OUT/fp8kv_qwen3_8b_b32x32k_$kv.json" 2>&1 \
      | tee "$OUT/fp8kv_qwen3_8b_b32x32k_$kv.log" | tail -25
    python3 -m dlengine.cli bench latency $ds --batch-size 64 --input-len 8192 --max-model-len 8448 \
      --kv-cache-dtype $kv --no-progress --json "$OUT/fp8kv_dsv3_b64x8k_$kv.json" 2>&1 \
      | tee "$OUT/fp8kv_dsv3_b64x8k_$kv.log" | tail -25
    python3 -m dlengine.cli bench latency $dsa --batch-size 32 --input-len 32768 --max-model-len 33024 \
      --kv-cache-dtype $kv --no-progress --json "$OUT/fp8kv_dsv32_b32x32k_$kv.json" 2>&1 \
      | tee "$OUT/fp8kv_dsv32_b32x32k_$kv.log" | tail -25
  done
}
run_dsv3() {  # DeepSeek-V3 dims, first 4 layers (3 dense + 1 MoE of 256 experts), dummy bf16 weights
  for bsz in 1 64; do
    python3 -m dlengine.cli bench latency --model deepseek-v3 --load-format dummy --num-layers 4 --dtype bfloat16 \
      --batch-size $bsz --input-len 1024 --output-len 64 --max-model-len 2048 --no-progress ${DSV3_ARGS:-} \
      --json "$OUT/dsv3_b$bsz.json" 2>&1 | tee "$OUT/dsv3_b$bsz.log" | tail -25
  done
}
run_dsa() {  # docs/dsa.md: decode step time and bytes read, sparse (V3.2-Exp) against dense (V3) at equal context
  # (--synthetic-context: the prompts' KV is not computed, so 64 x 64k contexts cost no prefill).
  # 3 layers = the dense-FFN layers only: with the first MoE layer (256 experts) its weights are most
  # of a step's bytes and hide the attention difference the rows are about
  for shape in "32 32768" "64 65536"; do
    set -- $shape
    for model in deepseek-v3.2-exp deepseek-v3; do
      python3 -m dlengine.cli bench latency --model $model --load-format dummy --num-layers ${DSA_LAYERS:-3} --dtype bfloat16 \
        --batch-size $1 --input-len $2 --output-len 32 --max-model-len $(( $2 + 64 )) --synthetic-context --num-iters 2 \
        --no-progress ${DSA_ARGS:-} --json "$OUT/dsa_${model}_b$1_ctx$2.json" 2>&1 | tee "$OUT/dsa_${model}_b$1_ctx$2.log" | tail -25
    done
  done
}
run_v4() {  # docs/deepseek_v4.md: DeepSeek-V4-Flash dims, 4 layers, decode at batch 32 x 64k (synthetic context)
  python3 -m dlengine.cli bench latency --model deepseek-v4-flash --load-format dummy --num-layers 4 --dtype bfloat16 \
    --block-size 128 --batch-size 32 --input-len 65536 --output-len 32 --max-model-len 65664 --synthetic-context \
    --num-iters 2 --no-progress ${V4_ARGS:-} --json "$OUT/v4_b32_ctx65536.json" 2>&1 | tee "$OUT/v4.log" | tail -25
}
run_mtp() {  # docs/speculative.md: MTP verify step vs plain decode step, DeepSeek-V3 dims, 4 layers, batch 1 and 32
  # x 1k: k = 1..3 at the acceptance of the run (dummy weights: near 0) and at forced rates 0.6 / 0.8 (labelled)
  local m="--model deepseek-v3 --load-format dummy --num-layers 4 --dtype bfloat16 --input-len 1024 --output-len 64 --max-model-len 2048 --num-iters 2"
  for bsz in ${MTP_BATCHES:-1 32}; do
    python3 -m dlengine.cli bench latency $m --batch-size $bsz --no-progress --json "$OUT/mtp_b${bsz}_off.json" 2>&1 \
      | tee "$OUT/mtp_b${bsz}_off.log" | tail -12
    for k in ${MTP_K:-1 2 3}; do
      for rate in ${MTP_RATES:-run 0.6 0.8}; do
        local f=""; [ $rate != run ] && f="--spec-forced-acceptance $rate"
        python3 -m dlengine.cli bench latency $m --batch-size $bsz --speculative mtp --num-speculative-tokens $k $f \
          --no-progress --json "$OUT/mtp_b${bsz}_k${k}_$rate.json" 2>&1 | tee "$OUT/mtp_b${bsz}_k${k}_$rate.log" | tail -16
      done
    done
  done
}
run_probe() {  # per-program timelines and the per-tile fit of the Gluon MLA decode kernel
  python3 scripts/probe_mla_decode.py 2>&1 | tee "$OUT/probe_mla_decode.log" | tail -40
}
run_sm90() {  # registers / spills / shared memory of the MLA decode kernels' sm_90 builds (no GPU needed)
  python3 scripts/sm90_resources.py 2>&1 | tee "$OUT/sm90_resources.log" | tail -10
}
run_kvmig() {  # KV migration over DLSlime TCP, Qwen3-8B cache layout: CUDA caches, then host caches
  python3 scripts/bench_kv_migration.py --device cuda --requests 20 --json "$OUT/kv_migration_cuda.json" 2>&1 \
    | tee "$OUT/kv_migration_cuda.log" | tail -25
  python3 scripts/bench_kv_migration.py --requests 12 --json "$OUT/kv_migration_host.json" 2>&1 \
    | tee "$OUT/kv_migration_host.log" | tail -25
  python3 scripts/bench_kv_migration.py --device cuda --backend cuda_ipc --requests 20 \
    --json "$OUT/kv_migration_cuda_ipc.json" 2>&1 | tee "$OUT/kv_migration_cuda_ipc.log" | tail -25
}
run_vision() {  # Qwen3-VL-8B dims: encoder throughput, one-image TTFT local vs separate encoder (bench_vision.py)
  python3 scripts/bench_vision.py ${VISION_ARGS:-} --json "$OUT/vision.json" 2>&1 | tee "$OUT/vision.log" | tail -12
}
run_serve() {  # W1's shape online: Poisson arrivals at rising rates, then every request at once
  local port=${SERVE_PORT:-8123}
  python3 -m dlengine.cli serve qwen3-0.6b --load-format dummy --dtype bfloat16 --max-model-len 2048 \
    --port $port > "$OUT/serve_server.log" 2>&1 &
  local pid=$!
  for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
    kill -0 $pid 2>/dev/null || { echo "the server exited:"; tail -5 "$OUT/serve_server.log"; return 1; }
    sleep 1
  done
  for rate in ${SERVE_RATES:-8 16 32 inf}; do
    python3 -m dlengine.cli bench serve --base-url "http://127.0.0.1:$port" --tokenizer qwen3-0.6b \
      --num-prompts 256 --input-len 562 --output-len 562 --range-ratio 0.822 --ignore-eos \
      --request-rate $rate --no-progress --json "$OUT/serve_rate_$rate.json" 2>&1 | tee "$OUT/serve_rate_$rate.log" | tail -26
  done
  curl -s "http://127.0.0.1:$port/metrics" > "$OUT/serve_metrics.txt"
  kill $pid; wait $pid 2>/dev/null
  run_w1
}
run_profile() {  # GPU time per kernel of a W2 (Qwen3-8B, batch 1) decode step
  python3 scripts/profile_kernels.py --model qwen3-8b --batch-size 1 --input-len 512 2>&1 | tee "$OUT/profile_kernels.log" | tail -30
}
run_profile_prefill() {  # W2's 512-token prefill per iteration: wall time against the kernels' device time
  python3 scripts/profile_prefill.py --json "$OUT/profile_prefill.json" 2>&1 | tee "$OUT/profile_prefill.log" | tail -25
}
run_profile_dsa() {  # where a sparse-attention decode step's GPU time goes, against the dense model's (32 x 32k)
  for model in deepseek-v3.2-exp deepseek-v3; do
    python3 scripts/profile_kernels.py --model $model --num-layers 3 --batch-size 32 --input-len 32768 --synthetic-context \
      2>&1 | tee "$OUT/profile_dsa_$model.log" | tail -30
  done
}
run_parallel() {  # parallel engine vs single-process on every visible GPU (NCCL); 1 GPU: a 1-rank NCCL world
  python3 scripts/gpu_check_parallel.py ${PARALLEL_ARGS:-} --json "$OUT/parallel.json" 2>&1 | tee "$OUT/parallel.log" | tail -40
}
run_gdn() {  # Gated DeltaNet kernels; Qwen3.5-MoE (qwen3.5-35b-a3b) dims, 4 layers, dummy bf16 weights
  python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_gdn.py 2>&1 | tee "$OUT/gdn_tests.log" | tail -15
  local m="--model qwen3.5-35b-a3b --load-format dummy --num-layers 4 --dtype bfloat16"
  python3 -m dlengine.cli bench throughput $m --num-prompts 256 --input-len 562 --output-len 562 --range-ratio 0.822 \
    --max-model-len 2048 --no-progress ${GDN_ARGS:-} --json "$OUT/gdn_w1.json" 2>&1 | tee "$OUT/gdn_w1.log" | tail -30
  for bsz in 1 64; do
    python3 -m dlengine.cli bench latency $m --batch-size $bsz --input-len 1024 --output-len 128 --max-model-len 2048 \
      --no-progress ${GDN_ARGS:-} --json "$OUT/gdn_b$bsz.json" 2>&1 | tee "$OUT/gdn_b$bsz.log" | tail -25
  done
}
ALL="tests tests_kernels attention prefill_hopper w1 w2 engine w1moe moe tune_moe mla mladecode probe sm90 fp8 fp8kv dsv3 dsa v4 mtp parallel kvmig vision profile profile_prefill profile_dsa serve gdn"
for s in ${*:-all}; do
  case $s in
    all) for t in $ALL; do echo "== $t"; "run_$t"; done ;;
    *) if [[ " $ALL " == *" $s "* ]]; then "run_$s"; else echo "unknown step $s (steps: $ALL all)"; fi ;;
  esac
done
