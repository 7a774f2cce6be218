"""Control variates against plain path averages at equal K: variance, effective K, time, AUROC.

Baseline (named "plain"): `sample_risk(..., control_variates=False)`, each row's risk the mean of
its K path values. Ours ("control variates"): the same call with the correction on (the default
of `ehr-prs risk`). Both use the same seed, so they sample the very same paths; the difference is
only the correction. Reported: the mean per-row variance of the K path values, the effective K
(K x plain variance / corrected variance: the plain K that would give the corrected precision),
the time of each, their product as effective paths per second, and the AUROC of each.

    python -m benchmarks.risk_variance --model demo_out/models/logit_bias --meds demo_out/cohort/meds \
        --prs demo_out/cohort/prs.parquet --labels demo_out/cohort/labels/t2d.parquet --subjects 1200 --samples 4
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.metrics import roc_auc_score

from benchmarks.risk_throughput import add_row_arguments, parse_and_load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_row_arguments(parser)
    parser.add_argument("--method", default="survival", choices=["survival", "path", "mc"])
    parser.add_argument("--subjects", type=int, default=1200, help="first held-out label rows (the correction "
                        "fits one coefficient per token on half of them: a few hundred rows at least)")
    parser.add_argument("--samples", type=int, default=4, help="K")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args, model, tok, rows = parse_and_load(parser, balanced=False)
    from ehr_prs.risk.sampling import sample_risk

    y = rows["y"]
    print(f"{len(y)} rows ({int(y.sum())} positive), {args.method}, K={args.samples}, model {args.model} "
          f"({model.config.prs_fusion}), {args.threads} threads")
    results = {}
    for name, on in (("plain", False), ("control variates", True)):
        t0 = time.perf_counter()
        r = sample_risk(model, rows["prompts"], rows["target"], rows["token_days"], args.horizon_days, args.method,
                        args.samples, rows["prs"], rows["prs_mask"], rows["stops"], tok.pad_token_id,
                        args.max_new_tokens, 256, seed=0, progress=False, control_variates=on)
        results[name] = (time.perf_counter() - t0, r.path_values.var(axis=1, ddof=1).mean(), r)
    (t_plain, v_plain, plain), (t_cv, v_cv, cv) = results["plain"], results["control variates"]
    for name, (t, v, r) in results.items():
        print(f"{name:17s}: {t:7.1f} s   per-row path variance {v:.2e}   AUROC {roc_auc_score(y, r.probability):.3f}"
              f"   mean risk {r.probability.mean():.4f}")
    if cv.variance_reduction == 0.0:
        print("the correction was not applied: too few paths to fit (raise --subjects or --samples)")
        return
    gain = v_plain / v_cv
    print(f"control variates / plain: variance {1 / gain:.2f}x (effective K {args.samples * gain:.1f} from "
          f"K={args.samples}), time {t_cv / t_plain:.2f}x, effective paths per second {gain * t_plain / t_cv:.2f}x")


if __name__ == "__main__":
    main()
