"""Pisces processing: `PiscesProcessor`, its keyword arguments, the chat templates, the special tokens, image inputs."""

from .chat_template import CHAT_TEMPLATE, CHATML_TEMPLATE
from .image_inputs import to_rgb_image
from .processing_pisces import (
    BOI_TOKEN,
    EOI_TOKEN,
    GEN_TOKEN,
    GENERATION_MODES,
    IMAGE_TOKEN,
    PiscesProcessor,
    PiscesProcessorKwargs,
    SequenceTooLongError,
)


__all__ = [
    "PiscesProcessor",
    "PiscesProcessorKwargs",
    "SequenceTooLongError",
    "CHAT_TEMPLATE",
    "CHATML_TEMPLATE",
    "IMAGE_TOKEN",
    "BOI_TOKEN",
    "EOI_TOKEN",
    "GEN_TOKEN",
    "GENERATION_MODES",
    "to_rgb_image",
]
