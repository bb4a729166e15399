"""The `pisces` command and the reference model: the default `--model`, and `pisces train reference`."""

from pathlib import Path

import pytest

import pisces.reference_model as reference_model
import pisces.training.reference as reference
from pisces_cli.commands import main


@pytest.fixture
def shipped_reference(tiny_checkpoint, monkeypatch):
    """The tiny random checkpoint stands in for the reference model shipped inside the package."""
    monkeypatch.setattr(reference_model, "REFERENCE_CHECKPOINT", Path(tiny_checkpoint))
    return Path(tiny_checkpoint)


@pytest.fixture
def no_reference(tmp_path, monkeypatch):
    """An install whose reference model folder is empty."""
    empty = tmp_path / "reference_checkpoint"
    empty.mkdir()
    monkeypatch.setattr(reference_model, "REFERENCE_CHECKPOINT", empty)
    return empty


def test_reference_names_are_exported():
    import pisces.training

    assert pisces.training.train_reference is reference.train_reference
    assert reference.TRAINING_LOG == reference_model.TRAINING_LOG  # the recipe writes the record the model ships


def test_generate_defaults_to_the_reference_model(shipped_reference, tmp_path, capsys):
    from PIL import Image

    assert reference_model.reference_model_path() == shipped_reference
    out = tmp_path / "out.png"
    assert main(["generate", "a red circle above a blue square", "--steps", "2", "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert Image.open(out).size == (32, 32)

    # The same picture as naming the folder.
    named = tmp_path / "named.png"
    assert main(["generate", "a red circle above a blue square", "--steps", "2", "-o", str(named),
                 "--model", str(shipped_reference)]) == 0
    assert out.read_bytes() == named.read_bytes()


def test_describe_defaults_to_the_reference_model(shipped_reference, tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "red.png"
    Image.new("RGB", (16, 16), (255, 0, 0)).save(image)
    assert main(["describe", str(image), "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.strip() != ""


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "a red circle"],
        ["describe", "IMAGE"],
        ["eval", "shapes"],
    ],
)
def test_a_missing_reference_model_is_a_one_line_error(argv, no_reference, tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "red.png"
    Image.new("RGB", (8, 8)).save(image)
    argv = [str(image) if arg == "IMAGE" else arg for arg in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pisces: error: no --model given:") and "\n" not in err
    assert "reference model is missing" in err and "pisces train reference --out DIR" in err and "--model DIR" in err


def test_help_names_the_default_model(capsys):
    for argv in (["generate", "--help"], ["describe", "--help"], ["eval", "shapes", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
        help_text = " ".join(capsys.readouterr().out.split())
        assert "default: the reference model" in help_text


def test_describe_prompt_default_is_unchanged():
    from pisces_cli.commands import build_parser

    args = build_parser().parse_args(["describe", "x.png"])
    assert args.prompt == "Describe the image." and args.model is None


def test_train_reference_requires_out(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "reference"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: pisces train reference" in err
    assert "the following arguments are required: --out" in err


def test_train_reference_rejects_an_unknown_recipe(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "reference", "--out", "x", "--recipe", "nope"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, seed, recipe",
    [([], 0, "joint"), (["--seed", "7", "--recipe", "generation-only"], 7, "generation-only")],
)
def test_train_reference_calls_train_reference(extra, seed, recipe, tmp_path, monkeypatch, capsys):
    calls = []

    def fake_train_reference(out_dir, seed=0, recipe="joint", budget=None, components_from=None, log=print):
        assert budget is reference.REFERENCE_BUDGET
        calls.append((out_dir, seed, recipe))
        return Path(out_dir)

    monkeypatch.setattr(reference, "train_reference", fake_train_reference)
    out = tmp_path / "run"
    assert main(["train", "reference", "--out", str(out)] + extra) == 0
    assert calls == [(out, seed, recipe)]
    assert f"wrote the reference model ({recipe}, seed {seed}) to {out}" in capsys.readouterr().out


def test_train_reference_refusals_are_one_line(tmp_path, monkeypatch, capsys):
    def refuses(out_dir, seed=0, recipe="joint", budget=None, components_from=None, log=print):
        raise FileExistsError(f"{out_dir} is not empty and holds no partial run of the {recipe} recipe")

    monkeypatch.setattr(reference, "train_reference", refuses)
    assert main(["train", "reference", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"pisces: error: {tmp_path} is not empty and holds no partial run of the joint recipe"


def test_components_from_reaches_the_recipe_and_must_be_a_pipeline_folder(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_train_reference(out_dir, seed=0, recipe="joint", budget=None, components_from=None, log=print):
        calls.append((components_from, budget))
        return Path(out_dir)

    monkeypatch.setattr(reference, "train_reference", fake_train_reference)
    donor = tmp_path / "donor"
    donor.mkdir()
    assert main(["train", "reference", "--out", str(tmp_path / "a"), "--components-from", str(donor)]) == 2
    assert "is not a pipeline folder" in capsys.readouterr().err
    (donor / "model_index.json").write_text("{}")
    argv = ["train", "reference", "--out", str(tmp_path / "b"), "--components-from", str(donor), "--budget", "wording"]
    assert main(argv) == 0
    assert calls == [(str(donor), reference.WORDING_BUDGET)]


def test_cli_budgets_are_the_recipes_budgets():
    from pisces_cli.commands import REFERENCE_BUDGETS

    assert REFERENCE_BUDGETS == tuple(reference.BUDGETS)


def test_train_with_model_and_data_still_parses(monkeypatch):
    import pisces_cli.commands as cli

    seen = []
    monkeypatch.setattr(cli, "train", seen.append)  # `build_parser` binds the command when `main` calls it
    argv = ["train", "--model", "reference", "--data", "d", "--out", "o", "--stage", "align", "--",
            "--warmup_steps", "5"]
    assert main(argv) == 0
    (args,) = seen
    assert (args.model, args.data, args.out, args.stage) == ("reference", "d", "o", "align")
    assert args.trainer_args == ["--warmup_steps", "5"]


def test_train_help_mentions_train_reference(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    assert "pisces train reference" in " ".join(capsys.readouterr().out.split())
