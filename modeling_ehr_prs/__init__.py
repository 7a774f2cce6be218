"""ehr-prs: a generative EHR foundation model that also reads polygenic risk scores.

Importing the package registers the model with transformers' Auto classes (once the
model files exist). The command line is `ehr-prs` (modeling_ehr_prs.cli).
"""

__version__ = "0.1.0"
