"""The reference model: a small Pisces trained from nothing on the shapes world, shipped inside the package.

`checkpoint/` is a complete checkpoint folder (the LLM and processor at its root; `model_index.json`, `decoder/`, `vae/`
and `scheduler/` beside them), so every entry point loads it: `AutoModelForImageTextToText`, `AutoProcessor`,
`PiscesPipeline`, `DiffusionPipeline`, `transformers.pipeline`. `pisces train reference` (`pisces.training.reference`)
reproduces it. This module imports nothing heavy: the command line asks for the path before loading anything.
"""

from pathlib import Path


REFERENCE_CHECKPOINT = Path(__file__).parent / "checkpoint"
# The record `pisces train reference` writes beside the checkpoint: every part's time, losses and the final scores.
TRAINING_LOG = "reference_training.json"


def reference_model_path() -> Path:
    """
    The folder of the reference model that ships inside the package. Raises `FileNotFoundError` if the install
    lacks it.
    """
    if not (REFERENCE_CHECKPOINT / "model_index.json").is_file():
        raise FileNotFoundError(
            f"The reference model is missing from this install ({REFERENCE_CHECKPOINT}). Reinstall pisces-hf, or "
            "train it with `pisces train reference --out DIR` and pass `--model DIR`."
        )
    return REFERENCE_CHECKPOINT


__all__ = ["REFERENCE_CHECKPOINT", "TRAINING_LOG", "reference_model_path"]
