"""`pisces generate --prompts FILE --out DIR`: GenEval's and the flat layout, seeds per (prompt, image), resume, and
two processes writing what one writes."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pisces_cli.commands import main


STEPS = ["--steps", "2"]
GENEVAL_ROWS = [
    {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"},
    {"tag": "two_object", "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1}],
     "exclude": [], "prompt": "a photo of a circle and a square"},
    {"tag": "counting", "include": [{"class": "square", "count": 3}], "exclude": [{"class": "square", "count": 4}],
     "prompt": "a photo of three squares"},
]


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def files(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def read_geneval_folder(folder):
    """What GenEval's evaluator reads: every numbered folder's metadata (one JSON object) and its samples/*.png."""
    entries = []
    for prompt_folder in sorted(p for p in folder.iterdir() if p.is_dir()):
        with open(prompt_folder / "metadata.jsonl") as file:
            metadata = json.load(file)
        samples = sorted((prompt_folder / "samples").glob("*.png"))
        entries.append((prompt_folder.name, metadata, [Image.open(p).convert("RGB") for p in samples]))
    return entries


def test_geneval_metadata_in_geneval_layout_reads_back_as_geneval_reads_it(tiny_checkpoint, tmp_path, capsys):
    prompts = write_lines(tmp_path / "evaluation_metadata.jsonl", [json.dumps(row) for row in GENEVAL_ROWS])
    out = tmp_path / "images"
    argv = ["generate", "--model", str(tiny_checkpoint), "--prompts", str(prompts), "--out", str(out), "--num-images", "2"]
    assert main(argv + STEPS) == 0
    entries = read_geneval_folder(out)
    assert [name for name, _, _ in entries] == ["00000", "00001", "00002"]
    assert [metadata for _, metadata, _ in entries] == GENEVAL_ROWS
    assert all(len(images) == 2 for _, _, images in entries)
    assert sorted(p.name for p in (out / "00001" / "samples").iterdir()) == ["0000.png", "0001.png"]
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("wrote 6 images for 3 prompts (0 skipped as complete)") and "images/s" in summary


def test_flat_layout_names_files_by_id_or_index(tiny_checkpoint, tmp_path):
    plain = write_lines(tmp_path / "prompts.txt", ["a red circle", "", "a blue square"])
    assert main(["generate", "--model", str(tiny_checkpoint), "--prompts", str(plain), "--out", str(tmp_path / "a"),
                 "--layout", "flat"] + STEPS) == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["00000.png", "00001.png"]
    with_ids = write_lines(tmp_path / "dpg.jsonl", [json.dumps({"id": "cat", "prompt": "a red circle"}),
                                                    json.dumps({"id": 7, "prompt": "a blue square"})])
    assert main(["generate", "--model", str(tiny_checkpoint), "--prompts", str(with_ids), "--out", str(tmp_path / "b"),
                 "--layout", "flat", "--num-images", "2"] + STEPS) == 0
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["7_0.png", "7_1.png", "cat_0.png", "cat_1.png"]


def test_images_depend_on_prompt_and_image_index_not_on_the_batch_size(tiny_checkpoint, tmp_path):
    # The same prompt twice: its two lines get different seeds, so different pictures.
    prompts = write_lines(tmp_path / "prompts.txt", ["a red circle", "a red circle", "a blue square", "two squares"])
    runs = {}
    for batch_size in ("1", "3"):
        out = tmp_path / f"batch-{batch_size}"
        assert main(["generate", "--model", str(tiny_checkpoint), "--prompts", str(prompts), "--out", str(out),
                     "--num-images", "2", "--batch-size", batch_size] + STEPS) == 0
        runs[batch_size] = {name: pixels(out / name) for name in files(out) if name.endswith(".png")}
    assert runs["1"].keys() == runs["3"].keys() and len(runs["1"]) == 8
    for name in runs["1"]:
        # Batched matrix products may round differently: at most one uint8 level, on few values.
        difference = np.abs(runs["1"][name] - runs["3"][name])
        assert difference.max() <= 1 and (difference > 0).mean() < 0.01, name
    first, second = runs["1"]["00000/samples/0000.png"], runs["1"]["00001/samples/0000.png"]
    assert np.abs(first - second).max() > 1  # same prompt, other line: another seed
    assert np.abs(runs["1"]["00000/samples/0000.png"] - runs["1"]["00000/samples/0001.png"]).max() > 1


def test_resume_draws_only_what_is_missing_and_ends_as_an_uninterrupted_run(tiny_checkpoint, tmp_path, capsys):
    prompts = write_lines(tmp_path / "prompts.txt", ["a red circle", "a blue square", "a green triangle", "a diamond"])
    argv = ["generate", "--model", str(tiny_checkpoint), "--prompts", str(prompts), "--num-images", "2",
            "--batch-size", "2"] + STEPS
    whole = tmp_path / "whole"
    assert main(argv + ["--out", str(whole)]) == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    (resumed / "00001" / "samples" / "0001.png").unlink()
    shutil.rmtree(resumed / "00003")
    (resumed / "00002" / "samples" / "0000.png").write_bytes(b"\x89PNG\r\n")  # a cut-off file
    untouched = resumed / "00000" / "samples" / "0000.png"
    before = untouched.stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv + ["--out", str(resumed)]) == 2  # a non-empty folder needs --resume or --overwrite
    assert "--resume" in capsys.readouterr().err
    assert main(argv + ["--out", str(resumed), "--resume"]) == 0
    assert "wrote 4 images for 3 prompts (1 skipped as complete)" in capsys.readouterr().out
    assert untouched.stat().st_mtime_ns == before
    assert files(resumed) == files(whole)  # bit for bit: each batch is drawn whole, as the first run drew it
    assert not [p for p in resumed.rglob("*") if p.name.startswith(".")]  # no partial file left
    assert main(argv + ["--out", str(resumed), "--resume"]) == 0
    assert "wrote 0 images for 0 prompts (4 skipped as complete)" in capsys.readouterr().out


def test_two_processes_write_what_one_process_writes(tiny_checkpoint, tmp_path):
    from conftest import CPU_LAUNCH_ENV, accelerate_launch_two_processes

    prompts = write_lines(tmp_path / "prompts.txt", ["a red circle", "a blue square", "a green triangle",
                                                     "a diamond", "two circles"])
    argv = ["generate", "--model", str(tiny_checkpoint), "--prompts", str(prompts), "--num-images", "2",
            "--batch-size", "2"] + STEPS
    # The one-process run under the same environment (one thread per process): thread counts change float sums.
    one = subprocess.run([sys.executable, "-m", "pisces_cli"] + argv + ["--out", str(tmp_path / "one")],
                         env=CPU_LAUNCH_ENV, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    result = subprocess.run(
        accelerate_launch_two_processes() + argv + ["--out", str(tmp_path / "two")],
        env=CPU_LAUNCH_ENV, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote 10 images for 5 prompts") == 1  # one summary, from the main process
    assert files(tmp_path / "two") == files(tmp_path / "one")


@pytest.mark.parametrize(
    "lines, message",
    [
        ([], "holds no prompts"),
        (['{"prompt": "a circle"}', '{"tag": "counting"}'], "line 2 has no \"prompt\" string"),
        (['{"prompt": "a circle"}', "{not json"], "line 2 is not valid JSON"),
        (['{"id": "a", "prompt": "x"}', '{"id": "a", "prompt": "y"}'], "already the id of line 1"),
    ],
)
def test_bad_prompt_files_are_one_line_errors(tiny_checkpoint, tmp_path, capsys, lines, message):
    prompts = write_lines(tmp_path / "prompts.jsonl", lines)
    assert main(["generate", "--prompts", str(prompts), "--out", str(tmp_path / "out")] + STEPS) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_missing_prompt_file_and_mixed_forms_are_refused(tmp_path, capsys):
    assert main(["generate", "--prompts", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "out")]) == 2
    assert "prompt file not found" in capsys.readouterr().err
    prompts = write_lines(tmp_path / "p.txt", ["a circle"])
    assert main(["generate", "a circle", "--prompts", str(prompts), "--out", str(tmp_path / "out")]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["generate", "--prompts", str(prompts)]) == 2
    assert "needs --out" in capsys.readouterr().err
