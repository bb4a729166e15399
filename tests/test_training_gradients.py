"""What trains: the generation encoder is frozen for every trainer, and every trainable parameter of a stage gets a
gradient from a batch holding both directions (what DDP checks when it does not look for unused parameters)."""

import pytest


def fresh_model(checkpoint):
    from pisces import PiscesForConditionalGeneration

    return PiscesForConditionalGeneration.from_pretrained(checkpoint)


def count(parameters) -> int:
    return sum(parameter.numel() for parameter in parameters)


def test_the_stock_trainer_counts_no_generation_encoder_parameter(tiny_checkpoint, tmp_path):
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_pt_utils import get_model_param_count

    from pisces.training.stages import apply_stage

    model = fresh_model(tiny_checkpoint)
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))
    gen_encoder = count(model.model.gen_vision_tower.parameters())
    assert gen_encoder > 0
    # The number the Trainer logs as "Number of trainable parameters".
    assert get_model_param_count(trainer.model, trainable_only=True) == count(model.parameters()) - gen_encoder
    # Only an explicit request trains it.
    names = apply_stage(model, "custom", ["model.gen_vision_tower"])
    assert names and all(name.startswith("model.gen_vision_tower.") for name in names)


def enable_checkpointing(model):
    # transformers 5.24 renamed gradient checkpointing to activation checkpointing (the old name warns).
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


@pytest.mark.parametrize("stage", [None, "align", "pretrain", "finetune"])
def test_every_trainable_parameter_gets_a_gradient(stage, tiny_checkpoint, tiny_processor):
    from pisces.training.data import PiscesCollator, PiscesTrainingDataset
    from pisces.shapes.world import sample_scene, short_caption
    from pisces.training.stages import apply_stage

    rows = [{"image": sample_scene(i).render(), "text": short_caption(sample_scene(i))} for i in range(6)]
    samples = [PiscesTrainingDataset(rows, generation_ratio=0.5, caption_dropout=0.0)[i] for i in range(6)]
    batch = PiscesCollator(tiny_processor, report_skipped=False)(samples)
    assert "pixel_values" in batch and "gen_pixel_values" in batch

    model = fresh_model(tiny_checkpoint).train()
    if stage is not None:  # None: the model as loaded, what a stock Trainer trains
        apply_stage(model, stage)
    enable_checkpointing(model)
    model(**batch).loss.backward()
    without_gradient = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert without_gradient == []
    assert not [name for name, p in model.named_parameters() if p.requires_grad and "gen_vision_tower" in name]


def test_pisces_trainer_lets_ddp_expect_the_absent_direction(tiny_checkpoint, tmp_path):
    # A batch of one direction leaves the other direction's projector and head without a gradient; the stock Trainer
    # turns DDP's search for such parameters off under activation checkpointing (a 2-process run then fails).
    from transformers import TrainingArguments

    from pisces.training.trainer import PiscesTrainer

    def find_unused(**overrides):
        args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **overrides)
        return PiscesTrainer(model=fresh_model(tiny_checkpoint), args=args).args.ddp_find_unused_parameters

    field = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
        else "gradient_checkpointing"
    assert find_unused(**{field: True}) is True
    assert find_unused(ddp_find_unused_parameters=False) is False  # the user's choice stands
    # Reentrant checkpointing cannot search for unused parameters: left to the Trainer.
    assert find_unused(**{field: True, f"{field}_kwargs": {"use_reentrant": True}}) is None
