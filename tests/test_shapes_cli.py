"""`pisces eval shapes`: every split reported, progress per prompt, and the JSON written whole or not at all."""

import json
from types import SimpleNamespace

import pytest

import pisces.shapes as shapes
import pisces_cli.eval_shapes as eval_shapes
from pisces.shapes.shape_eval import held_out_prompts, prompt_objects, split_prompts
from pisces.shapes.world import render_objects


@pytest.fixture
def drawing_pipeline(monkeypatch):
    """`pisces eval shapes` on a stand-in pipeline that draws each prompt's one picture, and answers every question."""
    known = {p.prompt: p for split in ("v1", "named_colours", "paraphrase") for p in split_prompts(split)}
    known.update({p.prompt: p for p in held_out_prompts()})

    def pipe(prompt, num_images_per_prompt, generator, **kwargs):
        return SimpleNamespace(images=[render_objects(prompt_objects(known[prompt]))] * num_images_per_prompt)

    pipe.set_progress_bar_config = lambda **kwargs: None
    pipe.model = pipe.processor = None
    monkeypatch.setattr(eval_shapes, "_load_pipeline", lambda folder: pipe)

    def understanding(model, processor, num_scenes, progress):
        progress("questions: 1.000 of 3")
        return {"vqa_accuracy": 1.0, "vqa_paraphrased_accuracy": 0.5, "caption_accuracy": 0.25,
                "num_questions": 3, "num_captions": num_scenes}

    monkeypatch.setattr(shapes, "evaluate_understanding", understanding)


def _args(tmp_path, **overrides):
    values = dict(model=str(tmp_path), json=None, images_per_prompt=1, num_scenes=2, steps=2)
    return SimpleNamespace(**{**values, **overrides})


def test_eval_shapes_reports_every_split_and_one_line_per_prompt_off_a_terminal(drawing_pipeline, tmp_path, capsys):
    out = tmp_path / "scores" / "shapes.json"
    eval_shapes.eval_shapes(_args(tmp_path, json=str(out)))
    captured = capsys.readouterr()
    for line in ("v1 (prompts 9ac8c614c336), 42 images", "named colours (prompts 3eedfbedd2b0), 48 images",
                 "paraphrase (prompts a2578fd92a02), 48 images", "same prompts canonical", "paraphrased questions"):
        assert line in captured.out, line
    progress = [line for line in captured.err.splitlines() if line.startswith("[")]
    assert len(progress) == 141 and progress[0].startswith("[1/141] single_object: 'a circle' passed 1")
    assert "questions: 1.000 of 3" in captured.err
    result = json.loads(out.read_text())
    assert result["splits"]["paraphrase"]["canonical"] == 1.0 and result["vqa_paraphrased_accuracy"] == 0.5
    assert sorted(path.name for path in out.parent.iterdir()) == ["shapes.json"]  # no temporary file left


def test_eval_shapes_shows_a_bar_on_a_terminal(capsys):
    progress = eval_shapes.PromptProgress(terminal=True)
    prompt = split_prompts("v1")[0]
    for done in (1, 2, 3):
        progress.prompt_done(done, 3, prompt, 1)
    progress.close()
    err = capsys.readouterr().err
    assert "3/3" in err and "prompt" in err and "[1/3]" not in err


def test_a_json_write_that_fails_leaves_the_old_file(tmp_path):
    from pisces_cli.output_files import write_file_atomically, write_text_atomically

    out = tmp_path / "shapes.json"
    write_text_atomically(out, json.dumps({"overall": 0.5}))
    assert json.loads(out.read_text()) == {"overall": 0.5}

    def fail(file):
        file.write(b'{"overall": ')  # a half-written file, then the run dies
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_file_atomically(out, fail)
    assert json.loads(out.read_text()) == {"overall": 0.5}
    assert [path.name for path in tmp_path.iterdir()] == ["shapes.json"]
