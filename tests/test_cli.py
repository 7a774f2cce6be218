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
