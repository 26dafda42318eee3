"""Llama 2 for the Hugging Face ecosystem. Importing the package registers its config and models with the
Auto classes, so `AutoModelForCausalLM.from_pretrained` loads a `model_type: "llama2"` checkpoint, and routes
`generate(cache_implementation="static")` through the static-cache decode step (`inference.generate_routing`)."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .configuration_llama2 import Llama2Config
from .inference import generate_routing
from .modeling_llama2 import (
    Llama2ForCausalLM,
    Llama2ForSequenceClassification,
    Llama2Model,
    Llama2PreTrainedModel,
)

AutoConfig.register(Llama2Config.model_type, Llama2Config, exist_ok=True)
AutoModel.register(Llama2Config, Llama2Model, exist_ok=True)
AutoModelForCausalLM.register(Llama2Config, Llama2ForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(Llama2Config, Llama2ForSequenceClassification, exist_ok=True)
# Set here, not in modeling_llama2.py, which the inference package imports (and whose remote-code copy has no package).
Llama2ForCausalLM.static_cache_sampler = generate_routing.sample

__all__ = [
    "Llama2Config",
    "Llama2Model",
    "Llama2PreTrainedModel",
    "Llama2ForCausalLM",
    "Llama2ForSequenceClassification",
]
