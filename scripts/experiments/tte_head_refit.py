"""Issue 20, second round: is the gap to the GBM in the backbone or in how the TTE head was trained?

    python scripts/experiments/tte_head_refit.py --model RUN/models/none --data RUN/tok --cohort RUN/cohort \
        --codes 'ICD10CM/E11*' --out RUN/refit_none [--prs]

Freezes a TTE-pretrained model (scripts/experiments/tte_t2d.sh) and refits the hazard of the code
families that `--codes` name on what the head reads at each sampled position ([state ; history
mean]), from one forward pass over the training split: the same label-free targets as pretraining
(days to the family's first later occurrence, or censoring at the record's end), the same
piecewise-exponential likelihood and time bins. Two heads are fitted, both chosen on the tuning
split's likelihood:
  linear  log h[bin] = a[bin] + w . x (+ b . z for genotyped persons), ridge, L-BFGS (closed-form-like)
  mlp     one hidden layer (Adam, early stopping), same PRS term
Held-out label rows are then scored at --horizon-days like `ehr-prs risk --method hazard` (the last
token of the prompt) and written as MEDS prediction files for `ehr-prs evaluate`.
No task labels enter a fit: only the training split's records.
"""

from __future__ import annotations

import argparse
import json
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


@torch.no_grad()
def at_risk_pairs(model, tokenizer, rows, family_idx, batch_size=16, limit=None):
    """(x, z, genotyped, time_years, event) over the at-risk (position, row) pairs of the families' union."""
    collate = EhrPrsCollator(pad_token_id=tokenizer.pad_token_id, with_labels=False,
                             **tte_collator_fields(model.config, tokenizer))
    n = len(rows) if limit is None else min(limit, len(rows))
    fam = torch.as_tensor(family_idx)
    xs, zs, gs, ts, es = [], [], [], [], []
    for lo in tqdm(range(0, n, batch_size), desc="at-risk pass", unit="batch"):
        batch = collate(list(rows.select(range(lo, min(lo + batch_size, n)))))
        out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          prs=batch.get("prs"), prs_mask=batch.get("prs_mask"), use_cache=False)
        h = model._head_input(out.last_hidden_state, batch["attention_mask"])  # (b, s, d')
        b = h.shape[0]
        last = batch["attention_mask"].sum(-1) - 1
        first = batch["tte_first_index"][:, fam].min(-1, keepdim=True).values  # (b, 1) union of the families
        t, e, r = tte_pairs(batch["tte_positions"], first, batch["tte_days"].float(), last)  # (b, P, 1)
        pos = batch["tte_positions"].clamp(min=0)
        x = h[torch.arange(b)[:, None], pos]  # (b, P, d')
        keep = r[..., 0]
        xs.append(x[keep].float())
        ts.append(t[..., 0][keep] / DAYS_PER_YEAR)
        es.append(e[..., 0][keep])
        if "prs" in batch:
            zs.append(batch["prs"][:, None, :].expand(-1, pos.shape[1], -1)[keep])
            gs.append(batch["prs_mask"][:, None].expand(-1, pos.shape[1])[keep])
    z = torch.cat(zs) if zs else None
    g = torch.cat(gs) if gs else None
    return torch.cat(xs), z, g, torch.cat(ts), torch.cat(es)


def exposure_and_bin(starts, t):
    ends = torch.cat([starts[1:], starts.new_full((1,), float("inf"))])
    expo = (torch.minimum(t[:, None], ends) - starts).clamp(min=0)  # (n, bins)
    bin_of = (torch.searchsorted(starts, t.contiguous(), right=True) - 1).clamp(min=0)
    return expo, bin_of


class Head(torch.nn.Module):
    def __init__(self, d, n_prs, bins, hidden=0):
        super().__init__()
        self.body = (torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 1))
                     if hidden else torch.nn.Linear(d, 1, bias=False))
        self.a = torch.nn.Parameter(torch.zeros(bins))
        self.prs = torch.nn.Linear(n_prs, 1, bias=False) if n_prs else None
        if self.prs is not None:
            torch.nn.init.zeros_(self.prs.weight)

    def forward(self, x, z=None, g=None):  # -> (n, bins) log hazard
        lin = self.body(x)[:, 0]
        if self.prs is not None and z is not None:
            lin = lin + torch.where(g, self.prs(z)[:, 0], 0.0)
        return self.a[None] + lin[:, None]


def nll(head, data, starts):
    x, z, g, t, e = data
    expo, bin_of = exposure_and_bin(starts, t)
    lh = head(x, z, g)
    return ((lh.exp() * expo).sum(1) - torch.where(e, lh.gather(1, bin_of[:, None])[:, 0], 0.0)).mean()


def penalty(head, lam, lam_prs):
    p = sum((w ** 2).sum() for n, w in head.body.named_parameters() if "weight" in n) * lam
    if head.prs is not None:
        p = p + lam_prs * (head.prs.weight ** 2).sum()
    return p


def fit_linear(train, tune, starts, lams, lams_prs, n_prs):
    best = None
    for lam in lams:
        for lam_prs in lams_prs:
            head = Head(train[0].shape[1], n_prs, len(starts)).double()
            with torch.no_grad():
                head.a.fill_(float(np.log(train[4].double().sum() / train[3].sum())))
            opt = torch.optim.LBFGS(head.parameters(), max_iter=300, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

            def closure():
                opt.zero_grad()
                loss = nll(head, train, starts) + penalty(head, lam, lam_prs)
                loss.backward()
                return loss
            opt.step(closure)
            with torch.no_grad():
                v = float(nll(head, tune, starts))
            print(f"  linear lam={lam:g} lam_prs={lam_prs:g}: tuning NLL {v:.6f}", flush=True)
            if best is None or v < best[0]:
                best = (v, head, lam, lam_prs)
    return best


def fit_mlp(train, tune, starts, n_prs, hidden=64, lam_prs=1e-3, epochs=30, seed=0):
    torch.manual_seed(seed)
    head = Head(train[0].shape[1], n_prs, len(starts), hidden=hidden).double()
    with torch.no_grad():
        head.a.fill_(float(np.log(train[4].double().sum() / train[3].sum())))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-2)
    n = train[0].shape[0]
    best = (float("inf"), None)
    for ep in range(epochs):
        perm = torch.randperm(n)
        for lo in range(0, n, 4096):
            idx = perm[lo: lo + 4096]
            part = tuple(v[idx] if v is not None else None for v in train)
            loss = nll(head, part, starts) + penalty(head, 0.0, lam_prs)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            v = float(nll(head, tune, starts))
        if v < best[0]:
            best = (v, {k: w.clone() for k, w in head.state_dict().items()})
        print(f"  mlp epoch {ep}: tuning NLL {v:.6f}", flush=True)
    head.load_state_dict(best[1])
    return best[0], head


@torch.no_grad()
def score_rows(model, tokenizer, head, prompts, prs, prs_mask, horizon_days, starts, batch_size=64):
    collate = EhrPrsCollator(pad_token_id=tokenizer.pad_token_id, with_labels=False, pad_to_multiple_of=None)
    out = np.zeros(len(prompts))
    for lo in tqdm(range(0, len(prompts), batch_size), desc="score", unit="batch"):
        idx = list(range(lo, min(lo + batch_size, len(prompts))))
        batch = collate([{"input_ids": prompts[i]} for i in idx])
        p = prs[idx] if prs is not None else None
        pm = prs_mask[idx] if prs_mask is not None else None
        o = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], prs=p, prs_mask=pm,
                        use_cache=False)
        h = model._head_input(o.last_hidden_state, batch["attention_mask"])
        last = batch["attention_mask"].sum(-1) - 1
        x = h[torch.arange(len(idx)), last].double()
        lh = head(x, p.double() if p is not None else None, pm)  # (b, bins)
        cum = cumulative_hazard(lh[:, :, None], starts.float(), 0.0, [horizon_days])  # (b, 1, 1)
        out[idx] = (-torch.expm1(-cum[:, 0, 0])).numpy()
    return out


def add_common_arguments(ap: argparse.ArgumentParser) -> None:
    """The flags both refit experiments take (this script and tte_refit_counts.py)."""
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="the tokenized folder the model was pretrained on")
    ap.add_argument("--cohort", required=True, help="the simulated cohort (meds/, prs.parquet, labels/)")
    ap.add_argument("--task", default="t2d")
    ap.add_argument("--codes", nargs="+", default=["ICD10CM/E11*"])
    ap.add_argument("--horizon-days", type=float, default=730)
    ap.add_argument("--prs", action="store_true", help="fit and use a PRS term (genotyped persons)")


def held_out_rows(args, model, tokenizer, standardizer):
    """The held-out label rows of --task as the model reads them: (rows, prompts, prs, prs_mask); the
    scores (zero where not genotyped) only with --prs."""
    from ehr_prs.data.readers import read_labels, read_meds_dataset, read_prs_table, select_label_rows
    from ehr_prs.tokenizer import inputs_at_prediction_times

    meds = read_meds_dataset(f"{args.cohort}/meds")
    prs_table = read_prs_table(f"{args.cohort}/prs.parquet") if args.prs else None
    labels_path = f"{args.cohort}/labels/{args.task}.parquet"
    rows = select_label_rows(meds, read_labels(labels_path), ["held_out"], labels_path).rows
    data = inputs_at_prediction_times(meds, rows, tokenizer, standardizer if prs_table is not None else None,
                                      prs_table, split="held_out", max_length=model.config.max_position_embeddings)
    prompts = [list(x) for x in data["input_ids"]]
    prs_t = prs_mask_t = None
    if args.prs:
        prs_t = torch.tensor(np.asarray(data["prs"], dtype=np.float32))
        prs_mask_t = torch.tensor(np.asarray(data["prs_mask"], dtype=bool))
        prs_t[~prs_mask_t] = 0
    return data, prompts, prs_t, prs_mask_t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(ap)
    ap.add_argument("--limit", type=int, default=None, help="training sequences read (default all)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from ehr_prs.checkpoints import load_model_and_tokenizer
    from ehr_prs.data.predictions import write_predictions
    import polars as pl

    model, tokenizer, standardizer = load_model_and_tokenizer(args.model)
    model.eval()
    fam = target_families(tokenizer, model.config.tte_families, args.codes)
    starts = model.tte_head.bin_starts.double()
    n_prs = model.config.n_prs if args.prs else 0
    train = at_risk_pairs(model, tokenizer, load_from_disk(f"{args.data}/train"), fam, limit=args.limit)
    tune = at_risk_pairs(model, tokenizer, load_from_disk(f"{args.data}/tuning"), fam)
    if not args.prs:
        train = (train[0], None, None, *train[3:])
        tune = (tune[0], None, None, *tune[3:])
    # standardise x on train (the fit's conditioning), in float64
    mu, sd = train[0].mean(0), train[0].std(0).clamp(min=1e-6)
    def dbl(d):
        x, z, g, t, e = d
        return ((x - mu) / sd).double(), None if z is None else z.double(), g, t.double(), e

    train, tune = dbl(train), dbl(tune)
    print(f"pairs: train {train[0].shape[0]:,} ({int(train[4].sum()):,} events), tuning {tune[0].shape[0]:,} "
          f"({int(tune[4].sum()):,} events), features {train[0].shape[1]}", flush=True)

    data, prompts, prs_t, prs_mask_t = held_out_rows(args, model, tokenizer, standardizer)

    class Standardised(torch.nn.Module):  # scores raw features with the head fitted on standardised ones
        def __init__(self, head):
            super().__init__()
            self.head = head

        def forward(self, x, z=None, g=None):
            return self.head((x - mu.double()) / sd.double(), z, g)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {}
    v_lin, lin, lam, lam_prs = fit_linear(train, tune, starts, (1e-4, 1e-3, 1e-2, 1e-1), (1e-3, 1e-2, 1e-1) if args.prs else (0.0,), n_prs)
    report["linear"] = {"tuning_nll": v_lin, "lam": lam, "lam_prs": lam_prs}
    v_mlp, mlp = fit_mlp(train, tune, starts, n_prs)
    report["mlp"] = {"tuning_nll": v_mlp}
    keys = pl.DataFrame({"subject_id": np.asarray(data["subject_id"], dtype=np.int64),
                         "prediction_time": data.with_format("arrow")["prediction_time"]})
    for name, head in (("linear", lin), ("mlp", mlp)):
        risk = score_rows(model, tokenizer, Standardised(head), prompts, prs_t, prs_mask_t, args.horizon_days, starts)
        frame = keys.with_columns(pl.Series("boolean_value", np.asarray(data["boolean_value"], dtype=bool)),
                                  pl.Series("predicted_boolean_probability", risk))
        write_predictions(frame, out / f"{name}.parquet", overwrite=True, source=f"--model {args.model}")
        from sklearn.metrics import roc_auc_score
        report[name]["held_out_auroc"] = float(roc_auc_score(frame["boolean_value"], risk))
        report[name]["mean_risk"] = float(risk.mean())
        print(f"{name}: held-out AUROC {report[name]['held_out_auroc']:.3f}, mean risk {risk.mean():.4f}", flush=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
