"""Pisces pipelines: `PiscesPipeline` (diffusers) and the transformers `text-to-image` task."""

from .pipeline_pisces import PiscesPipeline, decoder_conditioning, decoder_input, run_offload_hooks
from .registration import register_pipelines
from .text_to_image import PiscesTextToImagePipeline


__all__ = [
    "PiscesPipeline",
    "PiscesTextToImagePipeline",
    "decoder_conditioning",
    "decoder_input",
    "register_pipelines",
    "run_offload_hooks",
]
