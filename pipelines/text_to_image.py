"""The transformers `text-to-image` task: `pipeline("text-to-image", model=ckpt)("a prompt") -> {"image": PIL.Image}`.

transformers loads the LLM and the processor from the checkpoint root as for any task; this class adds the decoder,
VAE and scheduler from the same folder through `PiscesPipeline`, sharing the already loaded model.
"""

import torch
from transformers import Pipeline

from .pipeline_pisces import PiscesPipeline


class PiscesTextToImagePipeline(Pipeline):
    """
    Text-to-image generation with a Pisces checkpoint, as a transformers pipeline.

    Call it with a prompt or a list of prompts; generation arguments pass through to [`PiscesPipeline`]:
    `num_inference_steps`, `guidance_scale`, `decoder_guidance_scale`, `negative_prompt`, `height`, `width`,
    `generator`, or `seed` (an integer that seeds a fresh generator for each prompt).

    Returns `{"image": PIL.Image.Image}` for one prompt, a list of those for a list of prompts.
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

    def _sanitize_parameters(self, seed=None, generator=None, **generate_kwargs):
        if seed is not None and generator is not None:
            raise ValueError("Pass `seed` or `generator`, not both.")
        forward_params = dict(generate_kwargs)
        if seed is not None:
            forward_params["seed"] = seed
        if generator is not None:
            forward_params["generator"] = generator
        return {}, forward_params, {}

    def preprocess(self, prompt):
        if not isinstance(prompt, str):
            raise ValueError(f"The text-to-image pipeline takes a prompt string (or a list of them), got {type(prompt).__name__}.")
        return {"prompt": prompt}

    def _forward(self, model_inputs, seed=None, **generate_kwargs):
        if seed is not None:
            generate_kwargs["generator"] = torch.Generator(device=self.device).manual_seed(seed)
        output = self.diffusion_pipeline(prompt=model_inputs["prompt"], output_type="pil", **generate_kwargs)
        return {"images": output.images}

    def postprocess(self, model_outputs):
        return {"image": model_outputs["images"][0]}
