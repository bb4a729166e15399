"""The transformers `text-to-image` task: `pipeline("text-to-image", model=ckpt)("a prompt") -> {"image": PIL.Image}`.

transformers loads the LLM and the processor from the checkpoint root as for any task; this class adds the decoder,
VAE and scheduler from the same folder through `PiscesPipeline`, sharing the already loaded model.
"""

import inspect

import torch
from transformers import Pipeline

from .pipeline_pisces import PiscesPipeline


# The `PiscesPipeline.__call__` arguments the task does not pass through: the prompt is the task's input, `image` and
# `image_embeds` are other inputs than text, and the task returns its own output format.
TASK_OWNED_ARGUMENTS = ("self", "prompt", "image", "image_embeds", "return_dict")
GENERATION_ARGUMENTS = tuple(
    name for name in inspect.signature(PiscesPipeline.__call__).parameters if name not in TASK_OWNED_ARGUMENTS
)


class MissingDefaultModel(dict):
    """
    The `text-to-image` task's entry for its default model. transformers reads a task's default only when
    `pipeline(task)` is given no model; Pisces has no model on the Hub to default to, so the lookup raises an error
    that says what to pass instead of transformers' `KeyError: 'default'`.
    """

    def __init__(self, message: str):
        super().__init__(model=None)  # transformers checks `"model" in default` before reading it
        self.message = message

    def __getitem__(self, key):
        raise ValueError(self.message)


NO_DEFAULT_MODEL = MissingDefaultModel(
    'pipeline("text-to-image") needs a Pisces checkpoint: pass model= a folder written by '
    "PiscesPipeline.save_pretrained (or `pisces convert random --out DIR` for a random one), or a Hub repo id."
)


class PiscesTextToImagePipeline(Pipeline):
    """
    Text-to-image generation with a Pisces checkpoint, as a transformers pipeline.

    Call it with a prompt or a list of prompts. Every [`PiscesPipeline`] generation argument passes through
    (`negative_prompt`, `height`, `width`, `num_inference_steps`, `timesteps`, `sigmas`, `guidance_scale`,
    `decoder_guidance_scale`, `num_images_per_prompt`, `generator`, `latents`, `output_type`, `callback_on_step_end`,
    `callback_on_step_end_tensor_inputs`), and `seed`, an integer that seeds a fresh generator for each prompt.

    Returns, for each prompt, `{"image": image}`, or a list of those with `num_images_per_prompt > 1`; a list of
    prompts gives a list of those results. An image is a `PIL.Image.Image`, or with `output_type` `"np"` an array
    `(height, width, 3)` in [0, 1], `"pt"` a tensor `(3, height, width)`, `"latent"` the latents.
    """

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.processor is None:
            raise ValueError("The text-to-image pipeline needs the checkpoint's PiscesProcessor; pass `processor=`.")
        source = self.model.name_or_path
        self.diffusion_pipeline = PiscesPipeline.from_pretrained(source, model=self.model, processor=self.processor)
        if getattr(self.model, "hf_device_map", None) is None:
            self.diffusion_pipeline.to(self.device)
        self.diffusion_pipeline.set_progress_bar_config(disable=True)

    def _sanitize_parameters(self, seed=None, **generate_kwargs):
        unknown = sorted(set(generate_kwargs) - set(GENERATION_ARGUMENTS))
        if unknown:
            raise TypeError(
                f"text-to-image got unknown argument(s) {', '.join(unknown)}; it takes seed and "
                f"{', '.join(GENERATION_ARGUMENTS)}."
            )
        if seed is not None and generate_kwargs.get("generator") is not None:
            raise ValueError("Pass `seed` or `generator`, not both.")
        forward_params = dict(generate_kwargs)
        if seed is not None:
            forward_params["seed"] = seed
        return {}, forward_params, {}

    def preprocess(self, prompt):
        if not isinstance(prompt, str):
            raise ValueError(f"The text-to-image pipeline takes a prompt string (or a list of them), got {type(prompt).__name__}.")
        return {"prompt": prompt}

    def _forward(self, model_inputs, seed=None, **generate_kwargs):
        if seed is not None:
            generate_kwargs["generator"] = torch.Generator(device=self.device).manual_seed(seed)
        output = self.diffusion_pipeline(prompt=model_inputs["prompt"], **generate_kwargs)
        return {"images": output.images}

    def postprocess(self, model_outputs):
        images = model_outputs["images"]
        if len(images) == 1:
            return {"image": images[0]}
        return [{"image": image} for image in images]
