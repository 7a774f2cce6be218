"""ehr-prs's stages around the model, and the `ehr-prs` command line.

    ehr_prs.data         simulate (the All-of-Us-like cohort), omop (OMOP CDM -> MEDS), readers, predictions
    ehr_prs.tokenizer    MEDS (+ PRS) -> token datasets (the repository's tokenizer/ folder)
    ehr_prs.recipes      train (pretraining) and finetune (PEFT LoRA / probe): the repository's train.py, finetune.py
    ehr_prs.risk         zero-shot risk: sampled futures (KV-cached, shared prompts) and the hazard head
    ehr_prs.fits         fits on a frozen model from one at-risk pass: the PRS logit bias, the incidence refit
    ehr_prs.evaluation   metrics with bootstrap CIs, baselines, few-shot sweeps, the record ceiling
    ehr_prs.views        one person's page, the cohort genomic what-if
    ehr_prs.hub          model card and upload
    ehr_prs.cli          `ehr-prs COMMAND`

The model itself (config, model, tokenizer class: the files a hub folder carries) is the
`modeling_ehr_prs` package; imports flow one way, from these stages to it. Importing this package
imports nothing heavy, so `ehr-prs --help` answers at once.
"""
