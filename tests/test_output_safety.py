"""Output safety (issue 19, item 1): no command deletes or overwrites anything it did not create.

Every command that writes refuses an existing output unless --overwrite is given, and refuses an
output that is, contains or lies inside one of its inputs even with --overwrite. The refusal
comes before any heavy work, so most cases here run on placeholder inputs: a command that read
them first would fail with another message, and the test with it.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ehr_prs import cli
from ehr_prs.errors import InputError, atomic_output_dir, atomic_output_file, check_output

# ----------------------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root -> its bytes (None for a folder, 'link:' + target for a symlink)."""
    out: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = f"link:{os.readlink(p)}".encode()
        elif p.is_dir():
            out[rel] = None
        else:
            out[rel] = p.read_bytes()
    return out


def make_inputs(root: Path) -> dict[str, Path]:
    """Placeholder inputs of every command, each with a little content that must survive."""
    paths = {"meds": root / "in" / "meds", "model": root / "in" / "model", "omop": root / "in" / "omop",
             "tok": root / "in" / "tok", "cohort": root / "in" / "cohort", "adapter": root / "in" / "adapter"}
    for name, d in paths.items():
        d.mkdir(parents=True)
        (d / "keep.txt").write_text(f"input {name}")
    paths.update(prs=root / "in" / "prs.parquet", labels=root / "in" / "labels.parquet", pred=root / "in" / "pred.parquet")
    for name in ("prs", "labels", "pred"):
        paths[name].write_bytes(f"input {name}".encode())
    return paths


# command -> (argv before the output flag, output flag, kind, {input flag: key in make_inputs})
COMMANDS: dict[str, tuple[list[str], str, str, dict[str, str]]] = {
    "simulate": (["simulate", "--subjects", "5"], "--out", "dir", {}),
    "tokenize": (["tokenize", "--meds", "{meds}", "--prs", "{prs}"], "--out", "dir", {"--meds": "meds", "--prs": "prs"}),
    "omop-to-meds": (["omop-to-meds", "--omop", "{omop}"], "--out", "dir", {"--omop": "omop"}),
    "evaluate": (["evaluate", "--predictions", "a={pred}"], "--out", "dir", {"--predictions": "pred"}),
    "fewshot": (["fewshot", "--model", "{model}", "--meds", "{meds}", "--labels", "{labels}", "--methods", "probe"],
                "--out", "dir", {"--model": "model", "--meds": "meds", "--labels": "labels"}),
    "finetune": (["finetune", "--model", "{model}", "--meds", "{meds}", "--labels", "{labels}"], "--output-dir", "dir",
                 {"--model": "model", "--meds": "meds", "--labels": "labels"}),
    "push": (["push", "--model", "{model}", "--repo-id", "user/x", "--adapter", "{adapter}"], "--dry-run", "dir",
             {"--model": "model", "--adapter": "adapter"}),
    "risk": (["risk", "--model", "{model}", "--meds", "{meds}", "--labels", "{labels}", "--codes", "ICD10CM/E11*",
              "--horizon-days", "30"], "--out", "file", {"--model": "model", "--meds": "meds", "--labels": "labels"}),
    "baseline": (["baseline", "--kind", "counts-gbm-prs", "--meds", "{meds}", "--prs", "{prs}", "--labels", "{labels}"],
                 "--out", "file", {"--meds": "meds", "--prs": "prs", "--labels": "labels"}),
    "predict": (["predict", "--model", "{model}", "--adapter", "{adapter}", "--meds", "{meds}", "--labels", "{labels}"],
                "--out", "file", {"--model": "model", "--adapter": "adapter", "--meds": "meds", "--labels": "labels"}),
    "incidence-refit": (["incidence-refit", "--model", "{model}", "--data", "{tok}", "--codes", "ICD10CM/E11*"],
                        "--out", "file", {"--data": "tok", "--model": "model"}),
    "record-ceiling": (["record-ceiling", "--cohort", "{cohort}", "--task", "t2d"], "--out", "file",
                       {"--cohort": "cohort"}),
}


def argv_for(command: str, paths: dict[str, Path], out: Path, *extra: str) -> list[str]:
    head, flag, _, _ = COMMANDS[command]
    return [a.format(**paths) for a in head] + [flag, str(out), *extra]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    rc = cli.main(argv)
    captured = capsys.readouterr()
    return rc, captured.err


# ----------------------------------------------------------------------------- (a) existing output, no --overwrite


@pytest.mark.parametrize("command", list(COMMANDS))
def test_existing_output_is_refused_without_overwrite_and_left_untouched(command, tmp_path, capsys):
    paths = make_inputs(tmp_path)
    _, flag, kind, _ = COMMANDS[command]
    if kind == "dir":
        out = tmp_path / "results"
        out.mkdir()
        (out / "mine.txt").write_text("a user's own file")
    else:
        out = tmp_path / "results.parquet"
        out.write_bytes(b"a user's own predictions")
    before = snapshot(tmp_path)
    rc, err = run_cli(argv_for(command, paths, out), capsys)
    assert rc == 2
    assert f"{flag} {out}" in err and "pass --overwrite to replace it" in err
    assert len(err.strip().splitlines()) == 1, err  # one clear line, no traceback
    assert snapshot(tmp_path) == before, "the existing output and the inputs are byte for byte unchanged"


def test_an_empty_folder_counts_as_free(tmp_path):
    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "empty", {}, overwrite=False) == tmp_path / "empty"
    with atomic_output_dir(tmp_path / "empty") as tmp:
        (tmp / "a.txt").write_text("new")
    assert (tmp_path / "empty" / "a.txt").read_text() == "new"


# ----------------------------------------------------------------------------- (b) outputs overlapping inputs


def _overlapping_outputs(command: str, paths: dict[str, Path]) -> list[tuple[str, Path, str]]:
    """(relation, output path, input flag) cases for one command: is / contains / lies inside an input."""
    _, _, kind, inputs = COMMANDS[command]
    cases = []
    folder_flag = next((f for f, k in inputs.items() if paths[k].is_dir() and not
                        (command == "incidence-refit" and f == "--model")), None)
    file_flag = next((f for f, k in inputs.items() if paths[k].is_file()), None)
    if folder_flag:
        folder = paths[inputs[folder_flag]]
        cases += [("lies inside", folder / ("sub" if kind == "dir" else "p.parquet"), folder_flag),
                  ("is", folder, folder_flag)]
    if file_flag:
        cases.append(("is", paths[inputs[file_flag]], file_flag))
    if kind == "dir" and inputs:
        flag = next(iter(inputs))
        cases.append(("contains", paths[inputs[flag]].parent, flag))
    return cases


@pytest.mark.parametrize("command", [c for c in COMMANDS if COMMANDS[c][3]])
def test_output_overlapping_an_input_is_refused_even_with_overwrite(command, tmp_path, capsys):
    paths = make_inputs(tmp_path)
    _, flag, _, inputs = COMMANDS[command]
    cases = _overlapping_outputs(command, paths)
    assert cases
    before = snapshot(tmp_path)
    for relation, out, in_flag in cases:
        rc, err = run_cli(argv_for(command, paths, out, "--overwrite"), capsys)
        assert rc == 2, (relation, out)
        assert f"{flag} {out} {relation} the {in_flag} input" in err, err
        assert "refused even with --overwrite" in err
        assert snapshot(tmp_path) == before, f"{command}: {relation} {in_flag} changed the files"


def test_the_issue_cases_are_refused_with_inputs_intact(tmp_path, capsys, monkeypatch):
    # Relative paths, as the issue typed them: u/my/meds inside u/my, u/o as both input and output.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "u" / "my" / "meds" / "data" / "train").mkdir(parents=True)
    (tmp_path / "u" / "my" / "meds" / "data" / "train" / "0.parquet").write_bytes(b"events")
    (tmp_path / "u" / "o").mkdir()
    (tmp_path / "u" / "o" / "PERSON.csv").write_text("person_id\n1\n")
    (tmp_path / "u" / "p").mkdir()
    (tmp_path / "u" / "p" / "a.parquet").write_bytes(b"predictions")
    before = snapshot(tmp_path)
    for extra in ([], ["--overwrite"]):
        rc, err = run_cli(["tokenize", "--meds", "u/my/meds", "--out", "u/my", *extra], capsys)
        assert rc == 2 and err.strip() == (
            "ehr-prs tokenize: error: --out u/my contains the --meds input u/my/meds; replacing u/my would delete it. "
            "Choose a new folder outside the inputs (refused even with --overwrite).")
        rc, err = run_cli(["omop-to-meds", "--omop", "u/o", "--out", "u/o", *extra], capsys)
        assert rc == 2 and err.strip() == (
            "ehr-prs omop-to-meds: error: --out u/o is the --omop input u/o; writing there would destroy it. "
            "Choose an output outside the inputs (refused even with --overwrite).")
        rc, err = run_cli(["evaluate", "--predictions", "a=u/p/a.parquet", "--out", "u/p", *extra], capsys)
        assert rc == 2 and "--out u/p contains the --predictions input u/p/a.parquet" in err
    assert snapshot(tmp_path) == before


def test_other_spellings_of_an_input_are_recognised(tmp_path, capsys):
    paths = make_inputs(tmp_path)
    before = snapshot(tmp_path)
    # through a symlink, with '..', and a hard link of the labels file
    (tmp_path / "link").symlink_to(paths["meds"], target_is_directory=True)
    dotted = tmp_path / "in" / "omop" / ".." / "meds"
    os.link(paths["labels"], tmp_path / "hard.parquet")
    for out in (tmp_path / "link", dotted):
        rc, err = run_cli(argv_for("tokenize", paths, out, "--overwrite"), capsys)
        assert rc == 2 and f"--out {out} is the --meds input" in err
    rc, err = run_cli(argv_for("baseline", paths, tmp_path / "hard.parquet", "--overwrite"), capsys)
    assert rc == 2 and "is the --labels input" in err
    assert paths["labels"].read_bytes() == b"input labels" and (tmp_path / "link").is_symlink()
    assert {k: v for k, v in snapshot(tmp_path).items() if k in before} == before


def test_file_and_folder_mixups_are_refused(tmp_path, capsys):
    paths = make_inputs(tmp_path)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x.txt").write_text("keep")
    rc, err = run_cli(argv_for("baseline", paths, busy, "--overwrite"), capsys)
    assert rc == 2 and f"--out {busy} is a folder; give a file path" in err
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    rc, err = run_cli(argv_for("baseline", paths, blocker / "p.parquet"), capsys)
    assert rc == 2 and f"{blocker} is a file, not a folder" in err
    assert (busy / "x.txt").read_text() == "keep" and blocker.read_text() == "a file"


def test_incidence_refit_may_add_to_its_model_but_not_replace_the_model_files(tmp_path):
    from ehr_prs.fits.incidence import check_incidence_output, is_incidence_file, save_incidence

    model, data = tmp_path / "model", tmp_path / "tok"
    model.mkdir()
    data.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    check_incidence_output(model / "incidence_t2d.safetensors", model, data, overwrite=False)  # a new file: fine
    save_incidence(model / "incidence_t2d.safetensors", np.zeros(3), 0.5, ["ICD10CM/E11.9"], {})
    assert is_incidence_file(model / "incidence_t2d.safetensors") and not is_incidence_file(model / "model.safetensors")
    with pytest.raises(InputError, match="already exists.*pass --overwrite"):
        check_incidence_output(model / "incidence_t2d.safetensors", model, data, overwrite=False)
    check_incidence_output(model / "incidence_t2d.safetensors", model, data, overwrite=True)  # an earlier refit
    with pytest.raises(InputError, match="not an earlier refit of this kind.*even with --overwrite"):
        check_incidence_output(model / "model.safetensors", model, data, overwrite=True)
    with pytest.raises(InputError, match="is the --model input"):
        check_incidence_output(model, model, data, overwrite=True)
    assert (model / "model.safetensors").read_bytes() == b"weights"


# ----------------------------------------------------------------------------- the atomic writers


def test_atomic_writers_refuse_an_output_that_appears_during_the_run(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(InputError, match="already exists"):
        with atomic_output_dir(out) as tmp:
            (tmp / "new.txt").write_text("new")
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")  # another process wrote it meanwhile
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "theirs.txt").read_text() == "theirs"
    f = tmp_path / "p.parquet"
    with pytest.raises(InputError, match="already exists"):
        with atomic_output_file(f) as tmp:
            tmp.write_bytes(b"new")
            f.write_bytes(b"theirs")
    assert f.read_bytes() == b"theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["out", "p.parquet"]


def test_overwrite_replaces_a_symlink_not_its_target(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "precious.txt").write_text("keep")
    link = tmp_path / "out"
    link.symlink_to(target, target_is_directory=True)
    with atomic_output_dir(link, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert not link.is_symlink() and (link / "new.txt").read_text() == "new"
    assert (target / "precious.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "out"], "no .old or .partial left"


# ----------------------------------------------------------------------------- (c) --overwrite replaces


def test_overwrite_replaces_an_unrelated_output_simulate_tokenize_evaluate(tmp_path, capsys):
    out = tmp_path / "cohort"
    out.mkdir()
    (out / "stale.txt").write_text("an earlier run")
    sim = ["simulate", "--out", str(out), "--subjects", "60", "--n-prs", "60", "--seed", "1"]
    assert run_cli(sim, capsys)[0] == 2 and (out / "stale.txt").exists()
    assert cli.main([*sim, "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / "meds" / "metadata" / "dataset.json").is_file()
    assert pl.read_parquet(out / "truth" / "subjects.parquet").height == 60

    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "stale.txt").write_text("an earlier run")
    argv = ["tokenize", "--meds", str(out / "meds"), "--out", str(tok), "--min-subjects", "2", "--max-length", "64"]
    assert run_cli(argv, capsys)[0] == 2 and (tok / "stale.txt").exists()
    assert cli.main([*argv, "--overwrite"]) == 0
    assert not (tok / "stale.txt").exists()
    assert sorted(p.name for p in tok.iterdir()) == ["held_out", "tokenize_summary.json", "tokenizer", "train", "tuning"]
    assert json.loads((tok / "tokenize_summary.json").read_text())["min_subjects"] == 2

    n = 40
    rng = np.random.default_rng(0)
    y = np.arange(n) % 4 == 0
    pred = tmp_path / "preds" / "a.parquet"
    pred.parent.mkdir()
    pl.DataFrame({"subject_id": np.arange(1, n + 1), "prediction_time": [datetime(2020, 1, 1)] * n,
                  "boolean_value": y, "predicted_boolean_probability": np.clip(0.2 + 0.3 * y + 0.1 * rng.random(n), 0, 1)}
                 ).with_columns(pl.col("prediction_time").cast(pl.Datetime("us"))).write_parquet(pred)
    report = tmp_path / "report"
    report.mkdir()
    (report / "stale.txt").write_text("an earlier run")
    argv = ["evaluate", "--predictions", f"a={pred}", "--n-bootstrap", "20", "--min-cell", "1", "--out", str(report)]
    assert run_cli(argv, capsys)[0] == 2 and (report / "stale.txt").exists()
    assert cli.main([*argv, "--overwrite"]) == 0
    assert not (report / "stale.txt").exists()
    assert json.loads((report / "metrics.json").read_text())["models"]["a"]["auroc"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort", "preds", "report", "tok"], "no partial folders"


def test_overwrite_replaces_an_unrelated_prediction_file(tiny_data, tmp_path, capsys):
    cohort = tiny_data / "cohort"
    out = tmp_path / "pred.parquet"
    out.write_bytes(b"an earlier run")
    argv = ["record-ceiling", "--cohort", str(cohort), "--task", "t2d", "--out", str(out)]
    rc, err = run_cli(argv, capsys)
    assert rc == 2 and f"--out {out} already exists (a file); pass --overwrite to replace it" in err
    assert out.read_bytes() == b"an earlier run"
    assert cli.main([*argv, "--overwrite"]) == 0
    preds = pl.read_parquet(out)
    held = pl.read_parquet(cohort / "meds" / "metadata" / "subject_splits.parquet").filter(pl.col("split") == "held_out")
    assert preds.height > 0 and preds["subject_id"].is_in(held["subject_id"].implode()).all()
    assert preds.columns == ["subject_id", "prediction_time", "boolean_value", "predicted_boolean_probability"]

    argv = ["baseline", "--kind", "prs-lr", "--meds", str(cohort / "meds"), "--prs", str(cohort / "prs.parquet"),
            "--labels", str(cohort / "labels" / "t2d.parquet"), "--threads", "1", "--out", str(out)]
    assert run_cli(argv, capsys)[0] == 2
    assert pl.read_parquet(out).equals(preds), "refused: the record-ceiling file is unchanged"
    assert cli.main([*argv, "--overwrite"]) == 0
    replaced = pl.read_parquet(out)
    assert replaced.height > 0 and replaced.columns == preds.columns
    assert set(replaced["subject_id"]) <= set(held["subject_id"])
    # the baseline's probabilities, not record-ceiling's: at least one row differs
    joined = replaced.join(preds, on=["subject_id", "prediction_time"], suffix="_before")
    assert joined.height > 0 and (joined["predicted_boolean_probability"]
                                  != joined["predicted_boolean_probability_before"]).any()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.parquet"], "no partial files"
