"""Speed and peak memory of `ehr-prs simulate` at two cohort sizes.

Baseline, measured in the same run: a plain pyarrow write of the same number of rows
(random MEDS-shaped event columns with the same row count, and a random float32 PRS matrix
of the same shape), i.e. the cost of just writing the bytes the simulator writes. Each
measurement runs in its own process so that its peak RSS is its own.

    python -m benchmarks.simulate                      # 10,000 and 100,000 subjects
    python -m benchmarks.simulate --sizes 2000 10000
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, where sibling benchmarks named like
# stdlib modules (tokenize.py) would shadow them.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _worker_simulate(n: int, n_prs: int, out: Path) -> dict:
    from ehr_prs.data.simulate import simulate_cohort

    t = time.perf_counter()
    summary = simulate_cohort(out, n_subjects=n, seed=0, n_prs=n_prs, progress=False)
    return {"seconds": time.perf_counter() - t, "peak_rss_mib": _peak_rss_mib(),
            "n_events": summary["n_events"], "n_genotyped": summary["n_genotyped"]}


def _worker_baseline(n_events: int, n_genotyped: int, n_prs: int, out: Path, chunk: int = 5000) -> dict:
    """Write n_events random event rows and an n_genotyped x n_prs float32 table with pyarrow, in chunks."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    t = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    codes = pa.array([f"CODE/{i}" for i in range(400)])
    step = max(1, n_events // max(1, (n_genotyped + chunk - 1) // chunk))
    for k, start in enumerate(range(0, n_events, step)):
        m = min(step, n_events - start)
        pq.write_table(pa.table({
            "subject_id": pa.array(np.sort(rng.integers(0, 2**62, m))),
            "time": pa.array(rng.integers(10**15, 2 * 10**15, m), pa.timestamp("us")),
            "code": pa.DictionaryArray.from_arrays(pa.array(rng.integers(0, 400, m).astype(np.int32)), codes).cast(pa.string()),
            "numeric_value": pa.array(rng.standard_normal(m, dtype=np.float32)),
        }), out / f"events_{k}.parquet")
    writer = None
    for start in range(0, n_genotyped, chunk):
        m = min(chunk, n_genotyped - start)
        x = rng.standard_normal((n_prs, m), dtype=np.float32)
        table = pa.Table.from_arrays([pa.array(np.arange(start, start + m))] + [pa.array(x[j]) for j in range(n_prs)],
                                     names=["subject_id"] + [f"PGS{j + 1:06d}" for j in range(n_prs)])
        writer = writer or pq.ParquetWriter(out / "prs.parquet", table.schema)
        writer.write_table(table)
    if writer:
        writer.close()
    return {"seconds": time.perf_counter() - t, "peak_rss_mib": _peak_rss_mib()}


def _run(args: list[str]) -> dict:
    res = subprocess.run([sys.executable, "-P", __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--n-prs", type=int, default=3481)
    parser.add_argument("--worker", choices=["simulate", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--n-events", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--n-genotyped", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "simulate":
        print(json.dumps(_worker_simulate(args.n, args.n_prs, args.out)))
        return
    if args.worker == "baseline":
        print(json.dumps(_worker_baseline(args.n_events, args.n_genotyped, args.n_prs, args.out)))
        return
    print(f"ehr-prs simulate vs baseline 'plain pyarrow write of the same rows' (n_prs={args.n_prs})")
    print(f"{'subjects':>9} {'events':>10} {'sim s':>7} {'subj/s':>8} {'sim RSS MiB':>12} "
          f"{'base s':>7} {'base RSS MiB':>13} {'time ratio':>11}")
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            sim = _run(["--worker", "simulate", "--n", str(n), "--n-prs", str(args.n_prs), "--out", f"{tmp}/sim"])
        with tempfile.TemporaryDirectory() as tmp:
            base = _run(["--worker", "baseline", "--n-events", str(sim["n_events"]), "--n-genotyped",
                         str(sim["n_genotyped"]), "--n-prs", str(args.n_prs), "--out", f"{tmp}/base"])
        print(f"{n:>9} {sim['n_events']:>10} {sim['seconds']:>7.1f} {n / sim['seconds']:>8.0f} {sim['peak_rss_mib']:>12.0f} "
              f"{base['seconds']:>7.1f} {base['peak_rss_mib']:>13.0f} {sim['seconds'] / base['seconds']:>10.2f}x")


if __name__ == "__main__":
    main()
