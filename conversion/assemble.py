"""Assembling a Pisces checkpoint from public component checkpoints, the way the paper starts.

`assemble_checkpoint(llm=..., und_encoder=..., gen_encoder=..., out_dir=...)` (the `pisces convert assemble` command)
takes a pretrained causal LM with its tokenizer (Llama-3.x as in the paper, Qwen2, ...), a SigLIP checkpoint for
understanding, a CLIP or SigLIP checkpoint for generation and, optionally, a diffusers decoder, VAE and scheduler, and
writes one checkpoint folder that every entry point of the package loads, ready for the
`align` stage:

- the tokenizer gains `<image>`, `<boi>`, `<eoi>` and `<gen>`; the embeddings and `lm_head` grow to match, the new
  rows start at the mean of the rows of the original vocabulary (a padded matrix with room left does not grow);
- the chat template (one `chat_template.jinja`, shared by the tokenizer and the processor) is the tokenizer's own when
  it renders `{"type": "image"}` items, else Pisces' template in the tokenizer's turn format: Llama 3, or ChatML for
  Qwen-style tokenizers. Plain-text conversations render as before;
- the LLM's weights and both vision towers are copied as given (cast to `dtype`);
- `und_projector`, `gen_projector` and `gen_head` start fresh (normal init, std = `initializer_range`), as does the
  decoder when it comes from a preset (train it with `pisces train-decoder`).

Memory: the model is built on the `meta` device and each weight is read from its safetensors file on its own, with
plain file reads (no memory map, whose pages would count against the process), cast to `dtype` and put in place. So
every weight is held once, in the target dtype, and the peak stays close to the size of the written checkpoint plus
the largest single tensor. The LLM part is written and released before the decoder is built or loaded.

Only safetensors are read; nothing is unpickled. A folder with only `pytorch_model.bin`-style weights is refused.
"""

import gc
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from pisces.processing.chat_template import CHATML_TEMPLATE


logger = logging.getLogger(__name__)

# The kinds of checkpoint each role accepts (config.json `model_type`).
UND_ENCODER_TYPES = ("siglip", "siglip_vision_model")
GEN_ENCODER_TYPES = ("clip", "clip_vision_model", "siglip", "siglip_vision_model")
# The sub-folder of a diffusers pipeline repo (e.g. an SDXL one) that holds each diffusers component.
DIFFUSERS_SUBFOLDERS = {"decoder": "unet", "vae": "vae", "scheduler": "scheduler"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# safetensors dtype names -> torch dtypes.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Buffers that older checkpoints saved but current transformers recomputes (non-persistent); skipped when found.
_RECOMPUTED_BUFFERS = ("rotary_emb.inv_freq", "embeddings.position_ids")


class SourceError(ValueError):
    """A component source of the wrong kind or format; the message names the option, the source and what was found."""


# ----------------------------------------------------------------------------------------------------------------------
# Sources: local folders or Hub repos, checked before anything is loaded.


def _listing(folder: Path, limit: int = 8) -> str:
    names = sorted(path.name + ("/" if path.is_dir() else "") for path in folder.iterdir())
    if not names:
        return "an empty folder"
    shown = ", ".join(names[:limit])
    return f"files: {shown}" + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def resolve_source(source: str | Path, role: str, allow_patterns: list[str] | None = None) -> Path:
    """
    A local folder for `source`: the folder itself, or a snapshot of the Hub repo `source` (downloaded first, only
    JSON, text and safetensors files).

    Args:
        source: a local folder or a Hub repo id (`"org/name"`).
        role: the command-line option it was given to (`"--llm"`, ...), for error messages.
        allow_patterns: the files to download from a Hub repo.
    """
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists():
        raise SourceError(f"{role} {source}: expected a checkpoint folder, found a file.")
    text = str(source)
    if text.count("/") != 1 or text.startswith((".", "/")) or text.endswith("/"):
        raise SourceError(f"{role} {source}: no such folder, and not a Hub repo id (org/name) either.")
    from huggingface_hub import snapshot_download

    patterns = allow_patterns or ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
    try:
        return Path(snapshot_download(text, allow_patterns=patterns))
    except Exception as error:  # offline mode, unknown repo, gated repo: all end here, with the hub's reason
        raise SourceError(
            f"{role} {source}: not a local folder, and downloading it from the Hub failed "
            f"({type(error).__name__}: {error})."
        ) from error


def _read_config(folder: Path, role: str, config_name: str = "config.json") -> dict:
    file = folder / config_name
    if not file.is_file():
        raise SourceError(
            f"{role} {folder}: found no {config_name}, so this is not a checkpoint folder ({_listing(folder)})."
        )
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SourceError(f"{role} {folder}: {config_name} is not valid JSON ({error}).") from error


def _describe_config(config: dict) -> str:
    kind = config.get("model_type") or config.get("_class_name") or "unknown"
    architectures = config.get("architectures") or ([config["_class_name"]] if "_class_name" in config else [])
    return f"a {kind!r} checkpoint" + (f" ({', '.join(architectures)})" if architectures else "")


def weight_files(folder: Path, role: str, stem: str = "model") -> list[Path]:
    """
    The safetensors files of a checkpoint folder, from `{stem}.safetensors.index.json` when it has one.

    Raises `SourceError` naming what was found when the folder holds only pickle weights (`pytorch_model.bin`,
    `*.pt`, ...), which are never read, or no weights at all.
    """
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [file.name for file in files if not file.is_file()]
        if missing:
            raise SourceError(f"{role} {folder}: {index.name} lists shard(s) that are missing: {', '.join(missing)}.")
        return files
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    shards = [file for file in found if file.name.startswith(f"{stem}-")]
    if shards:
        return shards
    if len(found) == 1:
        return found
    if found:
        raise SourceError(
            f"{role} {folder}: found several safetensors files ({', '.join(f.name for f in found)}) but no "
            f"{index.name} saying which ones make the model."
        )
    pickles = sorted(path.name for path in folder.iterdir() if path.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise SourceError(
            f"{role} {folder}: found only pickle weights ({', '.join(pickles[:4])}), which Pisces never unpickles. "
            "Convert them to safetensors first (in a trusted environment, `from_pretrained(...).save_pretrained(..., "
            "safe_serialization=True)`), or use the repo's safetensors revision."
        )
    raise SourceError(f"{role} {folder}: found no weights, no *.safetensors file ({_listing(folder)}).")


# ----------------------------------------------------------------------------------------------------------------------
# Reading safetensors one tensor at a time.


# Source bytes are converted through one reusable buffer of this size, never through a whole-tensor temporary.
_CHUNK_BYTES = 64 * 2**20


def read_safetensors(
    path: str | Path, dtype: torch.dtype | None = None, extra_rows: dict[str, int] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """
    Yields `(name, tensor)` for every tensor of a safetensors file, one at a time, in file order.

    Each tensor is allocated once, in its final dtype, and filled with plain file reads: straight into it when the
    dtypes match, else through one reusable 64 MiB buffer whose chunks are cast into place. Nothing is memory-mapped
    (a mapping keeps every page it touched resident, and counted, until it is closed) and no whole-tensor temporary
    is made, so the allocator is not left with freed holes either.

    Args:
        path: the `.safetensors` file.
        dtype: the dtype of floating tensors (others keep theirs); `None` keeps every tensor's own.
        extra_rows: `{name: n}` allocates `n` more rows (first dimension) for those tensors, left uninitialised for
            the caller to fill (the new tokens' embedding rows).

    Returns:
        An iterator of `(name, torch.Tensor)`, on the CPU.
    """
    path = Path(path)
    size = path.stat().st_size
    extra_rows = extra_rows or {}
    with open(path, "rb") as handle:
        try:
            header_size = int.from_bytes(handle.read(8), "little")
            if header_size <= 0 or 8 + header_size > size:
                raise ValueError(f"header size {header_size} does not fit a file of {size} bytes")
            header = json.loads(handle.read(header_size))
        except (ValueError, UnicodeDecodeError) as error:
            raise SourceError(f"{path} is not a readable safetensors file ({error}).") from error
        header.pop("__metadata__", None)
        start_of_data = 8 + header_size
        chunk = None
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise SourceError(f"{path}: tensor {name} has dtype {info['dtype']}, which Pisces does not convert.")
            source_dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            shape = list(info["shape"])
            numel = 1
            for dim in shape:
                numel *= dim
            itemsize = torch.empty((), dtype=source_dtype).element_size()
            if end - begin != numel * itemsize or start_of_data + end > size:
                raise SourceError(f"{path} is truncated or corrupt: tensor {name} does not fit the file.")
            target_dtype = dtype if dtype is not None and source_dtype.is_floating_point else source_dtype
            out_shape = list(shape)
            if name in extra_rows:
                out_shape[0] += extra_rows[name]
            tensor = torch.empty(out_shape, dtype=target_dtype)
            flat = tensor.view(-1)[:numel]  # the source rows come first
            handle.seek(start_of_data + begin)
            if target_dtype == source_dtype:
                if numel and handle.readinto(flat.view(torch.uint8).numpy()) != end - begin:
                    raise SourceError(f"{path} is truncated: tensor {name} could not be read whole.")
            else:
                if chunk is None:
                    chunk = torch.empty(_CHUNK_BYTES, dtype=torch.uint8)
                per_chunk = _CHUNK_BYTES // itemsize
                for first in range(0, numel, per_chunk):
                    count = min(per_chunk, numel - first)
                    view = chunk[: count * itemsize]
                    if handle.readinto(view.numpy()) != count * itemsize:
                        raise SourceError(f"{path} is truncated: tensor {name} could not be read whole.")
                    flat[first : first + count].copy_(view.view(source_dtype))
            yield name, tensor


def _set_tensor(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Puts `tensor` in place of the (meta) parameter or buffer `key` of `model`, checking the shape."""
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name)
    if name in module._parameters:
        old = module._parameters[name]
        if tuple(old.shape) != tuple(tensor.shape):
            raise SourceError(f"weight {key} has shape {tuple(tensor.shape)}, the model expects {tuple(old.shape)}.")
        module._parameters[name] = nn.Parameter(tensor, requires_grad=old.requires_grad)
    elif name in module._buffers:
        module._buffers[name] = tensor
    else:
        raise KeyError(key)


def _load_weights(
    model: nn.Module,
    files: list[Path],
    dtype: torch.dtype,
    rename,
    role: str,
    folder: Path,
    transform=None,
    extra_rows: dict[str, int] | None = None,
) -> set[str]:
    """
    Reads `files` into the meta `model`. `rename(source_key)` gives the model key, or None to skip the tensor;
    `transform(model_key, tensor)` may rewrite a tensor in place (the new vocabulary rows, allocated through
    `extra_rows`, keyed by source name). Returns the model keys filled.
    """
    expected = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    filled, unexpected = set(), []
    for file in files:
        for source_key, tensor in read_safetensors(file, dtype, extra_rows):
            key = rename(source_key)
            if key is None:
                continue
            if key not in expected:
                if not source_key.endswith(_RECOMPUTED_BUFFERS):
                    unexpected.append(source_key)
                continue
            if transform is not None:
                tensor = transform(key, tensor)
            try:
                _set_tensor(model, key, tensor)
            except SourceError as error:
                raise SourceError(f"{role} {folder}: {error}") from error
            filled.add(key)
    if unexpected:
        raise SourceError(
            f"{role} {folder}: found weights the model does not have ({', '.join(unexpected[:5])}"
            f"{', ...' if len(unexpected) > 5 else ''}); the checkpoint does not match its config.json."
        )
    return filled


# ----------------------------------------------------------------------------------------------------------------------
# Component checks.


def choose_gen_pool_size(gen_vision_config, num_gen_tokens: int) -> int:
    """
    The pooling side `a` that turns the generation encoder's `g x g` patch grid into `num_gen_tokens = (g / a) ** 2`
    vectors. Raises `ValueError` listing the counts the grid can give when it cannot give `num_gen_tokens`.
    """
    grid = gen_vision_config.image_size // gen_vision_config.patch_size
    possible = {(grid // side) ** 2: side for side in range(1, grid + 1) if grid % side == 0}
    if num_gen_tokens not in possible:
        choices = ", ".join(str(count) for count in sorted(possible, reverse=True))
        raise ValueError(
            f"The generation encoder's {grid}x{grid} patch grid (image_size={gen_vision_config.image_size}, "
            f"patch_size={gen_vision_config.patch_size}) cannot be average-pooled into {num_gen_tokens} tokens; "
            f"choose --num-gen-tokens from {choices}."
        )
    return possible[num_gen_tokens]


def _vision_config(config: dict, role: str, folder: Path, allowed: tuple[str, ...]):
    """The vision tower's config of a full or vision-only encoder checkpoint, without the unused pooling head."""
    from transformers import AutoConfig

    model_type = config.get("model_type")
    if model_type not in allowed:
        raise SourceError(
            f"{role} {folder}: found {_describe_config(config)}; expected one of {', '.join(allowed)}."
        )
    vision = dict(config["vision_config"]) if model_type in ("siglip", "clip") else dict(config)
    vision_type = model_type if model_type.endswith("_vision_model") else f"{model_type}_vision_model"
    for key in ("model_type", "architectures", "_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        vision.pop(key, None)
    if vision_type == "siglip_vision_model":
        # Pisces takes patch features; the attention-pooling head is unused (and breaks disk offload).
        vision["vision_use_head"] = False
    return AutoConfig.for_model(vision_type, **vision)


def _check_decoder_config(decoder_config: dict, gen_width: int, latent_channels: int, where: str) -> None:
    """Raises `SourceError` when a UNet's conditioning or channels do not fit the gen encoder and the VAE."""
    if decoder_config.get("_class_name") not in (None, "UNet2DConditionModel"):
        raise SourceError(f"{where}: found {_describe_config(decoder_config)}; expected a UNet2DConditionModel.")
    if decoder_config.get("encoder_hid_dim_type") is not None:
        width, name = decoder_config.get("encoder_hid_dim"), "encoder_hid_dim"
    else:
        width, name = decoder_config.get("cross_attention_dim"), "cross_attention_dim"
    widths = set(width) if isinstance(width, (list, tuple)) else {width}
    if widths != {gen_width}:
        raise SourceError(
            f"{where}: the decoder cross-attends to vectors of width {width} ({name}), but the generation encoder's "
            f"vectors have width {gen_width} (its hidden_size); pick a decoder and a gen encoder of the same width, or "
            "build a fresh decoder with --decoder-preset."
        )
    if decoder_config.get("addition_embed_type") is not None:
        raise SourceError(
            f"{where}: the decoder uses addition_embed_type={decoder_config['addition_embed_type']!r} (extra "
            "conditioning, as in SDXL's text-time embedding), which Pisces does not feed; its conditioning is the "
            "vectors and, optionally, their mean as a projection class embedding. Use --decoder-preset sdxl for a "
            "fresh SDXL-sized decoder."
        )
    if decoder_config.get("class_embed_type") == "projection":
        class_width = decoder_config.get("projection_class_embeddings_input_dim")
        if class_width != gen_width:
            raise SourceError(
                f"{where}: the decoder's projection class embedding takes width {class_width} "
                f"(projection_class_embeddings_input_dim) but the generation vectors have width {gen_width}."
            )
    elif decoder_config.get("class_embed_type") is not None:
        raise SourceError(
            f"{where}: the decoder has class_embed_type={decoder_config['class_embed_type']!r}; Pisces conditions "
            "on the vectors' mean through class_embed_type='projection' or on the vectors alone (None)."
        )
    in_channels = decoder_config.get("in_channels", 4)
    if in_channels != latent_channels:
        if latent_channels == 3:
            space = "3 pixel channels (no --vae)"
        else:
            space = f"the VAE's {latent_channels} latent channels"
        raise SourceError(f"{where}: the decoder takes {in_channels} input channels, but it must take {space}.")


def _diffusers_folder(folder: Path, role: str, kind: str, config_name: str) -> Path:
    """The component's own folder: `folder`, or its standard sub-folder when `folder` is a whole diffusers pipeline."""
    if (folder / config_name).is_file():
        return folder
    sub = folder / DIFFUSERS_SUBFOLDERS[kind]
    if (folder / "model_index.json").is_file() and (sub / config_name).is_file():
        return sub
    raise SourceError(
        f"{role} {folder}: found no {config_name}, neither there nor in the {DIFFUSERS_SUBFOLDERS[kind]}/ sub-folder "
        f"of a diffusers pipeline ({_listing(folder)})."
    )


def _diffusers_patterns(kind: str) -> list[str]:
    sub = DIFFUSERS_SUBFOLDERS[kind]
    names = ["config.json", "scheduler_config.json", "diffusion_pytorch_model.safetensors",
             "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model-*-of-*.safetensors"]
    return ["model_index.json", *names, *[f"{sub}/{name}" for name in names]]


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer and processor.


def _prepare_tokenizer(folder: Path, chat_template: str | None):
    """
    The LLM's tokenizer with the Pisces tokens, a pad token and left padding, and the processor's chat template.

    Returns `(tokenizer, original_length, new_token_ids, processor_chat_template)`.
    """
    from transformers import AutoTokenizer

    from pisces.processing.chat_template import BOI_TOKEN, CHAT_TEMPLATE, EOI_TOKEN, GEN_TOKEN, IMAGE_TOKEN, PAD_TOKEN

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as error:
        raise SourceError(f"--llm {folder}: found no usable tokenizer ({_listing(folder)}): {error}") from error
    original_length = len(tokenizer)
    vocab = tokenizer.get_vocab()
    missing = [token for token in (IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN, GEN_TOKEN) if token not in vocab]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    new_token_ids = tokenizer.convert_tokens_to_ids(missing)

    if tokenizer.pad_token is None:
        # Llama 3 ships no pad token but reserves one; otherwise padding reuses end-of-text (masked out anyway).
        tokenizer.pad_token = PAD_TOKEN if PAD_TOKEN in vocab else tokenizer.eos_token
    # Batched generation (understanding, and every text-to-image prompt) pads on the left.
    tokenizer.padding_side = "left"
    tokenizer.init_kwargs["padding_side"] = "left"  # what save_pretrained writes

    if chat_template is None:
        chat_template = _processor_chat_template(tokenizer, CHAT_TEMPLATE, IMAGE_TOKEN)
    # The folder holds one chat_template.jinja, read by both the tokenizer and the processor: keep them equal in memory
    # too. It is the tokenizer's own whenever that one renders images.
    tokenizer.chat_template = chat_template
    return tokenizer, original_length, new_token_ids, chat_template


def _processor_chat_template(tokenizer, llama3_template: str, image_token: str) -> str:
    """
    The processor's template must render `{"type": "image"}` items as `<image>`: the tokenizer's own when it does,
    else Pisces' template in the tokenizer's turn format (ChatML for Qwen-style tokenizers, Llama 3 otherwise).
    """
    if tokenizer.chat_template is not None:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
        try:
            rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # templates that only take string content raise on a content list
            rendered = ""
        if isinstance(rendered, str) and rendered.count(image_token) == 1:
            return tokenizer.chat_template
    vocab = tokenizer.get_vocab()
    if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
        return CHATML_TEMPLATE
    if "<|start_header_id|>" not in vocab:
        logger.warning(
            "The LLM's tokenizer has neither Llama 3 nor ChatML turn tokens; the processor uses Pisces' Llama 3 chat "
            "template. Pass chat_template= to assemble_checkpoint to use another."
        )
    return llama3_template


def _image_processor(folder: Path, vision_config, role: str):
    """The encoder's image processor on the PIL backend, or a default one sized for it; checked against `image_size`."""
    import PIL.Image
    import transformers
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

    side = vision_config.image_size
    settings_file = folder / "preprocessor_config.json"
    if settings_file.is_file():
        # The PIL-backend class named by the file, loaded directly: AutoImageProcessor picks (and in some transformers
        # versions requires) torchvision, and pixel values must not depend on what is installed.
        name = str(json.loads(settings_file.read_text()).get("image_processor_type", ""))
        base = name.removesuffix("Fast").removesuffix("Pil")
        processor_class = getattr(transformers, base + "Pil", None)
        if processor_class is None:
            raise SourceError(
                f"{role} {folder}: preprocessor_config.json names image_processor_type={name!r}, which has no PIL "
                "backend in transformers; expected a SigLIP or CLIP image processor."
            )
        processor = processor_class.from_pretrained(folder)
    elif vision_config.model_type == "clip_vision_model":
        processor = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    else:
        processor = SiglipImageProcessorPil(size={"height": side, "width": side})
    # A wide test image shows what the processor really produces (a resize without a crop keeps the aspect ratio).
    pixel_values = processor(images=PIL.Image.new("RGB", (2 * side, side)), return_tensors="pt")["pixel_values"]
    produced = tuple(pixel_values.shape[-2:])
    if produced != (side, side):
        raise SourceError(
            f"{role} {folder}: its image processor produces {produced[0]}x{produced[1]} images, but the encoder takes "
            f"{side}x{side} (image_size); fix preprocessor_config.json (size / crop_size)."
        )
    return processor


# ----------------------------------------------------------------------------------------------------------------------
# The assembly.


def _parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif str(dtype) in DTYPES:
        return DTYPES[str(dtype)]
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")


def _text_config(llm_config: dict, folder: Path):
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = llm_config.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise SourceError(
            f"--llm {folder}: found {_describe_config(llm_config)}, which is not a causal language model; expected an "
            "AutoModelForCausalLM checkpoint such as Llama 3.x or Qwen2."
        )
    text_config = AutoConfig.from_pretrained(folder)
    # A sub-config of Pisces now, not a checkpoint of its own; the top-level config records the dtype.
    text_config.architectures = None
    text_config._name_or_path = ""
    text_config.dtype = None
    return text_config


def _fresh_init(model, modules: list[nn.Module], dtype: torch.dtype) -> None:
    """Materialises meta modules on the CPU with the model's own `_init_weights`, then casts them to `dtype`."""
    for module in modules:
        module.to_empty(device="cpu")
        for sub in module.modules():
            model._init_weights(sub)
        module.to(dtype)


def _to_meta(module: nn.Module) -> None:
    """Releases a written module's weights, keeping its structure (for `model_index.json`)."""
    module.to("meta")
    gc.collect()


def assemble_checkpoint(
    llm: str | Path,
    und_encoder: str | Path,
    gen_encoder: str | Path,
    out_dir: str | Path,
    decoder: str | Path | None = None,
    decoder_preset: str | None = None,
    vae: str | Path | None = None,
    scheduler: str | Path | None = None,
    num_gen_tokens: int = 64,
    dtype: str | torch.dtype = "bfloat16",
    max_shard_size: int | str = "5GB",
    chat_template: str | None = None,
    seed: int = 0,
) -> Path:
    """
    Writes a Pisces checkpoint folder assembled from public component checkpoints and returns its path.

    Args:
        llm: an `AutoModelForCausalLM` checkpoint with its tokenizer (a folder or a Hub repo id).
        und_encoder: a SigLIP checkpoint, full (`SiglipModel`) or vision-only; its vision tower and image processor
            understand images (`config.num_image_tokens` = its patch count).
        gen_encoder: a CLIP or SigLIP checkpoint, full or vision-only; its vision tower, average-pooled, gives the
            generation targets.
        out_dir: the folder to write; it must not exist or be empty. Written under `<out_dir>.partial` and renamed
            at the end, so a failed assembly leaves no half checkpoint.
        decoder: a diffusers `UNet2DConditionModel` (a folder, or a diffusers pipeline with a `unet/`), whose
            cross-attention width equals the gen encoder's hidden size.
        decoder_preset: instead of `decoder`, a fresh decoder of a `DECODER_PRESETS` size (`"small"` by default when
            neither is given), to train with `pisces train-decoder`.
        vae: a diffusers `AutoencoderKL` (folder, or pipeline with a `vae/`). Without it the decoder works in pixels.
        scheduler: a diffusers scheduler (folder, or pipeline with a `scheduler/`); DDIM by default.
        num_gen_tokens: generation tokens per image `m`; the pooling side is chosen from the gen encoder's patch grid.
        dtype: the dtype of every weight written (`"bfloat16"`, `"float16"` or `"float32"`).
        max_shard_size: largest safetensors shard (e.g. `"5GB"`); bigger models are sharded with an index.
        chat_template: the processor's chat template; by default the tokenizer's own if it renders images, else
            Pisces' template in the tokenizer's turn format (Llama 3 or ChatML).
        seed: seeds the fresh weights (projectors, heads, a preset decoder).

    Returns:
        `Path` of the checkpoint folder: the layout of `PiscesPipeline.save_pretrained`.
    """
    from accelerate import init_empty_weights
    from transformers import GenerationConfig

    from pisces import PiscesConfig, PiscesForConditionalGeneration
    from pisces.pipelines import PiscesPipeline
    from pisces.processing import PiscesProcessor

    from .decoder_presets import DECODER_PRESETS

    dtype = _parse_dtype(dtype)
    if decoder is not None and decoder_preset is not None:
        raise ValueError("Pass decoder or decoder_preset, not both.")
    if decoder is None and decoder_preset is None:
        decoder_preset = "small"
    if decoder_preset is not None and decoder_preset not in DECODER_PRESETS:
        raise ValueError(f"Unknown decoder preset {decoder_preset!r}; choose one of {', '.join(DECODER_PRESETS)}.")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"{out_dir} already exists and is not an empty folder; choose a new output folder.")

    # 1. Every source is resolved and checked before any weight is read.
    llm_dir = resolve_source(llm, "--llm")
    text_config = _text_config(_read_config(llm_dir, "--llm"), llm_dir)
    llm_files = weight_files(llm_dir, "--llm")
    und_dir = resolve_source(und_encoder, "--und-encoder")
    und_raw = _read_config(und_dir, "--und-encoder")
    vision_config = _vision_config(und_raw, "--und-encoder", und_dir, UND_ENCODER_TYPES)
    und_full = "vision_config" in und_raw
    und_files = weight_files(und_dir, "--und-encoder")
    gen_dir = resolve_source(gen_encoder, "--gen-encoder")
    gen_raw = _read_config(gen_dir, "--gen-encoder")
    gen_vision_config = _vision_config(gen_raw, "--gen-encoder", gen_dir, GEN_ENCODER_TYPES)
    gen_full = "vision_config" in gen_raw
    gen_files = weight_files(gen_dir, "--gen-encoder")
    gen_pool_size = choose_gen_pool_size(gen_vision_config, num_gen_tokens)
    gen_width = gen_vision_config.hidden_size

    vae_dir = vae_files = None
    latent_channels = 3
    if vae is not None:
        vae_source = resolve_source(vae, "--vae", _diffusers_patterns("vae"))
        vae_dir = _diffusers_folder(vae_source, "--vae", "vae", "config.json")
        vae_config = _read_config(vae_dir, "--vae")
        if vae_config.get("_class_name") != "AutoencoderKL":
            raise SourceError(f"--vae {vae_dir}: found {_describe_config(vae_config)}; expected an AutoencoderKL.")
        vae_files = weight_files(vae_dir, "--vae", "diffusion_pytorch_model")
        latent_channels = vae_config.get("latent_channels", 4)
    decoder_dir = decoder_files = None
    if decoder is not None:
        decoder_dir = _diffusers_folder(
            resolve_source(decoder, "--decoder", _diffusers_patterns("decoder")), "--decoder", "decoder", "config.json"
        )
        decoder_config = _read_config(decoder_dir, "--decoder")
        _check_decoder_config(decoder_config, gen_width, latent_channels, f"--decoder {decoder_dir}")
        decoder_files = weight_files(decoder_dir, "--decoder", "diffusion_pytorch_model")
    scheduler_dir = None
    if scheduler is not None:
        scheduler_dir = _diffusers_folder(
            resolve_source(scheduler, "--scheduler", _diffusers_patterns("scheduler")),
            "--scheduler", "scheduler", "scheduler_config.json",
        )
        _read_config(scheduler_dir, "--scheduler", "scheduler_config.json")

    tokenizer, original_length, new_token_ids, template = _prepare_tokenizer(llm_dir, chat_template)
    image_processor = _image_processor(und_dir, vision_config, "--und-encoder")
    gen_image_processor = _image_processor(gen_dir, gen_vision_config, "--gen-encoder")

    # 2. The config and the processor.
    old_vocab_size = text_config.vocab_size
    text_config.vocab_size = max(old_vocab_size, len(tokenizer))
    text_config.pad_token_id = tokenizer.pad_token_id
    token_ids = {
        f"{name}_token_id": tokenizer.convert_tokens_to_ids(token)
        for name, token in (("image", "<image>"), ("boi", "<boi>"), ("eoi", "<eoi>"), ("gen", "<gen>"))
    }
    config = PiscesConfig(
        text_config=text_config,
        vision_config=vision_config,
        gen_vision_config=gen_vision_config,
        gen_pool_size=gen_pool_size,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
        **token_ids,
    )
    processor = PiscesProcessor(
        image_processor=image_processor,
        gen_image_processor=gen_image_processor,
        tokenizer=tokenizer,
        chat_template=template,
        num_image_tokens=config.num_image_tokens,
        num_gen_tokens=config.num_gen_tokens,
    )
    config.unconditional_input_ids = processor.unconditional_input_ids

    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        # 3. The model on the meta device (buffers such as RoPE frequencies are computed for real), filled weight by
        # weight. Only the fresh projectors and heads are ever initialised.
        with init_empty_weights():
            model = PiscesForConditionalGeneration(config)
        # Rows of the original vocabulary (padding rows of a padded embedding matrix excluded) give the mean.
        known_rows = min(old_vocab_size, original_length)
        new_rows = sorted(set(new_token_ids) | set(range(old_vocab_size, text_config.vocab_size)))

        added = text_config.vocab_size - old_vocab_size
        grow = {"model.embed_tokens.weight": added, "lm_head.weight": added}

        def resize(key: str, tensor: torch.Tensor) -> torch.Tensor:
            # The rows were allocated by the reader (`grow`); the new tokens' rows get the mean of the known ones.
            if key in ("model.language_model.embed_tokens.weight", "lm_head.weight") and new_rows:
                tensor[new_rows] = tensor[:known_rows].float().mean(dim=0).to(tensor.dtype)
            return tensor

        def llm_key(key: str) -> str | None:
            if key.startswith("model."):
                return "model.language_model." + key[len("model."):]
            return key if key.startswith("lm_head.") else "llm:" + key

        filled = _load_weights(model, llm_files, dtype, llm_key, "--llm", llm_dir, resize, grow)
        filled |= _load_weights(
            model, und_files, dtype, _vision_key("model.vision_tower.", und_full), "--und-encoder", und_dir
        )
        filled |= _load_weights(
            model, gen_files, dtype, _vision_key("model.gen_vision_tower.", gen_full), "--gen-encoder", gen_dir
        )
        inner = model.model
        torch.manual_seed(seed)
        _fresh_init(model, [inner.und_projector, inner.gen_projector, model.gen_head], dtype)
        if config.tie_word_embeddings:
            model.lm_head.weight = inner.language_model.get_input_embeddings().weight
        _check_complete(model, filled, {"--llm": (llm_dir, "model.language_model."),
                                        "--und-encoder": (und_dir, "model.vision_tower."),
                                        "--gen-encoder": (gen_dir, "model.gen_vision_tower.")})

        model.generation_config = _generation_config(llm_dir, config, tokenizer, template, GenerationConfig)
        model.save_pretrained(partial, max_shard_size=max_shard_size)
        processor.save_pretrained(partial)
        _to_meta(model)

        # 4. The diffusers components, one at a time.
        vae_model = None
        if vae_dir is not None:
            vae_model = _load_diffusers_model("AutoencoderKL", vae_dir, vae_files, dtype, "--vae")
            vae_model.save_pretrained(partial / "vae", max_shard_size=max_shard_size)
            _to_meta(vae_model)
        if decoder_dir is not None:
            decoder_model = _load_diffusers_model(
                "UNet2DConditionModel", decoder_dir, decoder_files, dtype, "--decoder"
            )
        else:
            decoder_model = _build_preset_decoder(decoder_preset, gen_width, latent_channels, dtype, seed)
        decoder_model.save_pretrained(partial / "decoder", max_shard_size=max_shard_size)
        _to_meta(decoder_model)
        scheduler_object = _load_scheduler(scheduler_dir)
        scheduler_object.save_pretrained(partial / "scheduler")

        # model_index.json as PiscesPipeline.save_pretrained writes it (the weights are already on disk).
        pipeline = PiscesPipeline(
            model=model, processor=processor, decoder=decoder_model, scheduler=scheduler_object, vae=vae_model
        )
        pipeline.save_config(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out_dir.exists():
        out_dir.rmdir()
    partial.rename(out_dir)
    return out_dir


def _vision_key(prefix: str, full_model: bool):
    """
    Maps an encoder checkpoint's key into the tower at `prefix`, or None for what Pisces does not use (the text tower,
    the projections, the pooling head). Full models (`SiglipModel`, `CLIPModel`) and older vision-only checkpoints
    prefix the tower's keys with `vision_model.`; vision-only models saved by transformers 5 do not.
    """

    def rename(key: str) -> str | None:
        if key.startswith("vision_model."):
            key = key[len("vision_model."):]
        elif full_model:
            return None  # text_model.*, logit_scale, text/visual projections
        if key.startswith(("head.", "visual_projection.")):
            return None
        return prefix + key

    return rename


def _check_complete(model: nn.Module, filled: set[str], sources: dict) -> None:
    """Raises `SourceError` naming the source whose checkpoint lacked weights the model needs."""
    for role, (folder, prefix) in sources.items():
        missing = [name for name, param in model.named_parameters() if name.startswith(prefix) and param.is_meta]
        if missing:
            raise SourceError(
                f"{role} {folder}: found no weights for {', '.join(missing[:5])}"
                f"{', ...' if len(missing) > 5 else ''} ({len(missing)} missing); the checkpoint does not match its "
                "config.json or is not in the transformers layout."
            )
    leftover = [name for name, param in model.named_parameters() if param.is_meta]
    if leftover:
        raise SourceError(f"the LLM checkpoint lacks {', '.join(leftover[:5])}.")


def _generation_config(llm_dir: Path, config, tokenizer, template: str, generation_config_class):
    """The LLM's generation defaults, ending on its end-of-turn token too, never emitting image placeholders."""
    if (llm_dir / "generation_config.json").is_file():
        generation_config = generation_config_class.from_pretrained(llm_dir)
    else:
        generation_config = generation_config_class(
            bos_token_id=config.text_config.bos_token_id, eos_token_id=config.text_config.eos_token_id
        )
    eos = generation_config.eos_token_id
    eos = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    vocab = tokenizer.get_vocab()
    # A chat reply ends with the template's end-of-turn token, whatever the base model's eos is.
    for token in ("<|eot_id|>", "<|im_end|>"):
        if token in vocab and token in template and vocab[token] not in eos:
            eos.append(vocab[token])
    generation_config.eos_token_id = eos[0] if len(eos) == 1 else eos
    generation_config.pad_token_id = tokenizer.pad_token_id
    suppress = list(generation_config.suppress_tokens or [])
    generation_config.suppress_tokens = suppress + [
        token for token in (config.image_token_id, config.gen_token_id) if token not in suppress
    ]
    return generation_config


def _load_diffusers_model(class_name: str, folder: Path, files: list[Path], dtype: torch.dtype, role: str):
    """A diffusers model built on the meta device from its config and filled weight by weight, in `dtype`."""
    import diffusers
    from accelerate import init_empty_weights

    model_class = getattr(diffusers, class_name)
    with init_empty_weights():
        model = model_class.from_config(model_class.load_config(folder))
    try:
        _load_weights(model, files, dtype, lambda key: key, role, folder)
        missing = [name for name, param in model.named_parameters() if param.is_meta]
        if missing:
            raise SourceError(f"{role} {folder}: found no weights for {', '.join(missing[:5])}.")
    except SourceError:
        # An older key layout (e.g. a VAE with the deprecated attention names) needs diffusers' own conversion; its
        # loader also reads safetensors only here, in the target dtype.
        logger.info(f"{role} {folder}: keys differ from the current layout; loading with diffusers' converter.")
        del model
        gc.collect()
        model = model_class.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True)
    return model


def _build_preset_decoder(preset: str, gen_width: int, in_channels: int, dtype: torch.dtype, seed: int):
    """A fresh preset decoder created directly in `dtype` (the SDXL size would need twice the memory in float32)."""
    from .decoder_presets import build_decoder

    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return build_decoder(preset, gen_width, in_channels=in_channels)
    finally:
        torch.set_default_dtype(default_dtype)


def _load_scheduler(folder: Path | None):
    import diffusers

    from .decoder_presets import build_scheduler

    if folder is None:
        return build_scheduler()
    class_name = json.loads((folder / "scheduler_config.json").read_text()).get("_class_name")
    scheduler_class = getattr(diffusers, str(class_name), None)
    if scheduler_class is None or not hasattr(scheduler_class, "from_pretrained"):
        raise SourceError(f"--scheduler {folder}: found _class_name {class_name!r}, not a diffusers scheduler.")
    return scheduler_class.from_pretrained(folder)


__all__ = ["assemble_checkpoint", "choose_gen_pool_size", "read_safetensors", "weight_files", "SourceError"]
