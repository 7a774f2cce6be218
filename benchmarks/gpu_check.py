"""The GPU check: pretrain the paper preset in bf16 (tokens/s, MFU), then zero-shot risk at K = 16 (rows/s).

    python -m benchmarks.gpu_check --out RESULTS          # a CUDA machine: ~6 minutes on one H100 (estimated below)
    python -m benchmarks.gpu_check --dry-run --out /tmp/gc  # the same steps on CPU at tiny size, ~1 minute

Steps, each printed with its wall time:
1. `ehr-prs simulate` 8,000 subjects with the paper's 3,481 scores, then `ehr-prs tokenize` (context 2,048).
2. Pretrain the paper preset (hidden 960, 12 layers, 8 heads; 133 M non-embedding parameters) with a
   time-to-event head over every code family seen in >= 20 training subjects (T2D among them), bf16,
   300 optimizer steps of 32 sequences, through train.py's own recipe (Trainer, SDPA). The throughput
   is measured from step 30 (warm-up, allocator and kernel selection behind) to the last step, before
   the final save: non-padding tokens/s, and MFU against the card's peak.
3. `ehr-prs risk --method survival --samples 16` on held-out T2D label rows, then `--method hazard` (the
   TTE head: no sampling). Each method runs twice, on the first L1 and the first L2 rows (--limit), and
   rows/s = (L2 - L1) / (t2 - t1): the start-up both runs pay (imports, loading the model, reading MEDS
   and the PRS table) cancels; the end-to-end rows/s of the larger run is printed beside it. L2 is chosen
   from the first run's time so that the pair fits the time left (--budget-s).
Results: a table on stdout and RESULTS/gpu_check.json.

MFU (model FLOPs utilisation) = tokens/s x FLOPs per token / the card's peak dense bf16 FLOP/s, with
FLOPs per token = 6 N + 12 L d T (PaLM, appendix B): N the parameters of every matrix product a token
goes through (decoder, TTE head, the tied LM head; not the embedding lookup nor the PRS adapter, which
runs once per sequence), L layers, d the hidden size, T the effective context, sum(T_i^2) / sum(T_i) over
the training sequences (attention costs T_i per token of a sequence of T_i tokens). Padding and the PRS
prefix tokens count as no useful work, so MFU is the useful fraction. Peaks (dense bf16, TFLOP/s) come
from torch.cuda.get_device_name(): H100 SXM and H200 989, H100 NVL and H200 NVL 835, H100 PCIe 756,
A100 312, L40S 362, L4 121; any other card, or to override, EHR_PRS_PEAK_TFLOPS=NUMBER.

Sizing, for one H100 within ~8 minutes (estimated: the script has run only as --dry-run): simulate +
tokenize 8,000 subjects x 3,481 scores ~40 s (2,000 subjects tokenized in 5.6 s on one busy CPU thread
here); 300 steps x 32 sequences (~200 tokens each, ~2 M tokens) of a 133 M model is ~1 min even at 10 %
MFU, plus ~30 s of model set-up, evaluation and save; risk gets what is left of --budget-s 420
(survival ~60 %, hazard the rest), each run capped by a timeout; 512 paths per batch keep the risk
sampler's KV cache far under 80 GB. Everything runs in --work (default: a temporary folder, deleted at
the end).

On this workplace's GPU machines (no network; python3 there holds torch, transformers (5.17 when last
read; this project is tested on 5.25), accelerate, pyarrow, scikit-learn): carry the missing packages
as wheels (~55 MB, polars-runtime-32 54 MB of it: the 64 MiB a call may carry leaves no room for a
newer transformers), downloaded here once into the repository's ignored .whl/
(`echo /.whl/ >> .git/info/exclude`):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl polars==2.1.0 \\
        polars-runtime-32==2.1.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 meds==0.4.1 \\
        flexible_schema jsonschema jsonschema-specifications referencing rpds-py

then one run with carry [".whl"] and the command
`python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
&& PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_check --out $OUT`, timeout_s 540.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets, matched as
# substrings of torch.cuda.get_device_name() in this order (the more specific name first).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM (get_device_name: "NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)
PEAK_ENV = "EHR_PRS_PEAK_TFLOPS"
TARGET_CODES = "ICD10CM/E11*"  # type 2 diabetes, the paper's task (scripts/demo.sh)
HORIZON_DAYS = 730


# ----------------------------------------------------------------------------- the arithmetic (tests/test_fsdp.py)


def peak_bf16_flops(device_name: str, env: dict | None = None) -> float | None:
    """The card's peak dense bf16 FLOP/s: EHR_PRS_PEAK_TFLOPS when set, else from the table; None if unknown."""
    env = os.environ if env is None else env
    if env.get(PEAK_ENV):
        value = float(env[PEAK_ENV])
        if not value > 0:
            raise ValueError(f"{PEAK_ENV}={env[PEAK_ENV]!r}: give the card's peak bf16 TFLOP/s, a positive number")
        return value * 1e12
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12
    return None


def effective_context(lengths, cap: int) -> float:
    """sum(T^2) / sum(T) over sequences of T tokens (each capped at `cap`): the mean context a token attends to
    in the non-causal accounting of 12 L d T (a sequence of T tokens costs T attention per token)."""
    capped = [min(int(t), cap) for t in lengths]
    total = sum(capped)
    return sum(t * t for t in capped) / total if total else 0.0


def matmul_parameters(model) -> int:
    """Parameters of the matrix products every token goes through: the 2-D weights, the tied embedding once (as
    the LM head's product; an untied input embedding is a lookup and does not count), not the PRS adapter (it
    runs once per sequence)."""
    named = dict(model.named_parameters())  # a tied weight appears once
    n = sum(p.numel() for name, p in named.items() if p.ndim >= 2 and "prs_adapter" not in name)
    embed = model.get_input_embeddings().weight
    if model.get_output_embeddings() is not None and model.get_output_embeddings().weight is not embed:
        n -= embed.numel()
    return n


def flops_per_token(n_matmul: int, n_layers: int, hidden: int, context: float) -> float:
    """Training FLOPs per token: 6 N (forward 2 N, backward 4 N) + 12 L d T for attention scores and values."""
    return 6.0 * n_matmul + 12.0 * n_layers * hidden * context


def mfu(tokens_per_second: float, per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation, a fraction of the peak (None without a peak)."""
    return tokens_per_second * per_token / peak if peak else None


# ----------------------------------------------------------------------------- the run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_check.json (small)")
    p.add_argument("--work", default=None, help="working folder for the cohort and model (default: a temporary one)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model and cohort: checks the script, ~1 min")
    p.add_argument("--subjects", type=int, default=None, help="simulated subjects (default 8000; dry run 600)")
    p.add_argument("--n-prs", type=int, default=None, help="PRS columns (default 3481, the paper's; dry run 64)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 300; dry run 8)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 32; dry run 4)")
    p.add_argument("--samples", type=int, default=16, help="K, sampled futures per risk row")
    p.add_argument("--paths-per-batch", type=int, default=None,
                   help="risk paths sampled together (default 512: 32 rows x K 16)")
    p.add_argument("--tte-families", type=int, default=1000,
                   help="cap on the TTE head's code families (all those in >= 20 training subjects, T2D among them; "
                        "0: no head, no hazard timing)")
    p.add_argument("--budget-s", type=float, default=None, help="seconds the whole check may take (default 420)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (adds ~1 min of compiling)")
    return p.parse_args(argv)


def settings(args: argparse.Namespace) -> dict:
    """The sizes: the GPU defaults, or the dry run's tiny ones; flags override either."""
    gpu = dict(subjects=8000, n_prs=3481, steps=300, batch_size=32, paths_per_batch=512, budget_s=420.0,
               preset="paper", overrides=None, max_len=2048, warm=30, max_new_tokens=256, limits=(64, 128),
               hazard_limits=(256, 512))
    dry = dict(subjects=600, n_prs=64, steps=8, batch_size=4, paths_per_batch=64, budget_s=45.0, preset="tiny",
               overrides="hidden_size=32,intermediate_size=64,num_attention_heads=2,num_key_value_heads=2,prs_tokens=2",
               max_len=128, warm=2, max_new_tokens=32, limits=(4, 8), hazard_limits=(8, 16))
    s = dict(dry if args.dry_run else gpu)
    for key in ("subjects", "n_prs", "steps", "batch_size", "paths_per_batch", "budget_s"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    if s["steps"] < 2:
        fail("--steps must be at least 2 (one warm-up step, one timed)")
    s["warm"] = min(s["warm"], s["steps"] - 1)
    return s


def fail(message: str) -> None:
    """Stop with exit status 2 and one line saying what is wrong."""
    print(f"benchmarks/gpu_check.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_device(dry_run: bool) -> str:
    """The device's name; exit 2 at once, saying why, when a real run has no CUDA GPU with bf16."""
    import torch

    if dry_run:
        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (dry run)"
    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}, " + ("built without CUDA" if torch.version.cuda is None
                                                  else f"CUDA {torch.version.cuda}, but no GPU is visible")
        fail(f"needs a CUDA GPU and found none ({build}). Run it on a GPU machine, or pass --dry-run to check "
             f"the script on CPU at tiny size.")
    if not torch.cuda.is_bf16_supported():
        fail(f"{torch.cuda.get_device_name()} has no bf16 support; the check trains in bf16 (an Ampere or newer GPU)")
    return torch.cuda.get_device_name()


def cli(args: list[str], timeout: float, threads: int | None = None) -> float:
    """Run `python -m ehr_prs.cli ARGS`; its wall time in seconds. Fails loudly with the end of its output."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "ehr_prs.cli", *args], capture_output=True, text=True, env=env,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        fail(f"`ehr-prs {args[0]}` ran past its {timeout:.0f} s safety limit; rerun with a larger --budget-s or "
             f"a smaller cohort (--subjects)")
    if done.returncode != 0:
        fail(f"`ehr-prs {' '.join(args)}` failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return time.perf_counter() - t0


def prepare_data(work: Path, s: dict) -> None:
    cli(["simulate", "--out", str(work / "cohort"), "--subjects", str(s["subjects"]), "--n-prs", str(s["n_prs"]),
         "--seed", "0", "--split-fractions", "0.6,0.1,0.3"], timeout=300)
    cli(["tokenize", "--meds", str(work / "cohort" / "meds"), "--prs", str(work / "cohort" / "prs.parquet"),
         "--out", str(work / "tok"), "--max-length", str(s["max_len"])], timeout=300)


def pretrain(work: Path, s: dict, args: argparse.Namespace, peak: float | None) -> dict:
    """train.py's recipe on the simulated cohort; throughput from step `warm` to the last step."""
    import torch
    from datasets import load_from_disk
    from transformers import TrainerCallback

    import ehr_prs.recipes.train as train

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    class Clock(TrainerCallback):
        """Time and non-padding tokens at the end of step `warm` and of the last step (before the final save)."""

        def __init__(self):
            self.marks = {}

        def on_step_end(self, targs, state, control, **kwargs):
            if state.global_step in (s["warm"], s["steps"]):
                sync()
                self.marks[state.global_step] = (time.perf_counter(), state.num_input_tokens_seen)

    clock = Clock()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    targs = train.PretrainArguments(
        data=str(work / "tok"), output_dir=str(work / "model"), preset=s["preset"], config_overrides=s["overrides"],
        prs_fusion="prefix", max_steps=s["steps"], batch_size=s["batch_size"], learning_rate=3e-4,
        warmup_steps=min(30, s["steps"] // 10), eval_steps=s["steps"] + 1, save_steps=s["steps"] + 1,  # no checkpoint
        logging_steps=max(s["steps"] // 6, 1), max_eval_samples=256, max_seq_length=s["max_len"], seed=0,
        tte_families=args.tte_families, torch_compile=args.compile,
        dataloader_num_workers=4 if torch.cuda.is_available() else 0)
    t0 = time.perf_counter()
    out = train.train(targs, callbacks=[clock])
    wall = time.perf_counter() - t0
    (t_a, n_a), (t_b, n_b) = clock.marks[s["warm"]], clock.marks[s["steps"]]
    tokens_per_s = (n_b - n_a) / max(t_b - t_a, 1e-9)

    from transformers import AutoModelForCausalLM

    import modeling_ehr_prs  # noqa: F401  (Auto registration)

    model = AutoModelForCausalLM.from_pretrained(out)
    config = model.config
    lengths = load_from_disk(str(work / "tok" / "train"))["length"]
    context = effective_context(lengths, s["max_len"] - config.num_prefix_tokens)
    n_matmul = matmul_parameters(model)
    per_token = flops_per_token(n_matmul, config.num_hidden_layers, config.hidden_size, context)
    return dict(
        model=str(out), parameters=sum(p.numel() for p in model.parameters()), matmul_parameters=n_matmul,
        has_tte_head=bool(config.has_tte_head), steps=s["steps"], timed_steps=s["steps"] - s["warm"],
        batch_size=s["batch_size"], effective_context=round(context, 1), flops_per_token=per_token,
        tokens_per_second=round(tokens_per_s, 1),
        mfu=None if peak is None else round(mfu(tokens_per_s, per_token, peak), 4),
        peak_gpu_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        wall_s=round(wall, 1),
    )


def risk_rate(work: Path, model: str, method: str, limits: tuple[int, int], s: dict, budget: float) -> dict:
    """Rows/s of `ehr-prs risk --method METHOD`: two runs on the first L1 and L2 rows, the start-up cancelling."""
    base = ["risk", "--overwrite", "--model", model, "--meds", str(work / "cohort" / "meds"),
            "--prs", str(work / "cohort" / "prs.parquet"), "--labels", str(work / "cohort" / "labels" / "t2d.parquet"),
            "--codes", TARGET_CODES, "--horizon-days", str(HORIZON_DAYS), "--method", method, "--split", "held_out",
            "--seed", "0"]
    if method != "hazard":
        base += ["--samples", str(s["samples"]), "--paths-per-batch", str(s["paths_per_batch"]),
                 "--max-new-tokens", str(s["max_new_tokens"])]
    import polars as pl

    l1, l2 = limits
    t1 = cli(base + ["--limit", str(l1), "--out", str(work / f"{method}_1.parquet")], timeout=max(budget, 120))
    # The second run: as many rows as the rest of the budget allows at the first run's (pessimistic) pace.
    # Its time is at most start-up + 0.75 x what is left (the pace counts the first run's start-up as work).
    left = budget - t1
    pace = l1 / t1
    l2 = max(l2, l1 + int(pace * max(left * 0.75 - t1, 0)))
    t2 = cli(base + ["--limit", str(l2), "--out", str(work / f"{method}_2.parquet")], timeout=max(left, 60) + 60)
    rows = pl.read_parquet(work / f"{method}_2.parquet").height  # rows the --limit left after dropping unscorable ones
    rows_1 = pl.read_parquet(work / f"{method}_1.parquet").height
    return dict(method=method, samples=None if method == "hazard" else s["samples"], rows=(rows_1, rows),
                seconds=(round(t1, 1), round(t2, 1)),
                rows_per_second=round((rows - rows_1) / max(t2 - t1, 1e-9), 2) if rows > rows_1 else None,
                end_to_end_rows_per_second=round(rows / t2, 2))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = check_device(args.dry_run)  # before anything slow
    s = settings(args)
    s["samples"] = args.samples
    peak = peak_bf16_flops(device) if not args.dry_run or os.environ.get(PEAK_ENV) else None
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ehr_prs_gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    stamp = lambda: f"[{time.perf_counter() - start:5.0f}s]"  # noqa: E731
    report: dict = dict(device=device, peak_bf16_tflops=None if peak is None else peak / 1e12, dry_run=args.dry_run,
                        settings={k: v for k, v in s.items() if k != "overrides"})
    try:
        print(f"{stamp()} {device}: simulate {s['subjects']:,} subjects x {s['n_prs']:,} scores, tokenize", flush=True)
        prepare_data(work, s)
        report["prepare_s"] = round(time.perf_counter() - start, 1)
        print(f"{stamp()} pretrain preset {s['preset']}, {s['steps']} steps x {s['batch_size']} sequences", flush=True)
        report["pretrain"] = train = pretrain(work, s, args, peak)
        print(f"{stamp()} pretrain: {train['tokens_per_second']:,.0f} tokens/s over steps {s['warm']}-{s['steps']}, "
              f"MFU {'n/a (no peak: set ' + PEAK_ENV + ')' if train['mfu'] is None else format(train['mfu'], '.1%')}, "
              f"{train['matmul_parameters']:,} matmul parameters, effective context {train['effective_context']}",
              flush=True)
        left = s["budget_s"] - (time.perf_counter() - start)
        methods = [("survival", s["limits"], 0.6 if train["has_tte_head"] else 0.9)]
        if train["has_tte_head"]:
            methods.append(("hazard", s["hazard_limits"], 0.9))
        report["risk"] = []
        for method, limits, share in methods:
            budget = max(left * share, 20.0)
            result = risk_rate(work, train["model"], method, limits, s, budget)
            report["risk"].append(result)
            left = s["budget_s"] - (time.perf_counter() - start)
            label = method if method == "hazard" else f"{method} K={s['samples']}"
            print(f"{stamp()} risk {label}: "
                  f"{result['rows_per_second']} rows/s ({result['rows'][1] - result['rows'][0]} rows in "
                  f"{result['seconds'][1] - result['seconds'][0]:.1f} s beyond the first run's start-up); end to end "
                  f"{result['end_to_end_rows_per_second']} rows/s", flush=True)
    finally:
        report["wall_s"] = round(time.perf_counter() - start, 1)
        (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{stamp()} wrote {out_dir / 'gpu_check.json'}")
    print(summary_table(report))
    return 0


def summary_table(report: dict) -> str:
    """The markdown table for the note: one row per measurement."""
    train = report.get("pretrain", {})
    lines = [f"| {report['device']} | value |", "| --- | --- |",
             f"| pretrain tokens/s (preset {report['settings']['preset']}, "
             f"{'fp32, dry run' if report['dry_run'] else 'bf16'}) | {train.get('tokens_per_second')} |",
             f"| MFU | {'n/a' if train.get('mfu') is None else format(train['mfu'], '.1%')} |",
             f"| peak GPU memory (GiB) | {train.get('peak_gpu_memory_gib')} |"]
    for r in report.get("risk", []):
        k = "" if r["method"] == "hazard" else f" K={r['samples']}"
        lines.append(f"| risk {r['method']}{k} rows/s | {r['rows_per_second']} "
                     f"(end to end {r['end_to_end_rows_per_second']}) |")
    lines.append(f"| wall time (s) | {report.get('wall_s')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
