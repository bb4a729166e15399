"""PiscesPipeline saved and loaded the way every diffusers pipeline is: variants, safe_serialization, optional
components, `DiffusionPipeline.from_pretrained` on a folder, a Hub cache snapshot and a Hub download."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel

from pisces import PiscesPipeline


STEPS = 2
OLD_MODEL_INDEX_LIBRARIES = {"model": "pisces.modeling_pisces", "processor": "pisces.processing.processing_pisces"}


def draw(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    kwargs.setdefault("prompt", "a red circle")
    return pipe(num_inference_steps=STEPS, output_type="np", generator=torch.Generator().manual_seed(0), **kwargs).images


def weight_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin"))


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name


# ---- variants ----


def test_variant_is_written_for_every_component_and_loaded_back(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "ckpt", variant="fp16")
    assert weight_files(tmp_path / "ckpt") == [
        "decoder/diffusion_pytorch_model.fp16.safetensors",
        "model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ]
    loaded = PiscesPipeline.from_pretrained(tmp_path / "ckpt", variant="fp16")
    for name in ("model", "decoder", "vae"):
        assert_same_weights(getattr(pipe, name), getattr(loaded, name))
    assert np.array_equal(draw(loaded), draw(pipe))


def test_the_model_at_the_root_loads_the_variant_asked_for(pipe, tmp_path):
    # Both the default and an "ema" variant at the root: diffusers looks for variants in sub-folders only, and would
    # give the default weights for the model.
    folder = tmp_path / "ckpt"
    pipe.save_pretrained(folder)
    original = pipe.model.gen_head.linear_1.weight.detach().clone()
    with torch.no_grad():
        pipe.model.gen_head.linear_1.weight.add_(1.0)
    pipe.save_pretrained(folder, variant="ema")
    ema = PiscesPipeline.from_pretrained(folder, variant="ema")
    assert bool((ema.model.gen_head.linear_1.weight == pipe.model.gen_head.linear_1.weight).all())
    default = PiscesPipeline.from_pretrained(folder)
    assert bool((default.model.gen_head.linear_1.weight == original).all())


def test_a_missing_variant_is_diffusers_usual_error(tiny_checkpoint):
    with pytest.raises(ValueError, match=r"You are trying to load the model files of the `variant=fp16`"):
        PiscesPipeline.from_pretrained(tiny_checkpoint, variant="fp16")


# ---- safetensors only, whatever the flag ----


def test_safe_serialization_false_is_passed_to_the_components_that_take_it(pipe, tmp_path):
    folder = tmp_path / "ckpt"
    pipe.save_pretrained(folder, safe_serialization=False)
    # The model at the root is written by transformers, which writes safetensors only.
    assert weight_files(folder) == [
        "decoder/diffusion_pytorch_model.bin",
        "model.safetensors",
        "vae/diffusion_pytorch_model.bin",
    ]
    # Loading never unpickles: the pickled decoder is refused, naming the way out.
    with pytest.raises(OSError, match=r"`decoder/` folder .* holds pickled weights only .*safe_serialization=True"):
        PiscesPipeline.from_pretrained(folder)
    # Components a user chose to unpickle, passed in, load with the rest.
    decoder = UNet2DConditionModel.from_pretrained(folder / "decoder", use_safetensors=False)
    vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=False)
    loaded = PiscesPipeline.from_pretrained(folder, decoder=decoder, vae=vae)
    assert np.array_equal(draw(loaded), draw(pipe))


def test_use_safetensors_false_is_refused(tiny_checkpoint):
    with pytest.raises(ValueError, match="safetensors only"):
        PiscesPipeline.from_pretrained(tiny_checkpoint, use_safetensors=False)


# ---- optional components ----


def test_optional_components_left_out_stay_out_through_save_and_load(pipe, tmp_path):
    embeds = pipe.encode_prompt("a red circle")
    decoding = PiscesPipeline.from_pretrained(pipe.name_or_path, model=None, processor=None)
    decoding.save_pretrained(tmp_path / "ckpt")
    index = json.loads((tmp_path / "ckpt" / "model_index.json").read_text())
    assert index["model"] == [None, None] and index["processor"] == [None, None]
    assert not (tmp_path / "ckpt" / "config.json").exists()
    loaded = PiscesPipeline.from_pretrained(tmp_path / "ckpt")
    assert loaded.model is None and loaded.processor is None
    assert np.array_equal(draw(loaded, prompt=None, image_embeds=embeds), draw(pipe))


# ---- DiffusionPipeline.from_pretrained ----


def test_model_index_names_pisces_as_the_components_library(tiny_checkpoint):
    index = json.loads((tiny_checkpoint / "model_index.json").read_text())
    assert index["_class_name"] == "PiscesPipeline"
    assert index["model"] == ["pisces", "PiscesForConditionalGeneration"]
    assert index["processor"] == ["pisces", "PiscesProcessor"]


def test_diffusion_pipeline_loads_a_local_folder(tiny_checkpoint, pipe):
    loaded = DiffusionPipeline.from_pretrained(tiny_checkpoint)
    assert type(loaded) is PiscesPipeline
    assert np.array_equal(draw(loaded), draw(pipe))


def _old_form_copy(tiny_checkpoint, folder: Path) -> Path:
    """The checkpoint as `save_pretrained` wrote it before: components named by their defining modules."""
    shutil.copytree(tiny_checkpoint, folder)
    index = json.loads((folder / "model_index.json").read_text())
    for name, library in OLD_MODEL_INDEX_LIBRARIES.items():
        index[name][0] = library
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_checkpoints_of_the_old_model_index_form_still_load(tiny_checkpoint, pipe, tmp_path):
    old = _old_form_copy(tiny_checkpoint, tmp_path / "old")
    for loader in (PiscesPipeline, DiffusionPipeline):
        loaded = loader.from_pretrained(old)
        assert type(loaded) is PiscesPipeline
        assert np.array_equal(draw(loaded), draw(pipe))
    # Saving again writes the new form.
    loaded.save_pretrained(tmp_path / "resaved")
    index = json.loads((tmp_path / "resaved" / "model_index.json").read_text())
    assert index["model"] == ["pisces", "PiscesForConditionalGeneration"]


def test_the_shipped_reference_checkpoint_loads_through_diffusion_pipeline():
    from pisces.reference_model import reference_model_path

    loaded = DiffusionPipeline.from_pretrained(reference_model_path())
    assert type(loaded) is PiscesPipeline
    images = draw(loaded, prompt="a red circle above a blue square")
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def _hub_cache(tiny_checkpoint, cache_dir: Path, repo_id: str) -> Path:
    """A Hub cache holding a downloaded snapshot of `repo_id`, laid out as huggingface_hub writes it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def test_a_downloaded_hub_snapshot_loads_by_repo_id(tiny_checkpoint, pipe, tmp_path):
    # HF_HUB_OFFLINE=1 (conftest): both loaders find the snapshot in the cache, without `custom_pipeline`.
    _hub_cache(tiny_checkpoint, tmp_path / "hub", "someone/pisces-tiny")
    for loader in (DiffusionPipeline, PiscesPipeline):
        loaded = loader.from_pretrained("someone/pisces-tiny", cache_dir=tmp_path / "hub")
        assert type(loaded) is PiscesPipeline
        assert np.array_equal(draw(loaded), draw(pipe))


class FakeHub:
    """The Hub calls of `DiffusionPipeline.download`, answered from a local folder: the repo's file list, single
    files, and snapshots of the files matching the allow / ignore patterns diffusers computes."""

    def __init__(self, repo_folder: Path, snapshot: Path):
        self.repo_folder, self.snapshot = repo_folder, snapshot
        self.files = sorted(str(p.relative_to(repo_folder)) for p in repo_folder.rglob("*") if p.is_file())

    def _copy(self, name: str) -> str:
        target = self.snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.repo_folder / name, target)
        return str(target)

    def model_info(self, repo_id, **kwargs):
        return SimpleNamespace(siblings=[SimpleNamespace(rfilename=name) for name in self.files])

    def hf_hub_download(self, repo_id, filename, **kwargs):
        return self._copy(filename)

    def snapshot_download(self, repo_id, allow_patterns=None, ignore_patterns=None, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        for name in filter_repo_objects(self.files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            self._copy(name)
        return str(self.snapshot)


def _fake_hub(monkeypatch, repo_folder: Path, snapshot: Path) -> FakeHub:
    from diffusers.pipelines import pipeline_utils

    hub = FakeHub(repo_folder, snapshot)
    for name in ("model_info", "hf_hub_download", "snapshot_download"):
        monkeypatch.setattr(pipeline_utils, name, getattr(hub, name))
    return hub


def test_diffusion_pipeline_downloads_every_file_of_the_one_folder_layout(tiny_checkpoint, pipe, tmp_path, monkeypatch):
    hub = _fake_hub(monkeypatch, Path(tiny_checkpoint), tmp_path / "snapshot")
    loaded = DiffusionPipeline.from_pretrained("someone/pisces-tiny", local_files_only=False)
    assert type(loaded) is PiscesPipeline
    assert np.array_equal(draw(loaded), draw(pipe))
    # The model, the tokenizer, the processor, the chat template and the generation config at the root came too.
    downloaded = sorted(str(p.relative_to(hub.snapshot)) for p in hub.snapshot.rglob("*") if p.is_file())
    assert downloaded == hub.files


def test_the_old_model_index_form_cannot_be_downloaded_by_diffusers(tiny_checkpoint, tmp_path, monkeypatch):
    # Why the form changed: diffusers refuses a component library it does not know when it downloads a repo.
    old = _old_form_copy(tiny_checkpoint, tmp_path / "old")
    _fake_hub(monkeypatch, old, tmp_path / "snapshot")
    with pytest.raises(ValueError, match=r"model/pisces.modeling_pisces.py as defined in `model_index.json` does not exist"):
        DiffusionPipeline.from_pretrained("someone/pisces-tiny", local_files_only=False)


# ---- the checkpoint's own step count ----


def _steps_of_a_call(pipe, **kwargs) -> int:
    seen = []

    def count(pipe, step, timestep, tensors):
        seen.append(step)
        return {}

    pipe.set_progress_bar_config(disable=True)
    pipe("a red circle", output_type="np", callback_on_step_end=count, **kwargs)
    return len(seen)


def test_default_num_inference_steps_is_saved_in_model_index_and_used_when_a_call_gives_none(pipe, tmp_path):
    assert pipe.config.default_num_inference_steps == 25  # a checkpoint that names none
    pipe.register_to_config(default_num_inference_steps=3)
    pipe.save_pretrained(tmp_path / "three")
    assert json.loads((tmp_path / "three" / "model_index.json").read_text())["default_num_inference_steps"] == 3
    for loader in (PiscesPipeline, DiffusionPipeline):
        loaded = loader.from_pretrained(tmp_path / "three")
        assert loaded.config.default_num_inference_steps == 3
        assert _steps_of_a_call(loaded) == 3
        assert _steps_of_a_call(loaded, num_inference_steps=2) == 2
    with pytest.raises(ValueError, match="default_num_inference_steps"):
        PiscesPipeline(pipe.model, pipe.processor, pipe.decoder, pipe.scheduler, pipe.vae, default_num_inference_steps=0)
