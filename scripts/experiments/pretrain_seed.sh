#!/usr/bin/env bash
# How much do the demo's T2D numbers move with the pretraining run itself?
#
#   bash scripts/experiments/pretrain_seed.sh DEMO_OUT SEED OUT
#
# DEMO_OUT: a finished `make demo` folder (its cohort/ and tok/ are reused, and its
# predictions/t2d_none.parquet and t2d_logit_bias.parquet are the seed-0 rows). Repeats the demo's
# EHR-only pretraining (the same flags: small preset, 1,000 steps of 16 x 512 tokens) with
# `--seed SEED`, then its incidence refit, the logit-bias fit and the survival risk (K = 4, the same
# risk --seed as the demo) of both models, and evaluates the two runs side by side. Same data, same
# recipe, same sampling: what differs is the pretraining's initialisation and data order.
# About 45 minutes on the 2-core machine (pretraining 20-35 of it).
set -euo pipefail
DEMO=${1:?DEMO_OUT}; SEED=${2:?SEED}; OUT=${3:?OUT}
mkdir -p "$OUT/models" "$OUT/predictions"
export TOKENIZERS_PARALLELISM=false
REFIT="$OUT/models/none/incidence_t2d.safetensors"

ehr-prs pretrain --overwrite --data "$DEMO/tok" --output-dir "$OUT/models/none" --preset small --prs-fusion none \
  --max-steps 1000 --batch-size 16 --max-seq-length 512 --learning-rate 2e-3 --warmup-steps 50 \
  --eval-steps 1000 --save-steps 1000 --save-total-limit 1 --logging-steps 100 --max-eval-samples 512 --seed "$SEED"

risk() {  # risk MODEL
  ehr-prs risk --overwrite --model "$OUT/models/$1" --meds "$DEMO/cohort/meds" --prs "$DEMO/cohort/prs.parquet" \
    --labels "$DEMO/cohort/labels/t2d.parquet" --codes 'ICD10CM/E11*' --horizon-days 730 \
    --method survival --samples 4 --split held_out --incidence-refit "$REFIT" --out "$OUT/predictions/t2d_$1.parquet"
}
# the demo's two chains, one thread each
( export OMP_NUM_THREADS=1
  ehr-prs incidence-refit --overwrite --model "$OUT/models/none" --data "$DEMO/tok" --codes 'ICD10CM/E11*' \
    --max-sequences 6000 --out "$REFIT"
  risk none ) > "$OUT/chain_none.log" 2>&1 &
none_pid=$!
( export OMP_NUM_THREADS=1
  ehr-prs fit-logit-bias --overwrite --model "$OUT/models/none" --data "$DEMO/tok" --output-dir "$OUT/models/logit_bias" \
    --batch-size 16 --max-seq-length 512 --max-eval-samples 512
  while [ ! -f "$REFIT" ]; do sleep 5; done
  risk logit_bias ) > "$OUT/chain_logit_bias.log" 2>&1 &
lb_pid=$!
wait "$none_pid"; wait "$lb_pid"

ehr-prs evaluate --overwrite --out "$OUT/report" --reference "EHR-only (pretraining seed $SEED)" \
  --predictions "EHR-only (pretraining seed $SEED)=$OUT/predictions/t2d_none.parquet" \
                "EHR+PRS logit bias (pretraining seed $SEED)=$OUT/predictions/t2d_logit_bias.parquet" \
                "EHR-only (demo, seed 0)=$DEMO/predictions/t2d_none.parquet" \
                "EHR+PRS logit bias (demo, seed 0)=$DEMO/predictions/t2d_logit_bias.parquet"
