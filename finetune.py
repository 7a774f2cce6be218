"""Fine-tune a pretrained EHR(+PRS) model on a new binary MEDS task (LoRA, linear probe or full).

    python finetune.py --model runs/ehr_prefix --meds runs/cohort/meds --prs runs/cohort/prs.parquet \
        --labels runs/cohort/labels/stroke.parquet --output-dir runs/ft/stroke_lora --method lora
    ehr-prs finetune --model runs/ehr_prefix ... --method probe --shots 32 --seed 1     (same flags)
    ehr-prs predict --model runs/ehr_prefix --adapter runs/ft/stroke_lora --meds ... --labels ... --out pred.parquet

The recipe, top to bottom: inputs cut at each label's prediction_time (train-split labels to
train on, tuning-split labels to choose the epoch; `tokenizer.inputs_at_prediction_times`, the
shared no-leakage function) -> `EhrPrsForSequenceClassification` from the pretrained causal LM
(backbone weights loaded, only the one-logit `score` head is new) -> the method:

- `lora`:  PEFT LoRA (task SEQ_CLS) on q/k/v/o_proj and gate/up/down_proj; `score` trains in
           full (modules_to_save), and with --train-prs-adapter the genomic adapter too
           (prs_adapter, and prs_cross_attn in cross-attention models).
- `probe`: frozen backbone, only `score` trains: the pooled last-token states are computed once
           and an L2 logistic regression (C chosen on tuning AUROC, EHRSHOT's linear probe) is
           written into `score`.
- `full`:  every parameter trains.

lora and full: Trainer with a class-weighted BCE loss, evaluated every epoch on the tuning split;
the epoch with the best tuning AUROC (scikit-learn) is kept, from an in-memory copy (the tuning
loss decides when the tuning labels have one class). Class imbalance: positives get pos_weight =
negatives / positives of the training rows (1 for a balanced K-shot sample; the probe uses
class_weight="balanced", the same weighting), so both classes weigh the same. Balanced training
sets the prior odds to 1, so at the end the head's bias gets + logit(train-split prevalence): the
saved model outputs probabilities on the population's scale (AUROC unchanged).

--shots K follows EHRSHOT: K positive and K negative label rows drawn from the train split
(seeded), and at most K + K from the tuning split for model selection.

Output (--output-dir), no pickles:
- lora:        adapter_config.json + adapter_model.safetensors (PEFT's layout) + finetune_summary.json
               (method, shots, seed, best epoch, tuning AUROC, trainable parameters, and the base
               model's fingerprint that `ehr-prs predict` checks).
- probe/full:  a complete classifier folder (config, model.safetensors, tokenizer, PRS
               standardiser, finetune_summary.json) that `ehr-prs predict --model DIR` loads.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from ehr_prs.errors import InputError, input_errors, atomic_output_dir, check_output
from ehr_prs.sharded import close_process_group
from ehr_prs.predict import (
    STANDARDIZER_FILE,
    SUMMARY_FILE,
    ClassifierCollator,
    base_fingerprint,
    classifier_max_length,
    load_base_classifier,
    model_n_prs,
    predict_proba,
    score_head,
    task_inputs,
)
from ehr_prs.data.readers import STRICT_LABELS_HELP
from ehr_prs.recipes.flags import parse_flags

# torch, transformers and peft are imported inside the functions that use them: the flags (`ehr-prs
# finetune --help`, `python finetune.py --help`) do not pay ~6 s of imports.
if TYPE_CHECKING:
    from transformers import TrainerCallback

METHODS = ("lora", "probe", "full")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_LR = {"lora": 1e-3, "full": 1e-4}
PROBE_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # inverse L2 strengths tried by the probe
KEY = ["subject_id", "prediction_time"]


@dataclass
class FinetuneArguments:
    """Flags of `python finetune.py` and `ehr-prs finetune` (identical)."""

    model: str = field(metadata={"help": "Pretrained model folder written by `ehr-prs pretrain`."})
    meds: str = field(metadata={"help": "MEDS dataset root holding the labelled subjects' histories."})
    labels: str = field(metadata={"help": "MEDS labels (subject_id, prediction_time, boolean_value), all splits."})
    output_dir: str = field(metadata={"help": "Where the adapter (lora) or classifier (probe/full) is written."})
    overwrite: bool = field(
        default=False, metadata={"help": "Replace an existing --output-dir (never one that is, holds or lies inside "
                                         "an input: --model, --meds, --prs, --labels)."}
    )
    prs: str | None = field(
        default=None, metadata={"help": "PRS table (parquet/CSV); without it every subject counts as not genotyped."}
    )
    method: str = field(default="lora", metadata={"help": "lora (PEFT LoRA), probe (head only) or full (everything)."})
    shots: int | None = field(
        default=None, metadata={"help": "Few-shot: K positive + K negative train label rows (default: all rows)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for the K-shot draw, head/LoRA init and data order."})
    epochs: int = field(default=5, metadata={"help": "Training epochs (raised to reach --min-steps on tiny sets)."})
    min_steps: int = field(
        default=50, metadata={"help": "At least this many optimizer steps: K-shot sets are a few batches an epoch."}
    )
    learning_rate: float | None = field(
        default=None, metadata={"help": f"AdamW learning rate (default per method: {DEFAULT_LR})."}
    )
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Fraction of steps with linear warm-up."})
    batch_size: int = field(default=16, metadata={"help": "Label rows per optimizer step."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha (update scale alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    train_prs_adapter: bool = field(
        default=False, metadata={"help": "lora: also train the genomic adapter (prs_adapter, prs_cross_attn) in full."}
    )
    class_weight: str = field(
        default="balanced", metadata={"help": "balanced (pos_weight = negatives / positives) or none."}
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "Cap on event tokens per input (most recent kept); default: the tokenizer's max length."},
    )
    max_tuning_rows: int | None = field(
        default=2000, metadata={"help": "Cap on tuning label rows scored per epoch (a seeded stratified subset)."}
    )
    report_to: str = field(default="none", metadata={"help": "Trainer loggers: none, tensorboard, wandb, ..."})
    strict_labels: bool = field(default=False, metadata={"help": STRICT_LABELS_HELP.capitalize() + "."})


# ----------------------------------------------------------------------------- data


@dataclass
class TaskData:
    """Tokenizer, PRS standardiser and one input dataset per split (rows sorted by subject, time)."""

    tokenizer: object
    standardizer: object
    max_length: int
    splits: dict  # split name -> datasets.Dataset (columns of inputs_at_prediction_times)
    features: dict = field(default_factory=dict)  # (base weights hash, split) -> frozen pooled states (probe)
    label_counts: dict = field(default_factory=dict)  # LabelSelection.counts(): rows used and dropped

    def y(self, split: str) -> np.ndarray:
        return np.asarray(self.splits[split]["boolean_value"], dtype=bool)


def load_task_data(model_dir: str, meds_dir: str, labels_path: str, prs_path: str | None,
                   splits: tuple[str, ...] = ("train", "tuning"), max_length: int | None = None,
                   strict_labels: bool = False) -> TaskData:
    """Build the inputs of every scorable label row in `splits` (the shared label policy), cut at its prediction_time."""
    from ehr_prs.data.readers import read_labels, read_meds_dataset, read_prs_table, select_label_rows
    from ehr_prs.tokenizer.prediction_inputs import warn_if_prs_not_given

    model, tokenizer, standardizer = load_base_classifier(model_dir)
    length = classifier_max_length(model.config, max_length, tokenizer)
    meds = read_meds_dataset(meds_dir)
    labels = read_labels(labels_path).sort(KEY)  # a fixed row order: the K-shot draw depends on it
    # The shared label policy: unscorable rows dropped with one warning (or refused with --strict-labels).
    selection = select_label_rows(meds, labels, list(splits), labels_path, strict_labels)
    print(selection.summary())
    prs = read_prs_table(prs_path) if prs_path else None
    warn_if_prs_not_given(model_n_prs(model), prs, model_dir)
    out = {}
    for split in splits:
        rows = selection.rows.filter(pl.col("split") == split)
        if rows.height:
            out[split] = task_inputs(meds, rows, tokenizer, standardizer, prs, split, length)
    if "train" in splits and "train" not in out:
        raise InputError(f"{labels_path}: no label rows for subjects in the train split of {meds_dir}")
    return TaskData(tokenizer, standardizer, length, out, label_counts=selection.counts())


def sample_shots(y: np.ndarray, k: int, seed: int, where: str = "train split", strict: bool = True) -> np.ndarray:
    """Sorted row indices of K positives and K negatives drawn without replacement (EHRSHOT protocol).

    strict: InputError when a class has fewer than K rows; otherwise take what there is (tuning).
    """
    y = np.asarray(y, dtype=bool)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    if k < 1:
        raise InputError(f"--shots must be >= 1, got {k}")
    if strict and (pos.size < k or neg.size < k):
        raise InputError(f"--shots {k}: the {where} has only {pos.size} positive and {neg.size} negative label rows; "
                         f"choose --shots <= {min(pos.size, neg.size)}")
    rng = np.random.default_rng(seed)
    picked = [rng.choice(pos, min(k, pos.size), replace=False), rng.choice(neg, min(k, neg.size), replace=False)]
    return np.sort(np.concatenate(picked))


def check_two_classes(y: np.ndarray, labels_path: str, split: str) -> None:
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise InputError(f"{labels_path}: the {split} split has {n_pos} positive and {y.size - n_pos} negative label "
                         "rows; fine-tuning a binary task needs both classes")


# ----------------------------------------------------------------------------- model


def build_classifier(args: FinetuneArguments):
    """(model ready for Trainer with only --method's parameters trainable, fingerprint of its base)."""
    import torch

    torch.manual_seed(args.seed)  # the new head's init
    model, _, _ = load_base_classifier(args.model)
    fingerprint = base_fingerprint(model)
    if args.method == "full":
        for p in model.parameters():
            p.requires_grad = True
        return model, fingerprint
    if args.method == "probe":
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("score.")
        return model, fingerprint
    from peft import LoraConfig, TaskType, get_peft_model

    to_save = ["score"]
    if args.train_prs_adapter:
        if not model.config.has_prs_adapter:  # (a logit_bias model was refused when loaded)
            raise InputError(f"--train-prs-adapter: {args.model} is an EHR-only model (prs_fusion none), "
                             "it has no genomic adapter")
        to_save.append("prs_adapter")
        if model.config.has_cross_attention:
            to_save.append("prs_cross_attn")
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=args.lora_r, lora_alpha=args.lora_alpha,
                        lora_dropout=args.lora_dropout, target_modules=list(LORA_TARGETS), modules_to_save=to_save)
    return get_peft_model(model, config), fingerprint


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; PEFT's frozen originals of modules_to_save count in total."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- training


class WeightedBCE:
    """Trainer's compute_loss_func: BCE-with-logits with positives weighted by `pos_weight`."""

    def __init__(self, pos_weight: float):
        import torch

        self.pos_weight = torch.tensor(pos_weight)

    def __call__(self, outputs, labels, num_items_in_batch=None):
        import torch.nn.functional as F

        logits = outputs.logits[:, 0].float()  # (b,)
        loss = F.binary_cross_entropy_with_logits(logits, labels.float(), pos_weight=self.pos_weight.to(logits.device),
                                                  reduction="sum")
        # Trainer counts every row of the accumulated batch; without it, a per-batch mean.
        return loss / (num_items_in_batch if num_items_in_batch is not None else logits.numel())


def tuning_metrics(eval_pred) -> dict:
    """AUROC of the tuning logits (NaN when the tuning labels have one class)."""
    from sklearn.metrics import roc_auc_score

    logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    y = np.asarray(eval_pred.label_ids).reshape(-1)
    two = 0 < y.sum() < y.size
    return {"auroc": float(roc_auc_score(y, np.asarray(logits).reshape(-1))) if two else math.nan}


def keep_best(by_auroc: bool) -> TrainerCallback:
    """A Trainer callback that keeps the best epoch's trainable weights (by tuning AUROC, else loss).

    Defined where transformers is imported, so that importing this recipe (for its flags: `ehr-prs
    finetune --help`) does not pay for it.
    """
    import torch
    from transformers import TrainerCallback

    class KeepBest(TrainerCallback):
        """Holds a copy of the trainable weights of the best epoch in memory (no checkpoint files)."""

        def __init__(self, by_auroc: bool):
            self.by_auroc = by_auroc
            self.best, self.best_epoch, self.best_metrics, self.state = -math.inf, None, {}, None

        def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
            value = metrics["eval_auroc"] if self.by_auroc else -metrics["eval_loss"]
            if value > self.best:
                self.best, self.best_epoch, self.best_metrics = value, round(state.epoch or 0), dict(metrics)
                self.state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

        def restore(self, model) -> None:
            if self.state is not None:
                params = dict(model.named_parameters())
                with torch.no_grad():
                    for n, value in self.state.items():
                        params[n].copy_(value)

    return KeepBest(by_auroc)


def stratified_cap(y: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    """Row indices: all rows, or a seeded subset of `cap` with the class mix kept."""
    if not cap or y.size <= cap:
        return np.arange(y.size)
    rng = np.random.default_rng(seed)
    idx = []
    for cls in (True, False):
        rows = np.flatnonzero(y == cls)
        idx.append(rng.choice(rows, max(1, round(cap * rows.size / y.size)), replace=False))
    return np.sort(np.concatenate(idx))


@dataclass
class FinetuneResult:
    model: object  # the fine-tuned model in eval mode (PeftModel for lora)
    summary: dict
    output_dir: Path | None


def finetune(args: FinetuneArguments, data: TaskData | None = None, save: bool = True,
             quiet: bool = False) -> FinetuneResult:
    """Run the recipe; `data` lets a caller (few-shot sweeps) build the inputs once for many runs.

    save=False skips writing --output-dir (the model is returned); quiet drops per-epoch log lines.
    """
    import torch

    if save:  # before the inputs are built and the model trained: a wrong --output-dir fails at once
        check_output(args.output_dir, _input_flags(args), args.overwrite, flag="--output-dir")
    if args.method not in METHODS:
        raise InputError(f"--method {args.method!r}: choose one of {', '.join(METHODS)}")
    if args.class_weight not in ("balanced", "none"):
        raise InputError(f"--class-weight {args.class_weight!r}: choose balanced or none")
    data = data or load_task_data(args.model, args.meds, args.labels, args.prs, max_length=args.max_length,
                                  strict_labels=args.strict_labels)
    y_all = data.y("train")
    check_two_classes(y_all, args.labels, "train")
    train_idx = sample_shots(y_all, args.shots, args.seed) if args.shots else np.arange(y_all.size)
    y_train = y_all[train_idx]
    tu_idx = None
    if "tuning" in data.splits:
        y_tu = data.y("tuning")
        tu_idx = sample_shots(y_tu, args.shots, args.seed, "tuning split", strict=False) if args.shots \
            else stratified_cap(y_tu, args.max_tuning_rows, args.seed)
    y_tuning = data.y("tuning")[tu_idx] if tu_idx is not None else np.zeros(0, bool)
    by_auroc = 0 < y_tuning.sum() < y_tuning.size
    if tu_idx is not None and not by_auroc:
        print(f"note: tuning labels have one class ({int(y_tuning.sum())} positive of {y_tuning.size}); "
              "model selection falls back to the tuning loss (probe: C = 1)", file=sys.stderr)

    model, fingerprint = build_classifier(args)
    n_pos, n_neg = int(y_train.sum()), int((~y_train).sum())
    pos_weight = n_neg / n_pos if args.class_weight == "balanced" else 1.0
    t0 = time.perf_counter()
    if args.method == "probe":
        selection = fit_probe(model, data, fingerprint, train_idx, tu_idx, args.class_weight == "balanced")
    else:
        selection = train_with_trainer(model, data, args, train_idx, tu_idx, by_auroc, pos_weight, quiet)
    elapsed = time.perf_counter() - t0
    model.eval()

    # Balanced training set the prior odds to 1; put the population's prior back into the bias.
    prevalence = float(y_all.mean())
    offset = math.log(prevalence / (1 - prevalence)) - math.log(pos_weight * n_pos / n_neg)
    with torch.no_grad():
        score_head(model).bias += offset
    trainable, total = count_parameters(model)
    summary = {
        "method": args.method,
        "shots": args.shots,
        "seed": args.seed,
        **selection,
        "train_rows": int(train_idx.size), "train_positives": n_pos,
        "tuning_rows": int(y_tuning.size), "tuning_positives": int(y_tuning.sum()),
        "pos_weight": pos_weight,
        "logit_offset": offset,
        "train_prevalence": prevalence,
        "label_rows": data.label_counts,
        "trainable_parameters": trainable,
        "parameters": total,
        "train_seconds": round(elapsed, 1),
        "base_model": str(args.model),
        "base_fingerprint": fingerprint,
        "args": asdict(args),
    }
    out_dir = write_output(model, data, args, summary) if save else None
    return FinetuneResult(model, summary, out_dir)


def train_with_trainer(model, data: TaskData, args: FinetuneArguments, train_idx: np.ndarray,
                       tu_idx: np.ndarray | None, by_auroc: bool, pos_weight: float, quiet: bool) -> dict:
    """lora / full: Trainer with the weighted BCE, one tuning evaluation per epoch, best epoch restored."""
    import torch
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    keep = ["input_ids", "prs", "prs_mask", "boolean_value", "length"]

    def subset(split, idx):
        ds = data.splits[split].select(idx)
        return ds.remove_columns([c for c in ds.column_names if c not in keep])

    train_ds = subset("train", train_idx)
    tuning_ds = subset("tuning", tu_idx) if tu_idx is not None else None
    steps_per_epoch = math.ceil(len(train_ds) / args.batch_size)
    epochs = max(args.epochs, math.ceil(args.min_steps / steps_per_epoch))
    keeper = keep_best(by_auroc)
    n_prs = model.config.n_prs if model.config.reads_prs else 0
    with tempfile.TemporaryDirectory(prefix="ehr-prs-finetune-") as scratch:
        training_args = TrainingArguments(
            output_dir=scratch,  # nothing is saved there (save_strategy no); the best epoch stays in memory
            num_train_epochs=epochs,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=max(args.batch_size, 32),
            learning_rate=args.learning_rate or DEFAULT_LR[args.method],
            lr_scheduler_type="linear",
            warmup_steps=int(args.warmup_ratio * epochs * steps_per_epoch),
            weight_decay=args.weight_decay,
            max_grad_norm=1.0,
            eval_strategy="epoch" if tuning_ds is not None else "no",
            save_strategy="no",
            logging_strategy="epoch",
            seed=args.seed,
            data_seed=args.seed,
            remove_unused_columns=False,  # the collator picks input_ids/prs/prs_mask/boolean_value
            label_names=["labels"],
            report_to=args.report_to,
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=quiet,
        )
        trainer = Trainer(
            model=model,
            args=training_args,
            data_collator=ClassifierCollator(data.tokenizer.pad_token_id, n_prs, data.max_length),
            train_dataset=train_ds,
            eval_dataset=tuning_ds,
            compute_loss_func=WeightedBCE(pos_weight),
            compute_metrics=tuning_metrics,
            callbacks=[keeper],
        )
        if quiet:
            trainer.remove_callback(PrinterCallback)
        trainer.train()
    keeper.restore(model)
    return {
        "epochs_run": epochs,
        "best_epoch": keeper.best_epoch,
        "selected_by": "tuning AUROC" if by_auroc else ("tuning loss" if tuning_ds is not None else "last epoch"),
        "tuning_auroc": keeper.best_metrics.get("eval_auroc"),
        "tuning_loss": keeper.best_metrics.get("eval_loss"),
    }


def frozen_features(model, data: TaskData, split: str, fingerprint: dict, rows: np.ndarray | None = None) -> np.ndarray:
    """What `score` reads (pooled last-token states, (len(rows), d)) for `rows` of `split` (None = all)
    under the frozen base. Each row is computed once per base and kept in `data`, so a few-shot sweep
    pays for every row at most once, and a single K-shot run only for its 2K rows."""
    n = len(data.splits[split])
    rows = np.arange(n) if rows is None else np.asarray(rows)
    key = (fingerprint["weights_sha256"], split)
    if key not in data.features:
        data.features[key] = (np.zeros((n, model.config.hidden_size), np.float32), np.zeros(n, bool))
    feats, done = data.features[key]
    todo = np.unique(rows[~done[rows]])
    if todo.size:
        _, feats[todo] = predict_proba(model, data.splits[split].select(todo), data.tokenizer.pad_token_id,
                                       max_length=data.max_length, desc=f"probe: {split} features",
                                       return_features=True)
        done[todo] = True
    return feats[rows]


def fit_probe(model, data: TaskData, fingerprint: dict, train_idx: np.ndarray, tu_idx: np.ndarray | None,
              balanced: bool) -> dict:
    """probe: L2 logistic regression on the frozen base's pooled states, written into `score`.

    The backbone is frozen, so its features are computed once (no epochs over the backbone);
    C is chosen on the tuning rows' AUROC (C = 1 when those have one class), as EHRSHOT does.
    """
    import torch

    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    X_tr, y_tr = frozen_features(model, data, "train", fingerprint, train_idx), data.y("train")[train_idx]
    X_tu = y_tu = None
    if tu_idx is not None:
        X_tu, y_tu = frozen_features(model, data, "tuning", fingerprint, tu_idx), data.y("tuning")[tu_idx]
    by_auroc = y_tu is not None and 0 < y_tu.sum() < y_tu.size
    # Standardised features: lbfgs converges in a few dozen iterations instead of thousands, and C
    # means the same for every feature. The scaling is folded back into `score` below.
    mean, std = X_tr.mean(axis=0), X_tr.std(axis=0) + 1e-6  # (d,)
    Z_tr = (X_tr - mean) / std
    best = None
    for C in (PROBE_CS if by_auroc else (1.0,)):
        lr = LogisticRegression(C=C, class_weight="balanced" if balanced else None, max_iter=2000)
        lr.fit(Z_tr, y_tr)
        auroc = float(roc_auc_score(y_tu, lr.decision_function((X_tu - mean) / std))) if by_auroc else None
        if best is None or (auroc is not None and auroc > best[0]):  # ties keep the smaller C
            best = (auroc, C, lr)
    auroc, C, lr = best
    coef = lr.coef_[0] / std  # (d,): w.(x - mean)/std + b == (w/std).x + (b - (w/std).mean)
    bias = float(lr.intercept_[0] - coef @ mean)
    head = score_head(model)
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(coef[None], dtype=head.weight.dtype))  # (1, d)
        head.bias.fill_(bias)  # (1,)
    return {"best_C": C, "selected_by": "tuning AUROC" if by_auroc else "default C=1", "tuning_auroc": auroc}


def _input_flags(args: FinetuneArguments) -> dict[str, str | None]:
    """The paths the recipe reads, by flag: --output-dir may not be, hold or lie inside any of them."""
    return {"--model": args.model, "--meds": args.meds, "--prs": args.prs, "--labels": args.labels}


def write_output(model, data: TaskData, args: FinetuneArguments, summary: dict) -> Path:
    """PEFT adapter folder (lora) or a complete classifier folder (probe/full), plus the summary."""
    out = Path(args.output_dir)
    with atomic_output_dir(out, args.overwrite, flag="--output-dir") as tmp:
        model.save_pretrained(str(tmp))  # safetensors; PEFT writes adapter_config.json + adapter_model.safetensors
        if args.method != "lora":
            data.tokenizer.save_pretrained(str(tmp))
            std = Path(args.model) / STANDARDIZER_FILE
            if std.exists():
                shutil.copy(std, tmp / STANDARDIZER_FILE)
        for pickle in tmp.glob("*.bin"):  # never ship a pickle (training_args.bin and the like)
            pickle.unlink()
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return out


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> FinetuneArguments:
    """The flags (or one YAML file of them), parsed as HfArgumentParser does, without importing transformers."""
    return parse_flags(FinetuneArguments, argv, prog="finetune.py", description=__doc__.split("\n")[0])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = finetune(args)
    except input_errors() as err:
        print(f"finetune.py: error: {err}", file=sys.stderr)
        return 2
    s = result.summary
    tuning = f"{s['tuning_auroc']:.4f}" if s["tuning_auroc"] is not None else "n/a"
    chosen = f"C={s['best_C']:g}" if "best_C" in s else f"best epoch {s['best_epoch']} of {s['epochs_run']}"
    print(f"wrote {result.output_dir}: {args.method}, {s['train_rows']} train rows ({s['train_positives']} positive), "
          f"{chosen} ({s['selected_by']}), tuning AUROC {tuning}, "
          f"{s['trainable_parameters']:,} trainable of {s['parameters']:,} parameters, {s['train_seconds']} s")
    close_process_group()  # under accelerate launch / torchrun: every rank exits together, cleanly
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
