"""`pisces generate` with several images: each written whole as it is done, resumable, with progress."""

import os
import shutil
import signal
import subprocess
import time

import pytest

import pisces_cli.commands as cli
from pisces_cli.output_files import partial_name, write_file_atomically, write_text_atomically


PISCES = shutil.which("pisces")


def png_is_complete(path) -> bool:
    from PIL import Image

    with Image.open(path) as image:
        image.load()  # decodes every row: a truncated file raises
        return image.size == (32, 32)


def test_an_interrupted_run_leaves_only_complete_images_and_resumes(tiny_checkpoint, tmp_path):
    assert PISCES is not None
    out = tmp_path / "images" / "circle.png"
    num_images = 12
    argv = [PISCES, "generate", "a red circle", "--model", str(tiny_checkpoint), "--steps", "2", "--seed", "4",
            "--num-images", str(num_images), "-o", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 240
    while len(list(out.parent.glob("*.png"))) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)  # no handler runs: whatever is on disk now is what a crash leaves
    process.wait()
    written = sorted(out.parent.glob("*.png"))
    assert 3 <= len(written) < num_images, "the run ended before it could be interrupted"
    assert all(png_is_complete(path) for path in written)
    before = {path.name: path.read_bytes() for path in written}

    result = subprocess.run(argv + ["--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    drawn = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("wrote ")]
    expected = [str(out.with_name(f"circle-{index}.png")) for index in range(num_images)]
    assert drawn == [path for path in expected if os.path.basename(path) not in before]
    assert f"kept the {len(before)} images already written; drawing {num_images - len(before)}" in result.stdout
    assert sorted(path.name for path in out.parent.iterdir()) == sorted(os.path.basename(p) for p in expected)
    assert all(png_is_complete(path) for path in out.parent.iterdir())
    for name, data in before.items():
        assert (out.parent / name).read_bytes() == data  # kept, not redrawn

    # Image i is the image that seed 4 + i draws alone: a resumed run gives the uninterrupted run's images.
    alone = tmp_path / "alone.png"
    index = num_images - 1
    assert cli.main(["generate", "a red circle", "--model", str(tiny_checkpoint), "--steps", "2",
                     "--seed", str(4 + index), "-o", str(alone)]) == 0
    assert alone.read_bytes() == out.with_name(f"circle-{index}.png").read_bytes()


@pytest.mark.parametrize("terminal", [True, False])
def test_several_images_show_a_bar_on_a_terminal_and_lines_otherwise(terminal, tiny_checkpoint, tmp_path, capsys,
                                                                      monkeypatch):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    out = tmp_path / "a.png"
    assert cli.main(["generate", "a", "--model", str(tiny_checkpoint), "--steps", "1", "--num-images", "2",
                     "-o", str(out)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    if terminal:
        assert lines == [f"wrote {tmp_path / 'a-0.png'}", f"wrote {tmp_path / 'a-1.png'}"]
        assert "2/2" in captured.err and "image" in captured.err
    else:
        assert lines == [f"wrote {tmp_path / 'a-0.png'} (1/2)", f"wrote {tmp_path / 'a-1.png'} (2/2)"]
        assert "image/s" not in captured.err and "s/image" not in captured.err and "2/2" not in captured.err


def test_resume_with_every_image_written_loads_nothing(tmp_path, capsys, monkeypatch):
    from PIL import Image

    for index in range(2):
        Image.new("RGB", (8, 8)).save(tmp_path / f"a-{index}.png")
    monkeypatch.setattr(cli, "_load_pipeline", lambda path: pytest.fail("loaded a model with nothing to draw"))
    assert cli.main(["generate", "a", "--num-images", "2", "-o", str(tmp_path / "a.png"), "--resume",
                     "--model", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == "kept the 2 images already written; drawing 0"


def test_a_broken_image_is_drawn_again_on_resume(tmp_path):
    (tmp_path / "a-0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert not cli._is_complete_png(tmp_path / "a-0.png")


def test_a_failed_write_leaves_the_old_file_and_no_partial(tmp_path):
    path = tmp_path / "result.json"
    write_text_atomically(path, '{"score": 1}')

    def fails(file):
        file.write(b'{"sco')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_file_atomically(path, fails)
    assert path.read_text() == '{"score": 1}'
    assert not partial_name(path).exists()
