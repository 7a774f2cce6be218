#!/usr/bin/env bash
# Issue 20's experiment: zero-shot T2D risk from the time-to-event head, EHR-only and EHR+PRS,
# against the count GBMs fitted on the labels, on a simulated cohort (the demo's by default).
#
#   bash scripts/experiments/tte_t2d.sh OUT [SUBJECTS] [SEED] [N_PRS] [VARIANT]
#     VARIANT: w1   (--tte-loss-weight 1)
#              w10  (--tte-loss-weight 10)
#              w10s (--tte-loss-weight 10 --tte-history-summary; the best of the three, default)
#   e.g. bash scripts/experiments/tte_t2d.sh runs/tte20k               # the demo's cohort (20,000, seed 0, 128 scores)
#        bash scripts/experiments/tte_t2d.sh runs/tte50k 50000 1       # the second cohort
#
# The two models train side by side, one thread each (about 16 minutes each on 2 cores); the report
# is OUT/report/report.md. The pretraining recipe is the demo's (small preset, 1,000 steps of 16 x 512
# tokens, learning rate 2e-3) plus the TTE head over every code family first seen in >= 20 train subjects.
set -euo pipefail
OUT=$1; SUBJECTS=${2:-20000}; SEED=${3:-0}; N_PRS=${4:-128}; VARIANT=${5:-w10s}
STEPS=${TTE_STEPS:-1000}; PRESET=${TTE_PRESET:-small}  # smaller for a smoke test
case "$VARIANT" in
  w1) TTE="--tte-loss-weight 1" ;;
  w10) TTE="--tte-loss-weight 10" ;;
  w10s) TTE="--tte-loss-weight 10 --tte-history-summary" ;;
  *) echo "unknown variant $VARIANT (w1, w10, w10s)" >&2; exit 2 ;;
esac
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1 POLARS_MAX_THREADS=1
C="$OUT/cohort"
ehr-prs simulate --overwrite --out "$C" --subjects "$SUBJECTS" --n-prs "$N_PRS" --seed "$SEED" --split-fractions 0.6,0.1,0.3
ehr-prs tokenize --overwrite --meds "$C/meds" --prs "$C/prs.parquet" --out "$OUT/tok" --max-length 512
pretrain() {  # pretrain FUSION
  ehr-prs pretrain --overwrite --data "$OUT/tok" --output-dir "$OUT/models/$1" --prs-fusion "$1" --preset "$PRESET" \
    --max-steps "$STEPS" --batch-size 16 --max-seq-length 512 --learning-rate 2e-3 --warmup-steps 50 --eval-steps 1000 \
    --save-steps 1000 --save-total-limit 1 --logging-steps 100 --max-eval-samples 512 --tte-families 1000 $TTE \
    > "$OUT/pretrain_$1.log" 2>&1
}
mkdir -p "$OUT/pred"
pretrain none & pretrain logit_bias & wait
hazard() {  # hazard MODEL NAME [--prs FILE]
  local model=$1 name=$2; shift 2
  ehr-prs risk --overwrite --model "$OUT/models/$model" --meds "$C/meds" "$@" --labels "$C/labels/t2d.parquet" \
    --codes 'ICD10CM/E11*' --horizon-days 730 --method hazard --horizons 365 1095 1826 --out "$OUT/pred/$name.parquet"
}
hazard none hazard_none
hazard logit_bias hazard_prs --prs "$C/prs.parquet"
hazard logit_bias hazard_prs_without_genotype  # the same model, every row as not genotyped
for kind in counts-gbm counts-gbm-prs; do
  ehr-prs baseline --overwrite --threads 1 --kind "$kind" --meds "$C/meds" --prs "$C/prs.parquet" \
    --labels "$C/labels/t2d.parquet" --out "$OUT/pred/$kind.parquet" &
done
wait
ehr-prs record-ceiling --overwrite --cohort "$C" --task t2d --out "$OUT/pred/oracle-lr.parquet"
ehr-prs evaluate --overwrite --out "$OUT/report" --reference "EHR-only hazard" \
  --predictions "EHR-only hazard=$OUT/pred/hazard_none.parquet" "EHR+PRS hazard=$OUT/pred/hazard_prs.parquet" \
                "EHR+PRS hazard, no genotype given=$OUT/pred/hazard_prs_without_genotype.parquet" \
                "GBM counts=$OUT/pred/counts-gbm.parquet" "GBM counts+PRS=$OUT/pred/counts-gbm-prs.parquet" \
                "Risk-factor LR (oracle)=$OUT/pred/oracle-lr.parquet" \
  --truth "$C/truth/t2d.parquet"
