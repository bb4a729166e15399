"""PEFT's defaults for Pisces.

- `target_modules`: the language model's attention and MLP projections only, never the vision towers (which have
  `q_proj`/`v_proj`/`fc1` layers of their own). `register_lora_defaults` enters them in PEFT's per-`model_type`
  table, `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`, so `get_peft_model(model, LoraConfig(r=8))` with
  nothing else adapts exactly these.
- What that table cannot express comes from `default_lora_config(model)`: the projectors and both heads trained and
  saved whole (`modules_to_save`: they are small, or new), and the input-embedding rows of the four Pisces special
  tokens, which a base LLM has never seen, trainable while the rest of the vocabulary stays frozen
  (`trainable_token_indices`).
"""

# Full-match regular expression over module names, relative to `PiscesForConditionalGeneration`.
PISCES_LORA_TARGET_MODULES = r".*language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PISCES_MODULES_TO_SAVE = ("und_projector", "gen_projector", "gen_head", "lm_head")
_SPECIAL_TOKEN_FIELDS = ("image_token_id", "boi_token_id", "eoi_token_id", "gen_token_id")


def register_lora_defaults() -> None:
    """Enters Pisces' LoRA target modules in PEFT's table (idempotent). Without PEFT installed, does nothing."""
    try:
        # Already imported by diffusers (its LoRA loaders), so this costs nothing at `import pisces`.
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    except ImportError:
        return
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["pisces"] = PISCES_LORA_TARGET_MODULES


def default_lora_config(model_or_config, r: int = 8, **kwargs):
    """
    The `peft.LoraConfig` that Pisces trains with (`pisces train --lora`): LoRA of rank `r` on the language model's
    projections, the projectors and heads trained and saved whole, and the special tokens' embedding rows trainable.

    Args:
        model_or_config ([`PiscesForConditionalGeneration`] or [`PiscesConfig`]): the model to adapt, or its config;
            it gives the ids of the `<image>`, `<boi>`, `<eoi>` and `<gen>` rows.
        r (`int`, *optional*, defaults to 8): the LoRA rank.
        kwargs: any other `LoraConfig` field (`lora_alpha`, `lora_dropout`, ...); a field given here replaces the
            default (`target_modules`, `modules_to_save`, `trainable_token_indices`, `task_type`).

    Returns:
        `peft.LoraConfig` with `task_type="CAUSAL_LM"`, so `AutoPeftModelForCausalLM` loads the saved adapter.

    Example:

    ```python
    >>> from peft import get_peft_model
    >>> import pisces

    >>> model = pisces.PiscesForConditionalGeneration.from_pretrained("path/to/pisces")
    >>> model = get_peft_model(model, pisces.default_lora_config(model, r=16, lora_alpha=32))
    ```
    """
    from peft import LoraConfig

    config = getattr(model_or_config, "config", model_or_config)
    if getattr(config, "model_type", None) != "pisces":
        raise TypeError(
            "default_lora_config needs a Pisces model or its PiscesConfig (for the special tokens' ids), got "
            f"{type(model_or_config).__name__}."
        )
    token_ids = [getattr(config, field) for field in _SPECIAL_TOKEN_FIELDS]
    defaults = {
        "target_modules": PISCES_LORA_TARGET_MODULES,
        "modules_to_save": list(PISCES_MODULES_TO_SAVE),
        "trainable_token_indices": {"embed_tokens": sorted(token_ids)},
        "task_type": "CAUSAL_LM",
    }
    return LoraConfig(r=r, **{**defaults, **kwargs})
