"""ShapeEval's scorer is strict where the model's pictures go wrong: one object has one colour (or none), a position
prompt checks the colours it names, a colour far from the palette is no palette colour, and a shape like none of the
world's is "none"."""

import numpy as np
from PIL import Image, ImageDraw

from pisces.shapes.shape_eval import EvalPrompt, detect_objects, score
from pisces.shapes.world import COLOURS, ShapeObject, render_objects


AMBER = (255, 191, 0)  # between orange and yellow: 37 from yellow, 65 from orange
BLUE_VIOLET = (138, 43, 226)  # between blue and purple: 42 from purple


def _picture(draw_on) -> Image.Image:
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    draw_on(ImageDraw.Draw(image))
    return image


def test_an_object_whose_colour_drifts_across_it_is_one_object_of_one_colour():
    # A large square shading from orange (top left) to yellow (bottom right), as a decoder draws an in-between
    # colour. Labelled pixel by pixel it came apart into an orange and a yellow object, and passed prompts of both.
    pixels = np.full((64, 64, 3), 255, dtype=np.uint8)
    orange, yellow = np.array(COLOURS["orange"], dtype=float), np.array(COLOURS["yellow"], dtype=float)
    for row in range(23, 41):
        for col in range(23, 41):
            t = (row - 23 + col - 23) / 34
            pixels[row, col] = np.round(orange * (1 - t) + yellow * t)
    detections = detect_objects(pixels)
    assert len(detections) == 1 and detections[0].shape == "square" and detections[0].area == 18 * 18
    both = EvalPrompt(
        "two_objects", "an orange circle and a yellow triangle", (("orange", "circle", 1), ("yellow", "triangle", 1))
    )
    assert not score(both, detections)
    assert not score(EvalPrompt("colours", "a yellow triangle", (("yellow", "triangle", 1),)), detections)


def test_position_checks_the_colours_the_prompt_names():
    prompt = EvalPrompt(
        "position", "a red circle above a blue square", (("red", "circle", 1), ("blue", "square", 1)), "above"
    )
    square = ShapeObject("square", "blue", "large", 2, 1)
    right = [ShapeObject("circle", "red", "large", 0, 1), square]
    # The red circle sits beside the square; only a green circle is above it.
    wrong = [ShapeObject("circle", "red", "large", 2, 0), ShapeObject("circle", "green", "large", 0, 1), square]
    assert score(prompt, detect_objects(render_objects(right)))
    assert not score(prompt, detect_objects(render_objects(wrong)))
    # With no colour named, any circle above the square passes, as in GenEval.
    colourless = EvalPrompt("position", "a circle above a square", ((None, "circle", 1), (None, "square", 1)), "above")
    assert score(colourless, detect_objects(render_objects(wrong)))


def test_a_colour_between_two_palette_entries_is_neither():
    for colour, near in ((AMBER, "yellow"), (BLUE_VIOLET, "purple")):
        detections = detect_objects(_picture(lambda draw: draw.ellipse((23, 23, 40, 40), fill=colour)))
        assert [(d.shape, d.colour) for d in detections] == [("circle", "none")]
        assert not score(EvalPrompt("colours", f"a {near} circle", ((near, "circle", 1),)), detections)
        # A shape-only prompt does not ask for a colour: the circle is still there.
        assert score(EvalPrompt("single_object", "a circle", ((None, "circle", 1),)), detections)
    # A colour close to its palette entry keeps it.
    near_red = tuple(channel + 15 for channel in COLOURS["red"])
    detections = detect_objects(_picture(lambda draw: draw.ellipse((23, 23, 40, 40), fill=near_red)))
    assert [(d.shape, d.colour) for d in detections] == [("circle", "red")]


def test_a_shape_like_none_of_the_worlds_is_none():
    # A triangle pointing down: nearest to the circle's features, but far from every template.
    detections = detect_objects(_picture(lambda draw: draw.polygon([(23, 23), (40, 23), (32, 40)], fill=COLOURS["red"])))
    assert [(d.shape, d.colour) for d in detections] == [("none", "red")]
    for shape in ("circle", "triangle", "diamond", "square"):
        assert not score(EvalPrompt("single_object", f"a {shape}", ((None, shape, 1),)), detections)


def test_counting_a_named_colour_wants_every_copy_in_it():
    prompt = EvalPrompt("counting", "three purple squares", (("purple", "square", 3),))
    cells = [(0, 0), (0, 2), (2, 0)]
    purple = [ShapeObject("square", "purple", "large", *cell) for cell in cells]
    assert score(prompt, detect_objects(render_objects(purple)))
    # A fourth square in the shape's default colour: three purple squares are not what was drawn.
    assert not score(prompt, detect_objects(render_objects(purple + [ShapeObject("square", "blue", "large", 2, 2)])))
    mixed = purple[:2] + [ShapeObject("square", "blue", "large", *cells[2])]
    assert not score(prompt, detect_objects(render_objects(mixed)))
