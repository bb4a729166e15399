"""transformers' pipeline tasks on a Pisces checkpoint: `text-to-image` takes every PiscesPipeline generation argument,
and `image-text-to-text` keeps working beside it."""

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import pipeline

from pisces import PiscesPipeline


STEPS = 2


@pytest.fixture(scope="module")
def text_to_image(tiny_checkpoint):
    return pipeline("text-to-image", model=str(tiny_checkpoint))


@pytest.fixture
def pipe(tiny_checkpoint):
    pipe = PiscesPipeline.from_pretrained(tiny_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def test_several_images_per_prompt_come_back_as_a_list(text_to_image, pipe):
    results = text_to_image("a circle", num_inference_steps=STEPS, num_images_per_prompt=2, seed=0)
    assert isinstance(results, list) and len(results) == 2
    expected = pipe("a circle", num_inference_steps=STEPS, num_images_per_prompt=2, generator=seeded()).images
    for result, image in zip(results, expected):
        assert set(result) == {"image"} and np.array_equal(np.asarray(result["image"]), np.asarray(image))
    # A list of prompts: one list per prompt.
    batched = text_to_image(["a circle", "a square"], num_inference_steps=STEPS, num_images_per_prompt=2, seed=0)
    assert [len(per_prompt) for per_prompt in batched] == [2, 2]


@pytest.mark.parametrize(("output_type", "shape"), [("np", (32, 32, 3)), ("pt", (3, 32, 32)), ("latent", (4, 16, 16))])
def test_output_type_passes_through(text_to_image, pipe, output_type, shape):
    result = text_to_image("a circle", num_inference_steps=STEPS, output_type=output_type, seed=0)
    assert tuple(result["image"].shape) == shape
    expected = pipe("a circle", num_inference_steps=STEPS, output_type=output_type, generator=seeded()).images[0]
    assert np.array_equal(np.asarray(result["image"]), np.asarray(expected))


def test_every_generation_argument_passes_through(text_to_image, pipe):
    steps = []

    def callback(pipeline, step, timestep, tensors):
        steps.append(step)
        return {}

    arguments = {
        "negative_prompt": "a square",
        "guidance_scale": 2.0,
        "decoder_guidance_scale": 2.0,
        "height": 64,
        "width": 32,
        "num_inference_steps": 3,
        "latents": torch.randn(1, 4, 32, 16, generator=seeded(3)),
        "output_type": "np",
        "callback_on_step_end": callback,
        "callback_on_step_end_tensor_inputs": ["latents"],
    }
    result = text_to_image("a circle", generator=seeded(), **arguments)
    expected = pipe("a circle", generator=seeded(), **arguments).images[0]
    assert result["image"].shape == (64, 32, 3)
    np.testing.assert_array_equal(result["image"], expected)
    assert steps == [0, 1, 2] * 2


def test_unknown_arguments_are_a_one_line_error(text_to_image):
    with pytest.raises(TypeError) as error:
        text_to_image("a circle", num_inference_step=STEPS)
    message = str(error.value)
    assert "unknown argument(s) num_inference_step" in message and "num_inference_steps" in message
    assert "\n" not in message


def test_seed_and_generator_together_are_refused(text_to_image):
    with pytest.raises(ValueError, match="`seed` or `generator`, not both"):
        text_to_image("a circle", seed=0, generator=seeded())


def test_text_to_image_without_a_model_says_what_to_pass():
    with pytest.raises(ValueError, match=r'pipeline\("text-to-image"\) needs a Pisces checkpoint: pass model='):
        pipeline("text-to-image")


def test_image_text_to_text_keeps_working_beside_text_to_image(tiny_checkpoint, text_to_image):
    answer = pipeline("image-text-to-text", model=str(tiny_checkpoint))
    image = PIL.Image.new("RGB", (40, 40), (255, 0, 0))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What colour?"}]}]
    chat = answer(text=messages, max_new_tokens=4, do_sample=False)
    assert chat[0]["generated_text"][-1]["role"] == "assistant"
    plain = answer(images=image, text="<image> What colour?", max_new_tokens=4, do_sample=False)
    assert isinstance(plain[0]["generated_text"], str) and plain[0]["generated_text"].startswith("<image> What colour?")
