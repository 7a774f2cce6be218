"""MEDS events -> token sequences: vocabulary, time tokens, value bins, PRS standardiser (installed as ehr_prs.tokenizer).

The tokenizer class itself is a hub-loadable model file (modeling_ehr_prs/tokenization_ehr.py,
registered with AutoTokenizer by `import modeling_ehr_prs`); this stage builds its vocabulary
and turns MEDS data into the token datasets the model reads.

    tok = EhrTokenizer.from_pretrained("out/tokenizer")
    std = PrsStandardizer.load("out/tokenizer")
    ds = inputs_at_prediction_times(meds, labels, tok, std, prs, split="held_out")

The names above are imported on first use (PEP 562): importing any module of this package
(`ehr-prs tokenize --help` imports ehr_prs.tokenizer.cli) must not pay for transformers.
`EhrTokenizer` comes through `modeling_ehr_prs`, whose import registers it with AutoTokenizer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ehr_prs.tokenizer.prs_standardizer import PrsStandardizer
    from modeling_ehr_prs.tokenization_ehr import FORMAT_VERSION, EhrTokenizer

# name -> the module that defines it
_LAZY = {
    "EhrTokenizer": "modeling_ehr_prs.tokenization_ehr",
    "FORMAT_VERSION": "modeling_ehr_prs.tokenization_ehr",
    "PrsStandardizer": "ehr_prs.tokenizer.prs_standardizer",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def inputs_at_prediction_times(*args, **kwargs):
    """See `ehr_prs.tokenizer.prediction_inputs.inputs_at_prediction_times` (imported lazily)."""
    from ehr_prs.tokenizer.prediction_inputs import inputs_at_prediction_times as impl

    return impl(*args, **kwargs)


__all__ = ["EhrTokenizer", "PrsStandardizer", "FORMAT_VERSION", "inputs_at_prediction_times"]
