"""PiscesPipeline's components: optional model and processor, the decoder's output checked against the VAE, dtypes
(`to`, `dtype=`, a float16 VAE that needs float32, layerwise casting) and the offloading hooks around the model's own
methods."""

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from pisces import PiscesPipeline


STEPS = 2


def draw(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    kwargs.setdefault("prompt", "a red circle")
    kwargs.setdefault("output_type", "np")
    return pipe(num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), **kwargs).images


def pixel_decoder(out_channels: int = 3) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=out_channels,
        out_channels=out_channels,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        attention_head_dim=8,
        norm_num_groups=8,
        cross_attention_dim=48,
    )


# ---- model and processor are optional ----


def test_a_pipeline_without_model_decodes_given_image_embeds(tiny_checkpoint, pipe):
    embeds = pipe.encode_prompt("a red circle")
    decoding = PiscesPipeline.from_pretrained(tiny_checkpoint, model=None, processor=None)
    assert decoding.model is None and decoding.processor is None
    assert np.array_equal(draw(decoding, prompt=None, image_embeds=embeds), draw(pipe))


def test_encode_prompt_in_isolation_then_decoding_gives_the_full_pipelines_image(pipe):
    # As diffusers' encode_prompt isolation test: one pipeline with only the text side, one without it.
    encoding = PiscesPipeline(model=pipe.model, processor=pipe.processor, decoder=None, scheduler=None)
    decoding = PiscesPipeline(model=None, processor=None, decoder=pipe.decoder, scheduler=pipe.scheduler, vae=pipe.vae)
    embeds = encoding.encode_prompt("a red circle")
    assert np.array_equal(draw(decoding, prompt=None, image_embeds=embeds), draw(pipe))


@pytest.mark.parametrize("source", ["prompt", "image"])
def test_a_prompt_or_an_image_without_the_model_is_a_clear_error(tiny_checkpoint, source):
    import PIL.Image

    decoding = PiscesPipeline.from_pretrained(tiny_checkpoint, model=None, processor=None)
    value = "a circle" if source == "prompt" else PIL.Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match=rf"`{source}` needs the pipeline's `model` and `processor`"):
        decoding(**{source: value}, num_inference_steps=STEPS)


def test_a_pipeline_without_decoder_encodes_but_does_not_draw(pipe):
    encoding = PiscesPipeline(model=pipe.model, processor=pipe.processor, decoder=None, scheduler=None)
    with pytest.raises(ValueError, match="no decoder or no scheduler"):
        encoding("a circle")


# ---- the decoder's output ----


def test_without_a_vae_the_decoder_must_output_pixels(pipe):
    with pytest.raises(ValueError, match=r"decoder outputs 4 channels, but there is no VAE"):
        PiscesPipeline(model=pipe.model, processor=pipe.processor, decoder=pipe.decoder, scheduler=pipe.scheduler)
    # Taking the VAE away afterwards is caught when drawing, not decoded into an "image" of latents.
    pipe.vae = None
    with pytest.raises(ValueError, match=r"decoder outputs 4 channels, but there is no VAE"):
        draw(pipe)


def test_the_decoder_must_output_the_vaes_latent_channels(pipe):
    with pytest.raises(ValueError, match=r"decoder outputs 3 channels, but the VAE decodes 4"):
        PiscesPipeline(
            model=pipe.model, processor=pipe.processor, decoder=pixel_decoder(), scheduler=pipe.scheduler, vae=pipe.vae
        )


def test_a_pixel_decoder_without_vae_draws(pipe):
    pixels = PiscesPipeline(model=pipe.model, processor=pipe.processor, decoder=pixel_decoder(), scheduler=pipe.scheduler)
    assert draw(pixels).shape == (1, 32, 32, 3)


# ---- dtypes ----


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pipe_to_dtype_gives_finite_close_images(pipe, dtype):
    expected = draw(pipe)
    pipe.to(dtype)
    assert {pipe.model.dtype, pipe.decoder.dtype, pipe.vae.dtype} == {dtype}
    images = draw(pipe)
    assert np.isfinite(images).all()
    assert np.abs(images - expected).max() < 0.05


def test_dtype_at_load_per_component(tiny_checkpoint, pipe):
    expected = draw(pipe)
    loaded = PiscesPipeline.from_pretrained(tiny_checkpoint, dtype={"model": torch.bfloat16, "default": torch.float32})
    assert loaded.model.dtype == torch.bfloat16 and loaded.decoder.dtype == torch.float32
    images = draw(loaded)
    assert np.isfinite(images).all() and np.abs(images - expected).max() < 0.05


def test_a_float16_vae_that_needs_upcasting_decodes_in_float32(pipe):
    expected = draw(pipe)
    assert pipe.vae.config.force_upcast
    pipe.vae.to(torch.float16)
    decoded_dtypes = []
    decode = pipe.vae.decode

    def recording_decode(latents, *args, **kwargs):
        decoded_dtypes.append((latents.dtype, pipe.vae.dtype))
        return decode(latents, *args, **kwargs)

    pipe.vae.decode = recording_decode
    images = draw(pipe)
    # As SDXL: decoded in float32, the VAE back in float16 afterwards.
    assert decoded_dtypes == [(torch.float32, torch.float32)]
    assert pipe.vae.dtype == torch.float16
    assert np.isfinite(images).all() and np.abs(images - expected).max() < 1e-3


def test_a_vae_with_latents_mean_and_std_gets_them_undone(pipe):
    latents = draw(pipe, output_type="latent")
    mean, std = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0]
    pipe.vae.register_to_config(latents_mean=mean, latents_std=std)
    images = draw(pipe, output_type="pt")
    unscaled = latents * torch.tensor(std).view(1, 4, 1, 1) / pipe.vae.config.scaling_factor
    expected = pipe.vae.decode(unscaled + torch.tensor(mean).view(1, 4, 1, 1)).sample
    torch.testing.assert_close(images, (expected / 2 + 0.5).clamp(0, 1))


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_layerwise_casting_on_the_decoder(pipe, compute_dtype):
    expected = draw(pipe)
    pipe.to(compute_dtype)
    pipe.decoder.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)
    assert pipe.decoder.dtype == compute_dtype
    images = draw(pipe)
    assert np.isfinite(images).all() and np.abs(images - expected).max() < 0.1


# ---- offloading hooks reach the model's own methods ----


def _count_calls(obj, name):
    calls = []
    method = getattr(obj, name)

    def counting(*args, **kwargs):
        calls.append(name)
        return method(*args, **kwargs)

    setattr(obj, name, counting)
    return calls


def test_model_cpu_offload_hook_runs_around_the_models_generation(pipe):
    # On an accelerator the hook is what moves the model there (benchmarks/gpu_check.py runs that); on the CPU it
    # checks that the LLM's generation loop, which never calls the model's forward, still triggers it.
    expected = draw(pipe)
    pipe.enable_model_cpu_offload(device="cpu")
    calls = _count_calls(pipe.model._hf_hook, "pre_forward")
    assert np.array_equal(draw(pipe), expected)
    assert calls == ["pre_forward"]


def test_block_level_group_offloading_onloads_and_offloads_the_model_around_its_methods(pipe):
    from diffusers.hooks import apply_group_offloading

    expected = draw(pipe)
    apply_group_offloading(
        pipe.model, onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1
    )
    hook = pipe.model._diffusers_hook.get_hook("group_offloading")
    onloads, offloads = _count_calls(hook, "pre_forward"), _count_calls(hook, "post_forward")
    assert np.array_equal(draw(pipe), expected)
    assert onloads == ["pre_forward"] and offloads == ["post_forward"]
