"""The console script's contract: known subcommands are listed, unknown ones fail."""

import subprocess
import sys

from ehr_prs import cli


def test_help_lists_every_registered_subcommand():
    out = subprocess.run([sys.executable, "-m", "ehr_prs.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in cli.COMMANDS:
        assert name in out.stdout


def test_unknown_subcommand_exits_nonzero():
    out = subprocess.run([sys.executable, "-m", "ehr_prs.cli", "no-such-stage"], capture_output=True, text=True)
    assert out.returncode != 0
    assert "invalid choice" in out.stderr


def test_every_subcommand_module_declares_its_flags():
    import argparse
    import importlib

    for name, (module_name, _) in cli.COMMANDS.items():
        module = importlib.import_module(module_name)
        if not hasattr(module, "add_arguments"):
            assert callable(module.main), name  # a recipe that parses its own flags
            continue
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        assert parser.format_help(), name


# ----------------------------------------------------------------------------- the recipes' flags
# train.py and finetune.py parse their flag dataclasses with ehr_prs.recipes.flags, which builds the
# parser HfArgumentParser would (without importing transformers): same flags, help, values, errors.

import dataclasses  # noqa: E402

import pytest  # noqa: E402


@dataclasses.dataclass
class _Flags:
    """Every field form the builder supports."""

    name: str = dataclasses.field(metadata={"help": "required"})
    count: int = dataclasses.field(default=3, metadata={"help": "an int"})
    rate: float | None = dataclasses.field(default=None, metadata={"help": "optional float"})
    on: bool = dataclasses.field(default=True, metadata={"help": "default-on switch"})
    off: bool = False
    auto: bool | None = dataclasses.field(default=None, metadata={"help": "unset means auto"})
    label: str | None = "x"


def _recipe_flag_classes():
    import ehr_prs.recipes.finetune as ft
    import ehr_prs.recipes.train as train

    return [train.PretrainArguments, ft.FinetuneArguments, _Flags]


ARGVS = {
    "PretrainArguments": [
        ["--data", "d", "--output-dir", "o"],
        ["--data", "d", "--output_dir", "o", "--freeze_backbone", "--bf16", "false", "--resume", "no",
         "--max-seq-length", "12", "--prs-fusion", "prefix", "--learning_rate", "3e-4", "--tte-history-summary", "T"],
    ],
    "FinetuneArguments": [
        ["--model", "m", "--meds", "d", "--labels", "l", "--output-dir", "o"],
        ["--model", "m", "--meds", "d", "--labels", "l", "--output_dir", "o", "--shots", "8", "--strict-labels",
         "--learning-rate", "1e-3", "--max_tuning_rows", "50", "--train_prs_adapter", "yes"],
    ],
    "_Flags": [["--name", "a"], ["--name", "a", "--no_on", "--off", "--auto", "1", "--rate", "0.5", "--count", "7"],
               ["--name", "a", "--no-on", "--on", "false", "--label", "y"]],
}


@pytest.mark.parametrize("index", range(3))
def test_recipe_flags_parse_as_hf_argument_parser_does(index):
    from transformers import HfArgumentParser

    from ehr_prs.recipes.flags import flags_parser, parse_flags

    dtype = _recipe_flag_classes()[index]
    hf = HfArgumentParser(dtype, prog="recipe", description="d")
    assert flags_parser(dtype, prog="recipe", description="d").format_help() == hf.format_help()
    for argv in ARGVS[dtype.__name__]:
        (expected,) = hf.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
        assert parse_flags(dtype, argv, prog="recipe") == expected, argv
    # A flag the dataclass does not declare: the same ValueError, naming it.
    bad = [*ARGVS[dtype.__name__][0], "--no-such-flag", "1"]
    with pytest.raises(ValueError, match=r"not used by the HfArgumentParser: \['--no-such-flag', '1'\]"):
        hf.parse_args_into_dataclasses(args=bad, look_for_args_file=False)
    with pytest.raises(ValueError, match=r"not used by the HfArgumentParser: \['--no-such-flag', '1'\]"):
        parse_flags(dtype, bad)


def test_recipe_flags_from_a_yaml_file(tmp_path):
    import ehr_prs.recipes.train as train

    path = tmp_path / "run.yaml"
    path.write_text("data: runs/tok\noutput_dir: runs/m\nmax_steps: 7\nfreeze_backbone: true\n")
    args = train.parse_args([str(path)])
    assert (args.data, args.output_dir, args.max_steps, args.freeze_backbone, args.preset) == (
        "runs/tok", "runs/m", 7, True, "small")
    path.write_text("data: runs/tok\noutput_dir: runs/m\nmax_stepz: 7\n")
    with pytest.raises(ValueError, match=r"not used by the HfArgumentParser: \['max_stepz'\]"):
        train.parse_args([str(path)])


def test_a_missing_required_recipe_flag_is_a_usage_error(capsys):
    import ehr_prs.recipes.finetune as ft

    with pytest.raises(SystemExit) as exit_info:
        ft.parse_args(["--model", "m", "--meds", "d", "--labels", "l"])
    assert exit_info.value.code == 2
    assert "the following arguments are required: --output_dir/--output-dir" in capsys.readouterr().err
