#!/usr/bin/env bash
# The GPU measurements that README.md and docs/ quote, one step per invocation.
# Needs torch with CUDA, numpy, pyarrow, pandas, safetensors, click, matplotlib, pytest, hypothesis; lmdb
# from site-packages or from a wheel in .whl/ (installed into /tmp/site on first use). No Spark, no Java.
#
#   step "tests" (~2 min):  the CUDA tests (cuda-marked + the fused kernel's) → pytest_cuda.txt
#   step "bench" (~3 min):  decode latency Table 2 (eager, fused, CUDA graph) at the store's default
#                           precision (fp16 caches, fp16 pool rows) and the LMDB fetch on the host's CPU
#                           → decode_latency.{json,png}; BENCH_PREFILL=1 also times the prefill function
#   step "bench32" (~3 min): Table 2 in fp32 throughout (fp32 caches, the model's pool rows exactly)
#                           → decode_latency_fp32.{json,png}
#   step "tune"  (~3 min):  the fused paths over fp16 pool rows; the kernel's launch settings with
#                           history splits at B 512 and 64 → fused_kernel_split_B{512,64}.json
#   step "kernel" (~4 min): the kernel at B 512 (device vs mapped batch; the pool-gather floor)
#                           → fused_kernel_floor.json, and Table 2 at L 1000 over fp16 pool rows
#   step "profile" (~2 min): hardware counters (ncu) of the kernel and of its pool-gather floor at B 512,
#                           L 1000 → ncu_fused.txt, ncu_floor.txt
#   step "overlap" (~5 min): the fused CUDA tests, then Table 2's graph at L 1000 B 64, 256, 512 with the
#                           batch copy split into 1, 2, 3, 4, 6 pieces beside the decode (GraphedDecoder
#                           overlap), timed round-robin in one process, fp16 and fp32 stores (SKIP_TESTS=1:
#                           no tests) → decode_latency_overlap_store_float{16,32}.json
#   step "zerocopy" (~4 min): copying vs zero-copy fetch per request (benchmarks/zero_copy.py): CPU fetch on one
#                           core, graph replay, the two together; fp16 store (L 50, 1000), fp32 store (L 1000)
#                           → zero_copy{,_fp32}.{json,png}
#   step "fp16"  (~2 min): Table 2's graph at L 1000 with fp16 pools (1 and 2 copy pieces)
#                           → decode_latency_fp16pools.{json,png}
#   step "launch" (~2 min): the kernel's launch settings timed inside Table 2's graph, round-robin
#                           (decode_latency.py --compare-launch), L 1000, B 64/256/512, fp16 and fp32 pools
#                           → decode_latency_launch3_float{16,32}.json
#   step "zoo"   (< 8 min): every model of the zoo (din, sim, eta, sdim, twin, hstu) at B 1/64/256/512, L 50
#                           and 1000, fp16 and fp32 stores: full-KV baseline (one pinned buffer, CUDA graph)
#                           vs CollectiveKV (GraphedDecoder) → zoo_latency/zoo_latency_float{16,32}.json,
#                           zoo_latency.{md,png}
#   step "eval"  (resumable, rerun until it prints "eval complete"): `ckv eval --device cuda --workers 3`,
#                           the MovieLens model-zoo evaluation; every finished run is kept under
#                           benchmarks/results/zoo_movielens/runs and skipped when the step is rerun
#
# Usage:
#   bash benchmarks/gpu_session.sh tests
#   bash benchmarks/gpu_session.sh bench
#   bash benchmarks/gpu_session.sh tune
#   bash benchmarks/gpu_session.sh eval [SECONDS]      (then: ckv eval --report-only)
#   EVAL_OUT=zoo_movielens_regularised EVAL_ARGS="--sections table1 --dropout 0.3 --balance-weight 0 \
#       --pool-size 2000 --epochs 8 --patience 2" bash benchmarks/gpu_session.sh eval 560
#                                                   (a second evaluation in its own folder)
# Results are written under benchmarks/results/; the step's main files (and device.txt: GPU, driver,
# torch and CUDA versions) are also copied to $OUT (default /tmp/ckv-gpu-out).
set -uo pipefail
step=${1:?usage: gpu_session.sh tests|bench|bench32|tune|kernel|profile|overlap|zerocopy|fp16|launch|zoo|eval [seconds]}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/ckv-gpu-out}
mkdir -p "$OUT" benchmarks/results
if ls .whl/*.whl >/dev/null 2>&1; then  # wheels in .whl/: installed once per machine (steps may run concurrently)
    [ -d /tmp/site/lmdb ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/device.txt"

case $step in
tests)
    python3 -m pytest -q -p no:cacheprovider tests/test_fused.py $(grep -l "mark.cuda" tests/test_*.py) \
        > "$OUT/pytest_cuda.txt" 2>&1; echo "pytest rc=$?" | tee -a "$OUT/pytest_cuda.txt"
    grep -E "^(FAILED|ERROR)" "$OUT/pytest_cuda.txt" | head -20
    tail -3 "$OUT/pytest_cuda.txt"
    ;;
bench)
    if [ -n "${BENCH_PREFILL:-}" ]; then
        timeout 150 python3 benchmarks/prefill.py --gpu-only --users 50000 \
            --out benchmarks/results/prefill_gpu.json 2>&1 | tail -20
    fi
    # Table 2 at the store's default precision: fp16 caches (full KV and user parts) and fp16 pool rows
    timeout 420 python3 benchmarks/decode_latency.py --out benchmarks/results/decode_latency.json \
        2>&1 | tail -40
    cp benchmarks/results/decode_latency.json benchmarks/results/decode_latency.png "$OUT"/ 2>/dev/null
    ;;
bench32)
    # Table 2 in fp32 throughout (the paper's precision): fp32 caches and the model's pool rows exactly
    timeout 420 python3 benchmarks/decode_latency.py --store-dtype float32 --no-fetch \
        --out benchmarks/results/decode_latency_fp32.json 2>&1 | grep -E "^L=|failed|MISMATCH|rror|copy:"
    cp benchmarks/results/decode_latency_fp32.json benchmarks/results/decode_latency_fp32.png "$OUT"/ 2>/dev/null
    [ -n "${BENCH_PREFILL:-}" ] && cp benchmarks/results/prefill_gpu.json "$OUT"/
    ;;
tune)
    # the same fused paths over fp16 pool rows (FusedConfig(pool_dtype="float16"): half the kernel's pool reads)
    timeout 100 python3 benchmarks/decode_latency.py --pool-dtype float16 --lengths 1000 \
        --batch-sizes 64,256,512 --no-fetch --out benchmarks/results/decode_latency_fp16pools.json 2>&1 | tail -12
    # the kernel's launch settings incl. history splits (auto = split_parts) at a large and a small batch
    for users in 512 64; do
        timeout 100 python3 benchmarks/fused_kernel.py --users $users --lengths 1000 --blocks 32,64 --warps 2 \
            --heads 2,8 --splits auto,1,4 --pool-dtypes float32,float16 \
            --out benchmarks/results/fused_kernel_split_B$users.json 2>&1 | grep "^L=" | tail -30
    done
    cp benchmarks/results/decode_latency_fp16pools.json benchmarks/results/decode_latency_fp16pools.png \
        benchmarks/results/fused_kernel_split_B*.json "$OUT"/ 2>/dev/null
    ;;
kernel)
    # the kernel alone at B 512, L 1000: launch settings, batch on the device or read from pinned host
    # memory over PCIe (mapped, zero-copy), and the pool-gather floor (a kernel doing only the pool reads)
    timeout 200 python3 benchmarks/fused_kernel.py --users 512 --lengths 1000 --blocks 32,64 --warps 2 \
        --heads 2,8 --splits auto --pool-dtypes float32,float16 --sources device,mapped \
        --out benchmarks/results/fused_kernel_floor.json 2>&1 | grep -E "^L=" | tail -24
    # Table 2 at L 1000 with fp16 pool rows (FusedConfig(pool_dtype="float16"))
    timeout 150 python3 benchmarks/decode_latency.py --pool-dtype float16 --lengths 1000 \
        --batch-sizes 1,64,256,512 --no-fetch --out benchmarks/results/decode_latency_fp16pools.json \
        2>&1 | grep -E "^L=|over_floor_B|failed|MISMATCH" | tail -12
    cp benchmarks/results/fused_kernel_floor.json benchmarks/results/decode_latency_fp16pools.json \
        benchmarks/results/decode_latency_fp16pools.png "$OUT"/
    ;;
profile)
    # one launch per setting (--warmup 0 --repeats 1, plus the checking launch); clocks left alone (METHOD.md)
    sections="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
        --section LaunchStats --section SchedulerStats --section ComputeWorkloadAnalysis"
    timeout 280 ncu --clock-control none -k regex:_collective_attention $sections --section SourceCounters \
        python3 benchmarks/fused_kernel.py --users 512 --lengths 1000 --blocks 32 --warps 2 --heads 2,8 \
        --pool-dtypes float32,float16 --warmup 0 --repeats 1 --out /tmp/fk_profile.json > "$OUT/ncu_fused.txt" 2>&1
    echo "ncu fused rc=$?"; grep -E "Duration|L2 Cache Throughput|Issue Slots Busy|Achieved Occupancy" "$OUT/ncu_fused.txt"
    timeout 200 ncu --clock-control none -k regex:_gather_floor --section SpeedOfLight --section MemoryWorkloadAnalysis \
        python3 benchmarks/fused_kernel.py --users 512 --lengths 1000 --blocks 32 --warps 2 --heads 8 \
        --pool-dtypes float32,float16 --warmup 0 --repeats 1 --out /tmp/fk_profile2.json > "$OUT/ncu_floor.txt" 2>&1
    echo "ncu floor rc=$?"; grep -E "Duration|L2 Cache Throughput" "$OUT/ncu_floor.txt"
    ;;
overlap)
    [ -n "${SKIP_TESTS:-}" ] || python3 -m pytest -q -p no:cacheprovider tests/test_fused.py tests/test_graphs.py \
        > "$OUT/pytest_overlap.txt" 2>&1
    echo "pytest rc=$?" | tee -a "$OUT/pytest_overlap.txt"; grep -E "^(FAILED|ERROR)" "$OUT/pytest_overlap.txt" | head
    tail -2 "$OUT/pytest_overlap.txt"
    for store in float16 float32; do  # every K in one process, timed round-robin; caches and pools at $store
        timeout 200 python3 benchmarks/decode_latency.py --store-dtype $store --lengths 1000 --batch-sizes 64,256,512 \
            --no-fetch --repeats 200 --compare-overlap 1,2,3,4,6 \
            --out benchmarks/results/decode_latency_overlap_store_$store.json 2>&1 | grep -E "^L=|failed|MISMATCH|rror"
    done
    cp benchmarks/results/decode_latency_overlap_store_*.json "$OUT"/
    ;;
zerocopy)
    # copying vs zero-copy fetch (cachestore/decode/mapped.py) per request: CPU fetch on one core, graph replay, both
    # together; fp16 store at L 50 and 1000, fp32 store at L 1000
    timeout 240 python3 benchmarks/zero_copy.py --out benchmarks/results/zero_copy.json 2>&1 | grep -E "^L=|rror"
    timeout 150 python3 benchmarks/zero_copy.py --store-dtype float32 --lengths 1000 \
        --out benchmarks/results/zero_copy_fp32.json 2>&1 | grep -E "^L=|rror"
    cp benchmarks/results/zero_copy.json benchmarks/results/zero_copy.png benchmarks/results/zero_copy_fp32.json \
        benchmarks/results/zero_copy_fp32.png "$OUT"/
    ;;
fp16)
    timeout 200 python3 benchmarks/decode_latency.py --pool-dtype float16 --lengths 1000 \
        --batch-sizes 1,64,256,512 --no-fetch --compare-overlap 1,2 \
        --out benchmarks/results/decode_latency_fp16pools.json 2>&1 | grep -E "^L=|failed|MISMATCH|rror"
    cp benchmarks/results/decode_latency_fp16pools.json benchmarks/results/decode_latency_fp16pools.png "$OUT"/
    ;;
launch)
    # the kernel's launch settings timed where they serve: inside Table 2's graph, round-robin, L 1000
    specs=";block_l=16,num_warps=1,heads_per_program=2,split_l=4;block_l=16,num_warps=1,heads_per_program=2,split_l=8"
    specs="$specs;block_l=16,num_warps=1,heads_per_program=2,split_l=16;block_l=8,num_warps=1,heads_per_program=2,split_l=8"
    specs="$specs;block_l=8,num_warps=1,heads_per_program=2,split_l=16;block_l=16,num_warps=1,heads_per_program=1,split_l=8"
    specs="$specs;block_l=32,num_warps=2,heads_per_program=2,split_l=2;block_l=32,num_warps=2,heads_per_program=2,split_l=4"
    specs="$specs;block_l=32,num_warps=2,heads_per_program=2,split_l=8"
    for pools in float16 float32; do
        timeout 280 python3 benchmarks/decode_latency.py --pool-dtype $pools --lengths 1000 --batch-sizes 64,256,512 \
            --no-fetch --repeats 80 --compare-launch "$specs" \
            --out benchmarks/results/decode_latency_launch3_$pools.json 2>&1 | grep -E "launch settings|rror" | cut -c1-300
    done
    cp benchmarks/results/decode_latency_launch3_*.json "$OUT"/
    ;;
zoo)
    timeout 540 python3 benchmarks/zoo_latency.py 2>&1 | tee "$OUT/zoo_latency.log" | grep -vE "^ "
    cp benchmarks/results/zoo_latency/* "$OUT"/ 2>/dev/null
    ;;
eval)
    budget=${2:-540}
    dir=${EVAL_OUT:-zoo_movielens}  # under benchmarks/results/
    # EVAL_ARGS: extra `ckv eval` options, e.g. EVAL_ARGS="--sections fig4,fig5,auto" to run the quick
    # SIM sweeps before the slow HSTU rows; finished runs are shared between invocations. Three HSTU runs
    # at once fit in an H100's memory with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True set by the
    # caller (use --workers 2 if they do not).
    timeout "$budget" python3 -m jobs.cli eval --device cuda --workers 3 --out "benchmarks/results/$dir" \
        ${EVAL_ARGS:-} 2>&1 | tail -30
    rc=$?
    [ $rc -eq 0 ] && echo "eval complete" || echo "eval stopped (rc $rc): rerun the same step; finished runs are kept"
    tar -C benchmarks/results -czf "$OUT/$dir.tgz" "$dir" 2>/dev/null
    ;;
*) echo "unknown step $step" >&2; exit 2 ;;
esac
