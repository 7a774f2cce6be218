"""Sharded, resumable scoring of label rows: `ehr-prs risk` and `ehr-prs predict` on several processes.

    torchrun --nproc_per_node 8 -m ehr_prs.cli risk --model m --meds meds --labels t2d.parquet \
        --codes 'ICD10CM/E11*' --horizon-days 730 --out pred/t2d.parquet
    accelerate launch --multi_gpu --num_processes 8 -m ehr_prs.cli predict ... --out pred/x.parquet
    ehr-prs risk ... --out pred/t2d.parquet --resume      # after a crash: the rows already written are skipped

The label rows are put in the order the engine scores them in one process (by prompt length,
stably) and cut into chunks of whole engine batches, so every row is scored in exactly the batch
a one-process run puts it in: the merged file equals a one-process run's on the same kind of
device, bit for bit (tested on CPU), whatever the number of processes. The chunks still to score are dealt to the processes by cost (the
costliest first, each to the least-loaded process), so none idles while another has a long tail.
Each process scores its chunks on its own device (accelerate's PartialState: gloo on CPU, one GPU
each) and writes every chunk atomically to OUT.parts/ as `order-<first>-<last>.npz` (the chunk's
positions in that order; the file holds each row's label-row index and its per-row arrays),
beside a manifest.json that names the run (the command, every flag that can change a number,
fingerprints of the inputs, a hash of the rows). Once every chunk is on disk, the main process
merges them in label-row order; the command finishes (the control variates, which are fitted
across all rows, are applied only then) and writes --out; the parts folder is then removed.

`--resume` keeps the chunks of an interrupted run whose manifest matches this one (an InputError
names each difference otherwise) and scores only the rest, on any number of processes. Without
--resume, parts left by an interrupted run stop the command unless --overwrite discards them; a
folder at OUT.parts that this module did not write is never touched. OUT.parts must be on a
filesystem that every process sees (one machine, or a shared mount across nodes).

The progress bar (main process only) counts the rows of every process: the chunks on disk plus
the main process's current chunk, batch by batch; it shows rows/s and the time left.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ehr_prs.errors import InputError, atomic_output_file, check_output

if TYPE_CHECKING:
    import numpy as np

PARTS_FORMAT = "ehr-prs scoring parts 1"
MANIFEST = "manifest.json"
# Test hook (tests/test_distributed_scoring.py): a process raises StoppedByTestHook after writing this
# many chunks, which stands for a crash midway. Never set it in real runs.
STOP_AFTER_ENV = "EHR_PRS_STOP_AFTER_CHUNKS"
_CHUNK = re.compile(r"^order-(\d{9})-(\d{9})\.npz$")
# Flags that never change a score, so a resumed run may differ in them.
NOT_COMPARED = frozenset({"out", "overwrite", "resume", "chunk_rows"})
RESUME_HELP = ("continue an interrupted run: keep the chunks it wrote to OUT.parts/ (the same flags and inputs are "
               "checked) and score only the other rows; any number of processes")


class StoppedByTestHook(RuntimeError):
    """Raised after EHR_PRS_STOP_AFTER_CHUNKS chunks: a crash midway, on purpose (tests only)."""


def add_arguments(parser: argparse.ArgumentParser, default_chunk_rows: int) -> None:
    """--resume and --chunk-rows, shared by every command that scores label rows through this module."""
    parser.add_argument("--resume", action="store_true", help=RESUME_HELP)
    parser.add_argument("--chunk-rows", type=int, default=default_chunk_rows,
                        help=f"rows per part written to OUT.parts/ (default {default_chunk_rows}; rounded up to whole "
                             "batches): what a crash can lose, and the unit dealt to processes. Run several processes "
                             "with `torchrun --nproc_per_node N -m ehr_prs.cli ...` or `accelerate launch -m "
                             "ehr_prs.cli ...`: the merged --out equals a one-process run's")


def parts_dir_of(out: str | os.PathLike) -> Path:
    """Where a run keeps its chunks until it merges them: OUT.parts/ beside --out."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


def process_state():
    """accelerate's PartialState for this launch: one process, or torchrun / accelerate launch's N.

    cpu=True where no accelerator exists, so that a CPU machine gets gloo (accelerate would
    otherwise see no backend and run every process alone); on GPUs each process gets its own.
    """
    import torch
    from accelerate import PartialState

    accelerator = getattr(torch, "accelerator", None)
    has_accelerator = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    return PartialState(cpu=not has_accelerator)


def close_process_group() -> None:
    """End a multi-process run cleanly: every process waits for the others, then drops the process group.

    Without it a process can exit while gloo's threads are still joinable, and C++ aborts it at
    interpreter exit ("terminate called without an active exception", SIGABRT) after all its work is
    written, which fails the launcher. Does nothing in one process, or when torch was never imported.
    """
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """What identifies an input without reading it: resolved path, and files, bytes, latest modification."""
    p = Path(path).expanduser().resolve()
    if p.is_file():
        st = p.stat()
        return {"path": str(p), "files": 1, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    stats = [f.stat() for f in sorted(p.rglob("*")) if f.is_file()] if p.is_dir() else []
    return {"path": str(p), "files": len(stats), "bytes": sum(s.st_size for s in stats),
            "mtime_ns": max((s.st_mtime_ns for s in stats), default=0)}


def _jsonable(value: Any) -> Any:
    """A flag's value as the manifest stores it (tuples -> lists, paths -> strings), compared after a round trip."""
    return json.loads(json.dumps(value, default=str))


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Every flag of the command but those that cannot change a score (--out, --overwrite, --resume,
    --chunk-rows), spelled as on the command line; a flag added later is compared without more code."""
    return {f"--{k.replace('_', '-')}": _jsonable(v) for k, v in sorted(vars(args).items())
            if not k.startswith("_") and k not in NOT_COMPARED}


def _chunk_name(first: int, last: int) -> str:
    return f"order-{first:09d}-{last:09d}.npz"  # positions first..last (inclusive) in the scoring order


def _chunks_on_disk(parts: Path) -> dict[tuple[int, int], Path]:
    """(start, stop) -> file for each finished chunk in the parts folder (temporaries start with '.')."""
    found = {}
    if parts.is_dir():
        for f in parts.iterdir():
            m = _CHUNK.match(f.name)
            if m:
                found[(int(m.group(1)), int(m.group(2)) + 1)] = f
    return found


def read_manifest(parts: Path, command: str) -> dict | None:
    """The manifest of an earlier run's parts folder; None where there is none (or an empty folder).

    A file there, or a folder that this module did not write, is an InputError: it is never
    replaced or deleted, even with --overwrite (no command removes what it did not create).
    """
    if not parts.exists() and not parts.is_symlink():
        return None
    if parts.is_dir() and not parts.is_symlink() and not any(parts.iterdir()):
        return None
    manifest = parts / MANIFEST
    try:
        found = json.loads(manifest.read_text()) if parts.is_dir() and not parts.is_symlink() else None
    except (OSError, ValueError):
        found = None
    if not isinstance(found, dict) or found.get("format") != PARTS_FORMAT:
        raise InputError(f"{parts} is where `ehr-prs {command}` keeps the parts of --out while it runs, but it holds "
                         f"something else (no {MANIFEST} of scoring parts): move it away or choose another --out "
                         "(it is never replaced, even with --overwrite)")
    return found


def _settings_differences(old: Mapping, new: Mapping) -> list[str]:
    diffs = []
    if old.get("command") != new.get("command"):
        diffs.append(f"command: the parts are from `ehr-prs {old.get('command')}`, this is `ehr-prs {new['command']}`")
    old_s, new_s = old.get("settings", {}), new["settings"]
    for flag in sorted(set(old_s) | set(new_s)):
        if old_s.get(flag) != new_s.get(flag):
            diffs.append(f"{flag}: the parts have {old_s.get(flag)!r}, this run {new_s.get(flag)!r}")
    return diffs


def manifest_differences(old: Mapping, new: Mapping) -> list[str]:
    """What makes two runs' parts unmixable, one phrase each (empty: the same run)."""
    diffs = _settings_differences(old, new)
    old_i, new_i = old.get("inputs", {}), new["inputs"]
    for flag in sorted(set(old_i) | set(new_i)):
        a, b = old_i.get(flag), new_i.get(flag)
        if a == b:
            continue
        if a is None or b is None or a.get("path") != b.get("path"):
            diffs.append(f"{flag}: the parts were scored from {(a or {}).get('path')}, this run reads "
                         f"{(b or {}).get('path')}")
        else:
            diffs.append(f"{flag} {b['path']} changed since the parts were written (its files, size or "
                         "modification time differ)")
    if (old.get("rows"), old.get("rows_sha256")) != (new["rows"], new["rows_sha256"]):
        diffs.append(f"the label rows differ ({old.get('rows')} rows then, {new['rows']} now, or other "
                     "subjects, prediction times or prompts)")
    if old.get("chunk_rows") != new["chunk_rows"]:
        diffs.append(f"--chunk-rows: the parts are chunks of {old.get('chunk_rows')} rows, this run makes "
                     f"{new['chunk_rows']} (pass the interrupted run's --chunk-rows)")
    return diffs


def _rows_sha256(keys: Mapping[str, np.ndarray], lengths: np.ndarray) -> str:
    """A hash of the rows' keys (subject, prediction time) and prompt lengths, in label-row order."""
    import numpy as np

    h = hashlib.sha256()
    for name in sorted(keys):
        a = np.asarray(keys[name])
        if a.dtype.kind == "M":  # datetimes: their integer microseconds
            a = a.astype("datetime64[us]").view(np.int64)
        h.update(name.encode())
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(np.ascontiguousarray(np.asarray(lengths, dtype=np.int64)).tobytes())
    return h.hexdigest()


def deal(costs: Mapping[int, float], processes: int) -> list[list[int]]:
    """Chunks -> processes, balanced: the costliest chunk first, each to the least-loaded process
    (longest-processing-time first). Deterministic, so every process computes the same deal."""
    loads = [0.0] * processes
    out: list[list[int]] = [[] for _ in range(processes)]
    for chunk in sorted(costs, key=lambda c: (-costs[c], c)):
        p = min(range(processes), key=lambda r: (loads[r], r))
        out[p].append(chunk)
        loads[p] += costs[chunk]
    return [sorted(x) for x in out]


ScoreChunk = Callable[["np.ndarray", Callable[[int], None]], dict[str, "np.ndarray"]]


class ShardedScoring:
    """One scoring run's processes and its parts folder (module docstring).

    Make it at the start of the command, right after check_output(--out), with the command's flags
    (`run_settings(args)`): it checks the parts folder's rules, and on --resume the flags, at once,
    before any heavy work. Then move the model to `device`, build the rows, call `score` (every
    process), and on the main process write --out and call `finish`.
    """

    def __init__(self, out: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None], resume: bool,
                 overwrite: bool, chunk_rows: int, command: str, settings: Mapping[str, Any]):
        if chunk_rows < 1:
            raise InputError(f"--chunk-rows must be >= 1, got {chunk_rows}")
        self.out, self.parts, self.command = Path(out), parts_dir_of(out), command
        self.inputs = {flag: path for flag, path in inputs.items() if path}
        self.input_flags = set(inputs)  # compared by fingerprint, not by spelling (a resume may run from elsewhere)
        self.resume, self.overwrite, self.chunk_rows = resume, overwrite, chunk_rows
        self.settings = dict(settings)
        # The parts folder may not be, hold or lie inside an input (its existence is ruled on below).
        check_output(self.parts, self.inputs, overwrite=True, flag="--out's parts folder")
        self.existing = read_manifest(self.parts, command)
        if self.existing is not None and not resume and not overwrite:
            done = _chunks_on_disk(self.parts)
            raise InputError(
                f"{self.parts} holds {len(done)} scored chunk(s) ({sum(b - a for a, b in done)} rows) of an "
                f"interrupted `ehr-prs {command}` run for --out {self.out}: pass --resume to continue it (same flags), "
                "or --overwrite to discard them and start over")
        if self.existing is not None and resume:
            # flags that differ are refused now, before the model and the data are read (the rest in `score`)
            early = {"command": command, "settings": self._compared(settings)}
            early_old = {"command": self.existing.get("command"),
                         "settings": {k: self.existing.get("settings", {}).get(k) for k in early["settings"]}}
            self._refuse_differences(_settings_differences(early_old, early))
        self.state = process_state()

    def _compared(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """The settings a resumed run must share; input paths are compared by fingerprint instead, not by
        spelling (a resume may run from another folder)."""
        return _jsonable({k: v for k, v in settings.items() if k not in self.input_flags})

    def _refuse_differences(self, diffs: list[str]) -> None:
        if diffs:
            raise InputError(f"--resume: {self.parts} holds parts of another run than this one: " + "; ".join(diffs)
                             + ". Rerun with the interrupted run's flags and inputs, or pass --overwrite without "
                             "--resume to discard the parts and start over")

    @property
    def device(self):
        """This process's device (cpu, or its own GPU under torchrun / accelerate launch)."""
        return self.state.device

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process

    def score(self, keys: Mapping[str, np.ndarray], lengths, batch_rows: int, score_chunk: ScoreChunk,
              row_cost: float = 0.0, desc: str = "score", derived: Mapping[str, Any] | None = None
              ) -> dict[str, np.ndarray] | None:
        """Score every row across the processes; the merged arrays on the main process, None on the others.

        keys: arrays that identify the rows (subject_id, prediction_time); lengths: each row's prompt
        length, the engine's sort key; batch_rows: rows per engine batch (chunks are whole batches).
        score_chunk(rows, on_rows) scores the label rows `rows` (in the engine's order) and returns
        per-row arrays (first axis len(rows)) and 0-d counts (summed over chunks); it calls
        on_rows(n) as it goes, for the progress bar. row_cost: a row's cost beyond its prompt
        length, in tokens, for the deal (e.g. K x the generated tokens). derived: settings worked
        out from the flags and inputs (e.g. a default read from the model), compared on --resume
        with the constructor's.
        """
        import numpy as np
        from tqdm.auto import tqdm

        lengths = np.asarray(lengths, dtype=np.int64)
        n = len(lengths)
        order = np.argsort(lengths, kind="stable")  # the engine's own order (it sorts stably by length)
        size = math.ceil(self.chunk_rows / max(1, batch_rows)) * max(1, batch_rows)
        chunks = [(a, min(a + size, n)) for a in range(0, n, size)]
        settings = self._compared({**self.settings, **(derived or {})})
        manifest = {"format": PARTS_FORMAT, "command": self.command, "settings": settings,
                    "inputs": {flag: fingerprint(path) for flag, path in sorted(self.inputs.items())},
                    "rows": n, "rows_sha256": _rows_sha256(keys, lengths), "chunk_rows": size,
                    "order": "label rows sorted stably by prompt length", "processes": self.state.num_processes}
        # 1. Every process, reading only: what an earlier run left that this one keeps (the same answer
        # everywhere, since nothing is written before the barrier).
        keep: set[tuple[int, int]] = set()
        if self.existing is not None and self.resume:
            self._refuse_differences(manifest_differences(self.existing, manifest))
            keep = set(_chunks_on_disk(self.parts)) & set(chunks)
        self.state.wait_for_everyone()
        # 2. The main process starts (or cleans) the folder.
        if self.is_main:
            if self.existing is not None and not self.resume:  # --overwrite: parts of an earlier run, discarded
                shutil.rmtree(self.parts)
            self.parts.mkdir(parents=True, exist_ok=True)
            for f in self.parts.iterdir():  # a killed writer's temporary file
                if f.name.startswith(".") and ".partial-" in f.name:
                    f.unlink(missing_ok=True)
            with atomic_output_file(self.parts / MANIFEST, overwrite=True, flag=f"{self.parts}/{MANIFEST}") as tmp:
                tmp.write_text(json.dumps(manifest, indent=1))
            kept_rows = sum(b - a for a, b in keep)
            if self.resume and keep:
                print(f"--resume: {self.parts} holds {len(keep)} of {len(chunks)} chunks ({kept_rows} of {n} rows) "
                      f"of this run; skipping them and scoring the other {n - kept_rows} rows")
            elif self.resume:
                print(f"--resume: no parts of this run in {self.parts}; scoring all {n} rows")
        self.state.wait_for_everyone()
        if not (self.parts / MANIFEST).exists():
            raise InputError(f"process {self.state.process_index} does not see {self.parts / MANIFEST}, which the main "
                             "process wrote: put --out on a filesystem that every process shares")
        # 3. This process's chunks, and the bar (main process: every process's rows).
        todo = {i: float(lengths[order[a:b]].sum() + row_cost * (b - a))
                for i, (a, b) in enumerate(chunks) if (a, b) not in keep}
        dealt = deal(todo, self.state.num_processes)
        mine = dealt[self.state.process_index]
        if self.is_main and self.state.num_processes > 1:
            shares = [sum(chunks[i][1] - chunks[i][0] for i in d) for d in dealt]
            print(f"{sum(shares)} rows in {len(todo)} chunks dealt to {len(dealt)} processes: "
                  f"{', '.join(map(str, shares))} rows")
        bar = tqdm(total=n, initial=sum(b - a for a, b in keep), unit="row", dynamic_ncols=True,
                   desc=f"{desc} ({self.state.num_processes} processes)" if self.state.num_processes > 1 else desc,
                   disable=not self.is_main)
        progress = _Progress(bar, self.parts)
        stop_after = int(os.environ.get(STOP_AFTER_ENV, "0") or 0)
        for written, i in enumerate(mine, start=1):
            a, b = chunks[i]
            rows = order[a:b]
            arrays = score_chunk(rows, progress.rows_done)
            self._write_chunk(a, b, rows, arrays)
            progress.chunk_written()
            if stop_after and written >= stop_after:
                bar.close()
                raise StoppedByTestHook(f"{STOP_AFTER_ENV}={stop_after}: stopped after {written} chunk(s) on purpose")
        # 4. Wait for the other processes' chunks (polling the folder: no collective that could time out
        # while a slower process finishes), then merge on the main process.
        wanted = set(chunks)
        while not wanted <= set(_chunks_on_disk(self.parts)):
            progress.refresh(force=True)
            time.sleep(0.5)
        progress.refresh(force=True)
        bar.close()
        self.state.wait_for_everyone()
        if not self.is_main:
            return None
        if n == 0:  # nothing to chunk: the arrays' shapes still come from the engine
            return score_chunk(order, lambda _: None)
        return self._merge(chunks, order)

    def _write_chunk(self, a: int, b: int, rows, arrays: Mapping[str, np.ndarray]) -> None:
        import numpy as np

        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        for k, v in arrays.items():
            if k == "rows" or (v.ndim and v.shape[0] != len(rows)):
                raise ValueError(f"chunk array {k!r} of shape {v.shape} for {len(rows)} rows")
        with atomic_output_file(self.parts / _chunk_name(a, b - 1), overwrite=True, flag="a chunk of --out") as tmp:
            np.savez(tmp, rows=np.asarray(rows, dtype=np.int64), **arrays)

    def _merge(self, chunks: list[tuple[int, int]], order) -> dict[str, np.ndarray]:
        """Every chunk's arrays put back in label-row order (0-d counts summed)."""
        import numpy as np

        n = len(order)
        files = _chunks_on_disk(self.parts)
        merged: dict[str, np.ndarray] = {}
        seen = np.zeros(n, dtype=bool)
        for a, b in chunks:
            with np.load(files[(a, b)], allow_pickle=False) as part:
                rows = part["rows"]
                if not np.array_equal(rows, order[a:b]):
                    raise InputError(f"{files[(a, b)]} holds other rows than its name says: delete {self.parts} "
                                     "and rerun without --resume")
                seen[rows] = True
                for k in part.files:
                    if k == "rows":
                        continue
                    v = part[k]
                    if v.ndim == 0:
                        merged[k] = merged.get(k, np.zeros((), v.dtype)) + v
                        continue
                    if k not in merged:
                        merged[k] = np.zeros((n, *v.shape[1:]), dtype=v.dtype)
                    merged[k][rows] = v
        assert seen.all(), "every row is in exactly one chunk"
        return merged

    def finish(self) -> None:
        """After --out is written (main process): remove the parts folder, whose rows are all in --out now."""
        if self.is_main and self.parts.is_dir():
            shutil.rmtree(self.parts)


class _Progress:
    """The main process's bar: rows in the chunks on disk (every process's) plus its current chunk's so far."""

    def __init__(self, bar, parts: Path):
        self.bar, self.parts, self.in_chunk, self.last = bar, parts, 0, 0.0

    def rows_done(self, rows: int) -> None:
        self.in_chunk += rows
        self.refresh()

    def chunk_written(self) -> None:
        self.in_chunk = 0
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> None:
        if self.bar.disable or (not force and time.monotonic() - self.last < 1.0):
            return  # listing the folder at most once a second
        self.last = time.monotonic()
        on_disk = sum(b - a for a, b in _chunks_on_disk(self.parts))
        target = min(self.bar.total, on_disk + self.in_chunk)
        if target > self.bar.n:
            self.bar.update(target - self.bar.n)
