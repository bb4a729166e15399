"""Pisces: unified image understanding and generation (arXiv 2506.10395), native to transformers and diffusers.

This module is the package's face: it re-exports the public names of every layer and registers them with the
transformers Auto classes, the transformers `text-to-image` task and diffusers' `AutoPipelineForText2Image`. Every
registration is idempotent, so importing twice or reloading raises nothing.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

# diffusers loads a `model_index.json` component such as ["pisces", "PiscesForConditionalGeneration"] by checking it
# against the base classes it knows, looked up by name in the component's library (`register_pipelines` names
# `pisces` one; checkpoints written before name the defining module): they must be importable from `pisces` too.
from transformers import PreTrainedModel, ProcessorMixin  # noqa: F401

from .checkpoint_files import ConfigWeightsMismatchError, CorruptCheckpointError
from .configuration_pisces import MissingSubConfigError, PiscesConfig
from .lora_defaults import default_lora_config, register_lora_defaults
from .modeling_pisces import (
    PiscesCausalLMOutputWithPast,
    PiscesForConditionalGeneration,
    PiscesModel,
    PiscesModelOutputWithPast,
    PiscesPreTrainedModel,
)
from pisces.processing import PiscesProcessor, SequenceTooLongError
from pisces.pipelines import (
    PiscesPipeline,
    PiscesTextToImagePipeline,
    decoder_conditioning,
    decoder_input,
    register_pipelines,
)


__version__ = "0.1.0"

AutoConfig.register(PiscesConfig.model_type, PiscesConfig, exist_ok=True)
AutoModel.register(PiscesConfig, PiscesModel, exist_ok=True)
AutoModelForImageTextToText.register(PiscesConfig, PiscesForConditionalGeneration, exist_ok=True)
# As transformers does for Gemma 3: the text-generating class under AutoModelForCausalLM too, which is what
# AutoPeftModelForCausalLM loads an adapter's base model with.
AutoModelForCausalLM.register(PiscesConfig, PiscesForConditionalGeneration, exist_ok=True)
AutoProcessor.register(PiscesConfig, PiscesProcessor, exist_ok=True)
register_lora_defaults()  # PEFT: LoRA targets the language model only; default_lora_config adds the rest
# diffusers: DiffusionPipeline.from_pretrained and AutoPipelineForText2Image; transformers: the text-to-image task.
register_pipelines()

__all__ = [
    "PiscesConfig",
    "MissingSubConfigError",
    "CorruptCheckpointError",
    "ConfigWeightsMismatchError",
    "PiscesModel",
    "PiscesForConditionalGeneration",
    "PiscesPreTrainedModel",
    "PiscesModelOutputWithPast",
    "PiscesCausalLMOutputWithPast",
    "PiscesProcessor",
    "SequenceTooLongError",
    "PiscesPipeline",
    "PiscesTextToImagePipeline",
    "decoder_conditioning",
    "decoder_input",
    "default_lora_config",
]
