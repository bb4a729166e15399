"""Configuration of the Pisces model."""

from transformers import AutoConfig, PretrainedConfig
from transformers.models.clip import CLIPVisionConfig
from transformers.models.llama import LlamaConfig
from transformers.models.siglip import SiglipVisionConfig


# The paper's shape (arXiv 2506.10395): Llama-3.1-8B-Instruct, SigLIP so400m-patch14-384 for understanding and a
# CLIP ViT-L/14 at 448 px, average-pooled 4x4 into 64 vectors, for generation.
LLAMA_3_1_8B = {
    "model_type": "llama",
    "vocab_size": 128260,  # 128256 + <image>, <boi>, <eoi>, <gen>
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "tie_word_embeddings": False,
}
SIGLIP_SO400M_PATCH14_384 = {
    "model_type": "siglip_vision_model",
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 14,
    # The pooling head is unused (we take patch features) and breaks disk offload.
    "vision_use_head": False,
}
CLIP_VIT_L_14_448 = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 448,
    "patch_size": 14,
    "projection_dim": 768,
}
PAPER_TOKEN_IDS = {"image_token_id": 128256, "boi_token_id": 128257, "eoi_token_id": 128258, "gen_token_id": 128259}


SUB_CONFIG_ROLES = {
    "text_config": "the language model",
    "vision_config": "the understanding encoder",
    "gen_vision_config": "the generation encoder",
}


class MissingSubConfigError(ValueError):
    """A Pisces config read from a file or a dict lacks one of its sub-configs."""


def _sub_config(value, default: dict) -> PretrainedConfig:
    if value is None:
        value = dict(default)
    if isinstance(value, dict):
        value = dict(value)
        model_type = value.pop("model_type", default["model_type"])
        return AutoConfig.for_model(model_type, **value)
    if isinstance(value, PretrainedConfig):
        return value
    raise TypeError(f"Expected a config or a dict for a sub-config, got {type(value).__name__}.")


def _patch_grid(vision_config: PretrainedConfig) -> int:
    """Side of the square patch grid of a ViT config (27 for SigLIP so400m-patch14-384)."""
    return vision_config.image_size // vision_config.patch_size


class PiscesConfig(PretrainedConfig):
    r"""
    Configuration of a [`PiscesForConditionalGeneration`] model: one decoder-only language model between a vision
    encoder for understanding and a frozen vision encoder whose pooled patch features are the generation targets.

    `PiscesConfig()` with no arguments is the paper's shape: Llama-3.1-8B-Instruct, SigLIP so400m-patch14-384
    (27x27 = 729 understanding tokens) and CLIP ViT-L/14 at 448 px pooled 4x4 (8x8 = 64 generation tokens).

    Args:
        text_config (`PretrainedConfig` or `dict`, *optional*):
            Config of the decoder-only language model (any `AutoModel` text backbone; Llama by default).
        vision_config (`PretrainedConfig` or `dict`, *optional*):
            Config of the understanding encoder (SigLIP vision by default). Its patch features, projected by
            `und_projector`, replace the `<image>` placeholders.
        gen_vision_config (`PretrainedConfig` or `dict`, *optional*):
            Config of the generation encoder (CLIP vision by default). Frozen; its average-pooled patch features are
            the targets that `gen_head` regresses and the inputs of `gen_projector`.
        gen_pool_size (`int`, *optional*, defaults to 4):
            Side `a` of the average-pooling window over the generation encoder's `g x g` patch grid, giving
            `(g / a) ** 2` generation tokens. `g` must be divisible by `a`.
        projector_hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation of the two-layer MLPs `und_projector`, `gen_projector` and `gen_head`.
        vision_feature_layer (`int`, *optional*, defaults to -1):
            Hidden-state index of the understanding encoder whose features are used.
        gen_vision_feature_layer (`int`, *optional*, defaults to -1):
            Hidden-state index of the generation encoder whose features are pooled; -1 is its last hidden state.
        image_token_id (`int`, *optional*, defaults to 128256):
            Id of the `<image>` placeholder; each one receives one understanding feature vector.
        boi_token_id (`int`, *optional*, defaults to 128257):
            Id of `<boi>` (begin of image); its hidden state predicts the first generation vector.
        eoi_token_id (`int`, *optional*, defaults to 128258):
            Id of `<eoi>` (end of image), predicted by cross-entropy after the last generation vector.
        gen_token_id (`int`, *optional*, defaults to 128259):
            Id of the `<gen>` placeholder; each one receives `gen_projector(target)` as its input embedding.
        gen_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight `lambda` of the generation MSE in `loss = lm_loss + lambda * gen_loss`.
        gen_input_noise (`float`, *optional*, defaults to 0.0):
            Standard deviation of the Gaussian noise added, in training only, to the teacher-forced generation vectors
            before `gen_projector`. At inference each `<gen>` input is the model's own earlier prediction, not the
            target; training on noisy inputs keeps its errors from compounding along the sequence (exposure bias).
        unconditional_input_ids (`list[int]`, *optional*):
            Token ids of the unconditional (empty) text-to-image prompt, ending in `<boi>`. `PiscesProcessor`
            defines it (`processor.unconditional_input_ids`); checkpoint builders copy it here so that
            `generate_image_embeddings` can guide without a processor.
        tie_word_embeddings (`bool`, *optional*, defaults to `False`):
            Whether `lm_head` shares its weight with the language model's input embeddings.

    In code, a sub-config left out is the paper's. A config read from a file or a dict (`from_pretrained`,
    `AutoConfig.from_pretrained`, `from_dict`) must carry all three: one that lacks any raises `MissingSubConfigError`
    naming it, instead of silently building a paper-size model.

    The default guidance scale of `generate_image_embeddings` is a generation setting:
    `model.generation_config.gen_guidance_scale`, saved in `generation_config.json`. Checkpoints written before it moved
    there carry `gen_guidance_scale` here; it is kept as an attribute, and the model reads it only when its generation
    config lacks the field.
    """

    model_type = "pisces"
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig, "gen_vision_config": AutoConfig}

    def __init__(
        self,
        text_config=None,
        vision_config=None,
        gen_vision_config=None,
        gen_pool_size: int = 4,
        projector_hidden_act: str = "gelu",
        vision_feature_layer: int = -1,
        gen_vision_feature_layer: int = -1,
        image_token_id: int = PAPER_TOKEN_IDS["image_token_id"],
        boi_token_id: int = PAPER_TOKEN_IDS["boi_token_id"],
        eoi_token_id: int = PAPER_TOKEN_IDS["eoi_token_id"],
        gen_token_id: int = PAPER_TOKEN_IDS["gen_token_id"],
        gen_loss_weight: float = 1.0,
        gen_input_noise: float = 0.0,
        unconditional_input_ids: list[int] | None = None,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.text_config = _sub_config(text_config, LLAMA_3_1_8B)
        self.vision_config = _sub_config(vision_config, SIGLIP_SO400M_PATCH14_384)
        self.gen_vision_config = _sub_config(gen_vision_config, CLIP_VIT_L_14_448)
        self.gen_pool_size = gen_pool_size
        self.projector_hidden_act = projector_hidden_act
        self.vision_feature_layer = vision_feature_layer
        self.gen_vision_feature_layer = gen_vision_feature_layer
        self.image_token_id = image_token_id
        self.boi_token_id = boi_token_id
        self.eoi_token_id = eoi_token_id
        self.gen_token_id = gen_token_id
        self.gen_loss_weight = gen_loss_weight
        if gen_input_noise < 0:
            raise ValueError(f"gen_input_noise is a standard deviation and must be >= 0, got {gen_input_noise}.")
        self.gen_input_noise = gen_input_noise
        self.unconditional_input_ids = list(unconditional_input_ids) if unconditional_input_ids is not None else None

        grid = _patch_grid(self.gen_vision_config)
        is_count = isinstance(gen_pool_size, int) and not isinstance(gen_pool_size, bool)
        if not is_count or gen_pool_size < 1 or grid % gen_pool_size != 0:
            raise ValueError(
                f"gen_pool_size={gen_pool_size} does not divide the generation encoder's {grid}x{grid} patch grid "
                f"(image_size={self.gen_vision_config.image_size}, patch_size={self.gen_vision_config.patch_size}); "
                f"choose a divisor of {grid}."
            )
        special_ids = (image_token_id, boi_token_id, eoi_token_id, gen_token_id)
        if len(set(special_ids)) != 4:
            raise ValueError(f"image, boi, eoi and gen token ids must differ, got {special_ids}.")
        vocab_size = self.text_config.vocab_size
        outside = [f"{name}={value}" for name, value in zip(PAPER_TOKEN_IDS, special_ids) if value >= vocab_size]
        if outside:
            # A config.json that leaves a token id out gets the paper's, which only the paper's vocabulary holds.
            raise ValueError(
                f"{', '.join(outside)} is outside the language model's vocabulary (vocab_size={vocab_size}); set the "
                "token ids the tokenizer gives <image>, <boi>, <eoi> and <gen> (the paper's ids are the default when "
                "a config leaves them out), or resize the embeddings."
            )
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "PiscesConfig":
        # Every dict-built config (config.json through from_pretrained or AutoConfig, or a dict in code) passes here;
        # only PiscesConfig() in code may fall back to the paper's sub-configs.
        missing = [name for name in cls.sub_configs if config_dict.get(name) is None and kwargs.get(name) is None]
        if missing:
            roles = ", ".join(SUB_CONFIG_ROLES[name] for name in missing)
            raise MissingSubConfigError(
                f"The Pisces config lacks {' and '.join(missing)} ({roles}): a checkpoint's config.json names all "
                "three sub-configs, as save_pretrained writes them. Add the missing one, or build the paper-size "
                "default in code with PiscesConfig()."
            )
        return super().from_dict(config_dict, **kwargs)

    @property
    def num_image_tokens(self) -> int:
        """Understanding tokens per image: the understanding encoder's patch count (729 for SigLIP-384/14)."""
        return _patch_grid(self.vision_config) ** 2

    @property
    def num_gen_tokens(self) -> int:
        """Generation tokens per image `m`: the pooled patch grid of the generation encoder (64 by default)."""
        return (_patch_grid(self.gen_vision_config) // self.gen_pool_size) ** 2


__all__ = ["MissingSubConfigError", "PiscesConfig"]
