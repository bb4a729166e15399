"""The shapes world: a synthetic, deterministic world of coloured shapes on a grid, where success is measurable.

Each scene holds one to four objects, each a shape (circle, square, triangle, diamond) of a colour (six of them) and
a size (small, large), in a cell of a 3 x 3 grid on a white 64 x 64 image. A scene comes with a short caption (stage
1 of the paper), a detailed caption (stage 2) and question-answer pairs about colour, count, shape and position
(stage 3). Everything is a function of a seed.

Some colour-shape pairs never occur in the training split (`HELD_OUT_PAIRS`); the held-out split is made of scenes
that contain at least one of them, so that accuracy there measures composition, not memory.

Generation data is drawn differently (`sample_generation`): there, a prompt fixes its picture. Objects sit in fixed
cells by their number and relation, a colour the prompt does not name is the shape's default colour, and every
object is large. The reason is the model, not the world: Pisces regresses one sequence of vectors per prompt (MSE),
so a prompt that allowed many pictures would be trained towards their average, a blur, not towards any one of them.
(At full scale the diffusion decoder supplies the variety; here it is kept small.)
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


# The questions that find an object by its shape (see `binding_questions`), by what they ask of it.
BINDING_QUESTION_STARTS = {"colour": "What colour is the ", "cell": "Where is the ", "count": "How many "}


def binding_questions(scene: Scene, kinds=tuple(BINDING_QUESTION_STARTS)) -> list[tuple[str, str]]:
    """
    The scene's questions that find objects by their shape and ask about them (the colour or cell of the <shape>, how
    many <shape>s), when the scene holds different objects, so that answering needs each object's attributes bound
    together. Empty for a scene of one object, or of copies of one, where every such question has the one object's
    answer. `kinds` picks among "colour", "cell" and "count".
    """
    unknown = set(kinds) - set(BINDING_QUESTION_STARTS)
    if unknown:
        raise ValueError(
            f"Unknown binding question kinds {sorted(unknown)}; choose from {list(BINDING_QUESTION_STARTS)}."
        )
    if len({(obj.shape, obj.colour) for obj in scene.objects}) < 2:
        return []
    starts = tuple(BINDING_QUESTION_STARTS[kind] for kind in kinds)
    return [
        (question, answer)
        for question, answer in scene.qa
        if question.startswith(starts) and question != "How many shapes are there?"
    ]


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


# ---- generation data: a prompt fixes its picture ----

# The colour of a shape whose prompt names none; no default is a held-out pair.
DEFAULT_COLOURS = {"circle": "red", "square": "blue", "triangle": "green", "diamond": "orange"}
GENERATION_SIZE = "large"
# Cells by number of objects, and by relation (first object, second object). No two are adjacent, so objects drawn a
# little large or blurred still come apart.
LIST_CELLS = {1: ((1, 1),), 2: ((1, 0), (1, 2)), 3: ((0, 0), (1, 1), (2, 2)), 4: ((0, 0), (0, 2), (2, 0), (2, 2))}
RELATION_CELLS = {
    "above": ((0, 1), (2, 1)),
    "below": ((2, 1), (0, 1)),
    "left of": ((1, 0), (1, 2)),
    "right of": ((1, 2), (1, 0)),
}


def _phrase(colour: str | None, shape: str) -> str:
    words = ([colour] if colour else []) + [shape]
    return f"{'an' if words[0][0] in 'aeiou' else 'a'} {' '.join(words)}"


def generation_objects(named: list[tuple[str | None, str]], relation_word: str | None = None) -> list[ShapeObject]:
    """
    The picture of a prompt naming `named` objects, `(colour or None, shape)` each, in order: the canonical cells of
    their number (`LIST_CELLS`) or of `relation_word` (`RELATION_CELLS`, two objects), default colours, large size.
    """
    if relation_word is not None and (relation_word not in RELATION_CELLS or len(named) != 2):
        raise ValueError(f"A relation joins two objects, one of {', '.join(RELATION_CELLS)}; got {relation_word!r}.")
    if relation_word is None and len(named) not in LIST_CELLS:
        raise ValueError(f"A picture holds 1 to {max(LIST_CELLS)} objects, got {len(named)}.")
    cells = RELATION_CELLS[relation_word] if relation_word else LIST_CELLS[len(named)]
    return [
        ShapeObject(shape, colour or DEFAULT_COLOURS[shape], GENERATION_SIZE, row, col)
        for (colour, shape), (row, col) in zip(named, cells, strict=True)
    ]


def sample_generation(seed: int, split: str = "train", colour_share: float = 0.6) -> tuple[str, list[ShapeObject]]:
    """
    A text-to-image training pair of the seed: a prompt in ShapeEval's grammar ("a circle", "a red circle", "a circle
    above a blue square", "a red circle and a green diamond", "three squares", "two purple triangles") and the objects
    of its picture (`generation_objects`). Each object phrase names its colour with probability `colour_share`.
    `split="train"` never names a held-out colour-shape pair.
    """
    if not 0.0 <= colour_share <= 1.0:
        raise ValueError(f"colour_share is a probability, got {colour_share}.")
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {', '.join(SPLITS)}.")
    rng = random.Random(f"generation-{split}-{seed}")
    pairs = [(c, s) for c in COLOURS for s in SHAPES if (split != "train" or (c, s) not in HELD_OUT_PAIRS)]

    def named_object() -> tuple[str | None, str]:
        colour, shape = rng.choice(pairs)
        return (colour if rng.random() < colour_share else None), shape

    kind = rng.choices(["single", "relation", "list", "count"], weights=[2, 3, 3, 2])[0]
    if kind == "count":
        count = rng.randint(2, 4)
        colour, shape = named_object()
        prompt = f"{NUMBERS[count]} {colour + ' ' if colour else ''}{shape}s"
        return prompt, generation_objects([(colour, shape)] * count)
    if kind == "relation":
        named, relation_word = [named_object(), named_object()], rng.choice(tuple(RELATION_CELLS))
        return f"{_phrase(*named[0])} {relation_word} {_phrase(*named[1])}", generation_objects(named, relation_word)
    count = 1 if kind == "single" else rng.randint(2, 4)
    named = []
    while len(named) < count:
        candidate = named_object()
        # Two objects a prompt cannot tell apart would make "a circle and a circle"; draw again.
        if all(candidate[1] != shape or (candidate[0] and colour and candidate[0] != colour) for colour, shape in named):
            named.append(candidate)
    phrases = [_phrase(*item) for item in named]
    prompt = phrases[0] if count == 1 else ", ".join(phrases[:-1]) + f" and {phrases[-1]}"
    return prompt, generation_objects(named)


def image_array(image: Image.Image) -> np.ndarray:
    """(64, 64, 3) uint8 array of an image, converted to RGB and resized to the world's size if needed."""
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(image)
