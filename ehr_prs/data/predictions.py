"""MEDS prediction files: the one schema every scoring stage writes, and its atomic, NaN-refusing writer."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from ehr_prs.errors import InputError, atomic_output_file

# MEDS prediction files (meds 0.4.1 ships no prediction schema; this follows MEDS-evaluation's).
PREDICTION_SCHEMA = pa.schema([
    pa.field("subject_id", pa.int64(), nullable=False),
    pa.field("prediction_time", pa.timestamp("us"), nullable=False),
    pa.field("boolean_value", pa.bool_(), nullable=False),
    pa.field("predicted_boolean_probability", pa.float64(), nullable=False),
])


def write_predictions(preds: pl.DataFrame, path: str | Path, overwrite: bool = False,
                      source: str | None = None) -> None:
    """Write a MEDS prediction file (PREDICTION_SCHEMA) atomically; an existing file only with `overwrite`.

    A NaN, infinite or missing probability is refused (InputError naming how many rows and `source`,
    the model that produced them): it is a broken model, and a file of them would only fail later,
    in `evaluate`, far from the cause.
    """
    prob = preds["predicted_boolean_probability"].cast(pl.Float64)
    bad = int((prob.is_null() | ~prob.fill_null(0.0).is_finite()).sum())
    if bad:
        raise InputError(
            f"{source or 'the model'} gave {bad:,} of {preds.height:,} rows a NaN, infinite or missing probability: "
            f"not writing {path}. The model is broken (e.g. diverged in training: retrain it with a lower "
            f"--learning-rate) or its inputs hold NaN"
        )
    table = preds.select(PREDICTION_SCHEMA.names).to_arrow().cast(PREDICTION_SCHEMA)
    with atomic_output_file(path, overwrite) as tmp:
        pq.write_table(table, tmp)
