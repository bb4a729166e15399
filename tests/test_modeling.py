import pytest
import torch
import torch.nn.functional as F
from conftest import generation_batch, understanding_batch

from pisces import PiscesConfig, PiscesForConditionalGeneration
from pisces.conversion import describe_parameters, preset_config


# ---------------------------------------------------------------- config


def test_default_config_is_the_paper_shape():
    config = PiscesConfig()
    assert config.model_type == "pisces"
    assert config.text_config.model_type == "llama"
    assert config.text_config.hidden_size == 4096 and config.text_config.num_hidden_layers == 32
    assert config.vision_config.model_type == "siglip_vision_model"
    assert config.gen_vision_config.model_type == "clip_vision_model"
    assert config.num_image_tokens == 729  # 27 x 27
    assert config.num_gen_tokens == 64  # (448 / 14 / 4) ** 2
    assert config.tie_word_embeddings is False


def test_token_counts_follow_the_encoder_configs():
    config = preset_config("tiny")
    assert config.num_image_tokens == (32 // 8) ** 2
    assert config.num_gen_tokens == (32 // 4 // 2) ** 2
    bigger = PiscesConfig(**{**config.to_dict(), "gen_pool_size": 1})
    assert bigger.num_gen_tokens == 64


def test_config_round_trip(tmp_path):
    config = preset_config("tiny")
    config.save_pretrained(tmp_path)
    loaded = PiscesConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.num_gen_tokens == config.num_gen_tokens


def test_config_rejects_pool_size_that_does_not_divide_the_grid():
    with pytest.raises(ValueError, match="gen_pool_size=3 does not divide .* 32x32 patch grid"):
        PiscesConfig(gen_pool_size=3)


def test_config_rejects_token_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match="outside the language model's vocabulary"):
        PiscesConfig(gen_token_id=10**6)


def test_paper_size_model_on_meta_device_has_about_8_8b_parameters():
    counts = describe_parameters(PiscesConfig())
    total = sum(counts.values())
    assert 8.0e9 <= total <= 9.5e9, total
    assert 7.4e9 < counts["language_model"] < 7.6e9
    assert 3.5e8 < counts["vision_tower"] < 4.5e8  # SigLIP so400m without the pooling head
    assert 2.9e8 < counts["gen_vision_tower"] < 3.1e8  # CLIP ViT-L/14


# ---------------------------------------------------------------- forward and losses


def test_generation_forward_shapes_and_losses(tiny_model):
    config = tiny_model.config
    batch = generation_batch(config, num_images=2)
    out = tiny_model(**batch)
    m, width = config.num_gen_tokens, config.gen_vision_config.hidden_size
    assert out.gen_embeds.shape == (2, m, width)
    assert out.gen_targets.shape == (2, m, width)
    assert out.logits.shape == (*batch["input_ids"].shape, config.text_config.vocab_size)
    assert out.gen_loss > 0 and out.lm_loss > 0
    torch.testing.assert_close(out.loss, out.lm_loss + config.gen_loss_weight * out.gen_loss)


def test_gen_targets_are_the_pooled_patch_features_without_class_token(tiny_model):
    config = tiny_model.config
    pixels = torch.randn(2, 3, 32, 32)
    features = tiny_model.model.gen_vision_tower(pixel_values=pixels).last_hidden_state[:, 1:]  # drop CLS
    grid = config.gen_vision_config.image_size // config.gen_vision_config.patch_size
    a = config.gen_pool_size
    # Average each a x a block of the row-major patch grid by hand.
    blocks = features.reshape(2, grid // a, a, grid // a, a, -1).mean(dim=(2, 4)).reshape(2, -1, features.shape[-1])
    torch.testing.assert_close(tiny_model.get_gen_image_features(pixels).pooler_output, blocks)


def test_gen_loss_is_taken_one_position_before_each_gen_token(tiny_model):
    config = tiny_model.config
    batch = generation_batch(config)
    out = tiny_model(**batch, output_hidden_states=True)
    hidden = out.hidden_states[-1][0]
    boi = batch["input_ids"][0].tolist().index(config.boi_token_id)
    # Hidden states at <boi>, <gen>_1 .. <gen>_{m-1} predict targets 1 .. m.
    expected = tiny_model.gen_head(hidden[boi : boi + config.num_gen_tokens])
    torch.testing.assert_close(out.gen_embeds[0], expected)
    torch.testing.assert_close(out.gen_loss, F.mse_loss(expected, out.gen_targets[0]))


def test_gen_inputs_are_the_projected_targets(tiny_model):
    config = tiny_model.config
    batch = generation_batch(config)
    targets = tiny_model.get_gen_image_features(batch["gen_pixel_values"]).pooler_output
    is_gen = batch["input_ids"] == config.gen_token_id
    embeds = tiny_model.get_input_embeddings()(batch["input_ids"])
    embeds[is_gen] = tiny_model.model.gen_projector(targets).reshape(-1, embeds.shape[-1])
    from_embeds = tiny_model.model.language_model(inputs_embeds=embeds).last_hidden_state
    from_ids = tiny_model.model(input_ids=batch["input_ids"], gen_pixel_values=batch["gen_pixel_values"])
    torch.testing.assert_close(from_ids.last_hidden_state, from_embeds)


def test_gen_input_noise_perturbs_the_inputs_in_training_only(tiny_model):
    batch = generation_batch(tiny_model.config)
    clean = tiny_model(**batch)
    tiny_model.config.gen_input_noise = 0.5
    still_eval = tiny_model(**batch)
    torch.testing.assert_close(still_eval.loss, clean.loss)  # inference never adds noise

    tiny_model.train()
    torch.manual_seed(0)
    noisy = tiny_model(**batch)
    # The targets stay clean; only what the <gen> positions read changes, so only predictions after the first move.
    torch.testing.assert_close(noisy.gen_targets, clean.gen_targets)
    torch.testing.assert_close(noisy.gen_embeds[:, 0], clean.gen_embeds[:, 0])
    assert not torch.allclose(noisy.gen_embeds[:, 1:], clean.gen_embeds[:, 1:])
    tiny_model.config.gen_input_noise = 0.0
    torch.testing.assert_close(tiny_model(**batch).loss, clean.loss)  # no noise: training mode changes nothing


def test_negative_gen_input_noise_is_refused():
    with pytest.raises(ValueError, match="gen_input_noise"):
        PiscesConfig(gen_input_noise=-0.1)


def test_lm_loss_ignores_minus_100(tiny_model):
    config = tiny_model.config
    batch = understanding_batch(config)
    out = tiny_model(**batch)
    logits, labels = out.logits[0, :-1], batch["labels"][0, 1:]
    keep = labels != -100
    torch.testing.assert_close(out.lm_loss, F.cross_entropy(logits[keep], labels[keep]))
    assert out.gen_loss is None and out.gen_embeds is None
    torch.testing.assert_close(out.loss, out.lm_loss)


def test_image_features_replace_the_placeholders(tiny_model):
    config = tiny_model.config
    batch = understanding_batch(config)
    features = tiny_model.get_image_features(batch["pixel_values"]).pooler_output
    assert features.shape == (1, config.num_image_tokens, config.text_config.hidden_size)
    with_image = tiny_model(**batch).logits
    with_other_image = tiny_model(**{**batch, "pixel_values": torch.randn_like(batch["pixel_values"])}).logits
    assert not torch.allclose(with_image, with_other_image)


def test_placeholder_mismatch_names_the_numbers(tiny_model):
    config = tiny_model.config
    batch = understanding_batch(config, num_images=1)
    n = config.num_image_tokens
    truncated = batch["input_ids"][:, 3:]
    with pytest.raises(ValueError, match=rf"{n - 3} <image> tokens .* 1 images give 1 x {n} = {n}"):
        tiny_model(input_ids=truncated, pixel_values=batch["pixel_values"])
    gen = generation_batch(config, num_images=1)
    with pytest.raises(ValueError, match=r"<gen> tokens .* 2 images"):
        tiny_model(input_ids=gen["input_ids"], gen_pixel_values=gen["gen_pixel_values"].repeat(2, 1, 1, 1))


def test_wrong_gen_image_size_is_explained(tiny_model):
    gen = generation_batch(tiny_model.config)
    with pytest.raises(ValueError, match="gen_pixel_values must be 32x32"):
        tiny_model(input_ids=gen["input_ids"], gen_pixel_values=torch.randn(1, 3, 48, 48))


def test_gradients_reach_projectors_and_heads_but_not_the_gen_encoder(tiny_model):
    tiny_model.train()
    config = tiny_model.config
    batch = generation_batch(config)
    und = understanding_batch(config)
    (tiny_model(**batch).loss + tiny_model(**und).loss).backward()
    for name in ["model.und_projector", "model.gen_projector", "gen_head", "lm_head"]:
        module = tiny_model.get_submodule(name)
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), name
    assert all(p.grad is None for p in tiny_model.model.gen_vision_tower.parameters())


# ---------------------------------------------------------------- text generation


def test_text_generate_uses_the_cache_and_matches_greedy_recompute(tiny_model):
    config = tiny_model.config
    batch = understanding_batch(config)
    prompt = batch["input_ids"][:, :-2]
    out = tiny_model.generate(
        input_ids=prompt, pixel_values=batch["pixel_values"], max_new_tokens=6, do_sample=False, min_new_tokens=6
    )
    # Greedy by hand, recomputing the whole sequence with no cache, with the same suppressed tokens.
    ids = prompt
    suppressed = tiny_model.generation_config.suppress_tokens
    for _ in range(6):
        logits = tiny_model(input_ids=ids, pixel_values=batch["pixel_values"], use_cache=False).logits[:, -1]
        logits[:, suppressed] = -float("inf")
        logits[:, config.text_config.eos_token_id] = -float("inf")
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)
    assert not (out[:, prompt.shape[1] :] == config.gen_token_id).any()


def test_processor_training_samples_run_through_the_model(tiny_model, tiny_processor):
    from PIL import Image

    red, blue = Image.new("RGB", (40, 40), (255, 0, 0)), Image.new("RGB", (40, 40), (0, 0, 255))
    texts = [tiny_processor.format_generation_sequence("a red square"), tiny_processor.format_generation_sequence("")]
    generation = tiny_processor(text=texts, gen_images=[red, blue], return_tensors="pt")
    out = tiny_model(**generation)
    assert out.gen_embeds.shape == (2, tiny_model.config.num_gen_tokens, tiny_model.config.gen_vision_config.hidden_size)
    assert out.gen_loss > 0
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    prompt = tiny_processor.apply_chat_template(messages, add_generation_prompt=True)
    understanding = tiny_processor(images=[red], text=[prompt], return_tensors="pt")
    logits = tiny_model(**understanding).logits
    assert logits.shape[:2] == understanding["input_ids"].shape


def test_gen_features_carry_gradients_only_from_an_unfrozen_encoder(tiny_model):
    pixels = torch.randn(2, 3, 32, 32)
    frozen = tiny_model.model.get_gen_image_features(pixels).pooler_output
    assert not frozen.requires_grad  # frozen from construction
    tower = tiny_model.model.gen_vision_tower.requires_grad_(True)  # as encoder pretraining does
    features = tiny_model.model.get_gen_image_features(pixels).pooler_output
    assert features.requires_grad
    features.square().mean().backward()
    assert tower.embeddings.patch_embedding.weight.grad is not None
    torch.testing.assert_close(features.detach(), frozen)
