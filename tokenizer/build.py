"""`ehr-prs tokenize`: fit the tokenizer on train, then write one HF dataset per split.

Two streaming passes over the MEDS shards, chunk by chunk (whole subjects per chunk, at most
`rows_per_chunk` events where a shard allows), so memory follows the chunk size, not the cohort:
1. train only: code subject counts and value samples -> vocabulary, bin edges (tokenizer/vocab.py);
2. every split: events -> token ids (tokenizer/encode.py), joined with standardised PRS, written
   to an arrow file with `datasets.ArrowWriter`, then saved with `save_to_disk`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import polars as pl
import pyarrow as pa
from datasets.arrow_writer import ArrowWriter
from tqdm.auto import tqdm

from ehr_prs.errors import InputError, atomic_output_dir, check_output
from ehr_prs.privacy import MIN_SUBJECTS
from ehr_prs.data.readers import KNOWN_SPLITS, MedsDataset, PrsTable, read_meds_dataset, read_prs_table
from ehr_prs.tokenizer.encode import EncodeTables, encode_events, tables_from_tokenizer
from ehr_prs.tokenizer.prs_standardizer import PrsStandardizer
from modeling_ehr_prs.tokenization_ehr import EhrTokenizer
from ehr_prs.tokenizer.vocab import VocabularyCounter

TOKENIZER_DIR = "tokenizer"
SUMMARY_FILE = "tokenize_summary.json"
DEFAULT_ROWS_PER_CHUNK = 2_000_000

FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "prs": datasets.List(datasets.Value("float16")),
        "prs_mask": datasets.Value("bool"),
        "subject_id": datasets.Value("int64"),
        "length": datasets.Value("int32"),
    }
)


def iter_chunks(meds: MedsDataset, split: str, rows_per_chunk: int = DEFAULT_ROWS_PER_CHUNK) -> Iterator[pl.DataFrame]:
    """Events of one split, shard by shard; a large shard is cut into runs of whole subjects."""
    for path in meds.shards[split]:
        lf = meds.scan_file(path, split)
        sizes = lf.group_by("subject_id").len().sort("subject_id").collect()
        if sizes.height == 0:
            continue
        if int(sizes.get_column("len").sum()) <= rows_per_chunk:
            yield lf.collect()
            continue
        bucket = (sizes.get_column("len").cum_sum() - 1) // rows_per_chunk
        ranges = sizes.with_columns(bucket.alias("b")).group_by("b", maintain_order=True).agg(
            pl.col("subject_id").min().alias("lo"), pl.col("subject_id").max().alias("hi")
        )
        for _, lo, hi in ranges.iter_rows():
            yield lf.filter(pl.col("subject_id").is_between(lo, hi)).collect()


def prs_arrow(prs: np.ndarray) -> pa.ListArray:
    """[n, n_prs] float16 -> arrow list<halffloat> with one list of n_prs values per row."""
    n, k = prs.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int64) * k, type=pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(prs.reshape(-1), type=pa.float16()))


def rows_table(encoded: pl.DataFrame, prs: np.ndarray, prs_mask: np.ndarray, extra: dict | None = None) -> pa.Table:
    """One arrow table in the dataset layout (input_ids, prs, prs_mask, subject_id, length, extra...)."""
    cols = {
        "input_ids": encoded.get_column("input_ids").to_arrow().cast(pa.list_(pa.int32())),
        "prs": prs_arrow(prs),
        "prs_mask": pa.array(prs_mask, type=pa.bool_()),
        "subject_id": encoded.get_column("subject_id").to_arrow().cast(pa.int64()),
        "length": encoded.get_column("length").to_arrow().cast(pa.int32()),
    }
    cols.update(extra or {})
    return pa.table(cols)


def encode_split(
    meds: MedsDataset,
    split: str,
    tables: EncodeTables,
    standardizer: PrsStandardizer,
    prs: PrsTable | None,
    max_length: int,
    out_dir: Path,
    work_dir: Path,
    rows_per_chunk: int = DEFAULT_ROWS_PER_CHUNK,
    progress: bool = True,
) -> dict[str, int]:
    """Tokenize one split into a `save_to_disk` dataset at `out_dir`; returns counts."""
    stats = {"subjects": 0, "events": 0, "unknown_events": 0, "tokens": 0, "truncated": 0, "genotyped": 0}
    arrow_path = work_dir / f"{split}.arrow"
    writer = ArrowWriter(features=FEATURES, path=str(arrow_path))
    shards = meds.shards.get(split, [])
    for chunk in tqdm(iter_chunks(meds, split, rows_per_chunk) if shards else [], desc=f"tokenize {split}", unit="chunk",
                      disable=not progress):
        encoded, s = encode_events(chunk, tables, key="subject_id", max_length=max_length)
        prs_z, mask = standardizer.transform(prs.frame if prs else None, encoded.get_column("subject_id"))
        writer.write_table(rows_table(encoded, prs_z, mask))
        for k in ("events", "unknown_events", "tokens", "truncated"):
            stats[k] += s[k]
        stats["subjects"] += encoded.height
        stats["genotyped"] += int(mask.sum())
    writer.finalize()
    writer.close()
    ds = datasets.Dataset.from_file(str(arrow_path))
    if not progress:
        datasets.disable_progress_bars()
    ds.save_to_disk(str(out_dir))
    del ds
    arrow_path.unlink()
    return stats


def _train_subject_ids(meds: MedsDataset) -> pl.Series:
    ids = meds.subject_splits.filter(pl.col("split") == "train").get_column("subject_id")
    if ids.len() == 0:  # nested layout without split rows: the train shards say who is in train
        ids = meds.scan("train").select(pl.col("subject_id").unique()).collect().get_column("subject_id")
    return ids


def build(
    meds_root: str | os.PathLike,
    out: str | os.PathLike,
    prs_path: str | os.PathLike | None = None,
    min_subjects: int = MIN_SUBJECTS,
    max_length: int = 2048,
    n_bins: int = 10,
    min_values: int = 100,
    prs_group_column: str | None = "auto",
    rows_per_chunk: int = DEFAULT_ROWS_PER_CHUNK,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Fit the tokenizer and PRS standardiser on train and write OUT as the tokenize contract says.

    `prs_group_column="auto"` standardises within `ancestry` when the PRS table has that column.
    Returns the summary also written to OUT/tokenize_summary.json. An existing OUT is replaced only
    with `overwrite`, and never when it is, holds or lies inside the MEDS folder or the PRS table.
    """
    t0 = time.perf_counter()
    check_output(out, {"--meds": meds_root, "--prs": prs_path}, overwrite)
    if max_length < 8:
        raise InputError(f"--max-length {max_length} is too short; use at least 8 tokens (2048 is the default).")
    if min_subjects < 1:
        raise InputError(f"--min-subjects {min_subjects} must be at least 1 ({MIN_SUBJECTS} is the All of Us rule).")
    meds = read_meds_dataset(meds_root)
    if "train" not in meds.splits:
        raise InputError(
            f"{meds_root}: this MEDS dataset has no train split (splits: {meds.splits}); the vocabulary and PRS "
            f"statistics are fitted on data/train/ (or subjects with split 'train' in metadata/subject_splits.parquet)."
        )
    prs = read_prs_table(prs_path) if prs_path is not None else None
    if prs is not None and prs_group_column == "auto":
        prs_group_column = "ancestry" if "ancestry" in prs.frame.columns else None
    elif prs_group_column == "auto":
        prs_group_column = None

    counter = VocabularyCounter()
    for chunk in tqdm(iter_chunks(meds, "train", rows_per_chunk), desc="fit vocabulary", unit="chunk", disable=not progress):
        counter.update(chunk)
    if counter.n_events == 0:
        raise InputError(f"{meds_root}: the train split has no events; the vocabulary cannot be fitted.")
    descriptions = {
        c: d for c, d in meds.codes.select("code", "description").drop_nulls().iter_rows()
    }
    state, vocab_summary = counter.fit_state(
        min_subjects=min_subjects, n_bins=n_bins, min_values=min_values, descriptions=descriptions, max_length=max_length
    )
    t_fit = time.perf_counter()
    tok = EhrTokenizer(state=state)
    if prs is not None:
        standardizer = PrsStandardizer.fit(
            prs.frame, prs.score_columns, _train_subject_ids(meds), prs_group_column, min_group_subjects=min_subjects,
            source=str(prs.path),
        )
    else:
        standardizer = PrsStandardizer.empty()
    tables = tables_from_tokenizer(tok)

    split_stats: dict[str, dict] = {}
    split_seconds: dict[str, float] = {}
    with atomic_output_dir(out, overwrite) as tmp:
        tok.save_pretrained(str(tmp / TOKENIZER_DIR))
        standardizer.save(tmp / TOKENIZER_DIR)
        work = tmp / ".work"
        work.mkdir()
        for split in KNOWN_SPLITS:
            s0 = time.perf_counter()
            split_stats[split] = encode_split(
                meds, split, tables, standardizer, prs, max_length, tmp / split, work, rows_per_chunk, progress
            )
            split_seconds[split] = round(time.perf_counter() - s0, 3)
        shutil.rmtree(work)
        total = time.perf_counter() - t0
        events = sum(s["events"] for s in split_stats.values())
        summary = {
            "meds": str(meds_root),
            "prs": str(prs_path) if prs_path else None,
            "min_subjects": min_subjects,
            "max_length": max_length,
            **vocab_summary,
            "n_prs": standardizer.n_prs,
            "prs_group_column": standardizer.group_column if standardizer.n_prs else None,
            "splits": split_stats,
            "seconds": {"fit_vocabulary": round(t_fit - t0, 3), **split_seconds, "total": round(total, 3)},
            "events_per_second": round(events / total, 1) if total > 0 else None,
        }
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    return summary
