"""Start-up time of the command line: `ehr-prs --help` and `ehr-prs COMMAND --help` for every command.

Baseline, measured in the same run: `python -c pass` (the interpreter's own start). Each command
runs in a fresh process, best of N (the least disturbed run: start-up is a fixed cost, noise only
adds to it); the table gives seconds and the ratio to the baseline, and flags any command over the
limit (1 s: a `--help` that imports torch/transformers takes ~6 s). `python train.py --help` and
`python finetune.py --help` (the recipes run as scripts) are timed too. On a machine busy with
other work the wall times grow (the baseline least) while the CPU times barely move: the header
prints the load average; judge the 1 s limit on an idle machine.

    python -m benchmarks.cli_startup                 # best of 5
    python -m benchmarks.cli_startup --repeats 10 --limit 0.5
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, where sibling benchmarks named like
# stdlib modules (tokenize.py) would shadow them.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def ehr_prs_command() -> list[str]:
    """The console script beside this interpreter (what users type), else `python -m ehr_prs.cli`."""
    script = Path(sys.executable).with_name("ehr-prs")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ehr_prs.cli"]


def best_of(cmd: list[str], repeats: int) -> tuple[float, float]:
    """Fastest wall time and fastest CPU time (user + system, s) of `repeats` fresh runs of `cmd`.

    CPU time is what the process itself spent: on a machine shared with other work, wall time also
    counts the waits for a free core. A failing run is an error.
    """
    walls, cpus = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True, cwd=REPO)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return min(walls), min(cpus)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per command; the fastest counts")
    parser.add_argument("--limit", type=float, default=1.0, help="flag commands slower than this many seconds")
    args = parser.parse_args(argv)

    from ehr_prs.cli import COMMANDS  # the registry only: light to import

    cli = ehr_prs_command()
    rows = [("python -c pass (baseline)", [sys.executable, "-c", "pass"]),
            ("ehr-prs --help", [*cli, "--help"])]
    rows += [(f"ehr-prs {name} --help", [*cli, name, "--help"]) for name in COMMANDS]
    rows += [(f"python {script} --help", [sys.executable, str(REPO / script), "--help"])
             for script in ("train.py", "finetune.py") if (REPO / script).exists()]

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"start-up, best of {args.repeats} fresh processes ({' '.join(cli)}); {os.cpu_count()} cores, "
          f"load average {load}")
    print(f"{'command':<36} {'wall s':>7} {'x baseline':>11} {'cpu s':>7} {'x baseline':>11}")
    baseline, slow = None, []
    for i, (label, cmd) in enumerate(rows):
        wall, cpu = best_of(cmd, args.repeats)
        baseline = (wall, cpu) if i == 0 else baseline
        over = i > 0 and wall > args.limit
        if over:
            slow.append(label)
        print(f"{label:<36} {wall:>7.3f} {wall / baseline[0]:>10.1f}x {cpu:>7.3f} "
              f"{cpu / max(baseline[1], 1e-3):>10.1f}x" + (f"   OVER {args.limit:g} s" if over else ""))
    print(f"{len(rows) - 1 - len(slow)} of {len(rows) - 1} commands under {args.limit:g} s"
          + (f"; over: {', '.join(slow)}" if slow else ""))
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
