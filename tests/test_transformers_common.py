"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`) run against Pisces.

The mixins ship in the source distribution of transformers, not in its wheel. They are fetched for the installed
version at test time and never committed:

    python tests/fetch_transformers_tests.py /tmp/transformers-tests
    PISCES_TRANSFORMERS_TESTS=/tmp/transformers-tests python -m pytest tests/test_transformers_common.py

(`.ci/run` does both, on every transformers version it tests.) Without `PISCES_TRANSFORMERS_TESTS` this module is
skipped, so the ordinary suite needs no network. With it set, a folder that is missing, broken or fetched for another
transformers version is an error, never a skip.

The tester mirrors transformers' `LlavaVisionText2TextModelTester`: tiny sub-configs (Llama text model, SigLIP vision
without its pooling head for understanding, CLIP vision for generation), and every row of every batch takes all three
paths through the model: `<image>` placeholders filled from `pixel_values`, plain text, and a `<boi> <gen>*m <eoi>`
segment filled from `gen_pixel_values`.
"""

import importlib.util
import inspect
import os
import sys
import types
import unittest
from pathlib import Path
from unittest import mock

import pytest


TESTS_DIR_VARIABLE = "PISCES_TRANSFORMERS_TESTS"
# The package name the sdist's tests/ folder is imported under (its mixins import their siblings relatively).
SDIST_PACKAGE = "transformers_sdist_tests"

if not os.environ.get(TESTS_DIR_VARIABLE):
    pytest.skip(
        f"transformers' common tests are not provided: set {TESTS_DIR_VARIABLE} to a folder made by "
        "`python tests/fetch_transformers_tests.py DIR` (.ci/run does)",
        allow_module_level=True,
    )

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.models.auto import modeling_auto  # noqa: E402

from pisces import PiscesConfig, PiscesForConditionalGeneration, PiscesModel  # noqa: E402


# Sibling modules the mixins import that the sdist does not ship (they live only in the transformers repository).
# Each stand-in provides the one name imported, and none of them adds or removes a test of ModelTesterMixin itself.
_MISSING_SIBLINGS = {
    # `ModelTesterMixin(ExportTesterMixin)`: the torch.export / ONNX / ExecuTorch test suite is a separate mixin in
    # tests/exporters/; without its module, ModelTesterMixin runs with an empty base.
    "exporters.test_export": {"ExportTesterMixin": type("ExportTesterMixin", (), {})},
    # Only `test_generation_tester_mixin_inheritance` reads it (an issubclass check); skipped below with its reason.
    "generation.test_utils": {"GenerationTesterMixin": type("GenerationTesterMixin", (), {})},
    # Read only by `ConfigTester.check_config_arguments_init`, which returns before reading it for configs with
    # sub-configs, as PiscesConfig has.
    "utils.test_configuration_utils": {"config_common_kwargs": {}},
}


def _import_sdist_tests(tests_dir: Path):
    """Imports the sdist's `test_modeling_common` and `test_configuration_common` from `tests_dir`."""
    version_file = tests_dir / "TRANSFORMERS_VERSION"
    if not version_file.is_file():
        raise FileNotFoundError(
            f"{TESTS_DIR_VARIABLE}={tests_dir} is not a folder made by tests/fetch_transformers_tests.py "
            f"(no {version_file.name}); run `python tests/fetch_transformers_tests.py DIR` and point it there."
        )
    fetched = version_file.read_text().strip()
    if fetched != transformers.__version__:
        raise RuntimeError(
            f"{tests_dir} holds the common tests of transformers {fetched}, but {transformers.__version__} is "
            "installed; fetch them again for the installed version."
        )
    if SDIST_PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            SDIST_PACKAGE, tests_dir / "__init__.py", submodule_search_locations=[str(tests_dir)]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules[SDIST_PACKAGE] = package
        spec.loader.exec_module(package)
        for dotted, names in _MISSING_SIBLINGS.items():
            if (tests_dir / (dotted.replace(".", "/") + ".py")).is_file():
                continue  # a later sdist that ships the real module gets it
            parent_name, _, leaf = f"{SDIST_PACKAGE}.{dotted}".rpartition(".")
            parent = sys.modules.setdefault(parent_name, types.ModuleType(parent_name))
            parent.__path__ = []
            module = types.ModuleType(f"{parent_name}.{leaf}")
            module.__dict__.update(names)
            sys.modules[module.__name__] = module
    modeling_common = importlib.import_module(f"{SDIST_PACKAGE}.test_modeling_common")
    configuration_common = importlib.import_module(f"{SDIST_PACKAGE}.test_configuration_common")
    return modeling_common, configuration_common


_modeling_common, _configuration_common = _import_sdist_tests(Path(os.environ[TESTS_DIR_VARIABLE]).resolve())
ModelTesterMixin = _modeling_common.ModelTesterMixin
floats_tensor = _modeling_common.floats_tensor
ids_tensor = _modeling_common.ids_tensor
ConfigTester = _configuration_common.ConfigTester
torch_device = _modeling_common.torch_device

# transformers 5.24's gradient-checkpointing check leaves parameters the model freezes on purpose frozen; older mixins
# (5.17) unfreeze every parameter and then want a gradient on each.
_CHECKPOINTING_CHECK_KEEPS_FROZEN_PARAMETERS = "intentionally_frozen" in inspect.getsource(
    ModelTesterMixin.check_training_gradient_checkpointing
)
_FROZEN_GEN_ENCODER = (
    "this transformers' check unfreezes every parameter and wants a gradient on each, but the generation targets are "
    "constants computed without a graph, so the (frozen by design) generation encoder gets none; later mixins exempt "
    "parameters a model freezes on purpose"
)


@pytest.fixture(autouse=True, scope="module")
def pisces_in_the_model_name_tables():
    """
    The mixin tells a base model from a model with a head by transformers' static name tables of in-library models
    (`MODEL_MAPPING_NAMES`, `MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES`: e.g. it adds `labels` and expects a `loss`
    only for the latter). `import pisces` registers the same two classes with `AutoModel` and
    `AutoModelForImageTextToText`; this enters them in the static tables too, for this module only.
    """
    with (
        mock.patch.dict(modeling_auto.MODEL_MAPPING_NAMES, {"pisces": "PiscesModel"}),
        mock.patch.dict(
            modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, {"pisces": "PiscesForConditionalGeneration"}
        ),
    ):
        yield


class PiscesModelTester:
    """
    Tiny Pisces configs and inputs for the common tests. Every row reads

        text(2) <image>*n text(3) <boi> <gen>*m <eoi> text(2)

    with one understanding image (`pixel_values`) and one generation image (`gen_pixel_values`) per row, so that
    slicing a batch by rows (as `test_batching_equivalence` does) keeps images and placeholders together. The text
    at both ends is what the mixin overwrites: padding masks the first or last two positions, and
    `test_resize_tokens_embeddings` writes a new token id at position -2.
    """

    def __init__(
        self,
        parent,
        # 7: `test_eager_matches_sdpa_inference` fills a smaller batch up to 7 rows with random token ids, which would
        # break the placeholder counts.
        batch_size=7,
        is_training=True,
        image_token_id=3,
        boi_token_id=4,
        eoi_token_id=5,
        gen_token_id=6,
        gen_pool_size=2,
        projector_hidden_act="gelu",
        text_config=None,
        vision_config=None,
        gen_vision_config=None,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.is_training = is_training
        # Below 20: ConfigTester reloads the config with a 20-token vocabulary.
        self.image_token_id = image_token_id
        self.boi_token_id = boi_token_id
        self.eoi_token_id = eoi_token_id
        self.gen_token_id = gen_token_id
        self.first_text_token_id = max(image_token_id, boi_token_id, eoi_token_id, gen_token_id) + 1
        self.gen_pool_size = gen_pool_size
        self.projector_hidden_act = projector_hidden_act
        self.text_config = text_config or {
            "model_type": "llama",
            "vocab_size": 99,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "hidden_act": "silu",
            "max_position_embeddings": 512,
            "initializer_range": 0.02,
            "pad_token_id": 1,
            "bos_token_id": 0,
            "eos_token_id": 2,
        }
        # 8 px, 4 px patches: a 2 x 2 grid, 4 understanding tokens per image.
        self.vision_config = vision_config or {
            "model_type": "siglip_vision_model",
            "image_size": 8,
            "patch_size": 4,
            "num_channels": 3,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "initializer_range": 0.02,
            "vision_use_head": False,
        }
        # 8 px, 2 px patches: a 4 x 4 grid pooled 2 x 2 into 4 generation tokens; a width of its own (24), so that a
        # mix-up of the two encoders' widths fails.
        self.gen_vision_config = gen_vision_config or {
            "model_type": "clip_vision_model",
            "image_size": 8,
            "patch_size": 2,
            "num_channels": 3,
            "hidden_size": 24,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "projection_dim": 24,
            "initializer_range": 0.02,
        }

        self.vocab_size = self.text_config["vocab_size"]
        self.hidden_size = self.text_config["hidden_size"]
        self.num_hidden_layers = self.text_config["num_hidden_layers"]
        self.num_attention_heads = self.text_config["num_attention_heads"]
        self.pad_token_id = self.text_config["pad_token_id"]
        self.num_image_tokens = (self.vision_config["image_size"] // self.vision_config["patch_size"]) ** 2
        gen_grid = self.gen_vision_config["image_size"] // self.gen_vision_config["patch_size"]
        self.num_gen_tokens = (gen_grid // gen_pool_size) ** 2
        self.text_before_image, self.text_after_image, self.text_after_gen = 2, 3, 2
        self.seq_length = (
            self.text_before_image + self.num_image_tokens + self.text_after_image
            + 1 + self.num_gen_tokens + 1 + self.text_after_gen
        )
        self.encoder_seq_length = self.seq_length

    def get_config(self):
        return PiscesConfig(
            text_config=self.text_config,
            vision_config=self.vision_config,
            gen_vision_config=self.gen_vision_config,
            gen_pool_size=self.gen_pool_size,
            projector_hidden_act=self.projector_hidden_act,
            image_token_id=self.image_token_id,
            boi_token_id=self.boi_token_id,
            eoi_token_id=self.eoi_token_id,
            gen_token_id=self.gen_token_id,
        )

    def _text_ids(self, length):
        """Random ordinary tokens: never a special Pisces token, so the placeholder counts stay exact."""
        return ids_tensor([self.batch_size, length], self.vocab_size - self.first_text_token_id) + self.first_text_token_id

    def prepare_config_and_inputs(self):
        config = self.get_config()
        side = self.vision_config["image_size"]
        pixel_values = floats_tensor([self.batch_size, self.vision_config["num_channels"], side, side])
        gen_side = self.gen_vision_config["image_size"]
        gen_pixel_values = floats_tensor([self.batch_size, self.gen_vision_config["num_channels"], gen_side, gen_side])
        return config, pixel_values, gen_pixel_values

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, gen_pixel_values = self.prepare_config_and_inputs()

        def placeholders(token_id, count):
            return torch.full((self.batch_size, count), token_id, dtype=torch.long, device=torch_device)

        input_ids = torch.cat(
            [
                self._text_ids(self.text_before_image),
                placeholders(self.image_token_id, self.num_image_tokens),
                self._text_ids(self.text_after_image),
                placeholders(self.boi_token_id, 1),
                placeholders(self.gen_token_id, self.num_gen_tokens),
                placeholders(self.eoi_token_id, 1),
                self._text_ids(self.text_after_gen),
            ],
            dim=1,
        )
        inputs_dict = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": pixel_values,
            "gen_pixel_values": gen_pixel_values,
        }
        return config, inputs_dict


class PiscesModelTest(ModelTesterMixin, unittest.TestCase):
    """transformers' `ModelTesterMixin` on `PiscesModel` and `PiscesForConditionalGeneration`."""

    all_model_classes = (PiscesModel, PiscesForConditionalGeneration)
    # Tests that feed the model its main input only add these, so that they still take the image and generation paths.
    additional_model_inputs = ["pixel_values", "gen_pixel_values"]
    _is_composite = True

    def setUp(self):
        self.model_tester = PiscesModelTester(self)
        self.config_tester = ConfigTester(
            self,
            config_class=PiscesConfig,
            has_text_modality=False,
            common_properties=["image_token_id", "boi_token_id", "eoi_token_id", "gen_token_id", "gen_pool_size"],
        )

    def test_config(self):
        # Every check of `run_common_tests`; the composite one runs in `test_config_sub_configs`.
        with mock.patch.object(
            self.config_tester, "create_and_test_config_from_and_save_pretrained_composite", lambda: None
        ):
            self.config_tester.run_common_tests()

    def test_config_sub_configs(self):
        # ConfigTester's composite check: each sub-config loads alone, with its own class, from the composite
        # config.json. Not for `gen_vision_config`: a sub-config class finds its entry by its `base_config_key`, and
        # CLIPVisionConfig's is "vision_config", which in Pisces holds the understanding encoder (SigLIP); no vision
        # config class reads the second vision sub-config on its own. `text_config` and `vision_config` are checked.
        checked = {key: value for key, value in PiscesConfig.sub_configs.items() if key != "gen_vision_config"}
        with mock.patch.object(PiscesConfig, "sub_configs", checked):
            self.config_tester.create_and_test_config_from_and_save_pretrained_composite()

    def _image_features_prepare_config_and_inputs(self):
        # The mixin picks every input whose name holds "pixel"; `gen_pixel_values` belong to the generation encoder,
        # not to `get_image_features` (the understanding side).
        config, inputs_dict = super()._image_features_prepare_config_and_inputs()
        inputs_dict.pop("gen_pixel_values", None)
        return config, inputs_dict

    @unittest.skipUnless(_CHECKPOINTING_CHECK_KEEPS_FROZEN_PARAMETERS, _FROZEN_GEN_ENCODER)
    def test_training_gradient_checkpointing(self):
        super().test_training_gradient_checkpointing()

    @unittest.skipUnless(_CHECKPOINTING_CHECK_KEEPS_FROZEN_PARAMETERS, _FROZEN_GEN_ENCODER)
    def test_training_gradient_checkpointing_use_reentrant_false(self):
        super().test_training_gradient_checkpointing_use_reentrant_false()

    @unittest.skipUnless(_CHECKPOINTING_CHECK_KEEPS_FROZEN_PARAMETERS, _FROZEN_GEN_ENCODER)
    def test_training_gradient_checkpointing_use_reentrant_true(self):
        super().test_training_gradient_checkpointing_use_reentrant_true()

    @unittest.skip(
        reason="transformers re-initializes missing weights of a model defined outside the library by its custom-code "
        "path (PreTrainedModel.is_custom_code, passed down to the SigLIP/CLIP towers), which differs from their own "
        "init; a bare subclass of LlavaForConditionalGeneration outside transformers fails this test the same way"
    )
    def test_can_init_all_missing_weights(self):
        pass

    @unittest.skip(
        reason="GenerationTesterMixin lives in the transformers repository's tests/generation/, which the sdist does "
        "not ship; generate() is covered by tests/test_modeling.py"
    )
    def test_generation_tester_mixin_inheritance(self):
        pass
