"""train.py: the pretraining recipe end to end on a tiny simulated cohort.

Checks the self-contained output folder, resume equality after an interruption, the
paper's second route (--init-from an EHR-only checkpoint), a two-process data-parallel run
and the errors raised before any training starts.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

import modeling_ehr_prs  # noqa: F401
import ehr_prs.recipes.train as train
from ehr_prs.collator import EhrPrsCollator
from ehr_prs.errors import InputError
from ehr_prs.tokenizer import EhrTokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = "hidden_size=32,intermediate_size=64,num_attention_heads=2,num_key_value_heads=2,prs_tokens=2"


@pytest.fixture(scope="module")
def data(tiny_data) -> Path:
    return tiny_data / "tok"


def args_for(data: Path, out: Path, **kw) -> train.PretrainArguments:
    base = dict(data=str(data), output_dir=str(out), preset="tiny", prs_fusion="prefix", max_steps=6,
                batch_size=4, learning_rate=3e-3, warmup_steps=0, eval_steps=3, save_steps=3, logging_steps=1,
                max_eval_samples=16, max_seq_length=128, config_overrides=TINY, seed=7)
    base.update(kw)
    return train.PretrainArguments(**base)


def losses(out: Path) -> dict[int, float]:
    state = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1] / "trainer_state.json"
    history = json.loads(state.read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def test_output_folder_is_self_contained_and_reloads_identically(data, tmp_path):
    out = train.train(args_for(data, tmp_path / "run"))
    for name in ("config.json", "model.safetensors", "tokenizer_config.json", "prs_standardizer.json",
                 "training_summary.json", "modeling_ehr_prs.py", "configuration_ehr_prs.py"):
        assert (out / name).exists(), name
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt")), "no pickles in the model folder"
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 6 and summary["tokens_seen"] > 0 and summary["tokens_per_second"] > 0
    assert summary["final_eval_loss"] is not None and summary["final_train_loss"] < 8

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = EhrTokenizer.from_pretrained(str(out))
    assert model.config.vocab_size == len(tok) and model.config.prs_fusion == "prefix"
    from datasets import load_from_disk

    rows = [load_from_disk(str(data / "tuning"))[i] for i in range(3)]
    batch = EhrPrsCollator(pad_token_id=tok.pad_token_id, with_labels=False)(rows)
    again = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, again(**batch).logits, rtol=0, atol=0)

    # No subject id may reach a model artefact.
    ids = {str(s) for s in load_from_disk(str(data / "train"))["subject_id"][:200]}
    text = "".join((out / f).read_text() for f in ("config.json", "training_summary.json", "tokenizer_config.json",
                                                    "prs_standardizer.json"))
    assert not any(i in text for i in ids)


class StopAt(TrainerCallback):
    """Stops training right after the checkpoint at `step`: what a kill after a save leaves."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True
        return control


def test_resume_after_interruption_gives_the_same_losses(data, tmp_path):
    full = tmp_path / "full"
    train.train(args_for(data, full))
    cut = tmp_path / "cut"
    train.train(args_for(data, cut), callbacks=[StopAt(3)])
    assert sorted(p.name for p in cut.glob("checkpoint-*")) == ["checkpoint-3"]
    train.train(args_for(data, cut, resume=True))
    a, b = losses(full), losses(cut)
    assert set(a) == set(range(1, 7)) and set(b) >= {4, 5, 6}
    for step in (4, 5, 6):
        assert a[step] == pytest.approx(b[step], abs=1e-6), (step, a[step], b[step])


def test_init_from_ehr_only_adds_a_genomic_adapter(data, tmp_path):
    base = train.train(args_for(data, tmp_path / "ehr", prs_fusion="none", max_steps=3))
    args = args_for(data, tmp_path / "xattn", prs_fusion="cross_attention", init_from=str(base),
                    freeze_backbone=True, max_steps=2)
    out = train.train(args)
    before = AutoModelForCausalLM.from_pretrained(base).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out)
    summary = json.loads((out / "training_summary.json").read_text())
    assert 0 < summary["trainable_parameters"] < summary["parameters"]
    for name, value in after.state_dict().items():
        if "prs" not in name:  # the frozen decoder is unchanged
            torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    assert any("prs" in n for n in after.state_dict())


def test_init_from_takes_the_adapter_shape_from_config_overrides(data, tmp_path):
    base = train.train(args_for(data, tmp_path / "ehr", prs_fusion="none", max_steps=1))
    out = train.train(args_for(data, tmp_path / "x", prs_fusion="cross_attention", init_from=str(base),
                               freeze_backbone=True, max_steps=1,
                               config_overrides=TINY.replace("prs_tokens=2", "prs_tokens=3")
                               + ",prs_cross_attention_layers=[1],prs_adapter_hidden_size=8"))
    config = json.loads((out / "config.json").read_text())
    assert (config["prs_tokens"], config["prs_cross_attention_layers"], config["prs_adapter_hidden_size"]) == (3, [1], 8)
    names = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert any(n.startswith("model.layers.1.prs_cross_attn") for n in names)
    assert not any(n.startswith("model.layers.0.prs_cross_attn") for n in names)
    with pytest.raises(InputError, match=r"hidden_size=48 \(checkpoint: 32\)"):
        train.train(args_for(data, tmp_path / "y", init_from=str(base), config_overrides="hidden_size=48"))


def test_errors_before_training(data, tmp_path):
    with pytest.raises(InputError, match="not a folder written by `ehr-prs tokenize`"):
        train.train(args_for(tmp_path, tmp_path / "x"))
    with pytest.raises(InputError, match="--preset"):
        train.train(args_for(data, tmp_path / "x", preset="huge"))
    with pytest.raises(InputError, match="--resume"):
        train.train(args_for(data, tmp_path / "empty", resume=True))
    # A checkpoint whose vocabulary is not the tokenizer's.
    from modeling_ehr_prs import EhrPrsConfig, EhrPrsForCausalLM

    other = EhrPrsForCausalLM(EhrPrsConfig.from_preset("tiny", vocab_size=37))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(InputError, match="vocab_size 37"):
        train.train(args_for(data, tmp_path / "x", init_from=str(tmp_path / "other")))


def test_cli_and_recipe_take_the_same_flags(data, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "ehr_prs.cli", "pretrain", "--data", str(data), "--output-dir", str(out),
           "--preset", "tiny", "--prs-fusion", "none", "--max-steps", "2", "--batch-size", "4", "--eval-steps", "2",
           "--save-steps", "2", "--max-eval-samples", "8", "--config-overrides", TINY]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "training_summary.json").read_text())["steps"] == 2


def _free_port() -> int:
    # A fixed port fails whenever something else holds it (another run, a socket in TIME_WAIT).
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.xdist_group("multiprocess")  # one multi-process test at a time (see test_distributed_scoring.py)
def test_two_process_data_parallel_on_cpu(data, tmp_path):
    out = tmp_path / "ddp"
    # configs/cpu_2proc.yaml: two processes through torch.distributed.run, gloo on CPU
    # (`accelerate launch --cpu --num_processes 2` would start one process without mpirun).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / "cpu_2proc.yaml"),
           "--main_process_port", str(_free_port()), str(REPO / "train.py"), "--data", str(data), "--output-dir", str(out), "--preset", "tiny",
           "--prs-fusion", "prefix", "--max-steps", "3", "--batch-size", "2", "--eval-steps", "3", "--save-steps", "3",
           "--max-eval-samples", "8", "--config-overrides", TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # Both ranks exit cleanly: the process group is closed before the interpreter ends (a joinable
    # gloo thread at exit aborted rank 1 once, after the model was written).
    assert "terminate called" not in done.stderr
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    # Two processes x batch 2: every step sees 4 sequences.
    assert summary["tokens_seen"] > 0
    assert AutoModelForCausalLM.from_pretrained(out).config.prs_fusion == "prefix"
