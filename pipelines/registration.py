"""
What `import pisces` registers so that diffusers and transformers find Pisces' pipelines by the names a checkpoint
carries. The package face calls `register_pipelines()`; every step is idempotent.

diffusers resolves a `model_index.json` by name in two places, and both are module state we add to:

- `_class_name` ("PiscesPipeline"): `DiffusionPipeline.from_pretrained` and `DiffusionPipeline.download` look it up
  with `getattr` on the top-level `diffusers` module (`_get_pipeline_class` in `pipeline_loading_utils`), never on
  the module that defines the pipeline. So `diffusers.PiscesPipeline` must exist: `DiffusionPipeline.from_pretrained`
  on a local folder or on a Hub snapshot then builds a `PiscesPipeline`, with no `custom_pipeline`.
- Each component `[library, class]`: diffusers loads components from the libraries named in `LOADABLE_CLASSES`
  ("diffusers", "transformers"), from its own pipeline folders, or, for any other library, from an already imported
  module. A Hub download refuses that last kind outright (`_get_custom_components_and_folders` then expects a
  remote-code file `<component>/<library>.py`). Naming "pisces" a loadable library, with the base classes its
  components derive from (looked up by name in the `pisces` module, which re-exports them), makes
  `["pisces", "PiscesForConditionalGeneration"]` and `["pisces", "PiscesProcessor"]` load from a folder and from the
  Hub alike, and makes `save_pretrained` write that form. Checkpoints written before name the defining modules
  (`["pisces.modeling_pisces", ...]`); those still load from a folder, through the imported-module path.
"""

import diffusers
from diffusers.pipelines import pipeline_loading_utils
from transformers import AutoModelForImageTextToText
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.utils import logging as transformers_logging

from pisces.modeling_pisces import PiscesForConditionalGeneration

from .pipeline_pisces import PiscesPipeline
from .text_to_image import NO_DEFAULT_MODEL, PiscesTextToImagePipeline


# The library name Pisces components carry in `model_index.json`, and the transformers base classes diffusers checks
# them against (with the methods it saves and loads them with).
LIBRARY_NAME = "pisces"
LOADABLE_BASE_CLASSES = {
    "PreTrainedModel": ["save_pretrained", "from_pretrained"],
    "ProcessorMixin": ["save_pretrained", "from_pretrained"],
}


def register_pipelines() -> None:
    """Registers `PiscesPipeline` with diffusers (by name, and for `AutoPipelineForText2Image`) and the transformers
    `text-to-image` task."""
    pipeline_loading_utils.LOADABLE_CLASSES[LIBRARY_NAME] = LOADABLE_BASE_CLASSES
    setattr(diffusers, PiscesPipeline.__name__, PiscesPipeline)

    # diffusers' auto-pipeline module imports CLIP and SigLIP image processors by their torchvision names, which warns
    # on machines without torchvision. Pisces names its own PIL backends, so that warning is noise here.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        from diffusers.pipelines.auto_pipeline import AUTO_TEXT2IMAGE_PIPELINES_MAPPING
    finally:
        transformers_logging.set_verbosity(verbosity)
    AUTO_TEXT2IMAGE_PIPELINES_MAPPING[PiscesForConditionalGeneration.config_class.model_type] = PiscesPipeline

    # Registering a task again logs an "overwriting" warning; a reload re-registers only if the class changed.
    if PIPELINE_REGISTRY.supported_tasks.get("text-to-image", {}).get("impl") is not PiscesTextToImagePipeline:
        PIPELINE_REGISTRY.register_pipeline(
            "text-to-image",
            pipeline_class=PiscesTextToImagePipeline,
            pt_model=AutoModelForImageTextToText,
            default=NO_DEFAULT_MODEL,
            type="multimodal",
        )
