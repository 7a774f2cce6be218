"""A tiny hand-made MEDS cohort for the tokenizer tests (deterministic, a few hundred events)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import polars as pl

SPLITS = {"train": range(1, 41), "tuning": range(41, 51), "held_out": range(51, 61)}


def subject_events(sid: int, rng: np.random.Generator) -> list[tuple]:
    """Events of one subject: static sex/race, birth, visits with conditions, labs and drugs."""
    birth = dt.datetime(1940 + sid % 40, 1 + sid % 12, 1)
    rows = [
        (sid, None, "Gender/F" if sid % 2 else "Gender/M", None),
        (sid, None, "Race/White" if sid % 3 else "Race/Black", None),
        (sid, birth, "MEDS_BIRTH", None),
    ]
    t = dt.datetime(2010, 1, 1) + dt.timedelta(days=int(sid * 3))
    for v in range(2 + sid % 4):
        rows.append((sid, t, "Visit/OP", None))
        rows.append((sid, t, "ICD10CM/E11.9" if sid % 2 else "ICD10CM/I10", None))
        rows.append((sid, t, "LOINC/4548-4", float(np.round(5 + rng.gamma(2.0, 0.7), 2))))
        if sid == 7:
            rows.append((sid, t, "ICD10CM/Z99.RARE", None))  # one subject only: below min-subjects
        rows.append((sid, t + dt.timedelta(hours=1), "RxNorm/860975", None))
        rows.append((sid, t + dt.timedelta(hours=2), "Visit/END", None))
        t = t + dt.timedelta(days=int(1 + (sid * 37 + v * 101) % 900))
    return rows


def write_cohort(root: Path, splits: dict[str, range] = SPLITS, extra: dict[int, list[tuple]] | None = None) -> Path:
    """Write a MEDS 0.4 dataset (data/<split>/0.parquet, metadata/) and return its root."""
    rng = np.random.default_rng(0)
    root = Path(root)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    split_rows = []
    for split, ids in splits.items():
        rows = []
        for sid in ids:
            rows += subject_events(sid, rng) + (extra or {}).get(sid, [])
            split_rows.append((sid, split))
        df = pl.DataFrame(
            rows, schema={"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String, "numeric_value": pl.Float32},
            orient="row",
        ).sort("subject_id", "time", nulls_last=False, maintain_order=True)
        (root / "data" / split).mkdir(parents=True, exist_ok=True)
        df.write_parquet(root / "data" / split / "0.parquet")
    pl.DataFrame(split_rows, schema={"subject_id": pl.Int64, "split": pl.String}, orient="row").write_parquet(
        root / "metadata" / "subject_splits.parquet"
    )
    pl.DataFrame(
        {"code": ["ICD10CM/E11.9", "LOINC/4548-4"], "description": ["Type 2 diabetes mellitus", "Hemoglobin A1c"]}
    ).write_parquet(root / "metadata" / "codes.parquet")
    (root / "metadata" / "dataset.json").write_text(
        json.dumps({"dataset_name": "tiny", "dataset_version": "0", "etl_name": "tests", "etl_version": "0",
                    "meds_version": "0.4.1", "created_at": "2026-01-01T00:00:00"})
    )
    return root


def write_prs(path: Path, ids: range = range(1, 61), n_prs: int = 4, genotyped_every: int = 3) -> Path:
    """A wide PRS table; every `genotyped_every`-th subject is absent (not genotyped)."""
    rng = np.random.default_rng(1)
    keep = [i for i in ids if i % genotyped_every]
    data = {"subject_id": keep, "ancestry": ["EUR" if i % 2 else "AFR" for i in keep]}
    for j in range(n_prs):
        data[f"PGS{j + 1:06d}"] = (rng.normal(3.0 * j, 1.0 + j, len(keep))).astype(np.float32)
    pl.DataFrame(data).write_parquet(path)
    return path
