#!/usr/bin/env bash
# The demo's patient pages and cohort genomic what-if, after scripts/demo.sh has run into OUT_DIR:
#
#   bash scripts/demo_view.sh OUT_DIR   (with the venv's ehr-prs on PATH; `make demo` runs it last)
#
# 1. the logit-bias model's zero-shot T2D risk again, without --prs (every row as not genotyped: what the
#    model predicts without genetics), with the same flags and --seed as demo.sh's, so the two runs share
#    their random numbers; then `ehr-prs whatif` on the pair: risk by PRS decile within ancestry with the
#    genotype present and removed, and the AUROC / calibration change by ancestry (OUT/whatif_t2d/);
# 2. beside it, `ehr-prs view` pages for four held-out people (two who developed T2D and one who did not,
#    all genotyped, and one without a genotype) and an index (OUT/view/index.html).
# The two jobs run side by side, one thread each; the first costs about one more `ehr-prs risk` job (minutes).
set -euo pipefail

OUT=${1:-demo_out}
SAMPLES=${DEMO_SAMPLES:-4}
HORIZON=730
REFIT_FILE="$OUT/models/none/incidence_t2d.safetensors"
LOGS="$OUT/logs"
mkdir -p "$LOGS"
for need in "$OUT/models/logit_bias" "$OUT/cohort/meds" "$OUT/predictions/t2d_logit_bias.parquet" "$REFIT_FILE"; do
  [ -e "$need" ] || { echo "demo_view.sh: $need is missing; run scripts/demo.sh $OUT first" >&2; exit 2; }
done
export TOKENIZERS_PARALLELISM=false

cohort_whatif() {
  ehr-prs risk --overwrite --model "$OUT/models/logit_bias" --meds "$OUT/cohort/meds" \
    --labels "$OUT/cohort/labels/t2d.parquet" --codes 'ICD10CM/E11*' --horizon-days "$HORIZON" \
    --method survival --samples "$SAMPLES" --split held_out --incidence-refit "$REFIT_FILE" \
    --out "$OUT/predictions/t2d_logit_bias_no_genotype.parquet"
  local col
  col=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['traits']['t2d']['columns'][0])" \
    "$OUT/cohort/truth/prs_traits.json")
  ehr-prs whatif --overwrite --with "$OUT/predictions/t2d_logit_bias.parquet" \
    --without "$OUT/predictions/t2d_logit_bias_no_genotype.parquet" --prs "$OUT/cohort/prs.parquet" \
    --prs-column "$col" --out "$OUT/whatif_t2d"
}

pages() {
  # Four held-out T2D label rows: two positive and one negative of genotyped people, one without a genotype.
  python - "$OUT" <<'EOF'
import sys
import polars as pl
out = sys.argv[1]
labels = pl.read_parquet(f"{out}/cohort/labels/t2d.parquet")
splits = pl.read_parquet(f"{out}/cohort/meds/metadata/subject_splits.parquet")
prs = pl.read_parquet(f"{out}/cohort/prs.parquet").select("subject_id", pl.lit(True).alias("genotyped"))
held = (labels.join(splits, on="subject_id").filter(pl.col("split") == "held_out")
        .join(prs, on="subject_id", how="left").with_columns(pl.col("genotyped").fill_null(False)))
pick = pl.concat([held.filter(pl.col("genotyped") & pl.col("boolean_value")).head(2),
                  held.filter(pl.col("genotyped") & ~pl.col("boolean_value")).head(1),
                  held.filter(~pl.col("genotyped")).head(1)])
pick.select("subject_id", "prediction_time", "boolean_value").write_parquet(f"{out}/view_rows.parquet")
EOF
  ehr-prs view --overwrite --model "$OUT/models/logit_bias" --meds "$OUT/cohort/meds" --prs "$OUT/cohort/prs.parquet" \
    --labels "$OUT/view_rows.parquet" --rows 4 --codes 'ICD10CM/E11*' --horizon-days "$HORIZON" \
    --samples 16 --incidence-refit "$REFIT_FILE" \
    --measurements LOINC/4548-4 LOINC/2345-7 LOINC/39156-5 --out "$OUT/view"
}

# The two jobs side by side, one thread each: the shell's `&` starts them and `wait` joins them.
start() {  # start NAME: the function NAME in the background on one thread, its output to OUT/logs/NAME.log
  echo "   started $1 (log: $LOGS/$1.log)"
  ( export OMP_NUM_THREADS=1; "$1" ) > "$LOGS/$1.log" 2>&1 &
}
finish() {  # finish NAME PID: wait for a started job; stop with the end of its log if it failed, else show what it wrote
  local status=0
  wait "$2" || status=$?
  if [ "$status" != 0 ]; then
    echo "job $1 failed; the end of $LOGS/$1.log:" >&2
    tail -n 40 "$LOGS/$1.log" >&2
    exit 1
  fi
  grep -h -e '^wrote' -e '^  ' "$LOGS/$1.log" | sed "s|^|   $1: |" || true
}
start cohort_whatif
whatif_pid=$!
start pages
pages_pid=$!
finish cohort_whatif "$whatif_pid"
finish pages "$pages_pid"
echo "patient pages: $OUT/view/index.html"
echo "cohort what-if: $OUT/whatif_t2d/whatif.md"
sed -n '1,20p' "$OUT/whatif_t2d/whatif.md"
