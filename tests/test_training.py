"""Training the LLM side: data and collator, stage presets, the Trainer, the `pisces train` command, resume (LoRA: see
test_peft.py)."""

import json
import re

import pytest
import torch


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    from pisces import PiscesProcessor

    return PiscesProcessor.from_pretrained(tiny_checkpoint)


def fresh_model(tiny_checkpoint):
    from pisces import PiscesForConditionalGeneration

    return PiscesForConditionalGeneration.from_pretrained(tiny_checkpoint)


def training_args(out, **overrides):
    from transformers import TrainingArguments

    settings = dict(
        output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-3, lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=0, use_cpu=True,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def step_logs(log_history):
    return [entry for entry in log_history if "loss" in entry and "step" in entry]


# ---- data and collator ------------------------------------------------------------------------------------------


def test_collator_builds_the_sequences_of_both_directions(image_folder, processor, tiny_checkpoint):
    from pisces.training.data import PiscesCollator, PiscesTrainingDataset, load_image_folder

    config = fresh_model(tiny_checkpoint).config
    rows = load_image_folder(image_folder)
    dataset = PiscesTrainingDataset(rows, generation_ratio=0.5, caption_dropout=0.0, seed=0)
    samples = [dataset[i] for i in range(len(dataset))]
    tasks = [sample["task"] for sample in samples]
    assert set(tasks) == {"caption", "generation"}
    assert [dataset[i]["task"] for i in range(len(dataset))] == tasks  # a function of (seed, index)
    batch = PiscesCollator(processor, report_skipped=False)(samples)

    num_generation = tasks.count("generation")
    assert batch["gen_pixel_values"].shape[0] == num_generation
    assert batch["pixel_values"].shape[0] == len(tasks) - num_generation
    for row, (sample, ids, labels) in enumerate(zip(samples, batch["input_ids"], batch["labels"])):
        ids = ids[batch["attention_mask"][row].bool()]  # right padding
        assert batch["attention_mask"][row][: len(ids)].all()
        if sample["task"] == "generation":
            # prompt <boi> <gen>*m <eoi>, and <eoi> is the only text label.
            tail = [config.boi_token_id] + [config.gen_token_id] * config.num_gen_tokens + [config.eoi_token_id]
            assert ids[-len(tail) :].tolist() == tail
            assert (ids == config.image_token_id).sum() == 0
            assert labels[labels != -100].tolist() == [config.eoi_token_id]
            assert sample["text"] in processor.decode(ids)
        else:
            assert (ids == config.image_token_id).sum() == config.num_image_tokens
            assert (ids == config.gen_token_id).sum() == 0
            supervised = labels[labels != -100]
            assert processor.decode(supervised, skip_special_tokens=False) == sample["text"] + "<|eot_id|>"
    out = fresh_model(tiny_checkpoint)(**batch)
    assert out.lm_loss > 0 and out.gen_loss > 0


def test_caption_dropout_gives_the_unconditional_prompt(image_folder, processor):
    from pisces.training.data import PiscesCollator, PiscesTrainingDataset, load_image_folder

    rows = load_image_folder(image_folder)
    dropped = PiscesTrainingDataset(rows, generation_ratio=1.0, caption_dropout=1.0)
    batch = PiscesCollator(processor, report_skipped=False)([dropped[0], dropped[1]])
    unconditional = processor.tokenizer(processor.unconditional_prompt, add_special_tokens=False)["input_ids"]
    for row in batch["input_ids"]:
        assert row[: len(unconditional)].tolist() == unconditional
    # The default 10%: about one generation sample in ten, drawn per row.
    many = PiscesTrainingDataset([{"image": rows[0]["image"], "text": "a red circle"}] * 400, generation_ratio=1.0)
    rate = sum(many._sample(i)["text"] == "" for i in range(400)) / 400
    assert 0.06 < rate < 0.14


def test_question_answer_rows_train_the_answer(image_folder, processor):
    from pisces.training.data import PiscesCollator, PiscesTrainingDataset

    row = {"image": str(image_folder / "0.png"), "text": "", "question": "How many shapes?", "answer": "two"}
    sample = PiscesTrainingDataset([row], generation_ratio=1.0)[0]
    assert sample["task"] == "vqa"  # no caption to generate from, so the row answers its question
    batch = PiscesCollator(processor, report_skipped=False)([sample])
    supervised = batch["labels"][0][batch["labels"][0] != -100]
    assert processor.decode(supervised, skip_special_tokens=False) == "two<|eot_id|>"
    assert "How many shapes?" in processor.decode(batch["input_ids"][0])


class InMemoryDataset:
    """What the trainer needs of a `datasets.Dataset` (decoded or not): `column_names`, `len` and rows by index."""

    def __init__(self, rows):
        self.rows, self.column_names = rows, sorted(rows[0])

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


def test_hugging_face_style_rows_with_pil_images_or_bytes(image_folder, processor):
    import io

    from PIL import Image

    from pisces.training.data import PiscesCollator, PiscesTrainingDataset

    picture = Image.open(image_folder / "0.png")
    encoded = io.BytesIO()
    picture.save(encoded, format="PNG")
    rows = InMemoryDataset([
        {"picture": picture, "caption": "a shape"},  # a decoded Image column
        {"picture": {"bytes": encoded.getvalue(), "path": None}, "caption": "a shape"},  # not decoded
        {"picture": {"bytes": b"garbage", "path": None}, "caption": "a shape"},  # bad bytes: skipped
    ])
    dataset = PiscesTrainingDataset(rows, image_column="picture", text_column="caption", generation_ratio=0.0)
    samples = [dataset[i] for i in range(3)]
    assert [s["skipped_rows"] for s in samples] == [0, 0, 1]
    batch = PiscesCollator(processor, report_skipped=False)(samples)
    assert torch.equal(batch["pixel_values"][0], batch["pixel_values"][1])
    with pytest.raises(ValueError, match="no image column 'image'; its columns are \\['caption', 'picture'\\]"):
        PiscesTrainingDataset(rows)


def test_bad_rows_are_skipped_and_counted(image_folder, processor, tiny_checkpoint, tmp_path):
    from pisces.training.data import SKIPPED_ROWS_KEY, PiscesTrainingDataset, load_image_folder
    from pisces.training.trainer import build_trainer

    (tmp_path / "broken.png").write_bytes(b"not an image")
    lines = [
        json.dumps({"file_name": str(image_folder / "0.png"), "text": "a shape"}),
        json.dumps({"file_name": "missing.png", "text": "a shape"}),
        json.dumps({"file_name": "broken.png", "text": "a shape"}),
        json.dumps({"file_name": str(image_folder / "1.png"), "text": "  "}),
        "not json",
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines))
    rows = load_image_folder(tmp_path)
    assert len(rows) == 4  # the line that is not JSON is dropped when reading
    dataset = PiscesTrainingDataset(rows)
    assert [dataset[i][SKIPPED_ROWS_KEY] for i in range(4)] == [0, 1, 1, 1]

    trainer = build_trainer(fresh_model(tiny_checkpoint), processor, rows, training_args(tmp_path / "out", max_steps=2))
    trainer.train()
    logs = step_logs(trainer.state.log_history)
    assert sum(entry["skipped_rows"] for entry in logs) == 6  # two epochs of 4 rows, 3 of them bad


# ---- stage presets ----------------------------------------------------------------------------------------------


CONNECTORS = {
    f"{module}.{layer}.{kind}"
    for module in ("model.und_projector", "model.gen_projector", "gen_head")
    for layer in ("linear_1", "linear_2")
    for kind in ("weight", "bias")
} | {"lm_head.weight"}


def language_model_parameters(model):
    return {name for name, _ in model.named_parameters() if name.startswith("model.language_model.")}


def test_stage_presets_train_exactly_their_modules(tiny_checkpoint):
    from pisces.training.stages import apply_stage

    model = fresh_model(tiny_checkpoint)
    llm = language_model_parameters(model)
    assert len(llm) == 2 * 9 + 2  # two Llama layers of 9 tensors, the embeddings and the final norm
    assert set(apply_stage(model, "align")) == CONNECTORS
    assert set(apply_stage(model, "pretrain")) == CONNECTORS | llm
    assert set(apply_stage(model, "finetune")) == CONNECTORS | llm
    custom = apply_stage(model, "custom", ["gen_head", "model.language_model.layers.1.mlp.*"])
    assert custom == sorted(
        [f"gen_head.linear_{i}.{kind}" for i in (1, 2) for kind in ("weight", "bias")]
        + [f"model.language_model.layers.1.mlp.{name}_proj.weight" for name in ("gate", "up", "down")]
    )
    # The encoders never train in a preset.
    for stage in ("align", "pretrain", "finetune"):
        names = apply_stage(model, stage)
        assert not [name for name in names if "vision_tower" in name]
    with pytest.raises(ValueError, match="No parameter of the model matches model.nothing"):
        apply_stage(model, "custom", ["model.nothing"])
    with pytest.raises(ValueError, match="needs module name patterns"):
        apply_stage(model, "custom")
    with pytest.raises(ValueError, match="Unknown stage"):
        apply_stage(model, "warmup")


# ---- the Trainer ------------------------------------------------------------------------------------------------


def test_sixty_steps_halve_gen_loss_and_lower_lm_loss(image_folder, processor, tiny_checkpoint, tmp_path):
    from pisces.training.data import load_image_folder
    from pisces.training.trainer import build_trainer

    trainer = build_trainer(
        fresh_model(tiny_checkpoint), processor, load_image_folder(image_folder),
        training_args(tmp_path, max_steps=60), stage="pretrain",
    )
    trainer.train()
    logs = step_logs(trainer.state.log_history)
    assert len(logs) == 60 and all("lm_loss" in entry for entry in logs)
    gen = [entry["gen_loss"] for entry in logs if "gen_loss" in entry]
    lm = [entry["lm_loss"] for entry in logs]
    end = lambda values: sum(values[-5:]) / 5  # noqa: E731  (single batches are noisy)
    # Measured: gen_loss 2.18 -> 0.10, lm_loss 6.51 -> 1.44 (mean of the last five steps).
    assert end(gen) < 0.5 * gen[0], gen
    assert end(lm) < 0.5 * lm[0], lm
    # `loss` is the sum the model optimizes: lm_loss + gen_loss_weight * gen_loss.
    first = logs[0]
    assert first["loss"] == pytest.approx(first["lm_loss"] + first["gen_loss"], rel=1e-4)


def test_the_stock_trainer_trains_the_model(image_folder, processor, tiny_checkpoint, tmp_path):
    from transformers import Trainer

    from pisces.training.data import PiscesCollator, PiscesTrainingDataset, load_image_folder

    model = fresh_model(tiny_checkpoint)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=3, remove_unused_columns=False),
        train_dataset=PiscesTrainingDataset(load_image_folder(image_folder)),
        data_collator=PiscesCollator(processor, report_skipped=False),
    )
    before = model.gen_head.linear_2.weight.detach().clone()
    trainer.train()
    assert len(step_logs(trainer.state.log_history)) == 3
    assert not torch.equal(before, model.gen_head.linear_2.weight)


# ---- the command, checkpoints and resume ------------------------------------------------------------------------


def train_argv(checkpoint, data, out, *extra):
    return [
        "train", "--model", str(checkpoint), "--data", str(data), "--out", str(out), "--batch-size", "4",
        "--learning-rate", "1e-3", "--logging-steps", "1", *extra, "--", "--disable_tqdm", "true",
    ]


def last_state(out):
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    return json.loads((checkpoints[-1] / "trainer_state.json").read_text())


def test_train_command_resume_gives_the_uninterrupted_run(image_folder, tiny_checkpoint, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback

    import pisces.training.trainer as trainer_module
    from pisces import PiscesPipeline
    from pisces_cli.commands import main

    steps = ["--max-steps", "6", "--save-steps", "3"]
    assert main(train_argv(tiny_checkpoint, image_folder, tmp_path / "straight", *steps)) == 0

    # An interrupted run: stopped right after the checkpoint of step 3, then resumed by the command.
    class StopAfterThree(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= 3

    build_trainer = trainer_module.build_trainer
    monkeypatch.setattr(
        trainer_module, "build_trainer", lambda *a, **k: build_trainer(*a, callbacks=[StopAfterThree()], **k)
    )
    assert main(train_argv(tiny_checkpoint, image_folder, tmp_path / "resumed", *steps)) == 0
    assert last_state(tmp_path / "resumed")["global_step"] == 3
    monkeypatch.setattr(trainer_module, "build_trainer", build_trainer)
    assert main(train_argv(tiny_checkpoint, image_folder, tmp_path / "resumed", *steps, "--resume")) == 0

    straight, resumed = (step_logs(last_state(tmp_path / name)["log_history"]) for name in ("straight", "resumed"))
    assert [entry["step"] for entry in resumed] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lm_loss", "gen_loss"):
        assert [entry.get(key) for entry in resumed] == [entry.get(key) for entry in straight], key
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)

    # The output folder is a complete checkpoint: every entry point loads it, the decoder carried over.
    out = tmp_path / "resumed"
    assert AutoModelForImageTextToText.from_pretrained(out).config.model_type == "pisces"
    assert AutoProcessor.from_pretrained(out).num_gen_tokens == 16
    pipe = PiscesPipeline.from_pretrained(out)
    original = PiscesPipeline.from_pretrained(tiny_checkpoint)
    for name, value in original.decoder.state_dict().items():
        assert torch.equal(pipe.decoder.state_dict()[name], value)
    assert not torch.equal(pipe.model.gen_head.linear_2.weight, original.model.gen_head.linear_2.weight)


def test_train_command_errors_are_one_line(image_folder, tiny_checkpoint, tmp_path, capsys):
    from pisces_cli.commands import main

    cases = [
        (["--stage", "custom"], "--stage custom needs --trainable"),
        (["--stage", "align", "--trainable", "gen_head"], "--trainable is for --stage custom"),
        (["--stage", "align", "--lora"], "--lora adapts the language model"),
        (["--resume"], "holds no checkpoint-"),
        (["--stage", "custom", "--trainable", "nothing"], "No parameter of the model matches nothing"),
    ]
    for extra, message in cases:
        assert main(train_argv(tiny_checkpoint, image_folder, tmp_path / "out", "--max-steps", "1", *extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after the loading messages, one line
        assert err.startswith("pisces: error:") and message in err, err
    assert main(train_argv(tiny_checkpoint, tmp_path / "nowhere", tmp_path / "out", "--max-steps", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"pisces: error: could not load the data {tmp_path / 'nowhere'}"), err


# ---- several processes ------------------------------------------------------------------------------------------


def test_two_processes_match_one_process_with_the_same_global_batch(image_folder, tiny_checkpoint, tmp_path):
    """
    2 processes x batch 2 against 1 process x batch 2 x 2 accumulation steps: the same 4 samples per step, the same
    mean of two per-batch mean losses. Measured: identical losses and weights (max difference 0.0); the tolerance
    allows float reassociation in gloo's all-reduce on other CPUs. With activation checkpointing, under which the
    stock Trainer stops DDP from looking for unused parameters, while a batch of 2 often holds one direction only.
    """
    import subprocess

    from conftest import CPU_LAUNCH_ENV, accelerate_launch_two_processes
    from safetensors.torch import load_file

    from pisces_cli.commands import main

    common = ["--max-steps", "4", "--batch-size", "2", "--save-steps", "100", "--gradient-checkpointing"]
    one = train_argv(tiny_checkpoint, image_folder, tmp_path / "one", *common, "--grad-accum", "2")
    assert main(one) == 0
    two = train_argv(tiny_checkpoint, image_folder, tmp_path / "two", *common, "--grad-accum", "1")
    result = subprocess.run(
        accelerate_launch_two_processes() + two, env=CPU_LAUNCH_ENV, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(re.findall(r"trained 4 steps", result.stdout)) == 1  # only the main process writes the checkpoint

    logs_one, logs_two = (step_logs(last_state(tmp_path / name)["log_history"]) for name in ("one", "two"))
    assert [entry["epoch"] for entry in logs_two] == [entry["epoch"] for entry in logs_one]  # global batch of 4
    for key in ("loss", "lm_loss", "gen_loss"):
        assert [e[key] for e in logs_two] == pytest.approx([e[key] for e in logs_one], rel=1e-5, abs=1e-6), key
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("one", "two"))
    assert max((a[key] - b[key]).abs().max().item() for key in a) < 1e-5


def test_plain_trainer_does_not_rescale_pisces_loss(tiny_model, tmp_path):
    # `forward(**kwargs)` would make the Trainer assume the model normalizes its loss over accumulation and processes.
    from transformers import Trainer, TrainingArguments

    trainer = Trainer(model=tiny_model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[]))
    assert trainer.model_accepts_loss_kwargs is False


def test_a_real_datasets_dataset_trains_from_python_and_from_disk(image_folder, processor, tiny_checkpoint, tmp_path):
    import datasets
    from PIL import Image

    from pisces_cli.commands import main
    from pisces.training.data import PiscesTrainingDataset, load_image_folder

    rows = load_image_folder(image_folder)
    images = [Image.open(image_folder / f"{i}.png").convert("RGB") for i in range(len(rows))]
    texts = [row["text"] for row in rows]
    dataset = datasets.Dataset.from_dict({"image": images, "text": texts}).cast_column("image", datasets.Image())

    # Decoded rows and the same rows as the image folder give the same samples.
    from_datasets = PiscesTrainingDataset(dataset, generation_ratio=0.5, seed=3)
    from_folder = PiscesTrainingDataset(rows, generation_ratio=0.5, seed=3)
    for index in range(len(rows)):
        a, b = from_datasets[index], from_folder[index]
        assert a.keys() == b.keys() and a["text"] == b["text"]

    datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "saved"))
    assert main(train_argv(tiny_checkpoint, tmp_path / "saved", tmp_path / "out", "--max-steps", "2")) == 0
    assert (tmp_path / "out" / "model_index.json").is_file()
