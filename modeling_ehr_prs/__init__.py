"""ehr-prs: a generative EHR foundation model that also reads polygenic risk scores.

Importing the package registers the model with transformers' Auto classes (once the
model files exist). The command line is `ehr-prs` (modeling_ehr_prs.cli).
"""

__version__ = "0.1.0"

# Auto-class registration: after `import modeling_ehr_prs`, AutoConfig / AutoModel /
# AutoModelForCausalLM / AutoModelForSequenceClassification load "ehr_prs" folders, and
# save_pretrained copies the two model files + a full auto_map into the folder, so it also
# loads with trust_remote_code=True where this package is not installed.
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from .configuration_ehr_prs import PRESETS, EhrPrsConfig
from .modeling_ehr_prs import EhrPrsForCausalLM, EhrPrsForSequenceClassification, EhrPrsModel

__all__ = ["PRESETS", "EhrPrsConfig", "EhrPrsModel", "EhrPrsForCausalLM", "EhrPrsForSequenceClassification"]

AutoConfig.register(EhrPrsConfig.model_type, EhrPrsConfig, exist_ok=True)
AutoModel.register(EhrPrsConfig, EhrPrsModel, exist_ok=True)
AutoModelForCausalLM.register(EhrPrsConfig, EhrPrsForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(EhrPrsConfig, EhrPrsForSequenceClassification, exist_ok=True)
EhrPrsConfig.register_for_auto_class("AutoConfig")
EhrPrsModel.register_for_auto_class("AutoModel")
EhrPrsForCausalLM.register_for_auto_class("AutoModelForCausalLM")
EhrPrsForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
