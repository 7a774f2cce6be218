"""Fit the tokenizer state on the training split: codes, per-code value-bin edges, time scheme.

One streaming pass over the training chunks. Per code it keeps the number of distinct subjects
(a subject lives in one shard, so per-chunk counts add up) and a bounded, uniform sample of its
numeric values: the values with the smallest hashes, a bottom-k sample that merges chunk by
chunk, so memory does not grow with the cohort and the same input gives the same edges. The
edges are quantiles of that sample (exact whenever a code has at most `value_sample` values).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import polars as pl

from ehr_prs.errors import InputError
from ehr_prs.privacy import MIN_SUBJECTS
from ehr_prs.tokenizer.encode import BIRTH_CODE
from ehr_prs.tokenizer.time_tokens import age_tokens, default_time_scheme
from modeling_ehr_prs.tokenization_ehr import FORMAT_NAME, FORMAT_VERSION, PREFIX_PATTERN, SPECIAL_TOKENS, UNK_SUFFIX


class VocabularyCounter:
    """Accumulates subject counts per code and a bottom-k value sample per code over chunks."""

    def __init__(self, value_sample: int = 10_000):
        self.value_sample = value_sample
        self._counts: pl.DataFrame | None = None
        self._prefix_counts: pl.DataFrame | None = None
        self._sample: pl.DataFrame | None = None
        self._chunk = 0
        self.n_subjects = 0
        self.n_events = 0

    def update(self, events: pl.DataFrame) -> None:
        """Add one chunk of whole subjects (subject_id, time, code, numeric_value)."""
        self._chunk += 1
        self.n_subjects += events.get_column("subject_id").n_unique()
        self.n_events += events.height
        with_value = pl.col("numeric_value").is_not_null() & pl.col("numeric_value").is_not_nan()
        # Distinct (subject, code) pairs once; prefixes are looked up on distinct codes only.
        pairs = events.select("subject_id", "code").unique()
        counts = pairs.group_by("code").agg(pl.len().cast(pl.Int64).alias("n_subjects"))
        value_counts = events.filter(with_value).group_by("code").agg(
            pl.col("subject_id").n_unique().cast(pl.Int64).alias("n_value_subjects"),
            pl.len().cast(pl.Int64).alias("n_values"),
        )
        counts = counts.join(value_counts, on="code", how="left").fill_null(0)
        code_prefix = counts.select("code", pl.col("code").str.extract(PREFIX_PATTERN, 1).alias("prefix")).drop_nulls()
        prefixes = (
            pairs.join(code_prefix, on="code").select("subject_id", "prefix").unique()
            .group_by("prefix").agg(pl.len().cast(pl.Int64).alias("n_subjects"))
        )
        # Bottom-k sample: hash of (chunk number, row number) is a deterministic random priority.
        values = events.filter(with_value).select(
            "code",
            pl.col("numeric_value").cast(pl.Float64),
            pl.int_range(pl.len(), dtype=pl.UInt64).hash(seed=self._chunk).alias("h"),
        )
        self._counts = _add(self._counts, counts, "code", ["n_subjects", "n_value_subjects", "n_values"])
        self._prefix_counts = _add(self._prefix_counts, prefixes, "prefix", ["n_subjects"])
        merged = values if self._sample is None else pl.concat([self._sample, values])
        self._sample = merged.sort("code", "h").group_by("code", maintain_order=True).head(self.value_sample)

    def fit_state(
        self,
        min_subjects: int = MIN_SUBJECTS,
        n_bins: int = 10,
        min_values: int = 100,
        descriptions: dict[str, str] | None = None,
        max_length: int = 2048,
    ) -> tuple[dict, dict]:
        """The tokenizer JSON state and a summary (numbers only, nothing under `min_subjects`)."""
        if self._counts is None:
            raise ValueError("no training events seen")
        counts = self._counts.filter(pl.col("code") != BIRTH_CODE)
        kept = counts.filter(pl.col("n_subjects") >= min_subjects).sort("code")
        if kept.height == 0:
            # An empty vocabulary would tokenize every event as <unk>: refuse, and say what would work.
            top = counts.sort(["n_subjects", "code"], descending=[True, False]).head(1)
            if top.height == 0:
                raise InputError("the train split has no codes other than MEDS_BIRTH; the vocabulary cannot be fitted.")
            best, code = int(top["n_subjects"][0]), top["code"][0]
            raise InputError(
                f"--min-subjects {min_subjects}: no code is seen in that many of the {self.n_subjects} train subjects, "
                f"so the vocabulary would be empty; the most widespread code ({code}) is in {best}. "
                f"Use --min-subjects {best} or lower."
            )
        codes = kept.get_column("code").to_list()
        binned = kept.filter((pl.col("n_values") >= min_values) & (pl.col("n_value_subjects") >= min_subjects))
        edges: dict[str, list[float]] = {}
        probs = np.arange(1, n_bins) / n_bins
        sample = self._sample.filter(pl.col("code").is_in(binned.get_column("code").implode()))
        for code, vals in sample.group_by("code").agg(pl.col("numeric_value")).sort("code").iter_rows():
            e = np.unique(np.quantile(np.asarray(vals, dtype=np.float64), probs))
            edges[code] = [float(f"{x:.7g}") for x in e]
        prefixes = sorted(
            self._prefix_counts.filter(pl.col("n_subjects") >= min_subjects).get_column("prefix").to_list()
        )
        scheme = default_time_scheme()
        tokens = list(SPECIAL_TOKENS)
        tokens += [p + UNK_SUFFIX for p in prefixes]
        tokens += [t for t, _ in scheme]
        tokens += age_tokens()
        tokens += [f"Q{i}" for i in range(1, n_bins + 1)]
        clash = set(codes) & set(tokens)
        if clash:
            raise ValueError(f"MEDS codes clash with tokenizer tokens: {sorted(clash)[:5]}")
        tokens += codes
        descriptions = descriptions or {}
        state = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "tokens": tokens,
            "codes": codes,
            "time_scheme": [[t, d] for t, d in scheme],
            "time_token_days": {t: d for t, d in scheme},
            "n_value_bins": n_bins,
            "bin_edges": edges,
            "descriptions": {c: descriptions[c] for c in codes if descriptions.get(c)},
            "min_subjects": min_subjects,
            "max_length": max_length,
        }
        summary = {
            "train_subjects": self.n_subjects,
            "train_events": self.n_events,
            "codes_seen": counts.height,
            "codes_in_vocab": len(codes),
            "codes_dropped_min_subjects": counts.height - len(codes),
            "codes_with_value_bins": len(edges),
            "unknown_prefix_tokens": len(prefixes),
            "vocab_size": len(tokens),
        }
        return state, summary


def _add(acc: pl.DataFrame | None, new: pl.DataFrame, key: str, cols: list[str]) -> pl.DataFrame:
    """Sum count columns of two frames keyed by `key` (outer join)."""
    if acc is None:
        return new
    both = pl.concat([acc, new.select(acc.columns)])
    return both.group_by(key).agg(pl.col(c).sum() for c in cols)


def fit_vocabulary(chunks: Iterable[pl.DataFrame], **kwargs) -> tuple[dict, dict]:
    """Fit a tokenizer state on training chunks; kwargs go to `VocabularyCounter.fit_state`."""
    counter = VocabularyCounter(value_sample=kwargs.pop("value_sample", 10_000))
    for chunk in chunks:
        counter.update(chunk)
    return counter.fit_state(**kwargs)

