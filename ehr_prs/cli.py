"""The `ehr-prs` command line: one console script, one subcommand per stage of docs/design.md.

    ehr-prs simulate --out runs/cohort --subjects 20000
    ehr-prs --help

Each subcommand lives in its own module, which exposes `add_arguments(parser)` and
`run(args)`, or `main(argv) -> int` when the module parses its own flags (the recipes
train.py and finetune.py, whose flags are dataclasses for HfArgumentParser). Modules are imported only when their subcommand runs, so `ehr-prs --help`
stays fast and a heavy import (torch) is paid only by the stages that need it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ehr_prs.errors import input_errors
from ehr_prs.sharded import close_process_group

# subcommand -> (module, one-line help). Add a line here when a stage lands.
COMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("ehr_prs.data.simulate", "simulated All-of-Us-like cohort (MEDS, PRS, labels, true risks)"),
    "tokenize": ("ehr_prs.tokenizer.cli", "MEDS (+ PRS) -> tokenizer and one token dataset per split"),
    "pretrain": ("ehr_prs.recipes.train", "pretrain the causal LM (+ genomic adapter) on tokenized data; same flags as train.py"),
    "risk": ("ehr_prs.risk.command", "zero-shot risk of target codes within a horizon, from sampled futures or the time-to-event head (--method hazard)"),
    "fit-logit-bias": ("ehr_prs.fits.logit_bias_command", "fit the PRS logit-bias adapter in closed form on a frozen model (one pass over the training split, no gradient steps)"),
    "incidence-refit": ("ehr_prs.fits.incidence", "refit an outcome's onset rate on the frozen model's history summary (for risk --incidence-refit)"),
    "hazard-refit": ("ehr_prs.fits.hazard_refit", "refit the time-to-event head's hazard of an outcome on the frozen model, without labels (for risk --method hazard --hazard-refit)"),
    "record-ceiling": ("ehr_prs.evaluation.record_ceiling", "simulated cohorts: a logistic regression told the true risk factors, to show how much of the true risk the record reveals"),
    "omop-to-meds": ("ehr_prs.data.omop", "OMOP CDM tables -> MEDS 0.4 dataset with train/tuning/held_out splits"),
    "baseline": ("ehr_prs.evaluation.baselines", "PRS-only logistic regression and count-feature GBMs (with/without PRS)"),
    "evaluate": ("ehr_prs.evaluation.metrics", "AUROC/AUPRC with paired bootstrap CIs, calibration, subgroups, PRS deciles"),
    "finetune": ("ehr_prs.recipes.finetune", "adapt a pretrained model to a binary MEDS task (LoRA, probe, full; --shots K); same flags as finetune.py"),
    "predict": ("ehr_prs.predict", "MEDS predictions of a fine-tuned classifier (base + LoRA adapter, or a probe/full folder)"),
    "fewshot": ("ehr_prs.evaluation.fewshot", "few-shot sweep: AUROC vs K for LoRA, probe and GBM+PRS over seeds, with CIs and a plot"),
    "push": ("ehr_prs.hub", "model card + Hub upload (remote code, tokenizer, PRS standardiser, adapter; --gated)"),
    "view": ("ehr_prs.views.patient", "one person's record, risk curve, genomic what-if and sampled futures as a self-contained HTML page"),
    "whatif": ("ehr_prs.views.whatif", "cohort genomic what-if: risk by PRS decile within ancestry with the genotype present and removed, AUROC/calibration change by ancestry"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ehr-prs",
        description="EHR foundation model with polygenic risk scores (arXiv 2510.23639).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # add_arguments is imported lazily only for the chosen command (see main).
        p.set_defaults(_module=module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # First pass: find the command, then let its module declare its own flags.
    if argv and argv[0] in COMMANDS:
        module = importlib.import_module(COMMANDS[argv[0]][0])
        if hasattr(module, "main") and not hasattr(module, "add_arguments"):
            return module.main(argv[1:])  # the recipes close their own process group
        sub_parser = argparse.ArgumentParser(prog=f"ehr-prs {argv[0]}", description=COMMANDS[argv[0]][1])
        module.add_arguments(sub_parser)
        args = sub_parser.parse_args(argv[1:])
        try:
            module.run(args)
        except input_errors() as err:  # a wrong input: one line and exit 2 (anything else keeps its traceback)
            print(f"ehr-prs {argv[0]}: error: {err}", file=sys.stderr)
            return 2
        close_process_group()  # under torchrun / accelerate launch (risk, predict): exit together
        return 0
    parser.parse_args(argv)  # prints help / the error for an unknown command
    return 2


if __name__ == "__main__":
    sys.exit(main())
