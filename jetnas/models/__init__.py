"""Hybrid models native to transformers: config, model classes, presets, conversion, teachers.

Importing this package registers `jet_nemotron` with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(dir)` loads our checkpoints without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from jetnas.models.configuration import JetNemotronConfig
from jetnas.models.modeling import JetNemotronForCausalLM, JetNemotronModel, JetNemotronPreTrainedModel

AutoConfig.register(JetNemotronConfig.model_type, JetNemotronConfig, exist_ok=True)
AutoModel.register(JetNemotronConfig, JetNemotronModel, exist_ok=True)
AutoModelForCausalLM.register(JetNemotronConfig, JetNemotronForCausalLM, exist_ok=True)

__all__ = ["JetNemotronConfig", "JetNemotronForCausalLM", "JetNemotronModel", "JetNemotronPreTrainedModel"]
