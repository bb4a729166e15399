"""The `pisces` entry point itself: --version, --help, errors without tracebacks, and no torch for the parser."""

import argparse
import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version

import pytest

import pisces_cli.commands as cli


PISCES = shutil.which("pisces")
ENV = dict(os.environ, HF_HUB_OFFLINE="1")


def run_pisces(*argv, env=ENV, timeout=300):
    assert PISCES is not None, "the `pisces` console script is not installed in this environment"
    return subprocess.run([PISCES, *argv], capture_output=True, text=True, env=env, timeout=timeout)


def imported_modules(stderr: str) -> set[str]:
    """The modules `PYTHONPROFILEIMPORTTIME=1` reported as imported (its lines end in `| module.name`)."""
    return {
        line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:") and "|" in line
    }


def test_version_is_the_installed_distributions():
    result = run_pisces("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"pisces {version('pisces-hf')}"


@pytest.mark.parametrize(
    "argv, returncode, expected",
    [
        (["--help"], 0, "train-decoder"),
        (["generate", "--help"], 0, "(default: the checkpoint's own"),
        (["generate"], 2, "the following arguments are required: prompt"),
        (["convert", "random", "--preset", "huge"], 2, "invalid choice: 'huge'"),
        (["generate", "a cat", "-o", "cat.jpg"], 2, "pisces: error: -o/--output must name a .png file"),
    ],
)
def test_help_and_argument_errors_load_no_torch(argv, returncode, expected):
    result = run_pisces(*argv, env=dict(ENV, PYTHONPROFILEIMPORTTIME="1"))
    assert result.returncode == returncode, result.stderr[-2000:]
    assert expected in " ".join((result.stdout + result.stderr).split())
    modules = imported_modules(result.stderr)
    assert "pisces_cli.commands" in modules  # the report covers the command's own imports
    assert not {"torch", "transformers", "diffusers", "pisces"} & {name.split(".")[0] for name in modules}


def _sub_parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _sub_parsers(sub)


def test_every_options_help_shows_its_default():
    parsers = list(_sub_parsers(cli.build_parser())) + [cli.build_reference_parser()]
    assert len(parsers) == 11
    checked = 0
    for parser in parsers:
        help_text = " ".join(parser.format_help().split())
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.default is argparse.SUPPRESS or action.required:
                continue
            entry = " ".join(formatter._expand_help(action).split())
            assert "default" in entry, (parser.prog, action.option_strings, entry)
            assert entry in help_text
            checked += 1
    assert checked > 60
    args = cli.build_parser().parse_args(["generate", "x"])
    assert "(default: the checkpoint's own" in " ".join(
        cli.build_parser()._subparsers._group_actions[0].choices["generate"].format_help().split()
    )
    assert args.steps is None and args.resume is False


def test_parser_choices_match_the_layers_they_name():
    from pisces.conversion import DECODER_PRESETS, PRESETS
    from pisces.training.reference import RECIPES

    assert cli.CHECKPOINT_PRESETS == tuple(PRESETS)
    assert cli.DECODER_PRESET_NAMES == tuple(DECODER_PRESETS)
    assert cli.REFERENCE_RECIPES == tuple(RECIPES)


def test_a_bug_keeps_its_traceback():
    code = (
        "import sys\nimport pisces_cli.commands as cli\n"
        "def broken(args):\n    raise RuntimeError('a bug, not a user mistake')\n"
        "cli.describe = broken\nsys.exit(cli.main(['describe', 'x.png']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "RuntimeError: a bug, not a user mistake" in result.stderr
    assert "pisces: error" not in result.stderr


def test_an_interrupt_is_one_line(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "describe", interrupted)
    assert cli.main(["describe", "x.png"]) == 130
    assert capsys.readouterr().err == "pisces: interrupted\n"


def test_multi_line_library_messages_print_on_one_line(monkeypatch, capsys):
    def fails(args):
        raise cli.CommandError("no weights in model/:\n  config.json\n  tokenizer.json")

    monkeypatch.setattr(cli, "describe", fails)
    assert cli.main(["describe", "x.png"]) == 2
    assert capsys.readouterr().err == "pisces: error: no weights in model/: config.json tokenizer.json\n"


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    err = result.stderr.strip().splitlines()[-1]  # after the loading bars, one line
    assert err.startswith("pisces: error: "), err
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture
def red_image(tmp_path):
    from PIL import Image

    path = tmp_path / "red.png"
    Image.new("RGB", (16, 16), (255, 0, 0)).save(path)
    return path


@pytest.mark.parametrize("field, command", [("text_config", "describe"), ("vision_config", "generate")])
def test_a_config_missing_a_sub_config_names_it(field, command, tiny_checkpoint, red_image, tmp_path):
    broken = tmp_path / f"no_{field}"
    shutil.copytree(tiny_checkpoint, broken)
    config = json.loads((broken / "config.json").read_text())
    del config[field]
    (broken / "config.json").write_text(json.dumps(config))
    argv = [str(red_image)] if command == "describe" else ["a red circle", "-o", str(tmp_path / "x.png")]
    result = run_pisces(command, *argv, "--model", str(broken))
    assert_one_line_error(result, f"could not load a Pisces", f"lacks {field}")
    assert not (tmp_path / "x.png").exists()


def test_describe_input_mistakes_are_one_line(tiny_checkpoint, red_image, tmp_path):
    result = run_pisces("describe", str(tmp_path / "missing.png"), "--model", str(tiny_checkpoint))
    assert_one_line_error(result, f"image not found: {tmp_path / 'missing.png'}")
    for prompt in ("", "   \n"):
        result = run_pisces("describe", str(red_image), "--prompt", prompt, "--model", str(tiny_checkpoint))
        assert_one_line_error(result, "--prompt is empty")
