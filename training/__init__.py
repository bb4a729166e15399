"""Training Pisces: data and collator, stage presets, the Trainer, decoder training, and the reference recipe.

Training sits above the inference layers and may use all of them: `pisces.pipelines`, `pisces.processing`, the model
(`pisces`), `pisces.conversion` (tokenizers, configs, random components), `pisces.shapes` (the reference recipe's
data) and `pisces.reference_model` (where the recipe's result ships). Nothing below it imports it. Names load on first
use, so that importing this package costs nothing until a training module is needed.
"""

import importlib


_EXPORTS = {
    "PiscesCollator": "data",
    "PiscesTrainingDataset": "data",
    "load_image_folder": "data",
    "StreamingRows": "streaming",
    "StreamingTrainingDataset": "streaming",
    "streaming_rows": "streaming",
    "STAGES": "stages",
    "apply_stage": "stages",
    "trainable_parameter_names": "stages",
    "PiscesTrainer": "trainer",
    "build_trainer": "trainer",
    "train_decoder": "decoder_training",
    "reconstruction_error": "decoder_training",
    "train_reference": "reference",
}


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


__all__ = list(_EXPORTS)
