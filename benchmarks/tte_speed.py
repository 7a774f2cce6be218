"""Speed of the time-to-event head: its cost on a training step, and hazard risk against sampling.

Part 1, the head's cost (baseline: the same model without the head, measured in the same rounds):
full training steps (forward + backward + AdamW) of the `small` preset at batch x 512 tokens, the
LM-only model and the model with a TTE head over `--families` code families (targets built by the
collator from the batch, as in pretraining) alternate round by round, so load from other processes
hits both alike; the report is the median over rounds of the step-time ratio. With --n-prs, both
models read that many scores (logit bias; the head adds its PRS -> log-hazard shift).

Part 2, risk throughput (baseline: the sampling engine, `ehr-prs risk --method survival` at K
samples per row, same model, same prompts): rows/s of `--method hazard` (one forward pass per row)
against the sampler, on random prompts of `--prompt-length` tokens; the ratio is what matters.

    python -m benchmarks.tte_speed                         # small preset, ~3 min on 2 cores
    python -m benchmarks.tte_speed --n-prs 3481 --families 1000
    python -m benchmarks.tte_speed --skip-training --model demo_out/models/tte --meds demo_out/cohort/meds \
        --labels demo_out/cohort/labels/t2d.parquet --codes 'ICD10CM/E11*'   # part 2 on a trained model, real prompts

Goals (issue 20): head <= 1.30 x the step time; hazard >= 100 x the sampler's rows/s at K = 16.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from modeling_ehr_prs import EhrPrsConfig, EhrPrsForCausalLM
from ehr_prs.collator import EhrPrsCollator


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--families", type=int, default=321, help="TTE families (the demo cohort has 321)")
    parser.add_argument("--n-prs", type=int, default=0, help="PRS columns (0: EHR-only models)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--rows", type=int, default=64, help="label rows scored in part 2")
    parser.add_argument("--samples", type=int, default=16, help="K of the sampling baseline")
    parser.add_argument("--prompt-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-training", action="store_true", help="part 2 only")
    parser.add_argument("--model", help="part 2 on this trained model (with a TTE head) instead of a random one")
    parser.add_argument("--meds", help="with --model: the MEDS data of the prompts")
    parser.add_argument("--labels", help="with --model: label rows (held_out split) whose histories are the prompts")
    parser.add_argument("--codes", nargs="+", default=["ICD10CM/E11*"], help="with --model: target codes")
    return parser.parse_args()


def real_prompts(args: argparse.Namespace):
    """(model, prompts, target token ids, family indices, token_days, stop ids) of a trained model's held-out rows."""
    import polars as pl

    from ehr_prs.data.readers import read_labels, read_meds_dataset
    from ehr_prs.checkpoints import load_model_and_tokenizer
    from ehr_prs.time_to_event import target_families
    from ehr_prs.tokenizer import inputs_at_prediction_times

    model, tokenizer, _ = load_model_and_tokenizer(args.model)
    meds = read_meds_dataset(args.meds)
    held = meds.subject_splits.filter(pl.col("split") == "held_out").get_column("subject_id")
    labels = read_labels(args.labels).filter(pl.col("subject_id").is_in(held.implode())).head(args.rows)
    data = inputs_at_prediction_times(meds, labels, tokenizer, split="held_out",
                                      max_length=model.config.max_position_embeddings - 256)
    stops = [tokenizer.eos_token_id] + [tokenizer.get_vocab()[c] for c in ("MEDS_DEATH",) if c in tokenizer.get_vocab()]
    return (model.eval(), [list(x) for x in data["input_ids"]], tokenizer.code_token_ids(args.codes),
            target_families(tokenizer, model.config.tte_families, args.codes), np.asarray(tokenizer.token_days), stops)


def fake_vocabulary(vocab: int, families: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """token_days (a tenth of the ids are time tokens) and each token's family (the rest spread over families)."""
    days = np.zeros(vocab)
    time_ids = rng.choice(np.arange(4, vocab), size=vocab // 10, replace=False)
    days[time_ids] = rng.integers(1, 400, size=len(time_ids))
    family = np.full(vocab, -1)
    codes = np.setdiff1d(np.arange(4, vocab), time_ids)
    family[codes] = rng.integers(0, families, size=len(codes))
    return days, family


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    fusion = "logit_bias" if args.n_prs else "none"
    base = EhrPrsConfig.from_preset(args.preset, n_prs=args.n_prs, prs_fusion=fusion, prs_dropout=0.0)
    days, family = fake_vocabulary(base.vocab_size, args.families, rng)
    names = [f"F/{i}" for i in range(args.families)]
    models = {"lm": EhrPrsForCausalLM(base),
              "lm+tte": EhrPrsForCausalLM(EhrPrsConfig.from_preset(args.preset, n_prs=args.n_prs, prs_fusion=fusion,
                                                                   prs_dropout=0.0, tte_families=names))}
    head = sum(p.numel() for p in models["lm+tte"].tte_head.parameters())
    print(f"preset {args.preset}, batch {args.batch} x {args.seq}, {args.families} families, n_prs {args.n_prs}; "
          f"TTE head {head:,} weights ({head / sum(p.numel() for p in models['lm'].parameters()):.1%} of the LM)")

    rows = [{"input_ids": rng.integers(4, base.vocab_size, size=args.seq).tolist(),
             "prs": rng.standard_normal(args.n_prs).tolist(), "prs_mask": True} for _ in range(args.batch)]
    batches = {"lm": EhrPrsCollator(pad_token_id=0)(rows),
               "lm+tte": EhrPrsCollator(pad_token_id=0, token_days=days, tte_family_of_token=family)(rows)}
    if not args.n_prs:
        for b in batches.values():
            b.pop("prs", None), b.pop("prs_mask", None)
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}

    def step(name: str) -> float:
        t0 = time.perf_counter()
        loss = models[name](**batches[name]).loss
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    if args.skip_training:
        return risk_speed(args, models["lm+tte"], days, family, rng)
    for name in models:  # warm-up
        step(name)
    ratios, times = [], {k: [] for k in models}
    for _ in range(args.rounds):
        t = {k: step(k) for k in models}
        for k in models:
            times[k].append(t[k])
        ratios.append(t["lm+tte"] / t["lm"])
    print(f"training step: LM only {statistics.median(times['lm']):.3f} s, with TTE head "
          f"{statistics.median(times['lm+tte']):.3f} s; ratio {statistics.median(ratios):.3f} (goal <= 1.30)")

    risk_speed(args, models["lm+tte"], days, family, rng)


def risk_speed(args, model, days, family, rng) -> None:
    """Part 2: hazard risk vs the sampling engine on the same model and prompts."""
    from ehr_prs.risk.sampling import sample_risk
    from ehr_prs.risk.hazard import hazard_risk

    if args.model:
        model, prompts, target_ids, fam_idx, days, stops = real_prompts(args)
        args.n_prs = 0  # prompts without PRS: both methods alike
    else:
        model = model.eval()
        prompts = [[1] + rng.integers(4, model.config.vocab_size, size=args.prompt_length - 1).tolist()
                   for _ in range(args.rows)]
        target_ids, fam_idx, stops = [int(i) for i in np.nonzero(family == 0)[0]], [0], [2]
    rows = len(prompts)
    prs = torch.randn(rows, args.n_prs) if args.n_prs else None
    mask = torch.ones(rows, dtype=torch.bool) if args.n_prs else None
    t0 = time.perf_counter()
    hazard_risk(model, prompts, fam_idx, [730.0], prs, mask, progress=False)
    hazard_rate = rows / (time.perf_counter() - t0)
    n_sampled = max(4, rows // 8)  # the sampler is slow: time fewer rows
    t0 = time.perf_counter()
    sample_risk(model, prompts[:n_sampled], target_ids, torch.tensor(days), 730.0, "survival", args.samples,
                prs[:n_sampled] if prs is not None else None, mask[:n_sampled] if mask is not None else None,
                stops, 0, 256, 256, args.seed, progress=False)
    sample_rate = n_sampled / (time.perf_counter() - t0)
    print(f"risk ({'model ' + args.model if args.model else 'random model'}, {rows} rows): "
          f"hazard {hazard_rate:.1f} rows/s, survival sampling at K={args.samples} {sample_rate:.2f} rows/s; "
          f"ratio {hazard_rate / sample_rate:.0f}x (goal >= 100x)")


if __name__ == "__main__":
    main()
