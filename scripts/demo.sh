#!/usr/bin/env bash
# The main job, end to end: the paper's type 2 diabetes experiment on a simulated cohort.
#
#   make demo                      (creates .venv, then runs this)
#   bash scripts/demo.sh OUT_DIR   (with the venv's ehr-prs on PATH)
#
# simulate -> tokenize -> pretrain EHR-only, EHR+PRS prefix, EHR+PRS cross-attention ->
# zero-shot T2D risk on the held-out split -> baselines -> evaluate, ending in OUT_DIR/report/report.md.
# To run it on your own data, replace step 1 with your MEDS folder and PRS table (see README).
# Sized for ~30 minutes on 2 CPU cores; DEMO_SUBJECTS, DEMO_STEPS, DEMO_SAMPLES scale it.
set -euo pipefail

OUT=${1:-demo_out}
SUBJECTS=${DEMO_SUBJECTS:-20000}
STEPS=${DEMO_STEPS:-700}
SAMPLES=${DEMO_SAMPLES:-4}
PRESET=${DEMO_PRESET:-small}
HORIZON=730
export TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
START=$(date +%s)
step() { printf '\n== [%4ds] %s\n' $(( $(date +%s) - START )) "$*"; }

step "1/6 simulate an All-of-Us-like cohort of $SUBJECTS subjects (30% held out, for tight CIs)"
ehr-prs simulate --out "$OUT/cohort" --subjects "$SUBJECTS" --seed 0 --split-fractions 0.6,0.1,0.3

step "2/6 tokenize (vocabulary and value bins from the train split, PRS standardised within ancestry)"
ehr-prs tokenize --meds "$OUT/cohort/meds" --prs "$OUT/cohort/prs.parquet" --out "$OUT/tok" --max-length 512

step "3/6 pretrain three models, $STEPS steps each (preset $PRESET)"
for fusion in none prefix cross_attention; do
  step "    pretrain prs_fusion=$fusion"
  ehr-prs pretrain --data "$OUT/tok" --output-dir "$OUT/models/$fusion" --preset "$PRESET" \
    --prs-fusion "$fusion" --max-steps "$STEPS" --batch-size 16 --max-seq-length 512 \
    --learning-rate 2e-3 --warmup-steps 50 --eval-steps "$STEPS" --save-steps "$STEPS" --save-total-limit 1 \
    --logging-steps 50 --max-eval-samples 512
done

step "4/6 zero-shot T2D risk within $HORIZON days on the held-out split (path estimator, K=$SAMPLES)"
mkdir -p "$OUT/predictions"
for fusion in none prefix cross_attention; do
  ehr-prs risk --model "$OUT/models/$fusion" --meds "$OUT/cohort/meds" --prs "$OUT/cohort/prs.parquet" \
    --labels "$OUT/cohort/labels/t2d.parquet" --codes 'ICD10CM/E11*' --horizon-days "$HORIZON" \
    --method path --samples "$SAMPLES" --split held_out --out "$OUT/predictions/t2d_$fusion.parquet"
done

step "5/6 baselines: PRS-only logistic regression, count-feature GBM with and without PRS"
for kind in prs-lr counts-gbm counts-gbm-prs; do
  ehr-prs baseline --kind "$kind" --meds "$OUT/cohort/meds" --prs "$OUT/cohort/prs.parquet" \
    --labels "$OUT/cohort/labels/t2d.parquet" --split held_out --threads 1 --out "$OUT/predictions/t2d_$kind.parquet"
done

step "6/6 evaluate against the EHR-only model, with the simulator's true risk as the ceiling"
# PRS alignment plot: the first score that carries T2D liability in the simulator.
T2D_PRS=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['traits']['t2d']['columns'][0])" \
  "$OUT/cohort/truth/prs_traits.json")
ehr-prs evaluate --out "$OUT/report" --reference "EHR-only" \
  --predictions "EHR-only=$OUT/predictions/t2d_none.parquet" \
                "EHR+PRS prefix=$OUT/predictions/t2d_prefix.parquet" \
                "EHR+PRS cross-attention=$OUT/predictions/t2d_cross_attention.parquet" \
                "PRS-only LR=$OUT/predictions/t2d_prs-lr.parquet" \
                "GBM counts=$OUT/predictions/t2d_counts-gbm.parquet" \
                "GBM counts+PRS=$OUT/predictions/t2d_counts-gbm-prs.parquet" \
  --truth "$OUT/cohort/truth/t2d.parquet" --prs "$OUT/cohort/prs.parquet" --prs-column "$T2D_PRS" \
  --meds "$OUT/cohort/meds"

step "done in $(( $(date +%s) - START )) s: $OUT/report/report.md"
sed -n '1,40p' "$OUT/report/report.md"
