"""Loading model folders and checkpoints that fail loudly: finite weights, or an error naming the file.

`from_pretrained` on a folder whose model.safetensors is missing, truncated or not safetensors at all
ends in a traceback deep inside transformers or the safetensors reader; on a folder whose weights
are NaN (a diverged run) it loads fine and every prediction downstream is NaN. Every command that
loads a model (risk, predict, finetune, pretrain --init-from) goes through `load_checked`, which
checks the files first and the loaded weights after, and raises an InputError that names the file.

`checkpoint_problem` says whether a Trainer checkpoint folder is complete enough to resume from,
so `pretrain --resume` can skip one that a kill cut short.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from ehr_prs.errors import InputError

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TRAINER_STATE_NAME = "trainer_state.json"  # Trainer writes it last in a checkpoint (transformers' _save_checkpoint)


class NonFiniteWeightsError(InputError):
    """A model's weights hold NaN or infinity: it diverged in training and would predict NaN."""


def check_safetensors_file(path: Path, flag: str) -> None:
    """InputError unless `path` is a whole safetensors file (header parses and covers the file).

    safe_open reads only the header and checks that the tensors it lists fill the file exactly,
    so a truncated copy is caught without reading the weights.
    """
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise InputError(f"{flag} {path.parent}: {path.name} is missing, so the folder holds no weights; copy the "
                         f"whole model folder, or rerun the command that wrote it")
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as err:
        size = path.stat().st_size
        raise InputError(f"{flag} {path.parent}: {path.name} ({size:,} bytes) is truncated or not a safetensors "
                         f"file ({err}); copy it again or rerun the command that wrote it") from err


def read_fit_file(path: str | Path, flag: str, command: str, fmt: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a small fit file that `command` wrote with metadata format `fmt` (the
    incidence and hazard refits); an InputError naming `flag` and the file when it is missing, not a
    safetensors file, or of another format."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{flag} {path}: no such file (write one with `{command}`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for a file that is not one of its files
        raise InputError(f"{flag} {path}: not a safetensors file written by `{command}` ({err})")
    if meta.get("format") != fmt:
        raise InputError(f"{flag} {path}: format {meta.get('format')!r}, expected {fmt!r}")
    return meta, tensors


def weight_files(folder: Path, flag: str) -> list[Path]:
    """The safetensors files holding a model folder's weights, each checked whole.

    One model.safetensors, or the shards a model.safetensors.index.json lists (large models).
    """
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file() and not (folder / WEIGHTS_NAME).is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as err:
            raise InputError(f"{flag} {folder}: {index.name} is not a valid safetensors index (no weight_map): "
                             f"{err}") from err
        files = [folder / shard for shard in shards]
    else:
        files = [folder / WEIGHTS_NAME]
    for path in files:
        check_safetensors_file(path, flag)
    return files


def check_model_folder(folder: str | Path, flag: str) -> list[Path]:
    """InputError unless `folder` holds a config.json and whole safetensors weights; returns the weight files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{flag} {folder}: no such folder; expected a model folder written by `ehr-prs pretrain` "
                         f"(or `ehr-prs finetune`)")
    if not (folder / "config.json").is_file():
        raise InputError(f"{flag} {folder}: no config.json; expected a model folder written by `ehr-prs pretrain` "
                         f"(or `ehr-prs finetune`)")
    return weight_files(folder, flag)


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every floating tensor is free of NaN/inf: one device sync, cheap enough for every log step."""
    flags = []
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # an FSDP2 shard checks its own part
        if local.is_floating_point() and local.numel():
            flags.append(torch.isfinite(local.detach()).all())
    return bool(torch.stack(flags).all()) if flags else True


def nonfinite_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, int]]:
    """(name, count of NaN/inf entries) for every floating tensor that is not all finite."""
    bad = []
    with torch.no_grad():
        for name, tensor in named:
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            if local.is_floating_point() and not bool(torch.isfinite(local).all()):
                bad.append((name, int((~torch.isfinite(local)).sum())))
    return bad


def describe_nonfinite(bad: list[tuple[str, int]], total: int) -> str:
    """'3 of 26 tensors have NaN/inf values (a: 12, b: 4, c: 1)': the detail of an error message."""
    names = ", ".join(f"{name}: {count:,}" for name, count in bad[:3]) + (", ..." if len(bad) > 3 else "")
    return f"{len(bad)} of {total} tensors have NaN/inf values ({names})"


def check_finite(model: torch.nn.Module, where: str) -> None:
    """NonFiniteWeightsError naming `where` (the file or folder) when any parameter or buffer is NaN/inf."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    bad = nonfinite_tensors(tensors)
    if bad:
        raise NonFiniteWeightsError(
            f"{where} holds non-finite weights: {describe_nonfinite(bad, len(tensors))}. The model diverged in "
            f"training and would predict NaN; retrain it (e.g. with a lower --learning-rate, or from its last "
            f"good checkpoint)")


def load_checked(loader: Callable, folder: str | Path, flag: str = "--model", **kwargs):
    """`loader(str(folder), **kwargs)` (a from_pretrained) with the folder's files checked before and its
    weights checked finite after; returns what the loader returns (a model, or (model, info)).

    Errors name `flag`, the folder and the file: missing config.json or weights, truncated or corrupt
    safetensors, NaN/inf weights.
    """
    from safetensors import SafetensorError

    folder = Path(folder)
    files = check_model_folder(folder, flag)
    try:
        loaded = loader(str(folder), **kwargs)
    except (SafetensorError, OSError) as err:  # a file changed under us, or a shard the index names is unreadable
        raise InputError(f"{flag} {folder}: could not read its weights ({str(err)[:300]})") from err
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    where = f"{flag} {folder}: " + (files[0].name if len(files) == 1 else f"{len(files)} weight shards")
    check_finite(model, where)
    return loaded


def _is_zip(path: Path) -> bool:
    """torch.save writes a zip archive whose directory sits at the end: a cut-short file is no zip."""
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def checkpoint_problem(folder: Path) -> str | None:
    """Why a Trainer checkpoint folder cannot be resumed from, or None when it is complete.

    Complete means what Trainer._save_checkpoint writes, in its order: the weights (whole
    safetensors), optimizer.pt, scheduler.pt, rng_state*.pth, and last trainer_state.json (valid
    JSON with a global_step). A kill during the save leaves a folder without trainer_state.json; a
    full disk or a bad copy leaves a truncated file. DeepSpeed and FSDP checkpoints keep the
    optimizer in their own sub-folders; there only trainer_state.json and any files present are checked.
    """
    state = folder / TRAINER_STATE_NAME
    if not state.is_file():
        return f"no {TRAINER_STATE_NAME}, the file a checkpoint save writes last: the save was cut short"
    try:
        json.loads(state.read_text())["global_step"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
        return f"{TRAINER_STATE_NAME} is truncated or corrupt ({err})"
    sharded = any(p.is_dir() for p in folder.iterdir())  # DeepSpeed global_step*/, FSDP pytorch_model_fsdp_0/, ...
    if not sharded or (folder / WEIGHTS_NAME).exists() or (folder / WEIGHTS_INDEX_NAME).exists():
        try:
            weight_files(folder, "checkpoint")
        except InputError as err:
            return str(err).split(": ", 1)[1]  # without "checkpoint FOLDER: "
    required = () if sharded else ("optimizer.pt", "scheduler.pt")
    for name in required:
        if not (folder / name).is_file():
            return f"no {name}"
    for path in sorted(folder.glob("*.pt")) + sorted(folder.glob("rng_state*.pth")):
        if not _is_zip(path):
            return f"{path.name} is truncated or corrupt"
    return None


def load_model_and_tokenizer(model_dir: str | Path):
    """The causal LM, its tokenizer and PRS standardiser (None if the model was trained without PRS)."""
    from transformers import AutoModelForCausalLM

    import modeling_ehr_prs  # noqa: F401  (Auto registration)
    from ehr_prs.tokenizer import EhrTokenizer, PrsStandardizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise InputError(f"--model {model_dir}: no config.json; expected a folder written by `ehr-prs pretrain`")
    # Names a missing, truncated or corrupt model.safetensors, and refuses NaN/inf weights (a diverged run).
    model = load_checked(AutoModelForCausalLM.from_pretrained, model_dir, "--model")
    model.eval()
    tokenizer = EhrTokenizer.from_pretrained(str(model_dir))
    standardizer = None
    if (model_dir / "prs_standardizer.json").exists():
        standardizer = PrsStandardizer.load(str(model_dir))
    return model, tokenizer, standardizer
