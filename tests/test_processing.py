"""PiscesProcessor and build_tokenizer: placeholder expansion, both generation modes, errors, saving and loading."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoProcessor, CLIPImageProcessorPil, PreTrainedTokenizerFast, SiglipImageProcessorPil  # noqa: E402

from pisces.conversion.tokenizer import SPECIAL_TOKENS, build_tokenizer  # noqa: E402
from pisces.processing import CHAT_TEMPLATE, PiscesProcessor  # noqa: E402
from pisces.processing.processing_pisces import (  # noqa: E402
    BOI_TOKEN,
    EOI_TOKEN,
    GEN_TOKEN,
    IMAGE_TOKEN,
)


N_IMAGE = 5  # tiny placeholder counts, as a tiny model config would set them
N_GEN = 3
SIDE = 32
GEN_MEAN = [0.1, 0.2, 0.3]


def make_processor(num_image_tokens=N_IMAGE, num_gen_tokens=N_GEN, tokenizer=None):
    return PiscesProcessor(
        image_processor=SiglipImageProcessorPil(size={"height": SIDE, "width": SIDE}),
        gen_image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE}, image_mean=GEN_MEAN
        ),
        tokenizer=tokenizer if tokenizer is not None else build_tokenizer(),
        num_image_tokens=num_image_tokens,
        num_gen_tokens=num_gen_tokens,
    )


@pytest.fixture(scope="module")
def processor():
    return make_processor()


def red(width=40, height=50):
    return PIL.Image.new("RGB", (width, height), (255, 0, 0))


def count(ids, token_id):
    return int((torch.as_tensor(ids) == token_id).sum())


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_special_tokens_bos_and_padding():
    tokenizer = build_tokenizer()
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert len(tokenizer) <= 1024
    assert tokenizer.bos_token == "<|begin_of_text|>"
    assert tokenizer.eos_token == "<|end_of_text|>"
    assert tokenizer.pad_token == "<|finetune_right_pad_id|>"
    assert tokenizer.padding_side == "left"
    # Every special token is one id, the last ten ids of the vocabulary.
    ids = [tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS]
    assert sorted(ids) == list(range(len(tokenizer) - len(SPECIAL_TOKENS), len(tokenizer)))
    for token, token_id in zip(SPECIAL_TOKENS, ids):
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id]
    # Like Llama 3: bos first, nothing appended.
    encoded = tokenizer("a red circle above a blue square")["input_ids"]
    assert encoded[0] == tokenizer.bos_token_id and encoded.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(encoded, skip_special_tokens=True) == "a red circle above a blue square"
    assert "token_type_ids" not in tokenizer("a")
    batch = tokenizer(["a", "a red circle above a blue square"], padding=True)
    assert batch["input_ids"][0][0] == tokenizer.pad_token_id and batch["attention_mask"][0][0] == 0


def test_tokenizer_is_deterministic_and_takes_a_corpus(tmp_path):
    first, second = build_tokenizer(), build_tokenizer()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    first.save_pretrained(tmp_path / "a")
    second.save_pretrained(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()

    small = build_tokenizer(vocab_size=300, corpus=["one two three", "four five six"] * 3)
    assert len(small) <= 300
    assert small.encode("<image>", add_special_tokens=False) == [small.convert_tokens_to_ids("<image>")]
    assert small.backend_tokenizer.to_str() != first.backend_tokenizer.to_str()
    with pytest.raises(ValueError, match="267"):
        build_tokenizer(vocab_size=100)


# ---------------------------------------------------------------------------------------------------------------------
# Construction


def test_token_ids_and_attributes(processor):
    tokenizer = processor.tokenizer
    assert processor.image_token == IMAGE_TOKEN
    assert processor.image_token_id == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert processor.boi_token_id == tokenizer.convert_tokens_to_ids(BOI_TOKEN)
    assert processor.eoi_token_id == tokenizer.convert_tokens_to_ids(EOI_TOKEN)
    assert processor.gen_token_id == tokenizer.convert_tokens_to_ids(GEN_TOKEN)
    assert len({processor.image_token_id, processor.boi_token_id, processor.eoi_token_id, processor.gen_token_id}) == 4
    assert processor.chat_template == CHAT_TEMPLATE
    assert "pixel_values" in processor.model_input_names
    assert "gen_pixel_values" in processor.model_input_names
    assert processor.model_input_names.count("pixel_values") == 1


def test_tokenizer_without_pisces_tokens_is_rejected():
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1, "<image>": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    with pytest.raises(ValueError, match="<boi>, <eoi>, <gen>") as error:
        make_processor(tokenizer=plain)
    assert "add" in str(error.value).lower()


@pytest.mark.parametrize("value", [0, -3, 2.5])
def test_bad_token_counts_are_rejected(value):
    with pytest.raises(ValueError, match="num_image_tokens"):
        make_processor(num_image_tokens=value)


# ---------------------------------------------------------------------------------------------------------------------
# Text mode


@pytest.mark.parametrize("num_image_tokens", [N_IMAGE, 16, 729])
def test_each_image_placeholder_expands_to_num_image_tokens(num_image_tokens):
    processor = make_processor(num_image_tokens=num_image_tokens)
    out = processor(
        images=[red(), red(), red()],
        text=["<image> what is it?", "compare <image> and <image>"],
        return_tensors="pt",
    )
    assert set(out) == {"input_ids", "attention_mask", "pixel_values"}
    assert count(out["input_ids"][0], processor.image_token_id) == num_image_tokens
    assert count(out["input_ids"][1], processor.image_token_id) == 2 * num_image_tokens
    assert tuple(out["pixel_values"].shape) == (3, 3, SIDE, SIDE)
    assert out["pixel_values"].dtype == torch.float32
    # Left padding, one bos per row.
    assert out["attention_mask"][0, 0] == 0 and out["attention_mask"][:, -1].all()
    bos = processor.tokenizer.bos_token_id
    assert [count(row, bos) for row in out["input_ids"]] == [1, 1]


def test_text_alone_and_nested_images(processor):
    out = processor(text=["just text", "more text here"], return_tensors="pt")
    assert set(out) == {"input_ids", "attention_mask"}
    assert count(out["input_ids"], processor.image_token_id) == 0

    out = processor(
        images=[[red()], [], [red(), red()]],
        text=["<image> one", "none", "<image> two <image>"],
        return_tensors="pt",
    )
    assert [count(row, processor.image_token_id) for row in out["input_ids"]] == [N_IMAGE, 0, 2 * N_IMAGE]
    assert out["pixel_values"].shape[0] == 3

    single = processor(images=red(), text="<image> describe", return_tensors="np")
    assert single["pixel_values"].shape == (1, 3, SIDE, SIDE)


def test_gen_images_give_gen_pixel_values(processor):
    text = processor.format_generation_sequence("a red square")
    assert text.endswith(GEN_TOKEN + EOI_TOKEN)
    out = processor(text=[text, text], gen_images=[red(), red(20, 30)], return_tensors="pt")
    assert set(out) == {"input_ids", "attention_mask", "gen_pixel_values"}
    assert tuple(out["gen_pixel_values"].shape) == (2, 3, SIDE, SIDE)
    for row in out["input_ids"]:
        ids = row.tolist()
        start = ids.index(processor.boi_token_id)
        assert ids[start + 1 : start + 1 + N_GEN] == [processor.gen_token_id] * N_GEN
        assert ids[start + 1 + N_GEN :] == [processor.eoi_token_id]
    # Each image processor uses its own normalisation: pure red is 1 for SigLIP (mean 0.5, std 0.5), not for CLIP.
    both = processor(images=[red()], text=["<image>" + text], gen_images=[red()], return_tensors="pt")
    assert torch.allclose(both["pixel_values"][0, 0], torch.ones(SIDE, SIDE))
    clip_red = (1.0 - GEN_MEAN[0]) / processor.gen_image_processor.image_std[0]
    assert torch.allclose(both["gen_pixel_values"][0, 0], torch.full((SIDE, SIDE), clip_red), atol=1e-5)


def test_chat_formatted_text_gets_no_second_bos(processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    out = processor(images=red(), text=prompt)
    assert out["input_ids"][0].count(processor.tokenizer.bos_token_id) == 1
    assert out["input_ids"][0][0] == processor.tokenizer.bos_token_id


@pytest.mark.parametrize(
    "image",
    [
        PIL.Image.new("L", (37, 91), 128),
        PIL.Image.new("RGBA", (64, 48), (0, 255, 0, 128)),
        PIL.Image.new("P", (20, 10)),
        PIL.Image.new("1", (33, 17)),
        PIL.Image.new("I;16", (25, 25), 300),
        PIL.Image.new("RGB", (37, 91)),
        np.zeros((37, 91, 3), dtype=np.uint8),
        np.zeros((37, 91), dtype=np.uint8),
        np.ones((40, 30, 4), dtype=np.float32),
        torch.rand(3, 37, 91),
        torch.randint(0, 255, (1, 21, 13), dtype=torch.uint8),
    ],
    ids=["L", "RGBA", "P", "1", "I16", "odd", "np-hwc", "np-hw", "np-float-rgba", "torch-chw", "torch-gray"],
)
def test_any_mode_and_size_becomes_rgb_at_the_processor_size(processor, image):
    out = processor(images=[image], text="<image> what?", return_tensors="pt")
    assert tuple(out["pixel_values"].shape) == (1, 3, SIDE, SIDE)
    assert torch.isfinite(out["pixel_values"]).all()


def test_transparency_is_composited_on_white_and_paths_load(processor, tmp_path):
    clear = PIL.Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    out = processor(images=[clear], text="<image>", return_tensors="pt")
    assert torch.allclose(out["pixel_values"], torch.ones_like(out["pixel_values"]))  # white

    path = tmp_path / "red.png"
    red(16, 16).save(path)
    from_path = processor(images=[str(path), path], text="<image><image>", return_tensors="pt")
    from_pil = processor(images=[red(16, 16), red(16, 16)], text="<image><image>", return_tensors="pt")
    assert torch.equal(from_path["pixel_values"], from_pil["pixel_values"])


# ---------------------------------------------------------------------------------------------------------------------
# Errors


def test_image_count_mismatch_names_the_numbers(processor):
    with pytest.raises(ValueError, match=r"2 <image> placeholder\(s\) in total.*3 images"):
        processor(images=[red(), red(), red()], text=["<image>", "<image>"])
    with pytest.raises(ValueError, match=r"1 <image> placeholder\(s\) in total.*no images"):
        processor(text="<image> where is the image?")
    with pytest.raises(ValueError, match=r"0 <image> placeholder\(s\) in total.*1 images"):
        processor(images=red(), text="no placeholder")
    # Per sample when nested: totals agree (2 and 2) but text 1 has 1 placeholder and 0 images.
    with pytest.raises(ValueError, match=r"Text 0 has 1 <image> placeholder\(s\) but 2 images"):
        processor(images=[[red(), red()], []], text=["<image>", "<image>"])
    with pytest.raises(ValueError, match=r"3 lists of images.*2 texts"):
        processor(images=[[red()], [red()], [red()]], text=["<image>", "<image>"])
    with pytest.raises(ValueError, match=r"1 <gen> placeholder\(s\) in total.*2 gen_images"):
        processor(text="<gen>", gen_images=[red(), red()])


def test_truncation_that_cuts_placeholders_raises(processor):
    # Two images need 2 x 5 = 10 placeholder tokens; max_length 8 cannot hold them.
    with pytest.raises(ValueError, match=r"needs 10 placeholder tokens.*max_length is 8"):
        processor(images=[red(), red()], text="<image><image>", truncation=True, max_length=8)
    # Room for the placeholders but not for the text before them: right truncation would cut them.
    long_text = "a red circle above a blue square " * 10 + "<image>"
    with pytest.raises(ValueError, match=r"0 <image> tokens after tokenization, expected 1 x 5 = 5.*max_length=12"):
        processor(images=[red()], text=long_text, truncation=True, max_length=12)
    # Truncation that keeps every placeholder is fine.
    out = processor(images=[red()], text="<image>" + long_text[:-7], truncation=True, max_length=12)
    assert len(out["input_ids"][0]) == 12 and out["input_ids"][0].count(processor.image_token_id) == N_IMAGE


def test_empty_batches_raise(processor):
    with pytest.raises(ValueError, match="[Ee]mpty batch"):
        processor(text=[])
    with pytest.raises(ValueError, match="[Ee]mpty batch"):
        processor()
    with pytest.raises(ValueError, match="[Ee]mpty batch"):
        processor(images=[])
    with pytest.raises(ValueError, match="text"):
        processor(text=[], generation_mode="image")


@pytest.mark.parametrize(
    ("bad", "pattern"),
    [
        ("does/not/exist.png", r"image 1 \(str 'does/not/exist.png'\) is not an existing image file"),
        (7, r"image 1 \(int\) is not an image"),
        (np.zeros(5, dtype=np.uint8), r"image 1 \(numpy.ndarray of shape \(5,\) and dtype uint8\) is not an image"),
        (torch.zeros(2, 3, 4, 5, 6), r"image 1 \(torch.Tensor of shape \(2, 3, 4, 5, 6\).*\) is not an image"),
        (np.zeros((5, 6, 7), dtype=np.uint8), r"image 1 \(numpy.ndarray of shape \(5, 6, 7\).*channels"),
        (None, r"image 1 \(NoneType\) is not an image"),
    ],
)
def test_a_non_image_names_its_index_and_type(processor, bad, pattern):
    with pytest.raises(ValueError, match=pattern):
        processor(images=[red(), bad], text="<image><image>")


def test_bad_text_and_mode(processor):
    with pytest.raises(ValueError, match=r"text 1 \(int\) is not a str"):
        processor(text=["fine", 3])
    with pytest.raises(ValueError, match=r"'text', 'image'") as error:
        processor(text="hi", generation_mode="video")
    assert "video" in str(error.value)
    with pytest.raises(ValueError, match="negative_prompt"):
        processor(text="hi", negative_prompt="blurry")


# ---------------------------------------------------------------------------------------------------------------------
# Image mode


def test_generation_prompt_format(processor):
    assert processor.format_generation_prompt("a red circle") == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\na red circle<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n<boi>"
    )
    assert processor.unconditional_prompt == processor.format_generation_prompt("")
    ids = processor.unconditional_input_ids
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert ids[0] == processor.tokenizer.bos_token_id and ids[-1] == processor.boi_token_id
    assert ids.count(processor.tokenizer.bos_token_id) == 1
    assert processor.tokenizer.decode(ids) == processor.unconditional_prompt


def test_image_mode_returns_left_padded_prompts_and_unconditional_rows(processor):
    prompts = ["a red circle", "a small blue square above a big green star on the left"]
    out = processor(text=prompts, generation_mode="image", return_tensors="pt")
    assert set(out) == {"input_ids", "attention_mask", "negative_input_ids", "negative_attention_mask"}
    pad, boi = processor.tokenizer.pad_token_id, processor.boi_token_id
    for ids_key, mask_key in (("input_ids", "attention_mask"), ("negative_input_ids", "negative_attention_mask")):
        ids, mask = out[ids_key], out[mask_key]
        assert ids.shape == mask.shape and ids.shape[0] == 2
        assert (ids[:, -1] == boi).all() and mask[:, -1].all()  # left-padded: the last token of every row is <boi>
        assert (ids[mask == 0] == pad).all()
    assert out["attention_mask"][0, 0] == 0  # the shorter prompt is padded on the left
    assert out["input_ids"][0][out["attention_mask"][0].bool()].tolist() == processor.tokenizer(
        processor.format_generation_prompt(prompts[0]), add_special_tokens=False
    )["input_ids"]
    for row in out["negative_input_ids"]:
        assert row.tolist() == processor.unconditional_input_ids


def test_image_mode_negative_prompts(processor):
    prompts = ["a red circle", "a blue square"]
    one = processor(text=prompts, negative_prompt="blurry", generation_mode="image", return_tensors="pt")
    expected = processor.tokenizer(processor.format_generation_prompt("blurry"), add_special_tokens=False)
    assert one["negative_input_ids"].tolist() == [expected["input_ids"]] * 2
    each = processor(text=prompts, negative_prompt=["blurry", "dark"], generation_mode="image")
    assert each["negative_input_ids"][0] != each["negative_input_ids"][1]
    with pytest.raises(ValueError, match=r"3 negative prompts for 2 prompts"):
        processor(text=prompts, negative_prompt=["a", "b", "c"], generation_mode="image")
    with pytest.raises(ValueError, match="plain text"):
        processor(text="<image> like this", generation_mode="image")
    with pytest.raises(ValueError, match="images"):
        processor(text="a cat", images=red(), generation_mode="image")
    single = processor(text="a cat", generation_mode="image", return_tensors="pt")
    assert single["input_ids"].shape[0] == 1 and single["negative_input_ids"].shape[0] == 1


# ---------------------------------------------------------------------------------------------------------------------
# Chat template, decoding


def test_apply_chat_template(processor):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is this?"}]},
        {"role": "assistant", "content": "A circle."},
        {"role": "user", "content": "And its colour?"},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>What shape is this?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA circle.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd its colour?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert not processor.apply_chat_template(messages).endswith("assistant<|end_header_id|>\n\n")

    with_image = [{"role": "user", "content": [{"type": "image", "image": red()}, {"type": "text", "text": "Hi"}]}]
    out = processor.apply_chat_template(
        with_image, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert tuple(out["pixel_values"].shape) == (1, 3, SIDE, SIDE)
    assert count(out["input_ids"], processor.image_token_id) == N_IMAGE
    assert count(out["input_ids"], processor.tokenizer.bos_token_id) == 1
    ids = processor.apply_chat_template(with_image, add_generation_prompt=True, tokenize=True)
    assert list(ids[0]) == out["input_ids"][0].tolist()


def test_assistant_tokens_mask(processor):
    messages = [
        {"role": "user", "content": [{"type": "image", "image": red()}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "A red square."},
    ]
    out = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    kept = out["input_ids"][0][out["assistant_masks"][0].bool()]
    assert processor.decode(kept, skip_special_tokens=False) == "A red square.<|eot_id|>"


def test_per_modality_kwargs(processor):
    out = processor(
        images=red(),
        text=["<image> a", "a red circle above a blue square"],
        text_kwargs={"padding": "max_length", "max_length": 20},
        images_kwargs={"size": {"height": 16, "width": 16}},
        return_tensors="pt",
    )
    assert tuple(out["input_ids"].shape) == (2, 20)
    assert tuple(out["pixel_values"].shape) == (1, 3, 16, 16)
    flat = processor(images=red(), text="<image>", size={"height": 8, "width": 8}, return_tensors="pt")
    assert tuple(flat["pixel_values"].shape) == (1, 3, 8, 8)
    # The processor's own settings are untouched.
    assert processor(images=red(), text="<image>", return_tensors="pt")["pixel_values"].shape[-1] == SIDE


def test_offsets_refer_to_the_callers_text(processor):
    text = "<|begin_of_text|>look <image> at it"
    out = processor(images=red(), text=text, return_offsets_mapping=True)
    ids, offsets = out["input_ids"][0], out["offset_mapping"][0]
    start = text.index("<image>")
    for token_id, (begin, end) in zip(ids, offsets):
        if token_id == processor.image_token_id:
            assert (begin, end) == (start, start + len("<image>"))
    last = [text[begin:end] for token_id, (begin, end) in zip(ids, offsets) if begin != end][-1]
    assert last.strip() == "it"
    types = processor(images=red(), text=text, return_mm_token_type_ids=True)["mm_token_type_ids"][0]
    assert sum(types) == N_IMAGE


def test_decoding_drops_special_tokens_by_default(processor):
    out = processor(images=red(), text=["<image> a red circle", "a blue square"])
    decoded = processor.batch_decode(out["input_ids"])
    assert decoded == [" a red circle", "a blue square"]
    assert processor.decode(out["input_ids"][1]) == "a blue square"
    raw = processor.decode(out["input_ids"][1], skip_special_tokens=False)
    assert raw.startswith("<|finetune_right_pad_id|>") and "<|begin_of_text|>a blue square" in raw
    assert IMAGE_TOKEN * N_IMAGE in processor.batch_decode(out["input_ids"], skip_special_tokens=False)[0]


# ---------------------------------------------------------------------------------------------------------------------
# Saving and loading


def test_save_and_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "processor_config.json").is_file() and (tmp_path / "chat_template.jinja").is_file()
    loaded = PiscesProcessor.from_pretrained(tmp_path)

    assert type(loaded.image_processor) is SiglipImageProcessorPil
    assert type(loaded.gen_image_processor) is CLIPImageProcessorPil
    assert loaded.image_processor.size == {"height": SIDE, "width": SIDE}
    assert list(loaded.image_processor.image_mean) == [0.5, 0.5, 0.5]
    assert loaded.gen_image_processor.crop_size == {"height": SIDE, "width": SIDE}
    assert list(loaded.gen_image_processor.image_mean) == GEN_MEAN
    assert loaded.chat_template == processor.chat_template
    assert (loaded.num_image_tokens, loaded.num_gen_tokens) == (N_IMAGE, N_GEN)
    assert loaded.unconditional_input_ids == processor.unconditional_input_ids

    kwargs = {
        "images": [red(), PIL.Image.new("L", (37, 91), 40)],
        "text": ["<image> a", "b <image>" + processor.format_generation_sequence("c")],
        "gen_images": [red(30, 20)],
        "return_tensors": "pt",
    }
    before, after = processor(**kwargs), loaded(**kwargs)
    assert set(before) == set(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    before = processor(text=["x", "a red circle"], generation_mode="image", return_tensors="pt")
    after = loaded(text=["x", "a red circle"], generation_mode="image", return_tensors="pt")
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_auto_processor_loads_it(processor, tmp_path):
    from pisces import PiscesConfig

    try:
        AutoProcessor.register(PiscesConfig, PiscesProcessor)
    except ValueError:
        pass  # already registered by `import pisces`
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is PiscesProcessor
    assert loaded.num_image_tokens == N_IMAGE
    assert type(loaded.gen_image_processor) is CLIPImageProcessorPil


def test_default_shape_round_trips(tmp_path):
    processor = make_processor(num_image_tokens=729, num_gen_tokens=64)
    processor.save_pretrained(tmp_path)
    loaded = PiscesProcessor.from_pretrained(tmp_path)
    assert (loaded.num_image_tokens, loaded.num_gen_tokens) == (729, 64)
    out = loaded(text=loaded.format_generation_sequence("a cat"), gen_images=red())
    assert out["input_ids"][0].count(loaded.gen_token_id) == 64


def test_loading_takes_the_image_processor_backend(processor, tmp_path):
    """Both image processors load on the backend `backend` names (AutoImageProcessor's argument), "pil" by default."""
    processor.save_pretrained(tmp_path)
    loaded = PiscesProcessor.from_pretrained(tmp_path)
    assert loaded.image_processor.backend == loaded.gen_image_processor.backend == "pil"
    assert loaded.tokenizer.backend == "tokenizers"  # the tokenizer's own backend is not touched

    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    # "torchvision" where it is installed; transformers falls back to PIL (with a warning) where it is not.
    fast = PiscesProcessor.from_pretrained(tmp_path, backend="torchvision")
    expected = type(AutoImageProcessor.from_pretrained(tmp_path, backend="torchvision"))
    assert type(fast.image_processor) is expected
    assert fast.gen_image_processor.backend == fast.image_processor.backend
    assert fast.gen_image_processor.crop_size == {"height": SIDE, "width": SIDE}
    assert type(PiscesProcessor.from_pretrained(tmp_path, use_fast=False).gen_image_processor) is CLIPImageProcessorPil
