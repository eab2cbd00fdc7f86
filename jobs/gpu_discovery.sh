#!/usr/bin/env bash
# Spark's GPU discovery script for the prefill job's executors (spark.{worker,executor}.resource.gpu.discoveryScript):
# prints this machine's GPUs as Spark's resource JSON, e.g. {"name": "gpu", "addresses": ["0", "1"]}.
# The addresses are nvidia-smi's device indices, or the comma-separated list in CKV_GPU_ADDRESSES when it is set
# (to pin a subset; the tests use it to hand out addresses that are not CUDA devices). No GPU: an empty list.
set -euo pipefail
if [ -n "${CKV_GPU_ADDRESSES:-}" ]; then
    addrs=$CKV_GPU_ADDRESSES
else
    addrs=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | tr -d ' ' | paste -sd, - || true)
fi
list=""
IFS=',' read -ra parts <<< "$addrs"
for a in "${parts[@]}"; do
    [ -n "$a" ] && list="${list:+$list, }\"$a\""
done
printf '{"name": "gpu", "addresses": [%s]}\n' "$list"
