"""tokenizer/: vocabulary, time and value tokens, truncation, PRS standardisation, leakage, errors."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import polars as pl
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tokenizer_cohort import SPLITS, write_cohort, write_prs  # noqa: E402

import modeling_ehr_prs  # noqa: E402,F401  (registers EhrTokenizer with AutoTokenizer)
import ehr_prs.tokenizer as tokenizer  # noqa: E402,F401
from ehr_prs.errors import InputError  # noqa: E402
from modeling_ehr_prs.tokenization_ehr import InputError as TokenizerInputError  # noqa: E402  (the hub file's own)
from ehr_prs.data.readers import read_meds_dataset, read_prs_table  # noqa: E402
from ehr_prs.tokenizer.build import build  # noqa: E402
from ehr_prs.tokenizer.prediction_inputs import inputs_at_prediction_times  # noqa: E402
from ehr_prs.tokenizer.prs_standardizer import PrsStandardizer  # noqa: E402
from ehr_prs.tokenizer.time_tokens import default_time_scheme, gap_lookup  # noqa: E402
from modeling_ehr_prs.tokenization_ehr import EhrTokenizer  # noqa: E402

BUILD = dict(min_subjects=5, min_values=20, max_length=256)
# A code planted after 2030-01-01 in 8 train subjects (so it is in the vocabulary) for the leakage test.
LEAK_CODE, LEAK_TIME = "ICD10CM/L99.LEAK", dt.datetime(2030, 6, 1)
PLANTED = {sid: [(sid, LEAK_TIME, LEAK_CODE, None)] for sid in range(1, 9)}
PLANTED.update({sid: [(sid, LEAK_TIME, LEAK_CODE, None)] for sid in range(51, 55)})


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    meds = write_cohort(root / "meds", extra=PLANTED)
    prs = write_prs(root / "prs.parquet")
    summary = build(meds, root / "out", prs_path=prs, **BUILD)
    return root, summary


def _load(root: Path):
    tok = EhrTokenizer.from_pretrained(str(root / "out" / "tokenizer"))
    return tok, {s: datasets.load_from_disk(str(root / "out" / s)) for s in SPLITS}


def _raw(root: Path, split: str) -> pl.DataFrame:
    return pl.read_parquet(root / "meds" / "data" / split / "0.parquet")


def test_round_trip_codes_in_order(cohort):
    root, _ = cohort
    tok, ds = _load(root)
    raw = _raw(root, "train")
    vocab = set(tok.state["codes"])
    for row in ds["train"].select(range(0, 40, 7)):
        ev = raw.filter(pl.col("subject_id") == row["subject_id"])
        static = sorted(ev.filter(pl.col("time").is_null())["code"].to_list(), key=tok.convert_tokens_to_ids)
        timed = ev.filter(pl.col("time").is_not_null() & (pl.col("code") != "MEDS_BIRTH"))["code"].to_list()
        expected = [c if c in vocab else c.split("/")[0] + "/<unk>" for c in static + timed]
        tokens = tok.convert_ids_to_tokens(row["input_ids"])
        got = [t for t in tokens if not t.startswith(("TIME/", "AGE/", "<bos>")) and not (t[0] == "Q" and t[1:].isdigit())]
        assert got == expected
        assert tokens[0] == "<bos>" and len(tokens) == row["length"]
        # decode -> text -> encode gives the same ids back
        assert tok.encode(tok.decode(row["input_ids"][1:]), add_special_tokens=True) == row["input_ids"]


def test_time_tokens_stand_for_the_gap():
    scheme = default_time_scheme()
    lut = gap_lookup(scheme)
    days = np.array([d for _, d in scheme])
    for gap in [0, 1, 5, 6, 7, 13, 14, 29, 30, 31, 200, 364, 365, 366, 800, 3652, 3653, 9000, 40000]:
        i = lut[min(gap, len(lut) - 1)]
        if gap < 1:
            assert i == -1
            continue
        assert days[i] <= gap and (i == len(days) - 1 or gap < days[i + 1]), gap


def test_time_tokens_in_sequences_match_event_gaps(cohort):
    root, _ = cohort
    tok, ds = _load(root)
    raw = _raw(root, "train")
    row = ds["train"][3]
    times = (
        raw.filter((pl.col("subject_id") == row["subject_id"]) & pl.col("time").is_not_null() & (pl.col("code") != "MEDS_BIRTH"))
        .get_column("time").unique().sort().to_list()
    )
    gaps = [(b - a).days for a, b in zip(times[:-1], times[1:]) if (b - a).days >= 1]
    got = [tok.token_days[i] for i in row["input_ids"] if tok.token_days[i] > 0]
    assert len(got) == len(gaps) > 0
    lut, scheme = gap_lookup(default_time_scheme()), default_time_scheme()
    assert got == [scheme[lut[g]][1] for g in gaps]
    assert all(d <= g for d, g in zip(got, gaps))


def test_min_subjects_rule_and_unknown_counts(cohort, tmp_path):
    root, summary = cohort
    tok, ds = _load(root)
    assert "ICD10CM/Z99.RARE" not in tok.get_vocab()  # one subject only
    assert tok.convert_tokens_to_ids("ICD10CM/Z99.RARE") == tok.convert_tokens_to_ids("ICD10CM/<unk>")
    assert summary["codes_dropped_min_subjects"] == 1
    assert summary["splits"]["train"]["unknown_events"] == 2 + 3 % 4  # subject 7: one per visit (3 visits)
    # boundary: ICD10CM/E11.9 is in the 20 odd train subjects -> in at 20, out at 21
    for k, inside in [(20, True), (21, False)]:
        s = build(root / "meds", tmp_path / f"m{k}", min_subjects=k, min_values=20, max_length=64)
        t = EhrTokenizer.from_pretrained(str(tmp_path / f"m{k}" / "tokenizer"))
        assert ("ICD10CM/E11.9" in t.get_vocab()) is inside
        assert s["codes_in_vocab"] == len(t.state["codes"])


def test_value_bins_follow_train_quantiles(cohort):
    root, _ = cohort
    tok, ds = _load(root)
    edges = tok.bin_edges["LOINC/4548-4"]
    train_vals = _raw(root, "train").filter(pl.col("code") == "LOINC/4548-4")["numeric_value"].to_numpy()
    assert np.allclose(edges, np.quantile(train_vals.astype(np.float64), np.arange(1, 10) / 10), rtol=1e-5)
    row = ds["held_out"][0]
    raw_vals = _raw(root, "held_out").filter(
        (pl.col("subject_id") == row["subject_id"]) & (pl.col("code") == "LOINC/4548-4")
    )["numeric_value"].to_list()
    tokens = tok.convert_ids_to_tokens(row["input_ids"])
    bins = [tokens[i + 1] for i, t in enumerate(tokens) if t == "LOINC/4548-4"]
    assert bins == [f"Q{int(np.searchsorted(edges, v, side='right')) + 1}" for v in raw_vals]


def test_truncation_keeps_static_prefix_and_recent_events(cohort, tmp_path):
    root, _ = cohort
    build(root / "meds", tmp_path / "short", **{**BUILD, "max_length": 14})
    tok, full = _load(root)
    short = datasets.load_from_disk(str(tmp_path / "short" / "train"))
    assert max(short["length"]) <= 14
    n_cut = 0
    for a, b in zip(full["train"], short):
        fa, fb = tok.convert_ids_to_tokens(a["input_ids"]), tok.convert_ids_to_tokens(b["input_ids"])
        assert fb[:3] == fa[:3] and fb[3].startswith("AGE/")  # bos, gender, race, age
        if fa == fb:
            continue
        n_cut += 1
        tail = fb[4:]
        assert not tail[0].startswith("TIME/")  # cut at an event boundary, first kept event has no gap
        assert fa[-len(tail):] == tail  # the most recent events, unchanged
        assert len(fb) > 14 - 3  # as much history as fits (an event is at most 3 tokens)
    assert n_cut > 10


def test_prs_standardised_on_train_within_ancestry(cohort):
    root, summary = cohort
    tok, ds = _load(root)
    std = PrsStandardizer.load(root / "out" / "tokenizer")
    assert std.n_prs == summary["n_prs"] == 4 and std.group_column == "ancestry"
    train = ds["train"]
    mask = np.array(train["prs_mask"])
    prs = np.array(train["prs"], dtype=np.float32)  # [40, 4]
    ids = np.array(train["subject_id"])
    assert np.array_equal(mask, ids % 3 != 0)  # genotyped_every=3: multiples of 3 are absent
    assert np.all(prs[~mask] == 0)
    anc = np.where(ids % 2 == 1, "EUR", "AFR")
    for g in ("EUR", "AFR"):
        z = prs[mask & (anc == g)]
        assert np.allclose(z.mean(0), 0, atol=2e-3) and np.allclose(z.std(0, ddof=1), 1, atol=2e-3)
    held = ds["held_out"]
    assert len(held[0]["prs"]) == 4


def test_determinism(cohort, tmp_path):
    root, _ = cohort
    build(root / "meds", tmp_path / "again", prs_path=root / "prs.parquet", **BUILD)
    for split in SPLITS:
        a = datasets.load_from_disk(str(root / "out" / split)).to_dict()
        b = datasets.load_from_disk(str(tmp_path / "again" / split)).to_dict()
        assert a == b
    for f in ("ehr_vocab.json", "prs_standardizer.json"):
        assert (root / "out" / "tokenizer" / f).read_text() == (tmp_path / "again" / "tokenizer" / f).read_text()


def test_save_load_auto_and_remote_code(cohort, tmp_path):
    from transformers import AutoTokenizer

    root, _ = cohort
    tok, _ = _load(root)
    auto = AutoTokenizer.from_pretrained(str(root / "out" / "tokenizer"))
    assert type(auto) is EhrTokenizer and auto.get_vocab() == tok.get_vocab() and auto.token_days == tok.token_days
    assert (auto.pad_token_id, auto.bos_token_id, auto.eos_token_id) == (0, 1, 2)
    # remote code: a clean process that never imports the ehr-prs tokenizer package
    script = (
        "import sys, json; from transformers import AutoTokenizer; "
        f"t = AutoTokenizer.from_pretrained({str(root / 'out' / 'tokenizer')!r}, trust_remote_code=True); "
        "print(json.dumps([type(t).__module__, 'tokenizer' in sys.modules, t.vocab_size, sum(t.token_days)]))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, check=True)
    module, imported, size, days = json.loads(out.stdout.strip().splitlines()[-1])
    assert module.startswith("transformers_modules") and not imported
    assert (size, days) == (tok.vocab_size, sum(tok.token_days))
    tok.save_pretrained(str(tmp_path / "re"))
    again = EhrTokenizer.from_pretrained(str(tmp_path / "re"))
    assert again.state == tok.state
    config = json.loads((root / "out" / "tokenizer" / "tokenizer_config.json").read_text())
    assert config["auto_map"]["AutoTokenizer"][0] == "tokenization_ehr.EhrTokenizer"
    std = PrsStandardizer.load(root / "out" / "tokenizer")
    std.save(tmp_path / "re")
    assert PrsStandardizer.from_pretrained(tmp_path / "re").to_dict() == std.to_dict()


def test_code_token_ids_exact_prefix_and_typo(cohort):
    root, _ = cohort
    tok, _ = _load(root)
    e11 = tok.convert_tokens_to_ids("ICD10CM/E11.9")
    assert tok.code_token_ids(["ICD10CM/E11.9"]) == [e11]
    assert tok.code_token_ids(["ICD10CM/E11*"]) == [e11]
    assert set(tok.code_token_ids(["ICD10CM/*"])) == {tok.convert_tokens_to_ids(c) for c in tok.state["codes"] if c.startswith("ICD10CM/")}
    with pytest.raises(TokenizerInputError, match="E11.9"):
        tok.code_token_ids(["ICD10CM/E11.8"])
    assert tok.token_days[tok.convert_tokens_to_ids("TIME/2w")] == 14 and tok.token_days[e11] == 0


def test_inputs_at_prediction_times_never_leak(cohort):
    root, _ = cohort
    tok, _ = _load(root)
    meds = read_meds_dataset(root / "meds")
    prs = read_prs_table(root / "prs.parquet")
    std = PrsStandardizer.load(root / "out" / "tokenizer")
    leak = tok.convert_tokens_to_ids(LEAK_CODE)
    assert leak != tok.unk_token_id and LEAK_CODE in tok.state["codes"]
    before, after = dt.datetime(2030, 5, 31, 23, 59), LEAK_TIME
    labels = pl.DataFrame(
        {"subject_id": [51, 52, 51, 60, 53], "prediction_time": [before, before, after, before, dt.datetime(1900, 1, 1)],
         "boolean_value": [True, False, True, False, False]}
    ).with_columns(pl.col("prediction_time").cast(pl.Datetime("us")))
    stats: dict = {}
    ds = inputs_at_prediction_times(meds, labels, tok, std, prs, split="held_out", stats=stats)
    assert ds.num_rows == 5 and ds["subject_id"] == [51, 52, 51, 60, 53]
    assert ds["boolean_value"] == [True, False, True, False, False]
    has_leak = [leak in ids for ids in ds["input_ids"]]
    assert has_leak == [False, False, True, False, False]  # at time == prediction_time it is in
    # a prompt cut at prediction_time equals the stored sequence with the later events removed
    full = datasets.load_from_disk(str(root / "out" / "held_out"))
    full_51 = full.filter(lambda r: r["subject_id"] == 51)[0]["input_ids"]
    assert ds[2]["input_ids"] == full_51 and ds[0]["input_ids"] == full_51[: len(ds[0]["input_ids"])]
    assert len(ds[0]["input_ids"]) < len(full_51)
    # before any event: static prefix only; PRS rows as in the split dataset
    assert tok.convert_ids_to_tokens(ds[4]["input_ids"]) == ["<bos>", "Gender/F", "Race/White"]
    assert ds["prs_mask"] == [bool(s % 3) for s in [51, 52, 51, 60, 53]]
    assert stats["rows"] == 5 and stats["unknown_events"] == 0


def test_bad_inputs(cohort, tmp_path):
    root, _ = cohort
    tok, _ = _load(root)
    meds = read_meds_dataset(root / "meds")
    # no train split
    no_train = write_cohort(tmp_path / "nt", splits={"tuning": range(1, 10)})
    with pytest.raises(InputError, match="no train split"):
        build(no_train, tmp_path / "o1")
    assert not (tmp_path / "o1").exists()
    # PRS columns differ from the fitted standardiser
    other = pl.read_parquet(root / "prs.parquet").rename({"PGS000004": "PGS000099"})
    other.write_parquet(tmp_path / "other.parquet")
    std = PrsStandardizer.load(root / "out" / "tokenizer")
    with pytest.raises(InputError, match="lacks 1 of the 4 score columns .*: PGS000004"):
        inputs_at_prediction_times(meds, pl.DataFrame({"subject_id": [51], "prediction_time": [dt.datetime(2020, 1, 1)]}),
                                   tok, std, read_prs_table(tmp_path / "other.parquet"))
    # a tokenizer folder from another format version
    tok.save_pretrained(str(tmp_path / "old"))
    state = json.loads((tmp_path / "old" / "ehr_vocab.json").read_text())
    state["format_version"] = 999
    (tmp_path / "old" / "ehr_vocab.json").write_text(json.dumps(state))
    with pytest.raises(TokenizerInputError, match="version 999"):
        EhrTokenizer.from_pretrained(str(tmp_path / "old"))
    # labels naming a subject absent from the data
    labels = pl.DataFrame({"subject_id": [51, 12345], "prediction_time": [dt.datetime(2020, 1, 1)] * 2})
    with pytest.raises(InputError, match="12345"):
        inputs_at_prediction_times(meds, labels, tok, split="held_out")


def test_cli_without_prs(cohort, tmp_path):
    from ehr_prs import cli

    root, _ = cohort
    out = tmp_path / "cli"
    rc = cli.main(["tokenize", "--meds", str(root / "meds"), "--out", str(out), "--min-subjects", "5", "--max-length", "64"])
    assert rc == 0
    summary = json.loads((out / "tokenize_summary.json").read_text())
    assert summary["n_prs"] == 0 and summary["splits"]["held_out"]["subjects"] == 10
    ds = datasets.load_from_disk(str(out / "tuning"))
    assert ds.num_rows == 10 and all(p == [] for p in ds["prs"]) and not any(ds["prs_mask"])
    assert PrsStandardizer.load(out / "tokenizer").n_prs == 0
    assert cli.main(["tokenize", "--meds", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
