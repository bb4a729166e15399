import subprocess
import sys


def test_import_pisces_is_light_and_never_imports_training():
    code = (
        "import sys, time, torch, transformers, diffusers\n"
        # What any transformers multimodal model costs to import (model, processor, Auto classes), paid first.
        "from transformers import LlavaForConditionalGeneration, LlavaProcessor, AutoModelForImageTextToText\n"
        "from transformers import AutoProcessor, SiglipImageProcessorPil, pipeline\n"
        # ... and what any diffusers pipeline costs (the pipeline base class, the auto-pipelines, a UNet).
        "from diffusers import DiffusionPipeline, AutoPipelineForText2Image, UNet2DConditionModel, AutoencoderKL\n"
        "start = time.perf_counter()\n"
        "import pisces\n"
        "print(time.perf_counter() - start)\n"
        "assert not any(name.startswith('pisces.training') for name in sys.modules), 'training imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # Pisces' own share: 0.06 s measured here; the bound leaves room for a loaded CI machine.
    assert float(result.stdout.strip().splitlines()[-1]) < 1.0


def test_public_names():
    import pisces

    for name in ["PiscesConfig", "PiscesModel", "PiscesForConditionalGeneration", "PiscesProcessor"]:
        assert hasattr(pisces, name)


def test_distribution_metadata_names_its_license_authors_and_urls():
    from importlib.metadata import metadata
    from pathlib import Path

    meta = metadata("pisces-hf")
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta["Author"] or meta["Author-email"]
    assert any(url.startswith("Paper, https://arxiv.org/abs/2506.10395") for url in meta.get_all("Project-URL"))
    license_text = (Path(__file__).resolve().parents[1] / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
