import subprocess
import sys

import pytest

from pisces.training.cli import main


def test_convert_random_writes_a_loadable_checkpoint(tmp_path, capsys):
    assert main(["convert", "random", "--preset", "tiny", "--out", str(tmp_path / "ckpt"), "--seed", "1"]) == 0
    assert (tmp_path / "ckpt" / "config.json").is_file()
    assert (tmp_path / "ckpt" / "processor_config.json").is_file()
    assert "wrote a random tiny Pisces checkpoint" in capsys.readouterr().out


def test_same_seed_gives_identical_weights(tmp_path):
    for name in ("a", "b"):
        main(["convert", "random", "--out", str(tmp_path / name), "--seed", "3"])
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_meta_prints_the_paper_size_without_allocating(capsys):
    assert main(["convert", "random", "--preset", "pisces-8b", "--meta"]) == 0
    out = capsys.readouterr().out
    total_line = [line for line in out.splitlines() if line.strip().startswith("total")][0]
    millions = float(total_line.split()[1])
    assert 8000 <= millions <= 9500
    assert "GiB in bfloat16" in total_line


def test_describe_prints_an_answer(tiny_checkpoint, tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "red.png"
    Image.new("RGB", (50, 30), (255, 0, 0)).save(image)
    assert main(["describe", str(image), "--model", str(tiny_checkpoint), "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip() != ""


@pytest.mark.parametrize(
    "argv, message",
    [
        (["describe", "missing.png", "--model", "."], "image not found: missing.png"),
        (["convert", "random", "--preset", "tiny"], "--out DIR is required"),
        (["convert", "random", "--preset", "pisces-8b", "--out", "x"], "only the 'tiny' preset"),
    ],
)
def test_user_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pisces: error:") and message.lower() in err.lower()
    assert "\n" not in err


def test_describe_rejects_a_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "red.png"
    Image.new("RGB", (8, 8)).save(image)
    assert main(["describe", str(image), "--model", str(tmp_path)]) == 2
    assert "is not a Pisces checkpoint" in capsys.readouterr().err
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    assert main(["describe", str(not_an_image), "--model", str(tmp_path)]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "pisces.training.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "convert" in result.stdout


def test_describe_rejects_another_models_checkpoint_before_loading_weights(tmp_path, capsys):
    from PIL import Image
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(tmp_path)
    image = tmp_path / "red.png"
    Image.new("RGB", (8, 8)).save(image)
    # No weights in the folder: only the config check can answer.
    assert main(["describe", str(image), "--model", str(tmp_path)]) == 2
    assert "is not a Pisces checkpoint (model_type='llama')" in capsys.readouterr().err
