"""`ehr-prs push`: the exact folder that would be uploaded, its model card, and what is refused.

The upload folder is loaded (model, tokenizer, PEFT adapter, random twin) in a clean `python -I -S`
process where this package is not importable, as a user downloading it from the Hub would. The
network call itself is huggingface_hub's and is not made here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import modeling_ehr_prs  # noqa: F401  (registers the Auto classes)
import ehr_prs.recipes.train as train
from ehr_prs import cli
from ehr_prs import hub
from ehr_prs.collator import EhrPrsCollator
from ehr_prs.errors import InputError
from ehr_prs.evaluation.metrics import EvaluationInputs, run_evaluation
from modeling_ehr_prs.modeling_ehr_prs import EhrPrsForSequenceClassification
from ehr_prs.tokenizer import EhrTokenizer

TINY = "hidden_size=32,intermediate_size=64,num_attention_heads=2,num_key_value_heads=2,prs_tokens=2"
REPO_ID = "someone/ehr-prs-tiny"
PICKLES = ("training_args.bin", "rng_state.pth", "optimizer.pt")


@pytest.fixture(scope="module")
def art(tmp_path_factory, tiny_data, tiny_lm) -> dict:
    """A tiny pretrained model (with junk beside it), a LoRA adapter, an evaluation report and inputs."""
    root = tmp_path_factory.mktemp("hub")
    model_dir = root / "model"
    shutil.copytree(tiny_lm, model_dir)  # a private copy: junk is added beside the weights below
    for name in PICKLES:  # what a Trainer run can leave beside the weights: must never travel
        (model_dir / name).write_bytes(b"\x80\x04pickle")

    # A LoRA adapter over the classifier, with nonzero B (PEFT starts B at 0: an identity adapter proves nothing).
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    clf = EhrPrsForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    peft_model = get_peft_model(clf, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"],
                                                modules_to_save=["score"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.eval()
    adapter_dir = root / "adapter"
    peft_model.save_pretrained(adapter_dir)
    (adapter_dir / "finetune_summary.json").write_text(json.dumps(
        {"method": "lora", "best_epoch": 2, "tuning_auroc": 0.71, "args": {"meds": str(tiny_data / "cohort" / "meds")}}))
    (adapter_dir / "training_args.bin").write_bytes(b"\x80\x04pickle")

    rows = [__import__("datasets").load_from_disk(str(tiny_data / "tok" / "tuning"))[i] for i in range(3)]
    tok = EhrTokenizer.from_pretrained(str(model_dir))
    batch = EhrPrsCollator(pad_token_id=tok.pad_token_id, with_labels=False)(rows)
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        expected = {"lm": lm(**batch).logits, "clf": peft_model(**batch).logits}
    save_file({**{k: v.contiguous() for k, v in batch.items()}, **{f"expected_{k}": v for k, v in expected.items()}},
              str(root / "io.safetensors"))

    # An evaluation report of two models on the cohort's T2D labels (scores: label + noise).
    labels = pl.read_parquet(tiny_data / "cohort" / "labels" / "t2d.parquet")
    y = labels["boolean_value"].to_numpy().astype(float)
    rng = np.random.default_rng(0)
    files = {}
    for name, signal in (("ehr", 0.5), ("ehr+prs", 1.0)):
        p = 1 / (1 + np.exp(-(signal * y + rng.normal(size=y.size) - 2)))
        files[name] = root / f"{name}.parquet"
        labels.with_columns(predicted_boolean_probability=pl.Series(p)).write_parquet(files[name])
    eval_dir = root / "eval" / "t2d"
    run_evaluation(EvaluationInputs(predictions=files, prs=tiny_data / "cohort" / "prs.parquet",
                                    meds=tiny_data / "cohort" / "meds", n_bootstrap=20), eval_dir)
    meds_rows = pl.read_parquet(str(tiny_data / "cohort" / "meds" / "data" / "**" / "*.parquet"))
    subject_ids = meds_rows.get_column("subject_id").unique().to_list()
    return {"root": root, "model": model_dir, "adapter": adapter_dir, "eval": eval_dir, "tokens": rows[0]["input_ids"],
            "subject_ids": [str(s) for s in subject_ids], "tokenizer": tok}


@pytest.fixture(scope="module")
def folders(art) -> dict:
    """The upload folders: trained model + adapter + evaluation (gated), and the random twin."""
    notes: list[str] = []
    real = hub.build_upload_folder(art["model"], art["root"] / "upload", adapter_dir=art["adapter"],
                                   eval_report=art["eval"], gated=True, repo_id=REPO_ID, notes=notes)
    twin = hub.build_upload_folder(art["model"], art["root"] / "upload_random", random_weights=True,
                                   repo_id=REPO_ID + "-random", seed=5)
    return {"real": real, "twin": twin, "notes": notes}


def front_matter(readme: Path) -> tuple[dict, str]:
    text = readme.read_text()
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_upload_folder_holds_exactly_the_allow_list(art, folders):
    files = sorted(str(p.relative_to(folders["real"])) for p in folders["real"].rglob("*") if p.is_file())
    assert files == sorted([
        "README.md", "config.json", "configuration_ehr_prs.py", "modeling_ehr_prs.py", "model.safetensors",
        "generation_config.json", "tokenizer_config.json", "ehr_vocab.json", "tokenization_ehr.py",
        "prs_standardizer.json", "training_summary.json",
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/finetune_summary.json"])
    # The weights and unchanged files are byte-identical to the source.
    for name in ("model.safetensors", "ehr_vocab.json", "prs_standardizer.json", "modeling_ehr_prs.py", "config.json"):
        assert (folders["real"] / name).read_bytes() == (art["model"] / name).read_bytes(), name
    assert (folders["real"] / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (art["adapter"] / "adapter_model.safetensors").read_bytes()
    # Pickles were skipped, each with a note; the checkpoint folder too.
    skipped = " ".join(folders["notes"])
    assert all(name in skipped for name in PICKLES) and "checkpoint-4" in skipped
    assert not [p for p in folders["real"].rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".parquet", ".arrow")]
    # The adapter's base is this repository; local paths in summaries are reduced to a last component.
    adapter_config = json.loads((folders["real"] / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == REPO_ID
    tok_config = json.loads((folders["real"] / "tokenizer_config.json").read_text())
    assert "local_files_only" not in tok_config and tok_config["auto_map"]["AutoTokenizer"][0] == "tokenization_ehr.EhrTokenizer"
    summary = json.loads((folders["real"] / "training_summary.json").read_text())
    assert summary["args"]["data"] == "tok" and summary["args"]["output_dir"] == "lm" and summary["steps"] == 4
    assert json.loads((folders["real"] / "adapter" / "finetune_summary.json").read_text())["args"]["meds"] == "meds"
    # No subject id anywhere, in any file, text or binary.
    blob = b"".join(p.read_bytes() for p in folders["real"].rglob("*") if p.is_file())
    assert len(art["subject_ids"]) == 600 and all(len(s) >= 12 for s in art["subject_ids"])
    assert not [s for s in art["subject_ids"] if s.encode() in blob]
    assert str(art["root"]).encode() not in blob, "a local path leaked into the upload folder"


def test_folder_loads_in_a_clean_process_with_equal_outputs(art, folders, tmp_path):
    script = textwrap.dedent(f"""
        import importlib.util, json, sys
        sys.path.append({sysconfig.get_paths()["purelib"]!r})
        assert importlib.util.find_spec("modeling_ehr_prs") is None, "package is importable"
        assert importlib.util.find_spec("tokenizer") is None, "package is importable"
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
        from peft import PeftModel
        io = load_file({str(art["root"] / "io.safetensors")!r})
        batch = {{k: io[k] for k in ("input_ids", "attention_mask", "prs", "prs_mask")}}
        out = {{}}
        with torch.no_grad():
            lm = AutoModelForCausalLM.from_pretrained({str(folders["real"])!r}, trust_remote_code=True).eval()
            out["lm_module"] = type(lm).__module__
            out["lm_maxdiff"] = (lm(**batch).logits - io["expected_lm"]).abs().max().item()
            tok = AutoTokenizer.from_pretrained({str(folders["real"])!r}, trust_remote_code=True)
            out["tok_class"], out["tok_len"] = type(tok).__name__, len(tok)
            out["tokens"] = tok.convert_ids_to_tokens({list(art["tokens"])!r})
            base = AutoModelForSequenceClassification.from_pretrained({str(folders["real"])!r}, trust_remote_code=True,
                                                                      num_labels=1)
            clf = PeftModel.from_pretrained(base, {str(folders["real"])!r}, subfolder="adapter").eval()
            got = clf(**batch).logits
            out["clf_shape"] = list(got.shape)
            out["clf_maxdiff"] = (got - io["expected_clf"]).abs().max().item()
            twin = AutoModelForCausalLM.from_pretrained({str(folders["twin"])!r}, trust_remote_code=True).eval()
            twin_logits = twin(**batch).logits
            out["twin_shape_equal"] = twin_logits.shape == io["expected_lm"].shape
            out["twin_maxdiff"] = (twin_logits - io["expected_lm"]).abs().max().item()
        print("RESULT" + json.dumps(out))
    """)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PATH": os.environ.get("PATH", ""),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-I", "-S", "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.split("RESULT", 1)[1])
    assert out["lm_module"].startswith("transformers_modules"), out["lm_module"]
    assert out["lm_maxdiff"] == 0.0
    tok = art["tokenizer"]
    assert out["tok_class"] == "EhrTokenizer" and out["tok_len"] == len(tok)
    assert out["tokens"] == tok.convert_ids_to_tokens(list(art["tokens"]))
    assert out["clf_shape"] == [3, 1] and out["clf_maxdiff"] == 0.0
    assert out["twin_shape_equal"] and out["twin_maxdiff"] > 1e-3  # same shapes, other weights


def test_random_twin_has_the_same_shapes_and_other_weights(art, folders):
    real = load_file(str(art["model"] / "model.safetensors"))
    twin = load_file(str(folders["twin"] / "model.safetensors"))
    assert real.keys() == twin.keys() and len(real) > 10
    assert all(real[k].shape == twin[k].shape and real[k].dtype == twin[k].dtype for k in real)
    matrices = [k for k in real if real[k].dim() == 2]
    assert matrices and all(not torch.equal(real[k], twin[k]) for k in matrices)
    for name in ("config.json", "ehr_vocab.json", "prs_standardizer.json"):
        assert (folders["twin"] / name).read_bytes() == (art["model"] / name).read_bytes()
    assert not (folders["twin"] / "training_summary.json").exists()
    meta, body = front_matter(folders["twin"] / "README.md")
    assert "random-weights" in meta["tags"] and meta["license"] == "apache-2.0"
    assert "RANDOM WEIGHTS" in body.split("\n## ")[0], "the warning must come before any section"
    assert "extra_gated_fields" not in meta


def test_model_card_metadata_and_body(art, folders):
    from huggingface_hub import ModelCard, metadata_load

    readme = folders["real"] / "README.md"
    meta, body = front_matter(readme)
    assert metadata_load(readme) == meta
    assert ModelCard.load(readme).data.to_dict()["library_name"] == "transformers"
    assert meta["library_name"] == "transformers" and meta["inference"] is False
    assert {"ehr", "polygenic-risk-score", "meds", "genomics", "medical", "peft", "lora"} <= set(meta["tags"])
    assert "pipeline_tag" not in meta  # no Hub task fits MEDS tokens + PRS (see hub.py)
    assert meta["license"] == "other" and meta["license_name"]
    assert "data-use agreement" in meta["extra_gated_prompt"]
    fields = meta["extra_gated_fields"]
    assert fields["Institution"] == "text" and fields["Country"] == "country"
    assert fields["Intended use"]["type"] == "select" and "Research" in fields["Intended use"]["options"]
    dua = [k for k, v in fields.items() if v == "checkbox" and "data-use agreement" in k]
    assert len(dua) == 1 and "All of Us" in dua[0] and "UK Biobank" in dua[0]
    # Body: what, how to load, limits.
    config = json.loads((art["model"] / "config.json").read_text())
    n_params = sum(np.prod(t.shape) for t in load_file(str(art["model"] / "model.safetensors")).values())
    for text in (f"| prs_fusion | prefix |", f"| n_prs (PGS Catalog scores) | 64 |",
                 f"| vocab_size | {config['vocab_size']} |", f"| parameters (stored) | {n_params:,} |",
                 "| optimizer steps | 4 |", "trust_remote_code=True", 'subfolder="adapter"', "PrsStandardizer",
                 "## Intended use", "## Out-of-scope use", "Portability", "Calibration", "No subject-level data",
                 "| r | 4 |", "| tuning_auroc | 0.7100 |",
                 "codes seen in at least 5 training subjects", "below the All of Us minimum of 20"):
        assert text in body, text
    # Evaluation: the main table and every subgroup level, suppressed cells kept suppressed.
    metrics = json.loads((art["eval"] / "metrics.json").read_text())
    for model, r in metrics["models"].items():
        assert f"| {model} | {r['auroc']:.3f} [{r['auroc_ci'][0]:.3f}, {r['auroc_ci'][1]:.3f}] |" in body
    assert body.index("### By ancestry") < body.index("### By genotyped") < body.index("### By age band")
    anc = metrics["subgroups"]["ancestry"]
    suppressed = [lvl for lvl, c in anc.items() if c["suppressed"]]
    assert suppressed, "the fixture should have small ancestry groups"
    for lvl, cell in anc.items():
        row = next(line for line in body.split("### By ancestry")[1].splitlines() if line.startswith(f"| {lvl} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        if cell["suppressed"]:
            assert cells[1] == "<20" and cells[3:] == ["<20", "<20"]
        else:
            m = cell["models"]["ehr"]
            assert cells[1] == str(cell["n"]) and cells[3] == f"{m['auroc']:.3f} / {m['auprc']:.3f}"


def test_a_single_suppressed_count_gets_a_complementary_one():
    # A metrics.json whose counts had primary suppression only: M's positives would be 29 - 24.
    shown = {"ehr": {"auroc": 0.7, "auprc": 0.3}}
    def cell(n, pos):
        return {"n": n, "n_positive": pos, "suppressed": False, "models": shown}
    r = {"auroc": 0.7, "auroc_ci": [0.6, 0.8], "auprc": 0.3, "auprc_ci": [0.2, 0.4], "brier": 0.1, "ece": 0.02}
    metrics = {"n": 369, "n_positive": 79, "min_cell": 20, "reference": "ehr", "models": {"ehr": r}, "subgroups": {
        "sex": {"F": cell(194, 24), "M": cell(125, "<20")},
        "site": {"a": cell(20, "<20"), "b": cell(20, "<20"), "c": cell(50, 50)}}}
    before = json.dumps(metrics)
    body = hub.evaluation_section(metrics, "t2d")
    assert "| F | 194 | hidden | 0.700 / 0.300 |" in body and "| M | 125 | <20 | 0.700 / 0.300 |" in body
    # Two suppressed counts already: nothing more is hidden.
    assert "| a | 20 | <20 |" in body and "| b | 20 | <20 |" in body and "| c | 50 | 50 |" in body
    assert json.dumps(metrics) == before  # the card hides counts; metrics.json stays as read


def _break(model: Path, how: str) -> None:
    if how == "no_weights":
        (model / "model.safetensors").unlink()
    elif how == "pickle_weights":
        (model / "model.safetensors").rename(model / "pytorch_model.bin")
    elif how == "no_auto_map":
        cfg = json.loads((model / "config.json").read_text())
        del cfg["auto_map"]
        (model / "config.json").write_text(json.dumps(cfg))
    elif how == "data_table":
        pl.DataFrame({"subject_id": [1, 2]}).write_parquet(model / "predictions.parquet")
    else:
        (model / how).unlink()


@pytest.mark.parametrize("how, message", [
    ("no_weights", "no model.safetensors"),
    ("pickle_weights", "pickled weights are never shared"),
    ("no_auto_map", "auto_map"),
    ("data_table", "predictions.parquet is a data table"),
    ("tokenizer_config.json", "tokenizer_config.json"),
    ("modeling_ehr_prs.py", "modeling_ehr_prs.py"),
    ("tokenization_ehr.py", "tokenization_ehr.py"),
    ("ehr_vocab.json", "ehr_vocab.json"),
    ("prs_standardizer.json", "prs_standardizer.json is missing"),
])
def test_a_model_folder_missing_pieces_is_refused(art, tmp_path, how, message):
    model = tmp_path / "model"
    shutil.copytree(art["model"], model)
    _break(model, how)
    with pytest.raises(InputError, match=message.replace(".", r"\.")):
        hub.build_upload_folder(model, tmp_path / "out", repo_id=REPO_ID)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*")), "no partial output"


def test_bad_adapters_and_flag_combinations_are_refused(art, tmp_path):
    def adapter_copy(name: str) -> Path:
        d = tmp_path / name
        shutil.copytree(art["adapter"], d)
        return d

    other = adapter_copy("ad_other_base")  # a LoRA A matrix whose input width is not this model's hidden size
    tensors = load_file(str(other / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 8)
    save_file(tensors, str(other / "adapter_model.safetensors"))
    with pytest.raises(InputError, match="trained on another base"):
        hub.build_upload_folder(art["model"], tmp_path / "o1", adapter_dir=other, repo_id=REPO_ID)

    incomplete = adapter_copy("ad_incomplete")
    (incomplete / "adapter_model.safetensors").unlink()
    with pytest.raises(InputError, match="adapter_model.safetensors"):
        hub.build_upload_folder(art["model"], tmp_path / "o2", adapter_dir=incomplete, repo_id=REPO_ID)

    ids = adapter_copy("ad_with_ids")
    (ids / "finetune_summary.json").write_text(json.dumps({"method": "lora", "subject_ids": [1, 2, 3]}))
    with pytest.raises(InputError, match="subject identifiers"):
        hub.build_upload_folder(art["model"], tmp_path / "o3", adapter_dir=ids, repo_id=REPO_ID)

    with pytest.raises(InputError, match="drop --adapter"):
        hub.build_upload_folder(art["model"], tmp_path / "o4", adapter_dir=art["adapter"], random_weights=True,
                                repo_id=REPO_ID)
    with pytest.raises(InputError, match="repo-id"):
        hub.build_upload_folder(art["model"], tmp_path / "o5", repo_id="no-namespace")
    # The output folder may not be the model itself, nor someone's folder with other contents.
    with pytest.raises(InputError, match="lies inside the --model input"):
        hub.build_upload_folder(art["model"], art["model"] / "upload", repo_id=REPO_ID)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not an upload folder"):
        hub.build_upload_folder(art["model"], busy, repo_id=REPO_ID)
    assert (busy / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("o")]


def test_cli_dry_run_and_clear_errors_without_a_token(art, folders, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    out = tmp_path / "dry"
    argv = ["push", "--model", str(art["model"]), "--repo-id", REPO_ID, "--gated", "--eval-report", str(art["eval"])]
    assert cli.main([*argv, "--dry-run", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "would upload 11 files" in printed and "(gated, manual approval)" in printed
    assert f"wrote {out}" in printed and (out / "README.md").is_file()
    assert cli.main([*argv, "--dry-run", str(out)]) == 2, "an existing folder is replaced only with --overwrite"
    assert "pass --overwrite to replace it" in capsys.readouterr().err
    assert cli.main([*argv, "--dry-run", str(out), "--overwrite"]) == 0, "a folder written by push may be rebuilt"

    # No token: a clear error after the folder is built, naming the fix; nothing reaches the network.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "hf auth login" in err and "HF_TOKEN" in err
    kept = Path(err.split("ready at ")[1].split()[0].rstrip("."))
    assert (kept / "README.md").is_file() and (kept / "model.safetensors").is_file()

    # A token but no network (offline mode): huggingface_hub's error becomes an InputError, exit 2.
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_not_a_real_token")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert cli.main(argv) == 2
    assert f"upload to {REPO_ID} failed" in capsys.readouterr().err


def test_a_probe_or_full_classifier_folder_is_shared_as_a_classifier(art, tmp_path):
    clf_dir = tmp_path / "clf"
    EhrPrsForSequenceClassification.from_pretrained(art["model"], num_labels=1).save_pretrained(clf_dir)
    for name in ("tokenizer_config.json", "ehr_vocab.json", "tokenization_ehr.py", "prs_standardizer.json"):
        shutil.copy(art["model"] / name, clf_dir / name)
    (clf_dir / "finetune_summary.json").write_text(json.dumps(
        {"method": "probe", "tuning_auroc": 0.64, "model": str(art["model"])}))
    out = hub.build_upload_folder(clf_dir, tmp_path / "up", repo_id=REPO_ID)
    assert json.loads((out / "finetune_summary.json").read_text())["model"] == "model"
    _, body = front_matter(out / "README.md")
    assert "AutoModelForSequenceClassification.from_pretrained(repo, trust_remote_code=True)" in body
    assert "| tuning_auroc | 0.6400 |" in body and "AutoModelForCausalLM" not in body
