"""Sharded pretraining: train.py under FSDP2 in two CPU processes, and the GPU check's arithmetic.

accelerate (1.16) enables FSDP only on accelerator devices: on a machine without one it picks
MULTI_CPU and drops the FSDP plugin, so an FSDP config would quietly run plain data parallel (train.py
refuses it: `test_an_fsdp_config_on_cpu_is_refused`). torch's FSDP2 (`fully_shard`) itself runs on CPU
with gloo, so this file doubles as the launcher of the FSDP test run: run as a script under
`accelerate launch --config_file configs/fsdp_cpu_2proc.yaml`, it lifts that one gate (see
`enable_fsdp_on_cpu`) and runs train.py; the rest, the per-layer `fully_shard` of EhrPrsDecoderLayer,
the sharded optimizer, sharded (DCP) checkpoints, gathering the final model, is accelerate's and Trainer's
own FSDP2 path with configs/fsdp.yaml's settings.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

# Multi-process tests run one at a time, on one xdist worker (`--dist loadgroup` in the Makefile):
# two gloo jobs side by side on a 2-core CI machine starve each other.
pytestmark = pytest.mark.xdist_group("multiprocess")

REPO = Path(__file__).resolve().parents[1]
TINY = "hidden_size=32,intermediate_size=64,num_attention_heads=2,num_key_value_heads=2,prs_tokens=2"


def enable_fsdp_on_cpu() -> None:
    """Let accelerate run its FSDP path where it picked MULTI_CPU (a machine without GPU).

    AcceleratorState only turns an FSDP plugin on for accelerator devices (MULTI_GPU, MULTI_XPU, ...);
    on CPU the plugin is set aside and the model is wrapped in DDP. Here, after AcceleratorState has
    set up gloo and the CPU device, an FSDP plugin makes the run FSDP again, in both the
    AcceleratorState and the PartialState shared state (a later AcceleratorState() copies the latter).
    """
    import accelerate.state as state
    from accelerate.utils import DistributedType

    original = state.AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    state.AcceleratorState.__init__ = __init__


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(config: str, script: Path, data: Path, out: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    """train.py's flags (tiny model, 4 steps, checkpoints at steps 2 and 4) under `accelerate launch` with `config`."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / config),
           "--main_process_port", str(_free_port()), str(script), "--data", str(data), "--output-dir", str(out),
           "--preset", "tiny", "--prs-fusion", "prefix", "--max-steps", "4", "--batch-size", "2",
           "--learning-rate", "3e-3", "--warmup-steps", "0", "--eval-steps", "4", "--save-steps", "2",
           "--logging-steps", "1", "--max-eval-samples", "8", "--max-seq-length", "128", "--seed", "7",
           "--config-overrides", TINY, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


CPU_ONLY = pytest.mark.skipif(__import__("torch").cuda.is_available(),
                              reason="a CPU test: on a GPU machine accelerate runs FSDP itself")


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> Path:
    """root/fsdp: the FSDP2 2-process run; root/ddp: the same flags under plain data parallel (read-only)."""
    root = tmp_path_factory.mktemp("sharded")
    fsdp = launch("fsdp_cpu_2proc.yaml", Path(__file__), tiny_data / "tok", root / "fsdp", root)
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    # The baseline: the same flags, data order and world size (configs/cpu_2proc.yaml).
    ddp = launch("cpu_2proc.yaml", REPO / "train.py", tiny_data / "tok", root / "ddp", root)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    return root


def step_losses(out: Path) -> dict[int, float]:
    history = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


@CPU_ONLY
def test_fsdp_two_process_run_saves_a_folder_equal_to_ddp(runs, tiny_data):
    import torch
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    import modeling_ehr_prs  # noqa: F401  (Auto registration)
    from ehr_prs.checkpoints import checkpoint_problem
    from ehr_prs.collator import EhrPrsCollator
    from ehr_prs.tokenizer import EhrTokenizer

    data, out = tiny_data / "tok", runs / "fsdp"
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    # FSDP really sharded: its checkpoints are per-rank DCP shards, which a DDP run never writes...
    assert (out / "checkpoint-2" / "pytorch_model_fsdp_0").is_dir()
    assert not (runs / "ddp" / "checkpoint-2" / "pytorch_model_fsdp_0").exists()
    assert checkpoint_problem(out / "checkpoint-2") is None  # ...and `--resume` takes them
    # ...while the final folder is an ordinary one: one safetensors file, this package's code in auto_map
    # (not torch's generated FSDPEhrPrsForCausalLM), no pickles.
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["EhrPrsForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_ehr_prs.EhrPrsForCausalLM"
    assert (out / "model.safetensors").is_file() and (out / "modeling_ehr_prs.py").is_file()
    assert not list(out.glob("_fsdp*")) and not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    # The same tensors as the DDP run's folder: the tied LM head once, not as a second copy.
    from safetensors import safe_open

    names = {name: set(safe_open(str(runs / name / "model.safetensors"), "pt").keys()) for name in ("fsdp", "ddp")}
    assert names["fsdp"] == names["ddp"] and "lm_head.weight" not in names["fsdp"]

    sharded = AutoModelForCausalLM.from_pretrained(out).eval()
    plain = AutoModelForCausalLM.from_pretrained(runs / "ddp").eval()
    tok = EhrTokenizer.from_pretrained(str(out))
    rows = [load_from_disk(str(data / "tuning"))[i] for i in range(4)]
    batch = EhrPrsCollator(pad_token_id=tok.pad_token_id, with_labels=False)(rows)
    with torch.no_grad():
        a, b = sharded(**batch).logits, plain(**batch).logits
        untrained = AutoModelForCausalLM.from_config(sharded.config).eval()(**batch).logits
    # Training moved the weights: the comparison is not between two untrained models.
    assert (a - untrained).abs().max() > 0.1
    # Same data, same init, same steps. FSDP reduce-scatters the gradient (DDP all-reduces it in buckets),
    # computes the clipping norm from per-shard sums and updates each shard with AdamW. Measured here: equal
    # bit for bit (with 2 ranks each cross-rank sum has two addends, whose order does not matter). With
    # more ranks or another collective the sums run in another order: float32 rounding (~1e-7 relative)
    # that Adam's g / sqrt(v) can carry into the weights; 1e-4 on logits of order 1 leaves room for
    # that and still fails on any real difference (4 steps moved the logits by ~0.9).
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    fsdp_losses, ddp_losses = step_losses(out), step_losses(runs / "ddp")
    assert set(fsdp_losses) == set(ddp_losses) == {1, 2, 3, 4}
    for step, loss in ddp_losses.items():
        assert fsdp_losses[step] == pytest.approx(loss, abs=1e-5), (step, fsdp_losses[step], loss)


@CPU_ONLY
def test_resume_from_a_sharded_checkpoint_gives_the_same_losses(runs, tiny_data, tmp_path):
    # What a kill after the step-2 save leaves: the per-rank shards of checkpoint-2, nothing later.
    cut = tmp_path / "cut"
    shutil.copytree(runs / "fsdp" / "checkpoint-2", cut / "checkpoint-2")
    done = launch("fsdp_cpu_2proc.yaml", Path(__file__), tiny_data / "tok", cut, tmp_path, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    full, resumed = step_losses(runs / "fsdp"), step_losses(cut)
    for step in (3, 4):  # the same data order, optimizer state and schedule after the resume
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), (step, resumed[step], full[step])


@CPU_ONLY
def test_an_fsdp_config_on_cpu_is_refused(tiny_data, tmp_path):
    # Without the gate lifted, accelerate would run configs/fsdp.yaml's settings as plain DDP on CPU.
    done = launch("fsdp_cpu_2proc.yaml", REPO / "train.py", tiny_data / "tok", tmp_path / "x", tmp_path)
    assert done.returncode != 0
    assert "accelerate shards models with FSDP only on GPUs" in done.stderr
    assert "configs/cpu_2proc.yaml" in done.stderr
    assert not (tmp_path / "x" / "checkpoint-2").exists()


# ----------------------------------------------------------------------------- benchmarks/gpu_check.py's arithmetic


def test_gpu_check_peak_flops_come_from_the_device_name_or_the_override():
    from benchmarks.gpu_check import peak_bf16_flops

    assert peak_bf16_flops("NVIDIA H100 80GB HBM3", env={}) == 989e12  # SXM
    assert peak_bf16_flops("NVIDIA H100 PCIe", env={}) == 756e12
    assert peak_bf16_flops("NVIDIA H200 NVL", env={}) == 835e12 and peak_bf16_flops("NVIDIA H200", env={}) == 989e12
    assert peak_bf16_flops("NVIDIA L40S", env={}) == 362e12  # not the L4's 121
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB", env={}) == 312e12
    assert peak_bf16_flops("Some Future GPU", env={}) is None
    assert peak_bf16_flops("Some Future GPU", env={"EHR_PRS_PEAK_TFLOPS": "1500"}) == 1500e12
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3", env={"EHR_PRS_PEAK_TFLOPS": "900"}) == 900e12
    with pytest.raises(ValueError, match="EHR_PRS_PEAK_TFLOPS"):
        peak_bf16_flops("NVIDIA H100", env={"EHR_PRS_PEAK_TFLOPS": "0"})


def test_gpu_check_mfu_arithmetic():
    from benchmarks.gpu_check import effective_context, flops_per_token, matmul_parameters, mfu
    from modeling_ehr_prs import EhrPrsConfig, EhrPrsForCausalLM

    # Sequences of 2 and 4 tokens, capped at 3: (2^2 + 3^2) / (2 + 3) = 2.6 attended positions per token.
    assert effective_context([2, 4], cap=3) == pytest.approx(2.6)
    # 6 N + 12 L d T: N = 1e8, 12 layers, d = 960, T = 200.
    assert flops_per_token(100_000_000, 12, 960, 200.0) == pytest.approx(6e8 + 12 * 12 * 960 * 200)
    # 1 M tokens/s x 1 GFLOP per token on a 10 PFLOP/s card: 10 %.
    assert mfu(1e6, 1e9, 1e16) == pytest.approx(0.1) and mfu(1e6, 1e9, None) is None

    config = dict(n_prs=16, prs_fusion="prefix", vocab_size=100)
    tied = EhrPrsForCausalLM(EhrPrsConfig.from_preset("tiny", **config))
    untied = EhrPrsForCausalLM(EhrPrsConfig.from_preset("tiny", tie_word_embeddings=False, **config))
    # The tied embedding counts once, as the LM head's product; the PRS adapter (once per sequence) not at all.
    c = tied.config
    per_layer = (c.hidden_size * c.hidden_size * 2  # q, o
                 + 2 * c.hidden_size * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)  # k, v
                 + 3 * c.hidden_size * c.intermediate_size)  # gate, up, down
    assert matmul_parameters(tied) == c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size
    # Untied: the input embedding is a lookup, the separate LM head the product: the same count.
    assert matmul_parameters(untied) == matmul_parameters(tied)


if __name__ == "__main__":
    # The FSDP test run's launcher:
    #   accelerate launch --config_file configs/fsdp_cpu_2proc.yaml tests/test_fsdp.py TRAIN_FLAGS
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    enable_fsdp_on_cpu()
    import ehr_prs.recipes.train as train

    sys.exit(train.main(sys.argv[1:]))
