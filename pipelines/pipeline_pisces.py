"""`PiscesPipeline`: text (or an image) -> the LLM's generation vectors -> a diffusers denoiser -> pixels.

The pipeline follows diffusers' Stable Diffusion XL pipeline: `check_inputs`, `encode_prompt`, `prepare_latents` and a
denoising loop in `__call__`. Its checkpoint is one folder shared with transformers: the LLM and
the processor at the root, where `AutoModel` and `AutoProcessor` find them, and `model_index.json`, `decoder/`,
`vae/` and `scheduler/` beside them.
"""

import inspect
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import logging
from diffusers.utils.torch_utils import get_module_execution_device, randn_tensor

from pisces.checkpoint_files import check_shard_index, read_safetensors_header
from pisces.modeling_pisces import PiscesForConditionalGeneration
from pisces.processing import PiscesProcessor


logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# The components saved in sub-folders; the model and the processor live at the checkpoint root.
SUBFOLDER_COMPONENTS = ("decoder", "vae", "scheduler")
# diffusers' name for the group-offloading hook in a module's hook registry (`diffusers.hooks.group_offloading`).
GROUP_OFFLOADING_HOOK = "group_offloading"


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


def retrieve_timesteps(
    scheduler, num_inference_steps: int, device, timesteps: list[int] | None = None, sigmas: list[float] | None = None
) -> tuple[torch.Tensor, int]:
    """
    Sets the scheduler's timesteps (`num_inference_steps` of them, or the custom `timesteps` or `sigmas`) and returns
    them with the number of inference steps, as diffusers' Stable Diffusion pipelines do. Written here because
    importing it from `diffusers.pipelines.stable_diffusion` would import that pipeline's CLIP image processors too.
    """
    custom = {name: value for name, value in (("timesteps", timesteps), ("sigmas", sigmas)) if value is not None}
    if len(custom) > 1:
        raise ValueError("Pass `timesteps` or `sigmas`, not both.")
    if custom:
        (name, value), = custom.items()
        if name not in inspect.signature(scheduler.set_timesteps).parameters:
            raise ValueError(
                f"{type(scheduler).__name__}.set_timesteps takes no custom `{name}`; use a scheduler that does "
                "(e.g. EulerDiscreteScheduler), or `num_inference_steps`."
            )
        scheduler.set_timesteps(**{name: value}, device=device)
        return scheduler.timesteps, len(scheduler.timesteps)
    scheduler.set_timesteps(num_inference_steps, device=device)
    return scheduler.timesteps, num_inference_steps


def _check_component_folder(folder: Path, name: str, weights: bool) -> None:
    """Fails early, naming the folder or file, when a sub-folder component is missing, unreadable, incomplete (its
    safetensors headers checked against the file sizes) or pickled."""
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
    if not weights:
        return
    files = list(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(path.name for path in folder.glob("*.bin"))
        if pickled:
            raise OSError(
                f"The `{name}/` folder ({folder}) holds pickled weights only ({', '.join(pickled)}, written with "
                "safe_serialization=False). Pisces loads safetensors only and never unpickles a checkpoint: save it "
                f"again with safe_serialization=True, or load the {name} yourself and pass `{name}=`."
            )
        raise OSError(f"The `{name}/` folder ({folder}) has no .safetensors weights.")
    for index_file in folder.glob("*.safetensors.index.json"):
        check_shard_index(index_file)
    for file in files:
        read_safetensors_header(file, f"{name} weights")


def _has_root_variant(folder: Path, variant: str) -> bool:
    """Whether the model at the checkpoint root was saved in `variant` (`model.<variant>.safetensors`, or shards
    `model.<variant>-00001-of-0000n.safetensors`)."""
    return any(folder.glob(f"model.{variant}.safetensors")) or any(folder.glob(f"model.{variant}-*.safetensors"))


def _save_component(component, folder: Path, **options) -> None:
    """Saves a component with the options its `save_pretrained` takes, as `DiffusionPipeline.save_pretrained` does
    (transformers models always write safetensors and take no `safe_serialization`; schedulers take no `variant`)."""
    parameters = inspect.signature(component.save_pretrained).parameters
    component.save_pretrained(folder, **{k: v for k, v in options.items() if k in parameters and v is not None})


@contextmanager
def run_offload_hooks(module: torch.nn.Module):
    """
    Runs `module`'s offloading hooks around a call that does not go through `module.forward`, such as the model's
    `generate_image_embeddings`. accelerate's hooks (`enable_model_cpu_offload`) and diffusers' group offloading move
    weights to the accelerator in a pre-forward hook on the module that is called; diffusers' own VAE methods
    (`decode`) trigger accelerate's with `apply_forward_hook`, but not a group-offloading one. The model's methods
    call its sub-modules, not its forward, so without this the top-level hook never fires and the weights stay on the
    CPU. Leaf-level hooks (`enable_sequential_cpu_offload`, leaf-level group offloading) fire by themselves.
    """
    accelerate_hook = getattr(module, "_hf_hook", None)
    if accelerate_hook is not None and hasattr(accelerate_hook, "pre_forward"):
        accelerate_hook.pre_forward(module)
    registry = getattr(module, "_diffusers_hook", None)
    group_hook = registry.get_hook(GROUP_OFFLOADING_HOOK) if registry is not None else None
    if group_hook is not None:
        group_hook.pre_forward(module)
    try:
        yield
    finally:
        if group_hook is not None:
            group_hook.post_forward(module, None)


class PiscesPipeline(DiffusionPipeline):
    r"""
    Text-to-image generation with Pisces.

    The LLM predicts `num_gen_tokens` generation vectors from the prompt (with classifier-free guidance on the
    vectors), and a diffusers denoiser, conditioned on those vectors, turns noise into an image, in the VAE's latents
    when there is a VAE and in pixels otherwise. Given an `image` instead of a prompt, the generation encoder's pooled
    vectors of that image are decoded (image variation, and the check of a trained decoder).

    Args:
        model ([`PiscesForConditionalGeneration`], *optional*): the LLM with both encoders and the generation head.
            Without it (and the processor) the pipeline decodes given `image_embeds` only.
        processor ([`PiscesProcessor`], *optional*): tokenizer and image processors.
        decoder ([`UNet2DConditionModel`]): the denoiser; cross-attends to the generation vectors. A pipeline with only
            `model` and `processor` (`decoder=None`, `scheduler=None`) can still `encode_prompt` and `encode_image`.
        scheduler ([`SchedulerMixin`]): any diffusers scheduler (DDPM, DDIM, Euler, FlowMatchEuler, ...).
        vae ([`AutoencoderKL`], *optional*): the latent space; without it the decoder works in pixels and must output
            3 channels.
        default_num_inference_steps (`int`, defaults to 25): the denoising steps of a call that gives none, saved in
            `model_index.json` (like SDXL's `force_zeros_for_empty_prompt`), so that a checkpoint ships the step count
            its scheduler was chosen for.
    """

    model_cpu_offload_seq = "model->decoder->vae"
    _optional_components = ["model", "processor", "vae"]
    _callback_tensor_inputs = ["latents", "image_embeds"]

    def __init__(
        self,
        model: PiscesForConditionalGeneration,
        processor: PiscesProcessor,
        decoder: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        vae: AutoencoderKL | None = None,
        default_num_inference_steps: int = 25,
    ):
        super().__init__()
        if not isinstance(default_num_inference_steps, int) or default_num_inference_steps < 1:
            raise ValueError(
                f"`default_num_inference_steps` must be a positive integer, got {default_num_inference_steps!r}."
            )
        self.register_modules(model=model, processor=processor, decoder=decoder, scheduler=scheduler, vae=vae)
        self.register_to_config(default_num_inference_steps=default_num_inference_steps)
        self.check_decoder_output()
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @property
    def vae_scale_factor(self) -> int:
        # A property, not a value fixed at construction: components can be swapped (`pipe.vae = None`).
        vae = getattr(self, "vae", None)
        return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1

    def check_decoder_output(self) -> None:
        """Refuses a decoder whose output the pipeline cannot turn into an image: without a VAE it must output RGB
        pixels (3 channels), with one it must output the VAE's latent channels."""
        decoder, vae = getattr(self, "decoder", None), getattr(self, "vae", None)
        if decoder is None:
            return
        out_channels = decoder.config.out_channels
        if vae is None and out_channels != 3:
            raise ValueError(
                f"The decoder outputs {out_channels} channels, but there is no VAE to decode them: without a VAE the "
                "decoder works in pixel space and must output 3 (RGB). Pass the VAE whose latents it denoises "
                "(`vae=`), or a pixel-space decoder."
            )
        if vae is not None and out_channels != vae.config.latent_channels:
            raise ValueError(
                f"The decoder outputs {out_channels} channels, but the VAE decodes {vae.config.latent_channels}; "
                "pass the VAE the decoder was trained with."
            )

    # ---- one folder shared with transformers ----

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        **kwargs,
    ) -> None:
        """
        Writes the one-folder checkpoint: the model and the processor at the root (where `AutoModel*` and
        `AutoProcessor` read them), `model_index.json`, and `decoder/`, `vae/` (if any), `scheduler/`. A component
        that is `None` is not written and stays `None` when loaded.

        Args:
            save_directory: the folder; created if missing.
            safe_serialization: passed, as by `DiffusionPipeline.save_pretrained`, to the components that take it (the
                decoder and the VAE; `False` writes them pickled, which `from_pretrained` then refuses to read). The
                model at the root is always written as safetensors.
            variant: writes every component's weights as `<name>.<variant>.safetensors` (e.g. `model.fp16.safetensors`,
                `decoder/diffusion_pytorch_model.fp16.safetensors`); load them with `from_pretrained(variant=...)`.
            max_shard_size: shard size of the weights (e.g. `"5GB"`), as in transformers and diffusers.
        """
        if push_to_hub:
            raise NotImplementedError("Save to a folder, then upload it with `huggingface_hub.upload_folder`.")
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        options = {"safe_serialization": safe_serialization, "variant": variant, "max_shard_size": max_shard_size}
        if self.model is not None:
            _save_component(self.model, save_directory, **options)
        if self.processor is not None:
            self.processor.save_pretrained(save_directory)
        self.save_components(save_directory, **options)

    def save_components(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
    ) -> None:
        """
        Writes what the pipeline adds to a model folder: `decoder/`, `vae/` (if any), `scheduler/` and
        `model_index.json`. `save_pretrained` calls it after the model and the processor; a trainer that saved the
        model its own way (e.g. gathered from FSDP shards) calls it to carry the decoder over.
        """
        save_directory = Path(save_directory)
        options = {"safe_serialization": safe_serialization, "variant": variant, "max_shard_size": max_shard_size}
        for name in SUBFOLDER_COMPONENTS:
            component = getattr(self, name)
            if component is not None:
                _save_component(component, save_directory / name, **options)
        self.save_config(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "PiscesPipeline":
        """
        Loads a Pisces checkpoint folder, or a Hub repo id (downloaded first, then loaded from the local copy).

        Takes the keyword arguments of `DiffusionPipeline.from_pretrained` (`dtype`, `device_map`, `variant`, ...) and
        components by name: a pre-loaded one (e.g. `model=` a model loaded with `device_map="auto"` across GPUs), or
        `None` to leave an optional one out (`model=None, processor=None` decodes given `image_embeds` only).
        Weights are read from safetensors only.
        """
        if kwargs.get("use_safetensors") is False:
            raise ValueError("Pisces loads safetensors only and never unpickles a checkpoint; drop use_safetensors=False.")
        kwargs["use_safetensors"] = True
        path = Path(pretrained_model_name_or_path)
        if not path.is_dir():
            from huggingface_hub import snapshot_download

            path = Path(
                snapshot_download(
                    str(pretrained_model_name_or_path),
                    revision=kwargs.pop("revision", None),
                    cache_dir=kwargs.pop("cache_dir", None),
                    token=kwargs.pop("token", None),
                    local_files_only=kwargs.pop("local_files_only", None) or False,
                    force_download=kwargs.pop("force_download", False),
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
            if class_name is not None and name not in kwargs:
                _check_component_folder(path / name, name, weights=name != "scheduler")
        variant = kwargs.get("variant")
        model_entry = index.get("model", [None, None])
        if variant is not None and "model" not in kwargs and model_entry[0] is not None:
            if _has_root_variant(path, variant):
                kwargs["model"] = cls._load_root_model_variant(path, variant, kwargs)
        return super().from_pretrained(path, **kwargs)

    @staticmethod
    def _load_root_model_variant(path: Path, variant: str, kwargs: dict) -> PiscesForConditionalGeneration:
        # diffusers looks for a variant's files in the components' sub-folders only, so the model at the root would
        # load its default weights (or fail when only the variant was saved); it is loaded here with the options
        # `load_sub_model` would pass it, and handed to diffusers as a pre-loaded component.
        if kwargs.get("quantization_config") is not None:
            raise ValueError(
                "variant= with quantization_config= cannot reach the model at the checkpoint root; load the model with "
                "PiscesForConditionalGeneration.from_pretrained(path, variant=..., quantization_config=...) and pass "
                "`model=`."
            )
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if isinstance(dtype, dict):
            dtype = dtype.get("model", dtype.get("default", torch.float32))
        device_map = kwargs.get("device_map")
        # The pipeline-level "balanced" strategy places whole components; a device string places this one.
        model_device_map = device_map if isinstance(device_map, str) and device_map != "balanced" else None
        return PiscesForConditionalGeneration.from_pretrained(
            path, variant=variant, dtype=dtype, device_map=model_device_map, use_safetensors=True
        ).eval()

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

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def default_guidance_scale(self) -> float:
        """The model's default classifier-free guidance on the LLM's vectors, its generation config's
        `gen_guidance_scale` (what `generate_image_embeddings` uses when given none)."""
        return self.model.generation_config.gen_guidance_scale

    def check_inputs(
        self,
        prompt,
        negative_prompt,
        image,
        image_embeds,
        height,
        width,
        num_inference_steps,
        timesteps,
        sigmas,
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
        if self.decoder is None or self.scheduler is None:
            raise ValueError(
                "This pipeline has no decoder or no scheduler, so it cannot draw; it can still `encode_prompt` and "
                "`encode_image`. Load it with its decoder and scheduler to generate images."
            )
        if (prompt is not None or image is not None) and (self.model is None or self.processor is None):
            raise ValueError(
                f"`{sources[0]}` needs the pipeline's `model` and `processor`, and this pipeline has none (it was "
                "loaded with model=None or processor=None). Pass `image_embeds` to decode given vectors, or load the "
                "pipeline with its model and processor."
            )
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
        self.check_decoder_output()
        multiple = self.vae_scale_factor * 2 ** (len(self.decoder.config.block_out_channels) - 1)
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % multiple:
                raise ValueError(
                    f"`{name}` must be a positive multiple of {multiple} (the VAE's and the decoder's downsampling), "
                    f"got {value}; the decoder's native size is {self.default_sample_size * self.vae_scale_factor}."
                )
        if timesteps is None and sigmas is None:
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

        `guidance_scale` (defaults to the model's `gen_guidance_scale`) guides the vectors against `negative_prompt`,
        by default the unconditional (empty) prompt the model was trained with. A negative prompt acts through that
        guidance only: with `guidance_scale` 1 (guidance off) it has no effect, and a warning says so.
        """
        if self.model is None or self.processor is None:
            raise ValueError("`encode_prompt` needs the pipeline's `model` and `processor`; this pipeline has none.")
        if negative_prompt is not None:
            resolved = self.default_guidance_scale() if guidance_scale is None else guidance_scale
            if resolved <= 1:
                logger.warning(
                    f"`negative_prompt` has no effect with guidance_scale {resolved:g}: it is the unconditional row of "
                    "the guidance on the LLM's vectors, which 1 turns off. Pass guidance_scale > 1 to use it."
                )
        device = device or self._execution_device
        inputs = self.processor(
            text=[prompt] if isinstance(prompt, str) else prompt,
            negative_prompt=negative_prompt,
            generation_mode="image",
            return_tensors="pt",
        ).to(device)
        with run_offload_hooks(self.model):
            image_embeds = self.model.generate_image_embeddings(**inputs, guidance_scale=guidance_scale)
        return image_embeds

    @torch.no_grad()
    def encode_image(self, image, device: torch.device | None = None) -> torch.Tensor:
        """The generation encoder's pooled vectors of images, shape `(batch_size, num_gen_tokens, gen_hidden_size)`."""
        if self.model is None or self.processor is None:
            raise ValueError("`encode_image` needs the pipeline's `model` and `processor`; this pipeline has none.")
        device = device or self._execution_device
        images = image if isinstance(image, list) else [image]
        pixel_values = self.processor.gen_image_processor(images=images, return_tensors="pt")["pixel_values"]
        pixel_values = pixel_values.to(device=device, dtype=self.model.dtype)
        with run_offload_hooks(self.model):
            image_embeds = self.model.get_gen_image_features(pixel_values).pooler_output
        return image_embeds

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

    def predict_noise(self, latents: torch.Tensor, timestep, image_embeds: torch.Tensor) -> torch.Tensor:
        """
        One decoder prediction for `latents` conditioned on `image_embeds`, guided against zero vectors when
        `do_decoder_guidance`. The conditioning (the guidance batch of vectors, their grid at the latents' size and
        their mean) is built once and reused while the vectors (the same tensor object) and the guidance stay the
        same, so that a callback can still turn guidance on or off, or replace the vectors, between steps; a callback
        returns new vectors rather than editing them in place.
        """
        guided = self.do_decoder_guidance
        latent_input = torch.cat([latents] * 2) if guided else latents
        if hasattr(self.scheduler, "scale_model_input"):  # absent from flow-matching schedulers
            latent_input = self.scheduler.scale_model_input(latent_input, timestep)
        grid, conditioning = self._conditioning(image_embeds, guided, latent_input)
        sample = latent_input if grid is None else torch.cat([latent_input, grid], dim=1)
        noise_pred = self.decoder(sample, timestep, **conditioning, return_dict=False)[0]
        if guided:
            noise_uncond, noise_cond = noise_pred.chunk(2)
            noise_pred = noise_uncond + self.decoder_guidance_scale * (noise_cond - noise_uncond)
        return noise_pred

    def _conditioning(self, image_embeds: torch.Tensor, guided: bool, latent_input: torch.Tensor):
        """The grid channels (or None) and the keyword arguments that condition the decoder, cached per vectors."""
        key = (image_embeds, guided, latent_input.shape, latent_input.dtype)
        cached = getattr(self, "_conditioning_cache", None)
        if cached is not None and cached[0][0] is image_embeds and cached[0][1:] == key[1:]:
            return cached[1]
        vectors = torch.cat([torch.zeros_like(image_embeds), image_embeds]) if guided else image_embeds
        with_grid = decoder_input(self.decoder, latent_input, vectors)
        grid = with_grid[:, latent_input.shape[1] :] if with_grid.shape[1] > latent_input.shape[1] else None
        value = (grid, decoder_conditioning(self.decoder, vectors))
        self._conditioning_cache = (key, value)
        return value

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (or pixels, without a VAE) -> images in [-1, 1], shape `(batch_size, 3, height, width)`."""
        if self.vae is None:
            return latents
        # As in SDXL: a float16 VAE that overflows in float16 (`force_upcast`) decodes in float32, then goes back.
        needs_upcasting = self.vae.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False)
        if needs_upcasting:
            self.vae.to(dtype=torch.float32)
        latents = latents.to(self.vae.dtype)
        latents_mean = getattr(self.vae.config, "latents_mean", None)
        latents_std = getattr(self.vae.config, "latents_std", None)
        if latents_mean is not None and latents_std is not None:
            view = (1, -1, 1, 1)
            latents_mean = torch.tensor(latents_mean).view(view).to(latents.device, latents.dtype)
            latents_std = torch.tensor(latents_std).view(view).to(latents.device, latents.dtype)
            latents = latents * latents_std / self.vae.config.scaling_factor + latents_mean
        else:
            latents = latents / self.vae.config.scaling_factor
        with run_offload_hooks(self.vae):
            images = self.vae.decode(latents.to(get_module_execution_device(self.vae)), return_dict=False)[0]
        if needs_upcasting:
            self.vae.to(dtype=torch.float16)
        return images

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        image: PIL.Image.Image | list[PIL.Image.Image] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        decoder_guidance_scale: float = 1.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generates images from prompts, from images (variation) or from given generation vectors.

        Args:
            prompt (`str` or `list[str]`): what to draw. Exactly one of `prompt`, `image`, `image_embeds`.
            negative_prompt (`str` or `list[str]`, *optional*): the unconditional row of the guidance on the LLM's
                vectors, in place of the empty prompt the model was trained with. It needs that guidance on
                (`guidance_scale` > 1); with guidance off (1, the shipped reference model's default) it has no effect,
                and a warning says so.
            image (`PIL.Image.Image` or a list of them): images to vary: their generation-encoder vectors are decoded.
            height, width (`int`, *optional*): in pixels; default to the decoder's native size.
            num_inference_steps (`int`, *optional*): denoising steps; defaults to the pipeline's
                `default_num_inference_steps` (in `model_index.json`; 25 unless the checkpoint says otherwise).
            timesteps (`list[int]`, *optional*): custom timesteps, for schedulers whose `set_timesteps` takes them;
                `num_inference_steps` is then ignored.
            sigmas (`list[float]`, *optional*): custom sigmas, for schedulers whose `set_timesteps` takes them.
            guidance_scale (`float`, *optional*): classifier-free guidance on the LLM's vectors, `u + s * (c - u)`;
                defaults to the model's `gen_guidance_scale`; 1 turns it off.
            decoder_guidance_scale (`float`, defaults to 1.0): classifier-free guidance in the denoiser against zero
                vectors; useful only for a decoder trained with condition dropout. A callback may change
                `pipe._decoder_guidance_scale` between steps (e.g. to turn it off after some steps).
            num_images_per_prompt (`int`, defaults to 1): images per prompt (they share the vectors, not the noise).
            generator (`torch.Generator` or a list, one per image, *optional*): makes the result reproducible.
            latents (`torch.Tensor`, *optional*): initial noise, shape `(batch, channels, height / f, width / f)`.
            image_embeds (`torch.Tensor` of shape `(batch_size, num_gen_tokens, gen_hidden_size)`, *optional*):
                vectors to decode, skipping the LLM.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` or `"latent"`.
            return_dict (`bool`, defaults to `True`): return an `ImagePipelineOutput` rather than a tuple.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*): called as
                `callback(pipe, step, timestep, tensors)` after each denoising step; the tensors it returns
                (`latents`, `image_embeds`, the vectors of one image each) replace the pipeline's.
            callback_on_step_end_tensor_inputs (`list[str]`): which tensors the callback gets (`latents`,
                `image_embeds`); a `PipelineCallback` names its own.

        Returns:
            [`ImagePipelineOutput`] with `images`, or the tuple `(images,)`.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if self.decoder is not None:
            native_size = self.default_sample_size * self.vae_scale_factor
            height = native_size if height is None else height
            width = native_size if width is None else width
        if num_inference_steps is None:
            num_inference_steps = self.config.default_num_inference_steps
        self.check_inputs(
            prompt,
            negative_prompt,
            image,
            image_embeds,
            height,
            width,
            num_inference_steps,
            timesteps,
            sigmas,
            guidance_scale,
            decoder_guidance_scale,
            num_images_per_prompt,
            output_type,
            callback_on_step_end_tensor_inputs,
        )
        if guidance_scale is None:
            guidance_scale = self.default_guidance_scale() if self.model is not None else 1.0
        self._guidance_scale = guidance_scale
        self._decoder_guidance_scale = decoder_guidance_scale
        self._interrupt = False
        device = self._execution_device

        # 1. The generation vectors: from the LLM, from the gen encoder, or given.
        if prompt is not None:
            image_embeds = self.encode_prompt(prompt, negative_prompt, self._guidance_scale, device)
        elif image is not None:
            image_embeds = self.encode_image(image, device)
        image_embeds = image_embeds.to(device=device, dtype=self.decoder.dtype)
        image_embeds = image_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        batch_size = image_embeds.shape[0]

        # 2. Timesteps and initial noise.
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps=timesteps, sigmas=sigmas
        )
        latents = self.prepare_latents(
            batch_size, self.decoder.config.out_channels, height, width, self.decoder.dtype, device, generator, latents
        )
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator)

        # 3. Denoising. Higher-order schedulers (Heun, DPM2) take `order` timesteps per step.
        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
        self._num_timesteps = len(timesteps)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                noise_pred = self.predict_noise(latents, t, image_embeds)
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    available = {"latents": latents, "image_embeds": image_embeds}
                    tensors = {name: available[name] for name in callback_on_step_end_tensor_inputs}
                    replaced = callback_on_step_end(self, i, t, tensors) or {}
                    latents = replaced.pop("latents", latents)
                    image_embeds = replaced.pop("image_embeds", image_embeds)

                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()

        # 4. Pixels.
        if output_type == "latent":
            images = latents
        else:
            images = self.image_processor.postprocess(self.decode_latents(latents), output_type=output_type)
        self._conditioning_cache = None  # holds the vectors of this call
        self.maybe_free_model_hooks()

        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
