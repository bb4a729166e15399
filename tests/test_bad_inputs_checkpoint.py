"""Bad checkpoint files: each fails with an OSError / ValueError naming the file or field and the fix."""

import json
import shutil

import pytest
from transformers import AutoModel, AutoModelForImageTextToText

from pisces import (
    ConfigWeightsMismatchError,
    CorruptCheckpointError,
    MissingSubConfigError,
    PiscesForConditionalGeneration,
    PiscesModel,
    PiscesPipeline,
)
from pisces.checkpoint_files import check_model_weights, read_safetensors_header


MODEL_LOADERS = {
    "PiscesForConditionalGeneration": PiscesForConditionalGeneration.from_pretrained,
    "PiscesModel": PiscesModel.from_pretrained,
    "AutoModelForImageTextToText": AutoModelForImageTextToText.from_pretrained,
    "AutoModel": AutoModel.from_pretrained,
    "PiscesPipeline": PiscesPipeline.from_pretrained,
}


@pytest.fixture
def checkpoint_copy(tiny_checkpoint, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    return folder


def _cut(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])


CORRUPTIONS = {
    "half": lambda path: _cut(path, path.stat().st_size // 2),
    "last_byte": lambda path: _cut(path, -1),
    "inside_header": lambda path: _cut(path, 100),
    "empty": lambda path: _cut(path, 0),
    "not_safetensors": lambda path: path.write_bytes(b"<html>502 Bad Gateway</html>" * 40),
    "extra_bytes": lambda path: path.write_bytes(path.read_bytes() + b"\0" * 7),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_corrupt_model_file_names_it(checkpoint_copy, corruption):
    weights = checkpoint_copy / "model.safetensors"
    CORRUPTIONS[corruption](weights)
    with pytest.raises(CorruptCheckpointError, match="model.safetensors.*incomplete or corrupt.*download it again"):
        PiscesForConditionalGeneration.from_pretrained(checkpoint_copy)


@pytest.mark.parametrize("loader", sorted(MODEL_LOADERS))
def test_every_entry_point_names_a_truncated_model_file(checkpoint_copy, loader):
    CORRUPTIONS["half"](checkpoint_copy / "model.safetensors")
    with pytest.raises(OSError, match=r"model\.safetensors .*is shorter than its header declares"):
        MODEL_LOADERS[loader](checkpoint_copy)


@pytest.mark.parametrize("component", ["decoder", "vae"])
def test_a_truncated_decoder_or_vae_file_names_it(checkpoint_copy, component):
    weights = checkpoint_copy / component / "diffusion_pytorch_model.safetensors"
    CORRUPTIONS["last_byte"](weights)
    with pytest.raises(CorruptCheckpointError, match=f"{component} weights file .*{component}/diffusion_pytorch_model"):
        PiscesPipeline.from_pretrained(checkpoint_copy)


def test_the_header_check_reads_shapes_without_tensors(tiny_checkpoint):
    tensors = read_safetensors_header(tiny_checkpoint / "model.safetensors")
    model = PiscesForConditionalGeneration.from_pretrained(tiny_checkpoint)
    state = model.state_dict()
    assert {name: tuple(entry["shape"]) for name, entry in tensors.items()} == {
        name: tuple(state[name].shape) for name in tensors
    }


# ---------------------------------------------------------------- sharded checkpoints


@pytest.fixture
def sharded_checkpoint(checkpoint_copy):
    model = PiscesForConditionalGeneration.from_pretrained(checkpoint_copy)
    (checkpoint_copy / "model.safetensors").unlink()
    model.save_pretrained(checkpoint_copy, max_shard_size="300KB")
    index = json.loads((checkpoint_copy / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    assert check_model_weights(checkpoint_copy).keys() == index["weight_map"].keys()
    return checkpoint_copy


def _shards(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))


def test_a_sharded_checkpoint_loads(sharded_checkpoint, tiny_checkpoint):
    loaded = PiscesForConditionalGeneration.from_pretrained(sharded_checkpoint).state_dict()
    reference = PiscesForConditionalGeneration.from_pretrained(tiny_checkpoint).state_dict()
    assert all((loaded[name] == reference[name]).all() for name in reference)


def test_a_missing_shard_is_named(sharded_checkpoint):
    missing = _shards(sharded_checkpoint)[1]
    (sharded_checkpoint / missing).unlink()
    for loader in (PiscesForConditionalGeneration.from_pretrained, PiscesPipeline.from_pretrained):
        with pytest.raises(CorruptCheckpointError, match=f"missing 1 of the .* shards .*: {missing}"):
            loader(sharded_checkpoint)


def test_a_truncated_shard_is_named(sharded_checkpoint):
    shard = _shards(sharded_checkpoint)[0]
    CORRUPTIONS["half"](sharded_checkpoint / shard)
    with pytest.raises(CorruptCheckpointError, match=f"{shard} .*shorter than its header declares"):
        PiscesForConditionalGeneration.from_pretrained(sharded_checkpoint)


@pytest.mark.parametrize("broken", ["not json", "no weight_map", "wrong shard"])
def test_a_broken_shard_index_is_named(sharded_checkpoint, broken):
    index_file = sharded_checkpoint / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    if broken == "not json":
        index_file.write_text(index_file.read_text()[:50])
        expected = "shard index .*is corrupt"
    elif broken == "no weight_map":
        index_file.write_text(json.dumps({"metadata": index["metadata"]}))
        expected = "shard index .*is corrupt"
    else:
        first, second = _shards(sharded_checkpoint)[:2]
        name = next(key for key, shard in index["weight_map"].items() if shard == first)
        index["weight_map"][name] = second
        index_file.write_text(json.dumps(index))
        expected = "places 1 tensor.* in shards that do not hold them"
    with pytest.raises(CorruptCheckpointError, match=expected):
        PiscesForConditionalGeneration.from_pretrained(sharded_checkpoint)


def test_a_missing_decoder_shard_is_named(checkpoint_copy):
    from diffusers import UNet2DConditionModel

    decoder_folder = checkpoint_copy / "decoder"
    decoder = UNet2DConditionModel.from_pretrained(decoder_folder)
    shutil.rmtree(decoder_folder)
    decoder.save_pretrained(decoder_folder, max_shard_size="1MB")
    index = json.loads((decoder_folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    missing = sorted(set(index["weight_map"].values()))[-1]
    (decoder_folder / missing).unlink()
    with pytest.raises(CorruptCheckpointError, match=f"decoder.*missing 1 of the .* shards .*: {missing}"):
        PiscesPipeline.from_pretrained(checkpoint_copy)


# ---------------------------------------------------------------- configs that do not describe the weights


def _edit_config(folder, edit):
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def test_a_config_without_vision_config_names_it(checkpoint_copy):
    _edit_config(checkpoint_copy, lambda config: config.pop("vision_config"))
    for loader in (AutoModelForImageTextToText.from_pretrained, PiscesPipeline.from_pretrained):
        with pytest.raises(MissingSubConfigError, match="lacks vision_config"):
            loader(checkpoint_copy)


@pytest.mark.parametrize(
    ("sub_config", "field", "expected"),
    [
        ("text_config", "hidden_size", r"leaves out text_config\.hidden_size \(defaulted to 4096\)"),
        ("vision_config", "hidden_size", r"leaves out vision_config\.hidden_size"),
        ("gen_vision_config", "intermediate_size", r"leaves out gen_vision_config\.intermediate_size"),
        ("text_config", "num_hidden_layers", r"partly random.*leaves out text_config\.num_hidden_layers"),
    ],
)
def test_a_sub_config_missing_a_shape_field_names_it(checkpoint_copy, sub_config, field, expected):
    _edit_config(checkpoint_copy, lambda config: config[sub_config].pop(field))
    with pytest.raises(ConfigWeightsMismatchError, match=expected):
        AutoModelForImageTextToText.from_pretrained(checkpoint_copy)


def test_a_changed_shape_field_names_the_tensor(checkpoint_copy):
    _edit_config(checkpoint_copy, lambda config: config["vision_config"].update(image_size=64))
    with pytest.raises(ConfigWeightsMismatchError, match=r"position_embedding\.weight: \(16, 32\) in the weights"):
        PiscesForConditionalGeneration.from_pretrained(checkpoint_copy)


def test_a_missing_token_id_is_named(checkpoint_copy):
    _edit_config(checkpoint_copy, lambda config: config.pop("image_token_id"))
    with pytest.raises(ValueError, match=r"image_token_id=128256 is outside the language model's vocabulary"):
        PiscesForConditionalGeneration.from_pretrained(checkpoint_copy)


@pytest.mark.parametrize("value", [None, "2", 0, 3, True])
def test_a_gen_pool_size_that_makes_no_sense_is_named(checkpoint_copy, value):
    _edit_config(checkpoint_copy, lambda config: config.update(gen_pool_size=value))
    with pytest.raises(ValueError, match=f"gen_pool_size={value}"):
        PiscesForConditionalGeneration.from_pretrained(checkpoint_copy)


def test_an_explicit_ignore_mismatched_sizes_still_loads(checkpoint_copy):
    _edit_config(checkpoint_copy, lambda config: config["vision_config"].update(image_size=64))
    model = PiscesForConditionalGeneration.from_pretrained(checkpoint_copy, ignore_mismatched_sizes=True)
    assert model.config.vision_config.image_size == 64
