"""Training labels come from the checkpoint's chat template ({% generation %} blocks), whatever its turn format."""

import pytest
import torch


@pytest.fixture(scope="module")
def chatml_checkpoint(tmp_path_factory):
    """A random tiny checkpoint whose tokenizer speaks ChatML and whose processor renders ChatML turns."""
    from pisces import PiscesForConditionalGeneration
    from pisces.conversion import build_processor, build_tokenizer, preset_config
    from pisces.processing.chat_template import CHATML_TEMPLATE

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    config = preset_config("tiny", tokenizer)
    processor = build_processor(config, tokenizer)
    processor.chat_template = CHATML_TEMPLATE
    config.unconditional_input_ids = processor.unconditional_input_ids
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("chatml") / "tiny-chatml"
    PiscesForConditionalGeneration(config).save_pretrained(out)
    processor.save_pretrained(out)
    return out


def shapes_samples(num_rows: int, **dataset_kwargs):
    from pisces.training.data import PiscesTrainingDataset
    from pisces.shapes.world import sample_scene, short_caption

    rows = []
    for index in range(num_rows):
        scene = sample_scene(index)
        rows.append({"image": scene.render(), "text": short_caption(scene)})
    rows.append({"image": sample_scene(99).render(), "text": "", "question": "How many shapes?", "answer": "two"})
    dataset = PiscesTrainingDataset(rows, caption_dropout=0.0, **dataset_kwargs)
    return [dataset[index] for index in range(len(dataset))]


def test_chatml_answers_are_labelled_up_to_im_end(chatml_checkpoint):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pisces.training.data import PiscesCollator

    processor = AutoProcessor.from_pretrained(chatml_checkpoint)
    assert "<|im_start|>" in processor.chat_template
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    samples = shapes_samples(6, generation_ratio=0.5)
    assert {sample["task"] for sample in samples} == {"caption", "vqa", "generation"}
    batch = PiscesCollator(processor, report_skipped=False)(samples)

    for sample, ids, labels in zip(samples, batch["input_ids"], batch["labels"]):
        supervised = labels[labels != -100]
        if sample["task"] == "generation":
            assert supervised.tolist() == [processor.eoi_token_id]
            continue
        answer = sample["text"] if sample["task"] == "caption" else sample["answer"]
        # The answer, closed by the template's own end of turn: the token <|im_end|>, not Llama 3's <|eot_id|>.
        assert supervised[-1].item() == im_end
        assert processor.decode(supervised, skip_special_tokens=False) == answer + "<|im_end|>"
        assert "<|eot_id|>" not in processor.decode(ids, skip_special_tokens=False)
        # Everything before the answer is context: the user turn and the assistant header.
        first = (labels != -100).nonzero()[0].item()
        assert processor.decode(ids[:first], skip_special_tokens=False).endswith("<|im_start|>assistant\n")

    model = AutoModelForImageTextToText.from_pretrained(chatml_checkpoint)
    out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.lm_loss) and torch.isfinite(out.gen_loss)


def test_llama_template_labels_end_with_eot(tiny_processor):
    from pisces.training.data import PiscesCollator

    samples = [sample for sample in shapes_samples(3, generation_ratio=0.0)]
    batch = PiscesCollator(tiny_processor, report_skipped=False)(samples)
    eot = tiny_processor.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    for sample, labels in zip(samples, batch["labels"]):
        supervised = labels[labels != -100]
        answer = sample["text"] if sample["task"] == "caption" else sample["answer"]
        assert supervised[-1].item() == eot
        assert tiny_processor.decode(supervised, skip_special_tokens=False) == answer + "<|eot_id|>"


def test_any_template_with_generation_markers_trains_its_own_turns(tiny_checkpoint):
    from pisces import PiscesProcessor
    from pisces.training.data import PiscesCollator

    processor = PiscesProcessor.from_pretrained(tiny_checkpoint)
    processor.chat_template = (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'assistant' -%}"
        "{{- 'A: ' -}}{%- generation -%}"
        "{%- for item in message['content'] -%}{{- item['text'] -}}{%- endfor -%}{{- ' END' -}}"
        "{%- endgeneration -%}{{- '\\n' -}}"
        "{%- else -%}"
        "{{- 'Q: ' -}}{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'image' -%}{{- '<image>' -}}{%- else -%}{{- item['text'] -}}{%- endif -%}"
        "{%- endfor -%}{{- '\\n' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- 'A: ' -}}{%- endif -%}"
    )
    samples = shapes_samples(2, generation_ratio=0.0)
    batch = PiscesCollator(processor, report_skipped=False)(samples)
    for sample, labels in zip(samples, batch["labels"]):
        answer = sample["text"] if sample["task"] == "caption" else sample["answer"]
        decoded = processor.decode(labels[labels != -100], skip_special_tokens=False)
        assert decoded.strip() == answer + " END"


def test_a_template_without_generation_markers_is_refused(tiny_checkpoint):
    from pisces import PiscesProcessor
    from pisces.training.data import PiscesCollator

    processor = PiscesProcessor.from_pretrained(tiny_checkpoint)
    processor.chat_template = (
        "{%- for message in messages -%}{{- message['role'] + ': ' -}}"
        "{%- for item in message['content'] -%}{{- item.get('text', '<image>') -}}{%- endfor -%}{{- '\\n' -}}"
        "{%- endfor -%}"
    )
    with pytest.raises(ValueError, match=r"does not mark the assistant's turns with \{% generation %\}"):
        PiscesCollator(processor)
