#!/usr/bin/env bash
# Everything we check and time on a GPU, in one call of the device tool (see docs/performance.md).
#   bash scripts/gpu_suite.sh [tests|attention|w1|w2|w1moe|tune_moe|mla|mladecode|fp8|dsv3|parallel|all]...
# Results land in $OUT (or ./gpu_out): logs and JSON files. FlashInfer is used when carried as
# wheels in .whl/ (flashinfer-python + apache-tvm-ffi, installed with --no-deps).
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

run_tests() {
  python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_engine.py tests/test_gpu_mla_engine.py tests/test_gpu_mla_decode_kernel.py tests/test_triton_ops.py \
    tests/test_triton_attention.py 2>&1 | tee "$OUT/tests.log" | tail -15
}
run_attention() {
  python3 scripts/gpu_check_attention.py ${ATTN_ARGS:-} --json "$OUT/attention.json" 2>&1 | tee "$OUT/attention.log" | tail -60
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
run_dsv3() {  # DeepSeek-V3 dims, first 4 layers (3 dense + 1 MoE of 256 experts), dummy bf16 weights
  for bsz in 1 64; do
    python3 -m dlengine.cli bench latency --model deepseek-v3 --load-format dummy --num-layers 4 --dtype bfloat16 \
      --batch-size $bsz --input-len 1024 --output-len 64 --max-model-len 2048 --no-progress ${DSV3_ARGS:-} \
      --json "$OUT/dsv3_b$bsz.json" 2>&1 | tee "$OUT/dsv3_b$bsz.log" | tail -25
  done
}
run_parallel() {  # parallel engine vs single-process on every visible GPU (NCCL); 1 GPU: a 1-rank NCCL world
  python3 scripts/gpu_check_parallel.py ${PARALLEL_ARGS:-} --json "$OUT/parallel.json" 2>&1 | tee "$OUT/parallel.log" | tail -40
}
steps=${*:-all}
for s in $steps; do
  case $s in
    tests) run_tests ;; attention) run_attention ;; w1) run_w1 ;; w2) run_w2 ;;
    w1moe) run_w1moe ;; tune_moe) run_tune_moe ;; mla) run_mla ;; mladecode) run_mladecode ;; fp8) run_fp8 ;; dsv3) run_dsv3 ;; parallel) run_parallel ;;
    all) run_tests; run_attention; run_w1; run_w2 ;;
    *) echo "unknown step $s" ;;
  esac
done
