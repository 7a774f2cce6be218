"""Which sequences the demo's pretraining reads: a hash of the first 21 batches of epochs 0 and 1.

    python scripts/experiments/epoch_order.py DEMO_OUT/tok SCRATCH_DIR

The demo's run (1,000 steps of 16 sequences over 12,106) crosses one epoch boundary at step 757; run
this under two venvs (e.g. transformers 5.24 / accelerate 1.15 and 5.25 / 1.16) to see whether the
Trainer's dataloader deals the same batches (docs/experiments/2026-12-06-demo-rerun.md).
"""

import hashlib
import sys

import accelerate
import transformers

import ehr_prs.recipes.train as recipe

tok, scratch = sys.argv[1], sys.argv[2]
args = recipe.parse_args(["--data", tok, "--output-dir", scratch, "--overwrite", "--preset", "small", "--prs-fusion",
                          "none", "--max-steps", "1000", "--batch-size", "16", "--max-seq-length", "512",
                          "--learning-rate", "2e-3", "--warmup-steps", "50", "--eval-steps", "1000",
                          "--save-steps", "1000", "--max-eval-samples", "512"])
loader = recipe.prepare(args).trainer.get_train_dataloader()
print(f"transformers {transformers.__version__}, accelerate {accelerate.__version__}: {len(loader)} batches per epoch")
for epoch in (0, 1):
    loader.set_epoch(epoch)
    digest = hashlib.sha256()
    for i, batch in enumerate(loader):
        digest.update(batch["input_ids"].numpy().tobytes())
        if i == 20:
            break
    print(f"epoch {epoch}: first 21 batches sha256 {digest.hexdigest()[:16]}")
