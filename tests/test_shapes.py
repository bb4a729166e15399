"""The shapes world and ShapeEval's detector and scoring."""

from collections import Counter

import numpy as np
import pytest
from PIL import ImageFilter

from pisces.shapes.shape_eval import (
    CATEGORIES,
    EvalPrompt,
    detect_objects,
    held_out_prompts,
    named_colour_prompts,
    paraphrase_prompts,
    prompts_fingerprint,
    render_prompt,
    score,
    shapeeval_prompts,
    summarize,
)
from pisces.shapes.world import (
    COLOURS,
    DEFAULT_COLOURS,
    GENERATION_SIZE,
    LIST_CELLS,
    HELD_OUT_PAIRS,
    NUMBERS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    binding_questions,
    detailed_caption,
    generation_objects,
    is_held_out,
    questions,
    render_objects,
    sample_generation,
    sample_scene,
    short_caption,
)


def test_scenes_are_deterministic_by_seed():
    first, again, other = sample_scene(7), sample_scene(7), sample_scene(8)
    assert first.objects == again.objects and first.render().tobytes() == again.render().tobytes()
    assert short_caption(first) == short_caption(again) and first.qa == again.qa
    assert first.objects != other.objects


def test_the_world_covers_its_vocabulary_and_keeps_held_out_pairs_out_of_training():
    scenes = [sample_scene(seed) for seed in range(400)]
    objects = [obj for scene in scenes for obj in scene.objects]
    assert {o.shape for o in objects} == set(SHAPES) and {o.colour for o in objects} == set(COLOURS)
    assert {o.size for o in objects} == set(SIZES)
    assert {(o.row, o.col) for o in objects} == {(r, c) for r in range(3) for c in range(3)}
    assert Counter(len(s.objects) for s in scenes).keys() == {1, 2, 3, 4}
    assert not any(is_held_out(o) for o in objects)
    held_out = [sample_scene(seed, "held_out") for seed in range(100)]
    assert all(any(is_held_out(o) for o in scene.objects) for scene in held_out)
    assert {(o.colour, o.shape) for s in held_out for o in s.objects if is_held_out(o)} == set(HELD_OUT_PAIRS)


def test_captions_and_answers_describe_the_scene():
    for seed in range(50):
        scene = sample_scene(seed)
        text = detailed_caption(scene)
        assert text.startswith(f"There {'is' if len(scene.objects) == 1 else 'are'} {NUMBERS[len(scene.objects)]}")
        for obj in scene.objects:
            assert f"{obj.size} {obj.colour} {obj.shape} at the {obj.position}." in text
        answers = dict(scene.qa)
        assert answers["How many shapes are there?"] == NUMBERS[len(scene.objects)]
        for question, answer in scene.qa:
            if question.startswith("What colour is the "):
                shape = question.removeprefix("What colour is the ").removesuffix("?")
                assert [o.colour for o in scene.objects if o.shape == shape] == [answer]
        caption = short_caption(scene)
        assert all(obj.shape in caption for obj in scene.objects)
        if scene.layout == "relation":
            assert any(word in caption for word in ("above", "below", "left of", "right of"))


def test_binding_questions_are_those_that_find_an_object_among_different_ones():
    def scene_of(*objects):
        scene = Scene(objects=list(objects))
        scene.qa = questions(scene)
        return scene

    circle, square = ShapeObject("circle", "red", "small", 0, 0), ShapeObject("square", "green", "large", 2, 2)
    assert binding_questions(scene_of(circle)) == []
    assert binding_questions(scene_of(circle, ShapeObject("circle", "red", "small", 1, 1))) == []  # copies
    assert dict(binding_questions(scene_of(circle, square))) == {
        "How many circles are there?": "one",
        "What colour is the circle?": "red",
        "How many squares are there?": "one",
        "What colour is the square?": "green",
        "Where is the red circle?": "top left",
        "Where is the green square?": "bottom right",
    }
    assert binding_questions(scene_of(circle, square), ("cell",)) == [
        ("Where is the red circle?", "top left"),
        ("Where is the green square?", "bottom right"),
    ]
    assert dict(binding_questions(scene_of(circle, square), ("colour", "count"))) == {
        "How many circles are there?": "one",
        "What colour is the circle?": "red",
        "How many squares are there?": "one",
        "What colour is the square?": "green",
    }
    with pytest.raises(ValueError, match="Unknown binding question kinds.*'size'"):
        binding_questions(scene_of(circle, square), ("cell", "size"))
    for scene in map(sample_scene, range(200)):
        assert set(binding_questions(scene)) <= set(scene.qa)


def test_prompt_list_is_fixed_and_versioned():
    prompts = shapeeval_prompts()
    assert len(prompts) == 42
    assert Counter(p.category for p in prompts) == {
        "single_object": 4, "two_objects": 6, "counting": 8, "colours": 8, "position": 8, "colour_attribution": 8
    }
    # Changing the list must be a new SHAPEEVAL_VERSION: scores from different lists do not compare.
    assert prompts_fingerprint(prompts) == "9ac8c614c336"
    named = {(c, s) for p in prompts for c, s, _ in p.objects if c is not None}
    assert not named & set(HELD_OUT_PAIRS)
    assert {(c, s) for p in held_out_prompts() for c, s, _ in p.objects} == set(HELD_OUT_PAIRS)


@pytest.mark.parametrize("blur", [0.0, 1.0])
def test_detector_scores_rendered_ground_truth(blur):
    results = []
    for prompt in shapeeval_prompts() + held_out_prompts() + named_colour_prompts() + paraphrase_prompts():
        for seed in range(3):
            image = render_prompt(prompt, seed)
            if blur:  # a decoder's soft edges
                image = image.filter(ImageFilter.GaussianBlur(blur))
            results.append((prompt, score(prompt, detect_objects(image))))
    summary = summarize(results)
    assert summary["overall"] == 1.0, summary
    assert set(summary["categories"]) == set(CATEGORIES)


def test_detector_finds_every_object_of_world_scenes():
    for seed in range(150):
        scene = sample_scene(seed)
        found = Counter((d.colour, d.shape) for d in detect_objects(scene.render()))
        assert found == Counter((o.colour, o.shape) for o in scene.objects), seed


def test_detector_ignores_specks_and_reads_any_image_size():
    image = render_objects([ShapeObject("triangle", "green", "large", 0, 2)])
    image.putpixel((5, 5), COLOURS["red"])  # a one-pixel speck is noise, not an object
    assert [(d.colour, d.shape) for d in detect_objects(image)] == [("green", "triangle")]
    big = image.resize((256, 256))
    assert [(d.colour, d.shape) for d in detect_objects(big)] == [("green", "triangle")]


def test_scoring_rules_fail_what_they_should():
    def objects(*specs):
        return detect_objects(render_objects([ShapeObject(*spec) for spec in specs]))

    counting = EvalPrompt("counting", "two circles", ((None, "circle", 2),))
    assert score(counting, objects(("circle", "red", "small", 0, 0), ("circle", "blue", "large", 2, 2)))
    assert not score(counting, objects(*[("circle", "red", "small", r, 0) for r in range(3)]))

    above = EvalPrompt("position", "a circle above a square", ((None, "circle", 1), (None, "square", 1)), "above")
    assert score(above, objects(("circle", "red", "small", 0, 1), ("square", "blue", "small", 2, 1)))
    assert not score(above, objects(("circle", "red", "small", 2, 1), ("square", "blue", "small", 0, 1)))
    assert not score(above, objects(("circle", "red", "small", 1, 0), ("square", "blue", "small", 1, 2)))

    attribution = EvalPrompt("colour_attribution", "a red circle and a blue square", (("red", "circle", 1), ("blue", "square", 1)))
    assert score(attribution, objects(("circle", "red", "small", 0, 0), ("square", "blue", "small", 2, 2)))
    assert not score(attribution, objects(("circle", "blue", "small", 0, 0), ("square", "red", "small", 2, 2)))


def test_pictures_that_are_not_of_the_world_show_no_objects():
    from PIL import Image

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((64, 64), Image.BILINEAR))
    assert detect_objects(noise) == [] and detect_objects(field) == []
    prompt = shapeeval_prompts()[0]
    assert not score(prompt, detect_objects(field))


# ---- generation data ----


def test_generation_pairs_are_deterministic_and_a_prompt_fixes_its_picture():
    assert sample_generation(3) == sample_generation(3)
    pictures = {}
    for seed in range(3000):
        prompt, objects = sample_generation(seed)
        assert pictures.setdefault(prompt, objects) == objects, prompt
        assert all(obj.size == GENERATION_SIZE for obj in objects)
    assert len(pictures) > 1000


def test_generation_prompts_cover_shapeeval_and_never_name_held_out_pairs_in_training():
    prompts = {sample_generation(seed)[0]: sample_generation(seed)[1] for seed in range(20000)}
    for prompt in prompts:
        for colour, shape in HELD_OUT_PAIRS:
            assert f"{colour} {shape}" not in prompt
    # Every ShapeEval prompt is a training prompt, and its picture passes ShapeEval.
    for eval_prompt in shapeeval_prompts():
        assert eval_prompt.prompt in prompts, eval_prompt.prompt
        assert score(eval_prompt, detect_objects(render_objects(prompts[eval_prompt.prompt])))
    held_out = {sample_generation(seed, "held_out")[0] for seed in range(3000)}
    assert {p.prompt for p in held_out_prompts()} <= held_out


def test_generation_pictures_follow_the_canonical_layout():
    objects = generation_objects([(None, "circle"), ("green", "square")], "above")
    assert [(o.colour, o.shape, o.row, o.col) for o in objects] == [
        (DEFAULT_COLOURS["circle"], "circle", 0, 1), ("green", "square", 2, 1)
    ]
    assert [(o.row, o.col) for o in generation_objects([(None, "diamond")] * 3)] == list(LIST_CELLS[3])
    with pytest.raises(ValueError):
        generation_objects([(None, "circle")] * 5)
