"""The recipes' flags: a dataclass -> the argparse parser that transformers' HfArgumentParser builds.

train.py and finetune.py declare their flags as dataclasses (HfArgumentParser style: one field per
flag, help in `metadata`). HfArgumentParser itself lives in transformers, whose import alone takes
~2 s, so `ehr-prs pretrain --help` would pay it; this module builds the same parser (flag names
with `_` and `-`, types, defaults, help, `--no_*` complements, `name.yaml` files) with the
standard library only. tests/test_cli.py checks that both give the same help, values and errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def string_to_bool(value: str | bool) -> bool:
    """`--flag yes|no|true|false|t|f|y|n|1|0` (any case), as HfArgumentParser reads a bool flag."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(
        f"Truthy value expected: got {value} but expected one of yes/no, true/false, t/f, y/n, 1/0 (case insensitive)."
    )


def _unwrap_optional(name: str, hint: Any) -> tuple[Any, bool]:
    """(X, True) for `X | None`, (hint, False) for a plain type; other unions cannot be one flag."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if len(args) != 2 or type(None) not in args:
            raise TypeError(f"flag --{name}: only `X | None` unions can be parsed from one flag, not {hint}")
        return next(a for a in args if a is not type(None)), True
    return hint, False


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, hint: Any) -> None:
    """One dataclass field -> `--name` (and `--name-with-dashes`), the way HfArgumentParser adds it."""
    options = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
    kwargs = dict(f.metadata)
    aliases = kwargs.pop("aliases", [])
    options += [aliases] if isinstance(aliases, str) else list(aliases)
    base, optional = _unwrap_optional(f.name, hint)
    complement = dict(kwargs)  # what `--no_flag` shares with the flag (help)
    if base is bool:
        kwargs["type"] = string_to_bool
        if not optional or (f.default is not None and f.default is not dataclasses.MISSING):
            # `--flag` alone means True; absent means the default (False when the field has none).
            kwargs.update(default=False if f.default is dataclasses.MISSING else f.default, nargs="?", const=True)
        # `bool | None = None` (e.g. --bf16): a value is required, and absent stays None (auto).
    elif typing.get_origin(base) is not None or (isinstance(base, type) and issubclass(base, enum.Enum)):
        # HfArgumentParser turns these into choices / nargs="+"; no recipe flag needs them yet.
        raise TypeError(f"flag --{f.name}: type {hint} is not supported here (str, int, float, bool, X | None)")
    else:
        kwargs["type"] = base
        if f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kwargs["default"] = f.default_factory()
        else:
            kwargs["required"] = True
    parser.add_argument(*options, **kwargs)
    if base is bool and f.default is True:  # `--no_flag` turns a default-on flag off
        parser.add_argument(f"--no_{f.name}", f"--no-{f.name.replace('_', '-')}", action="store_false",
                            dest=f.name, **{**complement, "default": False})


def flags_parser(dtype: type, **kwargs: Any) -> argparse.ArgumentParser:
    """An ArgumentParser with one flag per field of the dataclass `dtype`, defaults shown in --help."""
    kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
    parser = argparse.ArgumentParser(**kwargs)
    hints = typing.get_type_hints(dtype)  # the field types are strings under `from __future__ import annotations`
    for f in dataclasses.fields(dtype):
        if f.init:
            _add_field(parser, f, hints[f.name])
    return parser


def _from_dict(dtype: type[T], values: dict[str, Any]) -> T:
    """The dataclass from a YAML file's mapping; a key that is no flag is an error (HfArgumentParser.parse_dict)."""
    names = {f.name for f in dataclasses.fields(dtype) if f.init}
    unused = sorted(set(values) - names)
    if unused:
        raise ValueError(f"Some keys are not used by the HfArgumentParser: {unused}")
    return dtype(**values)


def parse_flags(dtype: type[T], argv: list[str] | None = None, **kwargs: Any) -> T:
    """`dtype` from command-line flags, or from a YAML file when `argv` is one path ending .yaml/.yml.

    As HfArgumentParser.parse_args_into_dataclasses: the lines of a `<script>.args` file beside the
    running script, if there is one, come before the command line's flags; a flag the dataclass does
    not declare is a ValueError naming it.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        import yaml  # only for this form

        return _from_dict(dtype, yaml.safe_load(Path(argv[0]).read_text(encoding="utf-8")))
    parser = flags_parser(dtype, **kwargs)
    args_file = Path(sys.argv[0]).with_suffix(".args") if sys.argv and Path(sys.argv[0]).name else None
    if args_file is not None and args_file.exists():
        argv = args_file.read_text().split() + argv
    namespace, remaining = parser.parse_known_args(argv)
    if remaining:
        raise ValueError(f"Some specified arguments are not used by the HfArgumentParser: {remaining}")
    return dtype(**vars(namespace))
