"""Pisces processing: `PiscesProcessor`, the chat template and the special tokens."""

from .chat_template import CHAT_TEMPLATE
from .processing_pisces import BOI_TOKEN, EOI_TOKEN, GEN_TOKEN, GENERATION_MODES, IMAGE_TOKEN, PiscesProcessor


__all__ = ["PiscesProcessor", "CHAT_TEMPLATE", "IMAGE_TOKEN", "BOI_TOKEN", "EOI_TOKEN", "GEN_TOKEN", "GENERATION_MODES"]
