#!/usr/bin/env bash
# The GPU measurements that README.md and docs/ quote, one step per invocation, on any CUDA machine.
# Needs the project installed (`make venv`, or `pip install -e .` beside a CUDA build of torch); no Spark or
# Java. Run from the repository root; each step writes into its folder under benchmarks/results/ (every JSON
# records its command and the machine), and device.txt there names the GPU, driver, torch and CUDA.
#
#   tests    (~3 min)  the CUDA tests (cuda-marked + the fused kernel's)  → serving_latency/pytest_cuda.txt
#   bench    (~3 min)  Table 2: decode latency (eager, fused, CUDA graph), fp16 caches and pool rows, and the
#                      LMDB fetch on one CPU core → decode_latency/decode_latency.{json,png}
#                      (BENCH_PREFILL=1 also times the prefill function → prefill/prefill_gpu.json)
#   bench32  (~3 min)  Table 2 in fp32 throughout → decode_latency/decode_latency_fp32.{json,png}
#   kernel   (~4 min)  the fused kernel at B 512, L 1000 (device vs mapped batch, the pool-gather floor)
#                      → fused_kernel/fused_kernel_floor.json; Table 2 at L 1000 over fp16 pool rows
#                      → decode_latency/decode_latency_fp16pools.{json,png}
#   profile  (~2 min)  Nsight Compute counters of the kernel and of its floor → fused_kernel/ncu_*_B512_L1000.txt
#   overlap  (~5 min)  the graph at L 1000 with the batch copy in 1–6 pieces beside the decode, round-robin
#                      → decode_latency/decode_latency_overlap_store_float{16,32}.json
#   zerocopy (~4 min)  copying vs zero-copy fetch per request → zero_copy/zero_copy{,_fp32}.{json,png}
#   launch   (~2 min)  the kernel's launch settings inside the graph → decode_latency/decode_latency_launch3_*.json
#   zoo      (< 8 min) every model (din, sim, eta, sdim, twin, hstu): full-KV vs CollectiveKV at B 1–512,
#                      L 50 and 1000, fp16 and fp32 → zoo_latency/zoo_latency_float{16,32}.json, .md, .png;
#                      per-kernel time (zoo_kernel_breakdown_float16.json), SDIM's launch settings
#                      (long_stage_launch_float16.json), copy pieces per model (zoo_overlap_float16.json)
#   resident (~4 min)  requests through the GPU-resident tier (and the replay's kernels: --profile):
#                      serving_latency/serving_latency.{json,png}, the scoring MLP alone: mlp_head/mlp_head{,_zoo}.json,
#                      zoo_latency/zoo_resident_float{16,32}.json
#   serve    (~4 min)  one `ckv serve` process under open-loop load: single requests, then Arrow batches and a
#                      hot swap → serve_load/serve_load_gpu_1worker{_single,}.json
#   eval [SECONDS]     `ckv eval --device cuda --workers 3` (the model-zoo evaluation), resumable: finished
#                      runs are kept under zoo_movielens/runs (EVAL_OUT: another folder, EVAL_ARGS: options)
#
# Usage: bash benchmarks/run_gpu.sh STEP
set -uo pipefail
step=${1:?usage: run_gpu.sh tests|bench|bench32|kernel|profile|overlap|zerocopy|launch|zoo|resident|serve|eval [seconds]}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
R=benchmarks/results
PY=${PYTHON:-python3}
mkdir -p $R
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee $R/device.txt

case $step in
tests)
    mkdir -p $R/serving_latency
    { echo "# bash benchmarks/run_gpu.sh tests"; sed 's/^/# /' $R/device.txt; } > $R/serving_latency/pytest_cuda.txt
    $PY -m pytest -q -p no:cacheprovider -o addopts="" tests/cachestore/decode/test_fused.py $(grep -rl "mark.cuda" tests --include="test_*.py") \
        >> $R/serving_latency/pytest_cuda.txt 2>&1; echo "pytest rc=$?" | tee -a $R/serving_latency/pytest_cuda.txt
    grep -E "^(FAILED|ERROR)" $R/serving_latency/pytest_cuda.txt | head -20; tail -3 $R/serving_latency/pytest_cuda.txt
    ;;
bench)
    [ -n "${BENCH_PREFILL:-}" ] && timeout 150 $PY benchmarks/prefill.py --gpu-only --users 50000 \
        --out $R/prefill/prefill_gpu.json 2>&1 | tail -20
    timeout 420 $PY benchmarks/decode_latency.py --out $R/decode_latency/decode_latency.json 2>&1 | tail -40
    ;;
bench32)
    timeout 420 $PY benchmarks/decode_latency.py --store-dtype float32 --no-fetch \
        --out $R/decode_latency/decode_latency_fp32.json 2>&1 | grep -E "^L=|failed|MISMATCH|rror|copy:"
    ;;
kernel)
    timeout 200 $PY benchmarks/fused_kernel.py --users 512 --lengths 1000 --blocks 32,64 --warps 2 \
        --heads 2,8 --splits auto --pool-dtypes float32,float16 --sources device,mapped \
        --out $R/fused_kernel/fused_kernel_floor.json 2>&1 | grep -E "^L=" | tail -24
    timeout 200 $PY benchmarks/decode_latency.py --pool-dtype float16 --lengths 1000 \
        --batch-sizes 1,64,256,512 --no-fetch --compare-overlap 1,2 \
        --out $R/decode_latency/decode_latency_fp16pools.json 2>&1 | grep -E "^L=|failed|MISMATCH|rror"
    ;;
profile)  # one launch per setting (--warmup 0 --repeats 1, plus the checking launch); clocks left alone
    sections="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
        --section LaunchStats --section SchedulerStats --section ComputeWorkloadAnalysis"
    timeout 280 ncu --clock-control none -k regex:_collective_attention $sections --section SourceCounters \
        $PY benchmarks/fused_kernel.py --users 512 --lengths 1000 --blocks 32 --warps 2 --heads 2,8 \
        --pool-dtypes float32,float16 --warmup 0 --repeats 1 --out /tmp/fk_profile.json \
        > $R/fused_kernel/ncu_fused_B512_L1000.txt 2>&1
    timeout 200 ncu --clock-control none -k regex:_gather_floor --section SpeedOfLight --section MemoryWorkloadAnalysis \
        $PY benchmarks/fused_kernel.py --users 512 --lengths 1000 --blocks 32 --warps 2 --heads 8 \
        --pool-dtypes float32,float16 --warmup 0 --repeats 1 --out /tmp/fk_profile2.json \
        > $R/fused_kernel/ncu_floor_B512_L1000.txt 2>&1
    grep -hE "Duration|L2 Cache Throughput" $R/fused_kernel/ncu_*_B512_L1000.txt
    ;;
overlap)
    for store in float16 float32; do
        timeout 200 $PY benchmarks/decode_latency.py --store-dtype $store --lengths 1000 --batch-sizes 64,256,512 \
            --no-fetch --repeats 200 --compare-overlap 1,2,3,4,6 \
            --out $R/decode_latency/decode_latency_overlap_store_$store.json 2>&1 | grep -E "^L=|failed|MISMATCH|rror"
    done
    ;;
zerocopy)
    timeout 240 $PY benchmarks/zero_copy.py --out $R/zero_copy/zero_copy.json 2>&1 | grep -E "^L=|rror"
    timeout 150 $PY benchmarks/zero_copy.py --store-dtype float32 --lengths 1000 \
        --out $R/zero_copy/zero_copy_fp32.json 2>&1 | grep -E "^L=|rror"
    ;;
launch)
    specs=";block_l=16,num_warps=1,heads_per_program=2,split_l=4;block_l=16,num_warps=1,heads_per_program=2,split_l=8"
    specs="$specs;block_l=16,num_warps=1,heads_per_program=2,split_l=16;block_l=8,num_warps=1,heads_per_program=2,split_l=8"
    specs="$specs;block_l=8,num_warps=1,heads_per_program=2,split_l=16;block_l=16,num_warps=1,heads_per_program=1,split_l=8"
    specs="$specs;block_l=32,num_warps=2,heads_per_program=2,split_l=2;block_l=32,num_warps=2,heads_per_program=2,split_l=4"
    specs="$specs;block_l=32,num_warps=2,heads_per_program=2,split_l=8"
    for pools in float16 float32; do
        timeout 280 $PY benchmarks/decode_latency.py --pool-dtype $pools --lengths 1000 --batch-sizes 64,256,512 \
            --no-fetch --repeats 80 --compare-launch "$specs" \
            --out $R/decode_latency/decode_latency_launch3_$pools.json 2>&1 | grep -E "launch settings|rror" | cut -c1-300
    done
    ;;
zoo)
    timeout 540 $PY benchmarks/zoo_latency.py 2>&1 | grep -vE "^ "
    timeout 120 $PY benchmarks/zoo_kernel_breakdown.py 2>&1 | tail -4
    timeout 120 $PY benchmarks/long_stage_launch.py 2>&1 | tail -9
    timeout 200 $PY benchmarks/zoo_overlap.py 2>&1 | tail -16
    ;;
resident)
    timeout 200 $PY benchmarks/serving_latency.py --repeats 300 --profile 2>&1 | tail -12
    timeout 60 $PY benchmarks/mlp_head.py 2>&1 | tail -4
    timeout 60 $PY benchmarks/mlp_head.py --parts 256,256,64 --rows 512 --out $R/mlp_head/mlp_head_zoo.json 2>&1 | tail -2
    for dtype in float16 float32; do
        timeout 150 $PY benchmarks/zoo_resident.py --dtype $dtype --out $R/zoo_latency/zoo_resident_$dtype.json \
            2>&1 | tail -8
    done
    ;;
serve)
    timeout 200 $PY benchmarks/serve_load.py --preset gpu --workers 1 --parts single --rates 4000,5000,5000,6000 \
        --out $R/serve_load/serve_load_gpu_1worker_single.json 2>&1 | tail -8
    timeout 250 $PY benchmarks/serve_load.py --preset gpu --workers 1 --parts batch,swap \
        --out $R/serve_load/serve_load_gpu_1worker.json 2>&1 | tail -8
    ;;
eval)
    budget=${2:-540}
    dir=${EVAL_OUT:-zoo_movielens}
    timeout "$budget" $PY -m collectivekv.jobs.cli eval --device cuda --workers 3 --out "$R/$dir" ${EVAL_ARGS:-} 2>&1 | tail -30
    rc=$?
    [ $rc -eq 0 ] && echo "eval complete" || echo "eval stopped (rc $rc): rerun the same step; finished runs are kept"
    ;;
*) echo "unknown step $step" >&2; exit 2 ;;
esac
