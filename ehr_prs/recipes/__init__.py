"""The two recipes, train.py (pretraining) and finetune.py (transfer): flat files at the top of the
repository (nanoGPT style), linked here so that `ehr-prs pretrain` / `ehr-prs finetune` import
exactly the code that `python train.py` / `accelerate launch train.py` run."""
