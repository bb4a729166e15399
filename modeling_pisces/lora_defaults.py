"""PEFT's defaults for Pisces: `get_peft_model(model, LoraConfig(r=8))` with nothing else adapts the right modules.

- `target_modules`: the language model's attention and MLP projections only, never the vision towers (which have
  `q_proj`/`v_proj`/`fc1` layers of their own), registered in PEFT's per-`model_type` table as a regular expression.
- `modules_to_save`: the projectors and both heads, trained and saved whole (they are small, or new).
- `trainable_token_indices`: the input-embedding rows of the four Pisces special tokens, which a base LLM has never
  seen, stay trainable while the rest of the vocabulary is frozen.

PEFT's table covers `target_modules` only; the two other defaults are filled in by wrapping LoRA's
`_prepare_adapter_config`, and only for `model_type="pisces"` and only where the user left the field unset.
"""

# Full-match regular expression over module names, relative to `PiscesForConditionalGeneration`.
PISCES_LORA_TARGET_MODULES = r".*language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PISCES_MODULES_TO_SAVE = ["und_projector", "gen_projector", "gen_head", "lm_head"]
_SPECIAL_TOKEN_FIELDS = ("image_token_id", "boi_token_id", "eoi_token_id", "gen_token_id")


def _with_pisces_defaults(prepare_adapter_config):
    def wrapper(self, peft_config, model_config):
        peft_config = prepare_adapter_config(self, peft_config, model_config)
        if model_config.get("model_type") != "pisces":
            return peft_config
        if getattr(peft_config, "modules_to_save", None) is None:
            peft_config.modules_to_save = list(PISCES_MODULES_TO_SAVE)
        if getattr(peft_config, "trainable_token_indices", None) is None and all(
            isinstance(model_config.get(field), int) for field in _SPECIAL_TOKEN_FIELDS
        ):
            peft_config.trainable_token_indices = {
                "embed_tokens": sorted(model_config[field] for field in _SPECIAL_TOKEN_FIELDS)
            }
        return peft_config

    wrapper._pisces_defaults = True
    return wrapper


def register_lora_defaults() -> None:
    """Registers the Pisces defaults with PEFT (idempotent). Without PEFT installed, does nothing."""
    try:
        # Already imported by diffusers (its LoRA loaders), so this costs nothing at `import pisces`.
        from peft.tuners.lora import LoraModel
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    except ImportError:
        return
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["pisces"] = PISCES_LORA_TARGET_MODULES
    if not getattr(LoraModel._prepare_adapter_config, "_pisces_defaults", False):
        LoraModel._prepare_adapter_config = _with_pisces_defaults(LoraModel._prepare_adapter_config)
