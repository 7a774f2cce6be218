"""Share a trained model on the Hugging Face Hub: `ehr-prs push`.

    ehr-prs push --model runs/ehr_prefix --repo-id me/ehr-prs-small --gated --eval-report runs/eval/t2d
    ehr-prs push --model runs/ehr_prefix --adapter runs/stroke_lora --repo-id me/ehr-prs-stroke --private
    ehr-prs push --model runs/ehr_prefix --repo-id me/ehr-prs-random --random-weights      (pipeline testing)
    ehr-prs push --model runs/ehr_prefix --repo-id me/x --dry-run runs/upload              (build, never upload)

`build_upload_folder` writes exactly the folder that is uploaded, from an allow-list: config,
safetensors weights, the remote-code files named by `auto_map` (so `trust_remote_code=True`
loads it where this package is not installed), tokenizer, PRS standardiser, a training summary
with local paths reduced to their last component, the PEFT adapter (if any) under `adapter/`, and
a README.md model card rendered with huggingface_hub's ModelCard. Pickles (*.bin, *.pt, *.pth,
...) are never copied, data tables (parquet, arrow, csv, ...) beside the model are an error, and
every JSON copied is checked for subject-id keys.

Why the adapter lives in `adapter/` and not at the top level: transformers treats a repository
whose root holds `adapter_config.json` as an adapter repository and tries to fetch its base model
from `base_model_name_or_path`; in a subfolder the base loads normally and the adapter loads with
`PeftModel.from_pretrained(base, repo_id, subfolder="adapter")`.

Why the card has no `pipeline_tag`: the Hub's tasks assume text, images or tables; this model's
input is MEDS code tokens plus a standardised PRS vector that no Hub widget can build, so
`text-generation` would advertise a widget that cannot work. `inference: false` says the same.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ehr_prs.errors import InputError, atomic_output_dir, check_output
from ehr_prs.privacy import MIN_SUBJECTS, suppress_cells

PAPER = "Integrating Genomics into Multimodal EHR Foundation Models (arXiv 2510.23639)"
CODE_LICENSE = "apache-2.0"
WEIGHTS_LICENSE_NAME = "training-data-use-agreement"
ADAPTER_SUBFOLDER = "adapter"
BASE_TAGS = ["ehr", "polygenic-risk-score", "meds", "genomics", "medical", "ehr-prs"]

# The model folder: copied when present (REQUIRED must be), everything else is skipped.
REQUIRED_MODEL_FILES = ("config.json", "tokenizer_config.json")
OPTIONAL_MODEL_FILES = ("generation_config.json", "special_tokens_map.json", "prs_standardizer.json",
                        "training_summary.json", "finetune_summary.json")  # the last: probe/full classifier folders
SUMMARY_FILES = ("training_summary.json", "finetune_summary.json")  # copied with local paths redacted
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
OPTIONAL_ADAPTER_FILES = ("finetune_summary.json",)
# Never copied: these unpickle arbitrary code when loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
# Never beside a model we share: tables of subject-level rows.
DATA_SUFFIXES = (".parquet", ".arrow", ".feather", ".ipc", ".csv", ".tsv", ".jsonl", ".npy", ".npz", ".h5", ".db")
SUBJECT_ID_KEYS = {"subject_id", "subject_ids", "person_id", "person_ids", "patient_id", "patient_ids", "mrn",
                   "research_id", "eid"}
# tokenizer_config.json keys that are load-time flags of the saving machine, not tokenizer state.
LOAD_TIME_KEYS = ("is_local", "local_files_only")
CARD_MARKER = "ehr-prs"  # a folder whose README carries this tag may be overwritten by another --dry-run


# ----------------------------------------------------------------------------------------
# Checking the inputs
# ----------------------------------------------------------------------------------------

def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not readable JSON ({err}).") from err


def _reject_data_tables(folder: Path, flag: str) -> None:
    """A folder we share must hold no subject-level table; say which file and what to do."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name.lower().endswith(DATA_SUFFIXES):
            raise InputError(
                f"{flag} {folder}: {path.relative_to(folder)} is a data table; a folder to share must not contain "
                "subject-level data. Move it out of the folder (or point the flag at a clean copy) and retry.")


def _check_no_subject_ids(obj: Any, path: Path, where: str = "") -> None:
    """Walk a JSON object; a key naming subject ids (subject_id, person_id, ...) is an error."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if str(key).lower() in SUBJECT_ID_KEYS:
                raise InputError(f"{path}: key {where}{key!r} holds subject identifiers; it must not be shared. "
                                 "Remove it from the file and retry.")
            _check_no_subject_ids(value, path, f"{where}{key}.")
    elif isinstance(obj, list):
        for value in obj:
            _check_no_subject_ids(value, path, where)


def _redact_paths(obj: Any) -> tuple[Any, int]:
    """Replace absolute local paths by their last component (user names, workspace names stay home)."""
    if isinstance(obj, dict):
        out, n = {}, 0
        for k, v in obj.items():
            out[k], m = _redact_paths(v)
            n += m
        return out, n
    if isinstance(obj, list):
        pairs = [_redact_paths(v) for v in obj]
        return [p[0] for p in pairs], sum(p[1] for p in pairs)
    if isinstance(obj, str) and (os.path.isabs(obj) or obj.startswith("~")) and len(Path(obj).parts) > 1:
        return Path(obj).name, 1
    return obj, 0


def _auto_map_files(auto_map: dict, folder: Path, source: str) -> list[str]:
    """The .py files an auto_map names ("module.Class", or [slow, fast] for tokenizers)."""
    refs: list[str] = []
    for value in auto_map.values():
        refs += [v for v in (value if isinstance(value, list) else [value]) if v]
    names = sorted({ref.split("--")[-1].rsplit(".", 1)[0] + ".py" for ref in refs})
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise InputError(f"--model {folder}: {source} auto_map names {missing}, which the folder lacks; "
                         "re-save the model with `import modeling_ehr_prs` so save_pretrained copies its code.")
    return names


def _weight_files(folder: Path, flag: str = "--model") -> list[str]:
    """model.safetensors, or the index and its shards; a pickle-only folder is refused."""
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if not shards or missing:
            raise InputError(f"{flag} {folder}: {index.name} lists shards that are missing: "
                             f"{missing or 'none listed'}.")
        return [index.name, *shards]
    pickles = [p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES)]
    hint = (f" It holds {pickles}: pickled weights are never shared; load and re-save them with "
            "save_pretrained(safe_serialization=True).") if pickles else ""
    raise InputError(f"{flag} {folder}: no model.safetensors (or model.safetensors.index.json) found.{hint}")


def _tensor_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                shapes[name] = tuple(st.get_slice(name).get_shape())
    return shapes


def model_files(model_dir: str | os.PathLike) -> dict[str, list[str]]:
    """Check a model folder and return the files to share by kind; InputError naming what is missing."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise InputError(f"--model {folder}: not a folder; give the folder written by `ehr-prs pretrain`.")
    missing = [n for n in REQUIRED_MODEL_FILES if not (folder / n).is_file()]
    if missing:
        raise InputError(f"--model {folder}: missing {missing}; give the final folder written by `ehr-prs pretrain` "
                         "(config, weights, tokenizer and code together).")
    _reject_data_tables(folder, "--model")
    config = _read_json(folder / "config.json")
    tok_config = _read_json(folder / "tokenizer_config.json")
    if "auto_map" not in config:
        raise InputError(f"--model {folder}: config.json has no auto_map, so trust_remote_code=True cannot load it; "
                         "re-save the model after `import modeling_ehr_prs`.")
    if "auto_map" not in tok_config:
        raise InputError(f"--model {folder}: tokenizer_config.json has no auto_map; re-save the tokenizer after "
                         "`import modeling_ehr_prs` so AutoTokenizer can load it with trust_remote_code=True.")
    code = sorted(set(_auto_map_files(config["auto_map"], folder, "config.json"))
                  | set(_auto_map_files(tok_config["auto_map"], folder, "tokenizer_config.json")))
    vocab = ["ehr_vocab.json"]  # EhrTokenizer.vocab_files_names
    if not (folder / vocab[0]).is_file():
        raise InputError(f"--model {folder}: missing {vocab[0]} (the tokenizer's vocabulary).")
    if config.get("n_prs", 0) > 0:
        std = folder / "prs_standardizer.json"
        if not std.is_file():
            raise InputError(f"--model {folder}: the model reads {config['n_prs']} PRS but prs_standardizer.json is "
                             "missing; without it nobody can standardise scores as in training.")
        if _read_json(std).get("n_prs") != config["n_prs"]:
            raise InputError(f"--model {folder}: prs_standardizer.json has n_prs {_read_json(std).get('n_prs')} but "
                             f"config.json has {config['n_prs']}; they come from different runs.")
    optional = [n for n in OPTIONAL_MODEL_FILES if (folder / n).is_file()]
    return {"json": [*REQUIRED_MODEL_FILES, *vocab, *optional], "code": code, "weights": _weight_files(folder)}


def check_adapter(adapter_dir: str | os.PathLike, model_dir: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Check a PEFT adapter folder against the base model; returns the adapter's tensor shapes.

    Every LoRA matrix must fit the base layer it adapts (lora_A: [r, in], lora_B: [out, r]), so an
    adapter trained on another base is caught here rather than by the person who downloads it.
    """
    folder, base = Path(adapter_dir), Path(model_dir)
    if not folder.is_dir():
        raise InputError(f"--adapter {folder}: not a folder; give the --output-dir of `ehr-prs finetune`.")
    missing = [n for n in ADAPTER_FILES if not (folder / n).is_file()]
    if missing:
        raise InputError(f"--adapter {folder}: missing {missing}; expected PEFT's layout (adapter_config.json + "
                         "adapter_model.safetensors, from save_pretrained).")
    _reject_data_tables(folder, "--adapter")
    cfg = _read_json(folder / "adapter_config.json")
    if "peft_type" not in cfg:
        raise InputError(f"--adapter {folder}: adapter_config.json has no peft_type; not a PEFT adapter.")
    shapes = _tensor_shapes([folder / "adapter_model.safetensors"])
    base_shapes = _tensor_shapes([base / f for f in _weight_files(base) if f.endswith(".safetensors")])
    matched = 0
    for name, shape in shapes.items():
        for part, dim in ((".lora_A.weight", 1), (".lora_B.weight", 0)):
            if not name.endswith(part):
                continue
            module = name.removesuffix(part).removeprefix("base_model.model.")
            target = base_shapes.get(module + ".weight")
            if target is None:
                continue  # a module the causal LM lacks (e.g. the classification head's own LoRA)
            matched += 1
            if shape[dim] != target[1 - dim]:
                raise InputError(f"--adapter {folder}: {name} has shape {list(shape)} but the base layer "
                                 f"{module}.weight in --model {base} has {list(target)}; the adapter was trained on "
                                 "another base model. Push it with the model it was fine-tuned from.")
    if cfg.get("peft_type") == "LORA" and not matched:
        raise InputError(f"--adapter {folder}: none of its LoRA matrices adapts a layer of --model {base}; the adapter "
                         "was trained on another base model.")
    return shapes


# ----------------------------------------------------------------------------------------
# The model card
# ----------------------------------------------------------------------------------------

def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    return f"{x:.{digits}f}" if isinstance(x, float) else f"{x:,}"


def _ci(v: float, ci: list[float]) -> str:
    return f"{_f(v)} [{_f(ci[0])}, {_f(ci[1])}]"


def evaluation_section(metrics: dict, task: str) -> str:
    """Markdown tables from `ehr-prs evaluate`'s metrics.json; suppressed cells stay suppressed."""
    min_cell = metrics.get("min_cell", MIN_SUBJECTS)
    cut = f"<{min_cell}"
    ref = metrics.get("reference")
    n_pos = metrics.get("n_positive")
    # The prevalence would give back a suppressed positive count (n x prevalence): shown only when n_positive is.
    prev = f" (prevalence {metrics['prevalence']:.3f})" if isinstance(n_pos, int) and "prevalence" in metrics else ""
    lines = [f"## Evaluation: {task}", "",
             f"{metrics.get('n')} prediction rows, {n_pos} positive{prev}; 95% CIs from "
             f"{metrics.get('n_bootstrap')} paired bootstrap resamples; Δ against **{ref}**. "
             f"Counts and cells under {cut[1:]} subjects are suppressed (shown as {cut}); where a column had a "
             "single suppressed count, the next smallest is shown as `hidden` so that it cannot be recovered by "
             "subtraction.",
             "",
             "| model | AUROC [95% CI] | AUPRC [95% CI] | Brier | ECE | ΔAUROC [95% CI] | ΔAUPRC [95% CI] |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for m, r in metrics["models"].items():
        c = metrics.get("comparisons", {}).get(m)
        deltas = ["—", "—"] if m == ref or not c else [_ci(c["delta_auroc"], c["delta_auroc_ci"]),
                                                       _ci(c["delta_auprc"], c["delta_auprc_ci"])]
        lines.append(f"| {m} | {_ci(r['auroc'], r['auroc_ci'])} | {_ci(r['auprc'], r['auprc_ci'])} | "
                     f"{_f(r['brier'], 4)} | {_f(r['ece'], 4)} | {' | '.join(deltas)} |")
    models = list(metrics["models"])
    subgroups = metrics.get("subgroups", {})
    # Ancestry and genotyped first: PRS portability is what a reader of this card must see.
    order = [v for v in ("ancestry", "genotyped") if v in subgroups] + [v for v in subgroups
                                                                       if v not in ("ancestry", "genotyped")]
    for var in order:
        lines += ["", f"### By {var.replace('_', ' ')} (AUROC / AUPRC)", "",
                  "| " + " | ".join([var, "n", "positive", *models]) + " |", "|" + " --- |" * (3 + len(models))]
        levels = subgroups[var]
        # Re-applied to what metrics.json holds (a no-op on our own files): a single suppressed count is
        # recoverable as the total minus the published ones (sex F 24 positive of 28 gives M = 4).
        counts = {level: {c: cell[c] for c in ("n", "n_positive")} for level, cell in levels.items()}
        suppress_cells(counts, ("n", "n_positive"), min_cell)
        for level, cell in levels.items():
            vals = [cut] * len(models) if cell.get("suppressed") else [
                f"{_f(cell['models'][m]['auroc'])} / {_f(cell['models'][m]['auprc'])}" for m in models]
            lines.append("| " + " | ".join([level, str(counts[level]["n"]), str(counts[level]["n_positive"]), *vals])
                         + " |")
    if "ancestry" not in subgroups:
        lines += ["", "No results by genetic ancestry were reported (evaluate with `--prs` on a PRS table that has "
                  "an `ancestry` column); performance across ancestries is unknown."]
    return "\n".join(lines)


def gated_metadata(repo_id: str) -> dict:
    """The Hub's access-request form: who asks, under which data-use agreement, for what."""
    return {
        "extra_gated_heading": f"Request access to {repo_id}: trained on controlled-access health data",
        "extra_gated_prompt": (
            "These weights were trained on controlled-access electronic health records and genomic data. Access is "
            "limited to researchers who hold an active data-use agreement for the data they were trained on (for "
            "example an All of Us Researcher Workbench registration, bound by the All of Us Data User Code of "
            "Conduct and Data and Statistics Dissemination Policy, or a UK Biobank Material Transfer Agreement). "
            "You agree not to attempt to re-identify participants or extract training records, not to redistribute "
            "the weights, and not to use the model for clinical decisions about individuals."),
        "extra_gated_fields": {
            "Full name": "text",
            "Institution": "text",
            "Country": "country",
            "Data-use agreement or registration (All of Us tier, UK Biobank application number, ...)": "text",
            "Intended use": {"type": "select", "options": [
                "Research", "Methods development / benchmarking", "Education", {"label": "Other", "value": "other"}]},
            "Describe your intended use": "text",
            "I hold an active data-use agreement covering the training data (All of Us DSDP, UK Biobank MTA, ...)":
                "checkbox",
            "I will not try to re-identify participants or use the model for clinical decisions": "checkbox",
        },
        "extra_gated_button_content": "Agree and request access",
    }


def _architecture_rows(config: dict, n_params: int) -> list[str]:
    rows = [("architecture", ", ".join(config.get("architectures", [])) + " (Llama-style decoder, remote code)"),
            ("prs_fusion", config.get("prs_fusion")), ("n_prs (PGS Catalog scores)", config.get("n_prs")),
            ("prs_tokens", config.get("prs_tokens"))]
    if config.get("prs_fusion") == "cross_attention":
        rows.append(("prs_cross_attention_layers", config.get("prs_cross_attention_layers")))
    if config.get("prs_fusion") == "logit_bias":
        rows.append(("prs_logit_bias_rank", config.get("prs_logit_bias_rank")))
    rows += [(k, config.get(k)) for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                          "num_key_value_heads", "intermediate_size", "max_position_embeddings")]
    rows.append(("parameters (stored)", f"{n_params:,}"))
    return ["| field | value |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)]


def _training_lines(summary: dict | None, random_weights: bool) -> list[str]:
    if random_weights:
        return ["These weights were never trained: they are a random initialisation (see the warning above)."]
    if summary is None:
        return ["No training summary was saved with this model."]
    keys = [("preset", "preset"), ("steps", "optimizer steps"), ("tokens_seen", "training tokens seen"),
            ("final_train_loss", "final training loss"), ("final_eval_loss", "tuning-split loss"),
            ("eval_perplexity", "tuning-split perplexity"), ("init_from", "initialised from"),
            ("world_size", "processes")]
    rows = [f"| {label} | {_f(summary[k], 4)} |"
            for k, label in keys if summary.get(k) is not None]
    return ["From `training_summary.json` (local paths reduced to their last component):", "",
            "| | |", "| --- | --- |", *rows]


def _adapter_lines(cfg: dict, shapes: dict, summary: dict | None) -> list[str]:
    n = sum(math.prod(s) for s in shapes.values())
    score = [s for k, s in shapes.items() if k.endswith("score.weight")]
    labels = score[0][0] if score else "?"
    rows = [("peft_type", cfg.get("peft_type")), ("task_type", cfg.get("task_type")), ("r", cfg.get("r")),
            ("lora_alpha", cfg.get("lora_alpha")), ("target_modules", cfg.get("target_modules")),
            ("modules_to_save", cfg.get("modules_to_save")), ("parameters in the adapter", f"{n:,}"),
            ("num_labels", labels)]
    if summary:  # the fine-tuning recipe's own scalars, whatever they are
        rows += [(k, _f(v, 4)) for k, v in summary.items() if isinstance(v, (int, float, str, bool))]
    return [f"A PEFT adapter for a downstream task lives in `{ADAPTER_SUBFOLDER}/` (its base model is this "
            "repository's weights).", "", "| field | value |", "| --- | --- |",
            *(f"| {k} | {v} |" for k, v in rows)], labels


def render_card(repo_id: str, config: dict, n_params: int, files: list[tuple[str, int | None]], *,
                training_summary: dict | None = None, adapter: tuple[dict, dict, dict | None] | None = None,
                metrics: dict | None = None, task: str = "", gated: bool = False, random_weights: bool = False,
                min_subjects: int | None = None, finetune_summary: dict | None = None):
    """The README.md model card (huggingface_hub.ModelCard): YAML metadata + what, how, limits, results."""
    from huggingface_hub import ModelCard, ModelCardData

    tags = [*BASE_TAGS, *(["peft", "lora"] if adapter else []), *(["random-weights"] if random_weights else [])]
    license_fields = {"license": CODE_LICENSE} if random_weights else {
        "license": "other", "license_name": WEIGHTS_LICENSE_NAME}
    data = ModelCardData(library_name="transformers", tags=tags, model_name=repo_id, inference=False,
                         **license_fields, **(gated_metadata(repo_id) if gated else {}))
    name = repo_id.split("/")[-1]
    body: list[str] = [f"# {name}", ""]
    if random_weights:
        body += ["> **⚠️ RANDOM WEIGHTS — NOT A TRAINED MODEL.** This repository has the same architecture, config, "
                 "tokenizer and PRS standardiser as a trained ehr-prs model, but its weights are a random "
                 "initialisation. It exists to test pipelines (loading, shapes, tokenisation, batching) without "
                 "access to controlled data. Its predictions are meaningless: never use them for research results "
                 "or for any decision about a person.", ""]
    body += [f"A generative foundation model of electronic health records (EHR) that also reads a person's "
             f"polygenic risk scores (PRS), from the [ehr-prs](https://arxiv.org/abs/2510.23639) implementation of "
             f"*{PAPER}*. It is a causal language model over MEDS event tokens (one token per medical code, plus "
             "time-gap, age, demographic and numeric-value-bin tokens); the PRS vector enters through a genomic "
             "adapter (`prs_fusion`: `prefix` soft-prompt tokens, gated `cross_attention` memory tokens, a "
             "`logit_bias` log-linear shift of each code's odds, or `none` for the EHR-only baseline). Subjects "
             "without genotype data get a learned \"no genotype\" embedding (none at all for `logit_bias`), "
             "never an imputed average.", "", "## Model", "", *_architecture_rows(config, n_params), "",
             "## Training", "", *_training_lines(training_summary, random_weights), ""]
    num_labels = 1
    # A probe/full fine-tune saves a complete classifier folder: load it with the classification head.
    is_classifier = any("SequenceClassification" in a for a in config.get("architectures", []))
    auto_class = "AutoModelForSequenceClassification" if is_classifier else "AutoModelForCausalLM"
    if finetune_summary:
        body += ["## Fine-tuning", "", "This folder is a complete fine-tuned classifier. From `finetune_summary.json`:",
                 "", "| field | value |", "| --- | --- |",
                 *(f"| {k} | {_f(v, 4)} |" for k, v in finetune_summary.items()
                   if isinstance(v, (int, float, str, bool))), ""]
    if adapter:
        lines, num_labels = _adapter_lines(*adapter)
        body += ["## Fine-tuned adapter", "", *lines, ""]
    body += ["## How to load", "", "```python",
             f"from transformers import {auto_class}, AutoTokenizer",
             f'repo = "{repo_id}"',
             f"model = {auto_class}.from_pretrained(repo, trust_remote_code=True)  # "
             + ", ".join(config.get("architectures", [])),
             "tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)    # EhrTokenizer (MEDS codes)",
             "# forward(input_ids, attention_mask, prs=[batch, n_prs] float (standardised), prs_mask=[batch] bool)",
             "```", "",
             "The PRS standardiser (`prs_standardizer.json`: per-score mean and std from the training split, "
             "optionally per ancestry group) must be applied to raw scores exactly as in training. With the "
             "`ehr-prs` package:", "", "```python",
             "from huggingface_hub import snapshot_download",
             "from tokenizer import PrsStandardizer  # from the ehr-prs package",
             "std = PrsStandardizer.load(snapshot_download(repo))",
             "prs, prs_mask = std.transform(prs_table, subject_ids)  # polars table: subject_id + PGS columns",
             "```", ""]
    if adapter:
        body += ["The fine-tuned classifier (base + adapter):", "", "```python",
                 "from peft import PeftModel",
                 "from transformers import AutoModelForSequenceClassification",
                 f"base = AutoModelForSequenceClassification.from_pretrained(repo, trust_remote_code=True, "
                 f"num_labels={num_labels})",
                 f'classifier = PeftModel.from_pretrained(base, repo, subfolder="{ADAPTER_SUBFOLDER}")',
                 "```", ""]
    body += ["## Intended use", "",
             "- Research on EHR foundation models and on combining genomic risk with clinical history: zero-shot "
             "risk from sampled futures (`ehr-prs risk`), fine-tuning for new binary tasks (`ehr-prs finetune`), "
             "representation analysis.",
             "- Methods development and benchmarking on cohorts the user is authorised to analyse.", "",
             "## Out-of-scope use", "",
             "- Clinical decisions about individual patients, screening or triage: the model is not a medical device, "
             "is not validated prospectively, and its risks are not calibrated for any care setting.",
             "- Insurance, employment or any other decision about a person; inferring genotype or ancestry.",
             "- Re-identification of participants, membership inference or extraction of training records.",
             "- Populations, coding systems or care settings unlike the training data without re-validation.", "",
             "## Data use, privacy and licence", "",
             f"- **Licence.** The code files (`*.py`) are Apache-2.0. "
             + ("These random weights carry no training data and are Apache-2.0 too."
                if random_weights else
                "The weights were trained on controlled-access health data: their licence and any redistribution "
                "must follow the data-use agreement of that data (e.g. the All of Us Data User Code of Conduct and "
                "Data and Statistics Dissemination Policy, or a UK Biobank Material Transfer Agreement). Check it "
                "before sharing further; weights can memorise rare records.")
             + (" The tokenizer and PRS standardiser are the trained model's (aggregate statistics, below)."
                if random_weights else ""),
             "- **No subject-level data** is in this repository: no subject ids, no records, no tables. Files were "
             "copied from an allow-list (config, safetensors weights, code, tokenizer, standardiser, summaries), "
             "JSON files were checked for subject-id keys and local paths were reduced to their last component.",
             f"- **Small-cell suppression.** The vocabulary holds only codes seen in at least {min_subjects or '?'} "
             "training subjects (the tokenizer's `min_subjects`"
             + (f"; **below the All of Us minimum of {MIN_SUBJECTS}**, acceptable for simulated data only"
                if (min_subjects or 0) < MIN_SUBJECTS else f", the All of Us minimum is {MIN_SUBJECTS}")
             + f"); reported counts and subgroup cells under {MIN_SUBJECTS} subjects are suppressed (shown as "
             f"`<{MIN_SUBJECTS}`).",
             "- The tokenizer's numeric-value bin edges and the standardiser's means and stds are aggregate "
             "statistics of the training split.", "",
             "## PRS and fairness limitations", "",
             "- **Portability.** Polygenic scores are derived mostly from European-ancestry GWAS; their predictive "
             "value is lower, sometimes much lower, in other genetic ancestries. Gains from PRS seen overall may not "
             "hold in every group: check the results by ancestry below and re-validate in your own population.",
             "- **Calibration.** Predicted probabilities (zero-shot path probabilities and fine-tuned scores) are "
             "not calibrated to any target population; recalibrate before interpreting them as absolute risks.",
             "- **Missing genotypes.** Most EHR subjects are not genotyped; the model treats them as missing, and "
             "genotyped and non-genotyped people can differ systematically (selection into biobanks).",
             "- **Bias.** EHR data reflect access to care, coding practice and documentation; the model inherits "
             "these patterns and may perform worse for under-represented groups (race, sex, age, site).", ""]
    if metrics is not None:
        body += [evaluation_section(metrics, task), ""]
    elif not random_weights:
        body += ["## Evaluation", "", "No evaluation report was attached (`ehr-prs push --eval-report DIR`).", ""]
    sizes = [f"| `{f}` | {'this card' if n is None else f'{n:,}'} |" for f, n in files]
    body += ["## Files", "", "| file | bytes |", "| --- | --- |", *sizes, "",
             "## Citation", "", f"*{PAPER}*: https://arxiv.org/abs/2510.23639", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


# ----------------------------------------------------------------------------------------
# The upload folder
# ----------------------------------------------------------------------------------------

def _write_random_weights(model_dir: Path, out: Path, seed: int) -> list[str]:
    """Save a randomly initialised model of the same config; returns the weight files written."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import modeling_ehr_prs  # noqa: F401  (registers the Auto classes)

    config = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        written = [p.name for p in Path(tmp).iterdir() if p.name.startswith("model") and
                   (p.name.endswith(".safetensors") or p.name == "model.safetensors.index.json")]
        for name in written:
            shutil.copy(Path(tmp) / name, out / name)
    return sorted(written)


def _safe_target(out_dir: Path, sources: dict[str, Path | None], overwrite: bool = False) -> None:
    """Refuse an upload folder that overlaps a source, or replaces an existing folder without --overwrite."""
    check_output(out_dir, sources, overwrite=True, flag="--dry-run")  # overlap with a source: never, first
    if not overwrite and out_dir.is_dir() and any(out_dir.iterdir()):
        readme = out_dir / "README.md"
        if not (readme.is_file() and CARD_MARKER in (_card_tags(readme) or [])):
            raise InputError(f"--dry-run {out_dir} exists and is not an upload folder written by `ehr-prs push`; "
                             "pass --overwrite to replace it, or choose a new or empty folder.")
    check_output(out_dir, sources, overwrite, flag="--dry-run")


def _card_tags(readme: Path) -> list[str] | None:
    from huggingface_hub import metadata_load

    try:
        return (metadata_load(readme) or {}).get("tags")
    except Exception:  # any unreadable README: not ours
        return None


def build_upload_folder(model_dir: str | os.PathLike, out_dir: str | os.PathLike,
                        adapter_dir: str | os.PathLike | None = None,
                        eval_report: str | os.PathLike | None = None, gated: bool = False,
                        random_weights: bool = False, repo_id: str = "user/ehr-prs", seed: int = 0,
                        notes: list[str] | None = None, overwrite: bool = False) -> Path:
    """Write exactly the folder `ehr-prs push` uploads and return its path.

    Layout: config.json, model.safetensors (or index + shards), the remote-code *.py files,
    tokenizer_config.json + ehr_vocab.json, prs_standardizer.json, training_summary.json (paths
    redacted), generation_config.json, README.md (model card) and, with an adapter,
    adapter/{adapter_config.json, adapter_model.safetensors, finetune_summary.json}. Anything else
    in the source folders is skipped; what was skipped and why is appended to `notes`. An existing
    `out_dir` is replaced only with `overwrite`, never when it overlaps the model, adapter or report.
    """
    notes = notes if notes is not None else []
    model, out = Path(model_dir), Path(out_dir)
    # first, before reading anything: the upload folder must not overlap a source nor replace a folder silently
    _safe_target(out, {"--model": model, "--adapter": adapter_dir, "--eval-report": eval_report}, overwrite)
    if random_weights and adapter_dir is not None:
        raise InputError("--random-weights publishes an untrained twin of the base model; drop --adapter (an adapter "
                         "holds trained weights).")
    if random_weights and eval_report is not None:
        raise InputError("--eval-report describes trained weights; a --random-weights twin has none. Drop one flag.")
    if "/" not in repo_id or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise InputError(f"--repo-id {repo_id!r}: expected 'user-or-org/name'.")
    kinds = model_files(model)
    adapter = Path(adapter_dir) if adapter_dir is not None else None
    adapter_shapes = check_adapter(adapter, model) if adapter is not None else None
    metrics, task = None, ""
    if eval_report is not None:
        report = Path(eval_report)
        path = report / "metrics.json" if report.is_dir() else report
        if not path.is_file():
            raise InputError(f"--eval-report {report}: no metrics.json; give the --out folder of `ehr-prs evaluate`.")
        metrics = _read_json(path)
        if "models" not in metrics:
            raise InputError(f"--eval-report {path}: no 'models' key; not a metrics.json from `ehr-prs evaluate`.")
        task = path.parent.name

    copied = set(kinds["json"] + kinds["code"] + kinds["weights"])
    for p in sorted(model.iterdir()):
        if p.name in copied:
            continue
        why = "pickle: never shared" if p.name.endswith(PICKLE_SUFFIXES) else (
            "a folder: checkpoints are not shared" if p.is_dir() else "not on the allow-list")
        notes.append(f"skipped {p} ({why})")

    with atomic_output_dir(out, overwrite, flag="--dry-run") as tmp:
        summaries: dict[str, dict] = {}
        for name in kinds["json"]:
            if random_weights and name == "training_summary.json":
                notes.append("skipped training_summary.json (it describes trained weights, not this random twin)")
                continue
            obj = _read_json(model / name)
            _check_no_subject_ids(obj, model / name)
            if name == "tokenizer_config.json":
                obj = {k: v for k, v in obj.items() if k not in LOAD_TIME_KEYS}
            elif name in SUMMARY_FILES:
                obj, n = _redact_paths(obj)
                summaries[name] = obj
                if n:
                    notes.append(f"{name}: {n} local path(s) reduced to their last component")
            else:  # unchanged: byte for byte
                shutil.copy(model / name, tmp / name)
                continue
            (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        for name in kinds["code"]:
            shutil.copy(model / name, tmp / name)
        if random_weights:
            weights = _write_random_weights(model, tmp, seed)
        else:
            weights = kinds["weights"]
            for name in tqdm(weights, desc="copying weights", unit="file", disable=len(weights) < 3):
                shutil.copy(model / name, tmp / name)
        shapes = _tensor_shapes([tmp / w for w in weights if w.endswith(".safetensors")])
        n_params = sum(math.prod(s) for s in shapes.values())

        adapter_info = None
        if adapter is not None:
            (tmp / ADAPTER_SUBFOLDER).mkdir()
            cfg = _read_json(adapter / "adapter_config.json")
            _check_no_subject_ids(cfg, adapter / "adapter_config.json")
            # On the Hub the base is this very repository, not the fine-tuner's local folder.
            cfg["base_model_name_or_path"] = repo_id
            (tmp / ADAPTER_SUBFOLDER / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
            shutil.copy(adapter / "adapter_model.safetensors", tmp / ADAPTER_SUBFOLDER / "adapter_model.safetensors")
            ft_summary = None
            if (adapter / "finetune_summary.json").is_file():
                ft_summary, n = _redact_paths(_read_json(adapter / "finetune_summary.json"))
                _check_no_subject_ids(ft_summary, adapter / "finetune_summary.json")
                (tmp / ADAPTER_SUBFOLDER / "finetune_summary.json").write_text(json.dumps(ft_summary, indent=2) + "\n")
            for p in sorted(adapter.iterdir()):
                if p.name not in (*ADAPTER_FILES, *OPTIONAL_ADAPTER_FILES):
                    why = "pickle: never shared" if p.name.endswith(PICKLE_SUFFIXES) else "not on the allow-list"
                    notes.append(f"skipped {p} ({why})")
            adapter_info = (cfg, adapter_shapes, ft_summary)

        files = sorted((str(p.relative_to(tmp)), p.stat().st_size) for p in tmp.rglob("*") if p.is_file())
        files.append(("README.md", None))  # this card: its own size is not known before it is written
        min_subjects = _read_json(model / "ehr_vocab.json").get("min_subjects")
        if not isinstance(min_subjects, int) or min_subjects < MIN_SUBJECTS:
            notes.append(f"ehr_vocab.json: min_subjects is {min_subjects}; health-data rules (All of Us) need "
                         f">= {MIN_SUBJECTS} before weights trained on real data are shared (fine for simulated data)")
        card = render_card(repo_id, _read_json(tmp / "config.json"), n_params, files,
                           training_summary=summaries.get("training_summary.json"), adapter=adapter_info,
                           finetune_summary=summaries.get("finetune_summary.json"),
                           metrics=metrics, task=task, gated=gated, random_weights=random_weights,
                           min_subjects=min_subjects)
        card.save(tmp / "README.md")
    return out


# ----------------------------------------------------------------------------------------
# Upload
# ----------------------------------------------------------------------------------------

def _network_errors() -> tuple[type[BaseException], ...]:
    """OSError covers huggingface_hub's HTTP and offline errors; the HTTP client's own transport errors too."""
    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(__import__(name).HTTPError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def upload_folder(folder: str | os.PathLike, repo_id: str, private: bool = False, gated: bool = False,
                  token: str | None = None) -> str:
    """Create the repository (if needed), upload `folder` and, with `gated`, turn on manual access approval."""
    from huggingface_hub import HfApi, get_token

    token = token or get_token()
    if not token:
        raise InputError(f"no Hugging Face token: run `hf auth login` (or `huggingface-cli login` with older clients) "
                         f"or set HF_TOKEN, then retry. The upload folder is ready at {folder}.")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        if gated:  # before the files land, so there is no moment where the weights are open
            api.update_repo_settings(repo_id, gated="manual")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="ehr-prs push")
    except _network_errors() as err:
        raise InputError(f"upload to {repo_id} failed: {err}. Check the network, that your token (`hf auth login` "
                         f"or HF_TOKEN) may write to that namespace, and retry. The folder is ready at {folder}."
                         ) from err
    return str(url)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="final folder written by `ehr-prs pretrain`")
    parser.add_argument("--repo-id", required=True, help="Hub repository, user-or-org/name")
    parser.add_argument("--adapter", default=None, help="PEFT adapter folder (ehr-prs finetune); goes under adapter/")
    parser.add_argument("--private", action="store_true", help="create a private repository")
    parser.add_argument("--gated", action="store_true",
                        help="access requests, manual approval; the card asks for institution and data-use agreement")
    parser.add_argument("--random-weights", action="store_true",
                        help="upload a same-shape, randomly initialised twin (pipeline testing), clearly labelled")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --random-weights initialisation")
    parser.add_argument("--eval-report", default=None, help="folder of `ehr-prs evaluate` (metrics.json) for the card")
    parser.add_argument("--dry-run", default=None, metavar="FOLDER",
                        help="build the upload folder here and stop (nothing is uploaded)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --dry-run folder (never one that overlaps --model/--adapter)")


def run(args: argparse.Namespace) -> None:
    notes: list[str] = []
    target = Path(args.dry_run) if args.dry_run else Path(tempfile.mkdtemp(prefix="ehr-prs-push-")) / "upload"
    folder = build_upload_folder(args.model, target, adapter_dir=args.adapter, eval_report=args.eval_report,
                                 gated=args.gated, random_weights=args.random_weights, repo_id=args.repo_id,
                                 seed=args.seed, notes=notes, overwrite=args.overwrite)
    for note in notes:
        print(f"  note: {note}")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    if not (args.gated or args.private or args.random_weights):
        print("  warning: trained weights go to a public, ungated repository; health-data agreements usually "
              "require --gated or --private.")
    verb = "would upload" if args.dry_run else "uploading"
    print(f"{verb} {len(files)} files ({total / 1e6:.2f} MB) to {args.repo_id}"
          f"{' (private)' if args.private else ''}{' (gated, manual approval)' if args.gated else ''}:")
    for p in files:
        print(f"  {p.relative_to(folder)}  {p.stat().st_size:,} bytes")
    if args.dry_run:
        print(f"wrote {folder} (dry run: nothing uploaded)")
        return
    url = upload_folder(folder, args.repo_id, private=args.private, gated=args.gated)
    shutil.rmtree(folder.parent, ignore_errors=True)  # only after a successful upload
    print(f"uploaded {len(files)} files to {url}")
