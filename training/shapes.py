"""The shapes world: a synthetic, deterministic world of coloured shapes on a grid, where success is measurable.

Each scene holds one to four objects, each a shape (circle, square, triangle, diamond) of a colour (six of them) and
a size (small, large), in a cell of a 3 x 3 grid on a white 64 x 64 image. A scene comes with a short caption (stage
1 of the paper), a detailed caption (stage 2) and question-answer pairs about colour, count, shape and position
(stage 3). Everything is a function of a seed.

Some colour-shape pairs never occur in the training split (`HELD_OUT_PAIRS`); the held-out split is made of scenes
that contain at least one of them, so that accuracy there measures composition, not memory.
"""

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw


IMAGE_SIZE = 64
GRID = 3
BACKGROUND = (255, 255, 255)
SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 190),
    "orange": (245, 130, 20),
}
SIZES = {"small": 12, "large": 18}  # side of the bounding box, in pixels; a cell is 21 px, so objects never touch
HELD_OUT_PAIRS = (("blue", "triangle"), ("yellow", "circle"), ("purple", "square"))
# Grid cells named as a person would: row words x column words, "center" for the middle one.
_ROWS, _COLS = ("top", "middle", "bottom"), ("left", "center", "right")
NUMBERS = ("zero", "one", "two", "three", "four")
SPLITS = ("train", "held_out")
# The instructions that ask for each caption; training and evaluation use the same ones.
BRIEF_CAPTION_QUESTION = "Describe the image briefly."
DETAILED_CAPTION_QUESTION = "Describe the image in detail."


def cell_name(row: int, col: int) -> str:
    if row == 1 and col == 1:
        return "center"
    if row == 1:
        return _COLS[col]
    if col == 1:
        return _ROWS[row]
    return f"{_ROWS[row]} {_COLS[col]}"


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    size: str
    row: int
    col: int

    @property
    def center(self) -> tuple[float, float]:
        """(x, y) of the cell's centre, in pixels."""
        cell = IMAGE_SIZE / GRID
        return ((self.col + 0.5) * cell, (self.row + 0.5) * cell)

    @property
    def position(self) -> str:
        return cell_name(self.row, self.col)


@dataclass
class Scene:
    objects: list[ShapeObject]
    # How the short caption reads: "relation" (two objects), "count" (identical objects), or "list".
    layout: str = "list"
    # Seeded choices for the captions (which attributes the short caption names).
    caption_seed: int = 0
    qa: list[tuple[str, str]] = field(default_factory=list)

    def render(self) -> Image.Image:
        return render_objects(self.objects)


def render_objects(objects: list[ShapeObject]) -> Image.Image:
    """A 64 x 64 RGB image of the objects on white, without anti-aliasing (colours stay exact)."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        x, y = obj.center
        half = SIZES[obj.size] / 2
        box = (round(x - half), round(y - half), round(x + half) - 1, round(y + half) - 1)
        colour = COLOURS[obj.colour]
        left, top, right, bottom = box
        if obj.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif obj.shape == "square":
            draw.rectangle(box, fill=colour)
        elif obj.shape == "triangle":
            draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=colour)
        elif obj.shape == "diamond":
            mid_x, mid_y = (left + right) / 2, (top + bottom) / 2
            draw.polygon([(mid_x, top), (right, mid_y), (mid_x, bottom), (left, mid_y)], fill=colour)
        else:
            raise ValueError(f"Unknown shape {obj.shape!r}; the world has {', '.join(SHAPES)}.")
    return image


def is_held_out(obj: ShapeObject) -> bool:
    return (obj.colour, obj.shape) in HELD_OUT_PAIRS


def _plural(shape: str, count: int) -> str:
    return shape if count == 1 else shape + "s"


def _noun_phrase(obj: ShapeObject, with_colour: bool = True, with_size: bool = False) -> str:
    words = ([obj.size] if with_size else []) + ([obj.colour] if with_colour else []) + [obj.shape]
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article] + words)


def relation(first: ShapeObject, second: ShapeObject) -> str | None:
    """Where `first` is relative to `second`: "above", "below", "left of", "right of" (rows first), or None."""
    if first.row != second.row:
        return "above" if first.row < second.row else "below"
    if first.col != second.col:
        return "left of" if first.col < second.col else "right of"
    return None


def short_caption(scene: Scene) -> str:
    """One line, the way a prompt is written: "a red circle above a blue square", "three green triangles"."""
    rng = random.Random(scene.caption_seed)
    objects = scene.objects
    if scene.layout == "count":
        first = objects[0]
        colour = f"{first.colour} " if rng.random() < 0.8 else ""
        return f"{NUMBERS[len(objects)]} {colour}{_plural(first.shape, len(objects))}"
    # A single object sometimes goes without its colour, so that prompts naming only a shape are in-distribution.
    with_colour = len(objects) > 1 or rng.random() < 0.8
    phrases = [_noun_phrase(obj, with_colour=with_colour) for obj in objects]
    if scene.layout == "relation" and len(objects) == 2:
        return f"{phrases[0]} {relation(objects[0], objects[1])} {phrases[1]}"
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + f" and {phrases[-1]}"


def detailed_caption(scene: Scene) -> str:
    """Every object with its size, colour, shape and cell: "A small red circle at the top left. ..."."""
    count = len(scene.objects)
    sentences = [f"There {'is' if count == 1 else 'are'} {NUMBERS[count]} {_plural('shape', count)}."]
    for obj in sorted(scene.objects, key=lambda o: (o.row, o.col)):
        phrase = _noun_phrase(obj, with_size=True)
        sentences.append(f"{phrase[0].upper()}{phrase[1:]} at the {obj.position}.")
    return " ".join(sentences)


def questions(scene: Scene) -> list[tuple[str, str]]:
    """Question-answer pairs that the scene answers unambiguously: colour, count, shape, position."""
    objects = scene.objects
    pairs = [("How many shapes are there?", NUMBERS[len(objects)])]
    for shape in SHAPES:
        matching = [obj for obj in objects if obj.shape == shape]
        if matching:
            pairs.append((f"How many {shape}s are there?", NUMBERS[len(matching)]))
        if len(matching) == 1:
            pairs.append((f"What colour is the {shape}?", matching[0].colour))
    for colour in COLOURS:
        matching = [obj for obj in objects if obj.colour == colour]
        if len(matching) == 1:
            pairs.append((f"What shape is the {colour} object?", matching[0].shape))
            pairs.append((f"Where is the {colour} {matching[0].shape}?", matching[0].position))
    return pairs


def _random_object(rng: random.Random, cell: tuple[int, int], split: str, shape=None, colour=None, size=None):
    while True:
        obj = ShapeObject(
            shape=shape or rng.choice(SHAPES),
            colour=colour or rng.choice(list(COLOURS)),
            size=size or rng.choice(list(SIZES)),
            row=cell[0],
            col=cell[1],
        )
        if split != "train" or not is_held_out(obj):
            return obj
        shape, colour = None, None  # a forced held-out pair cannot be in training: draw again


def sample_scene(seed: int, split: str = "train") -> Scene:
    """
    The scene of a seed. `split="train"` never contains a held-out colour-shape pair; `split="held_out"` always
    contains at least one.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {', '.join(SPLITS)}.")
    rng = random.Random(f"{split}-{seed}")
    layout = rng.choices(["single", "relation", "count", "list"], weights=[3, 3, 2, 2])[0]
    count = {"single": 1, "relation": 2, "count": rng.randint(2, 4), "list": rng.randint(2, 4)}[layout]
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], count)
    if layout == "relation":
        while relation(*(ShapeObject("circle", "red", "small", *cell) for cell in cells)) is None:
            cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], count)
    forced = rng.choice(HELD_OUT_PAIRS) if split == "held_out" else (None, None)
    if layout == "count":
        first = _random_object(rng, cells[0], split, shape=forced[1], colour=forced[0])
        objects = [first] + [_random_object(rng, cell, split, first.shape, first.colour) for cell in cells[1:]]
    else:
        objects = [_random_object(rng, cells[0], split, shape=forced[1], colour=forced[0])]
        objects += [_random_object(rng, cell, split) for cell in cells[1:]]
        rng.shuffle(objects)
    scene = Scene(objects=objects, layout=layout if layout != "single" else "list", caption_seed=rng.randrange(2**31))
    scene.qa = questions(scene)
    return scene


def image_array(image: Image.Image) -> np.ndarray:
    """(64, 64, 3) uint8 array of an image, converted to RGB and resized to the world's size if needed."""
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(image)
