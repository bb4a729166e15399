import pytest
import torch


def left_padded(config, rows):
    """Left-pads token rows (each ending before <boi>) and appends <boi>."""
    rows = [list(row) + [config.boi_token_id] for row in rows]
    length = max(len(row) for row in rows)
    pad = config.text_config.pad_token_id
    ids = torch.tensor([[pad] * (length - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in rows])
    return ids, mask


PROMPTS = [[1, 40, 41, 42, 43, 44, 45], [1, 50, 51], [1, 60, 61, 62, 63]]


def test_shape_and_dtype(tiny_model):
    config = tiny_model.config
    ids, mask = left_padded(config, PROMPTS)
    embeds = tiny_model.generate_image_embeddings(ids, mask, guidance_scale=3.0)
    assert embeds.shape == (3, config.num_gen_tokens, config.gen_vision_config.hidden_size)
    assert embeds.dtype == tiny_model.dtype
    assert torch.isfinite(embeds).all()


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_cached_loop_equals_recomputing_the_sequence(tiny_model, guidance_scale):
    ids, mask = left_padded(tiny_model.config, PROMPTS)
    cached = tiny_model.generate_image_embeddings(ids, mask, guidance_scale=guidance_scale)
    recomputed = tiny_model.generate_image_embeddings(ids, mask, guidance_scale=guidance_scale, use_cache=False)
    assert (cached - recomputed).abs().max() <= 1e-4


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_batched_left_padded_prompts_equal_prompts_one_at_a_time(tiny_model, guidance_scale):
    config = tiny_model.config
    ids, mask = left_padded(config, PROMPTS)
    batched = tiny_model.generate_image_embeddings(ids, mask, guidance_scale=guidance_scale)
    for i, prompt in enumerate(PROMPTS):
        one_ids, one_mask = left_padded(config, [prompt])
        alone = tiny_model.generate_image_embeddings(one_ids, one_mask, guidance_scale=guidance_scale)
        assert (batched[i] - alone[0]).abs().max() <= 1e-4


def test_guidance_combines_conditional_and_unconditional_rows(tiny_model):
    config = tiny_model.config
    ids, mask = left_padded(config, PROMPTS[:1])
    negative_ids, negative_mask = left_padded(config, [[1, 70]])
    scale = 4.0
    guided = tiny_model.generate_image_embeddings(
        ids, mask, guidance_scale=scale, negative_input_ids=negative_ids, negative_attention_mask=negative_mask
    )
    conditional = tiny_model.generate_image_embeddings(ids, mask, guidance_scale=1.0)
    unconditional = tiny_model.generate_image_embeddings(negative_ids, negative_mask, guidance_scale=1.0)
    # The first vector comes before any feedback, so it is exactly u + s * (c - u).
    expected = unconditional[:, 0] + scale * (conditional[:, 0] - unconditional[:, 0])
    torch.testing.assert_close(guided[:, 0], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(guided, conditional)


def test_default_unconditional_prompt_is_the_configs(tiny_model):
    config = tiny_model.config
    assert config.unconditional_input_ids[-1] == config.boi_token_id
    ids, mask = left_padded(config, PROMPTS[:2])
    default = tiny_model.generate_image_embeddings(ids, mask, guidance_scale=2.0)
    negative = torch.tensor([config.unconditional_input_ids] * 2)
    explicit = tiny_model.generate_image_embeddings(ids, mask, guidance_scale=2.0, negative_input_ids=negative)
    torch.testing.assert_close(default, explicit)


def test_works_straight_from_the_processor(tiny_model, tiny_processor):
    prompts = ["a red circle", "two blue squares above a green triangle"]
    inputs = tiny_processor(text=prompts, generation_mode="image", return_tensors="pt")
    embeds = tiny_model.generate_image_embeddings(**inputs, guidance_scale=3.0)
    assert embeds.shape[:2] == (2, tiny_model.config.num_gen_tokens)
    # The processor's unconditional rows are the config's unconditional prompt.
    assert tiny_processor.unconditional_input_ids == tiny_model.config.unconditional_input_ids
    first_negative = inputs["negative_input_ids"][0][inputs["negative_attention_mask"][0].bool()]
    assert first_negative.tolist() == tiny_model.config.unconditional_input_ids


def test_bad_arguments_are_explained(tiny_model):
    config = tiny_model.config
    ids, mask = left_padded(config, PROMPTS[:2])
    with pytest.raises(ValueError, match="guidance_scale must be >= 1"):
        tiny_model.generate_image_embeddings(ids, mask, guidance_scale=0.5)
    with pytest.raises(ValueError, match="must end with the <boi> token"):
        tiny_model.generate_image_embeddings(ids[:, :-1], mask[:, :-1])
    right_padded_mask = mask.flip(-1)
    with pytest.raises(ValueError, match="right-padded"):
        tiny_model.generate_image_embeddings(ids, right_padded_mask)
    negative = torch.tensor([config.unconditional_input_ids] * 3)
    with pytest.raises(ValueError, match="3 negative prompts for 2 prompts"):
        tiny_model.generate_image_embeddings(ids, mask, guidance_scale=2.0, negative_input_ids=negative)
