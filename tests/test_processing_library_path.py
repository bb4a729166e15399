"""PiscesProcessor on ProcessorMixin's path: image forms, keyword routing, the replacement hook, assistant masks."""

import base64
import io
import logging

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoProcessor, BatchFeature, CLIPImageProcessorPil, SiglipImageProcessorPil
from transformers.testing_utils import CaptureLogger

from pisces.conversion.tokenizer import build_tokenizer
from pisces.processing import CHAT_TEMPLATE, PiscesProcessor
from pisces.processing.chat_template import CHATML_TEMPLATE


N_IMAGE = 5
N_GEN = 3
SIDE = 32


def make_processor(chat_template=None, cls=PiscesProcessor):
    tokenizer = build_tokenizer()
    if chat_template == CHATML_TEMPLATE:
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return cls(
        image_processor=SiglipImageProcessorPil(size={"height": SIDE, "width": SIDE}),
        gen_image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE}, image_mean=[0.1, 0.2, 0.3]
        ),
        tokenizer=tokenizer,
        num_image_tokens=N_IMAGE,
        num_gen_tokens=N_GEN,
        chat_template=chat_template,
    )


@pytest.fixture(scope="module")
def processor():
    return make_processor()


def noise(height=21, width=13, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def png_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def assert_same_features(first, second):
    assert isinstance(first, BatchFeature) and isinstance(second, BatchFeature)
    assert set(first) == set(second)
    for key in first:
        assert torch.equal(torch.as_tensor(first[key]), torch.as_tensor(second[key])), key


# ---------------------------------------------------------------------------------------------------------------------
# Every image form: the same pixel values as the RGB PIL image it stands for


def _on_white(rgba: np.ndarray) -> PIL.Image.Image:
    image = PIL.Image.fromarray(rgba, "RGBA")
    return PIL.Image.alpha_composite(PIL.Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")


FLOAT = np.random.default_rng(1).random((17, 23, 3)).astype(np.float32)
RGB, GRAY, RGBA = noise(), noise(channels=1)[..., 0], noise(channels=4)
PALETTE = PIL.Image.fromarray(RGB).convert("P")
PALETTE_CLEAR = PALETTE.copy()
PALETTE_CLEAR.info["transparency"] = 0
IMAGE_FORMS = {
    "pil-rgb": (PIL.Image.fromarray(RGB), PIL.Image.fromarray(RGB)),
    "pil-l": (PIL.Image.fromarray(GRAY), PIL.Image.fromarray(GRAY).convert("RGB")),
    "pil-la": (PIL.Image.fromarray(RGBA[..., 2:]).convert("LA"), None),
    "pil-rgba": (PIL.Image.fromarray(RGBA, "RGBA"), _on_white(RGBA)),
    "pil-p": (PALETTE, PALETTE.convert("RGB")),
    "pil-p-transparency": (PALETTE_CLEAR, None),
    "pil-1": (PIL.Image.fromarray(GRAY > 127), PIL.Image.fromarray(GRAY > 127).convert("RGB")),
    "pil-cmyk": (PIL.Image.fromarray(RGB).convert("CMYK"), PIL.Image.fromarray(RGB).convert("CMYK").convert("RGB")),
    "pil-i16": (PIL.Image.fromarray(GRAY.astype(np.uint16) * 4), PIL.Image.fromarray(GRAY).convert("RGB")),
    "pil-f": (PIL.Image.fromarray(GRAY.astype(np.float32)), PIL.Image.fromarray(GRAY).convert("RGB")),
    "np-hwc": (RGB, PIL.Image.fromarray(RGB)),
    "np-hw": (GRAY, PIL.Image.fromarray(GRAY).convert("RGB")),
    "np-hw1": (GRAY[..., None], PIL.Image.fromarray(GRAY).convert("RGB")),
    "np-chw": (np.moveaxis(RGB, -1, 0), PIL.Image.fromarray(RGB)),
    "np-rgba": (RGBA, _on_white(RGBA)),
    "np-float": (FLOAT, PIL.Image.fromarray(np.rint(FLOAT * 255).astype(np.uint8))),
    "np-bool": (GRAY > 127, PIL.Image.fromarray((GRAY > 127).astype(np.uint8) * 255).convert("RGB")),
    "torch-chw-uint8": (torch.from_numpy(np.moveaxis(RGB, -1, 0).copy()), PIL.Image.fromarray(RGB)),
    "torch-chw-float": (
        torch.from_numpy(np.moveaxis(FLOAT, -1, 0).copy()),
        PIL.Image.fromarray(np.rint(FLOAT * 255).astype(np.uint8)),
    ),
    "torch-hw": (torch.from_numpy(GRAY.copy()), PIL.Image.fromarray(GRAY).convert("RGB")),
    "torch-1hw": (torch.from_numpy(GRAY[None].copy()), PIL.Image.fromarray(GRAY).convert("RGB")),
    "base64": (base64.b64encode(png_bytes(PIL.Image.fromarray(RGB))).decode(), PIL.Image.fromarray(RGB)),
    "data-uri": (
        "data:image/png;base64," + base64.b64encode(png_bytes(PIL.Image.fromarray(RGB))).decode(),
        PIL.Image.fromarray(RGB),
    ),
}


@pytest.mark.parametrize("form", list(IMAGE_FORMS))
def test_every_image_form_gives_the_pixel_values_of_its_rgb_image(processor, form):
    image, expected = IMAGE_FORMS[form]
    out = processor(images=[image], text="<image> what? <gen>", gen_images=[image], return_tensors="pt")
    assert isinstance(out, BatchFeature)
    assert tuple(out["pixel_values"].shape) == (1, 3, SIDE, SIDE)
    assert tuple(out["gen_pixel_values"].shape) == (1, 3, SIDE, SIDE)
    if expected is not None:
        reference = processor(images=[expected], text="<image> what? <gen>", gen_images=[expected], return_tensors="pt")
        assert torch.equal(out["pixel_values"], reference["pixel_values"])
        assert torch.equal(out["gen_pixel_values"], reference["gen_pixel_values"])


def test_transparent_pixels_are_white_in_pil_numpy_and_torch(processor):
    clear = np.zeros((8, 8, 4), dtype=np.uint8)
    for image in (PIL.Image.fromarray(clear, "RGBA"), clear, torch.from_numpy(np.moveaxis(clear, -1, 0).copy())):
        out = processor(images=image, text="<image>", return_tensors="pt")
        assert torch.equal(out["pixel_values"], torch.ones_like(out["pixel_values"]))  # white in SigLIP's scale


def test_batches_paths_and_urls(processor, tmp_path, monkeypatch):
    from transformers import image_utils

    picture = PIL.Image.fromarray(noise(16, 16))
    path = tmp_path / "picture.png"
    picture.save(path)
    requested = []

    class Response:
        content = png_bytes(picture)

    def fake_get(url, **kwargs):
        requested.append(url)
        return Response()

    monkeypatch.setattr(image_utils.httpx, "get", fake_get)
    reference = processor(images=[picture] * 4, text="<image>" * 4, return_tensors="pt")["pixel_values"]
    url = "https://example.com/picture.png"
    for images in (
        [str(path), path, url, picture],
        np.stack([np.asarray(picture)] * 4),  # one (N, H, W, C) array is N images
        torch.from_numpy(np.stack([np.moveaxis(np.asarray(picture), -1, 0)] * 4)),
        [[str(path), url], [path, picture]],  # one list per text
    ):
        per_text = isinstance(images, list) and isinstance(images[0], list)
        text = ["<image><image>", "<image><image>"] if per_text else "<image>" * 4
        out = processor(images=images, text=text, return_tensors="pt")
        assert torch.equal(out["pixel_values"], reference), type(images)
    assert requested == [url, url]

    # Chat content items name images by `url`, `path` or `image`, as transformers' chat templates read them.
    messages = [
        {"role": "user", "content": [{"type": "image", "url": url}, {"type": "image", "path": str(path)},
                                     {"type": "image", "image": picture}, {"type": "text", "text": "Same?"}]}
    ]
    out = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt")
    assert torch.equal(out["pixel_values"], reference[:3])
    assert int((out["input_ids"] == processor.image_token_id).sum()) == 3 * N_IMAGE


def test_unreadable_string_names_it(processor):
    with pytest.raises(ValueError, match=r"image 0 \(str 'not an image'\) is not an existing image file, an http"):
        processor(images="not an image", text="<image>")


# ---------------------------------------------------------------------------------------------------------------------
# Keyword arguments, merged by ProcessorMixin._merge_kwargs


def test_flat_per_modality_and_common_kwargs_agree(processor):
    texts, image = ["<image> a", "a red circle above a blue square"], PIL.Image.fromarray(noise())
    flat = processor(images=image, text=texts, padding="max_length", max_length=24, size={"height": 16, "width": 16},
                     return_tensors="pt")
    nested = processor(
        images=image,
        text=texts,
        text_kwargs={"padding": "max_length", "max_length": 24},
        images_kwargs={"size": {"height": 16, "width": 16}},
        common_kwargs={"return_tensors": "pt"},
    )
    assert_same_features(flat, nested)
    assert tuple(flat["input_ids"].shape) == (2, 24) and tuple(flat["pixel_values"].shape) == (1, 3, 16, 16)
    assert processor(images=image, text="<image>", return_tensors="pt")["pixel_values"].shape[-1] == SIDE


def test_gen_images_kwargs_reach_the_generation_image_processor_only(processor):
    image = PIL.Image.fromarray(noise())
    text = "<image>" + processor.format_generation_sequence("a red square")
    out = processor(
        images=image,
        text=text,
        gen_images=image,
        gen_images_kwargs={"size": {"shortest_edge": 8}, "crop_size": {"height": 8, "width": 8}},
        return_tensors="pt",
    )
    assert tuple(out["gen_pixel_values"].shape) == (1, 3, 8, 8)
    assert tuple(out["pixel_values"].shape) == (1, 3, SIDE, SIDE)
    default = processor(text=text, images=image, gen_images=image, return_tensors="pt")
    assert default["gen_pixel_values"].shape[-1] == SIDE


def test_a_key_passed_twice_and_an_unknown_key(processor):
    with pytest.raises(ValueError, match="padding was passed two times"):
        processor(text="a", padding=True, text_kwargs={"padding": "max_length"})
    logger = logging.getLogger("transformers.processing_utils")
    with CaptureLogger(logger) as captured:
        out = processor(text="a", pisces_test_unknown_key=1)
    assert "pisces_test_unknown_key" in captured.out
    assert isinstance(out, BatchFeature)


def test_generation_mode_and_negative_prompt_are_processor_keys(processor):
    flat = processor(text=["a red circle"], generation_mode="image", negative_prompt="blurry", return_tensors="pt")
    assert set(flat) == {"input_ids", "attention_mask", "negative_input_ids", "negative_attention_mask"}
    assert int(flat["input_ids"][0, -1]) == processor.boi_token_id
    expected = processor.tokenizer(processor.format_generation_prompt("blurry"), add_special_tokens=False)["input_ids"]
    assert flat["negative_input_ids"][0].tolist() == expected
    # The text mode is the default; a processor's generation_mode attribute sets it, as for any processor key.
    assert processor.generation_mode == "text"
    assert "negative_input_ids" not in processor(text="a red circle")


# ---------------------------------------------------------------------------------------------------------------------
# The placeholder goes through the library's replacement hook


def test_image_placeholders_expand_through_replace_image_token():
    class Framed(PiscesProcessor):
        def replace_image_token(self, image_inputs, image_idx, **kwargs):
            return self.boi_token + self.image_token * self.num_image_tokens + self.eoi_token

    framed = make_processor(cls=Framed)
    out = framed(images=[PIL.Image.fromarray(noise())] * 2, text="a <image> b <image>", return_offsets_mapping=True)
    ids = out["input_ids"][0]
    start = ids.index(framed.boi_token_id)
    assert ids[start : start + N_IMAGE + 2] == [framed.boi_token_id] + [framed.image_token_id] * N_IMAGE + [
        framed.eoi_token_id
    ]
    assert ids.count(framed.boi_token_id) == 2
    # Offsets still refer to the text as passed: every token of an expansion points at its <image>.
    text = "a <image> b <image>"
    placeholders = {(text.index("<image>"), text.index("<image>") + 7), (text.rindex("<image>"), len(text))}
    framed_tokens = {framed.boi_token_id, framed.image_token_id, framed.eoi_token_id}
    assert {tuple(o) for t, o in zip(ids, out["offset_mapping"][0]) if t in framed_tokens} == placeholders


def test_gen_offsets_point_at_the_placeholder(processor):
    text = processor.format_generation_sequence("a cat")
    out = processor(text=text, gen_images=PIL.Image.fromarray(noise()), return_offsets_mapping=True)
    ids, offsets = out["input_ids"][0], out["offset_mapping"][0]
    start = text.index("<gen>")
    assert [tuple(o) for t, o in zip(ids, offsets) if t == processor.gen_token_id] == [(start, start + 5)] * N_GEN
    assert text[slice(*offsets[-1])] == "<eoi>"


def test_placeholders_typed_by_users_stay_text_with_sanitize_control_tokens(processor):
    import inspect

    if "sanitize_control_tokens" not in inspect.signature(processor.apply_chat_template).parameters:
        pytest.skip("this transformers version does not mark control tokens (added in 5.24)")
    typed = [{"type": "image", "image": PIL.Image.fromarray(noise())}, {"type": "text", "text": "is <image> a <gen>?"}]
    out = processor.apply_chat_template(
        [{"role": "user", "content": typed}],
        add_generation_prompt=True, tokenize=True, return_dict=True, sanitize_control_tokens=True,
    )
    ids = out["input_ids"][0]
    assert ids.count(processor.image_token_id) == N_IMAGE and ids.count(processor.gen_token_id) == 0
    assert "is <image> a <gen>?" in processor.decode(ids, skip_special_tokens=False)


# ---------------------------------------------------------------------------------------------------------------------
# Assistant masks from the chat template's {% generation %} blocks, with images expanded


@pytest.mark.parametrize(("template", "end_of_turn"), [(CHAT_TEMPLATE, "<|eot_id|>"), (CHATML_TEMPLATE, "<|im_end|>")])
def test_assistant_tokens_mask_with_expanded_images(template, end_of_turn):
    processor = make_processor(template)
    image = PIL.Image.fromarray(noise())
    conversations = [
        [
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
            {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "image", "image": image}]},
            {"role": "assistant", "content": "Two blue circles."},
        ],
        [
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": "Green."},
        ],
    ]
    out = processor.apply_chat_template(
        conversations, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    assert isinstance(out, BatchFeature) and tuple(out["pixel_values"].shape) == (3, 3, SIDE, SIDE)
    assert out["assistant_masks"].shape == out["input_ids"].shape
    answers = [["A red square.", "Two blue circles."], ["Green."]]
    for row, expected in enumerate(answers):
        ids, mask = out["input_ids"][row], out["assistant_masks"][row].bool()
        assert int((ids == processor.image_token_id).sum()) == N_IMAGE * len(expected)
        assert not (mask & (ids == processor.image_token_id)).any()
        assert processor.decode(ids[mask], skip_special_tokens=False) == end_of_turn.join(expected) + end_of_turn
        # Exactly the answers' tokens: each masked run decodes to one answer and its end of turn.
        runs, current = [], []
        for position in range(len(ids)):
            if mask[position]:
                current.append(int(ids[position]))
            elif current:
                runs.append(current)
                current = []
        runs += [current] if current else []
        assert [processor.decode(run, skip_special_tokens=False) for run in runs] == [a + end_of_turn for a in expected]

    # Truncation keeps what fits of the mask; padding is never the assistant's.
    short = processor.apply_chat_template(
        conversations[1], tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
        processor_kwargs={"padding": "max_length", "max_length": 64},
    )
    assert len(short["input_ids"][0]) == len(short["assistant_masks"][0]) == 64
    kept = [t for t, m in zip(short["input_ids"][0], short["assistant_masks"][0]) if m]
    assert processor.decode(kept, skip_special_tokens=False) == "Green." + end_of_turn


# ---------------------------------------------------------------------------------------------------------------------
# Saving and loading


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, CHATML_TEMPLATE])
def test_round_trip_and_auto_processor_give_identical_outputs(template, tmp_path):
    from pisces import PiscesConfig

    try:
        AutoProcessor.register(PiscesConfig, PiscesProcessor)
    except ValueError:
        pass  # already registered by `import pisces`
    processor = make_processor(template)
    processor.save_pretrained(tmp_path / "first")
    loaded = PiscesProcessor.from_pretrained(tmp_path / "first")
    auto = AutoProcessor.from_pretrained(tmp_path / "first")
    assert type(auto) is PiscesProcessor and auto.chat_template == template
    loaded.save_pretrained(tmp_path / "second")
    for name in ("processor_config.json", "chat_template.jinja"):
        assert (tmp_path / "first" / name).read_text() == (tmp_path / "second" / name).read_text(), name

    image = PIL.Image.fromarray(noise())
    calls = [
        dict(images=[image, noise(30, 40)], text=["<image> a", "b <image>" + processor.format_generation_sequence("c")],
             gen_images=[torch.rand(3, 20, 30)], return_tensors="pt", return_offsets_mapping=True),
        dict(text=["x", "a red circle"], generation_mode="image", return_tensors="pt"),
    ]
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "A square."},
    ]
    for other in (loaded, auto):
        for kwargs in calls:
            assert_same_features(processor(**kwargs), other(**kwargs))
        assert_same_features(
            *(
                p.apply_chat_template(conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                      return_tensors="pt")
                for p in (processor, other)
            )
        )
