"""Test-wide settings.

pytest runs with `-n 2` (two worker processes on CI's two cores): each worker gets one intra-op
thread, otherwise torch's thread pools oversubscribe the cores and tiny-model tests slow down
by an order of magnitude while their threads spin-wait on each other.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("POLARS_MAX_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- a tiny pipeline
# One simulated cohort, its tokenization and a 4-step prefix model, built once per test process
# and shared by the recipe, risk, fine-tuning and hub tests. Treat them as read-only: a test that
# changes files copies them first.

import pytest  # noqa: E402

TINY_OVERRIDES = "hidden_size=32,intermediate_size=64,num_attention_heads=2,num_key_value_heads=2,prs_tokens=2"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """root/cohort (600 simulated subjects, 64 PRS columns) and root/tok (its tokenization)."""
    from ehr_prs.data.simulate import simulate_cohort
    from ehr_prs.tokenizer.build import build

    root = tmp_path_factory.mktemp("tiny_pipeline")
    simulate_cohort(root / "cohort", n_subjects=600, seed=3, n_prs=64, progress=False)
    build(root / "cohort" / "meds", root / "tok", prs_path=root / "cohort" / "prs.parquet", min_subjects=5,
          max_length=128)
    return root


@pytest.fixture(scope="session")
def tiny_lm(tiny_data):
    """A tiny EHR+PRS (prefix) causal LM pretrained for 4 steps on tiny_data: the folder train.py writes."""
    import ehr_prs.recipes.train as train

    args = train.PretrainArguments(
        data=str(tiny_data / "tok"), output_dir=str(tiny_data / "lm"), preset="tiny", prs_fusion="prefix",
        max_steps=4, batch_size=4, learning_rate=3e-3, warmup_steps=0, eval_steps=4, save_steps=4, logging_steps=2,
        max_eval_samples=8, max_seq_length=128, config_overrides=TINY_OVERRIDES, seed=7)
    return train.train(args)


@pytest.fixture(scope="session")
def tiny_tte_lm(tiny_data, tmp_path_factory):
    """A tiny EHR+PRS (logit bias) causal LM with a 40-family time-to-event head, 6 steps (read-only)."""
    import ehr_prs.recipes.train as train

    args = train.PretrainArguments(
        data=str(tiny_data / "tok"), output_dir=str(tmp_path_factory.mktemp("tiny_tte") / "lm"), preset="tiny",
        prs_fusion="logit_bias", max_steps=6, batch_size=4, learning_rate=3e-3, warmup_steps=0, eval_steps=3,
        save_steps=3, logging_steps=1, max_eval_samples=8, max_seq_length=128, config_overrides=TINY_OVERRIDES,
        seed=7, tte_families=40)
    return train.train(args)
