"""`ehr-prs view`: one person's record, risk curve and genomic what-if on one self-contained HTML page.

    ehr-prs view --model runs/logit_bias --meds runs/cohort/meds --prs runs/cohort/prs.parquet \
        --subject 1234 --prediction-time 2021-06-30 --codes 'ICD10CM/E11*' --horizon-days 730 \
        --out t2d_1234.html
    ehr-prs view ... --labels runs/cohort/labels/t2d.parquet --rows 5 --out pages/   # + pages/index.html

A page shows, for one (subject, prediction time):

- the record up to the prediction time (events with `time <= prediction_time` and static facts,
  nothing later: the same rule as the model's input) as a timeline of visits, diagnoses, drugs and
  procedures with their descriptions from codes.parquet, the numeric measurements as small line
  charts, and a table by day;
- the risk curve of the outcome (`--codes`) from 0 to `--horizon-days`: from the time-to-event head
  where the model has one (`--method hazard`, deterministic, the whole curve from one forward pass),
  else from sampled futures (`ehr-prs risk`'s engine, one run per horizon with the same random
  numbers, with a 95% band from its Monte Carlo standard error); beside it the average curve of the
  people of the same age band and sex in the same split at the same date (no average when fewer than
  20: the All of Us rule);
- the genomic what-if: the same curve with the person's own PRS, with no genotype (what the model
  predicts without genetics), and with the scores that carry the outcome moved to the 10th and 90th
  percentile (of genetic risk) of the person's ancestry group; the relative risk each implies and the
  scores that move this person's forecast most (weight x standardised value) with their PGS ids;
- a few futures sampled from the generative model, decoded to dated events with descriptions;
- a notice: a model's forecast, not a diagnosis; one person's record, to be kept inside the data's
  secure environment.

The numbers are those `ehr-prs risk` gives for the same row with the same flags: the prompt is built
by the same function with the same length limit, and sampling uses the random numbers of (--seed,
row index) (row 0 for --subject, rows 0..N-1 for `--labels --rows N`, as `risk --limit N`). They are
also on the page as JSON (`<script id="ehr-prs-data">`), for tests and scripts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import html
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from ehr_prs.errors import InputError, input_errors, atomic_output_dir, atomic_output_file, check_output
from ehr_prs.data.readers import STRICT_LABELS_HELP, sex_from_code, subject_sex
from ehr_prs.privacy import MIN_SUBJECTS

# torch (and plotly, the model) are imported inside the functions that use them: `ehr-prs view --help`
# needs none of them.
if TYPE_CHECKING:
    import torch

SAMPLING_METHODS = ("survival", "path", "mc")
NOTICE = ("A model's forecast, not a diagnosis. This page shows one person's health record and what a "
          "statistical model predicts from it; it is confidential: keep it inside the data's secure "
          "environment (do not email, print, upload or share it outside).")
VARIANTS = {  # curve key -> legend
    "own": "own PRS",
    "no_genotype": "no genotype (EHR only)",
    "low": "outcome scores at the 10th percentile of genetic risk",
    "high": "outcome scores at the 90th percentile of genetic risk",
}
COLORS = {"own": "#1f5fa8", "no_genotype": "#555555", "low": "#2a9d5b", "high": "#c0392b", "cohort": "#b58900"}
LANES = ["Visits", "Diagnoses", "Drugs", "Procedures", "Measurements", "Other"]


# ----------------------------------------------------------------------------- small helpers


def parse_time(value: str, flag: str = "--prediction-time") -> dt.datetime:
    """An ISO date or date-time (2021-06-30, 2021-06-30T14:00, 2021-06-30 14:00:00) as a naive datetime."""
    try:
        t = dt.datetime.fromisoformat(value.strip())
    except ValueError as err:
        raise InputError(f"{flag} {value!r} is not a date; give an ISO date or date-time such as 2021-06-30 "
                         "or 2021-06-30T14:00") from err
    if t.tzinfo is not None:
        raise InputError(f"{flag} {value!r} has a time zone; MEDS times are naive: drop the offset")
    return t


def _esc(x) -> str:
    return html.escape(str(x), quote=True)


def _fmt_time(t: dt.datetime | None) -> str:
    if t is None:
        return "static"
    return t.strftime("%Y-%m-%d") if (t.hour, t.minute, t.second) == (0, 0, 0) else t.strftime("%Y-%m-%d %H:%M")


def _pct(p: float) -> str:
    return "n/a" if p is None or not math.isfinite(p) else f"{100 * p:.1f}%"


def lane_of(code: str, has_value: bool) -> str:
    """Timeline lane of a MEDS code: visits, diagnoses, drugs, procedures, measurements (a value) or other."""
    prefix = code.split("/", 1)[0].upper()
    if has_value:
        return "Measurements"
    if prefix in ("VISIT", "ENCOUNTER"):
        return "Visits"
    if prefix.startswith("ICD") and "PCS" not in prefix or prefix in ("SNOMED", "DIAGNOSIS", "DX"):
        return "Diagnoses"
    if prefix in ("RXNORM", "ATC", "NDC", "MEDICATION", "DRUG", "RX"):
        return "Drugs"
    if prefix in ("CPT4", "CPT", "HCPCS", "ICD10PCS", "ICD9PROC", "PROCEDURE", "PROC"):
        return "Procedures"
    return "Other"


def _matches(code: str, patterns: list[str]) -> bool:
    return any(code.startswith(p[:-1]) if p.endswith("*") else code == p for p in patterns)


# ----------------------------------------------------------------------------- the forecast


@dataclass
class Curves:
    """Risk by horizon for several rows: risk, lo, hi (rows, H) at `horizons` (days)."""

    horizons: list[float]
    risk: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    def row(self, i: int) -> dict:
        return {"horizon_days": [0.0, *self.horizons], "risk": [0.0, *self.risk[i].tolist()],
                "lo": [0.0, *self.lo[i].tolist()], "hi": [0.0, *self.hi[i].tolist()]}


@dataclass
class Forecaster:
    """Risk curves from one model: the TTE head (`hazard`) or `ehr-prs risk`'s sampling engine."""

    model: object
    tokenizer: object
    method: str
    horizon_days: float
    target_ids: list[int]
    family_idx: list[int] | None
    samples: int
    seed: int
    max_new_tokens: int
    paths_per_batch: int
    control_variates: bool
    incidence_refit: tuple | None
    curve_points: int
    stop_ids: list[int] = field(default_factory=list)

    @property
    def horizons(self) -> list[float]:
        """Curve horizons (days), the last exactly --horizon-days (the number `ehr-prs risk` writes)."""
        n = self.curve_points
        pts = [self.horizon_days * (j + 1) / n for j in range(n)]
        pts[-1] = float(self.horizon_days)
        return pts

    def curves(self, prompts: list[list[int]], prs: torch.Tensor | None, prs_mask: torch.Tensor | None,
               samples: int | None = None) -> Curves:
        """Risk at every horizon for each prompt (rows in order; row i samples with the numbers of (seed, i))."""
        import torch

        hs = self.horizons
        if self.method == "hazard":
            from ehr_prs.risk.hazard import hazard_risk

            risk = hazard_risk(self.model, prompts, self.family_idx, hs, prs, prs_mask, self.tokenizer.pad_token_id,
                               progress=False)
            return Curves(hs, risk, risk.copy(), risk.copy())
        from ehr_prs.risk.sampling import sample_risk

        k = samples or self.samples
        risk, lo, hi = (np.zeros((len(prompts), len(hs))) for _ in range(3))
        for j, h in enumerate(hs):
            s = sample_risk(self.model, prompts, self.target_ids, torch.tensor(self.tokenizer.token_days), h,
                            self.method, k, prs, prs_mask, self.stop_ids, self.tokenizer.pad_token_id,
                            self.max_new_tokens, self.paths_per_batch, self.seed, progress=False,
                            control_variates=self.control_variates, incidence_refit=self.incidence_refit)
            half = np.nan_to_num(1.96 * s.stderr, nan=0.0)
            risk[:, j] = s.probability
            lo[:, j], hi[:, j] = np.clip(s.probability - half, 0, 1), np.clip(s.probability + half, 0, 1)
        # Raw estimates, each the number `ehr-prs risk --horizon-days h` gives. With common random numbers a
        # longer horizon extends the same paths, so a curve rises; control variates may still make it dip a hair.
        return Curves(hs, risk, lo, hi)


def genomic_weights(model, method: str, family_idx, target_ids: list[int], prompt: list[int]) -> tuple[np.ndarray, str]:
    """Per-score effect (n_prs,) of the standardised PRS on the outcome, and what the number means.

    Hazard head: up[f] @ down.weight of the TTE head's genomic adapter (log-hazard ratio per SD),
    averaged over the outcome's families. Logit-bias adapter: up[t] @ down.weight (log rate ratio per
    SD of each outcome code), averaged over the outcome's codes. Prefix / cross-attention adapters
    are not linear: the gradient, at the average genome, of the log-probability that the next event
    is an outcome code, for this person's history.
    """
    import torch

    if method == "hazard":
        shift = model.tte_head.hazard_shift
        w = (shift.up.detach()[list(family_idx)].float() @ shift.down.weight.detach().float()).mean(0)
        return w.numpy().astype(np.float64), "log-hazard ratio per SD (the time-to-event head's genomic adapter)"
    if model.prs_logit_bias is not None:
        bias = model.prs_logit_bias
        w = (bias.up.detach()[list(target_ids)].float() @ bias.down.weight.detach().float()).mean(0)
        return w.numpy().astype(np.float64), "log rate ratio per SD of the outcome codes (the logit-bias adapter)"
    device = next(model.parameters()).device
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.tensor([prompt], device=device)
    prs = torch.zeros(1, model.config.n_prs, device=device, requires_grad=True)
    with torch.enable_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), prs=prs,
                       prs_mask=torch.ones(1, dtype=torch.bool, device=device)).logits[0, -1].float()
        target = torch.tensor(sorted(set(target_ids)), device=device)
        (torch.logsumexp(logits[target], 0) - torch.logsumexp(logits, 0)).backward()
    return (prs.grad[0].cpu().numpy().astype(np.float64),
            "local effect: gradient of the log-probability that the next event is an outcome code, at the average "
            f"genome ({model.config.prs_fusion} adapter, not linear)")


@dataclass
class Reference:
    """Percentiles of the standardised scores among genotyped training subjects of one ancestry group."""

    q10: np.ndarray
    q90: np.ndarray
    n: int
    group: str  # e.g. "ancestry eur", or "all ancestries"
    note: str = ""


def score_reference(standardizer, prs, meds, group_value: str | None, min_cell: int) -> Reference:
    """10th/90th percentiles of each standardised score among the genotyped train subjects of the group.

    The group is the standardiser's (ancestry) group of the person; a person without one (not
    genotyped) or a group with fewer than `min_cell` genotyped training subjects gets all ancestries.
    """
    splits = meds.subject_splits
    train = splits.filter(pl.col("split") == "train")["subject_id"] if splits.height else prs.frame["subject_id"]
    frame = prs.frame.join(pl.DataFrame({"subject_id": train.cast(pl.Int64)}), on="subject_id", how="semi")
    z, mask = standardizer.transform(frame, frame["subject_id"])
    z = z.astype(np.float32)
    col = standardizer.group_column
    note = ""
    label = "all ancestries"
    if col and col in frame.columns and group_value is not None:
        in_group = (frame[col].cast(pl.String) == str(group_value)).fill_null(False).to_numpy() & mask
        if in_group.sum() >= min_cell:
            mask, label = in_group, f"{col} {group_value}"
        else:
            note = f"fewer than {min_cell} genotyped training subjects of {col} {group_value}: all ancestries used"
    elif col and group_value is None:
        note = f"no {col} for this person (not genotyped): all ancestries used"
    if mask.sum() < min_cell:
        raise InputError(f"--prs {prs.path}: fewer than {min_cell} genotyped subjects of the train split, so no "
                         "percentile of the scores can be shown; the what-if needs the PRS table of the training cohort "
                         "(or pass --no-whatif)")
    q10, q90 = np.quantile(z[mask], [0.1, 0.9], axis=0)
    return Reference(q10, q90, int(mask.sum()), label, note)


# ----------------------------------------------------------------------------- cohort and record


def code_matches(patterns: list[str]) -> pl.Expr:
    """True for events whose code is one of `patterns` (exact codes, or prefixes ending in *)."""
    expr = pl.lit(False)
    for p in patterns:
        expr = expr | (pl.col("code").str.starts_with(p[:-1]) if p.endswith("*") else pl.col("code") == p)
    return expr


class Cohort:
    """Per-split tables (birth, sex, first event, death, first outcome code) for the reference groups."""

    def __init__(self, meds, codes: list[str]):
        self.meds = meds
        self.codes = list(codes)
        self._tables: dict[str, pl.DataFrame] = {}

    def table(self, split: str) -> pl.DataFrame:
        if split not in self._tables:
            ev = self.meds.scan(split)
            per = ev.group_by("subject_id").agg(
                pl.col("time").filter(pl.col("code") == "MEDS_BIRTH").min().alias("birth"),
                pl.col("time").filter(pl.col("time").is_not_null() & (pl.col("code") != "MEDS_BIRTH")).min().alias("first"),
                pl.col("time").filter(pl.col("code") == "MEDS_DEATH").min().alias("death"),
                pl.col("time").filter(code_matches(self.codes)).min().alias("outcome"),
            ).collect()
            static = ev.filter(sex_from_code().is_not_null()).select("subject_id", "code").collect()
            self._tables[split] = per.join(subject_sex(static), on="subject_id", how="left")
        return self._tables[split]

    def group(self, split: str, when: dt.datetime) -> pl.DataFrame:
        """subject_id, age_band, sex, prevalent (an outcome code at or before `when`) of the split's subjects
        with a history at `when` and no death before it."""
        from ehr_prs.evaluation.metrics import AGE_BANDS, AGE_LABELS

        t = self.table(split).filter(pl.col("first").is_not_null() & (pl.col("first") <= when)
                                     & (pl.col("death").is_null() | (pl.col("death") > when)))
        age = (pl.lit(when) - pl.col("birth")).dt.total_seconds() / (365.25 * 86400)
        band = pl.when(pl.col("birth").is_null()).then(pl.lit("unknown"))
        for edge, label in zip(AGE_BANDS, AGE_LABELS):
            band = band.when(age < edge).then(pl.lit(label))
        band = band.otherwise(pl.lit(AGE_LABELS[-1]))
        prevalent = pl.col("outcome").is_not_null() & (pl.col("outcome") <= when)
        return t.select("subject_id", band.alias("age_band"), pl.col("sex").fill_null("unknown"),
                        prevalent.alias("prevalent"))


def person_record(meds, subject_id: int, split: str, when: dt.datetime) -> pl.DataFrame:
    """The subject's events that the model reads at `when`: static facts and `time <= when`, MEDS_BIRTH aside."""
    ev = (meds.scan(split).filter(pl.col("subject_id") == subject_id)
          .filter(pl.col("time").is_null() | (pl.col("time") <= when))
          .filter(pl.col("code") != "MEDS_BIRTH").collect())
    desc = meds.codes.select("code", "description").unique("code", keep="first")
    return ev.join(desc, on="code", how="left", maintain_order="left")


# ----------------------------------------------------------------------------- sampled futures


def bin_range(edges: list[float], q: int) -> str:
    """The value range of bin token Q`q` (1-based) over a code's interior bin edges: '[5.7, 6.1)'."""
    b = q - 1
    lo = f"{edges[b - 1]:g}" if b >= 1 and b - 1 < len(edges) else "-inf"
    hi = f"{edges[b]:g}" if b < len(edges) else "inf"
    return f"in [{lo}, {hi})"


def sample_futures(model, tokenizer, prompt: list[int], prs, prs_mask, n: int, max_new_tokens: int, seed: int,
                   horizon_days: float, target_ids: set[int], stop_ids: list[int]) -> list[list[dict]]:
    """`n` futures from the generative model (raw distribution), each a list of events up to the horizon.

    An event: {"day": days after the last recorded event, "code", "description", "value" (a value bin's
    range, or None), "target": whether it is an outcome code}. A path ends at the horizon, at
    end-of-record or death, or after `max_new_tokens`.
    """
    import torch

    if n <= 0:
        return []
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    kw = {}
    if prs is not None:
        kw = {"prs": prs[None].to(device), "prs_mask": prs_mask.reshape(1).to(device)}
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                             temperature=1.0, max_new_tokens=max_new_tokens, num_return_sequences=n,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=list(stop_ids), **kw)
    futures = []
    days_of = tokenizer.token_days
    for seq in out[:, len(prompt):].tolist():
        day, events = 0, []
        for tid in seq:
            tok = tokenizer.convert_ids_to_tokens(tid)
            if tid in stop_ids:
                if tid != tokenizer.eos_token_id:
                    events.append({"day": day, "code": tok, "description": tokenizer.descriptions.get(tok, "Death"),
                                   "value": None, "target": False})
                else:
                    events.append({"day": day, "code": "end of record", "description": "", "value": None,
                                   "target": False})
                break
            if days_of[tid]:
                day += days_of[tid]
                if day > horizon_days:
                    break
                continue
            if tok in (tokenizer.pad_token, tokenizer.bos_token) or tok.startswith("AGE/"):
                continue
            if tok.startswith("Q") and tok[1:].isdigit():
                if events and events[-1]["code"] in tokenizer.bin_edges:
                    events[-1]["value"] = bin_range(tokenizer.bin_edges[events[-1]["code"]], int(tok[1:]))
                continue
            events.append({"day": day, "code": tok, "description": tokenizer.descriptions.get(tok, ""), "value": None,
                           "target": tid in target_ids})
        futures.append(events)
    return futures


# ----------------------------------------------------------------------------- the page


PAGE_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2329;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:0 20px 40px}
.notice{background:#fff4d6;border-bottom:2px solid #e0b84a;padding:10px 20px;font-size:14px}
.notice strong{color:#7a4b00}
header{padding:14px 0 4px} h1{font-size:22px;margin:6px 0} h2{font-size:18px;margin:0 0 8px}
.meta{color:#4a5560;font-size:13.5px;display:flex;flex-wrap:wrap;gap:2px 16px}
section{background:#fff;border:1px solid #dde2e8;border-radius:8px;padding:14px 16px;margin:14px 0}
.grid{display:grid;grid-template-columns:minmax(0,3fr) minmax(0,2fr);gap:16px}
@media (max-width:900px){.grid{grid-template-columns:1fr}}
.kpi{display:flex;gap:12px;flex-wrap:wrap;margin:6px 0 10px}
.kpi div{background:#f0f4f9;border-radius:6px;padding:8px 12px;min-width:120px}
.kpi b{display:block;font-size:20px} .kpi small{color:#4a5560}
table{border-collapse:collapse;width:100%;font-size:13.5px} th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #e6e9ee;vertical-align:top}
th{background:#f3f5f8;font-weight:600} td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#5a6570;font-size:13px} .target{color:#b0261b;font-weight:600}
.futures{display:grid;grid-template-columns:repeat(auto-fit,minmax(320px,1fr));gap:12px}
.future{border:1px solid #e3e7ec;border-radius:6px;padding:8px 10px;font-size:13px;max-height:360px;overflow:auto}
.future ol{margin:4px 0;padding-left:18px} code{font-size:12.5px;background:#f3f5f8;padding:0 3px;border-radius:3px}
details summary{cursor:pointer;font-weight:600;margin:6px 0}
footer{color:#6a737c;font-size:12px;margin-top:18px}
"""


class Page:
    """Collects plotly figures (div + data) and renders one HTML page."""

    def __init__(self):
        self.figures: list[tuple[str, dict]] = []

    def plot(self, fig, div_id: str, height: int, toolbar: bool = True) -> str:
        fig.update_layout(height=height, margin=dict(l=50, r=20, t=36, b=40), template="plotly_white",
                          font=dict(family="system-ui, sans-serif", size=12))
        self.figures.append((div_id, json.loads(fig.to_json()), toolbar))
        return f'<div id="{div_id}" class="plot" style="height:{height}px"></div>'

    def scripts(self) -> str:
        calls = "\n".join(
            f"Plotly.newPlot({json.dumps(d)}, {_json_script(f.get('data', []))}, {_json_script(f.get('layout', {}))}, "
            f"{{displaylogo:false,responsive:true,displayModeBar:{json.dumps('hover' if bar else False)}}});"
            for d, f, bar in self.figures)
        return f"<script>\n{calls}\n</script>"


def _json_script(obj) -> str:
    """JSON safe inside a <script> element."""
    return json.dumps(obj, allow_nan=False).replace("</", "<\\/")


def _risk_figure(data: dict, keys: list[str], title: str, band: bool):
    import plotly.graph_objects as go

    fig = go.Figure()
    for key in keys:
        c = data["curves"].get(key)
        if c is None:
            continue
        x = c["horizon_days"]
        name = "cohort average (same age band and sex)" if key == "cohort" else VARIANTS[key]
        if band and data["sampled"] and key in ("own", "cohort"):
            fig.add_trace(go.Scatter(x=x + x[::-1], y=c["hi"] + c["lo"][::-1], fill="toself", line=dict(width=0),
                                     fillcolor=COLORS[key], opacity=0.15, hoverinfo="skip", showlegend=False))
        dash = {"no_genotype": "dash", "cohort": "dot"}.get(key, "solid")
        fig.add_trace(go.Scatter(x=x, y=c["risk"], name=name, mode="lines+markers" if data["sampled"] else "lines",
                                 line=dict(color=COLORS[key], dash=dash, width=2.5 if key == "own" else 2),
                                 hovertemplate="%{x:.0f} days: %{y:.1%}<extra>" + _esc(name) + "</extra>"))
    fig.update_layout(title=dict(text=title, font=dict(size=14)), legend=dict(orientation="h", y=-0.22),
                      xaxis_title="days ahead", yaxis=dict(title="risk", tickformat=".0%", rangemode="tozero"))
    return fig


def _timeline_figure(record: pl.DataFrame, codes: list[str]):
    import plotly.graph_objects as go

    ev = record.filter(pl.col("time").is_not_null() & ~pl.col("code").str.ends_with("/END"))
    fig = go.Figure()
    for lane in LANES:
        rows = [r for r in ev.iter_rows(named=True) if lane_of(r["code"], r["numeric_value"] is not None) == lane]
        if not rows:
            continue
        text = [f"{_esc(r['code'])}<br>{_esc(r['description'] or '')}"
                + (f"<br>value {r['numeric_value']:g}" if r["numeric_value"] is not None else "") for r in rows]
        fig.add_trace(go.Scatter(x=[r["time"] for r in rows], y=[lane] * len(rows), mode="markers", name=lane,
                                 marker=dict(size=14, opacity=0.75, symbol="line-ns-open", line=dict(width=2.5)),
                                 text=text, hovertemplate="%{x|%Y-%m-%d}<br>%{text}<extra></extra>", showlegend=False))
    hits = [r for r in ev.iter_rows(named=True) if _matches(r["code"], codes)]
    if hits:
        fig.add_trace(go.Scatter(x=[r["time"] for r in hits],
                                 y=[lane_of(r["code"], r["numeric_value"] is not None) for r in hits],
                                 mode="markers", name="outcome code", marker=dict(size=13, color="#c0392b", symbol="star"),
                                 text=[_esc(r["code"]) for r in hits], hovertemplate="%{x|%Y-%m-%d} %{text}<extra></extra>"))
    fig.update_layout(yaxis=dict(categoryorder="array", categoryarray=LANES[::-1]), xaxis_title=None,
                      title=dict(text="Record timeline (hover for codes and descriptions)", font=dict(size=14)))
    return fig


def _measurement_figure(record: pl.DataFrame, codes: list[str]):
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    desc = dict(record.select("code", "description").unique("code").iter_rows())
    cols = min(3, len(codes))
    rows = math.ceil(len(codes) / cols)
    titles = [f"{(desc.get(c) or c)[:38]}" for c in codes]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.07, vertical_spacing=0.18)
    for i, c in enumerate(codes):
        m = record.filter((pl.col("code") == c) & pl.col("numeric_value").is_not_null() & pl.col("time").is_not_null())
        times = m["time"].to_list()
        fig.add_trace(go.Scatter(x=times, y=m["numeric_value"].to_list(), mode="lines+markers",
                                 name=c, showlegend=False, line=dict(color="#1f5fa8"),
                                 hovertemplate="%{x|%Y-%m-%d}: %{y:.4g}<extra>" + _esc(c) + "</extra>"),
                      row=i // cols + 1, col=i % cols + 1)
        span = (max(times) - min(times)) if times else dt.timedelta(0)
        pad = max(span * 0.08, dt.timedelta(days=45))
        fig.update_xaxes(type="date", range=[min(times) - pad, max(times) + pad] if times else None,
                         row=i // cols + 1, col=i % cols + 1)
    for a in fig.layout.annotations:
        a.font.size = 12
    return fig, rows


def _table(headers: list[str], rows: list[list], num: set[int] = frozenset()) -> str:
    head = "".join(f'<th class="num">{_esc(h)}</th>' if j in num else f"<th>{_esc(h)}</th>" for j, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if j in num else f"<td>{c}</td>" for j, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_page(data: dict, record: pl.DataFrame, futures: list[list[dict]], measurement_codes: list[str],
                plotly_tag: str, max_events: int) -> str:
    """The HTML of one person's page (`plotly_tag`: the inlined plotly.js, or a <script src> beside it)."""
    page = Page()
    d = data
    outcome = " ".join(d["codes"])
    horizon = d["horizon_days"]
    own = d["risk_at_horizon"]["own"]
    parts = [f'<div class="notice" role="note"><strong>{_esc(NOTICE.split(". ", 1)[0])}.</strong> '
             f'{_esc(NOTICE.split(". ", 1)[1])}</div><main>']
    geno = f"genotyped ({_esc(d['person']['group'])})" if d["genotyped"] else "not genotyped"
    parts.append(
        f"<header><h1>Subject {_esc(d['subject_id'])}: forecast at {_esc(d['prediction_time'])}</h1>"
        f'<div class="meta"><span>age band {_esc(d["person"]["age_band"])}</span><span>sex {_esc(d["person"]["sex"])}</span>'
        f"<span>{geno}</span><span>{d['record']['n_events']} events read, last on {_esc(d['record']['last_event'])}</span>"
        f"<span>outcome <code>{_esc(outcome)}</code> within {horizon:g} days</span>"
        f"<span>model <code>{_esc(d['model'])}</code> ({_esc(d['method_text'])})</span></div></header>")

    # -- risk curve beside the cohort
    cohort = d["cohort"]
    kpis = [f"<div><small>risk within {horizon:g} days</small><b>{_pct(own)}</b>"
            + (f"<small>95% band {_pct(d['curves']['own']['lo'][-1])}-{_pct(d['curves']['own']['hi'][-1])}</small>"
               if d["sampled"] else "<small>from the hazard head</small>") + "</div>"]
    if cohort.get("shown"):
        kpis.append(f"<div><small>cohort average</small><b>{_pct(d['curves']['cohort']['risk'][-1])}</b>"
                    f"<small>{_esc(cohort['text'])}</small></div>")
    cohort_note = cohort["text"] if not cohort.get("shown") else (
        f"Cohort average: the mean forecast, made at the same date, of {cohort['n_used']} of the {cohort['n']} people "
        f"of age band {_esc(d['person']['age_band'])} and sex {_esc(d['person']['sex'])} in the {_esc(d['split'])} split "
        "with a record by then and no outcome code yet"
        + (f" ({cohort['samples']} sampled futures each)" if d["sampled"] else "") + ".")
    fig = _risk_figure(d, ["own", "cohort"], f"Risk of {outcome} by days ahead", band=True)
    parts.append(f'<section id="risk"><h2>Risk of <code>{_esc(outcome)}</code></h2><div class="kpi">{"".join(kpis)}</div>'
                 + page.plot(fig, "plot-risk", 380)
                 + (f'<p class="note target">This record already holds {d["record"]["outcome_codes"]} outcome code(s), '
                    f'the first on {_esc(d["record"]["first_outcome"])}: the curve is the risk of a further one, not of '
                    "onset.</p>" if d["record"]["outcome_codes"] else "")
                 + f'<p class="note">{cohort_note} {_esc(d["method_note"])}</p></section>')

    # -- genomic what-if
    w = d.get("whatif")
    if w:
        fig = _risk_figure(d, ["own", "no_genotype", "low", "high"], "Genomic what-if: the same person, other genomes",
                           band=False)
        rr_rows = []
        for key in ("own", "no_genotype", "low", "high"):
            if key not in d["risk_at_horizon"]:
                continue
            r = d["risk_at_horizon"][key]
            rr = d["relative_risk"].get(key)
            rr_rows.append([_esc(VARIANTS[key]) + (" (the person is not genotyped)" if key == "own" and not d["genotyped"]
                                                   else ""),
                            _pct(r), "n/a" if rr is None else f"{rr:.2f}"])
        table = _table(["genome", f"risk within {horizon:g} days", "relative risk vs no genotype"], rr_rows, {1, 2})
        top = w["top_scores"]
        top_html = (_table(["score (PGS id)", "standardised value z", "weight w", "w × z", "factor exp(w × z)"],
                           [[f"<code>{_esc(s['score'])}</code>", f"{s['z']:+.2f}", f"{s['weight']:+.3f}",
                             f"{s['contribution']:+.3f}", f"{math.exp(s['contribution']):.2f}"] for s in top],
                           {1, 2, 3, 4})
                    if top else "<p class=\"note\">Not genotyped: no scores of this person's move the forecast.</p>")
        moved = _table(["score (PGS id)", "weight w", "own z", "10th pct", "90th pct"],
                       [[f"<code>{_esc(s['score'])}</code>", f"{s['weight']:+.3f}",
                         "n/a" if s["z"] is None else f"{s['z']:+.2f}", f"{s['low']:+.2f}", f"{s['high']:+.2f}"]
                        for s in w["moved"]], {1, 2, 3, 4})
        parts.append(
            '<section id="whatif"><h2>Genomic what-if</h2><div class="grid"><div>'
            + page.plot(fig, "plot-whatif", 400)
            + f"</div><div>{table}<p class=\"note\">Relative risk: the risk within {horizon:g} days with that genome "
            "divided by the risk with no genotype (what the model predicts without genetics). The 10th and 90th "
            f"percentiles are those of {w['reference']['n']} genotyped training subjects ({_esc(w['reference']['group'])}"
            f"{'; ' + _esc(w['reference']['note']) if w['reference']['note'] else ''}), taken in the direction of "
            "genetic risk (for a score with a negative weight its 90th percentile of risk is its 10th of value); the "
            "other scores keep the person's own values (0, the average, when not genotyped)."
            + (" A moved score acts on every code it carries, not on the outcome alone, so a curve from sampled "
               "futures also follows the other events it makes more or less likely." if d["sampled"] else "")
            + "</p></div></div>"
            f"<div class=\"grid\"><div><h3>Scores that move this forecast most</h3>{top_html}</div>"
            f"<div><h3>Scores moved in the what-if</h3>{moved}</div></div>"
            f"<p class=\"note\">Weights: {_esc(w['weights_meaning'])}. z: the score standardised within the person's "
            "ancestry group on the training cohort (0 = the group's average).</p></section>")
    else:
        parts.append('<section id="whatif"><h2>Genomic what-if</h2><p class="note">'
                     + _esc(d["whatif_note"]) + "</p></section>")

    # -- the record
    n_ev = record.filter(pl.col("time").is_not_null()).height
    rec_parts = ['<section id="record"><h2>Record up to the prediction time</h2>']
    if n_ev:
        rec_parts.append(page.plot(_timeline_figure(record, d["codes"]), "plot-timeline", 300, toolbar=False))
    if measurement_codes:
        fig, nrows = _measurement_figure(record, measurement_codes)
        rec_parts.append("<h3>Measurements</h3>" + page.plot(fig, "plot-measurements", 210 * nrows, toolbar=False))
    static = record.filter(pl.col("time").is_null())
    if static.height:
        rec_parts.append("<p><b>Static facts:</b> " + "; ".join(
            f"<code>{_esc(c)}</code> {_esc(x or '')}" for c, x in static.select("code", "description").iter_rows()) + "</p>")
    timed = record.filter(pl.col("time").is_not_null())
    shown = timed.tail(max_events)
    by_day: dict[str, list[str]] = {}
    for r in shown.iter_rows(named=True):
        cls = ' class="target"' if _matches(r["code"], d["codes"]) else ""
        value = f" = {r['numeric_value']:g}" if r["numeric_value"] is not None else ""
        item = f"<code{cls}>{_esc(r['code'])}</code> {_esc(r['description'] or '')}{value}"
        by_day.setdefault(r["time"].strftime("%Y-%m-%d"), []).append(item)
    cut = (f" (the last {max_events} of {timed.height} events; --max-events shows more)"
           if timed.height > max_events else "")
    rows = [[_esc(day), "<br>".join(items)] for day, items in sorted(by_day.items(), reverse=True)]
    rec_parts.append(f"<details><summary>All events by day, most recent first{cut}</summary>"
                     + _table(["date", "events"], rows) + "</details></section>")
    parts.append("".join(rec_parts))

    # -- sampled futures
    fut = []
    for i, events in enumerate(futures, 1):
        items = []
        for e in events:
            when = (d["anchor_date"] + dt.timedelta(days=int(e["day"]))).strftime("%Y-%m-%d")
            cls = ' class="target"' if e["target"] else ""
            val = f" (value {_esc(e['value'])})" if e["value"] else ""
            items.append(f"<li>≈{when} (+{int(e['day'])} d) <code{cls}>{_esc(e['code'])}</code> "
                         f"{_esc(e['description'])}{val}</li>")
        hit = any(e["target"] for e in events)
        fut.append(f'<div class="future"><b>Future {i}</b>{" — <span class=target>outcome occurs</span>" if hit else ""}'
                   f"<ol>{''.join(items) or '<li>no event within the horizon</li>'}</ol></div>")
    parts.append('<section id="futures"><h2>Sampled futures</h2>'
                 + (f'<div class="futures">{"".join(fut)}</div>' if fut else "<p class=note>None asked (--futures 0).</p>")
                 + f'<p class="note">{len(futures)} futures sampled from the generative model with the person\'s own '
                 f"genome (raw next-token distribution, seed {d['seed']}), up to {horizon:g} days; dates count the "
                 f"generated time gaps from the last recorded event ({_esc(d['record']['last_event'])}), so they are "
                 "approximate. Each is one possible course, not a prediction.</p></section>")
    parts.append(f"<footer>Made by <code>ehr-prs view</code> from <code>{_esc(d['model'])}</code>; "
                 f"{_esc(d['settings'])}. The numbers of this page are in the JSON element #ehr-prs-data.</footer></main>")
    body = "\n".join(parts)
    title = f"ehr-prs view: subject {d['subject_id']} at {d['prediction_time']}"
    payload = {k: v for k, v in d.items() if k != "anchor_date"}
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><meta name="robots" content="noindex">'
            f"<title>{_esc(title)}</title><style>{PAGE_CSS}</style>{plotly_tag}</head><body>\n{body}\n"
            f'<script type="application/json" id="ehr-prs-data">{_json_script(_finite(payload))}</script>\n'
            f"{page.scripts()}\n</body></html>\n")


def _finite(obj):
    """NaN/inf -> None, so the page's JSON is valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def render_index(pages: list[dict], settings: str) -> str:
    """index.html for `--labels --rows N`: one line per page."""
    rows = [[f'<a href="{_esc(p["file"])}">{_esc(p["file"])}</a>', _esc(p["subject_id"]), _esc(p["prediction_time"]),
             "yes" if p["genotyped"] else "no", _pct(p["own"]),
             _pct(p["no_genotype"]) if p["no_genotype"] is not None else "n/a",
             "n/a" if p["rr"] is None else f"{p['rr']:.2f}"] for p in pages]
    table = _table(["page", "subject", "prediction time", "genotyped", "risk", "risk, no genotype",
                    "relative risk"], rows, {4, 5, 6})
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><meta name="robots" content="noindex">'
            f"<title>ehr-prs view: {len(pages)} pages</title><style>{PAGE_CSS}</style></head><body>"
            f'<div class="notice" role="note"><strong>{_esc(NOTICE.split(". ", 1)[0])}.</strong> '
            f'{_esc(NOTICE.split(". ", 1)[1])}</div><main><header><h1>ehr-prs view: {len(pages)} pages</h1></header>'
            f"<section>{table}</section><footer>{_esc(settings)}</footer></main></body></html>\n")


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="folder written by `ehr-prs pretrain`")
    parser.add_argument("--meds", required=True, help="MEDS dataset root")
    parser.add_argument("--prs", help="PRS table; without it everyone counts as not genotyped (and --no-whatif is needed)")
    parser.add_argument("--subject", type=int, help="one subject_id (with --prediction-time): --out is one HTML file")
    parser.add_argument("--prediction-time", help="ISO date or date-time; the page reads events up to it only")
    parser.add_argument("--labels", help="MEDS label file: pages for its first --rows rows of --split (--out is a folder)")
    parser.add_argument("--rows", type=int, default=5, help="with --labels: how many rows (default 5)")
    parser.add_argument("--split", default="held_out", help="with --labels: which split's rows (default held_out)")
    parser.add_argument("--strict-labels", action="store_true", help=STRICT_LABELS_HELP)
    parser.add_argument("--codes", nargs="+", required=True, help="outcome codes; a code ending in * is a prefix")
    parser.add_argument("--horizon-days", type=float, default=730, help="the curve runs from 0 to this (default 730)")
    parser.add_argument("--out", required=True, help="page.html (--subject) or a folder (--labels)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out (never an input)")
    parser.add_argument("--method", default="auto", choices=("auto", "hazard", *SAMPLING_METHODS),
                        help="auto (default): hazard when the model has a time-to-event head that predicts the outcome, "
                             "else survival (sampled futures, as `ehr-prs risk`)")
    parser.add_argument("--samples", type=int, default=16, help="sampled futures per curve point (sampling methods)")
    parser.add_argument("--seed", type=int, default=0, help="random numbers of (seed, row), as `ehr-prs risk --seed`")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="cap on generated tokens per path")
    parser.add_argument("--paths-per-batch", type=int, default=256, help="paths sampled together")
    parser.add_argument("--control-variates", action=argparse.BooleanOptionalAction, default=True,
                        help="as `ehr-prs risk` (a single row is never corrected: there is nothing to cross-fit on)")
    parser.add_argument("--incidence-refit", metavar="FILE", help="as `ehr-prs risk --incidence-refit` (sampling only)")
    parser.add_argument("--curve-points", type=int, default=None,
                        help="horizons on the curve (default 60 for hazard, 4 for sampling: one sampling run each)")
    parser.add_argument("--whatif", action=argparse.BooleanOptionalAction, default=True,
                        help="the genomic what-if (needs a model with a genomic adapter and --prs)")
    parser.add_argument("--whatif-scores", type=int, default=5,
                        help="how many scores (largest effect on the outcome) the what-if moves (default 5)")
    parser.add_argument("--cohort-rows", type=int, default=100,
                        help="people of the same age band and sex averaged for the cohort curve (default 100; 0: none)")
    parser.add_argument("--cohort-samples", type=int, default=4, help="sampled futures per cohort person (sampling)")
    parser.add_argument("--min-cell", type=int, default=MIN_SUBJECTS,
                        help=f"no group average of fewer people than this (default {MIN_SUBJECTS}, the All of Us rule)")
    parser.add_argument("--futures", type=int, default=3, help="sampled futures decoded on the page (default 3)")
    parser.add_argument("--measurements", nargs="+", metavar="CODE",
                        help="numeric codes to chart (default: the person's 6 most measured); CODE* is a prefix")
    parser.add_argument("--max-events", type=int, default=1000, help="most recent events listed in the table")


def _check_args(args) -> bool:
    """Flag checks before any work; returns True for the one-page (--subject) mode."""
    single = args.subject is not None
    if single and args.labels:
        raise InputError("give either --subject ID with --prediction-time T (one page), or --labels FILE with --rows N "
                         "(several pages and an index), not both")
    if not single and not args.labels:
        raise InputError("name the person: --subject ID --prediction-time T, or --labels FILE --rows N")
    if single and not args.prediction_time:
        raise InputError(f"--subject {args.subject} needs --prediction-time T (the page reads the record up to T)")
    if not single and args.prediction_time:
        raise InputError("--prediction-time goes with --subject; with --labels each row has its own prediction_time")
    for flag, value, low in (("--horizon-days", args.horizon_days, 1e-9), ("--samples", args.samples, 1),
                             ("--rows", args.rows, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                             ("--whatif-scores", args.whatif_scores, 1), ("--min-cell", args.min_cell, 1),
                             ("--cohort-samples", args.cohort_samples, 1), ("--max-events", args.max_events, 1)):
        if value < low:
            raise InputError(f"{flag} must be {'> 0' if low < 1 else f'>= {low}'}, got {value:g}")
    for flag, value in (("--futures", args.futures), ("--cohort-rows", args.cohort_rows)):
        if value < 0:
            raise InputError(f"{flag} must be >= 0, got {value}")
    if args.curve_points is not None and args.curve_points < 1:
        raise InputError(f"--curve-points must be >= 1, got {args.curve_points}")
    suffix = Path(args.out).suffix.lower()
    if single and suffix not in (".html", ".htm"):
        raise InputError(f"--out {args.out}: with --subject the page is one HTML file; give a path ending in .html")
    if not single and suffix in (".html", ".htm"):
        raise InputError(f"--out {args.out}: with --labels the pages and index.html go into a folder; give a folder path")
    return single


def _load_refit(path: str, tokenizer, model, codes: list[str], target_ids: list[int]):
    """The incidence refit, checked as `ehr-prs risk` checks it."""
    from ehr_prs.fits.incidence import load_incidence

    w, bias, tokens, _ = load_incidence(path)
    wanted = tokenizer.convert_ids_to_tokens(sorted(target_ids))
    if set(tokens) != set(wanted):
        raise InputError(f"--incidence-refit {path} was fitted for {len(tokens)} tokens ({', '.join(tokens[:4])}) but "
                         f"--codes {' '.join(codes)} name {len(wanted)} ({', '.join(wanted[:4])}): refit with the same --codes")
    if w.numel() != model.config.hidden_size:
        raise InputError(f"--incidence-refit {path}: {w.numel()} weights, but the model has hidden size "
                         f"{model.config.hidden_size}: it was fitted for another model")
    return w, bias


def _single_row(args, meds) -> tuple[pl.DataFrame, str]:
    """The one (subject, prediction time) row of --subject, checked: the subject exists, T is not before its history."""
    when = parse_time(args.prediction_time)
    index = meds.subject_index()
    hit = index.filter(pl.col("subject_id") == args.subject)
    if hit.height == 0:
        raise InputError(f"--subject {args.subject}: no events for this subject in --meds {args.meds} "
                         f"({index.height} subjects in splits {', '.join(meds.splits)}); give a subject_id of this dataset")
    split = hit["split"][0]
    first = meds.first_event_times(pl.Series([args.subject]), [split])
    if first.height == 0:
        raise InputError(f"--subject {args.subject} has no dated event other than birth in --meds {args.meds}: there is "
                         "no history to forecast from")
    first_time = first["first_time"][0]
    if when < first_time:
        raise InputError(f"--prediction-time {args.prediction_time} is before subject {args.subject}'s first event "
                         f"({_fmt_time(first_time)}): the history would be empty; give a time on or after it")
    rows = pl.DataFrame({"subject_id": [args.subject], "prediction_time": [when]},
                        schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us")})
    return rows, split


def run(args: argparse.Namespace) -> None:
    import torch

    from ehr_prs.data.readers import read_labels, read_meds_dataset, read_prs_table, select_label_rows
    from ehr_prs.checkpoints import load_model_and_tokenizer
    from ehr_prs.risk.sampling import DEATH_CODE
    from ehr_prs.tokenizer import inputs_at_prediction_times
    from ehr_prs.tokenizer.prediction_inputs import warn_if_prs_not_given

    single = _check_args(args)
    inputs = {"--model": args.model, "--meds": args.meds, "--prs": args.prs, "--labels": args.labels,
              "--incidence-refit": args.incidence_refit}
    check_output(args.out, inputs, args.overwrite, kind="file" if single else "dir")
    model, tokenizer, standardizer = load_model_and_tokenizer(args.model)
    config = model.config
    if args.whatif and not config.reads_prs:
        raise InputError(f"--model {args.model} has no genomic adapter (prs_fusion {config.prs_fusion!r}, n_prs "
                         f"{config.n_prs}), so it cannot show a genomic what-if: use a model trained with --prs-fusion "
                         "logit_bias, prefix or cross_attention, or pass --no-whatif for the record and risk curve alone")
    try:
        target_ids = tokenizer.code_token_ids(list(args.codes))
    except input_errors() as err:
        raise InputError(f"--codes: {err}") from err
    method, family_idx, method_note = args.method, None, ""
    if method in ("auto", "hazard"):
        from ehr_prs.time_to_event import target_families

        if not config.has_tte_head:
            if method == "hazard":
                raise InputError(f"--method hazard needs a model with a time-to-event head, and {args.model} has none: "
                                 "pretrain with --tte-families N, or use --method survival")
            method = "survival"
        else:
            try:
                family_idx = target_families(tokenizer, config.tte_families, args.codes)
                method = "hazard"
            except input_errors():
                if method == "hazard":
                    raise
                method, method_note = "survival", "The time-to-event head does not predict these codes: sampled futures."
    if method == "hazard" and args.whatif and model.tte_head.hazard_shift is None:
        raise InputError(f"--model {args.model}: its time-to-event head has no genomic adapter (tte_prs_rank 0), so its "
                         "hazards do not read the PRS: pass --method survival for a what-if from sampled futures, or "
                         "--no-whatif")
    if method == "hazard" and args.incidence_refit:
        raise InputError("--incidence-refit acts on sampled futures; with --method hazard leave it out "
                         "(or pass --method survival)")
    refit = _load_refit(args.incidence_refit, tokenizer, model, args.codes, target_ids) if args.incidence_refit else None
    meds = read_meds_dataset(args.meds)
    prs = read_prs_table(args.prs) if args.prs else None
    if prs is not None and standardizer is None:
        raise InputError(f"--prs was given but {args.model} has no prs_standardizer.json: the model was trained without "
                         "PRS (drop --prs) or its folder is incomplete")
    if args.whatif and prs is None:
        raise InputError("the genomic what-if needs --prs (the person's scores and their ancestry group's percentiles); "
                         "pass --prs FILE, or --no-whatif")
    if config.n_prs and standardizer is not None and standardizer.n_prs != config.n_prs:
        raise InputError(f"{args.model}: PRS standardiser has {standardizer.n_prs} columns, model expects {config.n_prs}")
    if single:
        rows, split = _single_row(args, meds)
    else:
        if args.split not in meds.splits:
            raise InputError(f"--split {args.split!r}: {args.meds} has splits {meds.splits}")
        selection = select_label_rows(meds, read_labels(args.labels), [args.split], args.labels, args.strict_labels)
        print(selection.summary())
        rows, split = selection.rows.head(args.rows), args.split
    warn_if_prs_not_given(config.n_prs if config.reads_prs else 0, prs, args.model)

    prefix = config.num_prefix_tokens
    room = 0 if method == "hazard" else args.max_new_tokens
    max_prompt = max(16, config.max_position_embeddings - prefix - room)  # as `ehr-prs risk`

    def prompts_of(frame: pl.DataFrame, max_length: int = max_prompt):
        data = inputs_at_prediction_times(meds, frame, tokenizer, standardizer if prs is not None else None, prs,
                                          split=split, max_length=max_length)
        p = [list(x) for x in data["input_ids"]]
        if config.n_prs and prs is not None:
            return p, torch.tensor(np.asarray(data["prs"], dtype=np.float32)), torch.tensor(np.asarray(data["prs_mask"], dtype=bool))
        return p, None, None

    stop_ids = [tokenizer.eos_token_id] + ([tokenizer.get_vocab()[DEATH_CODE]] if DEATH_CODE in tokenizer.get_vocab() else [])
    points = args.curve_points or (60 if method == "hazard" else 4)
    fc = Forecaster(model, tokenizer, method, float(args.horizon_days), target_ids, family_idx, args.samples, args.seed,
                    args.max_new_tokens, args.paths_per_batch, args.control_variates, refit, points, stop_ids)
    prompts, prs_t, mask_t = prompts_of(rows)
    n = len(prompts)
    print(f"view: {n} page(s), method {method}" + (f", K={args.samples}, {points} horizons" if method != "hazard" else ""),
          file=sys.stderr)
    curves = {"own": fc.curves(prompts, prs_t, mask_t)}

    whatif_rows: list[dict | None] = [None] * n
    if args.whatif:
        curves["no_genotype"] = fc.curves(prompts, None, None)  # as `ehr-prs risk` without --prs
        group_col = standardizer.group_column
        groups = {}
        if group_col and group_col in prs.frame.columns:
            groups = dict(prs.frame.select("subject_id", pl.col(group_col).cast(pl.String)).iter_rows())
        base = prs_t.clone() if prs_t is not None else torch.zeros(n, config.n_prs)
        low, high = base.clone(), base.clone()
        references: dict = {}
        for i in range(n):
            sid = int(rows["subject_id"][i])
            w, meaning = genomic_weights(model, method, family_idx, target_ids, prompts[i])
            genotyped = bool(mask_t[i]) if mask_t is not None else False
            gval = groups.get(sid) if genotyped else None
            if gval not in references:
                references[gval] = score_reference(standardizer, prs, meds, gval, args.min_cell)
            ref = references[gval]
            moved_idx = np.argsort(-np.abs(w), kind="stable")[: args.whatif_scores]
            moved = []
            for j in moved_idx:
                lo_z, hi_z = (ref.q10[j], ref.q90[j]) if w[j] >= 0 else (ref.q90[j], ref.q10[j])
                low[i, j], high[i, j] = float(lo_z), float(hi_z)
                moved.append({"score": standardizer.columns[j], "weight": float(w[j]),
                              "z": float(base[i, j]) if genotyped else None, "low": float(lo_z), "high": float(hi_z)})
            top = []
            if genotyped:
                contrib = w * base[i].numpy().astype(np.float64)
                for j in np.argsort(-np.abs(contrib), kind="stable")[:10]:
                    top.append({"score": standardizer.columns[j], "z": float(base[i, j]), "weight": float(w[j]),
                                "contribution": float(contrib[j])})
            whatif_rows[i] = {"weights_meaning": meaning, "moved": moved, "top_scores": top,
                              "reference": {"n": ref.n, "group": ref.group, "note": ref.note}}
        ones = torch.ones(n, dtype=torch.bool)
        curves["low"] = fc.curves(prompts, low, ones)
        curves["high"] = fc.curves(prompts, high, ones)

    # Cohort average: same split, same age band and sex, forecast at the same date.
    cohort = Cohort(meds, args.codes)
    cohort_cache: dict = {}
    person_groups = []
    for i in range(n):
        sid, when = int(rows["subject_id"][i]), rows["prediction_time"][i]
        group = cohort.group(split, when)
        me = group.filter(pl.col("subject_id") == sid)
        band, sex = (me["age_band"][0], me["sex"][0]) if me.height else ("unknown", "unknown")
        person_groups.append((band, sex))
        if args.cohort_rows == 0:
            cohort_cache[(when, band, sex, sid)] = ({"shown": False, "text": "No cohort average asked (--cohort-rows 0)."}, None)
            continue
        # Peers: same age band and sex, alive with a history at that date, and not already an outcome case.
        peers = group.filter((pl.col("age_band") == band) & (pl.col("sex") == sex) & (pl.col("subject_id") != sid)
                             & ~pl.col("prevalent"))
        if peers.height < args.min_cell:
            cohort_cache[(when, band, sex, sid)] = (
                {"shown": False, "n": None,
                 "text": f"No cohort average: fewer than {args.min_cell} people of this age band and sex in the "
                         f"{split} split at this date without the outcome (groups under {args.min_cell} are never "
                         "summarised)."}, None)
            continue
        pick = peers.sample(min(args.cohort_rows, peers.height), seed=args.seed, shuffle=True).sort("subject_id")
        frame = pick.select("subject_id", pl.lit(when).cast(pl.Datetime("us")).alias("prediction_time"))
        cp, cprs, cmask = prompts_of(frame)
        c = fc.curves(cp, cprs, cmask, samples=args.cohort_samples)
        mean = Curves(c.horizons, c.risk.mean(0, keepdims=True), c.risk.mean(0, keepdims=True),
                      c.risk.mean(0, keepdims=True))
        if method != "hazard":  # a band for the mean: the spread of the group's per-person estimates
            se = c.risk.std(0, ddof=1, keepdims=True) / math.sqrt(max(c.risk.shape[0], 1))
            mean.lo, mean.hi = np.clip(mean.risk - 1.96 * se, 0, 1), np.clip(mean.risk + 1.96 * se, 0, 1)
        cohort_cache[(when, band, sex, sid)] = (
            {"shown": True, "n": int(peers.height), "n_used": int(pick.height),
             "samples": args.cohort_samples if method != "hazard" else None,
             "text": f"{pick.height} people of age band {band}, sex {sex}"}, mean.row(0))

    # Sampled futures (the model's own generation, with the person's own genome).
    need = [i for i in range(n) if len(prompts[i]) + prefix + args.max_new_tokens > config.max_position_embeddings]
    fprompts = list(prompts)
    if need and args.futures:
        shorter, _, _ = prompts_of(rows[need], max(16, config.max_position_embeddings - prefix - args.max_new_tokens))
        for k, i in enumerate(need):
            fprompts[i] = shorter[k]

    model_name = Path(args.model).name or str(args.model)
    method_text = {"hazard": "time-to-event head, one forward pass",
                   "survival": f"survival estimator, {args.samples} sampled futures per point",
                   "path": f"path estimator, {args.samples} sampled futures per point",
                   "mc": f"fraction of {args.samples} sampled futures per point"}[method]
    settings = (f"method {method}, horizon {args.horizon_days:g} days, seed {args.seed}"
                + (f", K={args.samples}, control variates {'on' if args.control_variates else 'off'}"
                   f"{', incidence refit ' + Path(args.incidence_refit).name if args.incidence_refit else ''}"
                   if method != "hazard" else "")
                + f"; page made {dt.date.today().isoformat()}")
    pages, index_rows = [], []
    for i in range(n):
        sid, when = int(rows["subject_id"][i]), rows["prediction_time"][i]
        record = person_record(meds, sid, split, when)
        timed = record.filter(pl.col("time").is_not_null())
        anchor = timed["time"].max() if timed.height else when
        prior = timed.filter(code_matches(list(args.codes)))
        genotyped = bool(mask_t[i]) if mask_t is not None else False
        band, sex = person_groups[i]
        info, cohort_curve = cohort_cache[(when, band, sex, sid)]
        page_curves = {k: c.row(i) for k, c in curves.items()}
        if cohort_curve is not None:
            page_curves["cohort"] = cohort_curve
        at_h = {k: c["risk"][-1] for k, c in page_curves.items() if k != "cohort"}
        rr = {}
        if "no_genotype" in at_h:
            ref = at_h["no_genotype"]
            rr = {k: (v / ref if ref > 0 else None) for k, v in at_h.items()}
        numeric = timed.filter(pl.col("numeric_value").is_not_null())
        if args.measurements:
            mcodes = [c for c in numeric["code"].unique().sort().to_list() if _matches(c, args.measurements)]
        else:
            counts = numeric.group_by("code").len().sort(["len", "code"], descending=[True, False])
            mcodes = counts["code"].head(6).to_list()
        futures = []
        if args.futures:
            futures = sample_futures(model, tokenizer, fprompts[i], None if prs_t is None else prs_t[i],
                                     None if mask_t is None else mask_t[i], args.futures, args.max_new_tokens,
                                     args.seed, args.horizon_days, set(target_ids), stop_ids)
        gval = None
        if genotyped and standardizer.group_column and standardizer.group_column in prs.frame.columns:
            g = prs.frame.filter(pl.col("subject_id") == sid)[standardizer.group_column]
            gval = None if g.is_empty() or g[0] is None else f"{standardizer.group_column} {g[0]}"
        data = {
            "subject_id": sid, "prediction_time": _fmt_time(when), "split": split, "codes": list(args.codes),
            "horizon_days": float(args.horizon_days), "method": method, "method_text": method_text,
            "method_note": method_note + (" The band is the 95% Monte Carlo interval of the sampled estimate."
                                          if method != "hazard" else ""),
            "sampled": method != "hazard", "seed": args.seed, "samples": args.samples if method != "hazard" else None,
            "row_index": i, "model": model_name, "genotyped": genotyped,
            "person": {"age_band": band, "sex": sex, "group": gval or "no ancestry group"},
            "record": {"n_events": int(timed.height), "n_static": int(record.height - timed.height),
                       "last_event": _fmt_time(anchor), "prompt_tokens": len(prompts[i]),
                       "outcome_codes": int(prior.height),
                       "first_outcome": _fmt_time(prior["time"].min()) if prior.height else None},
            "curves": page_curves, "risk_at_horizon": at_h, "relative_risk": rr, "cohort": info,
            "whatif": whatif_rows[i],
            "whatif_note": "" if args.whatif else "Not shown (--no-whatif).",
            "futures": [[{k: v for k, v in e.items()} for e in f] for f in futures],
            "measurements": mcodes, "settings": settings, "anchor_date": anchor,
        }
        pages.append((data, record, futures, mcodes))
        index_rows.append({"file": f"row_{i + 1:03d}.html", "subject_id": sid, "prediction_time": _fmt_time(when),
                           "genotyped": genotyped, "own": at_h["own"], "no_genotype": at_h.get("no_genotype"),
                           "rr": rr.get("own")})

    from plotly.offline import get_plotlyjs

    if single:
        page = render_page(*pages[0], f"<script>{get_plotlyjs()}</script>", args.max_events)
        with atomic_output_file(args.out, overwrite=args.overwrite) as tmp:
            tmp.write_text(page, encoding="utf-8")
        print(f"wrote {args.out}: subject {index_rows[0]['subject_id']} at {index_rows[0]['prediction_time']}, risk "
              f"{_pct(index_rows[0]['own'])} within {args.horizon_days:g} days ({method})")
        return
    with atomic_output_dir(args.out, overwrite=args.overwrite) as tmp:
        (tmp / "plotly.min.js").write_text(get_plotlyjs(), encoding="utf-8")  # one copy, beside the pages
        for page, row in zip(pages, index_rows):
            html_text = render_page(*page, '<script src="plotly.min.js"></script>', args.max_events)
            (tmp / row["file"]).write_text(html_text, encoding="utf-8")
        (tmp / "index.html").write_text(render_index(index_rows, settings), encoding="utf-8")
    print(f"wrote {args.out}: {len(pages)} pages, index.html and plotly.min.js ({method})")
