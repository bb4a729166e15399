"""Pisces: unified image understanding and generation (arXiv 2506.10395), native to transformers and diffusers.

This module is the package's face: it re-exports the public names of every layer and registers them with the
transformers Auto classes, the transformers `text-to-image` task and diffusers' `AutoPipelineForText2Image`. Every
registration is idempotent, so importing twice or reloading raises nothing.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.utils import logging as transformers_logging


# diffusers' auto-pipeline module imports CLIP and SigLIP image processors by their torchvision names, which warns on
# machines without torchvision. Pisces names its own PIL backends (DESIGN.md section 4), so that warning is noise here.
_verbosity = transformers_logging.get_verbosity()
transformers_logging.set_verbosity_error()
try:
    from diffusers.pipelines.auto_pipeline import AUTO_TEXT2IMAGE_PIPELINES_MAPPING
finally:
    transformers_logging.set_verbosity(_verbosity)

# diffusers loads a `model_index.json` component such as ["pisces", "PiscesForConditionalGeneration"] by checking it
# against the base classes it knows, looked up by name in the component's library (the top-level package in some
# diffusers versions, the defining module in others): they must be importable from `pisces` too.
from transformers import PreTrainedModel, ProcessorMixin  # noqa: F401

from .configuration_pisces import PiscesConfig
from .lora_defaults import default_lora_config, register_lora_defaults
from .modeling_pisces import (
    PiscesCausalLMOutputWithPast,
    PiscesForConditionalGeneration,
    PiscesModel,
    PiscesModelOutputWithPast,
    PiscesPreTrainedModel,
)
from pisces.processing import PiscesProcessor
from pisces.pipelines import PiscesPipeline, PiscesTextToImagePipeline, decoder_conditioning, decoder_input


__version__ = "0.1.0"

AutoConfig.register(PiscesConfig.model_type, PiscesConfig, exist_ok=True)
AutoModel.register(PiscesConfig, PiscesModel, exist_ok=True)
AutoModelForImageTextToText.register(PiscesConfig, PiscesForConditionalGeneration, exist_ok=True)
# As transformers does for Gemma 3: the text-generating class under AutoModelForCausalLM too, which is what
# AutoPeftModelForCausalLM loads an adapter's base model with.
AutoModelForCausalLM.register(PiscesConfig, PiscesForConditionalGeneration, exist_ok=True)
AutoProcessor.register(PiscesConfig, PiscesProcessor, exist_ok=True)
register_lora_defaults()  # PEFT: LoRA targets the language model only; default_lora_config adds the rest
AUTO_TEXT2IMAGE_PIPELINES_MAPPING[PiscesConfig.model_type] = PiscesPipeline
# Registering a task again logs an "overwriting" warning; a reload re-registers only if the class changed.
if PIPELINE_REGISTRY.supported_tasks.get("text-to-image", {}).get("impl") is not PiscesTextToImagePipeline:
    PIPELINE_REGISTRY.register_pipeline(
        "text-to-image", pipeline_class=PiscesTextToImagePipeline, pt_model=AutoModelForImageTextToText, type="multimodal"
    )

__all__ = [
    "PiscesConfig",
    "PiscesModel",
    "PiscesForConditionalGeneration",
    "PiscesPreTrainedModel",
    "PiscesModelOutputWithPast",
    "PiscesCausalLMOutputWithPast",
    "PiscesProcessor",
    "PiscesPipeline",
    "PiscesTextToImagePipeline",
    "decoder_conditioning",
    "decoder_input",
    "default_lora_config",
]
