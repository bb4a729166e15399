"""PiscesPipeline: the decoder, __call__, determinism, input checks and the one-folder checkpoint."""

import json
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UNet2DConditionModel,
)

from pisces import PiscesPipeline, decoder_conditioning, decoder_input
from pisces.conversion.decoder_presets import build_decoder


STEPS = 2


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def run(pipe, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("output_type", "np")
    kwargs.setdefault("generator", seeded(0))
    return pipe(**kwargs).images


# ---- the decoder ----


def test_latent_decoder_makes_images_at_the_native_size(pipe):
    images = pipe("a red circle", num_inference_steps=STEPS, generator=seeded(0)).images
    assert len(images) == 1 and isinstance(images[0], PIL.Image.Image)
    # 16 x 16 latents, a VAE that upsamples 2x.
    assert images[0].size == (32, 32)
    assert pipe.vae_scale_factor == 2


@pytest.mark.parametrize(
    "scheduler_class", [DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler]
)
def test_any_diffusers_scheduler_drives_the_decoder(pipe, scheduler_class):
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    images = run(pipe, prompt="a square")
    assert images.shape == (1, 32, 32, 3)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


def test_pixel_space_decoder_without_vae(pipe):
    # A decoder over pixels whose own `encoder_hid_proj` maps the 48-wide vectors to its 32-wide cross-attention.
    decoder = UNet2DConditionModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        attention_head_dim=8,
        norm_num_groups=8,
        cross_attention_dim=32,
        encoder_hid_dim=48,
    )
    pixel_pipe = PiscesPipeline(model=pipe.model, processor=pipe.processor, decoder=decoder, scheduler=pipe.scheduler)
    pixel_pipe.set_progress_bar_config(disable=True)
    assert pixel_pipe.vae is None and pixel_pipe.vae_scale_factor == 1
    assert run(pixel_pipe, prompt="a square").shape == (1, 32, 32, 3)
    assert decoder_conditioning(decoder, torch.zeros(1, 16, 48)).keys() == {"encoder_hidden_states"}


def test_decoder_gets_the_vectors_and_their_mean(pipe):
    embeds = torch.randn(2, 16, 48)
    kwargs = decoder_conditioning(pipe.decoder, embeds)
    assert kwargs["encoder_hidden_states"] is embeds
    torch.testing.assert_close(kwargs["class_labels"], embeds.mean(dim=1))


def test_grid_conditioned_decoder_gets_each_vector_at_its_place(pipe):
    decoder = build_decoder("tiny", 48, in_channels=4, grid_conditioning=True)
    assert (decoder.config.in_channels, decoder.config.out_channels) == (52, 4)
    latents, embeds = torch.randn(2, 4, 16, 16), torch.randn(2, 16, 48)
    sample = decoder_input(decoder, latents, embeds)
    assert sample.shape == (2, 52, 16, 16)
    assert torch.equal(sample[:, :4], latents)
    # Vector k of the row-major 4 x 4 grid fills the k-th 4 x 4 block of the 16 x 16 latents.
    for k in (0, 5, 15):
        row, col = divmod(k, 4)
        block = sample[:, 4:, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4]
        assert torch.equal(block, embeds[:, k, :, None, None].expand(-1, -1, 4, 4))
    # A decoder without extra channels gets the latents alone.
    assert decoder_input(pipe.decoder, latents, embeds) is latents
    with pytest.raises(ValueError, match="square number of vectors"):
        decoder_input(decoder, latents, torch.randn(2, 15, 48))


def test_pipeline_samples_with_a_grid_conditioned_decoder(pipe):
    torch.manual_seed(0)
    grid_pipe = PiscesPipeline(
        model=pipe.model, processor=pipe.processor, vae=pipe.vae, scheduler=pipe.scheduler,
        decoder=build_decoder("tiny", 48, in_channels=4, grid_conditioning=True),
    )
    grid_pipe.set_progress_bar_config(disable=True)
    first = run(grid_pipe, prompt="a square", output_type="latent", decoder_guidance_scale=2.0)
    assert first.shape == (1, 4, 16, 16) and torch.isfinite(first).all()
    # The vectors reach the decoder through the grid: other vectors, another picture.
    embeds = pipe.encode_prompt("a square", None, 1.0, "cpu")
    other = run(grid_pipe, image_embeds=embeds + 1.0, output_type="latent", decoder_guidance_scale=2.0)
    assert not torch.allclose(first, other)


# ---- __call__ ----


@pytest.mark.parametrize(
    ("output_type", "expected"),
    [("np", (1, 32, 32, 3)), ("pt", (1, 3, 32, 32)), ("latent", (1, 4, 16, 16))],
)
def test_output_types(pipe, output_type, expected):
    images = run(pipe, prompt="a circle", output_type=output_type)
    assert tuple(images.shape) == expected


def test_return_dict_false_gives_a_tuple(pipe):
    output = pipe("a circle", num_inference_steps=STEPS, output_type="np", return_dict=False, generator=seeded(0))
    assert isinstance(output, tuple) and output[0].shape == (1, 32, 32, 3)


def test_progress_bar_shows_and_can_be_turned_off(pipe, capsys):
    pipe.set_progress_bar_config(disable=False)
    run(pipe, prompt="a circle")
    assert f"{STEPS}/{STEPS}" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    run(pipe, prompt="a circle")
    assert capsys.readouterr().err == ""


def test_model_cpu_offload_sequence_names_every_model(pipe):
    assert pipe.model_cpu_offload_seq.split("->") == ["model", "decoder", "vae"]


def test_callback_on_step_end_sees_and_replaces_latents(pipe):
    seen = []

    def callback(pipeline, step, timestep, tensors):
        seen.append((step, sorted(tensors)))
        if step == STEPS - 1:
            return {"latents": torch.zeros_like(tensors["latents"])}
        return {}

    latents = run(
        pipe,
        prompt="a circle",
        output_type="latent",
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "image_embeds"],
    )
    assert seen == [(i, ["image_embeds", "latents"]) for i in range(STEPS)]
    assert torch.equal(latents, torch.zeros_like(latents))


def test_image_variation_decodes_the_gen_encoders_vectors(pipe):
    image = PIL.Image.new("RGB", (40, 28), (200, 30, 30))
    from_image = run(pipe, image=image)
    embeds = pipe.encode_image(image)
    assert embeds.shape == (1, 16, 48)
    assert np.array_equal(from_image, run(pipe, image_embeds=embeds))


def test_image_embeds_skip_the_llm(pipe, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the LLM ran")

    monkeypatch.setattr(pipe.model, "generate_image_embeddings", fail)
    assert run(pipe, image_embeds=torch.randn(2, 16, 48)).shape == (2, 32, 32, 3)


def test_prompt_path_equals_decoding_the_llms_vectors(pipe):
    embeds = pipe.encode_prompt("a blue square", guidance_scale=3.0)
    assert np.array_equal(run(pipe, prompt="a blue square", guidance_scale=3.0), run(pipe, image_embeds=embeds))


def test_guidance_and_negative_prompt_reach_the_llm(pipe):
    plain = pipe.encode_prompt("a blue square", guidance_scale=1.0)
    guided = pipe.encode_prompt("a blue square", guidance_scale=3.0)
    negative = pipe.encode_prompt("a blue square", negative_prompt="a red circle", guidance_scale=3.0)
    assert not torch.allclose(plain, guided)
    assert not torch.allclose(guided, negative)


def test_decoder_guidance_changes_the_image(pipe):
    assert not np.allclose(run(pipe, prompt="a circle"), run(pipe, prompt="a circle", decoder_guidance_scale=4.0))


def test_num_images_per_prompt(pipe):
    images = run(pipe, prompt=["a circle", "a square"], num_images_per_prompt=2)
    assert images.shape == (4, 32, 32, 3)
    assert not np.allclose(images[0], images[1])  # same vectors, different noise


def test_height_and_width(pipe):
    assert run(pipe, prompt="a circle", height=64, width=48).shape == (1, 64, 48, 3)


# ---- determinism ----


def test_same_seed_gives_the_identical_image(pipe):
    assert np.array_equal(run(pipe, prompt="a circle"), run(pipe, prompt="a circle"))
    assert not np.array_equal(run(pipe, prompt="a circle"), run(pipe, prompt="a circle", generator=seeded(1)))


def test_a_batch_gives_the_images_of_its_prompts_alone(pipe):
    prompts = ["a red circle above a blue square", "a square"]
    batch = run(pipe, prompt=prompts, generator=[seeded(0), seeded(1)])
    alone = np.concatenate([run(pipe, prompt=prompts[0]), run(pipe, prompt=prompts[1], generator=seeded(1))])
    # Left padding changes float32 round-off in the LLM (vectors equal to 1e-4), not the result.
    assert np.abs(batch - alone).max() <= 1e-3


# ---- check_inputs ----


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": "a", "image": PIL.Image.new("RGB", (8, 8))}, "exactly one of `prompt`, `image` or `image_embeds`"),
        ({}, "got none of them"),
        ({"prompt": ["a", "b"], "negative_prompt": ["x"]}, "Got 1 negative prompts for 2 prompts"),
        ({"prompt": "a", "height": 30}, "`height` must be a positive multiple of 4"),
        ({"prompt": "a", "width": 0}, "`width` must be a positive multiple of 4"),
        ({"prompt": "a", "output_type": "jpeg"}, "Unknown output_type 'jpeg'"),
        ({"prompt": "a", "guidance_scale": 0.5}, "`guidance_scale` must be >= 1"),
        ({"prompt": "a", "decoder_guidance_scale": 0.0}, "`decoder_guidance_scale` must be >= 1"),
        ({"prompt": "a", "num_inference_steps": 0}, "`num_inference_steps` must be a positive integer"),
        ({"prompt": "a", "num_images_per_prompt": 0}, "`num_images_per_prompt` must be a positive integer"),
        ({"image_embeds": torch.zeros(1, 16, 7)}, r"shape \(batch_size, num_gen_tokens, 48\)"),
        ({"prompt": "a", "generator": [torch.Generator()] * 3}, "Got 3 generators for 1 images"),
        ({"prompt": "a", "latents": torch.zeros(1, 4, 8, 8)}, r"`latents` must have shape \(1, 4, 16, 16\)"),
        ({"prompt": "a", "callback_on_step_end_tensor_inputs": ["noise"]}, "unknown \\['noise'\\]"),
        ({"image_embeds": torch.zeros(1, 16, 48), "negative_prompt": "x"}, "only applies with `prompt`"),
    ],
)
def test_check_inputs_errors(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(**{"num_inference_steps": STEPS, **kwargs})


# ---- one folder, every entry point ----


def test_save_pretrained_writes_the_shared_layout_without_duplicates(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "ckpt")
    root = tmp_path / "ckpt"
    for name in ["config.json", "model.safetensors", "generation_config.json", "processor_config.json",
                 "tokenizer.json", "model_index.json", "decoder/config.json", "vae/config.json",
                 "scheduler/scheduler_config.json"]:
        assert (root / name).is_file(), name
    assert not (root / "model").exists() and not (root / "processor").exists()
    weights = sorted(str(p.relative_to(root)) for p in root.rglob("*.safetensors"))
    assert weights == [
        "decoder/diffusion_pytorch_model.safetensors",
        "model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    from safetensors import safe_open

    with safe_open(root / "model.safetensors", "pt") as handle:
        keys = list(handle.keys())
    # The root holds the LLM and its encoders only: no decoder or VAE weight is stored twice.
    assert set(keys) == set(pipe.model.state_dict())
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "PiscesPipeline"
    assert index["decoder"] == ["diffusers", "UNet2DConditionModel"]


def test_save_and_reload_give_the_identical_image(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "ckpt")
    reloaded = PiscesPipeline.from_pretrained(tmp_path / "ckpt")
    reloaded.set_progress_bar_config(disable=True)
    assert np.array_equal(run(pipe, prompt="a circle"), run(reloaded, prompt="a circle"))


def test_auto_pipeline_for_text2image_loads_it(tiny_checkpoint, pipe):
    from diffusers import AutoPipelineForText2Image

    auto = AutoPipelineForText2Image.from_pretrained(tiny_checkpoint)
    auto.set_progress_bar_config(disable=True)
    assert type(auto) is PiscesPipeline
    assert np.array_equal(run(auto, prompt="a circle"), run(pipe, prompt="a circle"))


def test_transformers_text_to_image_pipeline(tiny_checkpoint, pipe):
    from transformers import pipeline

    generator = pipeline("text-to-image", model=str(tiny_checkpoint))
    result = generator("a circle", num_inference_steps=STEPS, seed=0)
    assert set(result) == {"image"} and isinstance(result["image"], PIL.Image.Image)
    expected = pipe("a circle", num_inference_steps=STEPS, generator=seeded(0)).images[0]
    assert np.array_equal(np.asarray(result["image"]), np.asarray(expected))

    results = generator(["a circle", "a square"], num_inference_steps=STEPS, seed=0)
    assert isinstance(results, list) and len(results) == 2
    assert np.array_equal(np.asarray(results[0]["image"]), np.asarray(expected))

    sized = generator("a circle", num_inference_steps=STEPS, generator=seeded(1), height=64, width=64, guidance_scale=1.0)
    assert sized["image"].size == (64, 64)


def test_from_pretrained_takes_a_preloaded_model_and_a_dtype(tiny_checkpoint):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint)
    pipe = PiscesPipeline.from_pretrained(tiny_checkpoint, model=model)
    assert pipe.model is model

    half = PiscesPipeline.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16)
    assert half.model.dtype == torch.bfloat16 and half.decoder.dtype == torch.bfloat16
    half.set_progress_bar_config(disable=True)
    assert run(half, prompt="a circle").shape == (1, 32, 32, 3)


def test_from_pretrained_downloads_a_hub_repo_first(tiny_checkpoint, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append(repo_id)
        return str(tiny_checkpoint)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    pipe = PiscesPipeline.from_pretrained("someone/pisces-tiny")
    assert calls == ["someone/pisces-tiny"] and type(pipe) is PiscesPipeline


def _copy(tiny_checkpoint, tmp_path):
    return shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")


def test_missing_decoder_folder_is_named(tiny_checkpoint, tmp_path):
    ckpt = _copy(tiny_checkpoint, tmp_path)
    shutil.rmtree(ckpt / "decoder")
    with pytest.raises(OSError, match=r"no `decoder/` folder"):
        PiscesPipeline.from_pretrained(ckpt)


def test_corrupt_decoder_weights_are_named(tiny_checkpoint, tmp_path):
    ckpt = _copy(tiny_checkpoint, tmp_path)
    weights = ckpt / "decoder" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    expected = r"decoder weights .*decoder/diffusion_pytorch_model.safetensors .*incomplete or corrupt"
    with pytest.raises(OSError, match=expected):
        PiscesPipeline.from_pretrained(ckpt)


def test_corrupt_decoder_config_is_named(tiny_checkpoint, tmp_path):
    ckpt = _copy(tiny_checkpoint, tmp_path)
    (ckpt / "decoder" / "config.json").write_text("{ not json")
    with pytest.raises(OSError, match=r"decoder config .*decoder/config.json is corrupt"):
        PiscesPipeline.from_pretrained(ckpt)


def test_a_model_only_folder_is_not_a_pipeline(tiny_checkpoint, tmp_path):
    ckpt = _copy(tiny_checkpoint, tmp_path)
    (ckpt / "model_index.json").unlink()
    with pytest.raises(OSError, match="has no model_index.json"):
        PiscesPipeline.from_pretrained(ckpt)
