"""Random Pisces checkpoints: complete folders with untrained weights, for tests, smoke runs and sizing.

`build_random_checkpoint(out_dir, preset="tiny")` writes, in seconds, a folder that every entry point loads: the
model, its generation config and the processor (a tokenizer built here with the `tokenizers` library, holding the
Pisces special tokens) at the root, and the decoder, the VAE and the scheduler of `PiscesPipeline` beside them. `preset="pisces-8b"` is the paper's shape, meant for `meta`-device sizing.
"""

from pathlib import Path

import torch
from transformers import CLIPImageProcessorPil, GenerationConfig, SiglipImageProcessorPil

from pisces import PiscesConfig, PiscesForConditionalGeneration
from pisces.pipelines import PiscesPipeline
from pisces.processing import PiscesProcessor
from pisces.processing.processing_pisces import BOI_TOKEN, EOI_TOKEN, GEN_TOKEN, IMAGE_TOKEN

from .decoder_presets import build_decoder, build_scheduler, build_tiny_vae
from .tokenizer import build_tokenizer


# Tiny but real architectures: Llama, SigLIP (32 px, 8 px patches: 16 understanding tokens), CLIP (32 px, 4 px
# patches pooled 2x2: 16 generation tokens).
TINY_TEXT = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
TINY_VISION = {
    "model_type": "siglip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
    "vision_use_head": False,
}
TINY_GEN_VISION = {
    "model_type": "clip_vision_model",
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 4,
}
PRESETS = ("tiny", "pisces-8b")


def config_for_tokenizer(
    tokenizer, text_config: dict, vision_config: dict, gen_vision_config: dict, **kwargs
) -> PiscesConfig:
    """
    A `PiscesConfig` of the given component configs (dicts with a `model_type`) whose vocabulary, special tokens and
    Pisces token ids come from `tokenizer` (one of `build_tokenizer`'s). `kwargs` go to `PiscesConfig`.
    """
    text_config = dict(
        text_config,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|eot_id|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    return PiscesConfig(
        text_config=text_config,
        vision_config=vision_config,
        gen_vision_config=gen_vision_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        boi_token_id=tokenizer.convert_tokens_to_ids(BOI_TOKEN),
        eoi_token_id=tokenizer.convert_tokens_to_ids(EOI_TOKEN),
        gen_token_id=tokenizer.convert_tokens_to_ids(GEN_TOKEN),
        **kwargs,
    )


def text_generation_config(config: PiscesConfig, tokenizer) -> GenerationConfig:
    """The model's text `GenerationConfig`: the tokenizer's ids, and the image placeholders suppressed."""
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=config.text_config.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Text generation must not emit the image placeholders.
        suppress_tokens=[config.image_token_id, config.gen_token_id],
    )


def preset_config(preset: str, tokenizer=None) -> PiscesConfig:
    """
    The `PiscesConfig` of a preset. `"tiny"` takes its vocabulary and special tokens from `tokenizer`
    (default: `build_tokenizer()`); `"pisces-8b"` is `PiscesConfig()`, the paper's shape.
    """
    if preset == "pisces-8b":
        return PiscesConfig()
    if preset == "tiny":
        tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
        return config_for_tokenizer(tokenizer, TINY_TEXT, TINY_VISION, TINY_GEN_VISION, gen_pool_size=2)
    raise ValueError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")


def build_processor(config: PiscesConfig, tokenizer) -> PiscesProcessor:
    """A processor whose image processors and placeholder counts match `config`'s encoders."""
    und_side = config.vision_config.image_size
    gen_side = config.gen_vision_config.image_size
    image_processor = SiglipImageProcessorPil(size={"height": und_side, "width": und_side})
    gen_image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": gen_side}, crop_size={"height": gen_side, "width": gen_side}
    )
    return PiscesProcessor(
        image_processor=image_processor,
        gen_image_processor=gen_image_processor,
        tokenizer=tokenizer,
        num_image_tokens=config.num_image_tokens,
        num_gen_tokens=config.num_gen_tokens,
    )


def build_random_checkpoint(out_dir: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """
    Writes a complete random checkpoint folder (model, generation config, processor, decoder, VAE, scheduler: the
    layout of `PiscesPipeline.save_pretrained`) and returns its path.

    Args:
        out_dir: the folder to write; created if missing.
        preset: `"tiny"` (seconds, a few hundred thousand parameters).
        seed: seeds the weights; the same seed gives the same files.
    """
    if preset != "tiny":
        raise ValueError(
            f"Only the 'tiny' preset can be written with random weights here; {preset!r} is for sizing "
            f"(`pisces convert random --preset {preset} --meta`)."
        )
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    config = preset_config(preset, tokenizer)
    processor = build_processor(config, tokenizer)
    config.unconditional_input_ids = processor.unconditional_input_ids

    torch.manual_seed(seed)
    model = PiscesForConditionalGeneration(config)
    model.generation_config = text_generation_config(config, tokenizer)
    vae = build_tiny_vae()
    decoder = build_decoder("tiny", config.gen_vision_config.hidden_size, in_channels=vae.config.latent_channels)
    pipeline = PiscesPipeline(model=model, processor=processor, decoder=decoder, scheduler=build_scheduler(), vae=vae)
    pipeline.save_pretrained(out_dir)
    return out_dir


def describe_parameters(config: PiscesConfig) -> dict[str, int]:
    """Parameter count per component of a model of `config`, built on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        model = PiscesForConditionalGeneration(config)
    counts = {
        "language_model": model.model.language_model,
        "lm_head": model.lm_head,
        "vision_tower": model.model.vision_tower,
        "gen_vision_tower": model.model.gen_vision_tower,
        "und_projector": model.model.und_projector,
        "gen_projector": model.model.gen_projector,
        "gen_head": model.gen_head,
    }
    return {name: sum(p.numel() for p in module.parameters()) for name, module in counts.items()}
