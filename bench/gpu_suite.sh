#!/usr/bin/env bash
# The GPU measurements of the README, in one go on an NVIDIA machine with onnxruntime-gpu and torch:
#   bash bench/gpu_suite.sh chains OUT_DIR      FFN chains (ONNX Runtime CUDA + torch reference), ~3 min on an H200
#   bash bench/gpu_suite.sh decode OUT_DIR      8B-shaped Puzzle model, one decode step with KV cache, ~6 min
#   bash bench/gpu_suite.sh smollm2 OUT_DIR     SmolLM2-135M shapes: decode step, attention dropped, FFN runs fused
#   bash bench/gpu_suite.sh tp OUT_DIR          tensor-parallel chain vs fused FFN (bench.tp --quick, all GPUs)
# Models are written to ${WORK:-/tmp/ffn_suite}; results to OUT_DIR (default bench/results).
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
  smollm2)
    # SmolLM2-135M's shapes (random weights: latency does not depend on values), decode graph with KV cache, fp16
    "$py" -m exporters.export smollm2-shape --graph decode --dtype fp16 -o "$work/smollm2.onnx" | tail -n 3
    for n in 8 12; do
      first=$((30 - n))
      "$py" -m passes.drop_attention "$work/smollm2.onnx" -o "$work/smollm2_drop$n.onnx" --layers $first-29 | tail -n 2
      "$py" -m passes.fuse "$work/smollm2_drop$n.onnx" -o "$work/smollm2_drop${n}_fused.onnx" \
          --report "$out/smollm2_drop${n}_fuse_report.json" | sed -n 3,4p
      "$py" -m bench.latency "$work/smollm2_drop$n.onnx" "$work/smollm2_drop${n}_fused.onnx" --batch 1,8,32 --past 128 \
          --runs 50 --label "smollm2-drop$n: fusion" --name "latency_smollm2_drop${n}_fusion" --out "$out"
    done
    "$py" -m bench.latency "$work/smollm2.onnx" "$work/smollm2_drop12_fused.onnx" --batch 1,8,32 --past 128 \
        --runs 50 --label "smollm2: original vs drop12+fused" --name latency_smollm2_orig_vs_drop12_fused --out "$out"
    ;;
  tp)
    "$py" -m bench.tp --quick --out "$out"
    "$py" -m bench.tp --quick --emulate-tp 8 --out "$out"
    ;;
  *) echo "usage: bash bench/gpu_suite.sh chains|decode|smollm2|tp [OUT_DIR]" >&2; exit 2 ;;
esac
