"""Pretrain the EHR(+PRS) causal LM on the output of `ehr-prs tokenize`.

    python train.py --data runs/tok --output-dir runs/ehr_prefix --preset small --prs-fusion prefix --max-steps 2000
    ehr-prs pretrain --data runs/tok --output-dir runs/ehr_prefix --preset small      (same flags)
    accelerate launch --config_file configs/cpu_2proc.yaml train.py --data runs/tok ...   (2 processes on CPU)
    accelerate launch --config_file configs/fsdp.yaml train.py --preset paper ...          (multi-GPU, see docs/methods.md)
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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ehr_prs.errors import InputError, input_errors, check_output
from ehr_prs.privacy import MIN_SUBJECTS
from ehr_prs.sharded import close_process_group
from ehr_prs.recipes.flags import parse_flags

# torch, transformers and the model (modeling_ehr_prs, whose import registers the Auto classes) are
# imported inside the functions that use them: the flags (`ehr-prs pretrain --help`, `python train.py
# --help`) and the helpers other stages reuse do not pay ~6 s of imports.
if TYPE_CHECKING:
    from transformers import Trainer, TrainerCallback

    from modeling_ehr_prs.modeling_ehr_prs import EhrPrsForCausalLM

# The names of modeling_ehr_prs.PRESETS, for --help without importing the model (tests/test_layout.py
# checks that they agree).
PRESET_NAMES = ("paper", "small", "tiny")

STANDARDIZER_FILE = "prs_standardizer.json"
SUMMARY_FILE = "training_summary.json"


@dataclass
class PretrainArguments:
    """Flags of `python train.py` and `ehr-prs pretrain` (identical)."""

    data: str = field(metadata={"help": "Folder written by `ehr-prs tokenize` (tokenizer/, train/, tuning/)."})
    output_dir: str = field(metadata={"help": "Where checkpoints and the final self-contained model folder go."})
    preset: str = field(default="small", metadata={"help": f"Model size: one of {sorted(PRESET_NAMES)}."})
    prs_fusion: str = field(
        default="auto",
        metadata={"help": "Genomic adapter: none (EHR-only), prefix, cross_attention or logit_bias (with "
                          "--init-from and --freeze-backbone: a deprecated alias of `ehr-prs fit-logit-bias`, "
                          "fitted in closed form). "
                          "Default auto: prefix when --data was tokenized with --prs, none when not (with "
                          "--init-from, the checkpoint's adapter)."},
    )
    max_steps: int = field(default=1000, metadata={"help": "Optimizer steps to train for."})
    init_from: str | None = field(
        default=None,
        metadata={"help": "A pretrained checkpoint to continue from (e.g. EHR-only, adding a new genomic adapter)."},
    )
    freeze_backbone: bool = field(
        default=False, metadata={"help": "With --init-from: train only the genomic adapter, keep the decoder fixed "
                                         "(the logit_bias adapter: `ehr-prs fit-logit-bias` instead)."}
    )
    resume: bool = field(
        default=False,
        metadata={"help": "Continue from the newest complete checkpoint in --output-dir (after a kill); "
                          "a checkpoint the kill cut short is skipped with a warning."},
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Delete what --output-dir holds (an earlier run's checkpoints and model, or other "
                          "files) and start over. Never allowed when --output-dir is, holds or lies inside "
                          "--data or --init-from."},
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
    torch_compile: bool = field(default=False, metadata={"help": "torch.compile the model (~20%% faster after warm-up)."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "Data loader worker processes."})
    report_to: str = field(default="none", metadata={"help": "Trainer loggers: none, tensorboard, wandb, ..."})
    tte_families: int = field(
        default=0,
        metadata={"help": "Time-to-event head: predict the first later occurrence of the N most common code families "
                          f"(those first seen in at least {MIN_SUBJECTS} training subjects) from every position, jointly "
                          "with the LM loss (MOTOR style); 0 = no head. Enables `ehr-prs risk --method hazard`."},
    )
    tte_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the TTE loss beside the LM loss."})
    tte_rank: int = field(default=32, metadata={"help": "Rank of the TTE head (hidden -> bins x rank x families)."})
    tte_prs_rank: int = field(
        default=8, metadata={"help": "Rank of the PRS -> log-hazard shift of the TTE head (models that read the PRS)."}
    )
    tte_history_summary: bool = field(
        default=False, metadata={"help": "The TTE head also reads the mean hidden state of the history so far."}
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

    from ehr_prs.tokenizer import EhrTokenizer

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


def resolve_prs_fusion(args: PretrainArguments, n_prs: int, data_dir: Path) -> str:
    """The genomic adapter this run trains: --prs-fusion as given, or for `auto` what the data allows.

    `auto` (the default) makes `--prs` optional end to end: data tokenized without a PRS table gives
    an EHR-only model (none), data with one a prefix model; with --init-from, a checkpoint that
    already has an adapter keeps its kind. The choice is printed, so a log says what was trained.
    """
    from modeling_ehr_prs.configuration_ehr_prs import PRS_FUSIONS

    fusion = args.prs_fusion
    if fusion != "auto" and fusion not in PRS_FUSIONS:
        raise InputError(f"--prs-fusion {fusion!r}: choose auto or one of {', '.join(PRS_FUSIONS)}")
    retokenize = "`ehr-prs tokenize --meds DIR --prs PRS_TABLE --out NEW_DIR`, then pass --data NEW_DIR"
    init_fusion = None
    if args.init_from is not None and (Path(args.init_from) / "config.json").is_file():
        init_fusion = json.loads((Path(args.init_from) / "config.json").read_text()).get("prs_fusion") or "none"
    if fusion != "auto":
        if fusion != "none" and n_prs == 0:
            raise InputError(
                f"--prs-fusion {fusion} needs polygenic scores, but --data {data_dir} was tokenized without --prs. "
                f"Add a PRS table ({retokenize}), or pass --prs-fusion none (or auto, the default) for an "
                f"EHR-only model"
            )
        return fusion
    if n_prs == 0:
        if init_fusion not in (None, "none"):
            raise InputError(
                f"--init-from {args.init_from} has a genomic adapter (prs_fusion {init_fusion}) but --data "
                f"{data_dir} was tokenized without --prs: add the PRS table ({retokenize}) to keep training it, "
                f"or pass --prs-fusion none to continue its EHR part only"
            )
        fusion, why = "none", f"{data_dir} was tokenized without --prs: an EHR-only model"
    elif init_fusion not in (None, "none"):
        fusion, why = init_fusion, f"the adapter of --init-from {args.init_from}"
    else:
        fusion, why = "prefix", f"{data_dir} holds {n_prs} PRS columns"
    print(f"note: --prs-fusion auto -> {fusion} ({why}); pass --prs-fusion to choose another", file=sys.stderr)
    return fusion


# ----------------------------------------------------------------------------- output folder and checkpoints

CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")  # Trainer's PREFIX_CHECKPOINT_DIR-<global step>


def checkpoints_in(out_dir: Path) -> list[Path]:
    """Trainer's checkpoint-N folders in `out_dir`, oldest step first."""
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.iterdir() if p.is_dir() and CHECKPOINT_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_DIR.match(p.name).group(1)))


def check_output_dir(args: PretrainArguments, out_dir: Path) -> bool:
    """Refuse an --output-dir this run would damage; True when --overwrite must empty it (`clear_output_dir`).

    - one that is, holds or lies inside --data or --init-from: always refused (even --overwrite);
    - an earlier run's checkpoints: continued with --resume, deleted only with --overwrite (a rerun
      after a kill must not lose them because --resume was forgotten);
    - anything else there (a finished model, unrelated files): replaced only with --overwrite.
    An empty folder holds nothing to lose and is used as it is. Nothing is deleted here: the
    inputs are checked first, so a mistyped --data does not cost the earlier run.
    """
    check_output(out_dir, {"--data": args.data, "--init-from": args.init_from}, overwrite=True, flag="--output-dir")
    if args.resume and args.overwrite:
        raise InputError("--resume continues the run in --output-dir and --overwrite deletes it: pass one of them")
    checkpoints = checkpoints_in(out_dir)
    if args.resume:
        if not checkpoints:
            raise InputError(f"--resume: no checkpoint-* folder in {out_dir} to continue from "
                             "(drop --resume to start a new run)")
        return False
    if not (out_dir.is_symlink() or (out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())))):
        return False
    if args.overwrite:
        return True
    if checkpoints:
        names = ", ".join(p.name for p in checkpoints)
        raise InputError(
            f"--output-dir {out_dir} holds checkpoints of an earlier run ({names}): pass --resume to continue "
            f"it, or --overwrite to delete them and start over (or choose another --output-dir)"
        )
    if (out_dir / SUMMARY_FILE).is_file():
        raise InputError(f"--output-dir {out_dir} holds a model of an earlier run ({SUMMARY_FILE}): pass "
                         f"--overwrite to replace it, or choose another --output-dir")
    what = "a folder with files in it" if out_dir.is_dir() else "a file"
    raise InputError(f"--output-dir {out_dir} already exists ({what}, not a run of this recipe): pass "
                     f"--overwrite to replace it, or choose another --output-dir")


def clear_output_dir(out_dir: Path) -> None:
    """--overwrite: delete what --output-dir holds (check_output_dir has ruled out the inputs)."""
    if int(os.environ.get("RANK", "0")) != 0:  # one process deletes; the others write nothing before its first save
        return
    if out_dir.is_symlink() or not out_dir.is_dir():
        out_dir.unlink()  # a link is removed, never the folder it points to
    else:
        shutil.rmtree(out_dir)
    print(f"note: --overwrite: deleted the earlier contents of {out_dir}", file=sys.stderr)


def resume_checkpoint(out_dir: Path) -> Path:
    """The newest complete checkpoint in `out_dir`, warning about each newer one that is incomplete.

    A kill during a save leaves a checkpoint without trainer_state.json (or with a truncated file):
    Trainer's own `resume_from_checkpoint=True` would take it and fail; the one before is intact.
    """
    from ehr_prs.checkpoints import checkpoint_problem

    skipped = []
    for folder in reversed(checkpoints_in(out_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            for name, why in skipped:
                print(f"warning: --resume: skipping the incomplete {name} ({why}); resuming from {folder.name}",
                      file=sys.stderr)
            return folder
        skipped.append((folder.name, problem))
    detail = "; ".join(f"{name}: {why}" for name, why in skipped)
    raise InputError(f"--resume: no complete checkpoint in {out_dir} ({detail}); pass --overwrite to start over")


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
TTE_FIELDS = ("tte_families", "tte_loss_weight", "tte_rank", "tte_prs_rank", "tte_time_bins", "tte_max_positions",
              "tte_history_summary")


def choose_tte_families(tokenizer, train_ds, cap: int) -> list[str]:
    """The code families of the TTE head: first seen in >= MIN_SUBJECTS training subjects, the `cap` most common."""
    from ehr_prs.time_to_event import choose_families

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
    from modeling_ehr_prs.configuration_ehr_prs import PRESETS, EhrPrsConfig
    from modeling_ehr_prs.modeling_ehr_prs import EhrPrsForCausalLM
    from ehr_prs.checkpoints import check_model_folder, load_checked

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
                         tte_loss_weight=args.tte_loss_weight, tte_rank=args.tte_rank, tte_prs_rank=args.tte_prs_rank,
                         tte_history_summary=args.tte_history_summary)
    if args.init_from is None:
        if args.preset not in PRESETS:
            raise InputError(f"--preset {args.preset!r} is not one of {sorted(PRESETS)}")
        config = EhrPrsConfig.from_preset(args.preset, **overrides)
        if config.max_position_embeddings < max_seq_length:
            config.max_position_embeddings = max_seq_length
        return EhrPrsForCausalLM(config)

    # --init-from: the checkpoint fixes the decoder's shape; only the adapter may change.
    check_model_folder(args.init_from, "--init-from")  # names a missing config or a truncated weights file
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
    model, info = load_checked(EhrPrsForCausalLM.from_pretrained, args.init_from, "--init-from", config=config,
                               output_loading_info=True)
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
        # The genomic adapters train, and the TTE head's PRS shift; a TTE head new to this checkpoint
        # trains whole (it has nothing to keep), one the checkpoint brought stays as it was.
        new_head = config.has_tte_head and not base.has_tte_head
        for name, param in model.named_parameters():
            param.requires_grad = ("prs" in name or "hazard_shift" in name
                                   or (new_head and name.startswith("tte_head.")))
    return model


def tte_collator_fields(config, tokenizer) -> dict:
    """EhrPrsCollator fields that make it build time-to-event targets, for a model with a TTE head."""
    if not config.has_tte_head:
        return {}
    from ehr_prs.time_to_event import family_of_token

    return dict(token_days=tokenizer.token_days, tte_family_of_token=family_of_token(tokenizer, config.tte_families),
                tte_max_positions=config.tte_max_positions)


# ----------------------------------------------------------------------------- logging


class TrainingDiverged(InputError):
    """The loss or the weights went NaN/inf: training stopped, and nothing non-finite was saved."""


def trainer_callbacks(args: PretrainArguments, out_dir: Path) -> list[TrainerCallback]:
    """The recipe's Trainer callbacks: tokens/s in every log line, and FiniteGuard (stops on NaN/inf).

    Defined where transformers is imported, so that importing this recipe (for its flags: `ehr-prs
    pretrain --help`) does not pay for it.
    """
    from transformers import TrainerCallback

    from ehr_prs.checkpoints import all_finite, checkpoint_problem, describe_nonfinite, nonfinite_tensors

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
                seen = state.num_input_tokens_seen - self.start_tokens
                logs["tokens_per_second"] = round(seen / max(elapsed, 1e-9), 1)

    class FiniteGuard(TrainerCallback):
        """Stops training with TrainingDiverged as soon as the loss or a weight is NaN/inf.

        A diverged run otherwise ends with exit 0 and a model whose every prediction is NaN. The
        weights are checked (one isfinite pass, one device sync) at every step that logs, evaluates or
        saves, before Trainer acts on it, so a checkpoint on disk always holds finite weights and the
        last good one survives; the logged training loss (unfiltered: see logging_nan_inf_filter) and
        the tuning loss are checked too. Raising inside Trainer leaves the final model unwritten.
        """

        def __init__(self, args: PretrainArguments, out_dir: Path):
            self.args, self.out_dir = args, out_dir

        def _fail(self, step: int, what: str) -> None:
            kept = [p for p in checkpoints_in(self.out_dir) if checkpoint_problem(p) is None]
            last = (f"the last good checkpoint, {kept[-1]}, is kept" if kept
                    else "no checkpoint had been saved before it")
            raise TrainingDiverged(
                f"training diverged at step {step}: {what}. Stopped without saving that state; {last}, and no final "
                f"model was written to {self.out_dir}. Lower --learning-rate ({self.args.learning_rate:g} now) or "
                f"raise --warmup-steps ({self.args.warmup_steps} now), then rerun with --overwrite"
            )

        def _check_weights(self, state, model) -> None:
            params = [p for _, p in model.named_parameters()]
            if not all_finite(params):
                bad = nonfinite_tensors(model.named_parameters())
                self._fail(state.global_step, f"the weights went non-finite: {describe_nonfinite(bad, len(params))}")

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self._check_weights(state, model)  # a resumed checkpoint from before this guard existed

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if control.should_log or control.should_evaluate or control.should_save or control.should_training_stop:
                self._check_weights(state, model)

        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(loss):
                self._fail(state.global_step, f"the training loss is {loss}")

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            loss = (metrics or {}).get("eval_loss")
            if loss is not None and not math.isfinite(loss):
                self._fail(state.global_step, f"the tuning loss is {loss}")

    return [TokensPerSecond(), FiniteGuard(args, out_dir)]


def trainer_class() -> type[Trainer]:
    """Trainer, saving a model that FSDP2 has sharded as the model's own class.

    FSDP2's `fully_shard` swaps the model's class for a subclass generated in torch
    (`FSDPEhrPrsForCausalLM`); `save_pretrained` would then copy torch's `_fsdp_*.py` into the folder
    instead of `modeling_ehr_prs.py` and write that class into config.json's auto_map, so the folder
    would not load as remote code. While rank 0 writes the full state dict it already gathered
    (save_pretrained takes no collective step then), the model is its own class again, and the tied
    LM head is written once, as a one-process run writes it.
    """
    from transformers import Trainer

    class EhrPrsTrainer(Trainer):
        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            import torch
            from torch.distributed.fsdp import FSDPModule

            model, sharded = self.model, type(self.model)
            if not isinstance(model, FSDPModule):
                return super()._save(output_dir, state_dict)
            # The gathered state dict holds tied weights as separate copies, which save_pretrained (it
            # finds ties by shared storage) would write twice: keep the source only, as a one-process run.
            if state_dict and getattr(model.config, "tie_word_embeddings", False):
                for target, source in (model._tied_weights_keys or {}).items():
                    if target in state_dict and source in state_dict and torch.equal(state_dict[target],
                                                                                     state_dict[source]):
                        del state_dict[target]
            model.__class__ = next(c for c in sharded.__mro__[1:] if not issubclass(c, FSDPModule))
            try:
                return super()._save(output_dir, state_dict)
            finally:
                model.__class__ = sharded

    return EhrPrsTrainer


def check_sharding(trainer: Trainer) -> None:
    """Refuse an FSDP launch that accelerate would quietly run as plain data parallel.

    accelerate (1.16) shards with FSDP only on accelerator devices: on CPU an FSDP config
    (`distributed_type: FSDP`) starts the processes, then each keeps a whole model and optimizer
    (DDP over gloo), which is not what the config asked for.
    """
    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if asked and not trainer.is_fsdp_enabled:
        raise InputError(
            "this run was launched with an FSDP accelerate config (distributed_type: FSDP, e.g. configs/fsdp.yaml), "
            "but accelerate shards models with FSDP only on GPUs (and other accelerators) and no GPU is visible: it "
            "would run plain data parallel instead. Launch CPU runs with configs/cpu_2proc.yaml, or FSDP on GPU nodes"
        )


def close_progress_bars(trainer: Trainer) -> None:
    """Close Trainer's tqdm bars, which an exception raised inside training leaves open mid-line."""
    for callback in trainer.callback_handler.callbacks:
        for name in ("training_bar", "prediction_bar"):
            bar = getattr(callback, name, None)
            if bar is not None:
                bar.close()
                setattr(callback, name, None)


# ----------------------------------------------------------------------------- main


def program_name() -> str:
    """'ehr-prs pretrain' under the console script (or `python -m ehr_prs.cli`), else 'train.py'.

    Usage lines and one-line errors then name the command the user typed.
    """
    return "ehr-prs pretrain" if Path(sys.argv[0]).name in ("ehr-prs", "cli.py") else "train.py"


def parse_args(argv: list[str] | None) -> PretrainArguments:
    """The flags (or one YAML file of them), parsed as HfArgumentParser does, without importing transformers."""
    return parse_flags(PretrainArguments, argv, prog=program_name(), description=__doc__.split("\n")[0])


def is_closed_form_fit(args: PretrainArguments) -> bool:
    """Whether the (resolved) flags ask for the logit-bias adapter on a frozen backbone: a regression with a
    direct solution, `ehr-prs fit-logit-bias` (ehr_prs/fits/logit_bias.py), not gradient training."""
    return args.prs_fusion == "logit_bias" and args.freeze_backbone


@dataclass
class PreparedRun:
    """A run whose inputs are checked, model built and Trainer made, before any step: where `train` and
    `ehr-prs fit-logit-bias` both start, so they read the data, extend --init-from and write the folder alike."""

    args: PretrainArguments  # --prs-fusion resolved
    data_dir: Path
    out_dir: Path
    tokenizer: "EhrTokenizer"  # noqa: F821
    model: EhrPrsForCausalLM
    trainer: Trainer
    train_ds: "datasets.Dataset"  # noqa: F821  (the model's columns only)
    full_tuning: "datasets.Dataset | None"  # noqa: F821  (the whole tuning split; the Trainer evaluates a sample)
    max_seq_length: int
    resume_from: Path | None


def prepare(args: PretrainArguments, callbacks: list[TrainerCallback] | None = None) -> PreparedRun:
    """Check the inputs and --output-dir, build (or extend) the model, make the Trainer; no step taken."""
    import torch
    from transformers import TrainingArguments
    from modeling_ehr_prs.configuration_ehr_prs import PRESETS, PRS_FUSIONS
    from ehr_prs.collator import EhrPrsCollator

    data_dir, out_dir = Path(args.data), Path(args.output_dir)
    if args.prs_fusion != "auto" and args.prs_fusion not in PRS_FUSIONS:
        raise InputError(f"--prs-fusion {args.prs_fusion!r}: choose auto or one of {', '.join(PRS_FUSIONS)}")
    tokenizer, train_ds, tuning_ds = load_tokenized(data_dir)  # memory-mapped: cheap, and says if --data is wrong
    clear = check_output_dir(args, out_dir)  # before any training: a wrong --output-dir fails at once
    resume_from = resume_checkpoint(out_dir) if args.resume else None
    n_prs = n_prs_of(train_ds)
    args = replace(args, prs_fusion=resolve_prs_fusion(args, n_prs, data_dir))  # the caller's args stay as given
    if not is_closed_form_fit(args) and args.warmup_steps >= args.max_steps > 0:
        print(f"warning: --warmup-steps {args.warmup_steps} >= --max-steps {args.max_steps}: the learning rate "
              f"never reaches --learning-rate {args.learning_rate:g} (it peaks near "
              f"{args.learning_rate * args.max_steps / max(args.warmup_steps, 1):.3g}); lower --warmup-steps "
              f"(e.g. {max(args.max_steps // 10, 0)})", file=sys.stderr)

    preset_ctx = PRESETS.get(args.preset, {}).get("max_position_embeddings", 512)
    max_seq_length = args.max_seq_length or preset_ctx
    torch.manual_seed(args.seed)
    model = build_model(args, tokenizer, n_prs, max_seq_length, train_ds)
    if model.config.num_prefix_tokens:
        # The prefix occupies positions too: leave room for it inside the context.
        max_seq_length = min(max_seq_length, model.config.max_position_embeddings - model.config.num_prefix_tokens)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if clear:  # the inputs and --init-from have loaded: only now may --overwrite delete the earlier run
        clear_output_dir(out_dir)

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
        logging_nan_inf_filter=False,  # a NaN loss is logged as NaN (FiniteGuard stops on it), not hidden
        report_to=args.report_to,
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=model.config.reads_prs or None,
    )
    collator = EhrPrsCollator(pad_token_id=tokenizer.pad_token_id, max_length=max_seq_length,
                              **tte_collator_fields(model.config, tokenizer))
    trainer = trainer_class()(
        model=model,
        args=training_args,
        data_collator=collator,
        train_dataset=train_ds,
        eval_dataset=tuning_ds,
        processing_class=tokenizer,
        callbacks=[*trainer_callbacks(args, out_dir), *(callbacks or [])],
    )
    check_sharding(trainer)
    return PreparedRun(args=args, data_dir=data_dir, out_dir=out_dir, tokenizer=tokenizer, model=model,
                       trainer=trainer, train_ds=train_ds, full_tuning=full_tuning, max_seq_length=max_seq_length,
                       resume_from=resume_from)


def run_trainer(run: PreparedRun):
    """Trainer's steps (from the --resume checkpoint when there is one); the TrainOutput."""
    try:
        return run.trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
    except TrainingDiverged:
        close_progress_bars(run.trainer)  # the error then starts its own line, not the bar's
        raise


def finish(run: PreparedRun, result, elapsed: float, fit_report: dict | None = None) -> Path:
    """Check the model is finite, evaluate it on the tuning sample and write the final folder; return it."""
    from ehr_prs.checkpoints import check_finite

    model, trainer, out_dir = run.model, run.trainer, run.out_dir
    # The guard saw the weights at the last logged step; the final model is checked whole before it is written.
    check_finite(model, f"the trained model (not written to {out_dir})")
    eval_metrics = trainer.evaluate() if trainer.eval_dataset is not None else {}
    if "eval_loss" in eval_metrics and not math.isfinite(eval_metrics["eval_loss"]):
        raise TrainingDiverged(f"the tuning loss of the trained model is {eval_metrics['eval_loss']}: no final "
                               f"model was written to {out_dir}; lower --learning-rate and rerun with --overwrite")

    save_final_model(trainer, out_dir)  # every process calls it (distributed saving); rank 0 writes
    if trainer.is_world_process_zero():
        write_final_folder(trainer, run.tokenizer, run.args, run.data_dir, out_dir, result, eval_metrics, elapsed,
                           fit_report)
    return out_dir


def train(args: PretrainArguments, callbacks: list[TrainerCallback] | None = None) -> Path:
    """Run the recipe; return the folder holding the final model."""
    run = prepare(args, callbacks)
    if is_closed_form_fit(run.args):
        # Deprecated alias: the closed-form fit is its own command now; same function, same folder.
        print(f"note: `{program_name()} --freeze-backbone --prs-fusion logit_bias` is deprecated: use `ehr-prs "
              f"fit-logit-bias --model {args.init_from} --data {args.data} --output-dir {args.output_dir}` "
              f"(the same fit, the same folder)", file=sys.stderr)
        return write_logit_bias_fit(run)
    t0 = time.perf_counter()
    result = run_trainer(run)
    return finish(run, result, time.perf_counter() - t0)


def save_final_model(trainer: Trainer, out_dir: Path) -> None:
    """Write the trained weights as one ordinary safetensors folder, whatever the FSDP state-dict type.

    With `fsdp_state_dict_type: SHARDED_STATE_DICT` (configs/fsdp.yaml: checkpoints as per-rank shards,
    cheap to write and resume at scale) Trainer.save_model writes no weights and no config at all; the
    final folder must load with `from_pretrained`, so the full state dict is gathered onto rank 0 here
    (every process takes part) and saved like a one-process run's.
    """
    fsdp = trainer.accelerator.state.fsdp_plugin if trainer.is_fsdp_enabled else None
    if fsdp is None or "FULL_STATE_DICT" in str(fsdp.state_dict_type):
        trainer.save_model(str(out_dir))
        return
    state_dict = trainer.accelerator.get_state_dict(trainer.model)
    trainer._save(str(out_dir), state_dict=state_dict)


def write_logit_bias_fit(run: PreparedRun) -> Path:
    """`ehr-prs fit-logit-bias`: the closed-form fit (ehr_prs/fits/logit_bias.py) of a prepared run's logit
    bias on its frozen decoder, then the folder `train` writes; return it.

    A time-to-event head's PRS hazard shift (or a head new to the checkpoint) has no closed form: with
    --max-steps > 0 it alone then takes Trainer steps here, the fitted bias and the decoder kept.
    """
    from ehr_prs.fits.logit_bias import describe, fit_logit_bias

    model, args = run.model, run.args
    std = run.data_dir / "tokenizer" / STANDARDIZER_FILE
    columns = json.loads(std.read_text()).get("columns") if std.exists() else None
    t0 = time.perf_counter()
    report = fit_logit_bias(model, run.tokenizer, run.train_ds, run.full_tuning, batch_size=args.batch_size,
                            max_length=run.max_seq_length, prs_columns=columns, seed=args.seed)
    if run.trainer.is_world_process_zero():
        print(describe(report))
    result = None
    if model.tte_head is not None and any(p.requires_grad for p in model.tte_head.parameters()):
        if args.max_steps > 0:
            for param in model.prs_logit_bias.parameters():
                param.requires_grad = False
            result = run_trainer(run)
        elif run.trainer.is_world_process_zero():
            print("note: the time-to-event head's PRS hazard shift has no closed form and --max-steps is 0: it is "
                  "left as --model has it (0 for an EHR-only model: the backbone's hazards); pass --max-steps N to "
                  "train it alone")
    return finish(run, result, time.perf_counter() - t0, report)


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
    print(
        f"wrote {out_dir}: {summary['steps']} steps, {summary['tokens_seen']:,} tokens at "
        f"{summary['tokens_per_second']:,.0f} tokens/s, final train loss {summary['final_train_loss']}, "
        f"tuning loss {summary['final_eval_loss']}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except input_errors() as err:
        print(f"{program_name()}: error: {err}", file=sys.stderr)
        return 2
    close_process_group()  # under accelerate launch / torchrun: every rank exits together, cleanly
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
