"""MEDS events -> token sequences: vocabulary, time tokens, value bins, PRS standardiser (installed as ehr_prs.tokenizer).

The tokenizer class itself is a hub-loadable model file (modeling_ehr_prs/tokenization_ehr.py,
registered with AutoTokenizer by `import modeling_ehr_prs`); this stage builds its vocabulary
and turns MEDS data into the token datasets the model reads.

    tok = EhrTokenizer.from_pretrained("out/tokenizer")
    std = PrsStandardizer.load("out/tokenizer")
    ds = inputs_at_prediction_times(meds, labels, tok, std, prs, split="held_out")
"""

from __future__ import annotations

import modeling_ehr_prs  # noqa: F401  (registers EhrTokenizer with AutoTokenizer)
from ehr_prs.tokenizer.prs_standardizer import PrsStandardizer
from modeling_ehr_prs.tokenization_ehr import FORMAT_VERSION, EhrTokenizer


def inputs_at_prediction_times(*args, **kwargs):
    """See `ehr_prs.tokenizer.prediction_inputs.inputs_at_prediction_times` (imported lazily)."""
    from ehr_prs.tokenizer.prediction_inputs import inputs_at_prediction_times as impl

    return impl(*args, **kwargs)


__all__ = ["EhrTokenizer", "PrsStandardizer", "FORMAT_VERSION", "inputs_at_prediction_times"]
