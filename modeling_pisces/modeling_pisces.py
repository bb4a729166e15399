"""PyTorch Pisces: one language model between an understanding encoder and a generation encoder.

Understanding: image -> vision_tower -> und_projector -> vectors at the `<image>` placeholders -> text (cross-entropy).
Generation: image -> gen_vision_tower (frozen) -> average pool -> m targets. The language model reads
`prompt <boi> <gen>*m <eoi>`, with `gen_projector(target_i)` as the input at the i-th `<gen>`, and `gen_head` regresses
target i+1 from the hidden state at `<gen>`_i (target 1 from `<boi>`) with an MSE loss.
"""

import contextlib
import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, CompileConfig, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llama.modeling_llama import LlamaModel
from transformers.utils import ModelOutput
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from .checkpoint_files import load_with_checked_files
from .configuration_pisces import PiscesConfig
from .static_decoding import StaticImageDecoding, choose_cache_implementation, choose_compile_config, compile_context


# transformers 5.24 renamed the KV-cache argument and output field `past_key_values` -> `cache`; 5.17-5.23 use the old
# name. Decided once here; every call into the language model and every output uses CACHE_KWARG.
CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"

# Default classifier-free guidance scale of `generate_image_embeddings` on the generation vectors, for a generation
# config that does not set `gen_guidance_scale` (and a model config that does not carry the legacy field).
DEFAULT_GEN_GUIDANCE_SCALE = 3.0


def _accepts_old_cache_name(forward):
    """
    Lets `forward(cache=...)` also be called with `past_key_values=...`. On transformers >= 5.24 the old name is
    deprecated there, so it warns through the library's own helper, as its models do; before 5.24 it is the library's
    only name, so it is accepted silently and is the name the signature shows.
    """
    if CACHE_KWARG == "cache":
        # The removal version transformers' own models announce for the old name.
        return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        if "past_key_values" in kwargs:
            if kwargs.get("cache") is not None:
                raise ValueError("Pass the KV cache once, as past_key_values (or cache), not both.")
            kwargs["cache"] = kwargs.pop("past_key_values")
        return forward(self, *args, **kwargs)

    signature = inspect.signature(forward)
    parameters = [p.replace(name="past_key_values") if p.name == "cache" else p for p in signature.parameters.values()]
    wrapper.__signature__ = signature.replace(parameters=parameters)
    return wrapper


class PiscesModelOutput(ModelOutput):
    """Base of the Pisces outputs: as a tuple (`return_dict=False`), the nested encoder outputs are tuples too."""

    def to_tuple(self) -> tuple:
        return tuple(value.to_tuple() if isinstance(value, ModelOutput) else value for value in self.values())


@dataclass
class PiscesModelOutputWithPast(PiscesModelOutput):
    """
    Output of [`PiscesModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
            Last hidden state of the language model.
        cache (`Cache`, *optional*; named `past_key_values` on transformers < 5.24):
            The language model's KV cache, returned when `use_cache=True`. The field takes the installed library's
            name, because `generate` reads it by that name; `output.past_key_values` reads it on every version
            (transformers >= 5.24 maps it to `cache` with a deprecation warning).
        hidden_states, attentions (*optional*):
            The language model's per-layer hidden states and attention weights, when requested.
        image_outputs (`BaseModelOutputWithPooling`, *optional*):
            The understanding encoder's output for `pixel_values` (see [`PiscesModel.get_image_features`]):
            `pooler_output` holds the projected features that replaced the `<image>` placeholders; `hidden_states` /
            `attentions` are the encoder's, when requested.
        gen_image_outputs (`BaseModelOutputWithPooling`, *optional*):
            The generation encoder's output for `gen_pixel_values` (see [`PiscesModel.get_gen_image_features`]):
            `pooler_output` of shape `(num_gen_images, num_gen_tokens, gen_hidden_size)` holds the pooled targets.
    """

    last_hidden_state: torch.FloatTensor | None = None
    if CACHE_KWARG == "cache":
        cache: Cache | None = None
    else:
        past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_outputs: BaseModelOutputWithPooling | None = None
    gen_image_outputs: BaseModelOutputWithPooling | None = None


@dataclass
class PiscesCausalLMOutputWithPast(PiscesModelOutput):
    """
    Output of [`PiscesForConditionalGeneration`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            `lm_loss + config.gen_loss_weight * gen_loss`, over the terms that are present.
        lm_loss (`torch.FloatTensor` of shape `()`, *optional*):
            Next-token cross-entropy on `labels` (or `shift_labels`), positions with -100 ignored; present when there is
            a label to score.
        gen_loss (`torch.FloatTensor` of shape `()`, *optional*):
            Mean squared error of the predicted generation vectors against the targets; present when
            `gen_pixel_values` is given.
        logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`):
            Next-token scores.
        gen_embeds (`torch.FloatTensor` of shape `(num_gen_images, num_gen_tokens, gen_hidden_size)`, *optional*):
            The generation vectors predicted by `gen_head` (teacher-forced), one row per image in `gen_pixel_values`.
        gen_targets (`torch.FloatTensor`, same shape as `gen_embeds`, *optional*):
            The targets they regress (`gen_image_outputs.pooler_output`, without gradients).
        cache (`Cache`, *optional*; named `past_key_values` on transformers < 5.24):
            The language model's KV cache; see [`PiscesModelOutputWithPast`] for the name.
        hidden_states, attentions (*optional*):
            The language model's per-layer hidden states and attention weights, when requested.
        image_outputs, gen_image_outputs (`BaseModelOutputWithPooling`, *optional*):
            The encoders' outputs; see [`PiscesModelOutputWithPast`].
    """

    loss: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    gen_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    gen_embeds: torch.FloatTensor | None = None
    gen_targets: torch.FloatTensor | None = None
    if CACHE_KWARG == "cache":
        cache: Cache | None = None
    else:
        past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_outputs: BaseModelOutputWithPooling | None = None
    gen_image_outputs: BaseModelOutputWithPooling | None = None


class PiscesMLP(nn.Module):
    """Two-layer MLP `in -> hidden -> out`: the shape of `und_projector`, `gen_projector` and `gen_head`."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int, hidden_act: str):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_features)
        self.act = ACT2FN[hidden_act]
        self.linear_2 = nn.Linear(hidden_features, out_features)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(hidden_states)))


class PiscesPreTrainedModel(PreTrainedModel):
    config: PiscesConfig
    config_class = PiscesConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    # The blocks that must stay on one device (decoder and encoder layers) are gathered from the sub-models by
    # `post_init`, so a Qwen2 or a Llama text model both bring theirs; the MLPs here may be split freely.
    _no_split_modules = []
    _skip_keys_device_placement = [CACHE_KWARG]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # A truncated or corrupt weights file, or a config.json that does not describe the weights, fails naming it.
        loaded = load_with_checked_files(super().from_pretrained, cls, *args, **kwargs)
        # Loading puts new parameters in place, all trainable; the generation encoder stays frozen as built.
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        for module in model.modules():
            if isinstance(module, PiscesModel):
                module.gen_vision_tower.requires_grad_(False)
        return loaded


def _tower_flags(layer: int, output_hidden_states: bool | None, output_attentions: bool | None) -> dict:
    """
    The output flags to pass a vision tower: only those set, because a tower reads an unset flag from its own config
    and an explicit `None` would hide that. A feature layer other than the last needs the hidden states.
    """
    flags = {"output_hidden_states": True if layer != -1 else output_hidden_states, "output_attentions": output_attentions}
    return {name: value for name, value in flags.items() if value is not None}


def _encoder_outputs(name: str, outputs) -> BaseModelOutputWithPooling:
    """`mm_encoder_outputs[name]` checked: an encoder output (as `get_*_features` returns) with a `pooler_output`."""
    if getattr(outputs, "pooler_output", None) is None:
        raise TypeError(
            f"mm_encoder_outputs[{name!r}] must be an encoder output with a pooler_output, as "
            f"{'get_image_features' if name == 'image' else 'get_gen_image_features'} returns; got "
            f"{type(outputs).__name__}."
        )
    return outputs


class PiscesModel(PiscesPreTrainedModel):
    """The Pisces backbone: both vision towers, both projectors and the language model, without the output heads."""

    def __init__(self, config: PiscesConfig):
        super().__init__(config)
        hidden_size = config.text_config.hidden_size
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.gen_vision_tower = AutoModel.from_config(config.gen_vision_config)
        # The generation encoder only defines the targets; nothing trains it with the language model. Frozen from
        # construction, so optimizers, the Trainer's counts and DDP never see it; code that does train it (encoder
        # pretraining) unfreezes it explicitly.
        self.gen_vision_tower.requires_grad_(False)
        act = config.projector_hidden_act
        self.und_projector = PiscesMLP(config.vision_config.hidden_size, hidden_size, hidden_size, act)
        self.gen_projector = PiscesMLP(config.gen_vision_config.hidden_size, hidden_size, hidden_size, act)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.language_model.set_input_embeddings(value)

    def get_image_features(
        self,
        pixel_values: torch.FloatTensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        """
        Understanding features, projected into the language model's width.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(num_images, 3, height, width)`): from the image processor.
            output_hidden_states, output_attentions (`bool`, *optional*): passed to the vision tower.
            return_dict (`bool`, *optional*): `False` returns the output as a tuple.
            kwargs: passed to the vision tower.

        Returns:
            `BaseModelOutputWithPooling`: the vision tower's `last_hidden_state`, `hidden_states` and `attentions`,
            and as `pooler_output` the projected features of shape
            `(num_images, config.num_image_tokens, text_hidden_size)` (hidden state `config.vision_feature_layer`).
        """
        layer = self.config.vision_feature_layer
        tower_outputs = self.vision_tower(
            pixel_values=pixel_values.to(self.vision_tower.dtype),
            return_dict=True,
            **_tower_flags(layer, output_hidden_states, output_attentions),
            **kwargs,
        )
        features = tower_outputs.last_hidden_state if layer == -1 else tower_outputs.hidden_states[layer]
        outputs = BaseModelOutputWithPooling(
            last_hidden_state=tower_outputs.last_hidden_state,
            pooler_output=self.und_projector(features),
            hidden_states=tower_outputs.hidden_states,
            attentions=tower_outputs.attentions,
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return outputs if return_dict else outputs.to_tuple()

    def get_gen_image_features(
        self,
        gen_pixel_values: torch.FloatTensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        """
        The generation encoder's patch features (class token dropped) at hidden state
        `config.gen_vision_feature_layer`, average-pooled `gen_pool_size x gen_pool_size` over the patch grid: the
        generation targets. The encoder is frozen, so they carry no gradient unless it is unfrozen (`forward` always
        detaches them).

        Args:
            gen_pixel_values (`torch.FloatTensor` of shape `(num_images, 3, height, width)`): from the gen image processor.
            output_hidden_states, output_attentions (`bool`, *optional*): passed to the generation encoder.
            return_dict (`bool`, *optional*): `False` returns the output as a tuple.
            kwargs: passed to the generation encoder.

        Returns:
            `BaseModelOutputWithPooling`: the encoder's `last_hidden_state`, `hidden_states` and `attentions`, and as
            `pooler_output` the pooled features of shape `(num_images, config.num_gen_tokens, gen_hidden_size)`,
            row-major over the pooled grid.
        """
        gen_config = self.config.gen_vision_config
        side = gen_config.image_size
        if tuple(gen_pixel_values.shape[-2:]) != (side, side):
            raise ValueError(
                f"gen_pixel_values must be {side}x{side} (the generation encoder's image_size), got "
                f"{tuple(gen_pixel_values.shape[-2:])}; prepare them with the processor's gen_image_processor."
            )
        layer = self.config.gen_vision_feature_layer
        tower_outputs = self.gen_vision_tower(
            pixel_values=gen_pixel_values.to(self.gen_vision_tower.dtype),
            return_dict=True,
            **_tower_flags(layer, output_hidden_states, output_attentions),
            **kwargs,
        )
        features = tower_outputs.last_hidden_state if layer == -1 else tower_outputs.hidden_states[layer]
        grid = side // gen_config.patch_size
        if features.shape[1] == grid * grid + 1:  # CLIP-like encoders put a class token first
            features = features[:, 1:]
        num_images, _, width = features.shape
        features = features.transpose(1, 2).reshape(num_images, width, grid, grid)
        pooled = F.avg_pool2d(features, kernel_size=self.config.gen_pool_size).flatten(2).transpose(1, 2)
        outputs = BaseModelOutputWithPooling(
            last_hidden_state=tower_outputs.last_hidden_state,
            pooler_output=pooled,
            hidden_states=tower_outputs.hidden_states,
            attentions=tower_outputs.attentions,
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return outputs if return_dict else outputs.to_tuple()

    def token_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor | None, token_id: int
    ) -> torch.BoolTensor:
        """
        Mask `(batch_size, sequence_length)` of the positions holding `token_id`: from `input_ids`, or, without them,
        from `inputs_embeds` (positions whose input embedding is exactly that token's).
        """
        if input_ids is not None:
            return input_ids == token_id
        token_embedding = self.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
        return (inputs_embeds == token_embedding.to(inputs_embeds.dtype)).all(-1)

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor, token_id: int, features: torch.Tensor
    ) -> torch.BoolTensor:
        """
        Mask `(batch_size, sequence_length, 1)` of the placeholder positions of `token_id`, checked against the number
        of feature vectors to scatter there.
        """
        mask = self.token_mask(input_ids, inputs_embeds, token_id)
        num_placeholders = int(mask.sum())
        num_items, per_item = features.shape[0], features.shape[1]
        if num_placeholders != num_items * per_item:
            name = {self.config.image_token_id: "<image>", self.config.gen_token_id: "<gen>"}.get(token_id, token_id)
            raise ValueError(
                f"Features and {name} placeholders do not match: the inputs hold {num_placeholders} {name} tokens "
                f"but {num_items} images give {num_items} x {per_item} = {num_items * per_item} feature vectors. "
                f"Each image needs exactly {per_item} placeholders; PiscesProcessor expands them, and a truncated "
                f"prompt loses them."
            )
        return mask.unsqueeze(-1).to(inputs_embeds.device)

    @can_return_tuple
    @_accepts_old_cache_name
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        gen_pixel_values: torch.FloatTensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> PiscesModelOutputWithPast | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Token ids, with `config.num_image_tokens` `<image>` placeholders per image in `pixel_values` and
                `config.num_gen_tokens` `<gen>` placeholders per image in `gen_pixel_values`.
            inputs_embeds (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
                Instead of `input_ids`; the placeholders are found where the embedding is exactly the `<image>` /
                `<gen>` token's.
            pixel_values (`torch.FloatTensor` of shape `(num_images, 3, H, W)`, *optional*):
                Images to understand, in placeholder order.
            gen_pixel_values (`torch.FloatTensor` of shape `(num_gen_images, 3, H', W')`, *optional*):
                Images to generate (teacher forcing), in `<gen>` block order.
            mm_encoder_outputs (`dict[str, BaseModelOutputWithPooling]`, *optional*):
                Images already encoded, instead of pixels: `"image"` as `get_image_features(pixel_values)` returns it,
                `"gen_image"` as `get_gen_image_features(gen_pixel_values)` returns it (an earlier output's
                `image_outputs` / `gen_image_outputs` fit). Only their `pooler_output` is read. On transformers >= 5.24
                text `generate` encodes `pixel_values` into `"image"` once before the first step, and takes an
                `mm_encoder_outputs` argument itself; before 5.24 `generate` knows nothing of it: pass it `pixel_values`.
            cache (`Cache`, *optional*):
                KV cache (also accepted as `past_key_values`, the name before transformers 5.24).
            kwargs:
                Passed to the language model; `output_hidden_states` / `output_attentions` reach the vision towers too.

        Returns:
            [`PiscesModelOutputWithPast`], or a tuple with `return_dict=False`.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        mm_encoder_outputs = dict(mm_encoder_outputs or {})
        encoder_flags = {key: kwargs[key] for key in ("output_hidden_states", "output_attentions") if key in kwargs}

        if pixel_values is not None:
            if mm_encoder_outputs.get("image") is not None:
                raise ValueError("Pass pixel_values or mm_encoder_outputs['image'], not both.")
            mm_encoder_outputs["image"] = self.get_image_features(pixel_values, return_dict=True, **encoder_flags)
        if gen_pixel_values is not None:
            if mm_encoder_outputs.get("gen_image") is not None:
                raise ValueError("Pass gen_pixel_values or mm_encoder_outputs['gen_image'], not both.")
            # The targets are constants for the language model: no graph through the generation encoder, even when
            # someone has unfrozen it.
            with torch.no_grad():
                mm_encoder_outputs["gen_image"] = self.get_gen_image_features(
                    gen_pixel_values, return_dict=True, **encoder_flags
                )
        image_outputs = mm_encoder_outputs.get("image")
        gen_image_outputs = mm_encoder_outputs.get("gen_image")

        # Both masks come from the inputs as given, before any placeholder is overwritten.
        image_mask = gen_mask = None
        if image_outputs is not None:
            image_features = _encoder_outputs("image", image_outputs).pooler_output
            image_features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
            image_mask = self.get_placeholder_mask(input_ids, inputs_embeds, self.config.image_token_id, image_features)
        if gen_image_outputs is not None:
            gen_targets = _encoder_outputs("gen_image", gen_image_outputs).pooler_output.detach()
            gen_inputs = gen_targets
            if self.training and self.config.gen_input_noise > 0:
                gen_inputs = gen_targets + self.config.gen_input_noise * torch.randn_like(gen_targets)
            gen_inputs = self.gen_projector(gen_inputs).to(inputs_embeds.device, inputs_embeds.dtype)
            gen_mask = self.get_placeholder_mask(input_ids, inputs_embeds, self.config.gen_token_id, gen_inputs)
        if image_mask is not None:
            inputs_embeds = inputs_embeds.masked_scatter(image_mask, image_features)
        if gen_mask is not None:
            inputs_embeds = inputs_embeds.masked_scatter(gen_mask, gen_inputs)

        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            return_dict=True,
            **{CACHE_KWARG: cache},
            **kwargs,
        )
        return PiscesModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=image_outputs,
            gen_image_outputs=gen_image_outputs,
            **{CACHE_KWARG: getattr(outputs, CACHE_KWARG, None)},
        )


def _left_pad(rows: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacks left-padded `(input_ids, attention_mask)` batches of different lengths into one left-padded batch."""
    length = max(ids.shape[1] for ids, _ in rows)
    all_ids, all_masks = [], []
    for ids, mask in rows:
        extra = length - ids.shape[1]
        all_ids.append(F.pad(ids, (extra, 0), value=pad_id))
        all_masks.append(F.pad(mask, (extra, 0), value=0))
    return torch.cat(all_ids), torch.cat(all_masks)


class PiscesForConditionalGeneration(PiscesPreTrainedModel, GenerationMixin):
    """
    Pisces with its two heads: `lm_head` (text) and `gen_head` (generation vectors).

    - `generate(input_ids, pixel_values=...)`: understanding, the stock transformers text generation.
    - `generate_image_embeddings(input_ids, attention_mask, guidance_scale=...)`: the `num_gen_tokens` generation
      vectors for text-to-image prompts, which a diffusion decoder turns into pixels. Its defaults live in
      `generation_config` (`gen_guidance_scale`), saved in `generation_config.json`.
    """

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # Tensor parallelism: the language model's own plan is gathered by `post_init`; `lm_head` is sharded over the
    # vocabulary, as transformers' causal LMs shard it (a tied `embed_tokens` the same way, see `__init__`). The
    # encoders, projectors and `gen_head` stay replicated.
    _tp_plan = {"lm_head": "colwise_gather_output"}
    # With `accepts_loss_kwargs`, the Trainer would pass `num_items_in_batch` and stop dividing the loss by the
    # gradient-accumulation steps, trusting the model to normalize over the whole accumulated batch. Only the text term
    # can be (a token count); the generation MSE is a mean over this batch's vectors, which the Trainer does not count.
    # So the Trainer scales the loss itself; `shift_labels` still reaches `forward` as part of the batch.
    accepts_loss_kwargs = False

    def __init__(self, config: PiscesConfig):
        super().__init__(config)
        text_config = config.text_config
        self.model = PiscesModel(config)
        self.lm_head = nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False)
        # Regresses the next generation vector from a hidden state: hidden -> hidden -> gen encoder width.
        self.gen_head = PiscesMLP(
            text_config.hidden_size, text_config.hidden_size, config.gen_vision_config.hidden_size,
            config.projector_hidden_act,
        )
        self.post_init()
        if config.tie_word_embeddings and self._tp_plan:
            # A tied lm_head is the input embedding matrix: it must be sharded over the vocabulary there too. The
            # language model's plan says so by itself on transformers >= 5.24, before only when its own config ties.
            embeddings = self.get_input_embeddings()
            name = next(name for name, module in self.named_modules() if module is embeddings)
            self._tp_plan.setdefault(name, "embedding_rowwise")

    @property
    def generation_config(self) -> GenerationConfig | None:
        """
        The generation defaults, text and image: besides the standard fields, `gen_guidance_scale`, the default
        guidance scale of `generate_image_embeddings` (it is not the standard `guidance_scale`, which would make text
        `generate` guide the logits).
        """
        return self.__dict__.get("_generation_config")

    @generation_config.setter
    def generation_config(self, value: GenerationConfig | None):
        # Every generation config the model gets (built from the model config, loaded from generation_config.json,
        # assigned by the user) carries `gen_guidance_scale`. Checkpoints written before it moved here keep it in
        # config.json; a generation config that lacks it takes it from there, so they load with the same behaviour.
        if value is not None and getattr(value, "gen_guidance_scale", None) is None:
            legacy = getattr(self.config, "gen_guidance_scale", None)
            value.gen_guidance_scale = DEFAULT_GEN_GUIDANCE_SCALE if legacy is None else legacy
        self.__dict__["_generation_config"] = value

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module):
        self.lm_head = new_embeddings

    def get_image_features(self, pixel_values: torch.FloatTensor, **kwargs) -> BaseModelOutputWithPooling | tuple:
        """See [`PiscesModel.get_image_features`]: `pooler_output` is `(num_images, num_image_tokens, text_hidden)`."""
        return self.model.get_image_features(pixel_values, **kwargs)

    def get_gen_image_features(
        self, gen_pixel_values: torch.FloatTensor, **kwargs
    ) -> BaseModelOutputWithPooling | tuple:
        """See [`PiscesModel.get_gen_image_features`]: `pooler_output` is `(num_images, num_gen_tokens, gen_hidden)`."""
        return self.model.get_gen_image_features(gen_pixel_values, **kwargs)

    @can_return_tuple
    @_accepts_old_cache_name
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        gen_pixel_values: torch.FloatTensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        labels: torch.LongTensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> PiscesCausalLMOutputWithPast | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Token ids; see [`PiscesModel.forward`] for the placeholders. A generation sample reads
                `prompt <boi> <gen>*m <eoi>`. `inputs_embeds` may replace them (see [`PiscesModel.forward`]).
            pixel_values (`torch.FloatTensor` of shape `(num_images, 3, H, W)`, *optional*):
                Images to understand.
            gen_pixel_values (`torch.FloatTensor` of shape `(num_gen_images, 3, H', W')`, *optional*):
                Images to generate; gives `gen_loss`, the MSE of `gen_head` at the position before each `<gen>` (the
                `<boi>`, then every `<gen>` but the last) against that `<gen>`'s target.
            mm_encoder_outputs (`dict[str, BaseModelOutputWithPooling]`, *optional*):
                Already encoded images instead of pixels; see [`PiscesModel.forward`].
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Text labels, unshifted, -100 where no loss is taken (placeholders, prompts). The `<eoi>` after the last
                `<gen>` is labelled to end the image.
            shift_labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Labels already aligned with the positions (`shift_labels[:, t]` is what position `t` predicts), as
                context- and sequence-parallel training give them for a shard of a longer sequence, whose last
                position predicts a token of the next shard. They replace `labels` and nothing is shifted again.
                The generation loss pairs the hidden state at `t` with the `<gen>` at `t + 1`, inside the input: a
                shard must hold each `<boi> <gen>*m` block whole, with its image in `gen_pixel_values` (its `<eoi>`
                may open the next shard); a block cut by the shard boundary is an error.
            num_items_in_batch (`int` or `torch.Tensor`, *optional*):
                Number of text targets over the whole (accumulated, gathered) batch: `lm_loss` becomes the sum of the
                cross-entropies divided by it, transformers' convention for gradient accumulation. `gen_loss` stays the
                mean over this batch's vectors. The stock Trainer does not pass it (see `accepts_loss_kwargs`).
            logits_to_keep (`int` or `torch.Tensor`, *optional*):
                Compute logits only for the last `logits_to_keep` positions (0: all).

        Returns:
            [`PiscesCausalLMOutputWithPast`], or a tuple with `return_dict=False`.
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            gen_pixel_values=gen_pixel_values,
            mm_encoder_outputs=mm_encoder_outputs,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        lm_loss = None
        text_targets = shift_labels if shift_labels is not None else labels
        if text_targets is not None and bool((text_targets != -100).any()):
            lm_loss = self.loss_function(
                logits=logits,
                labels=labels,
                vocab_size=self.config.text_config.vocab_size,
                num_items_in_batch=num_items_in_batch,
                shift_labels=shift_labels,
            )

        gen_embeds = gen_targets = gen_loss = None
        if outputs.gen_image_outputs is not None:
            gen_targets = outputs.gen_image_outputs.pooler_output.detach()
            predicts_gen = self._gen_prediction_mask(input_ids, inputs_embeds)
            gen_embeds = self.gen_head(hidden_states[predicts_gen.to(hidden_states.device)])
            gen_embeds = gen_embeds.view(gen_targets.shape)
            gen_loss = F.mse_loss(gen_embeds.float(), gen_targets.to(gen_embeds.device).float())

        loss = None
        if lm_loss is not None or gen_loss is not None:
            loss = 0.0
            if lm_loss is not None:
                loss = loss + lm_loss
            if gen_loss is not None:
                loss = loss + self.config.gen_loss_weight * gen_loss.to(logits.device)

        return PiscesCausalLMOutputWithPast(
            loss=loss,
            lm_loss=lm_loss,
            gen_loss=gen_loss,
            logits=logits,
            gen_embeds=gen_embeds,
            gen_targets=gen_targets,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
            gen_image_outputs=outputs.gen_image_outputs,
            **{CACHE_KWARG: getattr(outputs, CACHE_KWARG)},
        )

    def _gen_prediction_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor | None
    ) -> torch.BoolTensor:
        """
        Mask `(batch_size, sequence_length)` of the positions whose hidden state predicts a generation vector: the one
        before each `<gen>`, in order, so the j-th masked position regresses the j-th target.
        """
        is_gen = self.model.token_mask(input_ids, inputs_embeds, self.config.gen_token_id)
        if bool(is_gen[:, 0].any()):
            raise ValueError(
                "A <gen> placeholder opens the sequence, so the position that predicts its vector is not in the input: "
                "a <boi> <gen>*m block was cut (by truncation, or by sharding the sequence). Keep each block, from its "
                "<boi>, inside one input."
            )
        predicts_gen = torch.zeros_like(is_gen)
        predicts_gen[:, :-1] = is_gen[:, 1:]
        is_boi = self.model.token_mask(input_ids, inputs_embeds, self.config.boi_token_id)
        if not bool((is_boi | is_gen)[predicts_gen].all()):
            raise ValueError("Every block of <gen> placeholders must follow a <boi> token: `<boi> <gen>*m <eoi>`.")
        return predicts_gen

    @torch.no_grad()
    def generate_image_embeddings(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor | None = None,
        guidance_scale: float | None = None,
        negative_input_ids: torch.LongTensor | None = None,
        negative_attention_mask: torch.LongTensor | None = None,
        use_cache: bool = True,
        cache_implementation: str | None = None,
        compile_config: CompileConfig | None = None,
        **kwargs,
    ) -> torch.FloatTensor:
        r"""
        Predicts the `config.num_gen_tokens` generation vectors of each prompt, one at a time: the last hidden state
        goes through `gen_head`, the prediction is fed back through `gen_projector`, with the KV cache.

        With `guidance_scale > 1`, classifier-free guidance runs the conditional and the unconditional rows in one
        batched forward and combines them as `u + guidance_scale * (c - u)`; the guided vector is fed back to both.

        The cache and compilation are chosen as for `generate`: `cache_implementation="static"` (argument or
        `generation_config.cache_implementation`) preallocates the KV cache, and its one-position decode step
        (language model, `gen_head`, guidance, `gen_projector`) is then compiled with `compile_config` (argument or
        `generation_config.compile_config`; on CUDA by default `CompileConfig()`, whose `mode="reduce-overhead"`
        captures the step as a CUDA graph; eager on CPU unless a compile config is given;
        `generation_config.disable_compile=True` keeps it eager). The prompt (prefill) always runs eagerly. The
        compiled step is reused across calls without recompiling as long as the batch size stays the same: the cache
        is `generation_config.max_cache_len` long when set, otherwise the prompt plus `num_gen_tokens` rounded up to a
        multiple of 128 (and never shorter than this model's last cache at that batch size), so prompts of different
        lengths share one cache, one attention-mask shape and one graph. The first call at a new batch size, with
        guidance switched on or off, or a prompt past the cache's length compiles once more. On CPU the compiled step's
        2- to 4-row matrix products run as `(W @ x.T).T` (`pisces.few_row_matmul.FewRowMatmulPass`), where MKL is
        two to three times faster than for `nn.Linear`'s `x @ W.T`.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Left-padded prompts, each ending in `<boi>` (`PiscesProcessor(text=..., generation_mode="image")`).
            attention_mask (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                1 for tokens, 0 for left padding.
            guidance_scale (`float`, *optional*, defaults to `generation_config.gen_guidance_scale`):
                Classifier-free guidance scale on the vectors; 1 turns guidance off.
            negative_input_ids, negative_attention_mask (`torch.LongTensor` of shape `(batch_size, length)`, *optional*):
                Unconditional (or negative) prompts, one per row, ending in `<boi>`. Defaults to
                `config.unconditional_input_ids`, the empty prompt as the processor defines it.
            use_cache (`bool`, *optional*, defaults to `True`):
                `False` recomputes the whole sequence at every step (slower, same result).
            cache_implementation (`str`, *optional*):
                `"dynamic"` (transformers' `DynamicCache`, grown a position per step) or `"static"`; defaults to
                `generation_config.cache_implementation`, else `"static"` when a compile config is given, else
                `"dynamic"`.
            compile_config (`transformers.CompileConfig`, *optional*):
                `torch.compile` settings of the static decode step (see above); implies `cache_implementation="static"`.
            kwargs:
                Passed to the language model at every step.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, num_gen_tokens, gen_hidden_size)`, in the model's dtype.
        """
        config = self.config
        generation_config = self.generation_config
        if guidance_scale is None:
            guidance_scale = generation_config.gen_guidance_scale
        if guidance_scale < 1:
            raise ValueError(f"guidance_scale must be >= 1 (1 disables guidance), got {guidance_scale}.")
        if not use_cache and (cache_implementation == "static" or compile_config is not None):
            raise ValueError("use_cache=False recomputes the sequence without a cache; drop cache_implementation "
                             "and compile_config, or keep the cache.")
        if use_cache:
            cache_implementation = choose_cache_implementation(cache_implementation, compile_config, generation_config)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self._check_image_prompt(input_ids, attention_mask, "input_ids")
        batch_size = input_ids.shape[0]
        do_guidance = guidance_scale > 1

        if do_guidance:
            if negative_input_ids is None:
                if config.unconditional_input_ids is None:
                    raise ValueError(
                        "Guidance needs an unconditional prompt: pass negative_input_ids (PiscesProcessor with "
                        "generation_mode='image' returns them) or set config.unconditional_input_ids."
                    )
                negative_input_ids = torch.tensor([config.unconditional_input_ids] * batch_size)
            negative_input_ids = negative_input_ids.to(input_ids.device)
            if negative_attention_mask is None:
                negative_attention_mask = torch.ones_like(negative_input_ids)
            if negative_input_ids.shape[0] != batch_size:
                raise ValueError(
                    f"Got {negative_input_ids.shape[0]} negative prompts for {batch_size} prompts; pass one per prompt."
                )
            self._check_image_prompt(negative_input_ids, negative_attention_mask, "negative_input_ids")
            pad_id = config.text_config.pad_token_id or 0
            input_ids, attention_mask = _left_pad(
                [(input_ids, attention_mask), (negative_input_ids, negative_attention_mask.to(attention_mask))], pad_id
            )

        if use_cache and cache_implementation == "static":
            return self._generate_image_embeddings_static(
                input_ids, attention_mask, guidance_scale if do_guidance else None, compile_config, **kwargs
            )[:batch_size]

        language_model = self.model.language_model
        # With the cache, each step feeds only the newest position; without it, the whole sequence so far.
        step_embeds = self.get_input_embeddings()(input_ids)
        step_positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        cache = None
        predictions = []
        for step in range(config.num_gen_tokens):
            outputs = language_model(
                inputs_embeds=step_embeds,
                attention_mask=attention_mask,
                position_ids=step_positions,
                use_cache=use_cache,
                **{CACHE_KWARG: cache},
                **kwargs,
            )
            cache = getattr(outputs, CACHE_KWARG) if use_cache else None
            prediction = self.gen_head(outputs.last_hidden_state[:, -1])
            if do_guidance:
                conditional, unconditional = prediction.float().chunk(2)
                guided = unconditional + guidance_scale * (conditional - unconditional)
                prediction = guided.to(prediction.dtype).repeat(2, 1)
            predictions.append(prediction[:batch_size])
            if step + 1 == config.num_gen_tokens:
                break
            next_embeds = self.model.gen_projector(prediction).to(step_embeds.dtype)[:, None]
            next_positions = step_positions[:, -1:] + 1
            attention_mask = F.pad(attention_mask, (0, 1), value=1)
            if use_cache:
                step_embeds, step_positions = next_embeds, next_positions
            else:
                step_embeds = torch.cat([step_embeds, next_embeds], dim=1)
                step_positions = torch.cat([step_positions, next_positions], dim=1)
        return torch.stack(predictions, dim=1)

    def _generate_image_embeddings_static(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor,
        guidance_scale: float | None,
        compile_config: CompileConfig | None,
        **kwargs,
    ) -> torch.FloatTensor:
        """
        The vector loop on a static cache: the prompt eagerly, then `num_gen_tokens - 1` one-position steps, compiled
        when a compile config applies. `input_ids` holds every row (conditional, then unconditional with guidance);
        returns `(rows, num_gen_tokens, gen_hidden_size)`.
        """
        num_gen_tokens = self.config.num_gen_tokens
        rows, prompt_length = input_ids.shape
        device = input_ids.device
        state = self.__dict__.setdefault("_static_image_decoding", StaticImageDecoding())
        cache = state.cache(
            self.config.text_config, rows, prompt_length + num_gen_tokens,
            getattr(self.generation_config, "max_cache_len", None), self.dtype, device,
        )
        # The whole cache's length, fixed for the loop: the prompt's left padding, then ones, as the causal mask hides
        # the positions not written yet.
        full_mask = torch.ones(rows, cache.get_max_length(), dtype=attention_mask.dtype, device=device)
        full_mask[:, :prompt_length] = attention_mask
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        scale = None if guidance_scale is None else torch.tensor(guidance_scale, dtype=torch.float32, device=device)

        outputs = self.model.language_model(
            inputs_embeds=self.get_input_embeddings()(input_ids),
            attention_mask=full_mask,
            position_ids=positions,
            use_cache=True,
            **{CACHE_KWARG: cache},
            **kwargs,
        )
        prediction, next_embeds = self._guided_prediction_and_next_input(outputs.last_hidden_state[:, -1], scale)
        predictions = [prediction]
        positions = positions[:, -1:]

        compile_config = choose_compile_config(compile_config, self.generation_config, device)
        step = self._image_decode_step if compile_config is None else state.compiled(
            self._image_decode_step, compile_config
        )
        # The inductor settings are part of what a compiled graph was made under: held for the whole loop.
        with contextlib.nullcontext() if compile_config is None else compile_context(device):
            for index in range(num_gen_tokens - 1):
                positions = positions + 1
                if compile_config is None:
                    prediction, next_embeds = step(next_embeds, positions, full_mask, cache, scale, **kwargs)
                else:
                    # A captured CUDA graph overwrites its outputs on the next replay: what is kept is copied first.
                    torch.compiler.cudagraph_mark_step_begin()
                    # The first step checks the compiled graph's guards (and compiles, if they fail); the later ones
                    # see the same tensors, shapes and modules (only values change), so re-checking them, a few ms a
                    # step for a whole model, is skipped.
                    with (
                        contextlib.nullcontext() if index == 0
                        else torch.compiler.set_stance(skip_guard_eval_unsafe=True)
                    ):
                        prediction, next_embeds = step(next_embeds, positions, full_mask, cache, scale, **kwargs)
                    # The copies of the outputs (see above), the next input with standard strides: the graph was
                    # compiled for the eager prefill's layout, and a size-1 dimension's stride in a compiled output
                    # can differ (a guard failure, so a recompile).
                    prediction = prediction.clone()
                    next_embeds = next_embeds.clone(memory_format=torch.contiguous_format)
                predictions.append(prediction)
        return torch.stack(predictions, dim=1)

    def _image_decode_step(
        self,
        embeds: torch.FloatTensor,
        position_ids: torch.LongTensor,
        attention_mask: torch.LongTensor,
        cache: Cache,
        guidance_scale: torch.Tensor | None,
        **kwargs,
    ) -> tuple[torch.FloatTensor, torch.FloatTensor]:
        """
        One position of the vector loop, the unit `torch.compile` fuses: `embeds` `(rows, 1, hidden)` at `position_ids`
        `(rows, 1)` through the language model (writing `cache`), then the guided prediction `(rows, gen_hidden)` and
        the next input `(rows, 1, hidden)`.
        """
        outputs = self.model.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{CACHE_KWARG: cache},
            **kwargs,
        )
        return self._guided_prediction_and_next_input(outputs.last_hidden_state[:, -1], guidance_scale)

    def _guided_prediction_and_next_input(
        self, last_hidden_state: torch.FloatTensor, guidance_scale: torch.Tensor | None
    ) -> tuple[torch.FloatTensor, torch.FloatTensor]:
        """`gen_head` on `(rows, hidden)`, guidance `u + s * (c - u)` given to both halves, and its `gen_projector`."""
        prediction = self.gen_head(last_hidden_state)
        if guidance_scale is not None:
            conditional, unconditional = prediction.float().chunk(2)
            guided = unconditional + guidance_scale * (conditional - unconditional)
            prediction = guided.to(prediction.dtype).repeat(2, 1)
        next_embeds = self.model.gen_projector(prediction).to(last_hidden_state.dtype)[:, None]
        return prediction, next_embeds

    def _check_image_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, name: str):
        if input_ids.ndim != 2 or input_ids.shape[0] == 0:
            raise ValueError(f"{name} must have shape (batch_size, sequence_length), got {tuple(input_ids.shape)}.")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"The attention mask of {name} has shape {tuple(attention_mask.shape)}, expected "
                f"{tuple(input_ids.shape)}."
            )
        if not bool(attention_mask[:, -1].all()):
            raise ValueError(
                f"{name} is right-padded; image generation needs left padding (PiscesProcessor pads left in "
                f"generation_mode='image', or set tokenizer.padding_side='left')."
            )
        if not bool((input_ids[:, -1] == self.config.boi_token_id).all()):
            raise ValueError(
                f"Every row of {name} must end with the <boi> token (id {self.config.boi_token_id}), which starts the "
                f"image; PiscesProcessor(text=..., generation_mode='image') adds it."
            )
        # Positions past the language model's range run without error and decode to a smear.
        positions = getattr(self.config.text_config, "max_position_embeddings", None)
        longest = int(attention_mask.sum(-1).max())
        if positions is not None and longest + self.config.num_gen_tokens > positions:
            raise ValueError(
                f"{name} has a prompt of {longest} tokens: with the {self.config.num_gen_tokens} image tokens it needs "
                f"{longest + self.config.num_gen_tokens} positions, more than the language model's {positions} "
                f"(max_position_embeddings). Shorten the prompt to at most {positions - self.config.num_gen_tokens} "
                "tokens."
            )


__all__ = [
    "PiscesModel",
    "PiscesForConditionalGeneration",
    "PiscesPreTrainedModel",
    "PiscesModelOutputWithPast",
    "PiscesCausalLMOutputWithPast",
]
