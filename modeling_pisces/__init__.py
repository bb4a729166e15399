"""Pisces: unified image understanding and generation (arXiv 2506.10395), native to transformers and diffusers.

This module is the package's face: it re-exports the public names of every layer and registers them with the
transformers Auto classes. Registration uses `exist_ok=True`, so importing twice or reloading raises nothing.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_pisces import PiscesConfig
from .modeling_pisces import (
    PiscesCausalLMOutputWithPast,
    PiscesForConditionalGeneration,
    PiscesModel,
    PiscesModelOutputWithPast,
    PiscesPreTrainedModel,
)
from pisces.processing import PiscesProcessor


__version__ = "0.1.0"

AutoConfig.register(PiscesConfig.model_type, PiscesConfig, exist_ok=True)
AutoModel.register(PiscesConfig, PiscesModel, exist_ok=True)
AutoModelForImageTextToText.register(PiscesConfig, PiscesForConditionalGeneration, exist_ok=True)
AutoProcessor.register(PiscesConfig, PiscesProcessor, exist_ok=True)

__all__ = [
    "PiscesConfig",
    "PiscesModel",
    "PiscesForConditionalGeneration",
    "PiscesPreTrainedModel",
    "PiscesModelOutputWithPast",
    "PiscesCausalLMOutputWithPast",
    "PiscesProcessor",
]
