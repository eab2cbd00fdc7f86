#!/usr/bin/env bash
# End-to-end demo on the bundled MovieLens data (CPU). Called by `make demo`; RUN dir as $1.
# Stages: data preparation → training (full + CollectiveKV) → nightly prefill (Spark) → LMDB store
# → verify → size report. Every figure printed comes from this run.
set -euo pipefail
RUN=${1:-runs/demo}
SEEDS=${SEEDS:-0}
EPOCHS=${EPOCHS:-3}
POOL=${POOL:-1000}
mkdir -p "$RUN"

echo "== 1/4 data preparation"
ckv data prepare --events data/movielens/ratings.csv --items data/movielens/movies.csv --out "$RUN/data" --overwrite

echo "== 2/4 training: full and collective, seeds $SEEDS, pool $POOL (the paper's 10,000 works too: slower on CPU)"
ckv experiment --data "$RUN/data" --out "$RUN/experiment" --overwrite --variants full,collective --seeds "$SEEDS" \
    --epochs "$EPOCHS" --pool-size "$POOL" --no-progress

FIRST_SEED=${SEEDS%%,*}
for MODE in collective full; do
  CKPT="$RUN/experiment/checkpoints/$MODE-seed$FIRST_SEED"
  echo "== 3/4 nightly prefill ($MODE) with spark-submit, local mode → $RUN/store_$MODE"
  LOG="$RUN/logs/prefill-$MODE.log"  # Spark's log (WARN) and any failure's trace: the terminal stays quiet
  mkdir -p "$RUN/logs"
  spark-submit --master "local[2]" --driver-memory 1g --conf spark.ui.showConsoleProgress=false \
      --driver-java-options "-Dlog4j2.configurationFile=pipeline/prefill/spark-log4j2.properties -Dckv.log.file=$LOG" \
      jobs/prefill.py --checkpoint "$CKPT" --histories "$RUN/data" --out "$RUN/store_$MODE" --log "$LOG"
  ckv store verify "$RUN/store_$MODE" --checkpoint "$CKPT" --histories "$RUN/data"
done
echo "== 4/4 size report (CR by formula and on disk)"
ckv report size "$RUN/store_collective" --baseline "$RUN/store_full"
echo "demo finished: results in $RUN"
