"""ehr-prs's model: the hub-loadable files (config, model, tokenizer class), torch and transformers only.

Importing the package registers every Auto class, so that after `import modeling_ehr_prs`
AutoConfig / AutoModel / AutoModelForCausalLM / AutoModelForSequenceClassification / AutoTokenizer
load ehr-prs folders; save_pretrained copies the model files and a full auto_map into a folder,
so it also loads with trust_remote_code=True where this package is not installed. The stages
around the model (data, tokenization, risk, fits, evaluation, hub, views) and the `ehr-prs`
command are the `ehr_prs` package.
"""

__version__ = "0.1.0"

from transformers import (
    AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PretrainedConfig,
)

from .configuration_ehr_prs import PRESETS, EhrPrsConfig
from .modeling_ehr_prs import EhrPrsForCausalLM, EhrPrsForSequenceClassification, EhrPrsModel
from .tokenization_ehr import EhrTokenizer

__all__ = ["PRESETS", "EhrPrsConfig", "EhrPrsModel", "EhrPrsForCausalLM", "EhrPrsForSequenceClassification",
           "EhrTokenizer"]


class EhrTokenizerConfig(PretrainedConfig):
    """Registration key only: AutoTokenizer's registry is keyed by a config class (a tokenizer folder
    written by `ehr-prs tokenize` has no model config)."""

    model_type = "ehr_prs_tokenizer"


AutoConfig.register(EhrPrsConfig.model_type, EhrPrsConfig, exist_ok=True)
AutoModel.register(EhrPrsConfig, EhrPrsModel, exist_ok=True)
AutoModelForCausalLM.register(EhrPrsConfig, EhrPrsForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(EhrPrsConfig, EhrPrsForSequenceClassification, exist_ok=True)
AutoTokenizer.register(EhrPrsConfig, tokenizer_class=EhrTokenizer, exist_ok=True)
AutoTokenizer.register(EhrTokenizerConfig, tokenizer_class=EhrTokenizer, exist_ok=True)
EhrPrsConfig.register_for_auto_class("AutoConfig")
EhrPrsModel.register_for_auto_class("AutoModel")
EhrPrsForCausalLM.register_for_auto_class("AutoModelForCausalLM")
EhrPrsForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
EhrTokenizer.register_for_auto_class("AutoTokenizer")
