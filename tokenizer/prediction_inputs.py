"""Model inputs at prediction times: one row per label, built only from events up to that time.

Used by the risk engine, the baselines and fine-tuning, so that the no-leakage rule lives in
one place: an event reaches a label row's `input_ids` only if its time is null (a static fact)
or `time <= prediction_time`. Sequences are built by the same encoder as pretraining data
(tokenizer/encode.py), so a prompt looks exactly like a training history cut at that time.

Which label rows get here is decided before, by `ehr_prs.data.readers.select_label_rows`
(the one label policy of every command). This module adds the warnings about the inputs
themselves: PRS scores that are missing, a model that reads PRS run without them, and
histories whose codes the tokenizer mostly does not know.
"""

from __future__ import annotations

import datasets
import numpy as np
import polars as pl
import pyarrow as pa

from ehr_prs.errors import InputError
from ehr_prs.data.readers import MedsDataset, PrsTable, warn
from ehr_prs.tokenizer.build import DEFAULT_ROWS_PER_CHUNK, iter_chunks, rows_table
from ehr_prs.tokenizer.encode import BIRTH_CODE, encode_events, tables_from_tokenizer
from ehr_prs.tokenizer.prs_standardizer import PrsStandardizer
from modeling_ehr_prs.tokenization_ehr import EhrTokenizer

# Above this share of events with codes unknown to the tokenizer, the model is warned to be on foreign data.
UNKNOWN_CODE_WARNING = 0.5


def warn_if_prs_not_given(n_prs_read: int, prs: PrsTable | None, model_dir: str) -> None:
    """One warning when a model that reads PRS (`n_prs_read` > 0) is run without --prs."""
    if n_prs_read and prs is None:
        warn(f"--model {model_dir} was trained with {n_prs_read} PRS columns but no --prs was given: every subject "
             f"counts as not genotyped (the model's learned 'no genotype' input); pass --prs FILE to use the scores.")


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
    the searched data raises InputError naming the subject (commands drop such rows first with
    `select_label_rows`). PRS columns are matched by name. Warns (one line each) when PRS scores
    of genotyped subjects are missing and when more than UNKNOWN_CODE_WARNING of the events
    have codes the tokenizer does not know. If `stats` is a dict it receives the counts (events,
    unknown_events, tokens, truncated, rows, genotyped, imputed_prs_cells).
    """
    if prs is not None and standardizer is None:
        raise InputError("a PRS table was given without the PRS standardiser fitted at tokenize time "
                         "(PrsStandardizer.load(tokenizer_dir)).")
    standardizer = standardizer or PrsStandardizer.empty()
    if prs is not None:
        standardizer.check_columns(prs.score_columns, str(prs.path), prs.frame.columns)
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
    unknown_codes: list[str] = []  # a few examples for the warning
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
            if s_counts["unknown_events"] and len(unknown_codes) < 3:
                codes = events.select(pl.col("code").unique().sort()).filter(pl.col("code") != BIRTH_CODE)
                unknown_codes += codes.join(tables.codes, on="code", how="anti")["code"].head(3).to_list()
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
    if counts["events"] and counts["unknown_events"] > UNKNOWN_CODE_WARNING * counts["events"]:
        examples = ", ".join(dict.fromkeys(unknown_codes[:3]))
        warn(f"{meds.root}: {counts['unknown_events'] / counts['events']:.0%} of the {counts['events']} events in these "
             f"histories have codes the model's tokenizer does not know (e.g. {examples}): the model was trained on "
             f"other data or another coding, and its predictions rest on the few codes it knows.")
    prs_stats: dict = {}
    prs_z, mask = standardizer.transform(prs.frame if prs else None, frame.get_column("subject_id"), prs_stats)
    note = standardizer.missing_note(prs_stats, str(prs.path)) if prs is not None else None
    if note:
        warn(note)
    table = rows_table(
        frame, prs_z, mask,
        extra={
            "prediction_time": frame.get_column("prediction_time").to_arrow().cast(pa.timestamp("us")),
            "boolean_value": frame.get_column("boolean_value").to_arrow(),
        },
    )
    if stats is not None:
        stats.update(counts, rows=frame.height, genotyped=int(np.count_nonzero(mask)),
                     imputed_prs_cells=prs_stats.get("imputed_cells", 0))
    return datasets.Dataset(table)
