import shutil
import subprocess
import sys

import pytest

from pisces_cli.commands import main


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
    result = subprocess.run([sys.executable, "-m", "pisces_cli", "--help"], capture_output=True, text=True)
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


def test_generate_writes_pngs_reproducibly(tiny_checkpoint, tmp_path, capsys):
    from PIL import Image

    args = ["generate", "a red circle", "--model", str(tiny_checkpoint), "--steps", "2", "--seed", "5"]
    assert main(args + ["-o", str(tmp_path / "a.png")]) == 0
    assert main(args + ["-o", str(tmp_path / "b.png")]) == 0
    assert f"wrote {tmp_path / 'a.png'}" in capsys.readouterr().out
    assert Image.open(tmp_path / "a.png").size == (32, 32)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()

    assert main(args + ["-o", str(tmp_path / "many" / "c.png"), "--num-images", "2", "--guidance", "1.5"]) == 0
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == ["c-0.png", "c-1.png"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--num-images", "0"], "--num-images must be at least 1"),
        (["--guidance", "0.5"], "--guidance must be at least 1"),
        (["-o", "out.jpg"], "must name a .png file"),
    ],
)
def test_generate_rejects_bad_arguments(tiny_checkpoint, extra, message, capsys):
    assert main(["generate", "a", "--model", str(tiny_checkpoint)] + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pisces: error:") and message in err and "\n" not in err


def test_generate_rejects_missing_and_foreign_folders(tiny_checkpoint, tmp_path, capsys):
    assert main(["generate", "a", "--model", str(tmp_path / "nope")]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert main(["generate", "a", "--model", str(tmp_path)]) == 2
    assert "is not a Pisces pipeline checkpoint: it has no model_index.json" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    shutil.rmtree(broken / "decoder")
    assert main(["generate", "a", "--model", str(broken), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no `decoder/` folder" in err and "\n" not in err
    assert not (tmp_path / "x.png").exists()
