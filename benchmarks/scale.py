"""Memory and speed of `ehr-prs simulate` -> `ehr-prs tokenize` as the cohort grows (issue 23, item 3).

    python -m benchmarks.scale                                  # 100k, 300k and 1M subjects, 3,481 scores
    python -m benchmarks.scale --sizes 10000 30000 --json out.json
    python -m benchmarks.scale --sizes 1000000 --work /tmp/scale --keep

For each size it simulates a cohort with the paper's 3,481 PRS columns, tokenizes it with that
PRS table, then runs the named baseline: a plain pyarrow scan of the same files (every MEDS data
file whole, the PRS table one row group at a time), so that events/s can be read against what
merely decoding the inputs costs on this machine at this moment. Each step runs in its own
process on one thread (POLARS_MAX_THREADS=1, one arrow CPU, as benchmarks/tokenize.py does), so
events/s is per core and the peak RSS is that process's own (VmHWM: a fresh process image's
high-water mark, file-backed pages such as memory-mapped datasets included). The 1-minute load
average is printed beside each step: on a shared machine, times vary with it; peak memory does not.

The table (markdown, on stdout) gives for each size and step: wall seconds, peak RSS, its ratio
to the smallest size's peak for that step, events, events/s per core, and the step's time over
the baseline scan's. Goal (issue 23): tokenize's peak at 1 M within 1.5 x that at 100 k and
under 8 GiB, events/s per core not falling with size. Cohorts are written under --work (default
a temporary folder) and deleted after each size unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SINGLE_THREAD = {"POLARS_MAX_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                 "RAYON_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
STEPS = ("simulate", "tokenize", "scan")
GOAL_PEAK_RATIO = 1.5
GOAL_PEAK_GIB = 8.0


def _peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM; ru_maxrss where /proc is missing), in MiB."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(step: str, n: int, n_prs: int, seed: int, cohort: Path, out: Path) -> dict:
    """Run one step in this process; return its seconds, events and peak RSS (MiB)."""
    import pyarrow as pa
    import pyarrow.parquet  # noqa: F401  (the scan's import is not timed either)

    pa.set_cpu_count(1)
    if step == "simulate":
        from ehr_prs.data.simulate import simulate_cohort  # imports are not timed
    elif step == "tokenize":
        from ehr_prs.tokenizer.build import build
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    if step == "simulate":
        events = simulate_cohort(cohort, n_subjects=n, seed=seed, n_prs=n_prs, progress=False)["n_events"]
    elif step == "tokenize":
        summary = build(cohort / "meds", out, prs_path=cohort / "prs.parquet", progress=False)
        events = sum(s["events"] for s in summary["splits"].values())
    else:
        events = scan(cohort)
    seconds = time.perf_counter() - t0
    return {"step": step, "subjects": n, "seconds": seconds, "events": int(events), "peak_rss_mib": _peak_rss_mib(),
            "load_1min": round((load + os.getloadavg()[0]) / 2, 2)}


def scan(cohort: Path) -> int:
    """The baseline: decode every MEDS data file (all columns) and the PRS table row group by row group."""
    import pyarrow.parquet as pq

    events = 0
    for f in sorted((cohort / "meds" / "data").rglob("*.parquet")):
        events += pq.read_table(f, use_threads=False).num_rows
    with pq.ParquetFile(cohort / "prs.parquet") as pf:
        for i in range(pf.metadata.num_row_groups):
            pf.read_row_group(i, use_threads=False)
    return events


def measure(step: str, n: int, args: argparse.Namespace, cohort: Path, out: Path) -> dict:
    """One step in a fresh single-threaded process (its peak memory is its own)."""
    env = {**os.environ, **SINGLE_THREAD}
    cmd = [sys.executable, "-m", "benchmarks.scale", "--worker", step, "--sizes", str(n), "--n-prs", str(args.n_prs),
           "--seed", str(args.seed), "--cohort", str(cohort), "--out", str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if res.returncode != 0:
        raise SystemExit(f"{step} at {n:,} subjects failed (exit {res.returncode}):\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    """The markdown table: one row per size and step, ratios against the smallest size and the scan."""
    base_peak = {}
    for r in sorted(results, key=lambda r: r["subjects"]):
        base_peak.setdefault(r["step"], r["peak_rss_mib"])
    scan_s = {r["subjects"]: r["seconds"] for r in results if r["step"] == "scan"}
    smallest = min(r["subjects"] for r in results)
    lines = [f"| subjects | step | wall s | peak RSS MiB | peak / {smallest:,} | events | events/s per core "
             f"| time / scan | load |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        vs = f"{r['seconds'] / scan_s[r['subjects']]:.1f}" if r["subjects"] in scan_s else "-"
        lines.append(f"| {r['subjects']:,} | {r['step']} | {r['seconds']:.1f} | {r['peak_rss_mib']:,.0f} | "
                     f"{r['peak_rss_mib'] / base_peak[r['step']]:.2f} | {r['events']:,} | "
                     f"{r['events'] / r['seconds']:,.0f} | {vs} | {r['load_1min']:.1f} |")
    return "\n".join(lines)


def verdict(results: list[dict]) -> str:
    """One line per goal of issue 23 item 3, for the tokenize step (needs at least two sizes)."""
    tok = sorted((r for r in results if r["step"] == "tokenize"), key=lambda r: r["subjects"])
    if len(tok) < 2:
        return ""
    lo, hi = tok[0], tok[-1]
    ratio = hi["peak_rss_mib"] / lo["peak_rss_mib"]
    rates = " -> ".join(f"{r['events'] / r['seconds']:,.0f}" for r in tok)
    loads = " -> ".join(f"{r['load_1min']:.1f}" for r in tok)
    return (f"tokenize peak at {hi['subjects']:,} = {ratio:.2f} x that at {lo['subjects']:,} (goal <= {GOAL_PEAK_RATIO}), "
            f"{hi['peak_rss_mib'] / 1024:.2f} GiB (goal < {GOAL_PEAK_GIB:g}); events/s per core {rates} "
            f"(goal: not falling; load {loads})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000], help="cohort sizes (subjects)")
    p.add_argument("--n-prs", type=int, default=3481, help="PRS columns (default 3481, the paper's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one under /tmp)")
    p.add_argument("--keep", action="store_true", help="keep each size's cohort and tokenized output")
    p.add_argument("--json", default=None, help="also write the measurements to this JSON file")
    p.add_argument("--worker", choices=STEPS, help=argparse.SUPPRESS)
    p.add_argument("--cohort", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.sizes[0], args.n_prs, args.seed, Path(args.cohort), Path(args.out))))
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="ehr-prs-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    print(f"# simulate -> tokenize, {args.n_prs} PRS columns, one thread per step, {os.cpu_count()} cores "
          f"(load at start {os.getloadavg()[0]:.1f})", flush=True)
    try:
        for n in args.sizes:
            cohort, out = work / f"sim{n}", work / f"tok{n}"
            for d in (cohort, out):
                shutil.rmtree(d, ignore_errors=True)
            for step in STEPS:
                r = measure(step, n, args, cohort, out)
                results.append(r)
                print(f"{n:>9,} {step:<9} {r['seconds']:8.1f} s  peak {r['peak_rss_mib']:8,.0f} MiB  "
                      f"{r['events'] / r['seconds']:>11,.0f} events/s  load {r['load_1min']:.1f}", file=sys.stderr, flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps({"n_prs": args.n_prs, "results": results}, indent=1) + "\n")
            if not args.keep:
                for d in (cohort, out):
                    shutil.rmtree(d, ignore_errors=True)
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(table(results))
    line = verdict(results)
    if line:
        print(f"\n{line}")


if __name__ == "__main__":
    main()
