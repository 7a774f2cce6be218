"""Speed and peak memory of `ehr-prs tokenize`, against a plain pyarrow scan of the same files.

    python -m benchmarks.tokenize                       # 10,000 and 100,000 subjects
    python -m benchmarks.tokenize --cohort /tmp/sim20k  # a cohort from `ehr-prs simulate`

For each size it needs a MEDS cohort: `ehr-prs simulate --out DIR --subjects N` when the
simulator is installed, else a synthetic MEDS cohort written here with numpy (same code
families, visits, labs; stated in the output). Each measurement runs in its own process on one
thread (POLARS_MAX_THREADS=1, one arrow CPU), so events/s is per core and peak RSS is that
process's own. The baseline is pyarrow reading every data file of every split (all columns)
in the same run: ratio = tokenize time / scan time.
"""

from __future__ import annotations

import sys

# This file is named tokenize.py, like a stdlib module: drop its folder from the import path
# before anything imports the real `tokenize`.
sys.path[:] = [p for p in sys.path if p not in ("", __file__.rsplit("/", 1)[0]) and not p.endswith("/benchmarks")]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

SINGLE_THREAD = {"POLARS_MAX_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1"}


def synthetic_cohort(root: Path, n_subjects: int, seed: int = 0, per_shard: int = 5000) -> Path:
    """Write a MEDS cohort with ~250 events per subject, shards of `per_shard` subjects."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    dx = [f"ICD10CM/{c}{i:02d}.{j}" for c in "EIJKN" for i in range(40) for j in range(5)]
    rx = [f"RxNorm/{100000 + i}" for i in range(800)]
    lab = [f"LOINC/{2000 + i}-{i % 10}" for i in range(60)]
    px = [f"CPT4/{99000 + i}" for i in range(300)]
    vocab = np.array(dx + rx + px)
    zipf = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    zipf /= zipf.sum()
    splits, sid0 = [], 1
    for split, frac in (("train", 0.8), ("tuning", 0.1), ("held_out", 0.1)):
        n_split = int(round(n_subjects * frac))
        for shard, start in enumerate(range(0, n_split, per_shard)):
            ids = np.arange(sid0 + start, sid0 + min(start + per_shard, n_split))
            n_vis = rng.poisson(25, len(ids)) + 1
            vis_sub = np.repeat(ids, n_vis)
            birth = np.datetime64("1940-01-01") + rng.integers(0, 60 * 365, len(ids)).astype("timedelta64[D]")
            gaps = rng.exponential(60, len(vis_sub)).astype("int64") + 1
            first = np.r_[0, np.cumsum(n_vis)[:-1]]
            gaps[first] = 18 * 365 + rng.integers(0, 20 * 365, len(ids))
            cs = np.cumsum(gaps)
            days = cs - np.repeat(cs[first] - gaps[first], n_vis)
            vis_t = (np.repeat(birth, n_vis).astype("datetime64[us]") + days.astype("timedelta64[D]"))
            per_vis = rng.poisson(4, len(vis_sub)) + 1
            ev_sub = np.repeat(vis_sub, per_vis)
            ev_t = np.repeat(vis_t, per_vis) + rng.integers(0, 3600, len(ev_sub)).astype("timedelta64[s]")
            ev_code = vocab[rng.choice(len(vocab), len(ev_sub), p=zipf)]
            n_lab = 2 * len(vis_sub)
            lab_sub, lab_t = np.repeat(vis_sub, 2), np.repeat(vis_t, 2) + np.timedelta64(30, "m")
            lab_code = np.array(lab)[rng.integers(0, len(lab), n_lab)]
            lab_val = rng.lognormal(1.5, 0.5, n_lab).astype(np.float32)
            sub = np.concatenate([ids, ids, ids, vis_sub, ev_sub, lab_sub, vis_sub])
            t = np.concatenate([np.full(2 * len(ids), np.datetime64("NaT"), "datetime64[us]"), birth.astype("datetime64[us]"),
                                vis_t, ev_t, lab_t, vis_t + np.timedelta64(2, "h")])
            code = np.concatenate([np.where(ids % 2, "Gender/F", "Gender/M"), np.where(ids % 3, "Race/White", "Race/Black"),
                                   np.full(len(ids), "MEDS_BIRTH"), np.full(len(vis_sub), "Visit/OP"), ev_code, lab_code,
                                   np.full(len(vis_sub), "Visit/END")])
            val = np.concatenate([np.full(len(sub) - n_lab - len(vis_sub), np.nan, np.float32), lab_val,
                                  np.full(len(vis_sub), np.nan, np.float32)])
            tk = np.where(np.isnat(t), np.iinfo(np.int64).min, t.astype("int64"))
            order = np.lexsort((tk, sub))
            table = pa.table({
                "subject_id": pa.array(sub[order], pa.int64()),
                "time": pa.array(t[order], pa.timestamp("us")),
                "code": pa.array(code[order].astype(object), pa.string()),
                "numeric_value": pa.array(val[order], pa.float32(), from_pandas=True),
            })
            (root / "data" / split).mkdir(parents=True, exist_ok=True)
            pq.write_table(table, root / "data" / split / f"{shard}.parquet")
            splits += [(int(i), split) for i in ids]
        sid0 += n_split
    pq.write_table(pa.table({"subject_id": pa.array([s for s, _ in splits], pa.int64()),
                             "split": [p for _, p in splits]}), root / "metadata" / "subject_splits.parquet")
    pq.write_table(pa.table({"code": pa.array([], pa.string()), "description": pa.array([], pa.string()),
                             "parent_codes": pa.array([], pa.list_(pa.string()))}), root / "metadata" / "codes.parquet")
    (root / "metadata" / "dataset.json").write_text(json.dumps(
        {"dataset_name": "synthetic-benchmark", "dataset_version": "0", "etl_name": "benchmarks/tokenize.py",
         "etl_version": "0", "meds_version": "0.4.1", "created_at": "2026-01-01T00:00:00"}))
    return root


def cohort_for(n: int, work: Path) -> tuple[Path, str]:
    """A MEDS cohort of n subjects: from `ehr-prs simulate` if available, else synthetic."""
    out = work / f"sim{n}"
    try:
        from ehr_prs import cli

        if "simulate" in cli.COMMANDS:
            subprocess.run([sys.executable, "-m", "ehr_prs.cli", "simulate", "--out", str(out),
                            "--subjects", str(n), "--seed", "0", "--n-prs", "16"], check=True, capture_output=True)
            return out / "meds", "ehr-prs simulate"
    except (ImportError, subprocess.CalledProcessError) as err:
        print(f"simulate failed ({err}); using the synthetic cohort", file=sys.stderr)
    return synthetic_cohort(out / "meds", n), "synthetic (benchmarks/tokenize.py)"


def worker(kind: str, meds: str, out: str) -> dict:
    """Run one measurement in this process; return seconds, events and peak RSS (MiB)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind == "tokenize":
        from ehr_prs.tokenizer.build import build  # imports (transformers, datasets) are not timed
    pa.set_cpu_count(1)
    t0 = time.perf_counter()
    if kind == "scan":
        events = 0
        for f in sorted(Path(meds, "data").rglob("*.parquet")):
            events += pq.read_table(f, use_threads=False).num_rows
    else:
        summary = build(meds, out, progress=False)
        events = sum(s["events"] for s in summary["splits"].values())
    seconds = time.perf_counter() - t0
    # VmHWM is this process image's own peak (ru_maxrss would carry over the parent's across exec).
    hwm = [line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:")]
    rss = int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"kind": kind, "seconds": seconds, "events": events, "peak_rss_mib": rss}


def measure(kind: str, meds: Path, out: Path) -> dict:
    env = {**os.environ, **SINGLE_THREAD}
    res = subprocess.run([sys.executable, __file__, "--worker", kind, "--meds", str(meds), "--out", str(out)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--cohort", nargs="*", default=None, help="existing MEDS roots (or simulate outputs) instead of --sizes")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    p.add_argument("--worker", choices=["scan", "tokenize"], help=argparse.SUPPRESS)
    p.add_argument("--meds", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.meds, args.out)))
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="tokbench-"))
    cohorts = [(Path(c) / "meds" if (Path(c) / "meds").is_dir() else Path(c), "given") for c in args.cohort] \
        if args.cohort else [cohort_for(n, work) for n in args.sizes]
    print(f"{'cohort':<34} {'source':<22} {'events':>11} {'scan ev/s':>11} {'tok ev/s':>11} {'time ratio':>10} "
          f"{'scan MiB':>9} {'tok MiB':>9}")
    for meds, source in cohorts:
        scan = measure("scan", meds, work / "unused")
        tok = measure("tokenize", meds, work / "tok_out")
        shutil.rmtree(work / "tok_out", ignore_errors=True)
        print(f"{str(meds):<34} {source:<22} {tok['events']:>11,} {scan['events'] / scan['seconds']:>11,.0f} "
              f"{tok['events'] / tok['seconds']:>11,.0f} {tok['seconds'] / scan['seconds']:>10.1f} "
              f"{scan['peak_rss_mib']:>9.0f} {tok['peak_rss_mib']:>9.0f}", flush=True)
    if not args.work and not args.cohort:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
