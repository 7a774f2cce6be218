"""Errors a user can act on, and writing outputs so that a failure leaves nothing half-made."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path


class InputError(ValueError):
    """A user input (file, column, subject or flag) is wrong.

    The message names what is wrong and says what would be right; the CLI prints it
    without a traceback and exits with status 2.
    """


def input_errors() -> tuple[type[ValueError], ...]:
    """The classes that mean "a user input is wrong", for `except input_errors():`.

    InputError, and the tokenizer's own (modeling_ehr_prs/tokenization_ehr.py defines one so that
    it stays self-contained as hub remote code), which can only have been raised once imported.
    """
    tokenization = sys.modules.get("modeling_ehr_prs.tokenization_ehr")
    return (InputError,) if tokenization is None else (InputError, tokenization.InputError)


PathArg = str | os.PathLike


def _resolved(path: PathArg) -> Path:
    """Absolute path with symlinks, `..` and `~` resolved, so two spellings of a place compare equal."""
    return Path(path).expanduser().resolve()


def _input_paths(inputs: Mapping[str, PathArg | Iterable[PathArg] | None]) -> list[tuple[str, Path]]:
    """(flag, path) pairs from {flag: path, list of paths, or None}."""
    pairs = []
    for flag, value in inputs.items():
        if value is None:
            continue
        values = [value] if isinstance(value, (str, os.PathLike)) else list(value)
        pairs += [(flag, Path(v)) for v in values if v is not None and str(v) != ""]
    return pairs


def _same_place(a: Path, b: Path) -> bool:
    """Equal resolved paths, or the same existing file reached another way (hard link, bind mount)."""
    if a == b:
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _occupied(path: Path) -> bool:
    """Whether writing `path` would replace something: any file, link or non-empty folder there.

    An empty folder holds nothing to lose (users often `mkdir` an output first), so it is free.
    """
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        return True
    return path.is_dir() and any(path.iterdir())


def _exists_error(path: Path, flag: str) -> InputError:
    what = "a folder with files in it" if path.is_dir() else "a file"
    return InputError(f"{flag} {path} already exists ({what}); pass --overwrite to replace it, "
                      f"or choose another {flag}.")


def check_output(out: PathArg, inputs: Mapping[str, PathArg | Iterable[PathArg] | None] | None = None,
                 overwrite: bool = False, flag: str = "--out", kind: str = "dir",
                 inside_ok: Iterable[str] = ()) -> Path:
    """Refuse an output path that would destroy something the command did not create; returns it as given.

    Called at the start of every command that writes, before any heavy work. The rules:
    - an output that IS, CONTAINS or LIES INSIDE one of `inputs` ({flag: path(s)}) is refused even
      with `overwrite`: replacing it would delete or change the command's own input. Paths are
      compared resolved (symlinks, relative spellings, `..`). A flag in `inside_ok` may hold the
      output inside it (`incidence-refit --out MODEL/incidence.safetensors` adds a file to a model);
    - `kind="file"`: an existing folder at `out` is refused always (a file never replaces a folder);
    - something already at `out` (a file, a link, a non-empty folder) is refused unless `overwrite`.
    """
    final = Path(out)
    target = _resolved(final)
    inside_ok = set(inside_ok)
    for in_flag, path in _input_paths(inputs or {}):
        src = _resolved(path)
        if _same_place(target, src):
            raise InputError(f"{flag} {final} is the {in_flag} input {path}; writing there would destroy it. "
                             f"Choose an output outside the inputs (refused even with --overwrite).")
        if target in src.parents:
            raise InputError(f"{flag} {final} contains the {in_flag} input {path}; replacing {final} would delete "
                             f"it. Choose a new {'folder' if kind == 'dir' else 'file'} outside the inputs "
                             f"(refused even with --overwrite).")
        if src in target.parents and in_flag not in inside_ok:
            raise InputError(f"{flag} {final} lies inside the {in_flag} input {path}; a command never writes into "
                             f"its inputs. Choose a path outside {path} (refused even with --overwrite).")
    for parent in target.parents:
        if parent.exists() and not parent.is_dir():
            raise InputError(f"{flag} {final}: {parent} is a file, not a folder; choose another {flag}.")
    if kind == "file" and final.is_dir():
        raise InputError(f"{flag} {final} is a folder; give a file path such as {final / 'predictions.parquet'} "
                         f"(a folder is never replaced by a file, even with --overwrite).")
    if not overwrite and _occupied(final):
        raise _exists_error(final, flag)
    return final


def _discard(path: Path) -> None:
    """Remove a set-aside old output, whatever it is (folder, file or symlink: never the link's target)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(path: PathArg, overwrite: bool = False, flag: str = "--out") -> Iterator[Path]:
    """Yield a temporary folder beside `path`; move it to `path` only if the block succeeds.

    A stage that fails half-way (bad input, Ctrl-C) then leaves no partial output that a
    later stage could mistake for a finished one. Something already at `path` (other than an
    empty folder) is replaced only with `overwrite=True` (the user's `--overwrite`): checked
    before and again after the block, in case it appeared while the command ran.
    """
    final = Path(path)
    if not overwrite and _occupied(final):
        raise _exists_error(final, flag)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
        if not overwrite and _occupied(final):
            raise _exists_error(final, flag)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists() or final.is_symlink():
        # Set the old output aside first, so a crash between the two renames loses nothing.
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        _discard(old)
    else:
        tmp.rename(final)


@contextlib.contextmanager
def atomic_output_file(path: PathArg, overwrite: bool = False, flag: str = "--out") -> Iterator[Path]:
    """Yield a temporary file path beside `path`; rename it to `path` only on success.

    An existing file at `path` is replaced only with `overwrite=True`; a folder there never is.
    """
    final = Path(path)
    if final.is_dir() and not final.is_symlink():
        raise InputError(f"{flag} {final} is a folder; give a file path (a folder is never replaced by a file).")
    if not overwrite and _occupied(final):
        raise _exists_error(final, flag)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.partial-", dir=final.parent, suffix=final.suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if not overwrite and _occupied(final):
            raise _exists_error(final, flag)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)
