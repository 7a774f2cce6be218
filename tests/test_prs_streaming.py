"""The PRS table read by subject, in bounded batches (issue 23, item 3): same results as reading it whole.

`ehr-prs tokenize` reads the PRS table through `scan_prs_table` (footer + subject ids in memory,
scores of one chunk's subjects at a time) and fits the standardiser in one streamed pass
(`PrsStandardizer.fit_scan`). These tests hold it to the whole-table path (`read_prs_table` +
`PrsStandardizer.fit` + `transform`): identical token datasets, statistics to 1e-9, the same
errors; and they check structurally that no step holds the whole table.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import datasets
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tokenizer_cohort import SPLITS, write_cohort  # noqa: E402

import ehr_prs.data.readers as readers  # noqa: E402
import ehr_prs.tokenizer.build as build_module  # noqa: E402
import ehr_prs.tokenizer.prs_standardizer as prs_standardizer  # noqa: E402
from ehr_prs.data.readers import read_prs_table, scan_prs_table  # noqa: E402
from ehr_prs.errors import InputError  # noqa: E402
from ehr_prs.tokenizer.build import SplitWriter, build  # noqa: E402
from ehr_prs.tokenizer.prs_standardizer import PrsStandardizer  # noqa: E402

BUILD = dict(min_subjects=5, min_values=20, max_length=256)
N_PRS = 24
MEDS_IDS = range(1, 61)  # tokenizer_cohort: train 1-40, tuning 41-50, held_out 51-60
TRAIN_IDS = pl.Series("subject_id", list(SPLITS["train"]), dtype=pl.Int64)
BATCH_BYTES = 4 * N_PRS * 5  # 5 rows a batch: many batches and row groups even on a tiny table


def prs_frame(seed: int = 0) -> pl.DataFrame:
    """Scores of 2 of every 3 MEDS subjects and of 100 subjects absent from MEDS, with ancestry, nulls and NaN.

    Two columns carry no information on the train subjects (one all missing, one constant), one
    score is stored as float64 (cast to float32 on reading) and its mean is large against its
    spread (the case where sums of squares would lose digits).
    """
    rng = np.random.default_rng(seed)
    ids = [i for i in MEDS_IDS if i % 3] + list(range(1001, 1101))
    n = len(ids)
    data: dict = {"subject_id": ids, "ancestry": rng.choice(["AFR", "EUR", "EAS"], n, p=[0.4, 0.5, 0.1]).tolist()}
    for j in range(N_PRS):
        col = rng.normal(2.0 * j, 0.5 + j, n).astype(np.float32)
        col[rng.random(n) < 0.1] = np.nan  # NaN reads as "not scored", like null
        data[f"PGS{j + 1:06d}"] = col
    df = pl.DataFrame(data).with_columns(
        pl.when(pl.col("subject_id") % 7 == 0).then(None).otherwise(pl.col("PGS000003")).alias("PGS000003"),
        pl.lit(None, dtype=pl.Float32).alias("PGS000005"),  # all missing
        pl.lit(1.25, dtype=pl.Float32).alias("PGS000006"),  # constant
        (pl.col("PGS000007").cast(pl.Float64) * 1e-3 + 1e4).alias("PGS000007"),  # float64, mean >> sd
    )
    # Two subjects of MEDS with a row but no score at all: present in the table, not genotyped.
    empty = pl.col("subject_id").is_in([4, 44])
    return df.with_columns([pl.when(empty).then(None).otherwise(pl.col(c)).alias(c) for c in df.columns if c.startswith("PGS")])


def write(df: pl.DataFrame, path: Path, row_group_size: int = 16) -> Path:
    if path.suffix == ".csv":
        df.write_csv(path)
    else:
        pq.write_table(df.to_arrow(), path, row_group_size=row_group_size)
    return path


@pytest.fixture(scope="module")
def meds(tmp_path_factory) -> Path:
    return write_cohort(tmp_path_factory.mktemp("prs_stream") / "meds")


def whole_table_reference(meds: Path, prs_path: Path, out: Path) -> tuple[PrsStandardizer, dict[str, tuple]]:
    """What tokenize wrote before streaming: the standardiser fitted on the whole table, and its PRS per split."""
    prs = read_prs_table(prs_path)
    std = PrsStandardizer.fit(prs.frame, prs.score_columns, TRAIN_IDS, "ancestry", min_group_subjects=BUILD["min_subjects"],
                              source=str(prs_path))
    expected = {}
    for split in SPLITS:
        ids = datasets.load_from_disk(str(out / split))["subject_id"]
        expected[split] = std.transform(prs.frame, ids)
    return std, expected


def assert_same_statistics(a: PrsStandardizer, b: PrsStandardizer) -> None:
    assert a.columns == b.columns and a.uninformative == b.uninformative
    assert a.group_column == b.group_column and list(a.groups) == list(b.groups)
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(a.std, b.std, rtol=1e-9, atol=1e-12)
    for g in a.groups:
        for k in ("mean", "std"):
            np.testing.assert_allclose(a.groups[g][k], b.groups[g][k], rtol=1e-9, atol=1e-12)


def tokenize_streamed(meds: Path, prs_path: Path, out: Path, monkeypatch) -> readers.PrsScan:
    """`build` with small PRS batches and the whole-table reader forbidden; returns the scan it used."""
    scans = []

    def scan(path):
        scans.append(scan_prs_table(path, batch_bytes=BATCH_BYTES))
        return scans[-1]

    def whole(*_):
        raise AssertionError("tokenize read the whole PRS table")

    monkeypatch.setattr(build_module, "scan_prs_table", scan)
    monkeypatch.setattr(readers, "read_prs_table", whole)
    build(meds, out, prs_path=prs_path, **BUILD)
    monkeypatch.undo()
    return scans[0]


def test_streamed_tokenize_equals_whole_table(meds, tmp_path, monkeypatch):
    prs_path = write(prs_frame(), tmp_path / "prs.parquet")
    scan = tokenize_streamed(meds, prs_path, tmp_path / "out", monkeypatch)
    std_whole, expected = whole_table_reference(meds, prs_path, tmp_path / "out")
    std = PrsStandardizer.load(tmp_path / "out" / "tokenizer")
    assert_same_statistics(std, std_whole)
    assert std.group_column == "ancestry" and set(std.groups) == {"AFR", "EUR"}  # EAS: too few train subjects
    assert std.uninformative == ["PGS000005", "PGS000006"]
    for split in SPLITS:
        ds = datasets.load_from_disk(str(tmp_path / "out" / split))
        z, mask = expected[split]
        assert np.array_equal(np.array(ds["prs"], dtype=np.float16), z)  # bit for bit
        assert ds["prs_mask"] == mask.tolist()
    # subjects 4 and 44 have a row but no score: not genotyped; every third subject has no row
    held = datasets.load_from_disk(str(tmp_path / "out" / "tuning"))
    assert [m for s, m in zip(held["subject_id"], held["prs_mask"]) if s in (42, 44, 45)] == [False, False, False]
    # Never the whole table: batches of at most 5 of its 140 rows; one pass for the fit, then each
    # chunk decodes only the row groups of its own subjects (the 100 subjects absent from MEDS
    # fill row groups that no chunk reads).
    assert scan.n_rows == 140 and scan.batch_rows == 5 and scan.counts["max_batch_rows"] <= 5
    assert scan.n_rows < scan.counts["rows_decoded"] < 2 * scan.n_rows


@pytest.mark.parametrize("variant", ["shuffled", "csv", "row_group_per_subject", "no_absent_subjects"])
def test_table_layout_does_not_change_the_datasets(meds, tmp_path, monkeypatch, variant):
    """Rows in another order, CSV, other row groups, without the subjects absent from MEDS: the same output."""
    df = prs_frame()
    base = tokenize_streamed(meds, write(df, tmp_path / "base.parquet"), tmp_path / "base", monkeypatch)
    assert base.n_rows == df.height
    if variant == "shuffled":
        path = write(df.sample(fraction=1.0, shuffle=True, seed=5), tmp_path / "v.parquet")
    elif variant == "csv":
        path = write(df, tmp_path / "v.csv")
    elif variant == "row_group_per_subject":
        path = write(df, tmp_path / "v.parquet", row_group_size=1)
    else:
        path = write(df.filter(pl.col("subject_id") < 1000), tmp_path / "v.parquet")
    tokenize_streamed(meds, path, tmp_path / "v", monkeypatch)
    assert_same_statistics(PrsStandardizer.load(tmp_path / "v" / "tokenizer"), PrsStandardizer.load(tmp_path / "base" / "tokenizer"))
    for split in SPLITS:
        a = datasets.load_from_disk(str(tmp_path / "base" / split)).data.table
        b = datasets.load_from_disk(str(tmp_path / "v" / split)).data.table
        assert a.equals(b), f"{variant}: {split} differs"


def test_fit_scan_equals_fit(tmp_path, capsys):
    """Statistics to 1e-9 pooled and within ancestry, the same uninformative columns and the same warning."""
    df = prs_frame(seed=3)
    path = write(df, tmp_path / "prs.parquet", row_group_size=7)
    whole = read_prs_table(path)
    a = PrsStandardizer.fit(whole.frame, whole.score_columns, TRAIN_IDS, "ancestry", min_group_subjects=5, source="T")
    warning_whole = capsys.readouterr().err
    b = PrsStandardizer.fit_scan(scan_prs_table(path, batch_bytes=BATCH_BYTES), TRAIN_IDS, "ancestry",
                                 min_group_subjects=5, source="T")
    warning_streamed = capsys.readouterr().err
    assert_same_statistics(a, b)
    assert warning_whole == warning_streamed and "missing" in warning_streamed and "PGS000005" in warning_streamed
    # without a train subset or groups, too
    c = PrsStandardizer.fit(whole.frame, whole.score_columns, source="T")
    d = PrsStandardizer.fit_scan(scan_prs_table(path, batch_bytes=BATCH_BYTES), source="T")
    assert_same_statistics(c, d)
    # the big-mean column keeps its digits
    j = a.columns.index("PGS000007")
    assert abs(b.std[j] / a.std[j] - 1) < 1e-9


def test_subjects_reads_only_their_row_groups(tmp_path):
    """`PrsScan.subjects` (for risk and predict too): the rows of those subjects only, as the whole table has them."""
    df = prs_frame()
    path = write(df, tmp_path / "prs.parquet", row_group_size=10)
    scan = scan_prs_table(path, batch_bytes=BATCH_BYTES)
    whole = read_prs_table(path).frame
    want = [1001, 1002, 1003, 5, 2, 999_999]  # file rows 100-102 and 2, 1 (row groups 10 and 0); one absent
    got = scan.subjects(pl.Series(want))
    assert got.score_columns == scan.score_columns and got.path == path
    assert got.frame.equals(whole.filter(pl.col("subject_id").is_in(want)))  # file order, absent subject left out
    assert scan.counts["row_groups"] == 2 and scan.counts["rows_decoded"] <= 20
    assert scan.subjects([]).frame.height == 0 and scan.subjects([]).frame.schema == whole.schema


@pytest.mark.parametrize("case, message", [
    ("no_subject_id", "no 'subject_id' column"),
    ("no_scores", "no score columns"),
    ("text_score", r"'PGS000001' is not numeric.*subject 5 has 'abc'"),
    ("duplicate", "subject 12 has more than one row"),
    ("empty", "empty"),
    ("null_subject", "'subject_id' has 1 empty value"),
    ("garbage", "cannot read this PRS table"),
])
def test_scan_refuses_what_read_refuses(tmp_path, case, message):
    df = pl.DataFrame({"subject_id": [1, 5, 9, 12], "PGS000001": [0.1, 0.2, None, 0.4]})
    path = tmp_path / ("prs.csv" if case == "text_score" else "prs.parquet")
    if case == "no_subject_id":
        df.rename({"subject_id": "person_id"}).write_parquet(path)
    elif case == "no_scores":
        df.rename({"PGS000001": "score"}).write_parquet(path)
    elif case == "text_score":
        path.write_text("subject_id,PGS000001\n1,0.1\n5,abc\n9,0.4\n")
    elif case == "duplicate":
        pl.concat([df, df.tail(1)]).write_parquet(path)
    elif case == "empty":
        df.head(0).write_parquet(path)
    elif case == "null_subject":
        df.with_columns(pl.when(pl.col("subject_id") == 9).then(None).otherwise(pl.col("subject_id")).alias("subject_id")
                        ).write_parquet(path)
    else:
        path.write_bytes(b"\x00garbage")
    for reader in (read_prs_table, scan_prs_table):
        with pytest.raises(InputError, match=message):
            reader(path)


def test_infinite_score_is_refused_when_read(tmp_path, meds):
    """An infinite score anywhere stops tokenize (the fit pass reads every row), naming column and subject."""
    df = prs_frame().with_columns(pl.when(pl.col("subject_id") == 1050).then(float("inf"))
                                  .otherwise(pl.col("PGS000002")).alias("PGS000002"))
    path = write(df, tmp_path / "prs.parquet")
    scan = scan_prs_table(path)  # opening reads ids only
    with pytest.raises(InputError, match=r"'PGS000002' is infinite.*subject 1050"):
        list(scan.iter_batches())
    with pytest.raises(InputError, match=r"'PGS000002' is infinite.*subject 1050"):
        build(meds, tmp_path / "out", prs_path=path, **BUILD)
    assert not (tmp_path / "out").exists()


def test_transform_in_blocks_equals_one_block(monkeypatch):
    """`transform` works BLOCK_ROWS rows at a time; the result and its missing-score counts do not depend on it."""
    df = prs_frame().with_columns(pl.col(f"PGS{j + 1:06d}").cast(pl.Float32) for j in range(N_PRS))
    std = PrsStandardizer.fit(df, [c for c in df.columns if c.startswith("PGS")], TRAIN_IDS, "ancestry", min_group_subjects=5)
    ids = df["subject_id"].to_list()[::-1] + [77777]
    one: dict = {}
    z1, m1 = std.transform(df, ids, one)
    monkeypatch.setattr(prs_standardizer, "BLOCK_ROWS", 7)
    blocks: dict = {}
    z2, m2 = std.transform(df, ids, blocks)
    assert np.array_equal(z1, z2) and np.array_equal(m1, m2) and one == blocks
    assert one["imputed_cells"] > 0 and one["example"] is not None and "PGS000005" in one["empty_columns"]


def test_split_writer_shards_and_empty_split(tmp_path):
    """Rows written straight into save_to_disk's layout load back whole, in order, across shards; no rows loads too."""
    rng = np.random.default_rng(0)
    tables = []
    for start in range(0, 300, 50):
        n = 50
        tables.append(pa.table({
            "input_ids": pa.array([[1, 2, 3][: 1 + i % 3] for i in range(n)], pa.list_(pa.int32())),
            "prs": build_module.prs_arrow(rng.normal(size=(n, 8)).astype(np.float16)),
            "prs_mask": pa.array(np.arange(n) % 2 == 0),
            "subject_id": pa.array(np.arange(start, start + n), pa.int64()),
            "length": pa.array((np.arange(n) % 3 + 1).astype(np.int32)),
        }))
    writer = SplitWriter(tmp_path / "split", max_shard_bytes=2 * tables[0].nbytes)
    for t in tables:
        writer.write_table(t)
    writer.close()
    files = sorted(p.name for p in (tmp_path / "split").glob("*.arrow"))
    assert files == [f"data-{i:05d}-of-00003.arrow" for i in range(3)]
    ds = datasets.load_from_disk(str(tmp_path / "split"))
    assert ds.features == build_module.FEATURES
    assert ds.data.table.equals(pa.concat_tables(tables).cast(ds.data.table.schema))
    empty = SplitWriter(tmp_path / "empty")
    empty.close()
    assert datasets.load_from_disk(str(tmp_path / "empty")).num_rows == 0


def test_fit_scan_streams_in_bounded_batches(tmp_path, monkeypatch):
    """The fit never converts more than BLOCK_ROWS rows to float64, nor reads more than a batch at a time."""
    path = write(prs_frame(), tmp_path / "prs.parquet", row_group_size=64)
    scan = scan_prs_table(path, batch_bytes=BATCH_BYTES)
    seen = []
    update = prs_standardizer._RunningMoments.update
    monkeypatch.setattr(prs_standardizer._RunningMoments, "update", lambda self, x: (seen.append(x.shape[0]), update(self, x)))
    monkeypatch.setattr(prs_standardizer, "BLOCK_ROWS", 3)
    PrsStandardizer.fit_scan(scan, TRAIN_IDS, "ancestry", min_group_subjects=5)
    assert max(seen) <= 3 and scan.counts["max_batch_rows"] <= 5
    assert scan.counts["rows_decoded"] == scan.n_rows  # one pass


def test_simulate_merges_subject_tables_in_bounded_row_groups(tmp_path, monkeypatch):
    """`ehr-prs simulate` writes truth/subjects.parquet and subject_splits.parquet by row group, merged from
    per-shard parts (memory flat in cohort size): the same rows, sorted by subject, as one row group holds."""
    import ehr_prs.data.simulate as simulate

    kwargs = dict(n_subjects=400, seed=4, n_prs=48, shard_size=100, progress=False)
    simulate.simulate_cohort(tmp_path / "one", **kwargs)
    monkeypatch.setattr(simulate, "_write_sorted_subjects",
                        functools.partial(simulate._write_sorted_subjects, rows_per_group=37))
    simulate.simulate_cohort(tmp_path / "many", **kwargs)
    for f in ("truth/subjects.parquet", "meds/metadata/subject_splits.parquet"):
        one, many = pq.ParquetFile(tmp_path / "one" / f), pq.ParquetFile(tmp_path / "many" / f)
        assert one.metadata.num_row_groups == 1 and many.metadata.num_row_groups == 11  # ceil(400 / 37)
        a, b = one.read(), many.read()
        assert a.equals(b) and a.num_rows == 400
        ids = a["subject_id"].to_numpy()
        assert np.all(np.diff(ids) > 0)
    assert not any(p.name == ".subjects" for p in (tmp_path / "many").rglob("*"))  # parts removed
