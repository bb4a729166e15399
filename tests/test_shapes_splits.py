"""ShapeEval v2's prompt splits (named colours, paraphrase) and paraphrased questions: fixed, hashed, each with one
picture or answer, and reported beside v1 and the canonical questions."""

import random
import re
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import ImageFilter

import pisces.shapes.shape_eval as shape_eval
from pisces.shapes.paraphrase import PROMPT_REWRITES, paraphrase_question
from pisces.shapes.shape_eval import (
    CATEGORIES,
    detect_objects,
    evaluate_generation,
    evaluate_understanding,
    held_out_prompts,
    named_colour_prompts,
    names_held_out_pair,
    paraphrase_prompts,
    prompt_objects,
    prompts_fingerprint,
    score,
    shapeeval_prompts,
    split_prompts,
)
from pisces.shapes.world import COLOURS, HELD_OUT_PAIRS, render_objects, sample_generation, sample_scene


def test_each_split_is_fixed_and_pinned_by_its_hash():
    # Changing a list changes its hash: scores from different lists do not compare.
    assert prompts_fingerprint(shapeeval_prompts()) == "9ac8c614c336"  # v1, unchanged
    assert prompts_fingerprint(named_colour_prompts()) == "3eedfbedd2b0"
    assert prompts_fingerprint(paraphrase_prompts()) == "a2578fd92a02"
    for split in ("named_colours", "paraphrase"):
        prompts = split_prompts(split)
        assert Counter(p.category for p in prompts) == {name: 8 for name in CATEGORIES}
        for category in CATEGORIES:  # a category never repeats a prompt (two categories may share one)
            texts = [p.prompt for p in prompts if p.category == category]
            assert len(set(texts)) == len(texts)
    with pytest.raises(ValueError, match="Unknown ShapeEval split 'v3'"):
        split_prompts("v3")


def test_named_colours_name_a_colour_in_every_object_and_a_fixed_share_of_held_out_pairs():
    prompts = named_colour_prompts()
    assert all(colour in COLOURS for p in prompts for colour, _, _ in p.objects)
    for category in CATEGORIES:
        of_category = [p for p in prompts if p.category == category]
        assert sum(map(names_held_out_pair, of_category)) == 2, category
    assert {(c, s) for p in prompts for c, s, _ in p.objects} & set(HELD_OUT_PAIRS) == set(HELD_OUT_PAIRS)
    for p in prompts:
        if p.category == "colours":
            (colour, shape, _), = p.objects
            assert colour != shape_eval.DEFAULT_COLOURS[shape]  # the default colour would pass by habit


def test_every_v2_prompt_has_one_picture_in_the_worlds_grammar_and_it_passes():
    # A canonical prompt is one the world's generation data writes, with the picture `prompt_objects` draws.
    training = dict(sample_generation(seed) for seed in range(20000))
    held_out = dict(sample_generation(seed, "held_out") for seed in range(20000))
    for prompt in named_colour_prompts() + paraphrase_prompts():
        canonical = prompt.canonical or prompt.prompt
        pictures = held_out if names_held_out_pair(prompt) else training
        if canonical in pictures:
            assert pictures[canonical] == prompt_objects(prompt), canonical
        for blur in (0.0, 1.0):
            image = render_objects(prompt_objects(prompt))
            if blur:
                image = image.filter(ImageFilter.GaussianBlur(blur))
            assert score(prompt, detect_objects(image)), (prompt.prompt, blur)
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert not any(score(p, detect_objects(noise)) for p in named_colour_prompts() + paraphrase_prompts())


def test_paraphrases_reword_canonical_prompts_the_ways_people_write():
    v1 = {(p.category, p.prompt): p for p in shapeeval_prompts()}
    named = {(p.category, p.prompt): p for p in named_colour_prompts()}
    paraphrases = paraphrase_prompts()
    for p in paraphrases:
        canonical = v1.get((p.category, p.canonical)) or named.get((p.category, p.canonical))
        assert canonical is not None and p.prompt != p.canonical
        assert (p.category, p.objects, p.relation) == (canonical.category, canonical.objects, canonical.relation)
    # Half from each list (a named-colours prompt may also be a v1 one).
    assert sum((p.category, p.canonical) in v1 for p in paraphrases) >= 24
    assert sum((p.category, p.canonical) in named for p in paraphrases) >= 24
    texts = " | ".join(p.prompt for p in paraphrases)
    for wording in ("that is", "to the left of", "on top of", "a photo of", "coloured", "colored", "underneath"):
        assert wording in texts, wording
    assert re.search(r"(^|\| )(a photo of |A picture of )?[234] ", texts)  # number digits
    # Each rewrite keeps the prompt's words for shapes and colours.
    assert PROMPT_REWRITES["that is"]("an orange circle left of a red square") == (
        "a circle that is orange left of a square that is red"
    )
    assert PROMPT_REWRITES["number digits"]("three purple squares") == "3 purple squares"
    assert PROMPT_REWRITES["to the left of"]("a circle above a square") is None


def test_paraphrased_questions_keep_their_answers():
    rng = random.Random(0)
    for seed in range(40):
        scene = sample_scene(seed, "held_out")
        for question, answer in scene.qa:
            reworded = paraphrase_question(question, rng)
            assert reworded != question
            # The words an answer depends on survive the rewording.
            for word in re.findall(rf"\b({'|'.join(COLOURS)}|circle|square|triangle|diamond)\b", question):
                assert word in reworded, (question, reworded)
    phrasings = {paraphrase_question(q, random.Random(i)) for i in range(30) for q in (
        "How many shapes are there?", "What colour is the square?", "What shape is the red object?"
    )}
    assert {"How many objects are there?", "What color is the square?", "What is the colour of the square?",
            "What shape is the red one?"} <= phrasings
    with pytest.raises(ValueError, match="No paraphrase"):
        paraphrase_question("Is it raining?", rng)


def test_understanding_reports_paraphrased_questions_beside_the_canonical(monkeypatch):
    asked = []

    def answer(model, processor, images, questions, max_new_tokens):
        asked.extend(questions)
        # Right on the world's own wording only: a model that learnt the phrasing, not the question.
        return [dict(scene.qa).get(q, "no idea") for q, scene in zip(questions, map(by_picture.get, picture_keys(images)))]

    scenes = [sample_scene(i, "held_out") for i in range(3)]
    by_picture = {s.render().tobytes(): s for s in scenes}

    def picture_keys(images):
        return [image.tobytes() for image in images]

    monkeypatch.setattr(shape_eval, "_answer", answer)
    messages = []
    result = evaluate_understanding(None, None, num_scenes=3, batch_size=4, progress=messages.append)
    num_questions = sum(len(s.qa) for s in scenes)
    assert result["num_questions"] == num_questions and result["num_captions"] == 3
    assert result["vqa_accuracy"] == 1.0 and result["vqa_paraphrased_accuracy"] == 0.0
    assert len(asked) == 2 * num_questions + 3
    assert messages[0].startswith("questions: 1.000") and messages[1].startswith("paraphrased questions: 0.000")


def _drawing_pipe(calls):
    """A stand-in pipeline that draws each prompt's one picture (its canonical prompt's, for a paraphrase)."""
    known = {p.prompt: p for split in ("v1", "named_colours", "paraphrase") for p in split_prompts(split)}
    known.update({p.prompt: p for p in held_out_prompts()})

    def pipe(prompt, num_images_per_prompt, generator, **kwargs):
        calls.append(prompt)
        return SimpleNamespace(images=[render_objects(prompt_objects(known[prompt]))] * num_images_per_prompt)

    return pipe


def test_evaluate_generation_reports_every_split_and_draws_each_prompt_once():
    calls, progress = [], []
    result = evaluate_generation(_drawing_pipe(calls), images_per_prompt=1, progress=lambda *a: progress.append(a))
    assert result["overall"] == 1.0 and result["held_out"] == 1.0 and result["prompts"] == "9ac8c614c336"
    assert result["version"] == 2 and list(result["splits"]) == ["named_colours", "paraphrase"]
    named, paraphrase = result["splits"]["named_colours"], result["splits"]["paraphrase"]
    assert named["overall"] == named["held_out"] == 1.0 and named["prompts"] == "3eedfbedd2b0"
    assert paraphrase["overall"] == paraphrase["canonical"] == 1.0 and paraphrase["prompts"] == "a2578fd92a02"
    assert named["num_images"] == paraphrase["num_images"] == 48
    # One progress call per prompt of every split; a prompt two splits share is drawn once.
    assert len(progress) == 42 + 3 + 48 + 48 and progress[-1][:2] == (141, 141)
    assert len(calls) == len(set(calls))
    only_v1 = evaluate_generation(_drawing_pipe([]), images_per_prompt=1, splits=("v1",))
    assert only_v1["splits"] == {} and only_v1["overall"] == 1.0
    with pytest.raises(ValueError, match="Unknown ShapeEval splits"):
        evaluate_generation(_drawing_pipe([]), splits=("v1", "v9"))
