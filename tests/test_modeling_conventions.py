"""The model behaves like transformers' own multimodal models (LLaVA, Janus): frozen encoder, encoder outputs,
tuples, loss keyword arguments, embeddings input, parallel plans, the cache argument's name, GenerationConfig, strict
configs."""

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import generation_batch, understanding_batch
from transformers import (
    AutoConfig,
    AutoModel,
    GenerationConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.trainer_pt_utils import get_model_param_count

from pisces import MissingSubConfigError, PiscesConfig, PiscesForConditionalGeneration, PiscesModel
from pisces.conversion import preset_config
from pisces.modeling_pisces import CACHE_KWARG, DEFAULT_GEN_GUIDANCE_SCALE


REFERENCE_CHECKPOINT = Path(__file__).resolve().parents[1] / "reference_model" / "checkpoint"


def mixed_batch(config):
    """One understanding row and one generation row, right-padded to one length, with both kinds of images."""
    und, gen = understanding_batch(config), generation_batch(config)
    length = max(und["input_ids"].shape[1], gen["input_ids"].shape[1])
    pad = config.text_config.pad_token_id

    def padded(tensor, value):
        return F.pad(tensor, (0, length - tensor.shape[1]), value=value)

    return {
        "input_ids": torch.cat([padded(und["input_ids"], pad), padded(gen["input_ids"], pad)]),
        "attention_mask": torch.cat([padded(torch.ones_like(b["input_ids"]), 0) for b in (und, gen)]),
        "labels": torch.cat([padded(und["labels"], -100), padded(gen["labels"], -100)]),
        "pixel_values": und["pixel_values"],
        "gen_pixel_values": gen["gen_pixel_values"],
    }


# ---------------------------------------------------------------- the frozen generation encoder


def _frozen_names(model):
    return {name for name, parameter in model.named_parameters() if not parameter.requires_grad}


def test_gen_vision_tower_is_frozen_from_construction_and_after_loading(tiny_checkpoint):
    tower_names = lambda model, prefix: {f"{prefix}{name}" for name, _ in model.gen_vision_tower.named_parameters()}
    built = PiscesForConditionalGeneration(preset_config("tiny"))
    assert _frozen_names(built) == tower_names(built.model, "model.gen_vision_tower.")
    loaded = PiscesForConditionalGeneration.from_pretrained(tiny_checkpoint)
    assert _frozen_names(loaded) == tower_names(loaded.model, "model.gen_vision_tower.")
    base = AutoModel.from_pretrained(tiny_checkpoint)
    assert isinstance(base, PiscesModel) and _frozen_names(base) == tower_names(base, "gen_vision_tower.")
    model, info = PiscesForConditionalGeneration.from_pretrained(tiny_checkpoint, output_loading_info=True)
    assert _frozen_names(model) == tower_names(model.model, "model.gen_vision_tower.")


def test_the_stock_trainer_counts_only_what_trains_and_scales_the_loss_itself(tiny_model, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = Trainer(model=tiny_model, args=args)
    total = sum(p.numel() for p in tiny_model.parameters())
    tower = sum(p.numel() for p in tiny_model.model.gen_vision_tower.parameters())
    assert get_model_param_count(trainer.model, trainable_only=True) == total - tower
    # The generation MSE is a per-batch mean: the Trainer must divide by the accumulation steps, not the model.
    assert trainer.model_accepts_loss_kwargs is False


def test_targets_carry_no_gradient_into_the_loss_even_from_an_unfrozen_tower(tiny_model):
    tiny_model.train()
    tiny_model.model.gen_vision_tower.requires_grad_(True)
    out = tiny_model(**generation_batch(tiny_model.config))
    assert not out.gen_targets.requires_grad and not out.gen_image_outputs.pooler_output.requires_grad
    out.loss.backward()
    assert all(p.grad is None for p in tiny_model.model.gen_vision_tower.parameters())
    assert tiny_model.model.gen_projector.linear_1.weight.grad is not None


# ---------------------------------------------------------------- encoder features and outputs


@pytest.mark.parametrize("owner", ["model", "model.model"])
def test_get_image_features_returns_the_towers_output_with_projected_features(tiny_checkpoint, owner):
    model = PiscesForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="eager").eval()
    config = model.config
    target = model if owner == "model" else model.model
    pixels = understanding_batch(config)["pixel_values"]
    out = target.get_image_features(pixels)
    assert isinstance(out, BaseModelOutputWithPooling)
    assert out.pooler_output.shape == (1, config.num_image_tokens, config.text_config.hidden_size)
    tower_out = model.model.vision_tower(pixel_values=pixels)
    torch.testing.assert_close(out.last_hidden_state, tower_out.last_hidden_state)
    torch.testing.assert_close(out.pooler_output, model.model.und_projector(tower_out.last_hidden_state))
    assert out.hidden_states is None and out.attentions is None

    full = target.get_image_features(pixels, output_hidden_states=True, output_attentions=True)
    layers = config.vision_config.num_hidden_layers
    assert len(full.hidden_states) == layers + 1 and len(full.attentions) == layers
    as_tuple = target.get_image_features(pixels, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], out.last_hidden_state)
    torch.testing.assert_close(as_tuple[1], out.pooler_output)


@pytest.mark.parametrize("owner", ["model", "model.model"])
def test_get_gen_image_features_pools_the_generation_encoder(tiny_checkpoint, owner):
    model = PiscesForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="eager").eval()
    config = model.config
    target = model if owner == "model" else model.model
    pixels = generation_batch(config, num_images=2)["gen_pixel_values"]
    out = target.get_gen_image_features(pixels, output_hidden_states=True, output_attentions=True)
    assert isinstance(out, BaseModelOutputWithPooling)
    assert out.pooler_output.shape == (2, config.num_gen_tokens, config.gen_vision_config.hidden_size)
    layers = config.gen_vision_config.num_hidden_layers
    assert len(out.hidden_states) == layers + 1 and len(out.attentions) == layers
    patches = out.last_hidden_state[:, 1:]  # without the class token
    grid, a = config.gen_vision_config.image_size // config.gen_vision_config.patch_size, config.gen_pool_size
    pooled = patches.reshape(2, grid // a, a, grid // a, a, -1).mean(dim=(2, 4)).flatten(1, 2)
    torch.testing.assert_close(out.pooler_output, pooled)
    torch.testing.assert_close(target.get_gen_image_features(pixels, return_dict=False)[1], pooled)
    # One public name for the pooled generation features.
    assert not hasattr(target, "get_gen_targets") and not hasattr(target, "get_gen_features")


def test_outputs_carry_the_encoder_outputs_when_asked(tiny_checkpoint):
    model = PiscesForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="eager").eval()
    config = model.config
    batch = mixed_batch(config)
    out = model(**batch)
    torch.testing.assert_close(
        out.image_outputs.pooler_output, model.get_image_features(batch["pixel_values"]).pooler_output
    )
    torch.testing.assert_close(out.gen_image_outputs.pooler_output, out.gen_targets)
    assert out.image_outputs.hidden_states is None and out.gen_image_outputs.attentions is None

    full = model(**batch, output_hidden_states=True, output_attentions=True)
    assert len(full.image_outputs.hidden_states) == config.vision_config.num_hidden_layers + 1
    assert len(full.image_outputs.attentions) == config.vision_config.num_hidden_layers
    assert len(full.gen_image_outputs.hidden_states) == config.gen_vision_config.num_hidden_layers + 1
    assert len(full.gen_image_outputs.attentions) == config.gen_vision_config.num_hidden_layers
    assert len(full.hidden_states) == config.text_config.num_hidden_layers + 1  # the language model's own
    base = model.model(**{k: v for k, v in batch.items() if k != "labels"})
    torch.testing.assert_close(base.image_outputs.pooler_output, out.image_outputs.pooler_output)
    torch.testing.assert_close(base.gen_image_outputs.pooler_output, out.gen_targets)


def test_already_encoded_images_go_back_in_instead_of_pixels(tiny_model):
    batch = mixed_batch(tiny_model.config)
    out = tiny_model(**batch)
    encoded = {"image": out.image_outputs, "gen_image": out.gen_image_outputs}
    pixel_free = {k: v for k, v in batch.items() if k not in ("pixel_values", "gen_pixel_values")}
    again = tiny_model(**pixel_free, mm_encoder_outputs=encoded)
    for name in ("loss", "lm_loss", "gen_loss", "logits", "gen_embeds"):
        torch.testing.assert_close(getattr(again, name), getattr(out, name))
    # Features computed apart, as get_image_features returns them, work the same.
    features = {"image": tiny_model.get_image_features(batch["pixel_values"])}
    with_gen_pixels = {**pixel_free, "gen_pixel_values": batch["gen_pixel_values"]}
    only_images = tiny_model(**with_gen_pixels, mm_encoder_outputs=features)
    torch.testing.assert_close(only_images.logits, out.logits)

    with pytest.raises(ValueError, match="pixel_values or mm_encoder_outputs\\['image'\\], not both"):
        tiny_model(**batch, mm_encoder_outputs={"image": out.image_outputs})
    with pytest.raises(TypeError, match="pooler_output"):
        tiny_model(**pixel_free, mm_encoder_outputs={"image": out.image_outputs.pooler_output})


# ---------------------------------------------------------------- return_dict=False


def _assert_same_nested(a, b):
    if isinstance(a, (tuple, list)):
        assert isinstance(b, (tuple, list)) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same_nested(x, y)
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b)
    else:
        assert type(a) is type(b)


@pytest.mark.parametrize("kind", ["understanding", "generation", "mixed"])
def test_return_dict_false_gives_tuples_on_both_forwards(tiny_model, kind):
    config = tiny_model.config
    batch = {"understanding": understanding_batch, "generation": generation_batch, "mixed": mixed_batch}[kind](config)
    out = tiny_model(**batch)
    as_tuple = tiny_model(**batch, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], out.loss)
    _assert_same_nested(as_tuple, out.to_tuple())

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    base_out = tiny_model.model(**inputs)
    base_tuple = tiny_model.model(**inputs, return_dict=False)
    assert isinstance(base_tuple, tuple)
    torch.testing.assert_close(base_tuple[0], base_out.last_hidden_state)
    _assert_same_nested(base_tuple, base_out.to_tuple())


def test_config_return_dict_false_gives_tuples(tiny_model):
    batch = generation_batch(tiny_model.config)
    expected = tiny_model(**batch).loss
    tiny_model.config.return_dict = False
    out = tiny_model(**batch)
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[0], expected)


# ---------------------------------------------------------------- loss keyword arguments


def test_shift_labels_are_scored_as_given(tiny_model):
    batch = understanding_batch(tiny_model.config)
    logits = tiny_model(**batch).logits[0]
    # Arbitrary already-aligned targets: position t is scored against shift_labels[t], nothing is shifted again.
    shift_labels = torch.full_like(batch["input_ids"], -100)
    shift_labels[0, [2, 5, 9]] = torch.tensor([30, 31, 32])
    out = tiny_model(**{**batch, "labels": None}, shift_labels=shift_labels)
    expected = F.cross_entropy(logits[[2, 5, 9]], torch.tensor([30, 31, 32]))
    torch.testing.assert_close(out.lm_loss, expected)
    # DeepSpeed's sequence parallelism passes the shifted labels as labels too: they are not shifted again.
    both = tiny_model(**{**batch, "labels": shift_labels}, shift_labels=shift_labels)
    torch.testing.assert_close(both.lm_loss, expected)


def test_num_items_in_batch_divides_the_text_cross_entropy_sum(tiny_model):
    batch = generation_batch(tiny_model.config)
    batch["labels"][0, 2] = 13  # a text target besides <eoi>
    out = tiny_model(**batch)
    logits, labels = out.logits[0, :-1], batch["labels"][0, 1:]
    keep = labels != -100
    summed = F.cross_entropy(logits[keep], labels[keep], reduction="sum")
    scaled = tiny_model(**batch, num_items_in_batch=torch.tensor(7))
    torch.testing.assert_close(scaled.lm_loss, summed / 7)
    torch.testing.assert_close(scaled.gen_loss, out.gen_loss)  # the generation term stays a mean over this batch
    torch.testing.assert_close(scaled.loss, summed / 7 + tiny_model.config.gen_loss_weight * out.gen_loss)


def test_a_shard_of_a_sharded_sequence_trains_against_the_right_targets(tiny_model):
    # Context parallelism cuts `prompt <boi> <gen>*m <eoi>` after the last <gen>: this shard's last position predicts
    # the <eoi> on the next shard, which only shift_labels can say.
    config = tiny_model.config
    batch = generation_batch(config)
    full = tiny_model(**batch)
    end = batch["input_ids"].shape[1] - 1  # the <eoi>
    shift_labels = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    shard = {"input_ids": batch["input_ids"][:, :end], "gen_pixel_values": batch["gen_pixel_values"]}
    out = tiny_model(**shard, labels=batch["labels"][:, :end], shift_labels=shift_labels[:, :end])
    expected = F.cross_entropy(full.logits[0, end - 1 : end], torch.tensor([config.eoi_token_id]))
    torch.testing.assert_close(out.lm_loss, expected)
    # The generation loss of the shard is the whole sequence's: the block is inside it.
    torch.testing.assert_close(out.gen_embeds, full.gen_embeds)
    torch.testing.assert_close(out.gen_loss, full.gen_loss)
    # Without shift_labels the model would shift the shard's labels and lose that target.
    assert tiny_model(**shard, labels=batch["labels"][:, :end]).lm_loss is None


def test_a_generation_block_cut_by_the_shard_is_refused(tiny_model):
    config = tiny_model.config
    batch = generation_batch(config)
    boi = batch["input_ids"][0].tolist().index(config.boi_token_id)
    shard = batch["input_ids"][:, boi + 1 :]  # starts with the <gen>s: the <boi> that predicts the first is elsewhere
    with pytest.raises(ValueError, match="block was cut"):
        tiny_model(input_ids=shard, gen_pixel_values=batch["gen_pixel_values"])


# ---------------------------------------------------------------- inputs_embeds


@pytest.mark.parametrize("kind", ["generation", "mixed"])
def test_inputs_embeds_give_what_input_ids_give(tiny_model, kind):
    config = tiny_model.config
    batch = generation_batch(config, num_images=2) if kind == "generation" else mixed_batch(config)
    from_ids = tiny_model(**batch)
    embeds = tiny_model.get_input_embeddings()(batch["input_ids"])
    from_embeds = tiny_model(**{k: v for k, v in batch.items() if k != "input_ids"}, inputs_embeds=embeds)
    for name in ("loss", "lm_loss", "gen_loss", "logits", "gen_embeds", "gen_targets"):
        torch.testing.assert_close(getattr(from_embeds, name), getattr(from_ids, name))


def test_inputs_embeds_find_a_gen_block_without_its_boi(tiny_model):
    config = tiny_model.config
    batch = generation_batch(config)
    ids = batch["input_ids"].clone()
    ids[ids == config.boi_token_id] = 11  # a text token before the block instead of <boi>
    embeds = tiny_model.get_input_embeddings()(ids)
    with pytest.raises(ValueError, match="must follow a <boi>"):
        tiny_model(inputs_embeds=embeds, gen_pixel_values=batch["gen_pixel_values"])


# ---------------------------------------------------------------- parallel plans and device maps


@pytest.mark.parametrize("tie", [False, True])
def test_tensor_parallel_plan_is_the_causal_lms_with_lm_head(tie):
    config = preset_config("tiny")
    config.tie_word_embeddings = tie  # Pisces ties; its text config is left untied
    with torch.device("meta"):
        model = PiscesForConditionalGeneration(config)
    plan = model.tp_plan
    assert plan["lm_head"] == "colwise_gather_output"
    # Exactly the plan transformers gives the same language model as a causal LM: a tied lm_head is sharded over the
    # vocabulary like embed_tokens, so the one tensor is split one way.
    text_config = type(config.text_config)(**{**config.text_config.to_dict(), "tie_word_embeddings": tie})
    with torch.device("meta"):
        llama = LlamaForCausalLM(text_config)
    assert {key.replace("model.language_model.", "model."): style for key, style in plan.items()} == llama.tp_plan
    if tie:
        assert plan["model.language_model.embed_tokens"] == "embedding_rowwise"
        assert model.lm_head.weight is model.get_input_embeddings().weight
    # Every entry names modules of the model.
    import re

    names = [name for name, _ in model.named_modules()]
    for key in plan:
        pattern = re.compile(re.escape(key).replace(r"\*", r"\d+") + "$")
        assert any(pattern.match(name) for name in names), key


def test_no_split_modules_are_the_sub_models_blocks(tiny_model):
    no_split = set(tiny_model._no_split_modules)
    assert "PiscesMLP" not in no_split
    assert {"LlamaDecoderLayer", "SiglipEncoderLayer", "CLIPEncoderLayer"} <= no_split


# ---------------------------------------------------------------- the KV cache argument


def test_the_old_cache_name_warns_only_where_the_library_deprecates_it(tiny_model):
    batch = understanding_batch(tiny_model.config)
    prefix, last = batch["input_ids"][:, :-1], batch["input_ids"][:, -1:]
    first = tiny_model(input_ids=prefix, pixel_values=batch["pixel_values"], use_cache=True)
    assert isinstance(first[CACHE_KWARG], Cache)
    reference = tiny_model(input_ids=last, cache=first[CACHE_KWARG]).logits

    second = tiny_model(input_ids=prefix, pixel_values=batch["pixel_values"], use_cache=True)
    if CACHE_KWARG == "cache":  # transformers >= 5.24 deprecates past_key_values, with its own helper
        with pytest.warns(FutureWarning, match="past_key_values.*deprecated.*Use `cache` instead"):
            logits = tiny_model(input_ids=last, past_key_values=second[CACHE_KWARG]).logits
    else:  # before 5.24 it is the library's name: accepted silently, and the name the signature shows
        import inspect

        assert "past_key_values" in inspect.signature(tiny_model.forward).parameters
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            logits = tiny_model(input_ids=last, past_key_values=second[CACHE_KWARG]).logits
    torch.testing.assert_close(logits, reference)
    # The output field is the library's name (generate reads it); `past_key_values` reads it on every version.
    assert first.past_key_values is first[CACHE_KWARG]


# ---------------------------------------------------------------- GenerationConfig


def test_generation_config_carries_the_guidance_scale(tiny_checkpoint):
    built = PiscesForConditionalGeneration(preset_config("tiny"))
    assert built.generation_config.gen_guidance_scale == DEFAULT_GEN_GUIDANCE_SCALE
    # Not the standard field: text generate() would add a classifier-free guidance logits processor.
    assert built.generation_config.guidance_scale is None
    built.generation_config = GenerationConfig(max_new_tokens=5)  # a fresh one assigned still has it
    assert built.generation_config.gen_guidance_scale == DEFAULT_GEN_GUIDANCE_SCALE

    saved = json.loads((tiny_checkpoint / "generation_config.json").read_text())
    assert saved["gen_guidance_scale"] == DEFAULT_GEN_GUIDANCE_SCALE and "guidance_scale" not in saved
    assert "gen_guidance_scale" not in json.loads((tiny_checkpoint / "config.json").read_text())
    loaded = PiscesForConditionalGeneration.from_pretrained(tiny_checkpoint)
    assert loaded.generation_config.gen_guidance_scale == DEFAULT_GEN_GUIDANCE_SCALE


def _old_checkpoint(tiny_checkpoint, folder, legacy_scale, generation_scale=None):
    """The tiny model files with `gen_guidance_scale` in config.json, as checkpoints were written before."""
    folder.mkdir()
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        shutil.copy(tiny_checkpoint / name, folder / name)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "gen_guidance_scale": legacy_scale}))
    generation = json.loads((folder / "generation_config.json").read_text())
    generation.pop("gen_guidance_scale")
    if generation_scale is not None:
        generation["gen_guidance_scale"] = generation_scale
    (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


def test_an_old_checkpoint_with_the_scale_in_config_json_behaves_as_before(tiny_checkpoint, tmp_path):
    old = PiscesForConditionalGeneration.from_pretrained(_old_checkpoint(tiny_checkpoint, tmp_path / "old", 1.5))
    assert old.generation_config.gen_guidance_scale == 1.5
    ids = torch.tensor([old.config.unconditional_input_ids[:-1] + [12, old.config.boi_token_id]])
    default = old.generate_image_embeddings(ids)
    torch.testing.assert_close(default, old.generate_image_embeddings(ids, guidance_scale=1.5))
    assert not torch.allclose(default, old.generate_image_embeddings(ids, guidance_scale=DEFAULT_GEN_GUIDANCE_SCALE))
    # Saved again, the scale is in generation_config.json, where it now wins.
    old.save_pretrained(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "generation_config.json").read_text())["gen_guidance_scale"] == 1.5
    newer = _old_checkpoint(tiny_checkpoint, tmp_path / "both", 1.5, generation_scale=2.0)
    assert PiscesForConditionalGeneration.from_pretrained(newer).generation_config.gen_guidance_scale == 2.0


def test_generate_image_embeddings_reads_its_default_from_generation_config(tiny_model):
    ids = torch.tensor([[1, 40, 41, tiny_model.config.boi_token_id]])
    tiny_model.generation_config.gen_guidance_scale = 1.0
    torch.testing.assert_close(tiny_model.generate_image_embeddings(ids), tiny_model.generate_image_embeddings(
        ids, guidance_scale=1.0))


def test_the_shipped_reference_checkpoint_keeps_its_guidance_scale():
    config = json.loads((REFERENCE_CHECKPOINT / "config.json").read_text())
    assert config["gen_guidance_scale"] == 1.0  # written before the scale moved to generation_config.json
    model = PiscesForConditionalGeneration.from_pretrained(REFERENCE_CHECKPOINT)
    assert model.generation_config.gen_guidance_scale == 1.0


# ---------------------------------------------------------------- strict configs


@pytest.mark.parametrize("missing", ["text_config", "vision_config", "gen_vision_config"])
def test_a_config_file_without_a_sub_config_is_an_error_naming_it(tiny_checkpoint, tmp_path, missing):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    for value in ("drop", None):
        broken = {key: item for key, item in config.items() if key != missing}
        if value is None:
            broken[missing] = None
        with pytest.raises(MissingSubConfigError, match=f"lacks {missing}"):
            PiscesConfig.from_dict(broken)
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != missing}))
    with pytest.raises(ValueError, match=f"lacks {missing}"):
        AutoConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"lacks {missing}"):
        PiscesConfig.from_pretrained(tmp_path)
    shutil.copy(tiny_checkpoint / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=f"lacks {missing}"):
        PiscesForConditionalGeneration.from_pretrained(tmp_path)


def test_only_the_config_built_in_code_gives_the_paper_defaults(tiny_checkpoint):
    assert PiscesConfig().text_config.hidden_size == 4096
    # A complete file loads as before.
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert PiscesConfig.from_dict(config).text_config.hidden_size == 64
