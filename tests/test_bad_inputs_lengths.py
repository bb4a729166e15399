"""Prompts and training rows longer than the language model's positions are refused or skipped, never run past them."""

import shutil

import PIL.Image
import pytest
import torch

from pisces import PiscesPipeline, PiscesProcessor, SequenceTooLongError
from pisces.training.data import SKIPPED_ROWS_KEY, PiscesCollator, PiscesTrainingDataset


LONG_PROMPT = " ".join(["word"] * 5000)


@pytest.fixture(scope="module")
def positions(tiny_checkpoint):
    import json

    return json.loads((tiny_checkpoint / "config.json").read_text())["text_config"]["max_position_embeddings"]


def _image():
    return PIL.Image.new("RGB", (32, 32), (200, 30, 30))


def test_the_processor_knows_the_models_positions(tiny_processor, positions, tmp_path):
    assert tiny_processor.max_sequence_length == positions
    tiny_processor.save_pretrained(tmp_path)
    # Saved with the processor, it no longer needs the model's config.json.
    assert PiscesProcessor.from_pretrained(tmp_path).max_sequence_length == positions


def test_a_checkpoint_saved_without_it_reads_the_model_config(tiny_checkpoint, tmp_path, positions):
    import json

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    settings = json.loads((folder / "processor_config.json").read_text())
    settings.pop("max_sequence_length", None)
    (folder / "processor_config.json").write_text(json.dumps(settings))
    assert PiscesProcessor.from_pretrained(folder).max_sequence_length == positions
    (folder / "config.json").unlink()
    assert PiscesProcessor.from_pretrained(folder).max_sequence_length is None


def test_a_text_to_image_prompt_too_long_is_refused(tiny_processor, positions):
    with pytest.raises(SequenceTooLongError, match=f"Prompt 0 is .* tokens .*16 image tokens.*{positions} positions"):
        tiny_processor(text=LONG_PROMPT, generation_mode="image")
    with pytest.raises(SequenceTooLongError, match="Negative prompt 0"):
        tiny_processor(text="a red circle", negative_prompt=LONG_PROMPT, generation_mode="image")


def test_a_prompt_that_just_fits_is_kept_whole(tiny_processor, positions):
    processor = tiny_processor
    room = positions - processor.num_gen_tokens
    base = len(processor(text="", generation_mode="image")["input_ids"][0])
    words = "a" * (room - base)  # the tiny tokenizer gives one token per character here
    fitting = processor(text=words, generation_mode="image")["input_ids"][0]
    if len(fitting) != room:
        pytest.skip("the tokenizer does not give one token per character")
    assert fitting[-1] == processor.boi_token_id
    with pytest.raises(SequenceTooLongError, match="by at least 1 tokens"):
        processor(text=words + "a", generation_mode="image")


def test_a_describe_prompt_too_long_is_refused_and_its_placeholders_named(tiny_processor, positions):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": LONG_PROMPT}]}]
    text = tiny_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = f"of which {tiny_processor.num_image_tokens} are image placeholders.*{positions} positions"
    with pytest.raises(SequenceTooLongError, match=expected):
        tiny_processor(images=[_image()], text=text)
    short = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = tiny_processor.apply_chat_template(short, add_generation_prompt=True, tokenize=False)
    ids = tiny_processor(images=[_image()], text=text)["input_ids"][0]
    assert ids.count(tiny_processor.image_token_id) == tiny_processor.num_image_tokens


def test_generate_image_embeddings_refuses_a_prompt_past_the_positions(tiny_model):
    config = tiny_model.config
    positions, m = config.text_config.max_position_embeddings, config.num_gen_tokens
    fitting = torch.tensor([[5] * (positions - m - 1) + [config.boi_token_id]])
    assert tiny_model.generate_image_embeddings(fitting, guidance_scale=1.0).shape[1] == m
    too_long = torch.tensor([[5] * (positions - m) + [config.boi_token_id]])
    with pytest.raises(ValueError, match=f"needs {positions + 1} positions, more than the language model's {positions}"):
        tiny_model.generate_image_embeddings(too_long, guidance_scale=1.0)
    with pytest.raises(ValueError, match="negative_input_ids has a prompt"):
        tiny_model.generate_image_embeddings(fitting, guidance_scale=2.0, negative_input_ids=too_long)


def test_the_pipeline_refuses_a_prompt_too_long(tiny_checkpoint):
    pipe = PiscesPipeline.from_pretrained(tiny_checkpoint)
    with pytest.raises(SequenceTooLongError, match="max_position_embeddings"):
        pipe(LONG_PROMPT, num_inference_steps=1, output_type="np")


# ---------------------------------------------------------------- training rows


def _sample(text, task="generation"):
    return {"task": task, "image": _image(), "text": text, "question": None, "answer": None, SKIPPED_ROWS_KEY: 0}


@pytest.mark.parametrize("task", ["generation", "caption"])
def test_the_collator_skips_and_counts_a_row_too_long(tiny_processor, task):
    collator = PiscesCollator(tiny_processor)
    assert collator.max_sequence_length == tiny_processor.max_sequence_length
    long_sample, short_sample = _sample(LONG_PROMPT, task), _sample("a red circle", task)
    assert not collator.fits(long_sample) and collator.fits(short_sample)
    batch = collator([long_sample, short_sample])
    alone = collator([short_sample])
    assert batch[SKIPPED_ROWS_KEY].item() == 1 and alone[SKIPPED_ROWS_KEY].item() == 0
    assert torch.equal(batch["input_ids"], alone["input_ids"]) and torch.equal(batch["labels"], alone["labels"])
    with pytest.raises(ValueError, match="Every sample of this batch is longer"):
        collator([long_sample])


def test_the_sequence_length_is_the_collators(tiny_processor):
    collator = PiscesCollator(tiny_processor, max_sequence_length=10**6)
    for sample in (_sample("a red circle"), _sample("a blue square", "caption")):
        assert collator.sequence_length(sample) == collator([sample])["input_ids"].shape[1]


def test_the_dataset_replaces_a_row_too_long_and_counts_it(tiny_processor):
    collator = PiscesCollator(tiny_processor)
    rows = [{"image": _image(), "text": LONG_PROMPT}, {"image": _image(), "text": "a red circle"}]
    dataset = PiscesTrainingDataset(rows, generation_ratio=1.0, caption_dropout=0.0, fits=collator.fits)
    first = dataset[0]
    assert first["text"] == "a red circle" and first[SKIPPED_ROWS_KEY] == 1
    assert collator([first])[SKIPPED_ROWS_KEY].item() == 1
    unchecked = PiscesTrainingDataset(rows, generation_ratio=1.0, caption_dropout=0.0)
    assert unchecked[0]["text"] == LONG_PROMPT


def test_the_trainer_replaces_rows_too_long(tiny_checkpoint, tiny_processor, tmp_path):
    from transformers import TrainingArguments

    from pisces import PiscesForConditionalGeneration
    from pisces.training import build_trainer

    model = PiscesForConditionalGeneration.from_pretrained(tiny_checkpoint)
    rows = [{"image": _image(), "text": LONG_PROMPT}, {"image": _image(), "text": "a red circle"}]
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", remove_unused_columns=False)
    trainer = build_trainer(model, tiny_processor, rows, args, generation_ratio=1.0, caption_dropout=0.0)
    first = trainer.train_dataset[0]
    assert first["text"] == "a red circle" and first[SKIPPED_ROWS_KEY] == 1
