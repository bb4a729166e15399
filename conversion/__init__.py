"""Building Pisces checkpoints: random ones for tests and sizing, and (later) assembled from public components."""

from .random_checkpoint import PRESETS, build_processor, build_random_checkpoint, describe_parameters, preset_config
from .tokenizer import build_tokenizer


__all__ = [
    "PRESETS",
    "build_processor",
    "build_random_checkpoint",
    "build_tokenizer",
    "describe_parameters",
    "preset_config",
]
