"""
Processor for Pisces: one tokenizer and two image processors, SigLIP for understanding and CLIP for generation targets.

- `generation_mode="text"` (understanding, captions, training): every `<image>` in the text becomes
  `num_image_tokens` copies of `<image>` and the images go through `image_processor` (`pixel_values`); every `<gen>`
  becomes `num_gen_tokens` copies of `<gen>` and `gen_images` go through `gen_image_processor` (`gen_pixel_values`).
- `generation_mode="image"` (text-to-image): every prompt is wrapped by `format_generation_prompt`, which ends in
  `<boi>`, and comes with a negative (by default the unconditional, empty) prompt, all left-padded. The output feeds
  `PiscesForConditionalGeneration.generate_image_embeddings` as is.

The unconditional prompt is defined here, once (`unconditional_prompt`, `unconditional_input_ids`).
"""

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import transformers
from transformers import BatchFeature
from transformers.image_processing_backends import PilBackend
from transformers.processing_utils import ImagesKwargs, ProcessorMixin
from transformers.utils import logging

from .chat_template import BOI_TOKEN, CHAT_TEMPLATE, EOI_TOKEN, GEN_TOKEN, IMAGE_TOKEN


logger = logging.get_logger(__name__)

GENERATION_MODES = ("text", "image")

# Keyword arguments that go to the tokenizer's `__call__` when passed flat to the processor.
_TOKENIZER_KWARGS = frozenset(
    {
        "add_special_tokens",
        "pad_to_multiple_of",
        "padding_side",
        "return_attention_mask",
        "return_token_type_ids",
        "return_overflowing_tokens",
        "return_special_tokens_mask",
        "return_offsets_mapping",
        "return_length",
        "stride",
        "verbose",
        "sanitize_control_tokens",
    }
)
# Keyword arguments that go to the understanding image processor when passed flat to the processor.
_IMAGE_KWARGS = frozenset(ImagesKwargs.__annotations__) - {"return_tensors"}


def _with_pil_backend(image_processor):
    """
    The PIL-backend twin of `image_processor` (same settings), so that a checkpoint gives the same pixel values on every
    machine: `AutoImageProcessor` picks the torchvision backend wherever torchvision is installed.
    """
    if image_processor is None or isinstance(image_processor, PilBackend):
        return image_processor
    name = type(image_processor).__name__
    base = name[: -len("Fast")] if name.endswith("Fast") else name
    pil_class = getattr(transformers, base + "Pil", None)
    if pil_class is None:
        logger.warning_once(f"{name} has no PIL-backend twin in transformers; pixel values may vary across machines.")
        return image_processor
    settings = image_processor.to_dict()
    for key in ("image_processor_type", "processor_class", "auto_map", "_processor_class"):
        settings.pop(key, None)
    return pil_class(**settings)


def _describe(value) -> str:
    """A short description of what was passed, for error messages."""
    kind = f"{type(value).__module__}.{type(value).__qualname__}".removeprefix("builtins.")
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return f"{kind} of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, (str, os.PathLike)):
        return f"{kind} {str(value)!r}"
    return kind


def _is_image_like(value) -> bool:
    return isinstance(value, (PIL.Image.Image, np.ndarray, torch.Tensor, str, os.PathLike))


def _array_to_pil(array: np.ndarray, channels_first: bool, where: str, original) -> PIL.Image.Image:
    """An HWC (or CHW if `channels_first`) or HW array, uint8 or float in [0, 1], as a PIL image."""
    if array.ndim == 3:
        # Accept either layout, preferring the usual one for the container (HWC for numpy, CHW for torch).
        first, last = array.shape[0] in (1, 3, 4), array.shape[-1] in (1, 3, 4)
        if (channels_first and first) or (not last and first):
            array = np.moveaxis(array, 0, -1)
        elif not last:
            raise ValueError(
                f"{where} ({_describe(original)}) is not an image: expected 1, 3 or 4 channels (HWC for numpy, CHW for torch)."
            )
        if array.shape[-1] == 1:
            array = array[..., 0]
    elif array.ndim != 2:
        raise ValueError(
            f"{where} ({_describe(original)}) is not an image: expected 2 (H, W) or 3 (H, W, C / C, H, W) dimensions."
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{where} ({_describe(original)}) is empty.")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        # Floats in [0, 1] are scaled to bytes; anything larger is taken to be on the 0-255 scale already.
        scale = 255.0 if float(np.nanmax(array)) <= 1.0 else 1.0
        array = np.clip(np.rint(np.nan_to_num(array) * scale), 0, 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(np.ascontiguousarray(array))


def to_rgb_image(image, index: int = 0, name: str = "image") -> PIL.Image.Image:
    """
    Converts one image to an RGB PIL image: PIL images of any mode (transparency is composited onto white), numpy
    arrays (HWC or HW, uint8 or float in [0, 1]), torch tensors (CHW or HW) and paths to existing image files.
    Raises `ValueError` naming `name`, `index` and the type given for anything else.
    """
    where = f"{name} {index}"
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ValueError(
                f"{where} ({_describe(image)}) is not an existing image file (URLs are not fetched); "
                "pass a PIL image, a numpy array, a torch tensor or the path of an image file."
            )
        try:
            with PIL.Image.open(path) as opened:
                opened.load()
                image = opened.copy()
        except (OSError, PIL.UnidentifiedImageError) as error:
            raise ValueError(f"{where} is the path {str(path)!r}, which PIL cannot read as an image: {error}") from error
    elif isinstance(image, torch.Tensor):
        array = image.detach().cpu()
        array = (array.float() if array.is_floating_point() else array).numpy()
        image = _array_to_pil(array, True, where, image)
    elif isinstance(image, np.ndarray):
        image = _array_to_pil(image, False, where, image)
    elif not isinstance(image, PIL.Image.Image):
        raise ValueError(
            f"{where} ({_describe(image)}) is not an image; expected a PIL image, a numpy array (H, W, C), a torch tensor "
            "(C, H, W) or the path of an image file."
        )

    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() if array.size and array.max() > 0 else 1.0
        image = PIL.Image.fromarray(np.clip(np.rint(array / peak * 255), 0, 255).astype(np.uint8))
    return image.convert("RGB")


def _split_batch(value) -> list:
    """A 4-D array or tensor is a batch of images; anything else is one image."""
    if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 4:
        return list(value)
    return [value]


def _images_per_sample(images, name: str, num_texts: int | None) -> tuple[list, list[list] | None]:
    """
    Normalises `images` to a flat list and, when given one list per text, to those lists.

    Returns (flat list, nested lists or None when images were given flat).
    """
    if images is None:
        return [], None
    if not isinstance(images, (list, tuple)):
        return _split_batch(images), None
    nested = any(isinstance(item, (list, tuple)) for item in images)
    if not nested:
        return [image for item in images for image in _split_batch(item)], None
    if num_texts is not None and len(images) != num_texts:
        raise ValueError(
            f"{name} has {len(images)} lists of images (one list per text) for {num_texts} texts; pass one list per "
            "text, or a flat list."
        )
    per_sample = []
    for item in images:
        items = item if isinstance(item, (list, tuple)) else [item]
        per_sample.append([image for entry in items if entry is not None for image in _split_batch(entry)])
    return [image for sample in per_sample for image in sample], per_sample


class PiscesProcessor(ProcessorMixin):
    r"""
    Constructs a Pisces processor: a tokenizer, a SigLIP image processor for understanding and a CLIP image processor
    for generation targets, in one object that saves to and loads from one folder.

    Args:
        image_processor (`SiglipImageProcessorPil`):
            Turns understanding images into `pixel_values`.
        gen_image_processor (`CLIPImageProcessorPil`):
            Turns generation targets into `gen_pixel_values` (training only).
        tokenizer (`PreTrainedTokenizerFast`):
            A tokenizer holding the `<image>`, `<boi>`, `<eoi>` and `<gen>` special tokens.
        chat_template (`str`, *optional*):
            A Jinja template; defaults to Pisces' Llama 3 template, where `{"type": "image"}` renders as `<image>`.
        num_image_tokens (`int`, *optional*, defaults to 729):
            Placeholder tokens per understanding image (`config.num_image_tokens`, from the vision encoder's patch
            grid). Set it from the model config.
        num_gen_tokens (`int`, *optional*, defaults to 64):
            Placeholder tokens per generation image (`config.num_gen_tokens`). Set it from the model config.
        image_token, boi_token, eoi_token, gen_token (`str`, *optional*):
            The special tokens; their ids are looked up in the tokenizer.
    """

    # No `*_class` attributes: ProcessorMixin finds the sub-processors by their `__init__` argument names.
    # `image_processor` is loaded with AutoImageProcessor, `gen_image_processor` from its entry in
    # processor_config.json; `from_pretrained` then pins both to the PIL backend.

    def __init__(
        self,
        image_processor=None,
        gen_image_processor=None,
        tokenizer=None,
        chat_template=None,
        num_image_tokens: int = 729,
        num_gen_tokens: int = 64,
        image_token: str = IMAGE_TOKEN,
        boi_token: str = BOI_TOKEN,
        eoi_token: str = EOI_TOKEN,
        gen_token: str = GEN_TOKEN,
        **kwargs,
    ):
        missing = [
            name
            for name, value in (
                ("image_processor", image_processor),
                ("gen_image_processor", gen_image_processor),
                ("tokenizer", tokenizer),
            )
            if value is None
        ]
        if missing:
            raise ValueError(f"PiscesProcessor needs {', '.join(missing)}; got None.")
        for name, value in (("num_image_tokens", num_image_tokens), ("num_gen_tokens", num_gen_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int (from the model config), got {value!r}.")
        if kwargs:
            logger.warning(f"PiscesProcessor ignores unknown arguments: {', '.join(sorted(kwargs))}.")

        self.num_image_tokens = num_image_tokens
        self.num_gen_tokens = num_gen_tokens
        self.image_token = image_token
        self.boi_token = boi_token
        self.eoi_token = eoi_token
        self.gen_token = gen_token
        self.image_token_id, self.boi_token_id, self.eoi_token_id, self.gen_token_id = self._special_token_ids(
            tokenizer, (image_token, boi_token, eoi_token, gen_token)
        )
        super().__init__(
            image_processor,
            gen_image_processor,
            tokenizer,
            chat_template=chat_template if chat_template is not None else CHAT_TEMPLATE,
        )

    @staticmethod
    def _special_token_ids(tokenizer, tokens: Sequence[str]) -> list[int]:
        vocab = tokenizer.get_vocab()
        missing = [token for token in tokens if token not in vocab]
        if missing:
            raise ValueError(
                f"The tokenizer lacks the Pisces special token(s) {', '.join(missing)}. Add them first, e.g. "
                f"`tokenizer.add_special_tokens({{'extra_special_tokens': {list(missing)}}})`, and resize the "
                "model's embeddings to `len(tokenizer)`."
            )
        ids = [vocab[token] for token in tokens]
        for token, token_id in zip(tokens, ids):
            encoded = tokenizer.encode(token, add_special_tokens=False)
            if encoded != [token_id]:
                raise ValueError(
                    f"The tokenizer splits {token} into {encoded} instead of keeping it as the single token "
                    f"{token_id}; add it as a special token (`tokenizer.add_special_tokens`)."
                )
        return ids

    # ----------------------------------------------------------------------------------------------------------------
    # Loading: both image processors on the PIL backend, whatever is installed.

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        processor = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        processor.image_processor = _with_pil_backend(processor.image_processor)
        processor.gen_image_processor = _with_pil_backend(processor.gen_image_processor)
        return processor

    # ----------------------------------------------------------------------------------------------------------------
    # Prompts for image generation.

    def format_generation_prompt(self, prompt: str) -> str:
        """The text-to-image prompt: the chat template on one user message, the assistant header, then `<boi>`."""
        if not isinstance(prompt, str):
            raise ValueError(f"A generation prompt must be a str, got {_describe(prompt)}.")
        messages = [{"role": "user", "content": prompt}]
        return self.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + self.boi_token

    def format_generation_sequence(self, prompt: str) -> str:
        """
        A text-to-image training text: `format_generation_prompt(prompt)`, one `<gen>` and `<eoi>`. Called with this
        text and the image as `gen_images`, the processor expands `<gen>` to `num_gen_tokens` tokens, giving the
        sequence `prompt <boi> <gen>*m <eoi>`. Caption dropout is `prompt=""`.
        """
        return self.format_generation_prompt(prompt) + self.gen_token + self.eoi_token

    @property
    def unconditional_prompt(self) -> str:
        """The unconditional text-to-image prompt (the empty prompt); caption dropout trains the model on it."""
        return self.format_generation_prompt("")

    @property
    def unconditional_input_ids(self) -> list[int]:
        """`unconditional_prompt` as token ids, ending in `<boi>`; copy it to `config.unconditional_input_ids`."""
        return self.tokenizer(self.unconditional_prompt, add_special_tokens=False)["input_ids"]

    # ----------------------------------------------------------------------------------------------------------------
    # Calling.

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        gen_images=None,
        generation_mode: str = "text",
        negative_prompt: str | list[str] | None = None,
        return_tensors=None,
        padding=True,
        truncation=None,
        max_length: int | None = None,
        **kwargs,
    ) -> BatchFeature:
        """
        Prepares inputs for the model.

        Args:
            images: understanding images (PIL, numpy HWC, torch CHW, or paths): one, a list, or one list per text.
                Each needs one `<image>` in the text. Text mode only.
            text: a string or a list of strings.
            gen_images: generation targets, in the same forms as `images`; each needs one `<gen>` in the text, which
                becomes `num_gen_tokens` `<gen>` tokens. Text mode only (training).
            generation_mode: `"text"` (understanding and training) or `"image"` (text-to-image prompts).
            negative_prompt: image mode only: one string for every prompt, or a list with one per prompt. Defaults
                to the unconditional prompt.
            return_tensors: `"pt"`, `"np"` or None (lists, and numpy pixel values).
            padding, truncation, max_length: as for the tokenizer. Truncation that would cut placeholders raises.
            kwargs: tokenizer arguments (`add_special_tokens`, `pad_to_multiple_of`, ...), image processor arguments
                (`size`, ...; understanding images), or per-modality dicts `text_kwargs`, `images_kwargs`,
                `gen_images_kwargs`.

        Returns:
            [`BatchFeature`]: text mode: `input_ids`, `attention_mask`, and `pixel_values` / `gen_pixel_values` when
            images / gen_images are given. Image mode: `input_ids`, `attention_mask`, `negative_input_ids`,
            `negative_attention_mask`, all left-padded, every row ending in `<boi>`.
        """
        if generation_mode not in GENERATION_MODES:
            raise ValueError(
                f"Unknown generation_mode {generation_mode!r}; allowed: {', '.join(map(repr, GENERATION_MODES))}."
            )
        for unsupported in ("videos", "audio"):
            if kwargs.pop(unsupported, None) is not None:
                raise ValueError(f"Pisces takes no {unsupported}.")
        text_kwargs, images_kwargs, gen_images_kwargs, extras = self._split_kwargs(kwargs)
        return_tensors = extras.pop("return_tensors", return_tensors)
        padding = text_kwargs.pop("padding", padding)
        truncation = text_kwargs.pop("truncation", truncation)
        max_length = text_kwargs.pop("max_length", max_length)
        text_kwargs.setdefault("return_token_type_ids", False)

        if generation_mode == "image":
            if images is not None or gen_images is not None:
                raise ValueError(
                    "generation_mode='image' takes text prompts only; images and gen_images belong to "
                    "generation_mode='text'."
                )
            return self._image_mode(text, negative_prompt, return_tensors, padding, truncation, max_length, text_kwargs)
        if negative_prompt is not None:
            raise ValueError("negative_prompt is only used with generation_mode='image'.")
        return self._text_mode(
            images,
            text,
            gen_images,
            return_tensors,
            padding,
            truncation,
            max_length,
            text_kwargs,
            images_kwargs,
            gen_images_kwargs,
            extras,
        )

    def _split_kwargs(self, kwargs: dict) -> tuple[dict, dict, dict, dict]:
        text_kwargs = dict(kwargs.pop("text_kwargs", None) or {})
        images_kwargs = dict(kwargs.pop("images_kwargs", None) or {})
        gen_images_kwargs = dict(kwargs.pop("gen_images_kwargs", None) or {})
        common = dict(kwargs.pop("common_kwargs", None) or {})
        extras = {}
        for key in ("return_tensors",):
            if key in common:
                extras[key] = common.pop(key)
            for group in (text_kwargs, images_kwargs, gen_images_kwargs):
                group.pop(key, None)
        for key in ("return_mm_token_type_ids",):
            if key in kwargs or key in text_kwargs:
                extras[key] = kwargs.pop(key, text_kwargs.pop(key, None))
        # offset_mapping already refers to the caller's text (see `_offsets_in_caller_text`): no replacement offsets.
        kwargs.pop("return_text_replacement_offsets", None)
        text_kwargs.pop("return_text_replacement_offsets", None)
        for key, value in {**common, **kwargs}.items():
            if key in _TOKENIZER_KWARGS:
                text_kwargs[key] = value
            elif key in _IMAGE_KWARGS:
                images_kwargs[key] = value
            else:
                logger.warning_once(f"PiscesProcessor ignores the keyword argument {key!r}.")
        return text_kwargs, images_kwargs, gen_images_kwargs, extras

    @staticmethod
    def _texts(text, allow_none: bool) -> list[str] | None:
        if text is None:
            if allow_none:
                return None
            raise ValueError("generation_mode='image' needs text: one prompt or a list of prompts.")
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)):
            raise ValueError(f"text must be a str or a list of str, got {_describe(text)}.")
        if len(texts) == 0:
            raise ValueError("Empty batch: text is an empty list.")
        for index, sample in enumerate(texts):
            if not isinstance(sample, str):
                raise ValueError(f"text {index} ({_describe(sample)}) is not a str.")
        return list(texts)

    def _tokenize(self, texts, padding, truncation, max_length, text_kwargs) -> dict:
        return self.tokenizer(
            texts,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            return_tensors=None,
            **text_kwargs,
        )

    # -- image mode --------------------------------------------------------------------------------------------------

    def _image_mode(self, text, negative_prompt, return_tensors, padding, truncation, max_length, text_kwargs):
        prompts = self._texts(text, allow_none=False)
        special = (self.image_token, self.boi_token, self.eoi_token, self.gen_token)
        for index, prompt in enumerate(prompts):
            found = [token for token in special if token in prompt]
            if found:
                raise ValueError(f"Prompt {index} contains {', '.join(found)}; text-to-image prompts are plain text.")
        if negative_prompt is None:
            negatives = [self.unconditional_prompt] * len(prompts)
        else:
            if isinstance(negative_prompt, str):
                negative_prompt = [negative_prompt] * len(prompts)
            if not isinstance(negative_prompt, (list, tuple)) or len(negative_prompt) != len(prompts):
                count = len(negative_prompt) if isinstance(negative_prompt, (list, tuple)) else _describe(negative_prompt)
                raise ValueError(
                    f"Got {count} negative prompts for {len(prompts)} prompts; pass one string, or a list with one "
                    "negative prompt per prompt."
                )
            negatives = [self.format_generation_prompt(prompt) for prompt in negative_prompt]
        formatted = [self.format_generation_prompt(prompt) for prompt in prompts]

        # The prompts hold their own <|begin_of_text|>; generation needs left padding and every row ending in <boi>.
        text_kwargs = {**text_kwargs, "add_special_tokens": False, "padding_side": "left"}
        data = {}
        for prefix, label, batch in (("", "Prompt", formatted), ("negative_", "Negative prompt", negatives)):
            encoded = self._tokenize(batch, padding, None, None, text_kwargs)
            if truncation not in (None, False, "do_not_truncate"):
                limit = max_length if max_length is not None else self.tokenizer.model_max_length
                for index, ids in enumerate(encoded["input_ids"]):
                    length = sum(encoded["attention_mask"][index]) if "attention_mask" in encoded else len(ids)
                    if length > limit:
                        raise ValueError(
                            f"{label} {index} is {length} tokens once formatted, more than "
                            f"max_length={limit}; truncating it would cut the final <boi>. Shorten the prompt."
                        )
            data[f"{prefix}input_ids"] = encoded["input_ids"]
            if "attention_mask" in encoded:
                data[f"{prefix}attention_mask"] = encoded["attention_mask"]
        return BatchFeature(data, tensor_type=return_tensors)

    # -- text mode ---------------------------------------------------------------------------------------------------

    def _text_mode(
        self,
        images,
        text,
        gen_images,
        return_tensors,
        padding,
        truncation,
        max_length,
        text_kwargs,
        images_kwargs,
        gen_images_kwargs,
        extras,
    ) -> BatchFeature:
        texts = self._texts(text, allow_none=True)
        if texts is None and images is None and gen_images is None:
            raise ValueError("Empty batch: pass text, images or both.")
        num_texts = None if texts is None else len(texts)
        flat_images, nested_images = _images_per_sample(images, "images", num_texts)
        flat_gen, nested_gen = _images_per_sample(gen_images, "gen_images", num_texts)
        if texts is None and not flat_images and not flat_gen:
            raise ValueError("Empty batch: images is empty and there is no text.")

        data = {}
        if texts is not None:
            counts = {
                "image": [sample.count(self.image_token) for sample in texts],
                "gen": [sample.count(self.gen_token) for sample in texts],
            }
            self._check_counts(counts["image"], flat_images, nested_images, images, self.image_token, "images")
            self._check_counts(counts["gen"], flat_gen, nested_gen, gen_images, self.gen_token, "gen_images")
            data.update(self._encode_texts(texts, counts, padding, truncation, max_length, text_kwargs, extras))

        if flat_images:
            pil_images = [to_rgb_image(image, index, "image") for index, image in enumerate(flat_images)]
            processed = self.image_processor(pil_images, return_tensors=return_tensors or "np", **images_kwargs)
            data["pixel_values"] = processed["pixel_values"]
        if flat_gen:
            pil_gen = [to_rgb_image(image, index, "gen_image") for index, image in enumerate(flat_gen)]
            processed = self.gen_image_processor(pil_gen, return_tensors=return_tensors or "np", **gen_images_kwargs)
            data["gen_pixel_values"] = processed["pixel_values"]
        return BatchFeature(data, tensor_type=return_tensors)

    @staticmethod
    def _check_counts(placeholders, flat, nested, given, token, name):
        """Per sample when images come one list per text, in total otherwise."""
        if nested is not None:
            for index, (count, sample) in enumerate(zip(placeholders, nested)):
                if count != len(sample):
                    raise ValueError(
                        f"Text {index} has {count} {token} placeholder(s) but {len(sample)} {name} were given for "
                        f"it; every {name[:-1]} needs exactly one {token} in its text."
                    )
            return
        total = sum(placeholders)
        if total != len(flat):
            given_text = f"{len(flat)} {name}" if given is not None else f"no {name}"
            hint = " (a chat message item {'type': 'image'} renders as one)" if name == "images" else ""
            raise ValueError(
                f"The text has {total} {token} placeholder(s) in total (per text: {placeholders}) but {given_text} "
                f"were given; every {name[:-1]} needs exactly one {token} in the text{hint}."
            )

    def _adds_bos(self) -> bool:
        bos = self.tokenizer.bos_token_id
        return bos is not None and self.tokenizer("", add_special_tokens=True)["input_ids"][:1] == [bos]

    def _encode_texts(self, texts, counts, padding, truncation, max_length, text_kwargs, extras) -> dict:
        # Text already formatted by the chat template starts with <|begin_of_text|>: don't add a second one.
        add_special_tokens = text_kwargs.get("add_special_tokens", True)
        bos = self.tokenizer.bos_token
        stripped = [0] * len(texts)
        if add_special_tokens and bos and any(sample.startswith(bos) for sample in texts) and self._adds_bos():
            stripped = [len(bos) if sample.startswith(bos) else 0 for sample in texts]
            texts = [sample[cut:] for sample, cut in zip(texts, stripped)]

        needed = [
            image * self.num_image_tokens + gen * self.num_gen_tokens
            for image, gen in zip(counts["image"], counts["gen"])
        ]
        truncating = truncation not in (None, False, "do_not_truncate")
        limit = None
        if truncating:
            limit = max_length if max_length is not None else self.tokenizer.model_max_length
            for index, (need, image, gen) in enumerate(zip(needed, counts["image"], counts["gen"])):
                if need > limit:
                    raise ValueError(
                        f"Truncation would cut image placeholders: text {index} needs {need} placeholder tokens "
                        f"({image} x {self.num_image_tokens} {self.image_token} + {gen} x {self.num_gen_tokens} "
                        f"{self.gen_token}) but max_length is {limit}."
                    )

        expanded, spans = zip(*(self._expand(sample) for sample in texts))

        encoded = self._tokenize(list(expanded), padding, truncation, max_length, text_kwargs)
        for index, ids in enumerate(encoded["input_ids"]):
            for token_id, per_item, count, token in (
                (self.image_token_id, self.num_image_tokens, counts["image"][index], self.image_token),
                (self.gen_token_id, self.num_gen_tokens, counts["gen"][index], self.gen_token),
            ):
                found = sum(1 for value in ids if value == token_id)
                if found != per_item * count:
                    reason = (
                        f"truncation to max_length={limit} cut them"
                        if truncating
                        else "the tokenizer does not keep them whole"
                    )
                    raise ValueError(
                        f"Text {index} has {found} {token} tokens after tokenization, expected {count} x {per_item} = "
                        f"{per_item * count}: {reason}. Raise max_length or shorten the text."
                    )
        data = dict(encoded)
        if "offset_mapping" in data:
            data["offset_mapping"] = [
                self._offsets_in_caller_text(row, row_spans, cut)
                for row, row_spans, cut in zip(data["offset_mapping"], spans, stripped)
            ]
        if extras.get("return_mm_token_type_ids"):
            data["mm_token_type_ids"] = self.create_mm_token_type_ids(data["input_ids"])
        return data

    def _expand(self, sample: str) -> tuple[str, list[tuple[int, int, int, int]]]:
        """Expands each placeholder; returns the text and, per placeholder, (start, end, new_start, new_end)."""
        replacements = {
            self.image_token: self.image_token * self.num_image_tokens,
            self.gen_token: self.gen_token * self.num_gen_tokens,
        }
        pieces, spans, position, growth = [], [], 0, 0
        while True:
            hits = [(sample.find(token, position), token) for token in replacements]
            hits = [(start, token) for start, token in hits if start >= 0]
            if not hits:
                break
            start, token = min(hits)
            replacement = replacements[token]
            pieces += [sample[position:start], replacement]
            spans.append((start, start + len(token), start + growth, start + growth + len(replacement)))
            growth += len(replacement) - len(token)
            position = start + len(token)
        pieces.append(sample[position:])
        return "".join(pieces), spans

    @staticmethod
    def _offsets_in_caller_text(offsets, spans, cut: int) -> list[tuple[int, int]]:
        """
        Character offsets of the expanded text mapped back to the text the caller passed: every token of an expanded
        placeholder points at the placeholder. `apply_chat_template(return_assistant_tokens_mask=True)` matches these
        offsets against the rendered (unexpanded) chat, so assistant masks are right with images on any 5.x version.
        """

        def back(position: int, is_end: bool) -> int:
            growth = 0
            for start, end, new_start, new_end in spans:
                if new_start <= position < new_end or (is_end and new_start < position <= new_end):
                    return (end if is_end else start) + cut
                if position >= new_end:
                    growth = new_end - end
            return position - growth + cut

        remapped = []
        for start, end in (tuple(pair) for pair in offsets):
            remapped.append((0, 0) if start == end == 0 else (back(start, False), back(end, True)))
        return remapped

    # ----------------------------------------------------------------------------------------------------------------
    # Decoding and metadata.

    def batch_decode(self, *args, skip_special_tokens: bool = True, **kwargs):
        """The tokenizer's `batch_decode`, dropping special tokens unless `skip_special_tokens=False`."""
        return self.tokenizer.batch_decode(*args, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, *args, skip_special_tokens: bool = True, **kwargs):
        """The tokenizer's `decode`, dropping special tokens unless `skip_special_tokens=False`."""
        return self.tokenizer.decode(*args, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        names = list(dict.fromkeys(self.tokenizer.model_input_names))
        return [name for name in names if name != "token_type_ids"] + ["pixel_values", "gen_pixel_values"]

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        """Placeholder tokens per image: `num_image_tokens` whatever the image size (images are resized)."""
        from transformers.processing_utils import MultiModalData

        data = {}
        if image_sizes is not None:
            data["num_image_tokens"] = [self.num_image_tokens] * len(image_sizes)
            data["num_image_patches"] = [1] * len(image_sizes)
        return MultiModalData(**data)


__all__ = ["PiscesProcessor", "IMAGE_TOKEN", "BOI_TOKEN", "EOI_TOKEN", "GEN_TOKEN", "GENERATION_MODES", "to_rgb_image"]
