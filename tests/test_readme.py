"""The README tells the truth: its demo picture is a picture of the shapes world, the answer it prints is what the
command prints, and every file it points to is in the repository."""

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image


ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DEMO = "examples/red_circle_above_blue_square.png"


def test_demo_picture_is_the_worlds_own_render():
    from pisces.shapes import generation_objects, render_objects

    expected = render_objects(generation_objects([("red", "circle"), ("blue", "square")], "above"))
    np.testing.assert_array_equal(np.asarray(Image.open(ROOT / DEMO).convert("RGB")), np.asarray(expected))


def test_readme_prints_what_describe_prints():
    match = re.search(rf"`pisces describe {re.escape(DEMO)}`[^`]*?```\n(.*?)\n```", README, re.S)
    assert match, "the README shows no answer of `pisces describe` on the demo picture"
    pisces = shutil.which("pisces")
    assert pisces, "the `pisces` command is not installed"
    answer = subprocess.run([pisces, "describe", str(ROOT / DEMO)], capture_output=True, text=True, check=True).stdout
    assert answer.strip() == match.group(1).strip()


def test_readme_links_only_files_of_the_repository():
    targets = re.findall(r'src="([^"]+)"', README) + re.findall(r"\]\(([^)]+)\)", README)
    local = [target for target in targets if not re.match(r"[a-z]+://", target)]
    assert local, "expected the README to show the reference model's pictures"
    missing = [target for target in local if not (ROOT / target.split("#")[0]).exists()]
    assert not missing, f"the README points to files that are not in the repository: {missing}"
    assert not re.search(r"\bissues? \d+", README, re.I), "the README speaks of the project alone, not of its issues"
    assert "DESIGN.md" not in README


def test_readme_use_snippets_run_as_written(tmp_path):
    """The Python blocks of the README's "Use" section, in order, in one namespace, on `pisces-tiny` as the README
    makes it: nothing elided, every name defined."""
    import sys

    section = README[README.index("## Use\n"): README.index("**Start from public checkpoints.**")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) >= 2 and not any("..." in block for block in blocks)
    pisces = shutil.which("pisces")
    subprocess.run([pisces, "convert", "random", "--preset", "tiny", "--out", "pisces-tiny"], cwd=tmp_path,
                   check=True, capture_output=True)
    script = tmp_path / "readme_use.py"
    script.write_text("\n".join(blocks) + "\nprint('snippets ok', float(out.loss))\n")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "snippets ok" in result.stdout
