"""Events -> token-id sequences, vectorised: one polars join for codes, numpy for the rest.

A chunk of events (whole subjects, or whole label rows) becomes one token sequence per key:

    <bos> static tokens (sorted) [AGE/a] event event ...      event = [TIME/gap] code [Q_bin]

Static facts are rows with a null time. `MEDS_BIRTH` is not written as a token: the age token
at the first kept event carries it. A time token goes before an event more than a day after the
previous one. Histories longer than `max_length` keep the static prefix and the most recent
whole events; the first kept event then loses its time token (the gap to a dropped event says
nothing) and the age token is the age at that first kept event.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from ehr_prs.tokenizer.time_tokens import DAYS_PER_YEAR, MAX_GAP_DAYS, age_bin_index, age_tokens, gap_lookup
from modeling_ehr_prs.tokenization_ehr import BOS, PREFIX_PATTERN, UNK, UNK_SUFFIX, EhrTokenizer

BIRTH_CODE = "MEDS_BIRTH"
US_PER_DAY = 86_400_000_000


@dataclass
class EncodeTables:
    """Lookup tables derived once from a tokenizer for fast bulk encoding."""

    codes: pl.DataFrame  # code String, code_id Int32, bin_row Int32 (null: no bins)
    prefix_ids: dict[str, int]
    unk_id: int
    bos_id: int
    time_ids: np.ndarray  # [MAX_GAP_DAYS + 1] gap in whole days -> token id, -1 below a day
    age_ids: np.ndarray  # [n_age_bins] token ids
    edges: np.ndarray  # [n_bin_codes, n_bins - 1] interior edges, +inf padded
    q_ids: np.ndarray  # [n_bins] ids of Q1..Qn


def tables_from_tokenizer(tok: EhrTokenizer) -> EncodeTables:
    """Build the bulk-encoding tables from a tokenizer's JSON state."""
    state = tok.state
    vocab = tok.get_vocab()
    codes = list(state["codes"])
    bin_codes = sorted(state.get("bin_edges", {}))
    n_bins = int(state.get("n_value_bins", 10))
    bin_row = {c: i for i, c in enumerate(bin_codes)}
    frame = pl.DataFrame(
        {
            "code": codes,
            "code_id": [vocab[c] for c in codes],
            "bin_row": [bin_row.get(c) for c in codes],
        },
        schema={"code": pl.String, "code_id": pl.Int32, "bin_row": pl.Int32},
    )
    edges = np.full((max(len(bin_codes), 1), max(n_bins - 1, 1)), np.inf)
    for i, c in enumerate(bin_codes):
        e = state["bin_edges"][c]
        edges[i, : len(e)] = e
    scheme = [(t, d) for t, d in state["time_scheme"]]
    lut = gap_lookup(scheme)
    scheme_ids = np.array([vocab[t] for t, _ in scheme], dtype=np.int32)
    time_ids = np.where(lut >= 0, scheme_ids[np.clip(lut, 0, None)], -1).astype(np.int32)
    prefix_ids = {t[: -len(UNK_SUFFIX)]: i for t, i in vocab.items() if t.endswith(UNK_SUFFIX)}
    return EncodeTables(
        codes=frame,
        prefix_ids=prefix_ids,
        unk_id=vocab[UNK],
        bos_id=vocab[BOS],
        time_ids=time_ids,
        age_ids=np.array([vocab[t] for t in age_tokens()], dtype=np.int32),
        edges=edges,
        q_ids=np.array([vocab[f"Q{i}"] for i in range(1, n_bins + 1)], dtype=np.int32),
    )


def _concat_segments(n_keys: int, parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate, per key, segments from several sources (each: flat values, counts per key).

    Returns (values, offsets[n_keys + 1]) with key k's values at values[offsets[k]:offsets[k+1]]
    in the order of `parts`.
    """
    counts = np.zeros(n_keys, dtype=np.int64)
    for _, c in parts:
        counts += c
    offsets = np.zeros(n_keys + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    out = np.empty(int(offsets[-1]), dtype=np.int32)
    base = offsets[:-1].copy()
    for flat, c in parts:
        src_start = np.zeros(n_keys, dtype=np.int64)
        np.cumsum(c[:-1], out=src_start[1:])
        dest = np.repeat(base - src_start, c) + np.arange(len(flat))
        out[dest] = flat
        base += c
    return out, offsets


def _counts_per_key(sorted_keys: np.ndarray, row_keys: np.ndarray) -> np.ndarray:
    """How many rows (with keys sorted ascending) belong to each of `sorted_keys`."""
    lo = np.searchsorted(row_keys, sorted_keys, side="left")
    hi = np.searchsorted(row_keys, sorted_keys, side="right")
    return (hi - lo).astype(np.int64)


def _is_sorted(k: np.ndarray, t: np.ndarray) -> bool:
    """True when rows are ordered by key, then time (a stable sort would change nothing)."""
    if len(k) < 2:
        return True
    dk = np.diff(k)
    return bool(np.all(dk >= 0) and np.all((dk > 0) | (np.diff(t) >= 0)))


def encode_events(
    events: pl.DataFrame, tables: EncodeTables, key: str = "subject_id", max_length: int | None = None
) -> tuple[pl.DataFrame, dict[str, int]]:
    """Encode a chunk of events into one token sequence per key.

    `events` has columns key (Int64), time (Datetime us, null = static), code (String) and
    numeric_value (Float32); every row of a key must be in this chunk. Returns a frame
    (key, input_ids List[Int32], length Int32) sorted by key, and counts: events, unknown_events,
    tokens, truncated.
    """
    events = events.select(
        pl.col(key).cast(pl.Int64), pl.col("time"), pl.col("code"), pl.col("numeric_value").cast(pl.Float64)
    )
    keys = events.get_column(key).unique().sort().to_numpy()
    n_keys = len(keys)
    is_birth = pl.col("code") == BIRTH_CODE
    birth = events.filter(is_birth & pl.col("time").is_not_null()).group_by(key).agg(pl.col("time").min())
    rest = events.filter(~is_birth).join(tables.codes, on="code", how="left", maintain_order="left")
    unknown = pl.col("code_id").is_null()
    n_unknown = int(rest.select(unknown.sum()).item())
    if n_unknown:
        # Only unknown rows pay for the prefix lookup (`ICD10CM/<unk>`, else `<unk>`).
        prefix_id = (
            pl.col("code").str.extract(PREFIX_PATTERN, 1)
            .replace_strict(tables.prefix_ids, default=tables.unk_id, return_dtype=pl.Int32)
        )
        rest = rest.with_columns(pl.when(unknown).then(prefix_id).otherwise(pl.col("code_id")).alias("code_id"))

    static = rest.filter(pl.col("time").is_null()).select(key, "code_id").unique().sort(key, "code_id")
    static_keys = static.get_column(key).to_numpy()
    static_counts = _counts_per_key(keys, static_keys)

    ev = rest.filter(pl.col("time").is_not_null())
    k = ev.get_column(key).to_numpy()
    t = ev.get_column("time").cast(pl.Int64).to_numpy()
    if not _is_sorted(k, t):  # MEDS shards are sorted by subject and time; sort only when not
        ev = ev.sort(key, "time", maintain_order=True)
        k = ev.get_column(key).to_numpy()
        t = ev.get_column("time").cast(pl.Int64).to_numpy()
    code_ids = ev.get_column("code_id").to_numpy().astype(np.int32)
    n = len(k)

    # Time tokens: gap in whole days to the previous event of the same key.
    same = np.zeros(n, dtype=bool)
    same[1:] = k[1:] == k[:-1]
    gap = np.zeros(n, dtype=np.int64)
    gap[1:] = (t[1:] - t[:-1]) // US_PER_DAY
    time_tok = np.where(same, tables.time_ids[np.clip(gap, 0, MAX_GAP_DAYS)], -1).astype(np.int32)

    # Value bins: count of a code's interior edges at or below the value -> Q1..Qn.
    bin_tok = np.full(n, -1, dtype=np.int32)
    rows = ev.get_column("bin_row").to_numpy(allow_copy=True)
    vals = ev.get_column("numeric_value").to_numpy(allow_copy=True)
    has = ~np.isnan(rows.astype(np.float64)) & ~np.isnan(vals) if n else np.zeros(0, dtype=bool)
    if has.any():
        r = rows[has].astype(np.int64)
        b = (vals[has, None] >= tables.edges[r]).sum(axis=1)  # [n_has]
        bin_tok[has] = tables.q_ids[b]

    # Truncation: keep the most recent whole events that fit after the static prefix.
    ev_counts = _counts_per_key(keys, k)
    starts = np.zeros(n_keys, dtype=np.int64)
    np.cumsum(ev_counts[:-1], out=starts[1:])
    n_tok = 1 + (time_tok >= 0) + (bin_tok >= 0)
    no_birth = np.iinfo(np.int64).min
    birth = birth.sort(key)
    birth_t = np.full(n_keys, no_birth, dtype=np.int64)
    birth_t[np.searchsorted(keys, birth.get_column(key).to_numpy())] = birth.get_column("time").cast(pl.Int64).to_numpy()
    has_birth = birth_t != no_birth
    has_age = has_birth & (ev_counts > 0)
    keep = np.ones(n, dtype=bool)
    nonempty = ev_counts > 0
    if max_length is not None and n:
        budget = max_length - (1 + static_counts + has_age.astype(np.int64))  # [n_keys]
        totals = np.zeros(n_keys, dtype=np.int64)
        totals[nonempty] = np.add.reduceat(n_tok, starts[nonempty])
        csum = np.cumsum(n_tok)
        before_key = np.repeat(csum[starts[nonempty]] - n_tok[starts[nonempty]], ev_counts[nonempty])
        from_here = np.repeat(totals, ev_counts) - (csum - n_tok - before_key)  # tokens from this event on
        keep = from_here <= np.repeat(budget, ev_counts)
    kept_counts = _counts_per_key(keys, k[keep])
    n_truncated = int(np.count_nonzero(kept_counts < ev_counts))
    first_kept = starts + (ev_counts - kept_counts)  # index of each key's first kept event
    with_events = kept_counts > 0
    time_tok[first_kept[with_events]] = -1
    has_age &= with_events
    age_years = (t[first_kept[has_age]] - birth_t[has_age]) / (US_PER_DAY * DAYS_PER_YEAR)
    age_tok = tables.age_ids[age_bin_index(age_years)]

    triples = np.stack([time_tok, code_ids, bin_tok], axis=1)[keep]  # [n_kept, 3]
    present = triples >= 0
    flat_events = triples[present]  # row-major: time, code, bin of each kept event in order
    event_tok_counts = np.bincount(
        np.repeat(np.arange(n_keys), kept_counts), weights=present.sum(axis=1), minlength=n_keys
    ).astype(np.int64)

    values, offsets = _concat_segments(
        n_keys,
        [
            (np.full(n_keys, tables.bos_id, dtype=np.int32), np.ones(n_keys, dtype=np.int64)),
            (static.get_column("code_id").to_numpy().astype(np.int32), static_counts),
            (age_tok.astype(np.int32), has_age.astype(np.int64)),
            (flat_events.astype(np.int32), event_tok_counts),
        ],
    )
    lengths = np.diff(offsets).astype(np.int32)
    ids = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=pa.int32()))
    out = pl.DataFrame(
        {key: pl.Series(key, keys, dtype=pl.Int64), "input_ids": pl.Series("input_ids", ids), "length": lengths}
    )
    stats = {
        "events": int(events.height),
        "unknown_events": n_unknown,
        "tokens": int(offsets[-1]),
        "truncated": n_truncated,
    }
    return out, stats
