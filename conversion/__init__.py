"""Building Pisces checkpoints: random ones for tests and sizing, and (later) assembled from public components."""

from .decoder_presets import DECODER_PRESETS, build_decoder, build_scheduler, build_tiny_vae
from .random_checkpoint import PRESETS, build_processor, build_random_checkpoint, describe_parameters, preset_config
from .tokenizer import build_tokenizer


__all__ = [
    "DECODER_PRESETS",
    "build_decoder",
    "build_scheduler",
    "build_tiny_vae",
    "PRESETS",
    "build_processor",
    "build_random_checkpoint",
    "build_tokenizer",
    "describe_parameters",
    "preset_config",
]
