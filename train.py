"""Pretrain the EHR(+PRS) causal LM on the output of `ehr-prs tokenize`.

    python train.py --data runs/tok --output-dir runs/ehr_prefix --preset small --prs-fusion prefix --max-steps 2000
    ehr-prs pretrain --data runs/tok --output-dir runs/ehr_prefix --preset small      (same flags)
    accelerate launch --config_file configs/cpu_2proc.yaml train.py --data runs/tok ...   (2 processes on CPU)
    accelerate launch --config_file configs/fsdp.yaml train.py --preset paper ...          (multi-GPU, see README)
    python train.py my_run.yaml                                                             (flags from a YAML file)

The paper's second route, adding PRS to an EHR-only model:

    python train.py --data runs/tok --output-dir runs/ehr_xattn --prs-fusion cross_attention \
        --init-from runs/ehr_only [--freeze-backbone]

The recipe, top to bottom: read the tokenized data -> build (or extend) the model -> Trainer
with a padding collator that carries `prs`/`prs_mask` -> train (resumable) -> write a
self-contained folder: config, safetensors weights, tokenizer, PRS standardiser and a
training summary, loadable with `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

import modeling_ehr_prs  # noqa: F401  (registers the Auto classes)
from modeling_ehr_prs.collator import EhrPrsCollator
from modeling_ehr_prs.configuration_ehr_prs import PRESETS, PRS_FUSIONS, EhrPrsConfig
from modeling_ehr_prs.errors import InputError
from modeling_ehr_prs.modeling_ehr_prs import EhrPrsForCausalLM

STANDARDIZER_FILE = "prs_standardizer.json"
SUMMARY_FILE = "training_summary.json"


@dataclass
class PretrainArguments:
    """Flags of `python train.py` and `ehr-prs pretrain` (identical)."""

    data: str = field(metadata={"help": "Folder written by `ehr-prs tokenize` (tokenizer/, train/, tuning/)."})
    output_dir: str = field(metadata={"help": "Where checkpoints and the final self-contained model folder go."})
    preset: str = field(default="small", metadata={"help": f"Model size: one of {sorted(PRESETS)}."})
    prs_fusion: str = field(
        default="prefix",
        metadata={"help": "Genomic adapter: none (EHR-only), prefix, cross_attention or logit_bias (with "
                          "--init-from and --freeze-backbone, fitted in closed form: no gradient steps)."},
    )
    max_steps: int = field(default=1000, metadata={"help": "Optimizer steps to train for."})
    init_from: str | None = field(
        default=None,
        metadata={"help": "A pretrained checkpoint to continue from (e.g. EHR-only, adding a new genomic adapter)."},
    )
    freeze_backbone: bool = field(
        default=False, metadata={"help": "With --init-from: train only the genomic adapter, keep the decoder fixed."}
    )
    resume: bool = field(
        default=False, metadata={"help": "Continue from the last checkpoint in --output-dir (after a kill)."}
    )
    batch_size: int = field(default=16, metadata={"help": "Sequences per device per step."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate (cosine decay)."})
    warmup_steps: int = field(default=100, metadata={"help": "Linear warm-up steps."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay."})
    max_seq_length: int | None = field(
        default=None,
        metadata={"help": "Tokens per training sequence (most recent kept); default: the model's context."},
    )
    prs_dropout: float | None = field(
        default=None,
        metadata={"help": "Probability of hiding a subject's PRS in training (default: the preset's)."},
    )
    eval_steps: int = field(default=200, metadata={"help": "Evaluate the tuning-split loss every N steps."})
    save_steps: int = field(default=200, metadata={"help": "Write a resumable checkpoint every N steps."})
    save_total_limit: int = field(default=2, metadata={"help": "Checkpoints kept on disk."})
    logging_steps: int = field(default=20, metadata={"help": "Log loss and tokens/s every N steps."})
    max_eval_samples: int | None = field(
        default=2000, metadata={"help": "Cap on tuning-split sequences per evaluation (keeps eval cheap)."}
    )
    seed: int = field(default=0, metadata={"help": "Random seed (model init, data order, PRS dropout)."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision (default: on when a GPU supports it)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for memory (large presets)."})
    torch_compile: bool = field(default=False, metadata={"help": "torch.compile the model (~20% faster after warm-up)."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "Data loader worker processes."})
    report_to: str = field(default="none", metadata={"help": "Trainer loggers: none, tensorboard, wandb, ..."})
    tte_families: int = field(
        default=0,
        metadata={"help": "Time-to-event head: predict the first later occurrence of the N most common code families "
                          "(those first seen in at least 20 training subjects) from every position, jointly with the "
                          "LM loss (MOTOR style); 0 = no head. Enables `ehr-prs risk --method hazard`."},
    )
    tte_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the TTE loss beside the LM loss."})
    tte_rank: int = field(default=32, metadata={"help": "Rank of the TTE head (hidden -> bins x rank x families)."})
    tte_prs_rank: int = field(
        default=8, metadata={"help": "Rank of the PRS -> log-hazard shift of the TTE head (models that read the PRS)."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Comma-separated config edits on top of the preset, e.g. 'hidden_size=128,num_hidden_layers=2'; "
                          "with --init-from only the adapter's fields (e.g. 'prs_cross_attention_layers=[3]')."},
    )


# ----------------------------------------------------------------------------- data


def load_tokenized(data_dir: Path):
    """Open the tokenizer, PRS standardiser and train/tuning splits that `ehr-prs tokenize` wrote."""
    from datasets import load_from_disk

    from tokenizer import EhrTokenizer

    tok_dir = data_dir / "tokenizer"
    if not (tok_dir.is_dir() and (data_dir / "train").is_dir()):
        raise InputError(
            f"--data {data_dir} is not a folder written by `ehr-prs tokenize`: expected {tok_dir}/ and "
            f"{data_dir / 'train'}/ (run `ehr-prs tokenize --meds DIR --out {data_dir}` first)"
        )
    tokenizer = EhrTokenizer.from_pretrained(str(tok_dir))
    train = load_from_disk(str(data_dir / "train"))
    tuning = load_from_disk(str(data_dir / "tuning")) if (data_dir / "tuning").is_dir() else None
    for name in ("input_ids", "prs", "prs_mask"):
        if name not in train.column_names:
            raise InputError(f"{data_dir / 'train'} has no column {name!r}; re-run `ehr-prs tokenize` with this version")
    if len(train) == 0:
        raise InputError(f"{data_dir / 'train'} has no rows; the MEDS train split is empty")
    return tokenizer, train, tuning


def n_prs_of(dataset) -> int:
    """Width of the PRS vector in a tokenized split (0 for an EHR-only dataset)."""
    return len(dataset[0]["prs"])


# ----------------------------------------------------------------------------- model


def parse_overrides(text: str | None) -> dict:
    """'hidden_size=128,prs_tokens=4' -> {'hidden_size': 128, 'prs_tokens': 4} (JSON values)."""
    out = {}
    for item in filter(None, re.split(r",(?![^\[]*\])", text or "")):  # commas inside [..] belong to a list
        if "=" not in item:
            raise InputError(f"--config-overrides item {item!r} is not key=value")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


# Config fields of the genomic adapter: with --init-from they are the only ones --config-overrides may set.
ADAPTER_FIELDS = ("prs_tokens", "prs_adapter_hidden_size", "prs_cross_attention_layers", "prs_dropout",
                  "prs_centered", "prs_logit_bias_rank")
# Fields of the time-to-event head: --init-from may add a head to a checkpoint without one.
TTE_FIELDS = ("tte_families", "tte_loss_weight", "tte_rank", "tte_prs_rank", "tte_time_bins", "tte_max_positions")


def choose_tte_families(tokenizer, train_ds, cap: int) -> list[str]:
    """The code families of the TTE head: first seen in >= 20 training subjects, the `cap` most common."""
    from modeling_ehr_prs.time_to_event import MIN_SUBJECTS, choose_families

    records = (row for batch in train_ds.select_columns(["input_ids"]).iter(batch_size=1024) for row in batch["input_ids"])
    families = choose_families(tokenizer, records, MIN_SUBJECTS, cap)
    if not families:
        raise InputError(f"--tte-families {cap}: no code family is seen in {MIN_SUBJECTS} or more training subjects")
    print(f"time-to-event head over {len(families)} code families (of those in >= {MIN_SUBJECTS} training subjects)",
          file=sys.stderr)
    return families


def build_model(args: PretrainArguments, tokenizer, n_prs: int, max_seq_length: int,
                train_ds=None) -> EhrPrsForCausalLM:
    """A fresh model from a preset, or a checkpoint extended to this run's genomic adapter."""
    requested = parse_overrides(args.config_overrides)
    overrides = {**requested}
    overrides.update(
        vocab_size=len(tokenizer),
        n_prs=n_prs,
        prs_fusion=args.prs_fusion,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if args.prs_dropout is not None:
        overrides["prs_dropout"] = args.prs_dropout
    if args.tte_families:
        overrides.update(tte_families=choose_tte_families(tokenizer, train_ds, args.tte_families),
                         tte_loss_weight=args.tte_loss_weight, tte_rank=args.tte_rank, tte_prs_rank=args.tte_prs_rank)
    if args.init_from is None:
        if args.preset not in PRESETS:
            raise InputError(f"--preset {args.preset!r} is not one of {sorted(PRESETS)}")
        config = EhrPrsConfig.from_preset(args.preset, **overrides)
        if config.max_position_embeddings < max_seq_length:
            config.max_position_embeddings = max_seq_length
        return EhrPrsForCausalLM(config)

    # --init-from: the checkpoint fixes the decoder's shape; only the adapter may change.
    base = EhrPrsConfig.from_pretrained(args.init_from)
    if base.vocab_size != len(tokenizer):
        raise InputError(
            f"--init-from {args.init_from} has vocab_size {base.vocab_size} but the tokenizer in --data has "
            f"{len(tokenizer)} tokens: continue from a checkpoint trained on the same tokenizer"
        )
    config_dict = base.to_dict()
    # The adapter is new, so its shape may be set here; the decoder's comes from the checkpoint.
    clash = sorted(f"{k}={v} (checkpoint: {config_dict.get(k)})" for k, v in requested.items()
                   if k not in ADAPTER_FIELDS + TTE_FIELDS and config_dict.get(k) != v)
    if clash:
        raise InputError(
            f"--config-overrides {', '.join(clash)} with --init-from {args.init_from}: the checkpoint fixes the "
            f"decoder; only the new adapter's fields ({', '.join(ADAPTER_FIELDS)}) may differ from it"
        )
    for key in ("vocab_size", "n_prs", "prs_fusion", *ADAPTER_FIELDS, *TTE_FIELDS):
        if key in overrides:
            config_dict[key] = overrides[key]
    config = EhrPrsConfig(**{k: v for k, v in config_dict.items() if k not in ("architectures", "auto_map")})
    model, info = EhrPrsForCausalLM.from_pretrained(args.init_from, config=config, output_loading_info=True)
    unexpected = [k for k in info["unexpected_keys"]]
    mismatched = info.get("mismatched_keys", [])
    if mismatched:
        raise InputError(f"--init-from {args.init_from}: weights of another shape: {mismatched[:5]}")
    new = [k for k in info["missing_keys"] if "prs" not in k and "tte_head" not in k]
    if new:
        raise InputError(
            f"--init-from {args.init_from} lacks decoder weights {new[:5]}: it is not an ehr-prs causal LM "
            f"of this shape"
        )
    if unexpected and args.prs_fusion != "none":
        print(f"note: ignoring {len(unexpected)} weights of the checkpoint's old adapter", file=sys.stderr)
    if args.freeze_backbone:
        if args.prs_fusion == "none":
            raise InputError("--freeze-backbone with --prs-fusion none would train nothing")
        for name, param in model.named_parameters():
            param.requires_grad = "prs" in name
    return model


def tte_collator_fields(config, tokenizer) -> dict:
    """EhrPrsCollator fields that make it build time-to-event targets, for a model with a TTE head."""
    if not config.has_tte_head:
        return {}
    from modeling_ehr_prs.time_to_event import family_of_token

    return dict(token_days=tokenizer.token_days, tte_family_of_token=family_of_token(tokenizer, config.tte_families),
                tte_max_positions=config.tte_max_positions)


# ----------------------------------------------------------------------------- logging


class TokensPerSecond(TrainerCallback):
    """Adds tokens/s (non-padding, all processes) to every log line."""

    def __init__(self):
        self.start = None
        self.start_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.start_tokens = time.perf_counter(), state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.start is not None:
            elapsed = time.perf_counter() - self.start
            logs["tokens_per_second"] = round((state.num_input_tokens_seen - self.start_tokens) / max(elapsed, 1e-9), 1)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> PretrainArguments:
    parser = HfArgumentParser(PretrainArguments, prog="train.py", description=__doc__.split("\n")[0])
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        (args,) = parser.parse_yaml_file(argv[0])
    else:
        (args,) = parser.parse_args_into_dataclasses(args=argv)
    return args


def train(args: PretrainArguments, callbacks: list[TrainerCallback] | None = None) -> Path:
    """Run the recipe; return the folder holding the final model."""
    data_dir, out_dir = Path(args.data), Path(args.output_dir)
    if args.prs_fusion not in PRS_FUSIONS:
        raise InputError(f"--prs-fusion {args.prs_fusion!r}: choose one of {', '.join(PRS_FUSIONS)}")
    tokenizer, train_ds, tuning_ds = load_tokenized(data_dir)
    n_prs = n_prs_of(train_ds)
    if args.prs_fusion != "none" and n_prs == 0:
        raise InputError(
            f"--prs-fusion {args.prs_fusion} but {data_dir} was tokenized without --prs: "
            "re-tokenize with a PRS table or use --prs-fusion none"
        )
    if args.resume and not any(out_dir.glob("checkpoint-*")):
        raise InputError(f"--resume: no checkpoint-* folder in {out_dir} to continue from")

    preset_ctx = PRESETS.get(args.preset, {}).get("max_position_embeddings", 512)
    max_seq_length = args.max_seq_length or preset_ctx
    torch.manual_seed(args.seed)
    model = build_model(args, tokenizer, n_prs, max_seq_length, train_ds)
    if args.prs_fusion == "prefix":
        # The prefix occupies positions too: leave room for it inside the context.
        max_seq_length = min(max_seq_length, model.config.max_position_embeddings - model.config.prs_tokens)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()

    full_tuning = tuning_ds  # the logit-bias fit selects its penalty on all of it
    if tuning_ds is not None and args.max_eval_samples and len(tuning_ds) > args.max_eval_samples:
        tuning_ds = tuning_ds.shuffle(seed=args.seed).select(range(args.max_eval_samples))
    keep = ["input_ids", "prs", "prs_mask", "length"]
    train_ds = train_ds.remove_columns([c for c in train_ds.column_names if c not in keep])
    if tuning_ds is not None:
        tuning_ds = tuning_ds.remove_columns([c for c in tuning_ds.column_names if c not in keep])

    use_bf16 = args.bf16 if args.bf16 is not None else (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    training_args = TrainingArguments(
        output_dir=str(out_dir),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        eval_strategy="steps" if tuning_ds is not None else "no",
        eval_steps=args.eval_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        seed=args.seed,
        data_seed=args.seed,
        bf16=use_bf16,
        torch_compile=args.torch_compile,
        dataloader_num_workers=args.dataloader_num_workers,
        # prs/prs_mask are named in forward(), but `length` is not: keep every column and let
        # the collator pick what the model takes.
        remove_unused_columns=False,
        label_names=["labels"],
        train_sampling_strategy="group_by_length",
        length_column_name="length",
        include_num_input_tokens_seen="non_padding",
        report_to=args.report_to,
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=args.prs_fusion != "none" or None,
    )
    collator = EhrPrsCollator(pad_token_id=tokenizer.pad_token_id, max_length=max_seq_length,
                              **tte_collator_fields(model.config, tokenizer))
    trainer = Trainer(
        model=model,
        args=training_args,
        data_collator=collator,
        train_dataset=train_ds,
        eval_dataset=tuning_ds,
        processing_class=tokenizer,
        callbacks=[TokensPerSecond(), *(callbacks or [])],
    )
    t0 = time.perf_counter()
    fit_report = None
    if args.prs_fusion == "logit_bias" and args.freeze_backbone:
        # On a frozen decoder the logit-bias adapter is a regression with a direct solution.
        from modeling_ehr_prs.prs_bias import fit_logit_bias

        std = data_dir / "tokenizer" / STANDARDIZER_FILE
        columns = json.loads(std.read_text()).get("columns") if std.exists() else None
        fit_report = fit_logit_bias(model, tokenizer, train_ds, full_tuning, batch_size=args.batch_size,
                                    max_length=max_seq_length, prs_columns=columns, seed=args.seed)
        result = None
    else:
        result = trainer.train(resume_from_checkpoint=True if args.resume else None)
    elapsed = time.perf_counter() - t0
    eval_metrics = trainer.evaluate() if tuning_ds is not None else {}

    trainer.save_model(str(out_dir))  # every process calls it (distributed saving); rank 0 writes
    if trainer.is_world_process_zero():
        write_final_folder(trainer, tokenizer, args, data_dir, out_dir, result, eval_metrics, elapsed, fit_report)
    return out_dir


def write_final_folder(trainer, tokenizer, args, data_dir, out_dir, result, eval_metrics, elapsed,
                       fit_report: dict | None = None) -> None:
    """Config + safetensors + tokenizer + PRS standardiser + summary: one folder that loads alone."""
    tokenizer.save_pretrained(str(out_dir))
    # Trainer pickles its arguments next to the weights; a model folder we share holds none.
    (out_dir / "training_args.bin").unlink(missing_ok=True)
    std = data_dir / "tokenizer" / STANDARDIZER_FILE
    if std.exists():
        shutil.copy(std, out_dir / STANDARDIZER_FILE)
    history = [h for h in trainer.state.log_history if "loss" in h]
    tokens = trainer.state.num_input_tokens_seen
    summary = {
        "preset": args.preset,
        "prs_fusion": args.prs_fusion,
        "init_from": args.init_from,
        "steps": trainer.state.global_step,
        "tokens_seen": int(tokens),
        "train_seconds": round(elapsed, 1),
        "tokens_per_second": round(tokens / max(elapsed, 1e-9), 1),
        "final_train_loss": history[-1]["loss"] if history else None,
        "mean_train_loss": result.training_loss if result is not None else None,
        "final_eval_loss": eval_metrics.get("eval_loss"),
        "eval_perplexity": math.exp(eval_metrics["eval_loss"]) if "eval_loss" in eval_metrics else None,
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "world_size": trainer.args.world_size,
        "args": asdict(args),
    }
    if fit_report is not None:
        summary["logit_bias_fit"] = fit_report
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    if fit_report is not None:
        gains = {p["lambda"]: p.get("tuning_gain_nats") for p in fit_report.get("penalty_path", [])}
        top = [f"{f['family']} {f['tuning_gain_nats']}" for f in fit_report.get("families", [])[:5]]
        print(f"logit_bias fitted in closed form on {fit_report['genotyped_train_sequences']:,} genotyped sequences, "
              f"{fit_report['families_fitted']} code families; tuning log-likelihood gain (nats) by penalty {gains}, "
              f"chosen {fit_report['chosen_lambda']}; refitted per family: {fit_report.get('families_with_an_effect')} "
              f"families with an effect, largest gains: {', '.join(top)}"
              + (f"; {fit_report['note']}" if "note" in fit_report else ""))
    print(
        f"wrote {out_dir}: {summary['steps']} steps, {summary['tokens_seen']:,} tokens at "
        f"{summary['tokens_per_second']:,.0f} tokens/s, final train loss {summary['final_train_loss']}, "
        f"tuning loss {summary['final_eval_loss']}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except InputError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
