"""`ehr-prs view` (one person's page) and `ehr-prs whatif` (the cohort's genomic what-if).

The page's numbers equal `ehr-prs risk`'s for the same row (hazard, and sampling with the same seed);
its no-genotype curve equals the prediction without genetics; nothing after the prediction time
reaches the page (planted future events change not one byte); bad inputs are clear errors that
write nothing; the cohort what-if keeps the All of Us rule. The browser test opens every page in
headless Chromium (Debian's `chromium`; .ci/run installs it) and checks the console, the rendered
text and a screenshot; it skips, saying why, where Chromium is absent.
"""

import base64
import datetime as dt
import json
import math
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

import ehr_prs.recipes.train as train
from ehr_prs.cli import main as cli

TINY = "hidden_size=32,intermediate_size=64,num_attention_heads=2,num_key_value_heads=2,prs_tokens=2"
CODES = ["--codes", "ICD10CM/E11*"]
FAST = ["--samples", "4", "--max-new-tokens", "32", "--curve-points", "2", "--cohort-rows", "30",
        "--cohort-samples", "2", "--futures", "2"]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ehr_only_lm(tiny_data, tmp_path_factory) -> Path:
    """A tiny EHR-only model (no genomic adapter), 2 steps."""
    out = tmp_path_factory.mktemp("view_none") / "lm"
    args = train.PretrainArguments(
        data=str(tiny_data / "tok"), output_dir=str(out), preset="tiny", prs_fusion="none", max_steps=2,
        batch_size=4, learning_rate=3e-3, warmup_steps=0, eval_steps=2, save_steps=2, logging_steps=1,
        max_eval_samples=8, max_seq_length=128, config_overrides=TINY, seed=7)
    return train.train(args)


@pytest.fixture(scope="module")
def rows(tiny_data, tmp_path_factory) -> dict:
    """Held-out T2D label rows: two genotyped and one not (a one-row label file for each, and one of all three)."""
    cohort = tiny_data / "cohort"
    labels = pl.read_parquet(cohort / "labels" / "t2d.parquet")
    splits = pl.read_parquet(cohort / "meds" / "metadata" / "subject_splits.parquet")
    prs = pl.read_parquet(cohort / "prs.parquet").select("subject_id", pl.lit(True).alias("genotyped"))
    held = (labels.join(splits, on="subject_id").filter(pl.col("split") == "held_out")
            .join(prs, on="subject_id", how="left").with_columns(pl.col("genotyped").fill_null(False)))
    geno = held.filter(pl.col("genotyped")).head(2)
    not_geno = held.filter(~pl.col("genotyped")).head(1)
    assert geno.height == 2 and not_geno.height == 1
    picked = pl.concat([geno, not_geno]).select("subject_id", "prediction_time", "boolean_value")
    root = tmp_path_factory.mktemp("view_rows")
    picked.write_parquet(root / "three.parquet")
    files = []
    for i in range(3):
        picked.slice(i, 1).write_parquet(root / f"row{i}.parquet")
        files.append(root / f"row{i}.parquet")
    return {"frame": picked, "three": root / "three.parquet", "one": files}


def page_data(html_text: str) -> dict:
    """The numbers a page carries (its #ehr-prs-data JSON element)."""
    m = re.search(r'<script type="application/json" id="ehr-prs-data">(.*?)</script>', html_text, re.S)
    assert m, "no #ehr-prs-data element"
    return json.loads(m.group(1))


def view_args(model, tiny_data, row: dict, out) -> list[str]:
    cohort = tiny_data / "cohort"
    return ["view", "--model", str(model), "--meds", str(cohort / "meds"), "--prs", str(cohort / "prs.parquet"),
            "--subject", str(row["subject_id"]), "--prediction-time", row["prediction_time"].isoformat(), *CODES,
            "--horizon-days", "730", "--out", str(out)]


def risk_of(model, tiny_data, labels, out, *extra, prs=True) -> np.ndarray:
    cohort = tiny_data / "cohort"
    args = ["risk", "--model", str(model), "--meds", str(cohort / "meds"), "--labels", str(labels), *CODES,
            "--horizon-days", "730", "--out", str(out), *extra]
    if prs:
        args += ["--prs", str(cohort / "prs.parquet")]
    assert cli(args) == 0
    return pl.read_parquet(out)["predicted_boolean_probability"].to_numpy()


# ----------------------------------------------------------------------------- the numbers


def test_hazard_page_equals_risk_and_its_no_genotype_curve_is_the_ehr_only_prediction(tiny_tte_lm, tiny_data, rows, tmp_path):
    row = rows["frame"].row(0, named=True)
    out = tmp_path / "page.html"
    assert cli(view_args(tiny_tte_lm, tiny_data, row, out) + ["--cohort-rows", "30", "--futures", "1"]) == 0
    d = page_data(out.read_text())
    assert d["method"] == "hazard" and d["genotyped"] and d["curves"]["own"]["horizon_days"][-1] == 730
    with_prs = risk_of(tiny_tte_lm, tiny_data, rows["one"][0], tmp_path / "r.parquet", "--method", "hazard",
                       "--horizons", "365")
    without = risk_of(tiny_tte_lm, tiny_data, rows["one"][0], tmp_path / "r0.parquet", "--method", "hazard", prs=False)
    # The same numbers (up to the last bit or two: the curve's 60 horizons go through one matrix product).
    assert d["risk_at_horizon"]["own"] == pytest.approx(with_prs[0], rel=1e-12)
    assert d["risk_at_horizon"]["no_genotype"] == pytest.approx(without[0], rel=1e-12)
    # The curve at 365 days (a point of the 60-point curve) is risk's --horizons curve.
    curve = pl.read_parquet(tmp_path / "r.curve.parquet").filter(pl.col("horizon_days") == 365)["probability"][0]
    own = d["curves"]["own"]
    assert own["risk"][own["horizon_days"].index(365.0)] == pytest.approx(curve, rel=1e-12)

    # "No genotype" is the EHR-only model: the same model with its genomic adapter on hazards zeroed.
    from ehr_prs.checkpoints import load_model_and_tokenizer
    from ehr_prs.risk.hazard import hazard_risk
    from ehr_prs.time_to_event import target_families
    from ehr_prs.data.readers import read_meds_dataset, read_prs_table
    from ehr_prs.tokenizer import inputs_at_prediction_times

    model, tok, std = load_model_and_tokenizer(tiny_tte_lm)
    meds, prs = read_meds_dataset(tiny_data / "cohort" / "meds"), read_prs_table(tiny_data / "cohort" / "prs.parquet")
    data = inputs_at_prediction_times(meds, rows["frame"].slice(0, 1), tok, std, prs, split="held_out",
                                      max_length=model.config.max_position_embeddings)
    z = torch.tensor(np.asarray(data["prs"], dtype=np.float32))
    fam = target_families(tok, model.config.tte_families, ["ICD10CM/E11*"])
    shift = model.tte_head.hazard_shift
    assert shift.up.abs().sum() > 0  # trained: the adapter does move this person's hazard
    weights = (shift.up.detach()[fam] @ shift.down.weight.detach()).mean(0).numpy()
    with torch.no_grad():
        shift.up.zero_()
    ehr_only = hazard_risk(model, [list(data["input_ids"][0])], fam, own["horizon_days"][1:], z,
                           torch.ones(1, dtype=torch.bool), tok.pad_token_id, progress=False)[0]
    np.testing.assert_allclose(d["curves"]["no_genotype"]["risk"][1:], ehr_only, rtol=1e-12, atol=0)

    # The what-if: weights are the adapter's (up @ down), moved scores the largest |w|, in the risk direction;
    # "w x z" ranks this person's scores; the 90th-percentile genome's risk is above the 10th's.
    w = d["whatif"]
    top = sorted(range(len(weights)), key=lambda j: -abs(weights[j]))[:5]
    assert [s["score"] for s in w["moved"]] == [std.columns[j] for j in top]
    for s in w["moved"]:
        assert s["weight"] == pytest.approx(float(weights[std.columns.index(s["score"])]), rel=1e-5)
        assert (s["high"] - s["low"]) * s["weight"] > 0
    contrib = [abs(s["contribution"]) for s in w["top_scores"]]
    assert contrib == sorted(contrib, reverse=True)
    for s in w["top_scores"]:
        assert s["contribution"] == pytest.approx(s["weight"] * s["z"], rel=1e-9)
    assert d["risk_at_horizon"]["high"] > d["risk_at_horizon"]["low"]
    assert d["relative_risk"]["own"] == pytest.approx(d["risk_at_horizon"]["own"] / d["risk_at_horizon"]["no_genotype"])
    assert w["reference"]["n"] >= 20


@pytest.fixture(scope="module")
def pages(tiny_tte_lm, tiny_data, rows, tmp_path_factory) -> Path:
    """`--labels --rows 3` pages from sampled futures (logit-bias model): two genotyped people, one not."""
    out = tmp_path_factory.mktemp("view_pages") / "pages"
    cohort = tiny_data / "cohort"
    assert cli(["view", "--model", str(tiny_tte_lm), "--meds", str(cohort / "meds"), "--prs", str(cohort / "prs.parquet"),
                "--labels", str(rows["three"]), "--rows", "3", *CODES, "--horizon-days", "730",
                "--method", "survival", "--seed", "5", *FAST, "--out", str(out)]) == 0
    return out


def test_sampled_pages_equal_risk_with_the_same_seed(pages, tiny_tte_lm, tiny_data, rows, tmp_path):
    assert sorted(p.name for p in pages.iterdir()) == ["index.html", "plotly.min.js", "row_001.html", "row_002.html",
                                                       "row_003.html"]
    data = [page_data((pages / f"row_{i:03d}.html").read_text()) for i in (1, 2, 3)]
    sampling = ["--method", "survival", "--samples", "4", "--max-new-tokens", "32", "--seed", "5"]
    with_prs = risk_of(tiny_tte_lm, tiny_data, rows["three"], tmp_path / "r.parquet", *sampling, "--limit", "3")
    without = risk_of(tiny_tte_lm, tiny_data, rows["three"], tmp_path / "r0.parquet", *sampling, "--limit", "3", prs=False)
    for i, d in enumerate(data):
        assert d["sampled"] and d["row_index"] == i and d["samples"] == 4
        assert d["risk_at_horizon"]["own"] == with_prs[i]
        assert d["risk_at_horizon"]["no_genotype"] == without[i]
        c = d["curves"]["own"]
        assert c["lo"][-1] <= c["risk"][-1] <= c["hi"][-1]  # the Monte Carlo band
    assert [d["genotyped"] for d in data] == [True, True, False]
    # Not genotyped: the own curve is the no-genotype one, and the logit-bias weights still define the what-if.
    assert data[2]["curves"]["own"]["risk"] == data[2]["curves"]["no_genotype"]["risk"]
    assert data[2]["whatif"]["top_scores"] == [] and all(s["z"] is None for s in data[2]["whatif"]["moved"])
    # A one-row page (--subject) samples with row 0's numbers: equal to risk on a one-row label file.
    row = rows["frame"].row(1, named=True)
    out = tmp_path / "one.html"
    assert cli(view_args(tiny_tte_lm, tiny_data, row, out) + ["--method", "survival", "--seed", "5", *FAST]) == 0
    one = risk_of(tiny_tte_lm, tiny_data, rows["one"][1], tmp_path / "r1.parquet", *sampling)
    assert page_data(out.read_text())["risk_at_horizon"]["own"] == one[0]
    index = (pages / "index.html").read_text()
    assert all(f"row_{i:03d}.html" in index for i in (1, 2, 3)) and "not a diagnosis" in index


def test_prefix_model_what_if_uses_the_gradient_at_the_average_genome(tiny_lm, tiny_data, rows, tmp_path):
    row = rows["frame"].row(0, named=True)
    out = tmp_path / "prefix.html"
    assert cli(view_args(tiny_lm, tiny_data, row, out) + ["--method", "survival", *FAST, "--futures", "0"]) == 0
    d = page_data(out.read_text())
    assert d["method"] == "survival" and "gradient" in d["whatif"]["weights_meaning"]
    assert len(d["whatif"]["moved"]) == 5 and all(math.isfinite(s["weight"]) for s in d["whatif"]["moved"])


def test_nothing_after_the_prediction_time_reaches_the_page(tiny_tte_lm, tiny_data, rows, tmp_path):
    row = rows["frame"].row(0, named=True)
    sid, when = row["subject_id"], row["prediction_time"]
    meds = tmp_path / "meds"
    shutil.copytree(tiny_data / "cohort" / "meds", meds)
    # Future events of this subject: a code with a description that must never show, a HbA1c of 987.6,
    # and the outcome itself, 1 to 3 days after the prediction time.
    codes = pl.read_parquet(meds / "metadata" / "codes.parquet")
    planted_code = pl.DataFrame({"code": ["PLANTED/FUTURE"], "description": ["A PLANTED FUTURE EVENT"]})
    pl.concat([codes, planted_code.cast({c: codes.schema[c] for c in planted_code.columns})],
              how="diagonal").write_parquet(meds / "metadata" / "codes.parquet")
    for shard in (meds / "data").rglob("*.parquet"):
        frame = pl.read_parquet(shard)
        if sid not in frame["subject_id"]:
            continue
        later = pl.DataFrame({"subject_id": [sid] * 3,
                              "time": [when + dt.timedelta(days=d) for d in (1, 2, 3)],
                              "code": ["PLANTED/FUTURE", "LOINC/4548-4", "ICD10CM/E11.9"],
                              "numeric_value": [None, 987.6, None]}).cast(frame.schema)
        pl.concat([frame, later]).sort("subject_id", "time", nulls_last=False, maintain_order=True).write_parquet(shard)
    clean, planted = tmp_path / "clean.html", tmp_path / "planted.html"
    args = view_args(tiny_tte_lm, tiny_data, row, clean) + ["--futures", "2", "--cohort-rows", "0"]
    assert cli(args) == 0
    args_planted = [a if a != str(tiny_data / "cohort" / "meds") else str(meds) for a in args]
    args_planted[args_planted.index("--out") + 1] = str(planted)
    assert cli(args_planted) == 0
    text = planted.read_text()
    assert "PLANTED" not in text and "987.6" not in text
    assert text == clean.read_text()  # not one byte differs: the record, curves and futures are the same
    d = page_data(text)
    assert d["record"]["last_event"] <= d["prediction_time"]
    events = pl.read_parquet(list((tiny_data / "cohort" / "meds" / "data").rglob("*.parquet")))
    n_before = events.filter((pl.col("subject_id") == sid) & pl.col("time").is_not_null() & (pl.col("time") <= when)
                             & (pl.col("code") != "MEDS_BIRTH")).height
    assert d["record"]["n_events"] == n_before


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_are_clear_errors_and_write_nothing(tiny_tte_lm, ehr_only_lm, tiny_data, rows, tmp_path, capsys):
    row = rows["frame"].row(0, named=True)
    out = tmp_path / "page.html"
    base = view_args(tiny_tte_lm, tiny_data, row, out)

    def fails(args, *needles):
        capsys.readouterr()
        assert cli(args) == 2
        err = capsys.readouterr().err
        for needle in needles:
            assert needle in err, err
        assert not out.exists() and not list(tmp_path.glob(".page.html*"))
        return err

    def swap(flag, value, args=base):
        a = list(args)
        a[a.index(flag) + 1] = value
        return a

    fails(swap("--subject", "123456789"), "--subject 123456789", "no events for this subject")
    fails(swap("--prediction-time", "1900-01-01"), "--prediction-time 1900-01-01", "before subject", "first event")
    fails(swap("--prediction-time", "last tuesday"), "--prediction-time 'last tuesday'", "ISO date")
    fails(swap("--codes", "ICD10CM/NOPE9"), "--codes", "'ICD10CM/NOPE9' matches no token")
    fails(swap("--model", str(ehr_only_lm)), "has no genomic adapter", "--no-whatif")
    fails([a for a in base if a not in ("--prs", str(tiny_data / "cohort" / "prs.parquet"))], "needs --prs")
    fails(swap("--out", str(tmp_path / "page.txt")), "ending in .html")
    fails(base + ["--labels", str(rows["three"])], "either --subject")
    # The EHR-only model with --no-whatif makes the record and the risk curve.
    assert cli(swap("--model", str(ehr_only_lm)) + ["--no-whatif", *FAST, "--futures", "0"]) == 0
    d = page_data(out.read_text())
    assert d["whatif"] is None and "no_genotype" not in d["curves"]
    # An existing page is not replaced without --overwrite.
    capsys.readouterr()
    assert cli(swap("--model", str(ehr_only_lm)) + ["--no-whatif"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_outputs_never_replace_or_enter_an_input(tiny_tte_lm, tiny_data, rows, tmp_path, capsys):
    meds = tiny_data / "cohort" / "meds"
    row = rows["frame"].row(0, named=True)
    inside = meds / "page.html"
    capsys.readouterr()
    assert cli(view_args(tiny_tte_lm, tiny_data, row, inside) + ["--overwrite"]) == 2
    assert "lies inside the --meds input" in capsys.readouterr().err and not inside.exists()
    cohort = tiny_data / "cohort"
    folder = ["view", "--model", str(tiny_tte_lm), "--meds", str(meds), "--prs", str(cohort / "prs.parquet"),
              "--labels", str(rows["three"]), *CODES, "--overwrite", "--out", str(tiny_tte_lm)]
    assert cli(folder) == 2
    assert "is the --model input" in capsys.readouterr().err and (tiny_tte_lm / "config.json").exists()
    with_f, without_f, prs_f, _ = _cohort_files(tmp_path)
    assert cli(["whatif", "--with", str(with_f), "--without", str(without_f), "--prs", str(prs_f), "--overwrite",
                "--out", str(tmp_path)]) == 2
    assert "contains the --with input" in capsys.readouterr().err and with_f.exists()


# ----------------------------------------------------------------------------- the browser


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4): no package needed."""

    def __init__(self, binary: str, width: int = 1280, height: int = 900):
        self.profile = tempfile.mkdtemp(prefix="ehr-prs-chromium-")
        to_child, self._w = os.pipe()
        self._r, from_child = os.pipe()

        def fds():  # in the child: the protocol reads commands from fd 3 and writes answers to fd 4
            a, b = os.dup(to_child), os.dup(from_child)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
             "--disable-extensions", "--disable-background-networking", "--disable-dev-shm-usage",
             f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "about:blank"],
            pass_fds=(3, 4), preexec_fn=fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self._buf, self._id, self.events = b"", 0, []
        self.width, self.height = width, height
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=True)
        self._metrics(height)

    def _metrics(self, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": self.width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=True)

    def _read(self, timeout: float) -> dict:
        end = time.time() + timeout
        while b"\0" not in self._buf:
            left = end - time.time()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError("no answer from Chromium")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed its DevTools pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, params: dict | None = None, session: bool = False, timeout: float = 60) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            m = self._read(timeout)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def open(self, url: str, settle: float = 1.0) -> list[str]:
        """Load a page; returns the console errors and uncaught exceptions it produced."""
        self.events.clear()
        self.call("Page.navigate", {"url": url}, session=True)
        end = time.time() + 60
        while not any(m.get("method") == "Page.loadEventFired" for m in self.events):
            self.events.append(self._read(max(0.01, end - time.time())))
        time.sleep(settle)
        self.call("Runtime.evaluate", {"expression": "1"}, session=True)  # collects what arrived meanwhile
        errors = []
        for m in self.events:
            p = m.get("params", {})
            if m.get("method") == "Runtime.exceptionThrown":
                details = p["exceptionDetails"]
                errors.append(details.get("exception", {}).get("description") or details.get("text"))
            elif m.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append(" ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))
            elif m.get("method") == "Log.entryAdded" and p["entry"].get("level") == "error":
                errors.append(p["entry"].get("text"))
        return errors

    def evaluate(self, expression: str):
        r = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=True)
        assert "exceptionDetails" not in r, r
        return r["result"].get("value")

    def screenshot(self, path: Path) -> None:
        """A PNG of the whole page."""
        self._metrics(min(int(self.evaluate("Math.ceil(document.documentElement.scrollHeight)")), 12000))
        time.sleep(0.5)
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"}, session=True)["data"]))
        self._metrics(self.height)

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except Exception:  # noqa: BLE001 - it may be gone already
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)
        shutil.rmtree(self.profile, ignore_errors=True)


def test_every_page_opens_in_headless_chromium(pages, tiny_tte_lm, tiny_data, rows, tmp_path):
    binary = find_chromium()
    if binary is None:
        pytest.skip("headless Chromium not found (no chromium, chromium-browser or google-chrome on PATH): the browser "
                    "test needs a real browser; on Debian `apt-get install chromium` (.ci/run installs it when missing)")
    from PIL import Image

    single = tmp_path / "single.html"  # the one-file page (plotly inlined) from the hazard head
    assert cli(view_args(tiny_tte_lm, tiny_data, rows["frame"].row(0, named=True), single) + ["--cohort-rows", "30"]) == 0
    assert "<script src=" not in single.read_text()  # self-contained: nothing loaded from anywhere
    targets = [single, *(pages / f"row_{i:03d}.html" for i in (1, 2, 3))]
    browser = Chromium(binary)
    try:
        for path in [*targets, pages / "index.html"]:
            text = path.read_text()
            assert not re.search(r"<(script|link)[^>]+(src|href)=[\"']https?:", text), f"{path} loads from the network"
            errors = browser.open(path.resolve().as_uri())
            assert errors == [], f"{path.name}: console errors {errors}"
            dom = browser.evaluate("document.body.innerText")
            assert "A model's forecast, not a diagnosis." in dom and "secure environment" in dom
            if path.name == "index.html":
                assert "row_003.html" in dom
                continue
            d = page_data(text)
            for key in (f"Subject {d['subject_id']}", "Risk of", "Genomic what-if", "Record up to the prediction time",
                        "Sampled futures", "relative risk vs no genotype", "Scores moved in the what-if"):
                assert key in dom, f"{path.name}: {key!r} not rendered"
            n_plots = text.count("Plotly.newPlot(")
            assert n_plots >= 3
            assert browser.evaluate("document.querySelectorAll('.js-plotly-plot .main-svg').length") >= n_plots
            shot = tmp_path / f"{path.stem}.png"
            browser.screenshot(shot)
            img = Image.open(shot).convert("RGB")
            assert img.width == 1280 and img.height > 1500
            pixels = np.asarray(img.resize((320, img.height // 4)), dtype=np.float32)
            assert pixels.std() > 5 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # not blank (a blank page: std 0, 1 colour)
    finally:
        browser.close()


# ----------------------------------------------------------------------------- the cohort what-if


def _cohort_files(tmp_path: Path) -> tuple[Path, Path, Path, pl.DataFrame]:
    """Predictions with and without the genotype for 480 rows: eur 220, afr 140, eas 30, sas 10, 80 not genotyped."""
    rng = np.random.default_rng(0)
    groups = ["eur"] * 220 + ["afr"] * 140 + ["eas"] * 30 + ["sas"] * 10 + [None] * 80
    n = len(groups)
    sid = np.arange(1, n + 1, dtype=np.int64)
    score = rng.normal(size=n)
    base = 1 / (1 + np.exp(-(-2.2 + rng.normal(size=n) * 0.5)))
    genotyped = np.array([g is not None for g in groups])
    with_g = np.where(genotyped, 1 / (1 + np.exp(-(np.log(base / (1 - base)) + 0.8 * score))), base)
    y = rng.random(n) < with_g
    times = pl.Series([dt.datetime(2020, 1, 1)] * n).cast(pl.Datetime("us"))
    frame = pl.DataFrame({"subject_id": sid, "prediction_time": times, "boolean_value": y})
    with_f, without_f = tmp_path / "with.parquet", tmp_path / "without.parquet"
    frame.with_columns(pl.Series("predicted_boolean_probability", with_g)).write_parquet(with_f)
    frame.with_columns(pl.Series("predicted_boolean_probability", base)).write_parquet(without_f)
    prs = pl.DataFrame({"subject_id": sid[genotyped], "ancestry": [g for g in groups if g],
                        "PGS000001": score[genotyped], "PGS000002": rng.normal(size=int(genotyped.sum()))})
    prs.write_parquet(tmp_path / "prs.parquet")
    table = frame.with_columns(pl.Series("with", with_g), pl.Series("without", base),
                               pl.Series("ancestry", [g or "not genotyped" for g in groups]))
    return with_f, without_f, tmp_path / "prs.parquet", table


def test_cohort_whatif_by_ancestry_and_decile_keeps_small_cells_suppressed(tmp_path, capsys):
    from sklearn.metrics import roc_auc_score

    with_f, without_f, prs_f, table = _cohort_files(tmp_path)
    out = tmp_path / "whatif"
    assert cli(["whatif", "--with", str(with_f), "--without", str(without_f), "--prs", str(prs_f),
                "--prs-column", "PGS000001", "--n-bootstrap", "200", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["whatif.json", "whatif.md", "whatif_auroc.png", "whatif_deciles.png"]
    res = json.loads((out / "whatif.json").read_text())
    anc = res["by_ancestry"]
    assert anc["sas"]["suppressed"] and anc["sas"]["n"] == "<20" and "with" not in anc["sas"]
    # Exactly one level suppressed: the next smallest count (eas, 30) is hidden too.
    assert anc["eas"]["n"] == "hidden" and anc["eur"]["n"] == 220 and anc["afr"]["n"] == 140
    for level in ("eur", "afr"):
        g = table.filter(pl.col("ancestry") == level)
        y = g["boolean_value"].to_numpy()
        assert anc[level]["with"]["auroc"] == pytest.approx(roc_auc_score(y, g["with"].to_numpy()))
        assert anc[level]["without"]["auroc"] == pytest.approx(roc_auc_score(y, g["without"].to_numpy()))
        lo, hi = anc[level]["delta_auroc_ci"]
        assert lo <= anc[level]["delta_auroc"] <= hi and anc[level]["delta_auroc"] > 0
        if anc[level]["observed"] is not None:
            assert min(y.sum(), (~y).sum()) >= 20
    assert res["max_abs_change_not_genotyped"] == 0.0
    # Deciles within ancestry (eur: 22 per decile; afr: 14, suppressed; eas and sas: none shown).
    eur = res["deciles"]["eur"]
    assert len(eur) == 10 and all(not c["suppressed"] and c["n"] == 22 for c in eur)
    assert eur[-1]["mean_with"] > eur[0]["mean_with"]  # the genome raises risk with the score
    g = table.filter(pl.col("ancestry") == "eur")
    top = g.join(pl.read_parquet(prs_f), on="subject_id").sort("PGS000001").tail(22)
    assert eur[-1]["mean_with"] == pytest.approx(top["with"].mean()) and eur[-1]["mean_without"] == pytest.approx(
        top["without"].mean())
    assert all(c["suppressed"] and "mean_with" not in c for c in res["deciles"]["afr"])
    # No count under 20 is published anywhere.
    md = (out / "whatif.md").read_text()
    for key in ("n", "n_positive"):
        for c in anc.values():
            assert not isinstance(c[key], int) or c[key] == 0 or c[key] >= 20
    assert "| sas | <20 |" in md and "| eas | hidden |" in md
    # Bad input: the same file twice, an unknown column; nothing written.
    bad = tmp_path / "bad"
    capsys.readouterr()
    assert cli(["whatif", "--with", str(with_f), "--without", str(with_f), "--prs", str(prs_f), "--out", str(bad)]) == 2
    assert "--with and --without are the same file" in capsys.readouterr().err
    assert cli(["whatif", "--with", str(with_f), "--without", str(without_f), "--prs", str(prs_f),
                "--prs-column", "PGS999999", "--out", str(bad)]) == 2
    assert "--prs-column 'PGS999999'" in capsys.readouterr().err and not bad.exists()
