"""Building Pisces checkpoints: assembled from public component checkpoints, and random ones for tests and sizing."""

from .assemble import SourceError, assemble_checkpoint, choose_gen_pool_size
from .decoder_presets import DECODER_PRESETS, build_decoder, build_scheduler, build_tiny_vae
from .random_checkpoint import PRESETS, build_processor, build_random_checkpoint, describe_parameters, preset_config
from .tokenizer import build_tokenizer


__all__ = [
    "SourceError",
    "assemble_checkpoint",
    "choose_gen_pool_size",
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
