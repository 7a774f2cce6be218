"""EhrTokenizer: the Hugging Face tokenizer of ehr-prs, whose tokens are MEDS codes.

A token is a MEDS code string unchanged (`ICD10CM/E11.9`), a time-gap token (`TIME/2w`), an
age token (`AGE/45`), a value-bin token (`Q1`..`Q10`, right after a code with a numeric value),
an unknown token per code prefix (`ICD10CM/<unk>`) or a special token. The state is one JSON
file (`ehr_vocab.json`): tokens in id order, days per time token, bin edges per code and code
descriptions. This file imports only transformers and the standard library so that it can be
copied next to a checkpoint and loaded as remote code (`auto_map`).

Text form: tokens joined by newlines (`decode`), one event per line; `tokenize` splits on
newlines, and a line that is not itself a token is split on whitespace when every piece is one.
Sequences for the model are built in bulk by `tokenizer.build` (polars), not through text.
"""

from __future__ import annotations

import difflib
import json
import os
import re

from transformers import PreTrainedTokenizer


class InputError(ValueError):
    """A code, prefix or vocabulary file is wrong; the message says what would be right.

    The tokenizer's own class, so that this file stays self-contained as remote code; the
    `ehr-prs` command prints it like the stages' `ehr_prs.errors.InputError` (one line, exit 2).
    """

FORMAT_NAME = "ehr-prs-tokenizer"
FORMAT_VERSION = 1
VOCAB_FILE = "ehr_vocab.json"

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
UNK_SUFFIX = "/<unk>"


# A code's vocabulary prefix: an identifier (a letter, then letters, digits, `_`, `-`, `.`) before
# its first '/': `ICD10CM` of `ICD10CM/E11.9`, `LAB` of MIMIC's `LAB//220045//bpm`. Text that only
# contains a '/' (`BMI (kg/m2)`, from MIMIC-IV's OMR table) has none, so an unseen code of that kind
# maps to `<unk>` instead of minting odd tokens such as `BMI (kg/<unk>`. tokenizer.vocab and
# tokenizer.encode use the same pattern (as a polars regex), so all three agree.
PREFIX_PATTERN = r"^([A-Za-z][A-Za-z0-9_.\-]*)/"
_PREFIX_RE = re.compile(PREFIX_PATTERN)


def code_prefix(code: str) -> str | None:
    """The vocabulary prefix of a code (`ICD10CM` for `ICD10CM/E11.9`), None when it has none.

    Only an identifier before the first '/' counts (see PREFIX_PATTERN): `BMI (kg/m2)` has no prefix.
    """
    m = _PREFIX_RE.match(code)
    return m.group(1) if m else None


def read_state(path: str) -> dict:
    """Read and check an `ehr_vocab.json`; InputError when it is not this format or version."""
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: cannot read the EHR tokenizer vocabulary ({err}).") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT_NAME:
        raise InputError(f"{path}: not an ehr-prs tokenizer vocabulary (expected format {FORMAT_NAME!r}).")
    if state.get("format_version") != FORMAT_VERSION:
        raise InputError(
            f"{path}: tokenizer format version {state.get('format_version')!r}, but this code reads version "
            f"{FORMAT_VERSION}; re-run `ehr-prs tokenize` with this version (or use the matching ehr-prs release)."
        )
    return state


class EhrTokenizer(PreTrainedTokenizer):
    """A word-level tokenizer over MEDS codes, time gaps, ages and value bins (see module docstring)."""

    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str | None = None, state: dict | None = None, **kwargs):
        if state is None:
            if vocab_file is None:
                raise InputError("EhrTokenizer needs a vocab_file (ehr_vocab.json) or a state dict.")
            state = read_state(vocab_file)
        self._state = state
        self._tokens: list[str] = list(state["tokens"])
        self._ids: dict[str, int] = {t: i for i, t in enumerate(self._tokens)}
        if len(self._ids) != len(self._tokens):
            raise InputError("EhrTokenizer vocabulary has duplicate tokens.")
        days = state.get("time_token_days", {})
        # token id -> days the token stands for; 0 for every token that is not a time gap.
        self.token_days: list[int] = [int(days.get(t, 0)) for t in self._tokens]
        self.bin_edges: dict[str, list[float]] = dict(state.get("bin_edges", {}))
        self.descriptions: dict[str, str] = dict(state.get("descriptions", {}))
        for name, tok in (("pad_token", PAD), ("bos_token", BOS), ("eos_token", EOS), ("unk_token", UNK)):
            kwargs.setdefault(name, tok)
        kwargs.setdefault("special_tokens_pattern", "bos")
        kwargs.setdefault("model_max_length", int(state.get("max_length", 2048)))
        super().__init__(**kwargs)

    # -- the PreTrainedTokenizer contract ---------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    def get_vocab(self) -> dict[str, int]:
        vocab = dict(self._ids)
        vocab.update(self._added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        out: list[str] = []
        for line in text.split("\n"):
            if line in self._ids:  # a code exactly as in the data, edge spaces included (`LAB//51498// `)
                out.append(line)
                continue
            line = line.strip()
            if not line:
                continue
            pieces = line.split()
            if line in self._ids or not all(p in self._ids for p in pieces):
                out.append(line)
            else:
                out.extend(pieces)
        return out

    def _convert_token_to_id(self, token: str) -> int:
        tid = self._ids.get(token)
        return tid if tid is not None else self.unknown_token_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self._tokens[index] if 0 <= index < len(self._tokens) else UNK

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "\n".join(tokens)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        path = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self._state, f, indent=1, sort_keys=True, ensure_ascii=False)
            f.write("\n")
        return (path,)

    # -- what the rest of ehr-prs needs ------------------------------------------------------
    @property
    def state(self) -> dict:
        """The JSON state (a copy), as saved in ehr_vocab.json."""
        return json.loads(json.dumps(self._state))

    def unknown_token_id(self, code: str) -> int:
        """Id for a code not in the vocabulary: its prefix's unknown token, else `<unk>`."""
        prefix = code_prefix(code)
        if prefix is not None:
            tid = self._ids.get(prefix + UNK_SUFFIX)
            if tid is not None:
                return tid
        return self._ids[UNK]

    def code_token_ids(self, codes: list[str]) -> list[int]:
        """Token ids for outcome codes: exact codes, or prefixes ending in `*` (`ICD10CM/E11*`).

        Raises InputError naming close matches when a code or prefix matches nothing, so a
        typo in a risk query never silently scores an empty outcome.
        """
        code_tokens = [t for t in self._tokens if self._is_code(t)]
        ids: list[int] = []
        for code in codes:
            if code.endswith("*"):
                stem = code[:-1]
                hits = [self._ids[t] for t in code_tokens if t.startswith(stem)]
            else:
                hits = [self._ids[code]] if code in self._ids and self._is_code(code) else []
            if not hits:
                close = difflib.get_close_matches(code.rstrip("*"), code_tokens, n=5, cutoff=0.6)
                raise InputError(
                    f"code {code!r} matches no token in the tokenizer vocabulary"
                    + (f"; close matches: {close}" if close else "")
                    + ". Use an exact MEDS code, or a prefix ending in * (e.g. ICD10CM/E11*)."
                )
            ids.extend(h for h in hits if h not in ids)
        return ids

    def _is_code(self, token: str) -> bool:
        """True for MEDS code tokens (not time, age, bin, unknown or special tokens)."""
        if not hasattr(self, "_code_set"):
            self._code_set = frozenset(self._state.get("codes", ()))
        return token in self._code_set

    @property
    def time_token_ids(self) -> list[int]:
        """Ids of the time-gap tokens, shortest gap first."""
        return [i for i, d in enumerate(self.token_days) if d > 0]

    def describe(self, ids: list[int], skip_special_tokens: bool = False) -> list[str]:
        """Readable events for token ids: one line per token, codes with their descriptions.

        Value bins name the code's bin range; time tokens say the gap in days.
        """
        lines: list[str] = []
        last_code: str | None = None
        for i in ids:
            tok = self._convert_id_to_token(int(i))
            if skip_special_tokens and tok in SPECIAL_TOKENS:
                continue
            if self.token_days[int(i)] if 0 <= int(i) < len(self.token_days) else 0:
                lines.append(f"{tok}  (+{self.token_days[int(i)]} days)")
            elif tok.startswith("Q") and tok[1:].isdigit() and last_code in self.bin_edges:
                edges = self.bin_edges[last_code]
                b = int(tok[1:]) - 1
                lo = f"{edges[b - 1]:g}" if b >= 1 else "-inf"
                hi = f"{edges[b]:g}" if b < len(edges) else "inf"
                lines.append(f"{tok}  (value in [{lo}, {hi}) for {last_code})")
            else:
                desc = self.descriptions.get(tok)
                lines.append(f"{tok}  {desc}" if desc else tok)
                last_code = tok
        return lines
