"""Issue 19, training and loading: finite or fail, checkpoints that survive, pretrain defaults, --help.

- a run whose loss or weights go NaN stops with a one-line error (exit 2), keeps the last good
  checkpoint, saves no non-finite checkpoint and writes no final model;
- loading a model folder (risk, predict/finetune, pretrain --init-from) names a missing, truncated
  or corrupt model.safetensors, and refuses NaN weights; no NaN probability is ever written;
- an --output-dir holding an earlier run's checkpoints is refused without --resume (nothing is
  deleted), --resume falls back to the newest complete checkpoint, --output-dir never overlaps
  --data or --init-from;
- `--prs-fusion auto` (the default) gives an EHR-only model on data without PRS; an explicit
  adapter on such data says what to add; a warm-up longer than the run is warned about;
- `--help` exits 0 for every `ehr-prs` subcommand.
"""

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

import ehr_prs.recipes.train as train
from ehr_prs.evaluation import baselines
from ehr_prs import cli
from ehr_prs.checkpoints import checkpoint_problem, nonfinite_tensors
from ehr_prs.errors import InputError
from ehr_prs.predict import load_base_classifier
from ehr_prs.checkpoints import load_model_and_tokenizer
from ehr_prs.data.predictions import write_predictions

TINY = "hidden_size=32,intermediate_size=64,num_attention_heads=2,num_key_value_heads=2,prs_tokens=2"


@pytest.fixture(scope="module")
def data(tiny_data) -> Path:
    return tiny_data / "tok"


@pytest.fixture(scope="module")
def data_without_prs(tiny_data, tmp_path_factory) -> Path:
    """The tiny cohort tokenized without --prs (an EHR-only dataset)."""
    from ehr_prs.tokenizer.build import build

    out = tmp_path_factory.mktemp("noprs") / "tok"
    build(tiny_data / "cohort" / "meds", out, min_subjects=5, max_length=128)
    return out


def args_for(data: Path, out: Path, **kw) -> train.PretrainArguments:
    base = dict(data=str(data), output_dir=str(out), preset="tiny", prs_fusion="prefix", max_steps=4,
                batch_size=4, learning_rate=3e-3, warmup_steps=0, eval_steps=100, save_steps=2, logging_steps=1,
                max_eval_samples=8, max_seq_length=128, config_overrides=TINY, seed=7)
    base.update(kw)
    return train.PretrainArguments(**base)


def logged_losses(state_file: Path) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in json.loads(state_file.read_text())["log_history"] if "loss" in h}


def final_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.is_file()) if out.exists() else []


# ----------------------------------------------------------------------------- finite or fail


def test_the_issues_diverging_run_exits_2_with_one_line_and_writes_no_model(data, tmp_path, capsys):
    """`pretrain --preset tiny --max-steps 20 --learning-rate 1e4 --warmup-steps 0`: was exit 0 and NaN weights."""
    out = tmp_path / "nan"
    rc = train.main(["--data", str(data), "--output-dir", str(out), "--preset", "tiny", "--max-steps", "20",
                     "--learning-rate", "1e4", "--warmup-steps", "0", "--batch-size", "4", "--max-eval-samples", "8",
                     "--max-seq-length", "128", "--config-overrides", TINY])
    err = capsys.readouterr().err
    assert rc == 2
    line = next(x for x in err.splitlines() if "error:" in x)
    assert line.startswith("train.py: error: training diverged at step ")
    assert "the weights went non-finite" in line and "Lower --learning-rate (10000 now)" in line
    assert "no final model was written" in line
    assert final_files(out) == [] and not list(out.glob("checkpoint-*"))  # save_steps 200: nothing was good to keep


class PoisonAt(TrainerCallback):
    """Sets one weight to NaN at the start of `step`, as a diverging update would."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            with torch.no_grad():
                model.model.norm.weight[0] = float("nan")


def test_nonfinite_weights_are_never_checkpointed_and_the_last_good_checkpoint_survives(data, tmp_path):
    out = tmp_path / "poisoned"
    # Saves every step, logs never (logging_steps 100): the check before each save alone must catch it.
    diverged = r"training diverged at step 3: the weights went non-finite: \d+ of \d+ tensors"
    with pytest.raises(train.TrainingDiverged, match=diverged) as err:
        train.train(args_for(data, out, max_steps=6, save_steps=1, logging_steps=100), callbacks=[PoisonAt(3)])
    assert f"the last good checkpoint, {out / 'checkpoint-2'}, is kept" in str(err.value)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert final_files(out) == []  # no config.json / model.safetensors / training_summary.json at the top
    for ckpt in out.glob("checkpoint-*"):
        assert checkpoint_problem(ckpt) is None
        assert nonfinite_tensors(load_file(ckpt / "model.safetensors").items()) == []


@pytest.fixture()
def model_copy(tiny_lm, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_lm, folder)
    return folder


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _nan_weights(path: Path) -> None:
    weights = load_file(path)
    weights["model.layers.1.self_attn.v_proj.weight"][3, :] = float("nan")
    save_file(weights, path, metadata={"format": "pt"})


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.unlink(), r"model\.safetensors is missing"),
    (_truncate, r"model\.safetensors \([\d,]+ bytes\) is truncated or not a safetensors file"),
    (lambda p: p.write_bytes(b"this is not a safetensors file" * 10), r"is truncated or not a safetensors file"),
    (_nan_weights, r"model\.safetensors holds non-finite weights: 1 of \d+ tensors have NaN/inf values "
                   r"\(\S*layers\.1\.self_attn\.v_proj\.weight: 32\)"),
])
def test_every_loader_names_a_broken_weights_file(model_copy, data, tmp_path, damage, message):
    damage(model_copy / "model.safetensors")
    with pytest.raises(InputError, match=message) as risk_err:  # ehr-prs risk / view / incidence-refit
        load_model_and_tokenizer(model_copy)
    assert str(risk_err.value).startswith(f"--model {model_copy}: model.safetensors ")
    with pytest.raises(InputError, match=message):  # ehr-prs finetune / predict / fewshot
        load_base_classifier(model_copy)
    with pytest.raises(InputError, match=message) as init_err:  # ehr-prs pretrain --init-from
        train.train(args_for(data, tmp_path / "continued", prs_fusion="cross_attention", init_from=str(model_copy),
                             freeze_backbone=True))
    assert str(init_err.value).startswith(f"--init-from {model_copy}: model.safetensors ")
    assert not (tmp_path / "continued").exists()


def test_no_nan_probability_is_written(tmp_path):
    from datetime import datetime

    preds = pl.DataFrame({"subject_id": [1, 2, 3], "prediction_time": [datetime(2020, 1, 1)] * 3,
                          "boolean_value": [True, False, False],
                          "predicted_boolean_probability": [0.2, float("nan"), None]},
                         schema_overrides={"prediction_time": pl.Datetime("us")})
    out = tmp_path / "pred.parquet"
    with pytest.raises(InputError, match=r"--model m gave 2 of 3 rows a NaN, infinite or missing probability: "
                                         r"not writing .*pred\.parquet"):
        write_predictions(preds, out, source="--model m")
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no partial file either
    write_predictions(preds.with_columns(pl.lit(0.5).alias("predicted_boolean_probability")), out)
    assert pl.read_parquet(out)["predicted_boolean_probability"].to_list() == [0.5, 0.5, 0.5]


# ----------------------------------------------------------------------------- checkpoints and --output-dir


def test_rerun_without_resume_keeps_checkpoints_and_resume_skips_an_incomplete_one(data, tmp_path, capsys):
    run = tmp_path / "run"
    train.train(args_for(data, run))  # checkpoints at steps 2 and 4
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    reference = logged_losses(run / "checkpoint-4" / "trainer_state.json")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}

    # Rerun without --resume: refused, nothing touched.
    with pytest.raises(InputError, match=r"holds checkpoints of an earlier run \(checkpoint-2, checkpoint-4\): "
                                         r"pass --resume to continue it, or --overwrite"):
        train.train(args_for(data, run))
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before

    # What a kill during the save of checkpoint-4 (or a damaged copy) leaves; --resume takes checkpoint-2.
    damages = {
        "no trainer_state.json": lambda c: (c / "trainer_state.json").unlink(),
        "optimizer.pt is truncated or corrupt": lambda c: _truncate(c / "optimizer.pt"),
        "model.safetensors (": lambda c: _truncate(c / "model.safetensors"),
    }
    for why, damage in damages.items():
        case = tmp_path / f"damaged_{len(list(tmp_path.iterdir()))}"
        shutil.copytree(run, case)
        damage(case / "checkpoint-4")
        capsys.readouterr()
        train.train(args_for(data, case, resume=True, max_steps=4))
        err = capsys.readouterr().err
        assert f"warning: --resume: skipping the incomplete checkpoint-4 ({why}" in err
        assert "resuming from checkpoint-2" in err
        resumed = logged_losses(case / "checkpoint-4" / "trainer_state.json")
        for step in (3, 4):  # the same steps again, from checkpoint-2's optimizer, scheduler and RNG state
            assert resumed[step] == pytest.approx(reference[step], abs=1e-6), (why, step)
        assert checkpoint_problem(case / "checkpoint-4") is None  # rewritten whole

    # No complete checkpoint at all: a clear error.
    for ckpt in run.glob("checkpoint-*"):
        (ckpt / "trainer_state.json").unlink()
    with pytest.raises(InputError, match=r"--resume: no complete checkpoint in .*checkpoint-4: no trainer_state\.json"):
        train.train(args_for(data, run, resume=True))

    # --overwrite starts over: the earlier checkpoints are gone, the new run's are complete.
    train.train(args_for(data, run, overwrite=True, max_steps=2))
    assert [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-2"]
    assert json.loads((run / "training_summary.json").read_text())["steps"] == 2


def test_output_dir_never_overlaps_inputs_and_foreign_folders_need_overwrite(data, tiny_lm, tmp_path):
    with pytest.raises(InputError, match=r"--output-dir .* lies inside the --data input"):
        train.train(args_for(data, data / "model"))
    with pytest.raises(InputError, match=r"--output-dir .* is the --init-from input"):
        train.train(args_for(data, tiny_lm, init_from=str(tiny_lm), overwrite=True))
    with pytest.raises(InputError, match=r"--output-dir .* contains the --data input"):
        train.train(args_for(data, data.parent, overwrite=True))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match=r"already exists \(a folder with files in it, not a run of this recipe\): "
                                         r"pass --overwrite"):
        train.train(args_for(data, foreign))
    assert (foreign / "notes.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- defaults that work


def test_default_prs_fusion_follows_the_data(data, data_without_prs, tmp_path, capsys):
    defaults = train.PretrainArguments(data="d", output_dir="o")
    assert defaults.prs_fusion == "auto"
    out = train.train(args_for(data_without_prs, tmp_path / "ehr", prs_fusion=defaults.prs_fusion, max_steps=2,
                               warmup_steps=10))
    err = capsys.readouterr().err
    assert "note: --prs-fusion auto -> none (" in err and "tokenized without --prs" in err
    assert "warning: --warmup-steps 10 >= --max-steps 2: the learning rate never reaches --learning-rate 0.003" in err
    config = json.loads((out / "config.json").read_text())
    summary = json.loads((out / "training_summary.json").read_text())
    assert config["prs_fusion"] == "none" and summary["prs_fusion"] == "none" and summary["steps"] == 2
    assert config["n_prs"] == 0 and json.loads((out / "prs_standardizer.json").read_text())["columns"] == []

    with pytest.raises(InputError, match=r"--prs-fusion prefix needs polygenic scores, but --data .* was tokenized "
                                         r"without --prs\. Add a PRS table \(`ehr-prs tokenize --meds DIR --prs"):
        train.train(args_for(data_without_prs, tmp_path / "prefix", prs_fusion="prefix"))
    assert not (tmp_path / "prefix").exists()

    # With PRS in the data, auto is the prefix adapter; a warm-up inside the run is not warned about.
    out = train.train(args_for(data, tmp_path / "auto", prs_fusion="auto", max_steps=2, warmup_steps=1))
    err = capsys.readouterr().err
    assert "note: --prs-fusion auto -> prefix (" in err and "warmup" not in err
    assert json.loads((out / "config.json").read_text())["prs_fusion"] == "prefix"


def test_help_exits_0_for_every_subcommand(capsys):
    for name in cli.COMMANDS:
        with pytest.raises(SystemExit) as done:
            cli.main([name, "--help"])
        assert done.value.code == 0, name
        assert "usage:" in capsys.readouterr().out, name
    with pytest.raises(SystemExit) as done:  # python train.py --help (the `%` in a help string crashed it)
        train.main(["--help"])
    assert done.value.code == 0
    assert "~20% faster" in " ".join(capsys.readouterr().out.split())
