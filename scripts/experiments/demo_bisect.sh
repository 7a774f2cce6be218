#!/usr/bin/env bash
# Why does today's `make demo` EHR-only model differ from the 2026-11-30 one (ca1a06a)?
#
#   bash scripts/experiments/demo_bisect.sh DEMO_OUT WORK [OLD_COMMIT] [OLD_VENV]
#
# DEMO_OUT: a finished `make demo` folder of this checkout. WORK: a scratch folder. OLD_COMMIT
# (default ca1a06a): the commit of the 2026-11-30 run. OLD_VENV (optional): a venv holding the
# library versions of that day (transformers 5.24, accelerate 1.15, as ../shared/STACK.md lists them),
# e.g. `python -m venv V && V/bin/pip install torch==2.13.0 && V/bin/pip install -e . "transformers==5.24.*"
# "accelerate==1.15.*"`. Each check prints one line; run from the repository root with the venv's
# python as `python`. About 10 minutes on 2 cores.
#   1. tokenize: the old commit's tokenizer on DEMO_OUT's cohort gives the same input_ids as DEMO_OUT/tok
#   2. pretraining: 12 steps of the demo's recipe, old commit vs this checkout: the same weights
#   3. risk: the old commit's incidence refit + survival risk (K = 4) on 400 held-out rows of today's
#      EHR-only model, vs this checkout's: the same refit and the same risks
#   4. (OLD_VENV) 12 steps with the old libraries vs today's: the same weights
set -euo pipefail
DEMO=$(realpath "${1:?DEMO_OUT}"); WORK=$(realpath -m "${2:?WORK}"); OLD=${3:-ca1a06a}; OLD_VENV=${4:-}
REPO=$(pwd); PY=$(command -v python)
mkdir -p "$WORK"
export TOKENIZERS_PARALLELISM=false
[ -d "$WORK/old" ] || git worktree add -f "$WORK/old" "$OLD" -q
old() { (cd "$WORK/old" && PYTHONPATH="$WORK/old" "$PY" -m modeling_ehr_prs.cli "$@"); }   # the old layout's CLI
new() { (cd "$REPO" && PYTHONPATH="$REPO" "$PY" -m ehr_prs.cli "$@"); }

echo "1. tokenize"
rm -rf "$WORK/tok_old"
old tokenize --meds "$DEMO/cohort/meds" --prs "$DEMO/cohort/prs.parquet" --out "$WORK/tok_old" --max-length 512 > "$WORK/tok_old.log" 2>&1
"$PY" - "$WORK/tok_old" "$DEMO/tok" <<'EOF'
import sys
from datasets import load_from_disk
for split in ("train", "tuning", "held_out"):
    a, b = load_from_disk(f"{sys.argv[1]}/{split}"), load_from_disk(f"{sys.argv[2]}/{split}")
    same = len(a) == len(b) and all(x == y for x, y in zip(a["input_ids"], b["input_ids"])) and a["prs"] == b["prs"]
    print(f"   {split}: {len(a)} vs {len(b)} sequences, input_ids and prs identical: {same}")
EOF

echo "2. pretraining, 12 steps"
STEPS=(--data "$DEMO/tok" --preset small --prs-fusion none --max-steps 12 --batch-size 16 --max-seq-length 512
       --learning-rate 2e-3 --warmup-steps 50 --eval-steps 12 --save-steps 12 --save-total-limit 1 --max-eval-samples 64)
rm -rf "$WORK/m_old" "$WORK/m_new" "$WORK/m_libs"
old pretrain --output-dir "$WORK/m_old" "${STEPS[@]}" > "$WORK/m_old.log" 2>&1
new pretrain --output-dir "$WORK/m_new" "${STEPS[@]}" > "$WORK/m_new.log" 2>&1
same_weights() {
  "$PY" - "$1" "$2" <<'EOF'
import sys
from safetensors.torch import load_file
a, b = load_file(f"{sys.argv[1]}/model.safetensors"), load_file(f"{sys.argv[2]}/model.safetensors")
assert set(a) == set(b)
print(f"   {sys.argv[1]} vs {sys.argv[2]}: max |weight difference| {max((a[k].float() - b[k].float()).abs().max().item() for k in a)}")
EOF
}
same_weights "$WORK/m_old" "$WORK/m_new"

echo "3. incidence refit and risk of DEMO_OUT/models/none on 400 held-out rows"
"$PY" - "$DEMO" "$WORK/t2d_400.parquet" <<'EOF'
import sys, polars as pl
demo, out = sys.argv[1:]
labels = pl.read_parquet(f"{demo}/cohort/labels/t2d.parquet")
held = pl.read_parquet(f"{demo}/cohort/meds/metadata/subject_splits.parquet").filter(pl.col("split") == "held_out")
labels.join(held.select("subject_id"), on="subject_id").sort("subject_id").head(400).write_parquet(out)
EOF
rm -f "$WORK"/refit_*.safetensors "$WORK"/risk_*.parquet
for side in old new; do
  OMP_NUM_THREADS=1 $side incidence-refit --model "$DEMO/models/none" --data "$DEMO/tok" --codes 'ICD10CM/E11*' \
    --max-sequences 6000 --out "$WORK/refit_$side.safetensors" $([ $side = new ] && echo --overwrite) > "$WORK/refit_$side.log" 2>&1
  OMP_NUM_THREADS=1 $side risk --model "$DEMO/models/none" --meds "$DEMO/cohort/meds" --prs "$DEMO/cohort/prs.parquet" \
    --labels "$WORK/t2d_400.parquet" --codes 'ICD10CM/E11*' --horizon-days 730 --method survival --samples 4 \
    --split held_out --incidence-refit "$WORK/refit_$side.safetensors" --out "$WORK/risk_$side.parquet" \
    $([ $side = new ] && echo --overwrite) > "$WORK/risk_$side.log" 2>&1
done
"$PY" - "$WORK" <<'EOF'
import sys, numpy as np, polars as pl
from safetensors.numpy import load_file
w = sys.argv[1]
a, b = load_file(f"{w}/refit_old.safetensors"), load_file(f"{w}/refit_new.safetensors")
print(f"   refit: max |difference| {max(float(np.abs(a[k] - b[k]).max()) for k in a)}")
p, q = (pl.read_parquet(f"{w}/risk_{s}.parquet")["predicted_boolean_probability"].to_numpy() for s in ("old", "new"))
print(f"   risk of 400 rows: max |difference| {np.abs(p - q).max()}")
EOF

if [ -n "$OLD_VENV" ]; then
  echo "4. pretraining, 12 steps, with $("$OLD_VENV/bin/python" -c 'import transformers, accelerate; print("transformers", transformers.__version__, "accelerate", accelerate.__version__)')"
  (cd "$REPO" && PYTHONPATH="$REPO" "$OLD_VENV/bin/python" -m ehr_prs.cli pretrain --output-dir "$WORK/m_libs" "${STEPS[@]}") > "$WORK/m_libs.log" 2>&1
  same_weights "$WORK/m_libs" "$WORK/m_new"
fi
