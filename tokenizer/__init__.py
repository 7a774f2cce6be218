"""MEDS events -> token sequences, and the HF tokenizer that saves with the model.

Importing this package registers `EhrTokenizer` with `AutoTokenizer`, so
`AutoTokenizer.from_pretrained(folder)` works for a folder written by `ehr-prs tokenize`
(the folder also carries an `auto_map` for remote-code loading without this package).

    tok = EhrTokenizer.from_pretrained("out/tokenizer")
    std = PrsStandardizer.load("out/tokenizer")
    ds = inputs_at_prediction_times(meds, labels, tok, std, prs, split="held_out")
"""

from __future__ import annotations

from transformers import AutoTokenizer, PretrainedConfig

from tokenizer.prs_standardizer import PrsStandardizer
from tokenizer.tokenization_ehr import FORMAT_VERSION, EhrTokenizer


class EhrTokenizerConfig(PretrainedConfig):
    """Registration key only: AutoTokenizer's registry is keyed by a config class."""

    model_type = "ehr_prs_tokenizer"


EhrTokenizer.register_for_auto_class("AutoTokenizer")
AutoTokenizer.register(EhrTokenizerConfig, tokenizer_class=EhrTokenizer, exist_ok=True)


def inputs_at_prediction_times(*args, **kwargs):
    """See `tokenizer.prediction_inputs.inputs_at_prediction_times` (imported lazily)."""
    from tokenizer.prediction_inputs import inputs_at_prediction_times as impl

    return impl(*args, **kwargs)


__all__ = ["EhrTokenizer", "PrsStandardizer", "FORMAT_VERSION", "inputs_at_prediction_times"]
