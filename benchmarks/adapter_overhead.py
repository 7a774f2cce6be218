"""Training-step speed of the PRS adapter: EhrPrs (none / prefix / cross_attention) vs LlamaForCausalLM.

Baseline: `transformers.LlamaForCausalLM` with identical dimensions (hidden, layers, heads, MLP,
vocabulary, tied embeddings, SDPA attention), measured in the same process. Each round times
`--steps` full training steps (forward + backward + AdamW step) of every model in turn, so load
from other processes on a shared machine hits all models alike; the report is the median tokens/s
over rounds and the median over rounds of each round's ratio to Llama's rate. Tokens counted are
event tokens (batch x seq): the PRS prefix is part of the measured cost, not of the throughput.
On a crowded machine, --threads 1 gives steadier ratios (no OpenMP team waiting on a busy core).

    python -m benchmarks.adapter_overhead                   # small preset, batch 4 x 512, ~2-3 min on 2 cores
    python -m benchmarks.adapter_overhead --batch 8 --rounds 4  # small's tokens/s at batch 8 x 512

(Run benchmarks as modules from the repository root: `python benchmarks/tokenize.py` would put
benchmarks/ first on sys.path, where tokenize.py shadows the standard library module.)

Goal: prefix >= 0.95, cross_attention >= 0.90 of Llama's tokens/s.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_ehr_prs import EhrPrsConfig, EhrPrsForCausalLM


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", help="EhrPrsConfig preset giving the dimensions (default small)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--n-prs", type=int, default=3481, help="PRS per subject (paper: 3481)")
    parser.add_argument("--rounds", type=int, default=12, help="alternation rounds; medians are reported")
    parser.add_argument("--steps", type=int, default=1, help="timed training steps per model per round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return parser.parse_args()


def build_models(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    """Llama and the three EhrPrs fusions with the same decoder dimensions."""
    ehr = {fusion: EhrPrsConfig.from_preset(args.preset, n_prs=args.n_prs, prs_fusion=fusion)
           for fusion in ("none", "prefix", "cross_attention")}
    c = ehr["none"]
    llama = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_parameters=dict(c.rope_parameters), tie_word_embeddings=True,
        pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, use_cache=False,
    )
    models = {"llama": LlamaForCausalLM._from_config(llama, attn_implementation="sdpa")}
    for fusion, config in ehr.items():
        models[fusion] = EhrPrsForCausalLM(config)
    return models


def train_step(model, optimizer, inputs: dict) -> None:
    loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    models = build_models(args)
    vocab = models["none"].config.vocab_size
    ids = torch.randint(3, vocab, (args.batch, args.seq))
    prs = torch.randn(args.batch, args.n_prs)
    prs_mask = torch.rand(args.batch) < 0.7  # a mixed batch: some subjects without genotype
    inputs = {"llama": {"input_ids": ids, "labels": ids}}
    for fusion in ("none", "prefix", "cross_attention"):
        inputs[fusion] = {"input_ids": ids, "labels": ids, "prs": prs, "prs_mask": prs_mask, "use_cache": False}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}

    print(f"preset={args.preset} batch={args.batch} seq={args.seq} n_prs={args.n_prs} "
          f"threads={torch.get_num_threads()}")
    for name, model in models.items():
        total = sum(p.numel() for p in model.parameters())
        emb = model.get_input_embeddings().weight.numel()
        print(f"  {name:16s} params={total:,} non-embedding={total - emb:,}")
        model.train()
        train_step(model, optimizers[name], inputs[name])  # warm-up (allocator, AdamW state)

    tokens = args.batch * args.seq * args.steps
    rates: dict[str, list[float]] = {name: [] for name in models}
    for r in range(args.rounds):
        order = list(models) if r % 2 == 0 else list(reversed(models))  # no model always runs first
        for name in order:
            start = time.perf_counter()
            for _ in range(args.steps):
                train_step(models[name], optimizers[name], inputs[name])
            rates[name].append(tokens / (time.perf_counter() - start))
        print(f"round {r + 1}/{args.rounds}: " + "  ".join(f"{n}={rates[n][-1]:,.0f}" for n in models))

    # Paired ratios: each round's rate over Llama's rate in the same round, so slow drifts of the
    # machine's load cancel; the median over rounds is the reported ratio.
    print("\nmedian training tokens/s (forward + backward + AdamW step) and median paired ratio to LlamaForCausalLM:")
    for name in models:
        ratios = [mine / base for mine, base in zip(rates[name], rates["llama"])]
        vs_none = statistics.median(mine / base for mine, base in zip(rates[name], rates["none"]))
        print(f"  {name:16s} {statistics.median(rates[name]):10,.0f} tok/s  ratio {statistics.median(ratios):.3f}"
              f"  (rounds: {min(ratios):.2f}-{max(ratios):.2f})  vs none {vs_none:.3f}")

if __name__ == "__main__":
    main()
