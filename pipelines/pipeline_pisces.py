"""`PiscesPipeline`: text (or an image) -> the LLM's generation vectors -> a diffusers denoiser -> pixels.

The pipeline follows diffusers' Stable Diffusion XL pipeline: `check_inputs`, `encode_prompt`, `prepare_latents` and a
denoising loop in `__call__`. Its checkpoint is one folder shared with transformers (DESIGN.md section 3): the LLM and
the processor at the root, where `AutoModel` and `AutoProcessor` find them, and `model_index.json`, `decoder/`,
`vae/` and `scheduler/` beside them.
"""

import inspect
import json
import math
import os
from pathlib import Path
from typing import Callable

import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils.torch_utils import randn_tensor

from pisces.modeling_pisces import PiscesForConditionalGeneration
from pisces.processing import PiscesProcessor


OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# The components saved in sub-folders; the model and the processor live at the checkpoint root.
SUBFOLDER_COMPONENTS = ("decoder", "vae", "scheduler")


def decoder_conditioning(decoder: UNet2DConditionModel, image_embeds: torch.Tensor) -> dict:
    """
    The keyword arguments that condition `decoder` on generation vectors, shared by sampling and decoder training.

    Args:
        decoder: the denoiser.
        image_embeds (`torch.Tensor` of shape `(batch_size, num_gen_tokens, gen_hidden_size)`): the vectors.

    Returns:
        `encoder_hidden_states` (the vectors, cross-attended), plus `class_labels` = their mean `(batch_size,
        gen_hidden_size)` when the decoder has a projection class embedding (the pooled, SDXL-like conditioning).
    """
    kwargs = {"encoder_hidden_states": image_embeds}
    if decoder.config.class_embed_type == "projection":
        kwargs["class_labels"] = image_embeds.mean(dim=1)
    return kwargs


def decoder_input(decoder: UNet2DConditionModel, latents: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
    """
    The decoder's `sample` input: the noisy latents, followed, for a grid-conditioned decoder, by the vectors laid out
    on their square grid and upsampled (nearest) to the latents' size, the way diffusers' inpainting and upscaling
    UNets take extra input channels. A decoder is grid-conditioned when its `in_channels` exceed its `out_channels` by
    the vectors' width; this gives it each vector's place in the picture directly, which cross-attention alone has to
    learn.

    Args:
        latents (`torch.Tensor` of shape `(batch_size, out_channels, height, width)`).
        image_embeds (`torch.Tensor` of shape `(batch_size, num_gen_tokens, gen_hidden_size)`), num_gen_tokens square.

    Returns:
        `torch.Tensor` of shape `(batch_size, decoder.config.in_channels, height, width)`.
    """
    extra = decoder.config.in_channels - latents.shape[1]
    if extra == 0:
        return latents
    batch_size, num_tokens, width = image_embeds.shape
    side = math.isqrt(num_tokens)
    if extra != width or side * side != num_tokens:
        raise ValueError(
            f"The decoder takes {decoder.config.in_channels} input channels for {latents.shape[1]} latent channels; "
            f"a grid-conditioned decoder needs exactly the vectors' width ({width}) more, and a square number of "
            f"vectors (got {num_tokens})."
        )
    grid = image_embeds.transpose(1, 2).reshape(batch_size, width, side, side)
    grid = F.interpolate(grid.to(latents.dtype), size=latents.shape[-2:], mode="nearest")
    return torch.cat([latents, grid], dim=1)


def _check_component_folder(folder: Path, name: str, weights: bool) -> None:
    """Fails early, naming the folder, when a sub-folder component is missing or unreadable."""
    from safetensors import safe_open

    if not folder.is_dir():
        raise OSError(
            f"The checkpoint has no `{name}/` folder ({folder}), but model_index.json lists a {name}. Save the "
            f"pipeline again with `PiscesPipeline.save_pretrained`, or pass `{name}=` to `from_pretrained`."
        )
    configs = list(folder.glob("*config.json"))
    if not configs:
        raise OSError(f"The `{name}/` folder ({folder}) has no config file; the {name} cannot be loaded.")
    for config in configs:
        try:
            json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise OSError(f"The {name} config {config} is corrupt: {error}.") from error
    if weights:
        files = list(folder.glob("*.safetensors"))
        if not files:
            raise OSError(f"The `{name}/` folder ({folder}) has no .safetensors weights.")
        for file in files:
            try:
                with safe_open(file, framework="pt") as handle:
                    handle.keys()
            except Exception as error:  # safetensors raises its own error types for a bad header or size
                raise OSError(f"The {name} weights {file} are corrupt or truncated: {error}.") from error


class PiscesPipeline(DiffusionPipeline):
    r"""
    Text-to-image generation with Pisces.

    The LLM predicts `num_gen_tokens` generation vectors from the prompt (with classifier-free guidance on the
    vectors), and a diffusers denoiser, conditioned on those vectors, turns noise into an image, in the VAE's latents
    when there is a VAE and in pixels otherwise. Given an `image` instead of a prompt, the generation encoder's pooled
    vectors of that image are decoded (image variation, and the check of a trained decoder).

    Args:
        model ([`PiscesForConditionalGeneration`]): the LLM with both encoders and the generation head.
        processor ([`PiscesProcessor`]): tokenizer and image processors.
        decoder ([`UNet2DConditionModel`]): the denoiser; cross-attends to the generation vectors.
        scheduler ([`SchedulerMixin`]): any diffusers scheduler (DDPM, DDIM, Euler, FlowMatchEuler, ...).
        vae ([`AutoencoderKL`], *optional*): the latent space; without it the decoder works in pixels.
    """

    model_cpu_offload_seq = "model->decoder->vae"
    _optional_components = ["vae"]
    _callback_tensor_inputs = ["latents", "image_embeds"]

    def __init__(
        self,
        model: PiscesForConditionalGeneration,
        processor: PiscesProcessor,
        decoder: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        vae: AutoencoderKL | None = None,
    ):
        super().__init__()
        self.register_modules(model=model, processor=processor, decoder=decoder, scheduler=scheduler, vae=vae)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # ---- one folder shared with transformers ----

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        max_shard_size: int | str | None = None,
        **kwargs,
    ) -> None:
        """
        Writes the one-folder checkpoint: the model and the processor at the root (where `AutoModel*` and
        `AutoProcessor` read them), `model_index.json`, and `decoder/`, `vae/` (if any), `scheduler/`.

        Args:
            save_directory: the folder; created if missing.
            safe_serialization: must be `True`; Pisces writes safetensors only.
            max_shard_size: shard size of the model's weights (e.g. `"5GB"`), as in transformers.
        """
        if not safe_serialization:
            raise ValueError("Pisces checkpoints are written as safetensors only; drop safe_serialization=False.")
        if kwargs.get("push_to_hub"):
            raise NotImplementedError("Save to a folder, then upload it with `huggingface_hub.upload_folder`.")
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        model_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        self.model.save_pretrained(save_directory, **model_kwargs)
        self.processor.save_pretrained(save_directory)
        self.save_components(save_directory)

    def save_components(self, save_directory: str | os.PathLike) -> None:
        """
        Writes what the pipeline adds to a model folder: `decoder/`, `vae/` (if any), `scheduler/` and
        `model_index.json`. `save_pretrained` calls it after the model and the processor; a trainer that saved the
        model its own way (e.g. gathered from FSDP shards) calls it to carry the decoder over.
        """
        save_directory = Path(save_directory)
        for name in SUBFOLDER_COMPONENTS:
            component = getattr(self, name)
            if component is not None:
                component.save_pretrained(save_directory / name)
        self.save_config(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "PiscesPipeline":
        """
        Loads a Pisces checkpoint folder, or a Hub repo id (downloaded first, then loaded from the local copy).

        Takes the keyword arguments of `DiffusionPipeline.from_pretrained` (`dtype`, `device_map`, ...) and
        pre-loaded components by name, e.g. `model=` a model loaded with `device_map="auto"` across GPUs.
        """
        path = Path(pretrained_model_name_or_path)
        if not path.is_dir():
            from huggingface_hub import snapshot_download

            path = Path(
                snapshot_download(
                    str(pretrained_model_name_or_path),
                    revision=kwargs.pop("revision", None),
                    cache_dir=kwargs.pop("cache_dir", None),
                    token=kwargs.pop("token", None),
                )
            )
        index_file = path / cls.config_name
        if not index_file.is_file():
            raise OSError(
                f"{path} has no {cls.config_name}, so it is not a Pisces pipeline folder. A folder with only the "
                "model loads with `AutoModelForImageTextToText`; `PiscesPipeline.save_pretrained` writes the full one."
            )
        index = json.loads(index_file.read_text())
        for name in SUBFOLDER_COMPONENTS:
            library, class_name = index.get(name, [None, None])
            if class_name is not None and kwargs.get(name) is None:
                _check_component_folder(path / name, name, weights=name != "scheduler")
        kwargs.setdefault("use_safetensors", True)
        return super().from_pretrained(path, **kwargs)

    # ---- the steps of __call__ ----

    @property
    def default_sample_size(self) -> int:
        return self.decoder.config.sample_size

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def decoder_guidance_scale(self) -> float:
        return self._decoder_guidance_scale

    @property
    def do_decoder_guidance(self) -> bool:
        return self._decoder_guidance_scale > 1

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    def check_inputs(
        self,
        prompt,
        negative_prompt,
        image,
        image_embeds,
        height,
        width,
        num_inference_steps,
        guidance_scale,
        decoder_guidance_scale,
        num_images_per_prompt,
        output_type,
        callback_on_step_end_tensor_inputs,
    ) -> None:
        sources = [name for name, value in (("prompt", prompt), ("image", image), ("image_embeds", image_embeds)) if value is not None]
        if len(sources) != 1:
            given = " and ".join(f"`{name}`" for name in sources) if sources else "none of them"
            raise ValueError(f"Pass exactly one of `prompt`, `image` or `image_embeds`; got {given}.")
        if prompt is not None:
            if not isinstance(prompt, (str, list)) or (isinstance(prompt, list) and not all(isinstance(p, str) for p in prompt)):
                raise ValueError(f"`prompt` must be a string or a list of strings, got {type(prompt).__name__}.")
            if isinstance(prompt, list) and not prompt:
                raise ValueError("`prompt` is an empty list; pass at least one prompt.")
        if negative_prompt is not None:
            if prompt is None:
                raise ValueError("`negative_prompt` only applies with `prompt` (guidance on the LLM's vectors).")
            num_prompts = 1 if isinstance(prompt, str) else len(prompt)
            if isinstance(negative_prompt, list) and len(negative_prompt) != num_prompts:
                raise ValueError(
                    f"Got {len(negative_prompt)} negative prompts for {num_prompts} prompts; pass one string, or a "
                    "list with one negative prompt per prompt."
                )
        if image_embeds is not None:
            width_expected = self.decoder.config.encoder_hid_dim or self.decoder.config.cross_attention_dim
            if image_embeds.ndim != 3 or image_embeds.shape[-1] != width_expected:
                raise ValueError(
                    f"`image_embeds` must have shape (batch_size, num_gen_tokens, {width_expected}), got "
                    f"{tuple(image_embeds.shape)}."
                )
        multiple = self.vae_scale_factor * 2 ** (len(self.decoder.config.block_out_channels) - 1)
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % multiple:
                raise ValueError(
                    f"`{name}` must be a positive multiple of {multiple} (the VAE's and the decoder's downsampling), "
                    f"got {value}; the decoder's native size is {self.default_sample_size * self.vae_scale_factor}."
                )
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps}.")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt}.")
        for name, value in (("guidance_scale", guidance_scale), ("decoder_guidance_scale", decoder_guidance_scale)):
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be >= 1 (1 turns guidance off), got {value}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"Unknown output_type {output_type!r}; choose one of {', '.join(OUTPUT_TYPES)}.")
        unknown = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` may hold {self._callback_tensor_inputs}, got unknown {unknown}."
            )

    def encode_prompt(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        guidance_scale: float | None = None,
        device: torch.device | None = None,
    ) -> torch.Tensor:
        """
        The LLM's generation vectors for the prompts, shape `(batch_size, num_gen_tokens, gen_hidden_size)`.

        `guidance_scale` (defaults to the model config's `gen_guidance_scale`) guides the vectors against
        `negative_prompt`, by default the unconditional (empty) prompt the model was trained with.
        """
        device = device or self._execution_device
        inputs = self.processor(
            text=[prompt] if isinstance(prompt, str) else prompt,
            negative_prompt=negative_prompt,
            generation_mode="image",
            return_tensors="pt",
        ).to(device)
        return self.model.generate_image_embeddings(**inputs, guidance_scale=guidance_scale)

    def encode_image(self, image, device: torch.device | None = None) -> torch.Tensor:
        """The generation encoder's pooled vectors of images, shape `(batch_size, num_gen_tokens, gen_hidden_size)`."""
        device = device or self._execution_device
        images = image if isinstance(image, list) else [image]
        pixel_values = self.processor.gen_image_processor(images=images, return_tensors="pt")["pixel_values"]
        return self.model.model.get_gen_targets(pixel_values.to(device=device, dtype=self.model.dtype))

    def prepare_latents(self, batch_size, num_channels, height, width, dtype, device, generator, latents=None):
        shape = (batch_size, num_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"Got {len(generator)} generators for {batch_size} images (prompts x num_images_per_prompt); pass one "
                "generator, or one per image."
            )
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}.")
            latents = latents.to(device=device, dtype=dtype)
        # Flow-matching schedulers start from unit noise and have no `init_noise_sigma`.
        return latents * getattr(self.scheduler, "init_noise_sigma", 1.0)

    def prepare_extra_step_kwargs(self, generator) -> dict:
        # Schedulers differ in what `step` takes; only the stochastic ones accept a generator.
        if "generator" in inspect.signature(self.scheduler.step).parameters:
            return {"generator": generator}
        return {}

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (or pixels, without a VAE) -> images in [-1, 1], shape `(batch_size, 3, height, width)`."""
        if self.vae is None:
            return latents
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        return self.vae.decode(latents, return_dict=False)[0]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        image: PIL.Image.Image | list[PIL.Image.Image] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float | None = None,
        decoder_guidance_scale: float = 1.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generates images from prompts, from images (variation) or from given generation vectors.

        Args:
            prompt (`str` or `list[str]`): what to draw. Exactly one of `prompt`, `image`, `image_embeds`.
            negative_prompt (`str` or `list[str]`, *optional*): the unconditional row of the LLM's guidance; defaults
                to the empty prompt the model was trained with.
            image (`PIL.Image.Image` or a list of them): images to vary: their generation-encoder vectors are decoded.
            height, width (`int`, *optional*): in pixels; default to the decoder's native size.
            num_inference_steps (`int`, defaults to 25): denoising steps.
            guidance_scale (`float`, *optional*): classifier-free guidance on the LLM's vectors, `u + s * (c - u)`;
                defaults to `model.config.gen_guidance_scale`; 1 turns it off.
            decoder_guidance_scale (`float`, defaults to 1.0): classifier-free guidance in the denoiser against zero
                vectors; useful only for a decoder trained with condition dropout.
            num_images_per_prompt (`int`, defaults to 1): images per prompt (they share the vectors, not the noise).
            generator (`torch.Generator` or a list, one per image, *optional*): makes the result reproducible.
            latents (`torch.Tensor`, *optional*): initial noise, shape `(batch, channels, height / f, width / f)`.
            image_embeds (`torch.Tensor` of shape `(batch_size, num_gen_tokens, gen_hidden_size)`, *optional*):
                vectors to decode, skipping the LLM.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` or `"latent"`.
            return_dict (`bool`, defaults to `True`): return an `ImagePipelineOutput` rather than a tuple.
            callback_on_step_end (`Callable`, *optional*): called as `callback(pipe, step, timestep, tensors)` after
                each denoising step; may return a dict replacing some of those tensors.
            callback_on_step_end_tensor_inputs (`list[str]`): which tensors the callback gets (`latents`,
                `image_embeds`).

        Returns:
            [`ImagePipelineOutput`] with `images`, or the tuple `(images,)`.
        """
        native_size = self.default_sample_size * self.vae_scale_factor
        height = native_size if height is None else height
        width = native_size if width is None else width
        self.check_inputs(
            prompt,
            negative_prompt,
            image,
            image_embeds,
            height,
            width,
            num_inference_steps,
            guidance_scale,
            decoder_guidance_scale,
            num_images_per_prompt,
            output_type,
            callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale = self.model.config.gen_guidance_scale if guidance_scale is None else guidance_scale
        self._decoder_guidance_scale = decoder_guidance_scale
        device = self._execution_device

        # 1. The generation vectors: from the LLM, from the gen encoder, or given.
        if prompt is not None:
            image_embeds = self.encode_prompt(prompt, negative_prompt, self._guidance_scale, device)
        elif image is not None:
            image_embeds = self.encode_image(image, device)
        image_embeds = image_embeds.to(device=device, dtype=self.decoder.dtype)
        image_embeds = image_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        batch_size = image_embeds.shape[0]

        # 2. The decoder's conditioning; its unconditional branch is the zero vectors.
        conditioning = image_embeds
        if self.do_decoder_guidance:
            conditioning = torch.cat([torch.zeros_like(image_embeds), image_embeds])
        decoder_kwargs = decoder_conditioning(self.decoder, conditioning)

        # 3. Timesteps and initial noise.
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        latents = self.prepare_latents(
            batch_size, self.decoder.config.out_channels, height, width, self.decoder.dtype, device, generator, latents
        )
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator)

        # 4. Denoising.
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                latent_input = torch.cat([latents] * 2) if self.do_decoder_guidance else latents
                if hasattr(self.scheduler, "scale_model_input"):  # absent from flow-matching schedulers
                    latent_input = self.scheduler.scale_model_input(latent_input, t)
                latent_input = decoder_input(self.decoder, latent_input, conditioning)
                noise_pred = self.decoder(latent_input, t, **decoder_kwargs, return_dict=False)[0]
                if self.do_decoder_guidance:
                    noise_uncond, noise_cond = noise_pred.chunk(2)
                    noise_pred = noise_uncond + self.decoder_guidance_scale * (noise_cond - noise_uncond)
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    available = {"latents": latents, "image_embeds": image_embeds}
                    tensors = {name: available[name] for name in callback_on_step_end_tensor_inputs}
                    replaced = callback_on_step_end(self, i, t, tensors) or {}
                    latents = replaced.get("latents", latents)
                progress_bar.update()

        # 5. Pixels.
        if output_type == "latent":
            images = latents
        else:
            images = self.image_processor.postprocess(self.decode_latents(latents), output_type=output_type)
        self.maybe_free_model_hooks()

        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
