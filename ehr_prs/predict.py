"""Predictions of a fine-tuned classifier for a MEDS task: `ehr-prs predict`.

    ehr-prs predict --model runs/ehr_prefix --adapter runs/ft/stroke_lora --meds runs/cohort/meds \
        --prs runs/cohort/prs.parquet --labels runs/cohort/labels/stroke.parquet --out runs/pred/stroke_lora.parquet
    ehr-prs predict --model runs/ft/stroke_probe --meds ... --labels ... --out runs/pred/stroke_probe.parquet

What `finetune.py` writes and what this command expects:
- `--method lora`: a PEFT adapter folder (adapter_config.json, adapter_model.safetensors,
  finetune_summary.json). Pass the pretrained causal-LM folder as `--model` and the adapter as
  `--adapter`; the adapter is applied with `PeftModel.from_pretrained` over
  `EhrPrsForSequenceClassification` built from that base. The base must be the one the adapter
  was trained on: the fingerprint in finetune_summary.json (shape fields and a hash of two
  weight tensors) is checked, and a mismatch is an InputError.
- `--method probe` / `full`: a complete classifier folder (config, model.safetensors, tokenizer,
  PRS standardiser, finetune_summary.json). Pass it as `--model`, without `--adapter`.

Inputs are cut at each label's prediction_time by `tokenizer.inputs_at_prediction_times` (the
project's single no-leakage function); the output is the MEDS prediction schema that
`ehr-prs evaluate` reads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from ehr_prs import sharded
from ehr_prs.errors import InputError, check_output
from ehr_prs.data.readers import STRICT_LABELS_HELP

# torch (and the collator, the model) are imported inside the functions that use them: `ehr-prs
# predict --help`, and finetune.py's flags, need none of them.
if TYPE_CHECKING:
    import torch

SUMMARY_FILE = "finetune_summary.json"
STANDARDIZER_FILE = "prs_standardizer.json"
# Config fields that fix the shape of every weight an adapter touches.
SHAPE_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "n_prs", "prs_fusion", "prs_tokens")


# ----------------------------------------------------------------------------- loading


def base_fingerprint(model) -> dict:
    """Shape fields of the config plus a SHA-256 of two backbone tensors (embeddings, last MLP).

    Taken from the classifier *before* PEFT wraps it. Two checkpoints of the same shape but other
    weights (another run, a random twin) differ in the hash, so an adapter is never silently
    applied to a base it was not trained on.
    """
    import torch

    backbone = model.model
    digest = hashlib.sha256()
    for tensor in (backbone.embed_tokens.weight, backbone.layers[-1].mlp.down_proj.weight):
        digest.update(tensor.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    fields = {k: getattr(model.config, k, None) for k in SHAPE_FIELDS}
    return {**fields, "weights_sha256": digest.hexdigest()}


def _is_classifier_folder(model_dir: Path) -> bool:
    config = json.loads((model_dir / "config.json").read_text())
    return "EhrPrsForSequenceClassification" in (config.get("architectures") or [])


def load_base_classifier(model_dir: str | Path):
    """(EhrPrsForSequenceClassification with one logit, tokenizer, PRS standardiser or None).

    From a pretrained causal-LM folder only `score.*` is new (randomly initialised; seed torch
    first for a reproducible head); any other missing backbone weight is an InputError. A
    classifier folder written by finetune --method probe/full loads as it is.
    """
    from transformers.utils import logging as hf_logging

    import modeling_ehr_prs  # noqa: F401  (Auto registration)
    from ehr_prs.checkpoints import load_checked
    from modeling_ehr_prs.modeling_ehr_prs import EhrPrsForSequenceClassification
    from ehr_prs.tokenizer import EhrTokenizer, PrsStandardizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise InputError(f"--model {model_dir}: no config.json; expected a folder written by `ehr-prs pretrain` "
                         "(or by `ehr-prs finetune --method probe|full`)")
    fusion = json.loads((model_dir / "config.json").read_text()).get("prs_fusion")
    if fusion == "logit_bias":
        raise InputError(f"--model {model_dir} has prs_fusion logit_bias, which acts on next-token logits only: a "
                         "classifier on it would never read the scores. Fine-tune its base (the EHR-only model it "
                         "was fitted on) or a prefix / cross_attention model; use it with `ehr-prs risk`")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the expected "score.* newly initialised" report is noise here
    try:
        # load_checked names a missing/truncated/corrupt model.safetensors and refuses NaN/inf weights.
        model, info = load_checked(EhrPrsForSequenceClassification.from_pretrained, model_dir, "--model",
                                   num_labels=1, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(k for k in info["missing_keys"] if not k.startswith("score."))
    if missing or info.get("mismatched_keys"):
        raise InputError(f"--model {model_dir}: not an ehr-prs checkpoint of this shape (missing {missing[:5]}, "
                         f"mismatched {list(info.get('mismatched_keys') or [])[:5]})")
    if model.config.num_labels != 1:
        raise InputError(f"--model {model_dir}: a classifier with {model.config.num_labels} labels; "
                         "binary MEDS tasks need one logit")
    tokenizer = EhrTokenizer.from_pretrained(str(model_dir))
    standardizer = PrsStandardizer.load(str(model_dir)) if (model_dir / STANDARDIZER_FILE).exists() else None
    return model, tokenizer, standardizer


def check_adapter_base(adapter_dir: Path, model_dir: Path, fingerprint: dict) -> dict:
    """The adapter's finetune_summary.json; InputError when its recorded base is not `fingerprint`."""
    if not (adapter_dir / "adapter_config.json").exists():
        raise InputError(f"--adapter {adapter_dir}: no adapter_config.json; expected a folder written by "
                         "`ehr-prs finetune --method lora` (for probe/full pass that folder as --model)")
    summary_path = adapter_dir / SUMMARY_FILE
    if not summary_path.exists():
        return {}  # a foreign PEFT adapter: PeftModel.from_pretrained still checks every weight shape
    summary = json.loads(summary_path.read_text())
    want = summary.get("base_fingerprint", {})
    diffs = [f"{k}: adapter's base {want[k]!r}, --model {fingerprint.get(k)!r}"
             for k in SHAPE_FIELDS if k in want and want[k] != fingerprint.get(k)]
    if diffs:
        raise InputError(f"--adapter {adapter_dir} was trained on another base model than --model {model_dir}: "
                         + "; ".join(diffs) + f". Use the base it was trained on ({summary.get('base_model')}).")
    if want.get("weights_sha256") not in (None, fingerprint["weights_sha256"]):
        raise InputError(f"--adapter {adapter_dir} was trained on a base with the same shape but other weights than "
                         f"--model {model_dir} (weight hash differs); use the base it was trained on "
                         f"({summary.get('base_model')}).")
    return summary


def load_for_prediction(model_dir: str | Path, adapter_dir: str | Path | None = None):
    """(model in eval mode, tokenizer, standardiser or None, finetune summary dict) for `predict`."""
    model_dir = Path(model_dir)
    if adapter_dir is None and (model_dir / "config.json").exists() and not _is_classifier_folder(model_dir):
        raise InputError(f"--model {model_dir} is a pretrained causal LM, not a fine-tuned classifier: pass the "
                         "LoRA adapter with --adapter DIR, or a folder from `finetune --method probe|full` as --model")
    if adapter_dir is not None and (model_dir / "config.json").exists() and _is_classifier_folder(model_dir):
        raise InputError(f"--model {model_dir} is already a fine-tuned classifier; pass the pretrained base "
                         "model as --model when giving --adapter")
    model, tokenizer, standardizer = load_base_classifier(model_dir)
    summary: dict = {}
    if adapter_dir is None:
        if (model_dir / SUMMARY_FILE).exists():
            summary = json.loads((model_dir / SUMMARY_FILE).read_text())
    else:
        from peft import PeftModel

        adapter_dir = Path(adapter_dir)
        summary = check_adapter_base(adapter_dir, model_dir, base_fingerprint(model))
        from ehr_prs.checkpoints import check_finite, check_safetensors_file

        if (adapter_dir / "adapter_model.safetensors").exists() or not (adapter_dir / "adapter_model.bin").exists():
            check_safetensors_file(adapter_dir / "adapter_model.safetensors", "--adapter")  # names a cut-short file
        try:
            model = PeftModel.from_pretrained(model, str(adapter_dir))
        except (RuntimeError, ValueError, KeyError) as err:  # size mismatch, unknown target modules
            raise InputError(f"--adapter {adapter_dir} does not fit --model {model_dir}: {str(err)[:400]}") from err
        check_finite(model, f"--adapter {adapter_dir}: adapter_model.safetensors")  # the base was checked on load
    model.eval()
    return model, tokenizer, standardizer, summary


# ----------------------------------------------------------------------------- inputs and batches


def classifier_max_length(config, cap: int | None = None, tokenizer=None) -> int:
    """Event tokens a classifier input may hold: the context minus the PRS prefix, capped by `cap`, or
    else by the tokenizer's model_max_length (the history length pretraining saw: `tokenize --max-length`)."""
    length = config.max_position_embeddings - config.num_prefix_tokens
    cap = cap or (getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None)
    return min(length, int(cap)) if cap else length


def task_inputs(meds, labels: pl.DataFrame, tokenizer, standardizer, prs, split: str, max_length: int):
    """One dataset row per label row of `split`, events up to prediction_time only (the shared function)."""
    from ehr_prs.tokenizer import inputs_at_prediction_times

    if prs is not None and standardizer is None:
        raise InputError("--prs was given but the model folder has no prs_standardizer.json: the model was trained "
                         "without PRS (drop --prs) or its folder is incomplete")
    return inputs_at_prediction_times(meds, labels, tokenizer, standardizer if prs is not None else None, prs,
                                      split=split, max_length=max_length)


@dataclass
class ClassifierCollator:
    """EhrPrsCollator with `labels` from boolean_value, and a PRS block of the model's width.

    Data tokenized without --prs has an empty PRS vector; a model with n_prs > 0 then gets zeros
    and prs_mask False for every row (everyone "not genotyped"), never zeros read as scores.
    """

    pad_token_id: int
    n_prs: int
    max_length: int | None = None
    with_labels: bool = True

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        import torch
        from ehr_prs.collator import EhrPrsCollator

        inner = EhrPrsCollator(self.pad_token_id, self.max_length,
                               label_column="boolean_value" if self.with_labels else None, with_labels=False)
        batch = inner(rows)
        b = batch["input_ids"].shape[0]
        if self.n_prs == 0:
            batch.pop("prs", None), batch.pop("prs_mask", None)
        elif "prs" not in batch or batch["prs"].shape[1] != self.n_prs:
            batch["prs"] = torch.zeros(b, self.n_prs)  # (b, n_prs)
            batch["prs_mask"] = torch.zeros(b, dtype=torch.bool)  # (b,)
        return batch


def model_n_prs(model) -> int:
    config = model.config
    return int(config.n_prs) if config.reads_prs else 0


def score_head(model) -> torch.nn.Linear:
    """The `score` Linear that forward uses (for LoRA, PEFT's trained copy inside modules_to_save)."""
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (name == "score" or name.endswith("score.modules_to_save.default")):
            return module
    raise InputError("the model has no `score` head: not an EhrPrsForSequenceClassification")


def predict_proba(model, dataset, pad_token_id: int, batch_size: int = 32, max_length: int | None = None,
                  progress: bool = True, desc: str = "predict", return_features: bool = False, on_rows=None):
    """P(label) for every dataset row, in row order: sigmoid of the classifier's one logit. Shape (rows,).

    return_features: also return what the `score` head reads (the pooled last-token state, (rows, d)),
    captured by a hook so it is exactly the classifier's own pooling. on_rows(n): called after each
    batch with its row count (the sharded run's progress bar, ehr_prs.sharded).
    """
    import torch

    model.eval()
    collate = ClassifierCollator(pad_token_id, model_n_prs(model), max_length, with_labels=False)
    device = next(model.parameters()).device
    captured: list[torch.Tensor] = []
    hook = score_head(model).register_forward_hook(lambda m, inp, out: captured.append(inp[0].float().cpu())) \
        if return_features else None
    # Similar lengths together keep padding small; results go back to row order.
    order = np.argsort(np.asarray(dataset["length"]), kind="stable")
    out = np.empty(len(dataset), dtype=np.float64)
    features = None
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress,
                          leave=False):
            idx = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate([dataset[int(i)] for i in idx]).items()}
            with torch.no_grad():
                logits = model(**batch).logits[:, 0].float()  # (b,)
            out[idx] = torch.sigmoid(logits).cpu().numpy()
            if on_rows is not None:
                on_rows(len(idx))
            if hook is not None:
                pooled = captured.pop()  # (b, d)
                if features is None:
                    features = np.empty((len(dataset), pooled.shape[1]), dtype=np.float32)
                features[idx] = pooled.numpy()
    finally:
        if hook is not None:
            hook.remove()
    return (out, features) if return_features else out


def prediction_frame(dataset, probability: np.ndarray) -> pl.DataFrame:
    """The MEDS prediction schema: subject_id, prediction_time, boolean_value, predicted_boolean_probability."""
    return pl.DataFrame({
        "subject_id": np.asarray(dataset["subject_id"], dtype=np.int64),
        "prediction_time": dataset.with_format("arrow")["prediction_time"],
        "boolean_value": np.asarray(dataset["boolean_value"], dtype=bool),
        "predicted_boolean_probability": probability.astype(np.float64),
    })


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="pretrained base (with --adapter), or a folder from finetune --method probe/full")
    parser.add_argument("--adapter", help="LoRA adapter folder from `ehr-prs finetune --method lora`")
    parser.add_argument("--meds", required=True, help="MEDS dataset root (histories up to each prediction_time)")
    parser.add_argument("--prs", help="PRS table (parquet/CSV); without it every subject counts as not genotyped")
    parser.add_argument("--labels", required=True, help="MEDS labels (subject_id, prediction_time, boolean_value)")
    parser.add_argument("--out", required=True, help="output parquet in the MEDS prediction schema")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out file (never an input, nor a file inside --model/--adapter/--meds)")
    parser.add_argument("--split", default="held_out", help="which split's labels to predict (default held_out)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per forward pass")
    parser.add_argument("--max-length", type=int,
                        help="cap on event tokens per input (default: the one used in finetune, else the context)")
    parser.add_argument("--strict-labels", action="store_true", help=STRICT_LABELS_HELP)
    sharded.add_arguments(parser, default_chunk_rows=2048)


def run(args: argparse.Namespace) -> None:
    """Predict the label rows of --split and write --out; under torchrun / accelerate launch the rows are
    split across the processes and merged into the same file (ehr_prs.sharded; --resume after a crash)."""
    from ehr_prs.data.predictions import write_predictions
    from ehr_prs.data.readers import read_labels, read_meds_dataset, read_prs_table, select_label_rows
    from ehr_prs.tokenizer.prediction_inputs import warn_if_prs_not_given

    inputs = {"--model": args.model, "--adapter": args.adapter, "--meds": args.meds, "--prs": args.prs,
              "--labels": args.labels}
    check_output(args.out, inputs, args.overwrite, kind="file")
    # The parts folder's rules (--resume / --overwrite) are checked here too, before any heavy work.
    scoring = sharded.ShardedScoring(args.out, inputs, args.resume, args.overwrite, args.chunk_rows, "predict",
                                     sharded.run_settings(args))
    model, tokenizer, standardizer, summary = load_for_prediction(args.model, args.adapter)
    model.to(scoring.device)
    meds = read_meds_dataset(args.meds)
    if args.split not in meds.splits:
        raise InputError(f"--split {args.split!r}: {args.meds} has splits {meds.splits}")
    # The shared label policy: unscorable rows dropped with one warning (or refused with --strict-labels).
    selection = select_label_rows(meds, read_labels(args.labels), [args.split], args.labels, args.strict_labels)
    if scoring.is_main:
        print(selection.summary())
    labels = selection.rows
    prs = read_prs_table(args.prs) if args.prs else None
    warn_if_prs_not_given(model_n_prs(model), prs, args.model)
    # Default: the cap the model was fine-tuned with (finetune --max-length), else the whole context.
    cap = args.max_length if args.max_length is not None else summary.get("args", {}).get("max_length")
    max_length = classifier_max_length(model.config, cap, tokenizer)
    data = task_inputs(meds, labels, tokenizer, standardizer, prs, args.split, max_length)

    def score_chunk(rows: np.ndarray, on_rows) -> dict[str, np.ndarray]:
        # rows come in predict_proba's own (length) order and in whole batches: the same batches as one pass
        return {"probability": predict_proba(model, data.select(rows), tokenizer.pad_token_id, args.batch_size,
                                             max_length, progress=False, on_rows=on_rows)}

    merged = scoring.score({"subject_id": np.asarray(data["subject_id"], dtype=np.int64),
                            "prediction_time": data.with_format("arrow")["prediction_time"].to_numpy()},
                           np.asarray(data["length"]), args.batch_size, score_chunk, desc="predict",
                           derived={"max_length": max_length})
    if merged is None:  # another process merges and writes --out
        return
    probability = merged["probability"]
    frame = prediction_frame(data, probability)
    write_predictions(frame, args.out, args.overwrite,
                      source=f"--model {args.model}" + (f" --adapter {args.adapter}" if args.adapter else ""))
    scoring.finish()
    print(f"wrote {args.out}: {frame.height} predictions for split {args.split} "
          f"({int(frame['boolean_value'].sum())} positive), mean predicted risk {probability.mean():.4f}")
