"""Issue 20, third round: does the hazard refit gain from the record's counts beside the backbone state?

    python scripts/experiments/tte_refit_counts.py --model RUN/models/logit_bias --data RUN/tok \
        --cohort RUN/cohort --codes 'ICD10CM/E11*' --out RUN/refit_counts_prs --prs

The second round (tte_head_refit.py) refitted the T2D hazard on what the frozen TTE model's head reads
([state ; history mean]) and stayed 0.03 AUROC under the label-fitted GBM on counts. Here the same
label-free at-risk pairs (every sampled end of day of a training record where T2D has not yet occurred;
time to its first later code or to the record's end) get a second set of features read from the tokens
up to that position, the kind the count GBM reads:

  per code token (ICD10CM, RxNorm, CPT4, LOINC, SNOMED, Visit, Race, Ethnicity, Gender):
      log1p(count) over the whole history, the last 1,095 days and the last 365 days
  per lab (LOINC): the value bin (1-10) of its latest measurement, 0 when never measured
  age at the position (the AGE token plus the days since), log1p(days of record), log1p(tokens)

and three piecewise-exponential fits (same time bins and likelihood, ridge on tuning) are compared:
  state          the second round's fit (the backbone alone)
  counts         no backbone at all: a label-free survival model on the counts (the honest baseline)
  counts+state   both
each with the PRS term when --prs. Held-out label rows are scored at the prompt's last token, as
`ehr-prs risk --method hazard` does, and written as MEDS prediction files for `ehr-prs evaluate`.
No task label enters a fit.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import torch
from datasets import load_from_disk
from tqdm.auto import tqdm

from ehr_prs.collator import EhrPrsCollator
from ehr_prs.recipes.train import tte_collator_fields
from ehr_prs.risk.hazard import cumulative_hazard
from ehr_prs.time_to_event import target_families
from modeling_ehr_prs.modeling_ehr_prs import DAYS_PER_YEAR, tte_pairs

_spec = importlib.util.spec_from_file_location("tte_head_refit", Path(__file__).with_name("tte_head_refit.py"))
refit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(refit)

CODE_PREFIXES = ("ICD10CM/", "RxNorm/", "CPT4/", "LOINC/", "SNOMED/", "Visit/", "Race/", "Ethnicity/", "Gender/")
WINDOWS_DAYS = (1095.0, 365.0)
# Ridge on the features (per at-risk pair, standardised): the second round's grid, widened upwards,
# since the counts' 1,066 features chose its edge (0.1) in a first run.
LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


class RecordFeatures:
    """Count features of a token sequence at chosen positions, from the tokens at or before each."""

    def __init__(self, tokenizer):
        vocab = tokenizer.get_vocab()
        n = len(vocab)
        self.token_days = np.asarray(tokenizer.token_days, dtype=np.float64)  # (vocab,) days a time token adds
        codes = sorted(i for t, i in vocab.items() if t.startswith(CODE_PREFIXES) and not t.endswith("<unk>"))
        self.code_col = np.full(n, -1, dtype=np.int64)
        self.code_col[codes] = np.arange(len(codes))
        labs = sorted(i for t, i in vocab.items() if t.startswith("LOINC/") and not t.endswith("<unk>"))
        self.lab_col = np.full(n, -1, dtype=np.int64)
        self.lab_col[labs] = np.arange(len(labs))
        self.bin_of = np.zeros(n, dtype=np.float64)  # Q1..Q10 -> 1..10
        self.age_of = np.full(n, np.nan)
        for t, i in vocab.items():
            if re.fullmatch(r"Q\d+", t):
                self.bin_of[i] = float(t[1:])
            if t.startswith("AGE/") and t[4:].isdigit():
                self.age_of[i] = float(t[4:])
        self.n_codes, self.n_labs = len(codes), len(labs)
        self.names = ([f"all:{c}" for c in range(len(codes))] + [f"{w:g}d:{c}" for w in WINDOWS_DAYS for c in range(len(codes))]
                      + [f"last_bin:{c}" for c in range(len(labs))] + ["age", "log_days", "log_tokens"])

    def __call__(self, ids, positions) -> np.ndarray:
        """ids (s,) one sequence, positions (P,) -> (P, features) float32."""
        ids = np.asarray(ids, dtype=np.int64)
        s = len(ids)
        col = self.code_col[ids]
        onehot = np.zeros((s, self.n_codes), dtype=np.float32)
        hit = col >= 0
        onehot[np.nonzero(hit)[0], col[hit]] = 1.0
        cum = np.cumsum(onehot, axis=0)  # (s, codes) counts up to and including each position
        days = np.cumsum(self.token_days[ids])  # (s,) days since the record's start
        # the latest value bin of each lab: a lab token followed by a Q token
        lab = self.lab_col[ids]
        last = np.zeros((s, self.n_labs), dtype=np.float32)
        cur = np.zeros(self.n_labs, dtype=np.float32)
        for q in range(s):
            if lab[q] >= 0 and q + 1 < s and self.bin_of[ids[q + 1]] > 0:
                cur[lab[q]] = self.bin_of[ids[q + 1]]
            last[q] = cur
        ages = self.age_of[ids]
        age0 = ages[~np.isnan(ages)][0] if (~np.isnan(ages)).any() else np.nan
        out = []
        for p in positions:
            parts = [np.log1p(cum[p])]
            for w in WINDOWS_DAYS:
                j = int(np.searchsorted(days, days[p] - w, side="right"))  # first position inside the window
                before = cum[j - 1] if j > 0 else 0.0
                parts.append(np.log1p(cum[p] - before))
            parts.append(last[p])
            parts.append(np.asarray([age0 + days[p] / DAYS_PER_YEAR if not np.isnan(age0) else 0.0,
                                     np.log1p(days[p]), np.log1p(p + 1)], dtype=np.float32))
            out.append(np.concatenate(parts).astype(np.float32))
        return np.stack(out) if out else np.zeros((0, len(self.names)), dtype=np.float32)


@torch.no_grad()
def at_risk_pairs(model, tokenizer, rows, family_idx, features: RecordFeatures, batch_size=16):
    """(x state, c counts, z, genotyped, time_years, event) over the at-risk pairs of the families' union."""
    collate = EhrPrsCollator(pad_token_id=tokenizer.pad_token_id, with_labels=False,
                             **tte_collator_fields(model.config, tokenizer))
    fam = torch.as_tensor(family_idx)
    xs, cs, zs, gs, ts, es = [], [], [], [], [], []
    for lo in tqdm(range(0, len(rows), batch_size), desc="at-risk pass", unit="batch"):
        items = list(rows.select(range(lo, min(lo + batch_size, len(rows)))))
        batch = collate(items)
        out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          prs=batch.get("prs"), prs_mask=batch.get("prs_mask"), use_cache=False)
        h = model._head_input(out.last_hidden_state, batch["attention_mask"])  # (b, s, d')
        b = h.shape[0]
        last = batch["attention_mask"].sum(-1) - 1
        first = batch["tte_first_index"][:, fam].min(-1, keepdim=True).values  # (b, 1)
        t, e, r = tte_pairs(batch["tte_positions"], first, batch["tte_days"].float(), last)  # (b, P, 1)
        pos = batch["tte_positions"].clamp(min=0)
        keep = r[..., 0]  # (b, P)
        xs.append(h[torch.arange(b)[:, None], pos][keep].float())
        ts.append(t[..., 0][keep] / DAYS_PER_YEAR)
        es.append(e[..., 0][keep])
        for i in range(b):  # the same pairs, in the same (row, position) order as the boolean mask
            cs.append(features(items[i]["input_ids"], pos[i][keep[i]].tolist()))
        if "prs" in batch:
            zs.append(batch["prs"][:, None, :].expand(-1, pos.shape[1], -1)[keep])
            gs.append(batch["prs_mask"][:, None].expand(-1, pos.shape[1])[keep])
    z = torch.cat(zs) if zs else None
    g = torch.cat(gs) if gs else None
    return torch.cat(xs), torch.from_numpy(np.concatenate(cs)), z, g, torch.cat(ts), torch.cat(es)


@torch.no_grad()
def held_out_inputs(model, prompts, prs, prs_mask, features: RecordFeatures, pad_token_id, batch_size=64):
    """(x state at the prompt's last token, c counts there) for every held-out prompt."""
    collate = EhrPrsCollator(pad_token_id=pad_token_id, with_labels=False, pad_to_multiple_of=None)
    xs, cs = [], []
    for lo in tqdm(range(0, len(prompts), batch_size), desc="held-out pass", unit="batch"):
        idx = list(range(lo, min(lo + batch_size, len(prompts))))
        batch = collate([{"input_ids": prompts[i]} for i in idx])
        o = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        prs=None if prs is None else prs[idx], prs_mask=None if prs_mask is None else prs_mask[idx],
                        use_cache=False)
        h = model._head_input(o.last_hidden_state, batch["attention_mask"])
        last = batch["attention_mask"].sum(-1) - 1
        xs.append(h[torch.arange(len(idx)), last].float())
        cs.extend(features(prompts[i], [len(prompts[i]) - 1]) for i in idx)
    return torch.cat(xs), torch.from_numpy(np.concatenate(cs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    refit.add_common_arguments(ap)
    ap.add_argument("--lambdas-prs", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1],
                    help="ridge grid on the PRS term (with --prs)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import polars as pl
    from sklearn.metrics import roc_auc_score

    from ehr_prs.checkpoints import load_model_and_tokenizer
    from ehr_prs.data.predictions import write_predictions

    model, tokenizer, standardizer = load_model_and_tokenizer(args.model)
    model.eval()
    features = RecordFeatures(tokenizer)
    fam = target_families(tokenizer, model.config.tte_families, args.codes)
    starts = model.tte_head.bin_starts.double()
    n_prs = model.config.n_prs if args.prs else 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "pairs.pt"  # the passes' output (no subject ids): a rerun with another grid skips them
    if cache.exists():
        train, tune = torch.load(cache)
    else:
        train = at_risk_pairs(model, tokenizer, load_from_disk(f"{args.data}/train"), fam, features)
        tune = at_risk_pairs(model, tokenizer, load_from_disk(f"{args.data}/tuning"), fam, features)
        torch.save((train, tune), cache)

    data, prompts, prs_t, prs_mask_t = refit.held_out_rows(args, model, tokenizer, standardizer)
    held_cache = out / "held_out.pt"
    if held_cache.exists():
        held_x, held_c = torch.load(held_cache)
    else:
        held_x, held_c = held_out_inputs(model, prompts, prs_t, prs_mask_t, features, tokenizer.pad_token_id)
        torch.save((held_x, held_c), held_cache)
    keys = pl.DataFrame({"subject_id": np.asarray(data["subject_id"], dtype=np.int64),
                         "prediction_time": data.with_format("arrow")["prediction_time"]})
    labels = np.asarray(data["boolean_value"], dtype=bool)
    print(f"pairs: train {len(train[0]):,} ({int(train[5].sum()):,} events), tuning {len(tune[0]):,}; "
          f"state {train[0].shape[1]} + count features {train[1].shape[1]}", flush=True)

    report = {}
    for name, pick in (("counts", lambda x, c: c), ("state", lambda x, c: x),
                       ("counts+state", lambda x, c: torch.cat([x, c], 1))):
        ftrain = pick(train[0], train[1])
        mu, sd = ftrain.mean(0), ftrain.std(0)
        usable = sd > 1e-6  # a feature constant on train (a code never seen at an at-risk position) is dropped
        mu, sd = mu[usable], sd[usable]

        def std(f):
            return ((f[:, usable] - mu) / sd).double()

        tr = (std(ftrain), None if train[2] is None or not args.prs else train[2].double(), train[3], train[4].double(), train[5])
        tu = (std(pick(tune[0], tune[1])), None if tune[2] is None or not args.prs else tune[2].double(), tune[3],
              tune[4].double(), tune[5])
        v, head, lam, lam_prs = refit.fit_linear(tr, tu, starts, LAMBDAS,
                                                 tuple(args.lambdas_prs) if args.prs else (0.0,), n_prs)
        with torch.no_grad():
            lh = head(std(pick(held_x, held_c)), None if prs_t is None else prs_t.double(), prs_mask_t)
            cum = cumulative_hazard(lh[:, :, None], starts.float(), 0.0, [args.horizon_days])
            risk = (-torch.expm1(-cum[:, 0, 0])).numpy()
        frame = keys.with_columns(pl.Series("boolean_value", labels), pl.Series("predicted_boolean_probability", risk))
        write_predictions(frame, out / f"{name.replace('+', '_')}.parquet", overwrite=True, source=f"--model {args.model}")
        report[name] = {"features": int(usable.sum()), "tuning_nll": v, "lam": lam, "lam_prs": lam_prs,
                        "held_out_auroc": float(roc_auc_score(labels, risk)), "mean_risk": float(risk.mean())}
        print(f"{name}: {report[name]}", flush=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
