"""ShapeEval: GenEval's six categories on the shapes world, scored by a programmatic detector.

- A fixed, versioned prompt list (`shapeeval_prompts()`, version `SHAPEEVAL_VERSION`) over six categories: single
  object, two objects, counting, colours, position, colour attribution. Prompts use only colour-shape pairs of the
  training split; `held_out_prompts()` adds prompts with the held-out pairs, reported apart.
- `detect_objects(image)`: colour segmentation against the world's palette, connected components, and a shape
  classifier on three bounding-box features. No learned model; tested on rendered ground truth.
- `score(prompt, image)`: the GenEval rule of the prompt's category. `evaluate_generation` and
  `evaluate_understanding` run a Pisces pipeline on the prompts and on question answering and captions.
"""

import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from .world import (
    BACKGROUND,
    COLOURS,
    DETAILED_CAPTION_QUESTION,
    GRID,
    HELD_OUT_PAIRS,
    IMAGE_SIZE,
    NUMBERS,
    SHAPES,
    SIZES,
    ShapeObject,
    image_array,
    relation,
    render_objects,
    sample_scene,
)


SHAPEEVAL_VERSION = 1
CATEGORIES = ("single_object", "two_objects", "counting", "colours", "position", "colour_attribution")
RELATIONS = ("above", "below", "left of", "right of")
# Pixels farther than this (RGB Euclidean) from every palette colour count as background.
MAX_COLOUR_DISTANCE = 100.0
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


@dataclass(frozen=True)
class EvalPrompt:
    """One ShapeEval prompt: its text and what an image must show to pass."""

    category: str
    prompt: str
    # (colour or None, shape, count) per object group the prompt names.
    objects: tuple[tuple[str | None, str, int], ...]
    relation: str | None = None


@dataclass(frozen=True)
class Detection:
    shape: str
    colour: str
    area: int
    center: tuple[float, float]  # (x, y) in pixels


# ---- the prompt list ----


def _allowed_pairs() -> list[tuple[str, str]]:
    return [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT_PAIRS]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def shapeeval_prompts() -> list[EvalPrompt]:
    """The fixed ShapeEval prompt list (version `SHAPEEVAL_VERSION`): 44 prompts over six categories."""
    rng = random.Random(f"shapeeval-v{SHAPEEVAL_VERSION}")
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


def prompts_fingerprint(prompts: list[EvalPrompt]) -> str:
    """A short hash of a prompt list, printed with every result so that scores from different lists never mix."""
    text = json.dumps([asdict(p) for p in prompts], sort_keys=True)
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


def classify_shape(pixels: np.ndarray) -> str:
    """The shape of one component ((N, 2) pixel coordinates), by the nearest prototype of its features."""
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
    distances = {
        shape: np.linalg.norm(weights * (features - np.array(proto))) for shape, proto in SHAPE_PROTOTYPES.items()
    }
    return min(distances, key=distances.get)


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
    The objects in an image: each pixel takes the nearest palette colour (or background), each compact connected
    region of one colour larger than `min_area` pixels is an object, classified by shape. An image that does not look
    like the world (more than half coloured, or coloured pixels the objects do not explain) has no objects.

    Args:
        image: a PIL image (any mode or size; resized to 64 x 64) or an (H, W, 3) uint8 array.
    """
    pixels = (image_array(image) if not isinstance(image, np.ndarray) else image).astype(np.float32)
    labels = colour_labels(pixels)
    detections = []
    for index, colour in enumerate(COLOURS, start=1):
        for component in _components(labels == index):
            if len(component) < min_area or not _is_object_like(component):
                continue
            center = (float(component[:, 1].mean()) + 0.5, float(component[:, 0].mean()) + 0.5)
            detections.append(Detection(classify_shape(component), colour, len(component), center))
    # A picture of the world is mostly white, and its objects explain most of its coloured pixels. Anything else (a
    # colour field, noise) shows no objects at all, so that it cannot pass a prompt by chance.
    foreground = int((labels > 0).sum())
    explained = sum(d.area for d in detections)
    if foreground > labels.size * MAX_FOREGROUND or explained < MIN_EXPLAINED * foreground:
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
    """Whether detections satisfy a prompt, by GenEval's rule for its category."""
    if prompt.category == "counting":
        colour, shape, count = prompt.objects[0]
        return sum(_matches(d, colour, shape) for d in detections) == count
    if prompt.category == "position":
        (_, first_shape, _), (_, second_shape, _) = prompt.objects
        firsts = [d for d in detections if d.shape == first_shape]
        seconds = [d for d in detections if d.shape == second_shape]
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


def evaluate_generation(pipe, prompts=None, images_per_prompt: int = 4, seed: int = 0, **generate_kwargs) -> dict:
    """
    ShapeEval of a `PiscesPipeline`: every prompt drawn `images_per_prompt` times (seeds `seed`, `seed + 1`, ...),
    each image scored by the detector.

    Returns `{"overall", "categories", "held_out", "num_images", "version", "prompts"}`.
    """
    import torch

    prompts = shapeeval_prompts() if prompts is None else prompts
    held_out = held_out_prompts()

    def run(batch):
        results = []
        for prompt in batch:
            generators = [torch.Generator().manual_seed(seed + i) for i in range(images_per_prompt)]
            images = pipe(
                prompt.prompt, num_images_per_prompt=images_per_prompt, generator=generators, **generate_kwargs
            ).images
            results += [(prompt, score(prompt, detect_objects(image))) for image in images]
        return results

    results = run(prompts)
    held_out_results = run(held_out)
    summary = summarize(results)
    summary["held_out"] = float(np.mean([passed for _, passed in held_out_results]))
    summary["num_images"] = len(results)
    summary["version"] = SHAPEEVAL_VERSION
    summary["prompts"] = prompts_fingerprint(prompts)
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
    model, processor, num_scenes: int = 50, split: str = "held_out", batch_size: int = 16, seed: int = 0
) -> dict:
    """
    Question answering and detailed-caption accuracy on `num_scenes` scenes of a split (seeds `seed`, `seed + 1`...).

    A question is right when the normalized answer equals the scene's; a caption is right when it names exactly the
    scene's objects (size, colour, shape and cell). Returns `{"vqa_accuracy", "caption_accuracy", "num_questions",
    "num_captions"}`.
    """
    scenes = [sample_scene(seed + i, split) for i in range(num_scenes)]
    rows = [(scene, question, answer) for scene in scenes for question, answer in scene.qa]
    correct = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        answers = _answer(model, processor, [s.render() for s, _, _ in batch], [q for _, q, _ in batch], 6)
        correct += [normalize_answer(got) == answer for got, (_, _, answer) in zip(answers, batch)]
    captions_right = []
    for start in range(0, len(scenes), batch_size):
        batch = scenes[start : start + batch_size]
        captions = _answer(model, processor, [s.render() for s in batch], [DETAILED_CAPTION_QUESTION] * len(batch), 96)
        for scene, caption in zip(batch, captions):
            expected = Counter((o.size, o.colour, o.shape, o.position) for o in scene.objects)
            captions_right.append(parse_detailed_caption(caption) == expected)
    return {
        "vqa_accuracy": float(np.mean(correct)),
        "caption_accuracy": float(np.mean(captions_right)),
        "num_questions": len(correct),
        "num_captions": len(captions_right),
    }
