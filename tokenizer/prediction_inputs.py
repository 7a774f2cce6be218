"""Model inputs at prediction times: one row per label, built only from events up to that time.

Used by the risk engine, the baselines and fine-tuning, so that the no-leakage rule lives in
one place: an event reaches a label row's `input_ids` only if its time is null (a static fact)
or `time <= prediction_time`. Sequences are built by the same encoder as pretraining data
(tokenizer/encode.py), so a prompt looks exactly like a training history cut at that time.
"""

from __future__ import annotations

import datasets
import numpy as np
import polars as pl
import pyarrow as pa

from modeling_ehr_prs.errors import InputError
from modeling_ehr_prs.readers import MedsDataset, PrsTable
from tokenizer.build import DEFAULT_ROWS_PER_CHUNK, iter_chunks, rows_table
from tokenizer.encode import encode_events, tables_from_tokenizer
from tokenizer.prs_standardizer import PrsStandardizer
from tokenizer.tokenization_ehr import EhrTokenizer


def inputs_at_prediction_times(
    meds: MedsDataset,
    labels: pl.DataFrame,
    tokenizer: EhrTokenizer,
    standardizer: PrsStandardizer | None = None,
    prs: PrsTable | None = None,
    split: str | None = None,
    max_length: int | None = None,
    stats: dict | None = None,
    rows_per_chunk: int = DEFAULT_ROWS_PER_CHUNK,
) -> datasets.Dataset:
    """One dataset row per label row, in the label file's order.

    Columns: input_ids (int32, events with time <= prediction_time only, most recent kept when
    longer than `max_length`, default the tokenizer's model_max_length), prs (float16 [n_prs],
    zeros where not genotyped), prs_mask, subject_id, prediction_time, boolean_value, length.
    `split` limits the search to one split's shards (faster); a label whose subject is not in
    the searched data raises InputError naming the subject. If `stats` is a dict it receives
    the counts (events, unknown_events, tokens, truncated).
    """
    if prs is not None and standardizer is None:
        raise InputError("a PRS table was given without the PRS standardiser fitted at tokenize time "
                         "(PrsStandardizer.load(tokenizer_dir)).")
    standardizer = standardizer or PrsStandardizer.empty()
    if prs is not None:
        standardizer.check_columns(prs.score_columns, str(prs.path))
    max_length = int(max_length or tokenizer.model_max_length)
    tables = tables_from_tokenizer(tokenizer)
    cols = ["subject_id", "prediction_time", "boolean_value"]
    missing_cols = [c for c in cols[:2] if c not in labels.columns]
    if missing_cols:
        raise InputError(f"labels have no column(s) {missing_cols}; MEDS labels need subject_id and prediction_time.")
    lab = labels.select(
        pl.col("subject_id").cast(pl.Int64),
        pl.col("prediction_time").cast(pl.Datetime("us")),
        (pl.col("boolean_value").cast(pl.Boolean) if "boolean_value" in labels.columns
         else pl.lit(None, dtype=pl.Boolean).alias("boolean_value")),
    ).with_row_index("label_row").with_columns(pl.col("label_row").cast(pl.Int64))
    label_subjects = lab.select(pl.col("subject_id").unique())

    parts: list[pl.DataFrame] = []
    found: list[pl.Series] = []
    counts = {"events": 0, "unknown_events": 0, "tokens": 0, "truncated": 0}
    for s in [split] if split else meds.splits:
        if s not in meds.shards:
            raise InputError(f"{meds.root}: no split {s!r}; this MEDS dataset has {meds.splits}.")
        for chunk in iter_chunks(meds, s, rows_per_chunk):
            chunk = chunk.join(label_subjects, on="subject_id", how="semi", maintain_order="left")
            if chunk.height == 0:
                continue
            found.append(chunk.get_column("subject_id").unique())
            rows = lab.join(chunk.select(pl.col("subject_id").unique()), on="subject_id", how="semi")
            # One copy of a subject's history per label row, cut at that row's prediction time.
            events = chunk.join(
                rows.select("label_row", "subject_id", "prediction_time"), on="subject_id", how="inner",
                maintain_order="left",
            ).filter(pl.col("time").is_null() | (pl.col("time") <= pl.col("prediction_time")))
            encoded, s_counts = encode_events(
                events.select("label_row", "time", "code", "numeric_value"), tables, key="label_row", max_length=max_length
            )
            for k in counts:
                counts[k] += s_counts[k]
            parts.append(rows.join(encoded, on="label_row", how="left"))

    present = pl.concat(found).unique() if found else pl.Series("subject_id", [], dtype=pl.Int64)
    absent = label_subjects.filter(~pl.col("subject_id").is_in(present.implode()))
    if absent.height:
        where = f"split {split!r}" if split else f"splits {meds.splits}"
        raise InputError(
            f"labels name {absent.height} subject(s) with no events in the MEDS data at {meds.root} ({where}), "
            f"e.g. subject {absent.get_column('subject_id').sort()[0]}; every labelled subject must be in the data."
        )
    frame = pl.concat(parts).sort("label_row") if parts else lab.with_columns(
        pl.lit(None, dtype=pl.List(pl.Int32)).alias("input_ids"), pl.lit(None, dtype=pl.Int32).alias("length")
    )
    # A label row before any of its subject's events still gets a prompt: <bos> alone.
    frame = frame.with_columns(
        pl.col("input_ids").fill_null(pl.lit([tables.bos_id], dtype=pl.List(pl.Int32))),
        pl.col("length").fill_null(1).cast(pl.Int32),
    )
    prs_z, mask = standardizer.transform(prs.frame if prs else None, frame.get_column("subject_id"))
    table = rows_table(
        frame, prs_z, mask,
        extra={
            "prediction_time": frame.get_column("prediction_time").to_arrow().cast(pa.timestamp("us")),
            "boolean_value": frame.get_column("boolean_value").to_arrow(),
        },
    )
    if stats is not None:
        stats.update(counts, rows=frame.height, genotyped=int(np.count_nonzero(mask)))
    return datasets.Dataset(table)
