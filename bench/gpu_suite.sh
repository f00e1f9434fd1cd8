#!/usr/bin/env bash
# The GPU measurements of the README, in one go on an NVIDIA machine with onnxruntime-gpu and torch:
#   bash bench/gpu_suite.sh chains OUT_DIR      FFN chains (ONNX Runtime CUDA + torch reference), ~3 min on an H200
#   bash bench/gpu_suite.sh decode OUT_DIR      8B-shaped Puzzle model, one decode step with KV cache, ~8 min
# Models are written to ${WORK:-/tmp/ffn_suite}; results to bench/results/ and OUT_DIR.
set -euo pipefail
what=$1; out=${2:-bench/results}
work=${WORK:-/tmp/ffn_suite}; mkdir -p "$work" "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

chain() {  # name hidden width k
  local name=$1 d=$2 m=$3 k=$4
  "$py" -m bench.synthetic --mode ffn --preset tiny --layout "$(printf 'F%.0s' $(seq $k))" --hidden $d --ffn-width $m \
      --dtype fp16 -o "$work/$name.onnx"
  "$py" -m passes.fuse "$work/$name.onnx" -o "$work/$name.fused.onnx" --groups 0-$((k-1)) | tail -n 7
  "$py" -m passes.fuse "$work/$name.onnx" -o "$work/$name.merged.onnx" --groups 0-$((k-1)) --merge-gate-up > /dev/null
  "$py" -m bench.latency "$work/$name.onnx" "$work/$name.fused.onnx" --tokens 1,16,128,1024 --runs 100 \
      --label "$name" --name "latency_$name" --out "$out"
  "$py" -m bench.latency "$work/$name.onnx" "$work/$name.merged.onnx" --tokens 1,16,128,1024 --runs 100 \
      --label "$name-merged" --name "latency_${name}_merged" --out "$out"
}

case $what in
  chains)
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
    chain smollm2_chain8 576 1536 8
    chain llama8b_chain4 4096 14336 4
    "$py" -m bench.torch_chain --out "$out"
    ;;
  decode)
    "$py" -m bench.synthetic --preset llama8b-puzzle --mode decode -o "$work/llama8b_decode.onnx"
    "$py" -m passes.fuse "$work/llama8b_decode.onnx" -o "$work/llama8b_decode.fused.onnx" \
        --report "$out/llama8b_decode_fuse_report.json" | tail -n 9
    "$py" -m bench.latency "$work/llama8b_decode.onnx" "$work/llama8b_decode.fused.onnx" --batch 1,8,32 --past 128 \
        --runs 50 --label llama8b-puzzle-decode --name latency_llama8b_decode --out "$out"
    ;;
  *) echo "usage: bash bench/gpu_suite.sh chains|decode [OUT_DIR]" >&2; exit 2 ;;
esac
