"""Training Pisces: data and collator, stage presets, the Trainer, decoder training, the reference model, and the
`pisces` command.

Names load on first use, so that `pisces --help` (which imports this package) pays for no training module.
"""

import importlib


_EXPORTS = {
    "PiscesCollator": "data",
    "PiscesTrainingDataset": "data",
    "load_image_folder": "data",
    "STAGES": "stages",
    "apply_stage": "stages",
    "trainable_parameter_names": "stages",
    "PiscesTrainer": "trainer",
    "build_trainer": "trainer",
    "train_decoder": "decoder_training",
    "reconstruction_error": "decoder_training",
    "reference_model_path": "reference",
    "train_reference": "reference",
}


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


__all__ = list(_EXPORTS)
