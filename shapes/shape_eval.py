"""ShapeEval: GenEval's six categories on the shapes world, scored by a programmatic detector.

- Fixed, hashed prompt lists over six categories (single object, two objects, counting, colours, position, colour
  attribution). Version 1 (`shapeeval_prompts()`) is GenEval's: four categories name no colour, and only colour-shape
  pairs of the training split appear; `held_out_prompts()` adds the held-out pairs, reported apart. Version 2 keeps
  it and adds two splits: `named_colour_prompts()` (a colour in every object phrase, a fixed share of held-out pairs)
  and `paraphrase_prompts()` (the canonical prompts worded as people write them). Every prompt is in the world's
  grammar or paraphrases one that is, so it has one picture (`prompt_objects`).
- `detect_objects(image)`: the coloured regions of an image, each one object of one colour (the palette entry nearest
  its own dominant colour, or none) and one shape (the nearest template, or none). No learned model; tested on
  rendered ground truth.
- `score(prompt, image)`: the GenEval rule of the prompt's category, checking every colour the prompt names.
  `evaluate_generation` and `evaluate_understanding` run a Pisces pipeline on the prompts and on question answering
  (canonical and paraphrased questions) and captions.
"""

import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from .paraphrase import paraphrase_prompt, paraphrase_question
from .world import (
    BACKGROUND,
    COLOURS,
    DEFAULT_COLOURS,
    DETAILED_CAPTION_QUESTION,
    GRID,
    HELD_OUT_PAIRS,
    IMAGE_SIZE,
    NUMBERS,
    SHAPES,
    SIZES,
    ShapeObject,
    generation_objects,
    image_array,
    relation,
    render_objects,
    sample_scene,
)


SHAPEEVAL_VERSION = 2
CATEGORIES = ("single_object", "two_objects", "counting", "colours", "position", "colour_attribution")
SPLITS = ("v1", "named_colours", "paraphrase")
RELATIONS = ("above", "below", "left of", "right of")
# Pixels farther than this (RGB Euclidean) from every palette colour's blend with white are background: this only
# decides where something is drawn (the colour of an object is decided per object, by `OBJECT_COLOUR_DISTANCE`).
MAX_COLOUR_DISTANCE = 100.0
# An object's colour is the palette entry nearest its dominant colour if that is at most this far (RGB Euclidean),
# else none. The two closest entries, orange and yellow, are 71 apart: within half of that, a colour is nearer its
# entry than any other, while a colour midway between two entries (amber, 37 from yellow and 65 from orange;
# blue-violet, 42 from purple) is none of them. Rendered objects sit at 0, and a blur leaves their inside exact.
OBJECT_COLOUR_DISTANCE = 35.0
# An image is a picture of the world only if at most this share of it is coloured (four large objects cover 20%) ...
MAX_FOREGROUND = 0.5
# ... and its detected objects cover at least this share of the coloured pixels.
MIN_EXPLAINED = 0.75
# Components smaller than this are decoder noise, not objects (the smallest object covers about 50 pixels).
MIN_AREA = 12
# Shape prototypes over three features of a component, measured on rendered objects of both sizes: the widths of its
# top and bottom quarters (over the box width), and how far it reaches along the axes against the diagonals
# (fourth moments: square 0.75, circle 1.0, diamond 1.34), which survives blur better than corners do.
SHAPE_PROTOTYPES = {
    "square": (1.0, 1.0, 0.75),
    "circle": (0.55, 0.55, 1.01),
    "triangle": (0.17, 0.93, 1.02),
    "diamond": (0.22, 0.22, 1.34),
}
FEATURE_WEIGHTS = (1.0, 1.0, 2.0)
# A component farther than this (weighted feature distance) from every prototype is no shape of the world ("none").
# Rendered objects of both sizes in every cell measure at most 0.11 (square), 0.09 (circle), 0.19 (triangle) and
# 0.48 (diamond, whose corners a Gaussian blur of 1.5 px rounds off), so 0.5 keeps the world's shapes, blurred. A
# triangle pointing down measures 0.56 from its nearest prototype and is none; a two-lobed heart (0.45 from the
# circle) and a plus sign (0.27) are not refused: three features cannot tell every shape from the world's.
MAX_SHAPE_DISTANCE = 0.5
NO_COLOUR = NO_SHAPE = "none"


@dataclass(frozen=True)
class EvalPrompt:
    """One ShapeEval prompt: its text and what an image must show to pass."""

    category: str
    prompt: str
    # (colour or None, shape, count) per object group the prompt names.
    objects: tuple[tuple[str | None, str, int], ...]
    relation: str | None = None
    # A paraphrase's canonical prompt (the world's wording of the same picture); None for a canonical prompt.
    canonical: str | None = None


@dataclass(frozen=True)
class Detection:
    shape: str  # one of SHAPES, or "none"
    colour: str  # one of COLOURS, or "none"
    area: int
    center: tuple[float, float]  # (x, y) in pixels


# ---- the prompt lists ----


def _allowed_pairs() -> list[tuple[str, str]]:
    return [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT_PAIRS]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(colour: str | None, shape: str) -> str:
    return f"{_article(colour or shape)} {colour + ' ' if colour else ''}{shape}"


def shapeeval_prompts() -> list[EvalPrompt]:
    """The fixed ShapeEval v1 prompt list (GenEval's categories, four of them naming no colour): 42 prompts."""
    rng = random.Random("shapeeval-v1")
    pairs = _allowed_pairs()
    prompts = [EvalPrompt("single_object", f"a {shape}", ((None, shape, 1),)) for shape in SHAPES]
    for i, first in enumerate(SHAPES):
        for second in SHAPES[i + 1 :]:
            prompts.append(EvalPrompt("two_objects", f"a {first} and a {second}", ((None, first, 1), (None, second, 1))))
    for shape in SHAPES:
        for count in rng.sample([2, 3, 4], 2):
            prompts.append(EvalPrompt("counting", f"{NUMBERS[count]} {shape}s", ((None, shape, count),)))
    for colour, shape in rng.sample(pairs, 8):
        prompts.append(EvalPrompt("colours", f"{_article(colour)} {colour} {shape}", ((colour, shape, 1),)))
    for relation_word in RELATIONS:
        for _ in range(2):
            first, second = rng.sample(SHAPES, 2)
            prompts.append(
                EvalPrompt(
                    "position", f"a {first} {relation_word} a {second}", ((None, first, 1), (None, second, 1)), relation_word
                )
            )
    for _ in range(8):
        (c1, s1), (c2, s2) = rng.sample([p for p in pairs], 2)
        while s1 == s2 or c1 == c2:
            (c1, s1), (c2, s2) = rng.sample(pairs, 2)
        prompts.append(
            EvalPrompt(
                "colour_attribution",
                f"{_article(c1)} {c1} {s1} and {_article(c2)} {c2} {s2}",
                ((c1, s1, 1), (c2, s2, 1)),
            )
        )
    return prompts


def held_out_prompts() -> list[EvalPrompt]:
    """Colour prompts with the colour-shape pairs the training split never shows (generalisation, reported apart)."""
    return [EvalPrompt("colours", f"{_article(c)} {c} {s}", ((c, s, 1),)) for c, s in HELD_OUT_PAIRS]


# Of the eight prompts of each named-colours category, this many name a held-out colour-shape pair.
NAMED_COLOUR_PROMPTS_PER_CATEGORY = 8
NAMED_COLOUR_HELD_OUT_PER_CATEGORY = 2


def names_held_out_pair(prompt: EvalPrompt) -> bool:
    return any((colour, shape) in HELD_OUT_PAIRS for colour, shape, _ in prompt.objects)


def named_colour_prompts() -> list[EvalPrompt]:
    """
    ShapeEval v2's "named colours" split: GenEval's six categories with a colour in every object phrase, 8 prompts
    each, 2 of which name a held-out colour-shape pair ("three purple squares", "a blue circle above a yellow
    triangle"). "colours" names a colour other than the shape's default (the colour of a prompt naming none); "colour
    attribution" gives each of two shapes the other's default colour where it can (the swap a model makes if it
    binds colours to the wrong object). Every prompt is in the world's grammar, so it has one picture.
    """
    rng = random.Random("shapeeval-v2-named-colours")
    allowed = _allowed_pairs()
    not_default = [pair for pair in allowed if pair[0] != DEFAULT_COLOURS[pair[1]]]

    def second_pair(first, condition=lambda pair: True):
        return rng.choice([p for p in allowed if p[1] != first[1] and p[0] != first[0] and condition(p)])

    def single(first):
        return EvalPrompt("single_object", _phrase(*first), ((*first, 1),))

    def two(first):
        second = second_pair(first)
        return EvalPrompt("two_objects", f"{_phrase(*first)} and {_phrase(*second)}", ((*first, 1), (*second, 1)))

    def counting(first):
        count = rng.choice([2, 3, 4])
        return EvalPrompt("counting", f"{NUMBERS[count]} {first[0]} {first[1]}s", ((*first, count),))

    def colours(first):
        return EvalPrompt("colours", _phrase(*first), ((*first, 1),))

    def position(first):
        second, relation_word = second_pair(first), rng.choice(RELATIONS)
        text = f"{_phrase(*first)} {relation_word} {_phrase(*second)}"
        return EvalPrompt("position", text, ((*first, 1), (*second, 1)), relation_word)

    def attribution(first):
        # The second object wears the first's default colour, and the first the second's where that pair is allowed.
        second = second_pair(first, lambda pair: pair[0] == DEFAULT_COLOURS[first[1]])
        if first not in HELD_OUT_PAIRS and (DEFAULT_COLOURS[second[1]], first[1]) in allowed and rng.random() < 0.5:
            first = (DEFAULT_COLOURS[second[1]], first[1])
        return EvalPrompt("colour_attribution", f"{_phrase(*first)} and {_phrase(*second)}", ((*first, 1), (*second, 1)))

    prompts = []
    makers = ((single, allowed), (two, allowed), (counting, allowed), (colours, not_default), (position, allowed),
              (attribution, not_default))
    for make, pool in makers:
        texts = set()
        for index in range(NAMED_COLOUR_PROMPTS_PER_CATEGORY):
            held_out = index < NAMED_COLOUR_HELD_OUT_PER_CATEGORY
            while True:  # a category never repeats a prompt
                prompt = make(rng.choice(HELD_OUT_PAIRS if held_out else pool))
                if prompt.prompt not in texts:
                    break
            texts.add(prompt.prompt)
            prompts.append(prompt)
    return prompts


PARAPHRASES_PER_CATEGORY = 8


def paraphrase_prompts() -> list[EvalPrompt]:
    """
    ShapeEval v2's "paraphrase" split: 8 prompts per category, drawn from v1 and the named-colours split (half each)
    and reworded as people write them ("a circle that is orange", "to the left of", "on top of", "a photo of",
    "coloured"/"colored", "3 squares"; see `paraphrase.PROMPT_REWRITES`). Each keeps its canonical prompt
    (`EvalPrompt.canonical`), whose picture and rule it shares, so the two score side by side.
    """
    rng = random.Random("shapeeval-v2-paraphrase")
    v1, named = shapeeval_prompts(), named_colour_prompts()
    used, prompts = {}, []
    for category in CATEGORIES:
        half = PARAPHRASES_PER_CATEGORY // 2
        chosen = rng.sample([p for p in v1 if p.category == category], half)
        chosen += rng.sample([p for p in named if p.category == category], PARAPHRASES_PER_CATEGORY - half)
        for canonical in chosen:
            text, _ = paraphrase_prompt(canonical.prompt, rng, used)
            prompts.append(EvalPrompt(category, text, canonical.objects, canonical.relation, canonical.prompt))
    return prompts


def split_prompts(split: str) -> list[EvalPrompt]:
    """The prompts of a ShapeEval split: "v1", "named_colours" or "paraphrase"."""
    makers = {"v1": shapeeval_prompts, "named_colours": named_colour_prompts, "paraphrase": paraphrase_prompts}
    if split not in makers:
        raise ValueError(f"Unknown ShapeEval split {split!r}; choose from {', '.join(makers)}.")
    return makers[split]()


def prompt_objects(prompt: EvalPrompt) -> list[ShapeObject]:
    """The one picture of a prompt in the world's grammar (or of a paraphrase's canonical prompt): its canonical
    cells, the default colour of a shape the prompt names none for, every object large."""
    named = [(colour, shape) for colour, shape, count in prompt.objects for _ in range(count)]
    return generation_objects(named, prompt.relation)


def prompts_fingerprint(prompts: list[EvalPrompt]) -> str:
    """A short hash of a prompt list, printed with every result so that scores from different lists never mix."""
    # A field a prompt leaves unset is left out, so that v1's fingerprint stayed what it was before fields were added.
    rows = [{key: value for key, value in asdict(p).items() if value is not None or key != "canonical"} for p in prompts]
    text = json.dumps(rows, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# ---- the detector ----


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as an (N, 2) array of (row, col)."""
    seen = np.zeros_like(mask, dtype=bool)
    components = []
    height, width = mask.shape
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        stack, pixels = [start], []
        while stack:
            r, c = stack.pop()
            pixels.append((r, c))
            for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= nr < height and 0 <= nc < width and mask[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = True
                    stack.append((nr, nc))
        components.append(np.array(pixels))
    return components


def _is_object_like(pixels: np.ndarray) -> bool:
    """
    Whether a component could be one of the world's objects: a compact blob, about square, of an object's size. Noise
    (a random model's output) makes irregular components, which must not pass as objects.
    """
    height = pixels[:, 0].max() - pixels[:, 0].min() + 1
    width = pixels[:, 1].max() - pixels[:, 1].min() + 1
    smallest, largest = min(SIZES.values()), max(SIZES.values())
    return (
        smallest / 2 <= min(height, width)
        and max(height, width) <= largest * 1.5
        and max(height, width) <= 1.5 * min(height, width)
        and len(pixels) >= 0.4 * height * width
    )


def shape_distances(pixels: np.ndarray) -> dict[str, float]:
    """The weighted feature distance of one component ((N, 2) pixel coordinates) to each shape prototype."""
    rows, cols = pixels[:, 0], pixels[:, 1]
    top, left = rows.min(), cols.min()
    height, width = rows.max() - top + 1, cols.max() - left + 1
    box = np.zeros((height, width), dtype=bool)
    box[rows - top, cols - left] = True
    quarter = max(1, height // 4)
    x, y = cols - cols.mean(), rows - rows.mean()
    u, v = (x + y) / np.sqrt(2), (x - y) / np.sqrt(2)
    axis_vs_diagonal = np.mean(x**4 + y**4) / max(np.mean(u**4 + v**4), 1e-6)
    features = np.array([box[:quarter].sum(1).mean() / width, box[-quarter:].sum(1).mean() / width, axis_vs_diagonal])
    weights = np.array(FEATURE_WEIGHTS)
    return {
        shape: float(np.linalg.norm(weights * (features - np.array(proto)))) for shape, proto in SHAPE_PROTOTYPES.items()
    }


def classify_shape(pixels: np.ndarray) -> str:
    """The shape of one component: the nearest prototype, or "none" if it is farther than `MAX_SHAPE_DISTANCE`."""
    distances = shape_distances(pixels)
    nearest = min(distances, key=distances.get)
    return nearest if distances[nearest] <= MAX_SHAPE_DISTANCE else NO_SHAPE


def object_colour(pixels: np.ndarray) -> str:
    """
    The colour of one object from its (N, 3) RGB pixels: the palette entry nearest its dominant colour, or "none"
    if every entry is farther than `OBJECT_COLOUR_DISTANCE`. The dominant colour is the median of the object's
    inner half (its pixels farthest from white), so that the edges' blends with the background do not pull it.
    """
    strength = np.linalg.norm(pixels - np.array(BACKGROUND, dtype=np.float32), axis=-1)
    core = pixels[strength >= np.median(strength)]
    dominant = np.median(core, axis=0)
    distances = np.linalg.norm(np.array(list(COLOURS.values()), dtype=np.float32) - dominant, axis=-1)
    nearest = int(distances.argmin())
    return list(COLOURS)[nearest] if distances[nearest] <= OBJECT_COLOUR_DISTANCE else NO_COLOUR


def colour_labels(pixels: np.ndarray) -> np.ndarray:
    """
    (H, W) palette index per pixel of an (H, W, 3) float image: 0 for background, i for the i-th colour of `COLOURS`.

    Soft edges (a decoder's, or a resize's) are blends of a colour with the white background, so each pixel is
    explained as `white + alpha * (colour - white)`: the colour with the smallest residual wins, and pixels less than
    half covered (alpha < 0.5) are background. That thresholds every object at its half-intensity contour.
    """
    white = np.array(BACKGROUND, dtype=np.float32)
    colours = np.array(list(COLOURS.values()), dtype=np.float32) - white  # (C, 3)
    offset = pixels - white  # (H, W, 3)
    alpha = (offset @ colours.T) / (colours**2).sum(-1)  # (H, W, C)
    residual = np.linalg.norm(offset[:, :, None, :] - alpha[..., None] * colours, axis=-1)
    residual[alpha < 0.5] = np.inf
    labels = residual.argmin(-1) + 1
    labels[residual.min(-1) > MAX_COLOUR_DISTANCE] = 0
    return labels


def detect_objects(image, min_area: int = MIN_AREA) -> list[Detection]:
    """
    The objects in an image: each compact connected region of coloured pixels (near some palette colour's blend with
    white) larger than `min_area` pixels is one object, of one colour (`object_colour`) and one shape
    (`classify_shape`), either of which may be "none". An image that does not look like the world (more than half
    coloured, or coloured pixels the objects do not explain) has no objects.

    Args:
        image: a PIL image (any mode or size; resized to 64 x 64) or an (H, W, 3) uint8 array.
    """
    pixels = (image_array(image) if not isinstance(image, np.ndarray) else image).astype(np.float32)
    foreground = colour_labels(pixels) > 0
    detections = []
    # One region is one object whatever colours its pixels are nearest: an object in an in-between colour, or one
    # whose colour drifts across it, is one object of one colour, never two objects of the neighbouring colours.
    for component in _components(foreground):
        if len(component) < min_area or not _is_object_like(component):
            continue
        center = (float(component[:, 1].mean()) + 0.5, float(component[:, 0].mean()) + 0.5)
        colour = object_colour(pixels[component[:, 0], component[:, 1]])
        detections.append(Detection(classify_shape(component), colour, len(component), center))
    # A picture of the world is mostly white, and its objects explain most of its coloured pixels. Anything else (a
    # colour field, noise) shows no objects at all, so that it cannot pass a prompt by chance.
    coloured = int(foreground.sum())
    explained = sum(d.area for d in detections)
    if coloured > foreground.size * MAX_FOREGROUND or explained < MIN_EXPLAINED * coloured:
        return []
    return detections


# ---- scoring ----


def _matches(detection: Detection, colour: str | None, shape: str) -> bool:
    return detection.shape == shape and (colour is None or detection.colour == colour)


def _holds(first: Detection, second: Detection, relation_word: str) -> bool:
    # A third of a cell is the margin: grid neighbours differ by a whole cell, decoder jitter by far less.
    margin = IMAGE_SIZE / GRID / 3
    dx, dy = second.center[0] - first.center[0], second.center[1] - first.center[1]
    return {"above": dy > margin, "below": -dy > margin, "left of": dx > margin, "right of": -dx > margin}[relation_word]


def score(prompt: EvalPrompt, detections: list[Detection]) -> bool:
    """
    Whether detections satisfy a prompt, by GenEval's rule for its category, checking every colour the prompt names:
    counting wants exactly the count of the shape, all in the named colour; position wants the named objects
    (colour and shape) in the relation; the others want every named object.
    """
    if prompt.category == "counting":
        colour, shape, count = prompt.objects[0]
        of_shape = [d for d in detections if d.shape == shape]
        return len(of_shape) == count and all(_matches(d, colour, shape) for d in of_shape)
    if prompt.category == "position":
        (first_colour, first_shape, _), (second_colour, second_shape, _) = prompt.objects
        firsts = [d for d in detections if _matches(d, first_colour, first_shape)]
        seconds = [d for d in detections if _matches(d, second_colour, second_shape)]
        return any(_holds(a, b, prompt.relation) for a in firsts for b in seconds)
    # single object, two objects, colours, colour attribution: every named object is there.
    return all(any(_matches(d, colour, shape) for d in detections) for colour, shape, _ in prompt.objects)


def render_prompt(prompt: EvalPrompt, seed: int = 0):
    """A ground-truth image for a prompt: the named objects in random cells satisfying its relation."""
    rng = random.Random(seed)
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    while True:
        chosen = rng.sample(cells, sum(count for _, _, count in prompt.objects))
        objects, i = [], 0
        for colour, shape, count in prompt.objects:
            for _ in range(count):
                allowed = [c for c in COLOURS if (c, shape) not in HELD_OUT_PAIRS] if colour is None else [colour]
                objects.append(ShapeObject(shape, rng.choice(allowed), rng.choice(list(SIZES)), *chosen[i]))
                i += 1
        if prompt.relation is None or relation(objects[0], objects[1]) == prompt.relation:
            return render_objects(objects)


def summarize(results: list[tuple[EvalPrompt, bool]]) -> dict:
    """Per-category accuracy and their mean (GenEval's overall), from (prompt, passed) pairs."""
    by_category = {}
    for prompt, passed in results:
        by_category.setdefault(prompt.category, []).append(passed)
    categories = {name: float(np.mean(by_category[name])) for name in CATEGORIES if name in by_category}
    return {"overall": float(np.mean(list(categories.values()))), "categories": categories}


# ---- running a model ----


def evaluate_generation(
    pipe,
    prompts=None,
    images_per_prompt: int = 4,
    seed: int = 0,
    splits=SPLITS,
    progress=None,
    **generate_kwargs,
) -> dict:
    """
    ShapeEval of a `PiscesPipeline`: every prompt drawn `images_per_prompt` times (seeds `seed`, `seed + 1`, ...),
    each image scored by the detector.

    Args:
        prompts: a prompt list of its own instead of v1's (then only it and the held-out prompts run).
        splits: which of `SPLITS` to run; v1 (with its held-out prompts) always runs.
        progress: called as `progress(done, total, prompt, passed)` after each prompt (`passed` of its images).

    Returns v1's `{"overall", "categories", "held_out", "num_images", "version", "prompts"}` and, under "splits",
    each split's summary: `{"overall", "categories", "num_images", "prompts"}`, with "held_out" (prompts naming a
    held-out pair) for named colours, and "canonical" (the same prompts in the world's wording) for paraphrase.
    """
    import torch

    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"Unknown ShapeEval splits {sorted(unknown)}; choose from {', '.join(SPLITS)}.")
    v1 = shapeeval_prompts() if prompts is None else list(prompts)
    runs = {"v1": v1, "held_out": held_out_prompts()}
    if prompts is None:
        runs.update({split: split_prompts(split) for split in SPLITS if split != "v1" and split in splits})
    total, done = sum(len(batch) for batch in runs.values()), 0
    passes = {}  # prompt text -> passed per image (a canonical prompt runs once, whichever split names it)

    def run(batch):
        nonlocal done
        results = []
        for prompt in batch:
            if prompt.prompt not in passes:
                generators = [torch.Generator().manual_seed(seed + i) for i in range(images_per_prompt)]
                images = pipe(
                    prompt.prompt, num_images_per_prompt=images_per_prompt, generator=generators, **generate_kwargs
                ).images
                passes[prompt.prompt] = [score(prompt, detect_objects(image)) for image in images]
            results += [(prompt, passed) for passed in passes[prompt.prompt]]
            done += 1
            if progress is not None:
                progress(done, total, prompt, sum(passes[prompt.prompt]))
        return results

    results = {name: run(batch) for name, batch in runs.items()}
    summary = summarize(results["v1"])
    summary["held_out"] = float(np.mean([passed for _, passed in results["held_out"]]))
    summary["num_images"] = len(results["v1"])
    summary["version"] = SHAPEEVAL_VERSION
    summary["prompts"] = prompts_fingerprint(v1)
    summary["splits"] = {}
    for split in runs.keys() - {"v1", "held_out"}:
        split_summary = summarize(results[split])
        split_summary["num_images"] = len(results[split])
        split_summary["prompts"] = prompts_fingerprint(runs[split])
        if split == "named_colours":
            split_summary["held_out"] = float(np.mean([ok for p, ok in results[split] if names_held_out_pair(p)]))
        if split == "paraphrase":
            canonical = [(p, ok) for p in runs[split] for ok in passes.get(p.canonical, [])]
            split_summary["canonical"] = summarize(canonical)["overall"] if canonical else None
        summary["splits"][split] = split_summary
    summary["splits"] = {split: summary["splits"][split] for split in SPLITS if split in summary["splits"]}
    return summary


def normalize_answer(text: str) -> str:
    return " ".join(re.sub(r"[^a-z ]", " ", text.lower()).split())


_OBJECT_SENTENCE = re.compile(r"an? (small|large) (\w+) (\w+) at the ([a-z ]+?)\.")


def parse_detailed_caption(text: str) -> Counter:
    """The (size, colour, shape, position) of every object a detailed caption names."""
    return Counter(_OBJECT_SENTENCE.findall(normalize_caption(text)))


def normalize_caption(text: str) -> str:
    return " ".join(text.lower().split())


def _answer(model, processor, images, questions, max_new_tokens):
    import torch

    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            add_generation_prompt=True,
        )
        for question in questions
    ]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True).to(model.device)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(output[:, inputs["input_ids"].shape[1] :])


def evaluate_understanding(
    model, processor, num_scenes: int = 50, split: str = "held_out", batch_size: int = 16, seed: int = 0,
    progress=None,
) -> dict:
    """
    Question answering and detailed-caption accuracy on `num_scenes` scenes of a split (seeds `seed`, `seed + 1`...).

    Every question is asked twice: in the world's wording and paraphrased (`paraphrase.paraphrase_question`: US/UK
    spelling, "objects" for "shapes", reordered wording), with the same answer. A question is right when the
    normalized answer equals the scene's; a caption is right when it names exactly the scene's objects (size, colour,
    shape and cell). `progress(message)` is called after each part. Returns `{"vqa_accuracy",
    "vqa_paraphrased_accuracy", "caption_accuracy", "num_questions", "num_captions"}`.
    """
    scenes = [sample_scene(seed + i, split) for i in range(num_scenes)]
    rows = [(scene, question, answer) for scene in scenes for question, answer in scene.qa]
    rng = random.Random(f"paraphrased-questions-{seed}")
    paraphrased = [(scene, paraphrase_question(question, rng), answer) for scene, question, answer in rows]

    def accuracy(rows):
        correct = []
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            answers = _answer(model, processor, [s.render() for s, _, _ in batch], [q for _, q, _ in batch], 6)
            correct += [normalize_answer(got) == answer for got, (_, _, answer) in zip(answers, batch)]
        return float(np.mean(correct))

    result = {"vqa_accuracy": accuracy(rows)}
    if progress is not None:
        progress(f"questions: {result['vqa_accuracy']:.3f} of {len(rows)}")
    result["vqa_paraphrased_accuracy"] = accuracy(paraphrased)
    if progress is not None:
        progress(f"paraphrased questions: {result['vqa_paraphrased_accuracy']:.3f} of {len(rows)}")
    captions_right = []
    for start in range(0, len(scenes), batch_size):
        batch = scenes[start : start + batch_size]
        captions = _answer(model, processor, [s.render() for s in batch], [DETAILED_CAPTION_QUESTION] * len(batch), 96)
        for scene, caption in zip(batch, captions):
            expected = Counter((o.size, o.colour, o.shape, o.position) for o in scene.objects)
            captions_right.append(parse_detailed_caption(caption) == expected)
    result.update(
        caption_accuracy=float(np.mean(captions_right)), num_questions=len(rows), num_captions=len(captions_right)
    )
    return result
