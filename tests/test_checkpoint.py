"""Loading and saving the way a transformers user expects: Auto classes, dtype, device_map, attention backends."""

import importlib
import json

import pytest
import torch
from accelerate import infer_auto_device_map
from conftest import generation_batch, understanding_batch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    pipeline,
)

import pisces
from pisces import PiscesForConditionalGeneration, PiscesModel, PiscesProcessor


def _outputs(model):
    config = model.config
    batch = generation_batch(config)
    und = understanding_batch(config)
    with torch.no_grad():
        gen = model(**batch)
        text = model(**und)
        ids = torch.tensor([config.unconditional_input_ids])
        embeds = model.generate_image_embeddings(ids, guidance_scale=1.0)
    return gen.logits, gen.gen_embeds, text.logits, embeds


def test_checkpoint_folder_holds_model_and_processor(tiny_checkpoint):
    files = {path.name for path in tiny_checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= files
    assert "processor_config.json" in files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["model_type"] == "pisces"


def test_save_and_load_round_trip_gives_identical_outputs(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    loaded = PiscesForConditionalGeneration.from_pretrained(tmp_path).eval()
    for before, after in zip(_outputs(tiny_model), _outputs(loaded)):
        assert torch.equal(before, after)
    for (name, a), (_, b) in zip(tiny_model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_auto_classes_load_the_checkpoint(tiny_checkpoint, tiny_model):
    assert isinstance(AutoConfig.from_pretrained(tiny_checkpoint), pisces.PiscesConfig)
    base = AutoModel.from_pretrained(tiny_checkpoint)
    assert isinstance(base, PiscesModel)
    full = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint).eval()
    assert isinstance(full, PiscesForConditionalGeneration)
    for expected, got in zip(_outputs(tiny_model), _outputs(full)):
        assert torch.equal(expected, got)
    # The base model carries the same backbone weights as the full model.
    torch.testing.assert_close(
        base.language_model.embed_tokens.weight, full.model.language_model.embed_tokens.weight
    )
    assert isinstance(AutoProcessor.from_pretrained(tiny_checkpoint), PiscesProcessor)


def test_importing_twice_or_reloading_raises_nothing(tiny_checkpoint):
    importlib.reload(pisces)
    importlib.import_module("pisces")
    assert isinstance(AutoModelForImageTextToText.from_pretrained(tiny_checkpoint), PiscesForConditionalGeneration)


def test_dtype_bfloat16(tiny_checkpoint, tiny_model):
    model = PiscesForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    logits, gen_embeds, text_logits, embeds = _outputs(model)
    assert embeds.dtype == torch.bfloat16 and gen_embeds.dtype == torch.bfloat16
    reference = _outputs(tiny_model)
    torch.testing.assert_close(embeds.float(), reference[3], atol=0.1, rtol=0.1)


@pytest.mark.parametrize("device_map", ["cpu", "auto"])
def test_device_map_loading(tiny_checkpoint, tiny_model, device_map):
    model = PiscesForConditionalGeneration.from_pretrained(tiny_checkpoint, device_map=device_map).eval()
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    for expected, got in zip(_outputs(tiny_model), _outputs(model)):
        torch.testing.assert_close(expected, got)


def test_disk_offload_gives_the_same_outputs(tiny_checkpoint, tiny_model, tmp_path):
    # Keep only the heads on the CPU and offload every encoder and decoder block to disk.
    device_map = {"model": "disk", "lm_head": "cpu", "gen_head": "cpu"}
    model = PiscesForConditionalGeneration.from_pretrained(
        tiny_checkpoint, device_map=device_map, offload_folder=str(tmp_path)
    ).eval()
    for expected, got in zip(_outputs(tiny_model), _outputs(model)):
        torch.testing.assert_close(expected, got)


def test_inferred_device_map_never_splits_a_no_split_block(tiny_model):
    no_split = tiny_model._no_split_modules
    assert {"LlamaDecoderLayer", "SiglipEncoderLayer", "CLIPEncoderLayer"} <= set(no_split)
    size = sum(p.numel() * p.element_size() for p in tiny_model.parameters())
    budget = size // 6  # forces the model across many devices
    device_map = infer_auto_device_map(
        tiny_model, max_memory={0: budget, 1: budget, 2: budget, "cpu": 10 * size}, no_split_module_classes=no_split
    )
    assert len(set(device_map.values())) >= 3
    whole_blocks = [name for name, module in tiny_model.named_modules() if type(module).__name__ in no_split]
    for block in whole_blocks:
        assert not any(key.startswith(block + ".") for key in device_map), f"{block} was split"


@pytest.mark.parametrize("other", ["eager"])
def test_attention_implementations_agree(tiny_checkpoint, other):
    sdpa = PiscesForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="sdpa").eval()
    alt = PiscesForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation=other).eval()
    assert sdpa.model.language_model.config._attn_implementation == "sdpa"
    assert alt.model.language_model.config._attn_implementation == other
    for a, b in zip(_outputs(sdpa), _outputs(alt)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_checkpoint):
    def grads(checkpointing):
        model = PiscesForConditionalGeneration.from_pretrained(tiny_checkpoint)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        config = model.config
        loss = model(**generation_batch(config)).loss + model(**understanding_batch(config)).loss
        loss.backward()
        return model, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    checkpointed_model, with_checkpointing = grads(True)
    assert checkpointed_model.model.language_model.gradient_checkpointing
    _, without = grads(False)
    assert with_checkpointing.keys() == without.keys()
    for name in without:
        torch.testing.assert_close(with_checkpointing[name], without[name], atol=1e-5, rtol=1e-4)


def test_image_text_to_text_pipeline_answers(tiny_checkpoint):
    pipe = pipeline("image-text-to-text", model=str(tiny_checkpoint))
    image = Image.new("RGB", (40, 40), (255, 0, 0))
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What colour?"}]}
    ]
    result = pipe(text=messages, max_new_tokens=4, do_sample=False)
    assert isinstance(result, list) and result[0]["generated_text"][-1]["role"] == "assistant"
    # A plain prompt with the placeholder works too.
    result = pipe(images=image, text="<image> What colour?", max_new_tokens=4, do_sample=False)
    assert isinstance(result[0]["generated_text"], str)
