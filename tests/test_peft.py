"""PEFT: the default LoRA targets registered with PEFT, `pisces.default_lora_config`, adapters that load from anywhere,
and `pisces train --lora` (the adapter at the run's root, the merged checkpoint in RUN/merged, resume)."""

import json
import os

import pytest
import torch


def fresh_model(checkpoint):
    from pisces import PiscesForConditionalGeneration

    return PiscesForConditionalGeneration.from_pretrained(checkpoint).eval()


def both_directions_batch(image_folder, processor):
    from pisces.training.data import PiscesCollator, PiscesTrainingDataset, load_image_folder

    samples = PiscesTrainingDataset(load_image_folder(image_folder), generation_ratio=0.5, caption_dropout=0.0)
    batch = PiscesCollator(processor, report_skipped=False)([samples[i] for i in range(4)])
    assert "pixel_values" in batch and "gen_pixel_values" in batch
    return batch


def trainable(model) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


PREFIX = "base_model.model."
LORA_WEIGHTS = {
    f"{PREFIX}model.language_model.layers.{layer}.{block}.{proj}_proj.lora_{ab}.default.weight"
    for layer in (0, 1)
    for block, projs in (("self_attn", ("q", "k", "v", "o")), ("mlp", ("gate", "up", "down")))
    for proj in projs
    for ab in ("A", "B")
}


# ---- the defaults -------------------------------------------------------------------------------------------------


def test_lora_config_alone_adapts_the_language_model_projections_only(tiny_checkpoint):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraModel
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    import pisces  # noqa: F401  (registers the targets)

    # Registered in PEFT's own table; PEFT's code is left as it is.
    assert "pisces" in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    assert LoraModel._prepare_adapter_config.__qualname__ == "LoraModel._prepare_adapter_config"

    peft_model = get_peft_model(fresh_model(tiny_checkpoint), LoraConfig(r=8))
    assert trainable(peft_model) == LORA_WEIGHTS
    adapted = [name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")]
    assert len(adapted) == 14 and all(".language_model." in name for name in adapted)
    assert peft_model.peft_config["default"].modules_to_save is None


def test_default_lora_config_saves_the_connectors_and_trains_the_special_token_rows(tiny_checkpoint):
    from peft import LoraConfig, PeftModelForCausalLM, get_peft_model

    from pisces import default_lora_config

    model = fresh_model(tiny_checkpoint)
    config = model.config
    lora_config = default_lora_config(model)
    assert isinstance(lora_config, LoraConfig) and lora_config.r == 8 and lora_config.task_type == "CAUSAL_LM"
    special = sorted([config.image_token_id, config.boi_token_id, config.eoi_token_id, config.gen_token_id])
    assert lora_config.trainable_token_indices == {"embed_tokens": special}
    assert default_lora_config(config).to_dict() == lora_config.to_dict()  # the config alone gives the same

    peft_model = get_peft_model(model, lora_config)
    assert isinstance(peft_model, PeftModelForCausalLM)
    expected = set(LORA_WEIGHTS)
    expected |= {
        f"{PREFIX}{module}.modules_to_save.default.linear_{i}.{kind}"
        for module in ("model.und_projector", "model.gen_projector", "gen_head")
        for i in (1, 2)
        for kind in ("weight", "bias")
    }
    expected |= {f"{PREFIX}lm_head.modules_to_save.default.weight"}
    expected |= {f"{PREFIX}model.language_model.embed_tokens.token_adapter.trainable_tokens_delta.default"}
    assert trainable(peft_model) == expected
    assert not [name for name, _ in peft_model.named_modules() if "vision_tower" in name and "lora" in name]
    delta = peft_model.get_parameter(
        f"{PREFIX}model.language_model.embed_tokens.token_adapter.trainable_tokens_delta.default"
    )
    assert tuple(delta.shape) == (4, config.text_config.hidden_size)

    # What the caller passes replaces the default.
    mine = default_lora_config(model, r=4, lora_alpha=8, target_modules=["gen_head.linear_1"], modules_to_save=[])
    assert (mine.r, mine.lora_alpha, mine.target_modules, mine.modules_to_save) == (4, 8, {"gen_head.linear_1"}, [])
    other = get_peft_model(fresh_model(tiny_checkpoint), mine)
    assert f"{PREFIX}gen_head.linear_1.lora_A.default.weight" in trainable(other)
    assert not [name for name in trainable(other) if "modules_to_save" in name]
    with pytest.raises(TypeError, match="needs a Pisces model or its PiscesConfig"):
        default_lora_config(torch.nn.Linear(2, 2))


def test_saved_adapter_loads_back_with_equal_outputs(image_folder, tiny_checkpoint, tiny_processor, tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
    from safetensors.torch import load_file

    from pisces import default_lora_config

    model = fresh_model(tiny_checkpoint)
    peft_model = get_peft_model(model, default_lora_config(model))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # as if trained: every adapter tensor away from its initial value (lora_B starts at zero)
        for parameter in peft_model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    peft_model.save_pretrained(tmp_path / "adapter")
    batch = both_directions_batch(image_folder, tiny_processor)
    with torch.no_grad():
        expected = peft_model.eval()(**batch)
        base_out = fresh_model(tiny_checkpoint)(**batch)
    assert not torch.allclose(expected.logits, base_out.logits)

    loaded = PeftModel.from_pretrained(fresh_model(tiny_checkpoint), tmp_path / "adapter").eval()
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    for other in (loaded, auto):
        with torch.no_grad():
            out = other(**batch)
        assert torch.equal(out.logits, expected.logits)
        assert torch.equal(out.gen_loss, expected.gen_loss)
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    loaded.save_pretrained(tmp_path / "again")
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert saved.keys() == again.keys() and all(torch.equal(saved[key], again[key]) for key in saved)


# ---- pisces train --lora ------------------------------------------------------------------------------------------


def train_argv(checkpoint, data, out, *extra):
    return [
        "train", "--model", str(checkpoint), "--data", str(data), "--out", str(out), "--batch-size", "4",
        "--learning-rate", "1e-3", "--logging-steps", "1", *extra, "--", "--disable_tqdm", "true",
    ]


def test_train_lora_writes_a_peft_folder_that_loads_from_anywhere(
    image_folder, tiny_checkpoint, tiny_processor, tmp_path, monkeypatch
):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from pisces import PiscesPipeline
    from pisces_cli.commands import main

    # The base model as typed by a user: a path relative to the working directory.
    monkeypatch.chdir(tiny_checkpoint.parent)
    argv = train_argv(tiny_checkpoint.name, image_folder, tmp_path / "run", "--max-steps", "3", "--lora",
                      "--gradient-checkpointing")
    assert main(argv) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    run = tmp_path / "run"
    adapter_config = json.loads((run / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_checkpoint.resolve())
    assert os.path.isabs(adapter_config["base_model_name_or_path"])
    assert not (run / "config.json").exists()  # no full model beside the adapter (transformers would stack them)
    adapter = load_file(run / "adapter_model.safetensors")
    # Gradients reached the adapters through gradient checkpointing: every lora_B moved from its zero start.
    lora_b = [key for key in adapter if "lora_B" in key]
    assert len(lora_b) == 14 and all(adapter[key].abs().sum() > 0 for key in lora_b)
    checkpoints = sorted(run.glob("checkpoint-*"))
    assert checkpoints and all(
        json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        == str(tiny_checkpoint.resolve())
        for folder in checkpoints
    )

    batch = both_directions_batch(image_folder, tiny_processor)
    adapted = PeftModel.from_pretrained(fresh_model(tiny_checkpoint), run).eval()
    auto = AutoPeftModelForCausalLM.from_pretrained(run).eval()  # finds the base by the recorded absolute path
    merged = AutoModelForImageTextToText.from_pretrained(run / "merged").eval()
    with torch.no_grad():
        adapted_out, auto_out, merged_out = adapted(**batch), auto(**batch), merged(**batch)
    assert torch.equal(auto_out.logits, adapted_out.logits)
    # Merging adds B @ A into the weights: the same function up to float rounding.
    torch.testing.assert_close(merged_out.logits, adapted_out.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merged_out.gen_loss, adapted_out.gen_loss, atol=1e-5, rtol=1e-5)

    # The merged checkpoint is complete: the pipeline loads it, with the base's decoder carried over.
    pipe = PiscesPipeline.from_pretrained(run / "merged")
    original = PiscesPipeline.from_pretrained(tiny_checkpoint)
    for name, value in original.decoder.state_dict().items():
        assert torch.equal(pipe.decoder.state_dict()[name], value)
    # The special-token rows trained; every other embedding row of the merged checkpoint is the base model's.
    config = merged.config
    fresh = fresh_model(tiny_checkpoint).get_input_embeddings().weight
    merged_embed = merged.get_input_embeddings().weight
    special = [config.image_token_id, config.boi_token_id, config.eoi_token_id, config.gen_token_id]
    others = [i for i in range(config.text_config.vocab_size) if i not in special]
    assert torch.equal(merged_embed[others], fresh[others])
    assert not torch.equal(merged_embed[config.boi_token_id], fresh[config.boi_token_id])


def test_commands_point_an_adapter_folder_to_its_merged_checkpoint(image_folder, tiny_checkpoint, tmp_path, capsys):
    from pisces_cli.commands import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_text("{}")
    (run / "merged").mkdir()
    assert main(["describe", str(image_folder / "0.png"), "--model", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"pisces: error: {run} is a LoRA adapter (load it with peft.PeftModel on its base model); its merged " \
                  f"checkpoint is {run / 'merged'}", err


def test_a_resumed_lora_run_gives_the_uninterrupted_adapter(image_folder, tiny_checkpoint, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    import pisces.training.trainer as trainer_module
    from pisces_cli.commands import main

    steps = ["--max-steps", "4", "--save-steps", "2", "--lora"]
    assert main(train_argv(tiny_checkpoint, image_folder, tmp_path / "straight", *steps)) == 0

    class StopAfterTwo(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= 2

    build_trainer = trainer_module.build_trainer
    monkeypatch.setattr(
        trainer_module, "build_trainer", lambda *a, **k: build_trainer(*a, callbacks=[StopAfterTwo()], **k)
    )
    assert main(train_argv(tiny_checkpoint, image_folder, tmp_path / "resumed", *steps)) == 0
    monkeypatch.setattr(trainer_module, "build_trainer", build_trainer)
    assert main(train_argv(tiny_checkpoint, image_folder, tmp_path / "resumed", *steps, "--resume")) == 0

    state = json.loads((tmp_path / "resumed" / "checkpoint-4" / "trainer_state.json").read_text())
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2, 3, 4]
    a, b = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    a, b = (load_file(tmp_path / name / "merged" / "model.safetensors") for name in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
