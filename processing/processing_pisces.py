"""
Processor for Pisces: one tokenizer and two image processors, SigLIP for understanding and CLIP for generation targets.

It follows transformers' `ProcessorMixin` path: keyword arguments are merged by `_merge_kwargs` (flat, per modality
in `text_kwargs` / `images_kwargs`, and the Pisces keys of `PiscesProcessorKwargs`), every `<image>` is expanded by the
`replace_image_token` hook through `get_text_with_replacements`, the sub-processors load with the Auto classes on the
image-processor backend `from_pretrained(backend=...)` names, and `apply_chat_template` is the library's. Pisces' own:

- `<gen>`: every `<gen>` becomes `num_gen_tokens` copies of `<gen>` and `gen_images` go through `gen_image_processor`
  (`gen_pixel_values`), for the training sequence `prompt <boi> <gen>*m <eoi>` (`format_generation_sequence`).
- `generation_mode="image"` (text-to-image): every prompt is wrapped by `format_generation_prompt`, which ends in
  `<boi>`, and comes with a negative (by default the unconditional, empty) prompt, all left-padded. The output feeds
  `PiscesForConditionalGeneration.generate_image_embeddings` as is.
- `offset_mapping` refers to the text as passed, before placeholder expansion, so character positions found in the
  caller's text (an assistant answer, the chat template's `{% generation %}` spans) select the right tokens.

The unconditional prompt is defined here, once (`unconditional_prompt`, `unconditional_input_ids`).
"""

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Unpack

from transformers import BatchFeature
from transformers.models.auto.image_processing_auto import (
    IMAGE_PROCESSOR_MAPPING_NAMES,
    AutoImageProcessor,
    get_image_processor_class_from_name,
)
from transformers.processing_utils import ImagesKwargs, MultiModalData, ProcessingKwargs, ProcessorMixin
from transformers.utils import logging

from .chat_template import BOI_TOKEN, CHAT_TEMPLATE, EOI_TOKEN, GEN_TOKEN, IMAGE_TOKEN
from .image_inputs import describe, images_per_sample, to_rgb_image


logger = logging.get_logger(__name__)

GENERATION_MODES = ("text", "image")

# The PIL backend gives a checkpoint the same pixel values on every machine (the torchvision one is picked by
# default wherever torchvision is installed); `from_pretrained(backend="torchvision")` opts into it.
DEFAULT_IMAGE_PROCESSOR_BACKEND = "pil"


class SequenceTooLongError(ValueError):
    """A text, once formatted and expanded, does not fit in the language model's positions."""


class PiscesProcessorKwargs(ProcessingKwargs, total=False):
    """
    generation_mode (`str`, *optional*, defaults to `"text"`):
        `"text"` (understanding, captions, training) or `"image"` (text-to-image prompts, each ending in `<boi>`).
    negative_prompt (`str` or `list[str]`, *optional*):
        Image mode only: one prompt for every prompt, or one per prompt; defaults to the unconditional prompt.
    gen_images_kwargs (`ImagesKwargs`, *optional*):
        Keyword arguments of `gen_image_processor`, for `gen_images`.
    """

    generation_mode: str
    negative_prompt: str | list[str] | None
    gen_images_kwargs: ImagesKwargs


_PISCES_KEYS = ("generation_mode", "negative_prompt", "gen_images_kwargs")
_TEXT_DEFAULTS = {"padding": True, "return_token_type_ids": False}

# transformers 5.24 merges a processor's own keys in `_merge_kwargs`, with the processor's class attributes of the
# same names as defaults; 5.17 merges only the four modality dicts (defaults from `_defaults`) and fails on any
# other key, so there the Pisces keys are taken out before merging.
_MERGES_PROCESSOR_KEYS = "return_mm_token_type_ids" in ProcessingKwargs.__annotations__

try:  # transformers 5.24: `apply_chat_template(sanitize_control_tokens=True)` marks the control tokens users typed,
    # which are then plain text, not placeholders; 5.17 has no marking.
    from transformers.processing_utils import _MARKED_RE, _UNMARKED
except ImportError:
    _MARKED_RE, _UNMARKED = None, ""


class _ModalityKwargs(ProcessingKwargs, total=False):
    """`PiscesProcessorKwargs` without the Pisces keys, for transformers 5.17's `_merge_kwargs`."""

    _defaults = {"text_kwargs": _TEXT_DEFAULTS}


def _image_processor_class(type_name: str, backend: str) -> type:
    """The class transformers registers for the image processor saved as `type_name`, on `backend`."""
    for classes in IMAGE_PROCESSOR_MAPPING_NAMES.values():
        if type_name in classes.values() and classes.get(backend) is not None:
            found = get_image_processor_class_from_name(classes[backend])
            if found is not None:
                return found
    return ProcessorMixin.get_possibly_dynamic_module(type_name)


def _max_position_embeddings(config_file: Path) -> int | None:
    """`text_config.max_position_embeddings` of a local model config.json, or None (no file, or no such field)."""
    try:
        value = json.loads(config_file.read_text()).get("text_config", {}).get("max_position_embeddings")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _offsets_before_replacements(offsets, replacements: list[dict], shift: int = 0) -> list[tuple[int, int]]:
    """
    `(start, end)` character offsets into a text whose placeholders were expanded, mapped back to the text before
    (plus `shift`): every token of an expansion points at its placeholder; `(0, 0)` (added tokens, padding) stays.
    `replacements` are one text's spans in `get_text_with_replacements`' format (`span`, `new_span`).
    """

    def back(position: int, is_end: bool) -> int:
        growth = 0
        for replacement in replacements:
            (start, end), (new_start, new_end) = replacement["span"], replacement["new_span"]
            if new_start <= position < new_end or (is_end and new_start < position <= new_end):
                return (end if is_end else start) + shift
            if position >= new_end:
                growth = new_end - end
        return position - growth + shift

    return [(0, 0) if (start, end) == (0, 0) else (back(start, False), back(end, True)) for start, end in offsets]


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
        max_sequence_length (`int`, *optional*):
            Positions of the language model (`config.text_config.max_position_embeddings`). A text longer once its
            placeholders are expanded (and a text-to-image prompt that leaves no room for its `num_gen_tokens`) is
            refused, since the model would run past its positions silently. `from_pretrained` reads it from the
            checkpoint's config.json when processor_config.json does not hold it; `None` checks nothing.
    """

    # No `*_class` attributes: ProcessorMixin finds the sub-processors by their `__init__` argument names; the
    # primary `image_processor` loads with AutoImageProcessor, `gen_image_processor` from processor_config.json.
    valid_processor_kwargs = PiscesProcessorKwargs if _MERGES_PROCESSOR_KEYS else _ModalityKwargs
    # Defaults of the merged keyword arguments (transformers 5.24 reads them here, 5.17 from `_ModalityKwargs`).
    text_kwargs = _TEXT_DEFAULTS
    generation_mode = "text"
    negative_prompt = None
    gen_images_kwargs = {}

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
        max_sequence_length: int | None = None,
        **kwargs,
    ):
        given = {"image_processor": image_processor, "gen_image_processor": gen_image_processor, "tokenizer": tokenizer}
        missing = [name for name, value in given.items() if value is None]
        if missing:
            raise ValueError(f"PiscesProcessor needs {', '.join(missing)}; got None.")
        for name, value in (("num_image_tokens", num_image_tokens), ("num_gen_tokens", num_gen_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int (from the model config), got {value!r}.")
        if max_sequence_length is not None and (
            isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or max_sequence_length < 1
        ):
            raise ValueError(
                "max_sequence_length must be a positive int (the language model's max_position_embeddings) or None, "
                f"got {max_sequence_length!r}."
            )
        if kwargs:
            logger.warning(f"PiscesProcessor ignores unknown arguments: {', '.join(sorted(kwargs))}.")

        self.num_image_tokens = num_image_tokens
        self.num_gen_tokens = num_gen_tokens
        self.max_sequence_length = max_sequence_length
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
    # Loading.

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, backend: str | None = None, **kwargs):
        """
        `ProcessorMixin.from_pretrained`, with both image processors on one backend.

        Args:
            backend (`str`, *optional*, defaults to `"pil"`):
                AutoImageProcessor's `backend` for `image_processor` and `gen_image_processor`: `"pil"` gives the same
                pixel values on every machine, `"torchvision"` is faster where torchvision is installed. The
                deprecated `use_fast=True` / `False` means `"torchvision"` / `"pil"`, as in AutoImageProcessor.
        """
        use_fast = kwargs.pop("use_fast", None)
        if backend is None:
            backend = DEFAULT_IMAGE_PROCESSOR_BACKEND if use_fast is None else ("torchvision" if use_fast else "pil")
        processor = super().from_pretrained(
            pretrained_model_name_or_path, *args, image_processor_backend=backend, **kwargs
        )
        if processor.max_sequence_length is None:
            # Checkpoints saved before the processor held it: the model's own config in the same folder says it.
            processor.max_sequence_length = _max_position_embeddings(
                Path(pretrained_model_name_or_path) / (kwargs.get("subfolder") or "") / "config.json"
            )
        return processor

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        backend = kwargs.pop("image_processor_backend", DEFAULT_IMAGE_PROCESSOR_BACKEND)
        subfolder = kwargs.pop("subfolder", "")
        gen_settings = (processor_dict or {}).get("gen_image_processor")
        if not isinstance(gen_settings, dict) or "image_processor_type" not in gen_settings:
            raise OSError(
                f"{pretrained_model_name_or_path} has no gen_image_processor settings (with its image_processor_type) "
                "in processor_config.json; save the processor with PiscesProcessor.save_pretrained."
            )
        image_processor = AutoImageProcessor.from_pretrained(
            pretrained_model_name_or_path, subfolder=subfolder, backend=backend, **kwargs
        )
        gen_image_processor = _image_processor_class(gen_settings["image_processor_type"], backend)(**gen_settings)
        tokenizer = cls._load_tokenizer_from_pretrained(
            "tokenizer", pretrained_model_name_or_path, subfolder=subfolder, **kwargs
        )
        return [image_processor, gen_image_processor, tokenizer]

    # ----------------------------------------------------------------------------------------------------------------
    # Prompts for image generation.

    def format_generation_prompt(self, prompt: str) -> str:
        """The text-to-image prompt: the chat template on one user message, the assistant header, then `<boi>`."""
        if not isinstance(prompt, str):
            raise ValueError(f"A generation prompt must be a str, got {describe(prompt)}.")
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
        videos=None,
        audio=None,
        **kwargs: Unpack[PiscesProcessorKwargs],
    ) -> BatchFeature:
        """
        Prepares inputs for the model.

        Args:
            images: understanding images, in any form `to_rgb_image` takes (PIL of any mode, numpy HWC, torch CHW,
                paths, http(s) URLs, base64): one, a batch, a list, or one list per text. Each needs one `<image>`
                in the text. Text mode only.
            text: a string or a list of strings.
            gen_images: generation targets, in the same forms as `images`; each needs one `<gen>` in the text, which
                becomes `num_gen_tokens` `<gen>` tokens. Text mode only (training).
            kwargs: the keys of `PiscesProcessorKwargs` (`generation_mode`, `negative_prompt`, `gen_images_kwargs`),
                tokenizer and image processor arguments, flat (`padding`, `truncation`, `max_length`,
                `return_offsets_mapping`, `size`, ...; image arguments go to the understanding image processor) or per
                modality (`text_kwargs`, `images_kwargs`), and `return_tensors` (`"pt"`, `"np"` or None: lists, and
                numpy pixel values). Padding defaults to the longest text; truncation that would cut placeholders
                raises.

        Returns:
            [`BatchFeature`]: text mode: `input_ids`, `attention_mask`, and `pixel_values` / `gen_pixel_values` when
            images / gen_images are given (`offset_mapping`, `mm_token_type_ids` when asked for). Image mode:
            `input_ids`, `attention_mask`, `negative_input_ids`, `negative_attention_mask`, all left-padded, every
            row ending in `<boi>`.
        """
        for name, value in (("videos", videos), ("audio", audio)):
            if value is not None:
                raise ValueError(f"Pisces takes no {name}.")
        merged = self._merge_pisces_kwargs(**kwargs)
        generation_mode = merged["generation_mode"]
        if generation_mode not in GENERATION_MODES:
            raise ValueError(
                f"Unknown generation_mode {generation_mode!r}; allowed: {', '.join(map(repr, GENERATION_MODES))}."
            )
        text_kwargs = merged["text_kwargs"]
        return_tensors = text_kwargs.pop("return_tensors", None)
        # These were text kwargs before transformers 5.24 made them processor keys.
        return_mm_token_type_ids = text_kwargs.pop("return_mm_token_type_ids", merged.get("return_mm_token_type_ids"))
        # `offset_mapping` already refers to the caller's text; replacement offsets would shift it a second time.
        text_kwargs.pop("return_text_replacement_offsets", None)

        if generation_mode == "image":
            if images is not None or gen_images is not None:
                raise ValueError(
                    "generation_mode='image' takes text prompts only; images and gen_images belong to "
                    "generation_mode='text'."
                )
            return self._image_generation_prompts(text, merged["negative_prompt"], text_kwargs, return_tensors)
        if merged["negative_prompt"] is not None:
            raise ValueError("negative_prompt is only used with generation_mode='image'.")

        texts = self._texts(text, allow_none=True)
        flat_images, flat_gen = self._images_for_texts(self._unmarked(texts, text_kwargs), images, gen_images)
        data, image_replacements, gen_replacements = {}, [], []
        if flat_images:
            pil_images = [to_rgb_image(image, index, "image") for index, image in enumerate(flat_images)]
            # Stacked numpy pixel values; the BatchFeature below converts them to `return_tensors`.
            processed, image_replacements = self._process_images(
                pil_images, **{**merged["images_kwargs"], "return_tensors": "np"}
            )
            data["pixel_values"] = processed["pixel_values"]
        if flat_gen:
            pil_gen = [to_rgb_image(image, index, "gen_image") for index, image in enumerate(flat_gen)]
            processed, gen_replacements = self._process_gen_images(
                pil_gen, **{**merged["gen_images_kwargs"], "return_tensors": "np"}
            )
            data["gen_pixel_values"] = processed["pixel_values"]
        if texts is not None:
            data.update(self._encode_texts(texts, image_replacements, gen_replacements, text_kwargs))
            if return_mm_token_type_ids:
                data["mm_token_type_ids"] = self.create_mm_token_type_ids(data["input_ids"])
        return BatchFeature(data, tensor_type=return_tensors)

    def _merge_pisces_kwargs(self, **kwargs) -> dict:
        """`_merge_kwargs` over `PiscesProcessorKwargs`: per-modality dicts, plus the Pisces keys."""
        init_kwargs = self.tokenizer.init_kwargs
        if _MERGES_PROCESSOR_KEYS:
            return self._merge_kwargs(self.valid_processor_kwargs, tokenizer_init_kwargs=init_kwargs, **kwargs)
        own = {key: kwargs.pop(key) if key in kwargs else getattr(self, key) for key in _PISCES_KEYS}
        return {**self._merge_kwargs(self.valid_processor_kwargs, tokenizer_init_kwargs=init_kwargs, **kwargs), **own}

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """What one understanding image's `<image>` becomes: `num_image_tokens` copies, whatever the image size."""
        return self.image_token * self.num_image_tokens

    def replace_gen_image_token(self, gen_image_inputs: dict, gen_image_idx: int, **kwargs) -> str:
        """What one generation image's `<gen>` becomes: `num_gen_tokens` copies."""
        return self.gen_token * self.num_gen_tokens

    def _process_gen_images(self, gen_images: list, **kwargs) -> tuple[dict, list[str]]:
        """`_process_images` for the generation targets: `gen_image_processor`, and one `<gen>` replacement each."""
        processed = self.gen_image_processor(gen_images, **kwargs)
        return processed, [self.replace_gen_image_token(processed, index, **kwargs) for index in range(len(gen_images))]

    @staticmethod
    def _texts(text, allow_none: bool) -> list[str] | None:
        if text is None:
            if allow_none:
                return None
            raise ValueError("generation_mode='image' needs text: one prompt or a list of prompts.")
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)):
            raise ValueError(f"text must be a str or a list of str, got {describe(text)}.")
        if len(texts) == 0:
            raise ValueError("Empty batch: text is an empty list.")
        for index, sample in enumerate(texts):
            if not isinstance(sample, str):
                raise ValueError(f"text {index} ({describe(sample)}) is not a str.")
        return list(texts)

    # -- image mode --------------------------------------------------------------------------------------------------

    def _image_generation_prompts(self, text, negative_prompt, text_kwargs: dict, return_tensors) -> BatchFeature:
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
                given = negative_prompt
                count = len(given) if isinstance(given, (list, tuple)) else describe(given)
                raise ValueError(
                    f"Got {count} negative prompts for {len(prompts)} prompts; pass one string, or a list with one "
                    "negative prompt per prompt."
                )
            negatives = [self.format_generation_prompt(prompt) for prompt in negative_prompt]
        formatted = [self.format_generation_prompt(prompt) for prompt in prompts]

        # The prompts hold their own <|begin_of_text|>; generation needs left padding and every row ending in <boi>,
        # so a prompt too long is refused rather than truncated.
        truncation = text_kwargs.pop("truncation", None)
        limit = text_kwargs.get("max_length") or self.tokenizer.model_max_length
        text_kwargs = {**text_kwargs, "add_special_tokens": False, "padding_side": "left", "truncation": False}
        data = {}
        for prefix, label, batch in (("", "Prompt", formatted), ("negative_", "Negative prompt", negatives)):
            encoded = self.tokenizer(batch, **text_kwargs)
            if truncation not in (None, False, "do_not_truncate"):
                for index, ids in enumerate(encoded["input_ids"]):
                    length = sum(encoded["attention_mask"][index]) if "attention_mask" in encoded else len(ids)
                    if length > limit:
                        raise ValueError(
                            f"{label} {index} is {length} tokens once formatted, more than "
                            f"max_length={limit}; truncating it would cut the final <boi>. Shorten the prompt."
                        )
            self._check_fits(encoded, label, room=self.num_gen_tokens)
            data[f"{prefix}input_ids"] = encoded["input_ids"]
            if "attention_mask" in encoded:
                data[f"{prefix}attention_mask"] = encoded["attention_mask"]
        return BatchFeature(data, tensor_type=return_tensors)

    # -- text mode ---------------------------------------------------------------------------------------------------

    @staticmethod
    def _unmarked(texts, text_kwargs: dict):
        """`texts` without the control tokens `sanitize_control_tokens` marks as user text, to count placeholders."""
        if texts is None or _MARKED_RE is None or not text_kwargs.get("sanitize_control_tokens"):
            return texts
        return [_MARKED_RE.sub("", sample) for sample in texts]

    def _images_for_texts(self, texts, images, gen_images) -> tuple[list, list]:
        """The flat lists of images and gen_images, checked against the placeholders of `texts`."""
        if texts is None and images is None and gen_images is None:
            raise ValueError("Empty batch: pass text, images or both.")
        num_texts = None if texts is None else len(texts)
        flat_images, nested_images = images_per_sample(images, "images", num_texts)
        flat_gen, nested_gen = images_per_sample(gen_images, "gen_images", num_texts)
        if texts is None:
            if not flat_images and not flat_gen:
                raise ValueError("Empty batch: images is empty and there is no text.")
            return flat_images, flat_gen
        for token, name, flat, nested, given in (
            (self.image_token, "images", flat_images, nested_images, images),
            (self.gen_token, "gen_images", flat_gen, nested_gen, gen_images),
        ):
            self._check_counts([sample.count(token) for sample in texts], flat, nested, given, token, name)
        return flat_images, flat_gen

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

    def _check_fits(self, encoded, label: str, room: int, placeholders=None):
        """
        Refuses a row longer than `max_sequence_length` minus `room` (the image tokens a text-to-image prompt is
        followed by). Nothing is truncated: a cut prompt draws or answers something else than asked, and a cut at
        either end would lose the `<boi>` or the assistant header that ends it, or image placeholders.
        """
        if self.max_sequence_length is None:
            return
        limit = self.max_sequence_length - room
        for index, ids in enumerate(encoded["input_ids"]):
            length = sum(encoded["attention_mask"][index]) if "attention_mask" in encoded else len(ids)
            if length <= limit:
                continue
            detail = ""
            if placeholders is not None and any(placeholders[index]):
                images, gens = placeholders[index]
                detail = (
                    f", of which {images * self.num_image_tokens + gens * self.num_gen_tokens} are image placeholders"
                )
            after = f", and the {room} image tokens that follow it make {length + room}" if room else ""
            raise SequenceTooLongError(
                f"{label} {index} is {length} tokens once formatted{detail}{after}: more than the language model's "
                f"{self.max_sequence_length} positions (max_position_embeddings), past which it runs silently. "
                f"Shorten it by at least {length - limit} tokens."
            )

    def _adds_bos(self) -> bool:
        bos = self.tokenizer.bos_token_id
        return bos is not None and self.tokenizer("", add_special_tokens=True)["input_ids"][:1] == [bos]

    def _encode_texts(self, texts, image_replacements, gen_replacements, text_kwargs: dict) -> dict:
        # Text already formatted by the chat template starts with <|begin_of_text|>: don't add a second one.
        bos = self.tokenizer.bos_token
        cuts = [0] * len(texts)
        if text_kwargs.get("add_special_tokens", True) and bos and any(t.startswith(bos) for t in texts):
            if self._adds_bos():
                cuts = [len(bos) if sample.startswith(bos) else 0 for sample in texts]
                texts = [sample[cut:] for sample, cut in zip(texts, cuts)]
        unmarked = self._unmarked(texts, text_kwargs)
        counts = [(sample.count(self.image_token), sample.count(self.gen_token)) for sample in unmarked]
        truncation = text_kwargs.get("truncation")
        limit = None
        if truncation not in (None, False, "do_not_truncate"):
            limit = text_kwargs.get("max_length") or self.tokenizer.model_max_length
            for index, (images, gens) in enumerate(counts):
                need = images * self.num_image_tokens + gens * self.num_gen_tokens
                if need > limit:
                    raise ValueError(
                        f"Truncation would cut image placeholders: text {index} needs {need} placeholder tokens "
                        f"({images} x {self.num_image_tokens} {self.image_token} + {gens} x {self.num_gen_tokens} "
                        f"{self.gen_token}) but max_length is {limit}."
                    )

        texts, image_spans = self.get_text_with_replacements(list(texts), image_replacements)
        texts, gen_spans = self._expand_gen_tokens(texts, gen_replacements)
        data = dict(self.tokenizer(texts, **text_kwargs))
        if limit is None:
            self._check_fits(data, "Text", room=0, placeholders=counts)
        for index, ids in enumerate(data["input_ids"]):
            for token_id, per_item, count, token in (
                (self.image_token_id, self.num_image_tokens, counts[index][0], self.image_token),
                (self.gen_token_id, self.num_gen_tokens, counts[index][1], self.gen_token),
            ):
                found = sum(1 for value in ids if value == token_id)
                if found != per_item * count:
                    reason = f"truncation to max_length={limit} cut them"
                    if limit is None:
                        reason = "the tokenizer does not keep them whole"
                    raise ValueError(
                        f"Text {index} has {found} {token} tokens after tokenization, expected {count} x {per_item} = "
                        f"{per_item * count}: {reason}. Raise max_length or shorten the text."
                    )
        if "offset_mapping" in data:
            data["offset_mapping"] = [
                _offsets_before_replacements(_offsets_before_replacements(row, gen), image, shift=cut)
                for row, gen, image, cut in zip(data["offset_mapping"], gen_spans, image_spans, cuts)
            ]
        return data

    def _expand_gen_tokens(self, texts: list[str], replacements: list[str]) -> tuple[list[str], list[list[dict]]]:
        """
        Every `<gen>` replaced by its entry of `replacements`, in order, as `get_text_with_replacements` does for
        `<image>`; returns the texts and, per text, the spans in its format (`span`, `new_span`).
        """
        replacements = iter(replacements)
        expanded, spans = [], []
        for sample in texts:
            pieces, sample_spans, last, growth = [], [], 0, 0
            for match in re.finditer(_UNMARKED + re.escape(self.gen_token), sample):
                start, end = match.span()
                replacement = next(replacements)
                pieces += [sample[last:start], replacement]
                new_start = start + growth
                new_span = (new_start, new_start + len(replacement))
                sample_spans.append({"type": "gen_image", "span": (start, end), "new_span": new_span})
                growth += len(replacement) - (end - start)
                last = end
            expanded.append("".join(pieces) + sample[last:])
            spans.append(sample_spans)
        return expanded, spans

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
        data = {}
        if image_sizes is not None:
            data["num_image_tokens"] = [self.num_image_tokens] * len(image_sizes)
            data["num_image_patches"] = [1] * len(image_sizes)
        return MultiModalData(**data)


__all__ = [
    "PiscesProcessor",
    "PiscesProcessorKwargs",
    "SequenceTooLongError",
    "IMAGE_TOKEN",
    "BOI_TOKEN",
    "EOI_TOKEN",
    "GEN_TOKEN",
    "GENERATION_MODES",
    "to_rgb_image",
]
