"""`ehr-prs tokenize`: fit the tokenizer on train, then write one HF dataset per split.

Two streaming passes over the MEDS shards, chunk by chunk (whole subjects per chunk, at most
`rows_per_chunk` events where a shard allows), so memory follows the chunk size, not the cohort:
1. train only: code subject counts and value samples -> vocabulary, bin edges (tokenizer/vocab.py);
2. every split: events -> token ids (tokenizer/encode.py), joined with standardised PRS, written
   with `datasets.ArrowWriter` straight into `save_to_disk`'s layout (`SplitWriter`).
The PRS table is never read whole: `scan_prs_table` keeps its subject ids, the standardiser is
fitted in one streamed pass (`PrsStandardizer.fit_scan`), and each chunk reads the scores of its
own subjects only (`PrsScan.subjects`), so memory follows the chunk, not the cohort.
"""

from __future__ import annotations

import contextlib
import hashlib
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
from ehr_prs.data.readers import KNOWN_SPLITS, MedsDataset, PrsScan, read_meds_dataset, scan_prs_table
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


class SplitWriter:
    """Writes a split's rows straight into the folder layout of `Dataset.save_to_disk`.

    Shards data-XXXXX-of-NNNNN.arrow of at most `datasets.config.MAX_SHARD_SIZE` each, then the
    state.json and dataset_info.json that `datasets.load_from_disk` reads (taken from datasets'
    own `save_to_disk` of an empty dataset with these features, so their format is datasets').
    Writing once replaces writing one arrow file and copying it with `save_to_disk`, which read it
    back through a memory map: every page of the split became resident in this process (~6 GB
    for the train split of 1 M subjects with 3,481 scores) and the data was written twice.
    """

    def __init__(self, out_dir: Path, features: datasets.Features = FEATURES, max_shard_bytes: int | None = None):
        from datasets.utils.py_utils import convert_file_size_to_int

        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.features = features
        self.max_shard_bytes = max_shard_bytes or convert_file_size_to_int(datasets.config.MAX_SHARD_SIZE)
        self.paths: list[Path] = []
        self.rows = 0
        self._writer: ArrowWriter | None = None
        self._shard_bytes = 0

    def _open_shard(self) -> None:
        if self._writer is not None:
            self._writer.finalize()
            self._writer.close()
        path = self.out_dir / f"shard-{len(self.paths):05d}.arrow"
        self.paths.append(path)
        self._writer = ArrowWriter(features=self.features, path=str(path))
        self._shard_bytes = 0

    def write_table(self, table: pa.Table) -> None:
        """Append rows; a new shard starts when this table would take the current one past the size limit."""
        if self._writer is None or (self._shard_bytes and self._shard_bytes + table.nbytes > self.max_shard_bytes):
            self._open_shard()
        self._writer.write_table(table)
        self._shard_bytes += table.nbytes
        self.rows += table.num_rows

    def close(self) -> None:
        """Finish the last shard, give the shards their final names and write datasets' state files."""
        if self._writer is None:  # no rows: one empty shard, so that the folder still loads
            self._open_shard()
        self._writer.finalize()
        self._writer.close()
        n = len(self.paths)
        names = [f"data-{i:05d}-of-{n:05d}.arrow" for i in range(n)]
        for path, name in zip(self.paths, names):
            path.rename(self.out_dir / name)
        template = self.out_dir / ".template"
        empty = datasets.Dataset.from_dict({k: [] for k in self.features}, features=self.features)
        with _progress_bars(False):
            empty.save_to_disk(str(template))
        state = json.loads((template / datasets.config.DATASET_STATE_JSON_FILENAME).read_text())
        state["_data_files"] = [{"filename": name} for name in names]
        digest = hashlib.sha256(json.dumps([self.out_dir.name, self.rows, [(self.out_dir / m).stat().st_size
                                                                          for m in names]]).encode())
        state["_fingerprint"] = digest.hexdigest()[:16]
        (self.out_dir / datasets.config.DATASET_STATE_JSON_FILENAME).write_text(json.dumps(state, indent=2, sort_keys=True))
        (template / datasets.config.DATASET_INFO_FILENAME).rename(self.out_dir / datasets.config.DATASET_INFO_FILENAME)
        shutil.rmtree(template)


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """datasets' progress bars on or off for a block, restored afterwards."""
    was = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was else datasets.disable_progress_bars)()


def encode_split(
    meds: MedsDataset,
    split: str,
    tables: EncodeTables,
    standardizer: PrsStandardizer,
    prs: PrsScan | None,
    max_length: int,
    out_dir: Path,
    rows_per_chunk: int = DEFAULT_ROWS_PER_CHUNK,
    progress: bool = True,
) -> dict[str, int]:
    """Tokenize one split into a `load_from_disk` dataset at `out_dir`; returns counts.

    Each chunk reads the PRS rows of its own subjects only (`prs.subjects`) and is written
    straight to the dataset's shards (`SplitWriter`): memory follows the chunk, not the split.
    """
    stats = {"subjects": 0, "events": 0, "unknown_events": 0, "tokens": 0, "truncated": 0, "genotyped": 0}
    writer = SplitWriter(out_dir)
    shards = meds.shards.get(split, [])
    for chunk in tqdm(iter_chunks(meds, split, rows_per_chunk) if shards else [], desc=f"tokenize {split}", unit="chunk",
                      disable=not progress):
        encoded, s = encode_events(chunk, tables, key="subject_id", max_length=max_length)
        ids = encoded.get_column("subject_id")
        prs_z, mask = standardizer.transform(prs.subjects(ids).frame if prs else None, ids)
        writer.write_table(rows_table(encoded, prs_z, mask))
        for k in ("events", "unknown_events", "tokens", "truncated"):
            stats[k] += s[k]
        stats["subjects"] += encoded.height
        stats["genotyped"] += int(mask.sum())
    writer.close()
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
    prs = scan_prs_table(prs_path) if prs_path is not None else None
    if prs is not None and prs_group_column == "auto":
        prs_group_column = "ancestry" if "ancestry" in prs.columns else None
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
        standardizer = PrsStandardizer.fit_scan(
            prs, _train_subject_ids(meds), prs_group_column, min_group_subjects=min_subjects, source=str(prs.path),
        )
    else:
        standardizer = PrsStandardizer.empty()
    tables = tables_from_tokenizer(tok)

    split_stats: dict[str, dict] = {}
    split_seconds: dict[str, float] = {}
    with atomic_output_dir(out, overwrite) as tmp:
        tok.save_pretrained(str(tmp / TOKENIZER_DIR))
        standardizer.save(tmp / TOKENIZER_DIR)
        for split in KNOWN_SPLITS:
            s0 = time.perf_counter()
            split_stats[split] = encode_split(
                meds, split, tables, standardizer, prs, max_length, tmp / split, rows_per_chunk, progress
            )
            split_seconds[split] = round(time.perf_counter() - s0, 3)
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
