"""Sharded, resumable scoring (ehr_prs/sharded.py): `ehr-prs risk` and `ehr-prs predict` on two CPU processes
write the file a one-process run writes, and a run stopped midway resumes to the same file.

Two processes run through torch.distributed.run or accelerate launch (configs/cpu_2proc.yaml), gloo on
CPU. A crash midway is either a real SIGKILL once the first chunk is on disk, or (deterministic, and
in this process) the documented test hook EHR_PRS_STOP_AFTER_CHUNKS (ehr_prs.sharded): the process
raises after writing that many chunks, as a killed run would stop, leaving its parts behind.
Sizes: the shared tiny cohort's 248 train rows, K = 8 paths of at most 8 tokens (enough paths that
the control variates, fitted across all rows after the merge, are applied), chunks of 64 rows.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ehr_prs import cli, sharded

# Multi-process tests run one at a time, on one xdist worker (`--dist loadgroup` in the Makefile):
# two gloo jobs side by side on a 2-core CI machine starve each other.
pytestmark = pytest.mark.xdist_group("multiprocess")

REPO = Path(__file__).resolve().parents[1]
CHUNK = "64"  # 248 rows -> 4 chunks (2 engine batches of 32 rows each at K = 8)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def risk_argv(root: Path, model: Path, out: Path, *extra) -> list[str]:
    c = root / "cohort"
    return ["risk", "--model", str(model), "--meds", str(c / "meds"), "--prs", str(c / "prs.parquet"),
            "--labels", str(c / "labels" / "t2d.parquet"), "--codes", "ICD10CM/E11*", "--horizon-days", "365",
            "--split", "train", "--samples", "8", "--max-new-tokens", "8", "--out", str(out), *map(str, extra)]


def hazard_argv(root: Path, model: Path, out: Path, *extra) -> list[str]:
    c = root / "cohort"
    return ["risk", "--model", str(model), "--meds", str(c / "meds"), "--prs", str(c / "prs.parquet"),
            "--labels", str(c / "labels" / "t2d.parquet"), "--codes", "ICD10CM/E11*", "--horizon-days", "365",
            "--method", "hazard", "--horizons", "180", "730", "--split", "train", "--out", str(out), *map(str, extra)]


def predict_argv(root: Path, model: Path, out: Path, *extra) -> list[str]:
    c = root / "cohort"
    return ["predict", "--model", str(model), "--meds", str(c / "meds"), "--prs", str(c / "prs.parquet"),
            "--labels", str(c / "labels" / "t2d.parquet"), "--split", "train", "--batch-size", "16",
            "--out", str(out), *map(str, extra)]


def two_processes(argv: list[str], cwd: Path, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    """`ehr-prs ARGV` on two CPU processes (gloo); fails the test with the log if it fails."""
    if launcher == "torchrun":
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    else:  # accelerate launch with the repository's CPU config (it goes through torch.distributed.run too)
        head = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "configs" / "cpu_2proc.yaml"), "--main_process_port", str(_free_port())]
    done = subprocess.run([*head, "-m", "ehr_prs.cli", *argv], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def dealt_rows(log: str) -> list[int]:
    """The rows each process got, from the main process's 'dealt to 2 processes: a, b rows' line."""
    line = next(x for x in log.splitlines() if "dealt to 2 processes" in x)
    return [int(v) for v in line.rsplit(":", 1)[1].removesuffix(" rows").split(",")]


def assert_same_file(a: Path, b: Path) -> None:
    """Every column equal, exactly (and the same bytes: the same writer with the same table)."""
    fa, fb = pl.read_parquet(a), pl.read_parquet(b)
    assert fa.columns == fb.columns and fa.height == fb.height > 0
    for col in fa.columns:
        assert fa[col].to_list() == fb[col].to_list(), col
    assert a.read_bytes() == b.read_bytes()


@pytest.fixture(scope="module")
def probe(tiny_data, tiny_lm, tmp_path_factory) -> Path:
    """A classifier folder for `predict`: the tiny LM with a probe head (head only, a second's fit)."""
    import ehr_prs.recipes.finetune as ft

    c = tiny_data / "cohort"
    out = tmp_path_factory.mktemp("probe") / "probe"
    ft.finetune(ft.FinetuneArguments(model=str(tiny_lm), meds=str(c / "meds"), labels=str(c / "labels" / "t2d.parquet"),
                                     prs=str(c / "prs.parquet"), output_dir=str(out), method="probe", epochs=1,
                                     min_steps=4, batch_size=16, seed=0), quiet=True)
    return out


@pytest.fixture(scope="module")
def survival_reference(tiny_data, tiny_lm, tmp_path_factory) -> Path:
    """The one-process survival file, its rows in one chunk: the whole split in one engine call, as before sharding."""
    out = tmp_path_factory.mktemp("reference") / "survival.parquet"
    assert cli.main(risk_argv(tiny_data, tiny_lm, out, "--chunk-rows", 100_000)) == 0
    return out


# ----------------------------------------------------------------------------- (a) two processes = one


def test_risk_survival_on_two_processes_equals_one_process(tiny_data, tiny_lm, survival_reference, tmp_path, capsys):
    # one process, in chunks of 64 rows: the same file as the whole split in one engine call
    chunked = tmp_path / "chunked.parquet"
    assert cli.main(risk_argv(tiny_data, tiny_lm, chunked, "--chunk-rows", CHUNK)) == 0
    log = capsys.readouterr().out
    assert "control variates removed" in log  # the cross-row step runs, on the merged paths
    assert_same_file(chunked, survival_reference)
    assert not sharded.parts_dir_of(chunked).exists()  # merged, then removed

    out = tmp_path / "two.parquet"
    done = two_processes(risk_argv(tiny_data, tiny_lm, out, "--chunk-rows", CHUNK), tmp_path)
    shares = dealt_rows(done.stdout)
    assert len(shares) == 2 and min(shares) > 0 and sum(shares) == pl.read_parquet(out).height  # both worked
    assert "control variates removed" in done.stdout
    assert "risk (survival, K=8) (2 processes)" in done.stderr  # one bar, on the main process, rows/s
    assert done.stderr.count("row/s") > 0 and done.stdout.count("wrote ") == 1  # one process writes
    assert_same_file(out, survival_reference)
    assert not sharded.parts_dir_of(out).exists()


def test_risk_hazard_on_two_processes_equals_one_process_with_its_curve(tiny_data, tiny_tte_lm, tmp_path):
    one, two = tmp_path / "one.parquet", tmp_path / "two.parquet"
    assert cli.main(hazard_argv(tiny_data, tiny_tte_lm, one)) == 0
    done = two_processes(hazard_argv(tiny_data, tiny_tte_lm, two, "--chunk-rows", CHUNK), tmp_path)
    assert min(dealt_rows(done.stdout)) > 0
    assert_same_file(two, one)
    assert_same_file(tmp_path / "two.curve.parquet", tmp_path / "one.curve.parquet")  # 3 horizons x rows


def test_predict_under_accelerate_launch_equals_one_process(tiny_data, probe, tmp_path):
    one, two = tmp_path / "one.parquet", tmp_path / "two.parquet"
    assert cli.main(predict_argv(tiny_data, probe, one)) == 0
    done = two_processes(predict_argv(tiny_data, probe, two, "--chunk-rows", 48), tmp_path, launcher="accelerate")
    shares = dealt_rows(done.stdout)
    assert min(shares) > 0 and sum(shares) == 248
    assert_same_file(two, one)
    assert not sharded.parts_dir_of(two).exists()


# ----------------------------------------------------------------------------- (b) kill, then resume


def interrupted(argv: list[str], monkeypatch, chunks: int = 1) -> None:
    """Run ARGV in this process and stop it after `chunks` chunks (the test hook), as a crash would."""
    monkeypatch.setenv(sharded.STOP_AFTER_ENV, str(chunks))
    with pytest.raises(sharded.StoppedByTestHook):
        cli.main(argv)
    monkeypatch.delenv(sharded.STOP_AFTER_ENV)


def test_kill_then_resume_skips_the_written_rows_and_writes_the_same_file(tiny_data, tiny_lm, survival_reference,
                                                                         tmp_path, monkeypatch, capsys):
    import ehr_prs.risk.sampling as sampling

    out = tmp_path / "pred.parquet"
    argv = risk_argv(tiny_data, tiny_lm, out, "--chunk-rows", CHUNK)
    interrupted(argv, monkeypatch)
    parts = sharded.parts_dir_of(out)
    assert not out.exists()
    chunks = sorted(p.name for p in parts.glob("*.npz"))
    assert chunks == ["order-000000000-000000063.npz"] and (parts / sharded.MANIFEST).exists()
    with np.load(parts / chunks[0]) as saved:
        assert saved["values"].shape == (64, 8)  # 64 label rows, 8 paths each
        saved_rows = set(saved["rows"].tolist())
    assert len(saved_rows) == 64
    capsys.readouterr()

    scored: list[int] = []  # the label rows the resumed run samples
    real = sampling.sample_paths

    def counting(*args, **kwargs):
        scored.extend(kwargs["row_ids"].tolist())
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "sample_paths", counting)
    assert cli.main([*argv, "--resume"]) == 0
    log = capsys.readouterr().out
    assert "holds 1 of 4 chunks (64 of 248 rows) of this run; skipping them and scoring the other 184 rows" in log
    assert len(scored) == 184 and not set(scored) & saved_rows  # the saved rows were not sampled again
    assert_same_file(out, survival_reference)
    assert not parts.exists()


def test_a_run_killed_midway_resumes_to_the_same_file(tiny_data, tiny_lm, tmp_path, capsys):
    """A real kill (SIGKILL once the first chunk is on disk), then --resume: the uninterrupted run's file."""
    import signal
    import time

    out, full = tmp_path / "pred.parquet", tmp_path / "full.parquet"
    extra = ("--samples", 16, "--max-new-tokens", 32, "--chunk-rows", 32)  # 8 chunks of 2 batches: seconds of work
    proc = subprocess.Popen([sys.executable, "-m", "ehr_prs.cli", *risk_argv(tiny_data, tiny_lm, out, *extra)],
                            cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    parts = sharded.parts_dir_of(out)
    deadline = time.monotonic() + 300
    while not list(parts.glob("order-*.npz")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed midway"
    kept = len(list(parts.glob("order-*.npz")))
    assert 1 <= kept < 8 and not out.exists()
    assert cli.main([*risk_argv(tiny_data, tiny_lm, out, *extra), "--resume"]) == 0
    assert f"holds {kept} of 8 chunks ({32 * kept} of 248 rows)" in capsys.readouterr().out
    assert cli.main(risk_argv(tiny_data, tiny_lm, full, *extra)) == 0
    assert_same_file(out, full)
    assert not parts.exists()


def test_resume_on_two_processes_after_a_one_process_crash(tiny_data, tiny_tte_lm, tmp_path, monkeypatch):
    """Any number of processes may resume: the chunks left are dealt to them, the file is the same."""
    one, out = tmp_path / "one.parquet", tmp_path / "pred.parquet"
    assert cli.main(hazard_argv(tiny_data, tiny_tte_lm, one)) == 0
    interrupted(hazard_argv(tiny_data, tiny_tte_lm, out, "--chunk-rows", CHUNK), monkeypatch, chunks=2)
    done = two_processes(hazard_argv(tiny_data, tiny_tte_lm, out, "--chunk-rows", CHUNK, "--resume"), tmp_path)
    assert "skipping them and scoring the other 120 rows" in done.stdout
    assert sum(dealt_rows(done.stdout)) == 120
    assert_same_file(out, one)
    assert_same_file(tmp_path / "pred.curve.parquet", tmp_path / "one.curve.parquet")


# ----------------------------------------------------------------------------- (c) parts of another run


def test_resume_refuses_parts_of_another_run_and_names_the_difference(tiny_data, tiny_lm, tmp_path, monkeypatch,
                                                                      capsys):
    import shutil

    labels = tmp_path / "t2d.parquet"
    shutil.copy(tiny_data / "cohort" / "labels" / "t2d.parquet", labels)
    out = tmp_path / "pred.parquet"

    def argv(*extra):
        a = risk_argv(tiny_data, tiny_lm, out, "--chunk-rows", CHUNK, *extra)
        a[a.index("--labels") + 1] = str(labels)
        return a

    interrupted(argv(), monkeypatch)
    parts = sharded.parts_dir_of(out)
    before = {p.name: p.read_bytes() for p in parts.iterdir()}
    capsys.readouterr()
    assert cli.main([*argv("--seed", 1, "--samples", 4), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--samples: the parts have 8, this run 4" in err and "--seed: the parts have 0, this run 1" in err
    assert "Traceback" not in err and "Loading weights" not in err  # refused at once, in one line
    assert cli.main([*argv("--chunk-rows", 32), "--resume"]) == 2
    assert "--chunk-rows: the parts are chunks of 64 rows, this run makes 32" in capsys.readouterr().err
    # the same labels rewritten (a new file, other rows or not): refused, naming --labels
    pl.read_parquet(labels).head(200).write_parquet(labels)
    assert cli.main([*argv(), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"--labels {labels.resolve()} changed since the parts were written" in err
    assert "the label rows differ" in err
    assert {p.name: p.read_bytes() for p in parts.iterdir()} == before  # nothing touched
    assert not out.exists()


# ----------------------------------------------------------------------------- (d) the output rules


def test_the_output_and_its_parts_obey_the_overwrite_rules(tiny_data, tiny_lm, survival_reference, tmp_path,
                                                           monkeypatch, capsys):
    out = tmp_path / "pred.parquet"
    argv = risk_argv(tiny_data, tiny_lm, out, "--chunk-rows", CHUNK)
    parts = sharded.parts_dir_of(out)
    interrupted(argv, monkeypatch)
    before = {p.name: p.read_bytes() for p in parts.iterdir()}
    capsys.readouterr()
    # parts of an interrupted run: neither continued nor discarded unless asked
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"{parts} holds 1 scored chunk(s) (64 rows) of an interrupted" in err and "pass --resume" in err
    assert {p.name: p.read_bytes() for p in parts.iterdir()} == before
    # --overwrite discards them and starts over: the same file, the parts gone
    assert cli.main([*argv, "--overwrite"]) == 0
    assert_same_file(out, survival_reference)
    assert not parts.exists()
    # a finished --out stays protected under --resume
    capsys.readouterr()
    assert cli.main([*argv, "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} already exists" in err and "pass --overwrite" in err
    # a folder (or file) at OUT.parts that ehr-prs did not write: never touched, even with --overwrite
    other = tmp_path / "other.parquet"
    mine = sharded.parts_dir_of(other)
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's own file")
    for extra in ([], ["--overwrite"], ["--resume"]):
        assert cli.main([*risk_argv(tiny_data, tiny_lm, other, "--chunk-rows", CHUNK), *extra]) == 2
        assert "never replaced, even with --overwrite" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and not other.exists()
    # an empty folder there is free; --resume with nothing to resume scores every row
    (mine / "notes.txt").unlink()
    assert cli.main([*risk_argv(tiny_data, tiny_lm, other, "--chunk-rows", CHUNK), "--resume"]) == 0
    assert "--resume: no parts of this run" in capsys.readouterr().out
    assert_same_file(other, survival_reference)
