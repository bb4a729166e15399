"""PyTorch Pisces: one language model between an understanding encoder and a generation encoder.

Understanding: image -> vision_tower -> und_projector -> vectors at the `<image>` placeholders -> text (cross-entropy).
Generation: image -> gen_vision_tower (frozen) -> average pool -> m targets. The language model reads
`prompt <boi> <gen>*m <eoi>`, with `gen_projector(target_i)` as the input at the i-th `<gen>`, and `gen_head` regresses
target i+1 from the hidden state at `<gen>`_i (target 1 from `<boi>`) with an MSE loss.
"""

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.models.llama.modeling_llama import LlamaModel
from transformers.utils import ModelOutput

from .configuration_pisces import PiscesConfig


# transformers 5.24 renamed the KV-cache argument and output field `past_key_values` -> `cache`; 5.17-5.23 use the old
# name. Decided once here; every call into the language model and every output uses CACHE_KWARG.
CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


@dataclass
class PiscesModelOutputWithPast(ModelOutput):
    """
    Output of [`PiscesModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
            Last hidden state of the language model.
        cache (`Cache`, *optional*; named `past_key_values` on transformers < 5.24):
            The language model's KV cache, returned when `use_cache=True`.
        hidden_states, attentions (*optional*):
            The language model's per-layer hidden states and attention weights, when requested.
        gen_targets (`torch.FloatTensor` of shape `(num_gen_images, num_gen_tokens, gen_hidden_size)`, *optional*):
            Pooled generation-encoder features of `gen_pixel_values`: the regression targets.
    """

    last_hidden_state: torch.FloatTensor | None = None
    if CACHE_KWARG == "cache":
        cache: Cache | None = None
    else:
        past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    gen_targets: torch.FloatTensor | None = None


@dataclass
class PiscesCausalLMOutputWithPast(ModelOutput):
    """
    Output of [`PiscesForConditionalGeneration`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            `lm_loss + config.gen_loss_weight * gen_loss`, over the terms that are present.
        lm_loss (`torch.FloatTensor` of shape `()`, *optional*):
            Next-token cross-entropy on `labels` (positions with -100 ignored); present when `labels` is given.
        gen_loss (`torch.FloatTensor` of shape `()`, *optional*):
            Mean squared error of the predicted generation vectors against the targets; present when
            `gen_pixel_values` is given.
        logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`):
            Next-token scores.
        gen_embeds (`torch.FloatTensor` of shape `(num_gen_images, num_gen_tokens, gen_hidden_size)`, *optional*):
            The generation vectors predicted by `gen_head` (teacher-forced), one row per image in `gen_pixel_values`.
        gen_targets (`torch.FloatTensor`, same shape as `gen_embeds`, *optional*):
            The targets they regress.
        cache (`Cache`, *optional*; named `past_key_values` on transformers < 5.24):
            The language model's KV cache.
        hidden_states, attentions (*optional*):
            The language model's per-layer hidden states and attention weights, when requested.
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
    # The blocks that must stay on one device are gathered from the sub-models (decoder and encoder layers) by
    # `post_init`, so a Qwen2 or Llama text model both get theirs.
    _no_split_modules = ["PiscesMLP"]
    _skip_keys_device_placement = [CACHE_KWARG]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True


def _select_vision_features(vision_tower: nn.Module, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
    """Hidden state `layer` of a vision tower; -1 is its `last_hidden_state` (post-layernorm where it has one)."""
    if layer == -1:
        return vision_tower(pixel_values=pixel_values).last_hidden_state
    return vision_tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[layer]


class PiscesModel(PiscesPreTrainedModel):
    """The Pisces backbone: both vision towers, both projectors and the language model, without the output heads."""

    def __init__(self, config: PiscesConfig):
        super().__init__(config)
        hidden_size = config.text_config.hidden_size
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.gen_vision_tower = AutoModel.from_config(config.gen_vision_config)
        act = config.projector_hidden_act
        self.und_projector = PiscesMLP(config.vision_config.hidden_size, hidden_size, hidden_size, act)
        self.gen_projector = PiscesMLP(config.gen_vision_config.hidden_size, hidden_size, hidden_size, act)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.language_model.set_input_embeddings(value)

    def get_image_features(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """
        Understanding features, projected into the language model's width.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(num_images, 3, height, width)`): from the image processor.

        Returns:
            `torch.FloatTensor` of shape `(num_images, config.num_image_tokens, text_hidden_size)`.
        """
        pixel_values = pixel_values.to(self.vision_tower.dtype)
        features = _select_vision_features(self.vision_tower, pixel_values, self.config.vision_feature_layer)
        return self.und_projector(features)

    @torch.no_grad()
    def get_gen_targets(self, gen_pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """
        Generation targets: `get_gen_features` without gradients (the targets are constants; the generation encoder
        is frozen while the LLM learns to regress them). `(num_images, num_gen_tokens, gen_hidden_size)`.
        """
        return self.get_gen_features(gen_pixel_values)

    def get_gen_features(self, gen_pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """
        The generation encoder's patch features (class token dropped), average-pooled `gen_pool_size x gen_pool_size`
        over the patch grid, with gradients (for training the encoder itself; see `get_gen_targets`).

        Args:
            gen_pixel_values (`torch.FloatTensor` of shape `(num_images, 3, height, width)`): from the gen image processor.

        Returns:
            `torch.FloatTensor` of shape `(num_images, config.num_gen_tokens, gen_hidden_size)`, row-major over the
            pooled grid.
        """
        gen_config = self.config.gen_vision_config
        side = gen_config.image_size
        if tuple(gen_pixel_values.shape[-2:]) != (side, side):
            raise ValueError(
                f"gen_pixel_values must be {side}x{side} (the generation encoder's image_size), got "
                f"{tuple(gen_pixel_values.shape[-2:])}; prepare them with the processor's gen_image_processor."
            )
        gen_pixel_values = gen_pixel_values.to(self.gen_vision_tower.dtype)
        features = _select_vision_features(
            self.gen_vision_tower, gen_pixel_values, self.config.gen_vision_feature_layer
        )
        grid = side // gen_config.patch_size
        if features.shape[1] == grid * grid + 1:  # CLIP-like encoders put a class token first
            features = features[:, 1:]
        num_images, _, width = features.shape
        features = features.transpose(1, 2).reshape(num_images, width, grid, grid)
        pooled = F.avg_pool2d(features, kernel_size=self.config.gen_pool_size)
        return pooled.flatten(2).transpose(1, 2)

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor, token_id: int, features: torch.Tensor
    ) -> torch.BoolTensor:
        """
        Mask `(batch_size, sequence_length, 1)` of the placeholder positions of `token_id`, checked against the number
        of feature vectors to scatter there.
        """
        if input_ids is None:
            token_embedding = self.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
            mask = (inputs_embeds == token_embedding).all(-1)
        else:
            mask = input_ids == token_id
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

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        gen_pixel_values: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> PiscesModelOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Token ids, with `config.num_image_tokens` `<image>` placeholders per image in `pixel_values` and
                `config.num_gen_tokens` `<gen>` placeholders per image in `gen_pixel_values`.
            pixel_values (`torch.FloatTensor` of shape `(num_images, 3, H, W)`, *optional*):
                Images to understand, in placeholder order.
            gen_pixel_values (`torch.FloatTensor` of shape `(num_gen_images, 3, H', W')`, *optional*):
                Images to generate (teacher forcing), in `<gen>` block order.
            cache (`Cache`, *optional*):
                KV cache (also accepted as `past_key_values`).
        """
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        if pixel_values is not None:
            image_features = self.get_image_features(pixel_values).to(inputs_embeds.device, inputs_embeds.dtype)
            mask = self.get_placeholder_mask(input_ids, inputs_embeds, self.config.image_token_id, image_features)
            inputs_embeds = inputs_embeds.masked_scatter(mask, image_features)

        gen_targets = None
        if gen_pixel_values is not None:
            if input_ids is None:
                raise ValueError("gen_pixel_values needs input_ids, to find the <boi> and <gen> positions.")
            gen_targets = self.get_gen_targets(gen_pixel_values)
            gen_inputs = gen_targets
            if self.training and self.config.gen_input_noise > 0:
                gen_inputs = gen_targets + self.config.gen_input_noise * torch.randn_like(gen_targets)
            gen_inputs = self.gen_projector(gen_inputs).to(inputs_embeds.device, inputs_embeds.dtype)
            mask = self.get_placeholder_mask(input_ids, inputs_embeds, self.config.gen_token_id, gen_inputs)
            inputs_embeds = inputs_embeds.masked_scatter(mask, gen_inputs)

        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{CACHE_KWARG: cache},
            **kwargs,
        )
        return PiscesModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            gen_targets=gen_targets,
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
      vectors for text-to-image prompts, which a diffusion decoder turns into pixels.
    """

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # `forward` takes **kwargs (for the language model), from which the Trainer would infer that the loss is normalized
    # over gradient-accumulation steps and processes by the model itself; it is a plain mean per batch.
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

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module):
        self.lm_head = new_embeddings

    def get_image_features(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """See [`PiscesModel.get_image_features`]: `(num_images, num_image_tokens, text_hidden_size)`."""
        return self.model.get_image_features(pixel_values)

    def get_gen_targets(self, gen_pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """See [`PiscesModel.get_gen_targets`]: `(num_images, num_gen_tokens, gen_hidden_size)`."""
        return self.model.get_gen_targets(gen_pixel_values)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        gen_pixel_values: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> PiscesCausalLMOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Token ids; see [`PiscesModel.forward`] for the placeholders. A generation sample reads
                `prompt <boi> <gen>*m <eoi>`.
            pixel_values (`torch.FloatTensor` of shape `(num_images, 3, H, W)`, *optional*):
                Images to understand.
            gen_pixel_values (`torch.FloatTensor` of shape `(num_gen_images, 3, H', W')`, *optional*):
                Images to generate; gives `gen_loss`, the MSE of `gen_head` at `<boi>` and every `<gen>` but the last
                against the next target.
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Text labels, unshifted, -100 where no loss is taken (placeholders, prompts). The `<eoi>` after the last
                `<gen>` is labelled to end the image.
            logits_to_keep (`int` or `torch.Tensor`, *optional*):
                Compute logits only for the last `logits_to_keep` positions (0: all).

        Returns:
            [`PiscesCausalLMOutputWithPast`].
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            gen_pixel_values=gen_pixel_values,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        lm_loss = None
        if labels is not None and bool((labels != -100).any()):
            lm_loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size)

        gen_embeds = gen_targets = gen_loss = None
        if outputs.gen_targets is not None:
            gen_targets = outputs.gen_targets
            # The hidden state before each <gen> (at <boi> or the previous <gen>) predicts that <gen>'s target.
            predicts_gen = torch.zeros_like(input_ids, dtype=torch.bool)
            predicts_gen[:, :-1] = input_ids[:, 1:] == self.config.gen_token_id
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
            **{CACHE_KWARG: getattr(outputs, CACHE_KWARG)},
        )

    @torch.no_grad()
    def generate_image_embeddings(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor | None = None,
        guidance_scale: float | None = None,
        negative_input_ids: torch.LongTensor | None = None,
        negative_attention_mask: torch.LongTensor | None = None,
        use_cache: bool = True,
        **kwargs,
    ) -> torch.FloatTensor:
        r"""
        Predicts the `config.num_gen_tokens` generation vectors of each prompt, one at a time: the last hidden state
        goes through `gen_head`, the prediction is fed back through `gen_projector`, with the KV cache.

        With `guidance_scale > 1`, classifier-free guidance runs the conditional and the unconditional rows in one
        batched forward and combines them as `u + guidance_scale * (c - u)`; the guided vector is fed back to both.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Left-padded prompts, each ending in `<boi>` (`PiscesProcessor(text=..., generation_mode="image")`).
            attention_mask (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                1 for tokens, 0 for left padding.
            guidance_scale (`float`, *optional*, defaults to `config.gen_guidance_scale`):
                Classifier-free guidance scale on the vectors; 1 turns guidance off.
            negative_input_ids, negative_attention_mask (`torch.LongTensor` of shape `(batch_size, length)`, *optional*):
                Unconditional (or negative) prompts, one per row, ending in `<boi>`. Defaults to
                `config.unconditional_input_ids`, the empty prompt as the processor defines it.
            use_cache (`bool`, *optional*, defaults to `True`):
                `False` recomputes the whole sequence at every step (slower, same result).
            kwargs:
                Passed to the language model at every step.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, num_gen_tokens, gen_hidden_size)`, in the model's dtype.
        """
        config = self.config
        guidance_scale = config.gen_guidance_scale if guidance_scale is None else guidance_scale
        if guidance_scale < 1:
            raise ValueError(f"guidance_scale must be >= 1 (1 disables guidance), got {guidance_scale}.")
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


__all__ = [
    "PiscesModel",
    "PiscesForConditionalGeneration",
    "PiscesPreTrainedModel",
    "PiscesModelOutputWithPast",
    "PiscesCausalLMOutputWithPast",
]
