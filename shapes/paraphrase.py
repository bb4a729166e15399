"""The world's prompts and questions the ways people write them.

The world speaks one grammar ("an orange circle left of a square", "What colour is the square?"); users do not. Each
rewrite here keeps the meaning, and so the picture or the answer, of the canonical text it starts from, so that a
paraphrase is scored against exactly what its canonical text is scored against.
"""

import random
import re

from .world import COLOURS, NUMBERS, SHAPES


_COLOUR_PHRASE = re.compile(rf"\ban? ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b")
_NUMBER_WORD = re.compile(rf"^({'|'.join(NUMBERS[2:])}) ")


def _postposed_colours(text: str, verb: str) -> str | None:
    """ "an orange circle" -> "a circle that is orange" (`verb` "that is") or "a circle coloured orange"."""
    rewritten = _COLOUR_PHRASE.sub(lambda match: f"a {match[2]} {verb} {match[1]}", text)
    return rewritten if rewritten != text else None


def _replaced(text: str, old: str, new: str) -> str | None:
    return text.replace(old, new) if f" {old} " in f" {text} " else None


# Each rule: canonical prompt -> paraphrase, or None where it does not apply.
PROMPT_REWRITES = {
    "that is": lambda text: _postposed_colours(text, "that is"),
    "coloured (UK)": lambda text: _postposed_colours(text, "coloured"),
    "colored (US)": lambda text: _postposed_colours(text, "colored"),
    "to the left of": lambda text: _replaced(text, "left of", "to the left of"),
    "to the right of": lambda text: _replaced(text, "right of", "to the right of"),
    "on top of": lambda text: _replaced(text, "above", "on top of"),
    "underneath": lambda text: _replaced(text, "below", "underneath"),
    "number digits": lambda text: (
        _NUMBER_WORD.sub(lambda match: f"{NUMBERS.index(match[1])} ", text) if _NUMBER_WORD.match(text) else None
    ),
    "a photo of": lambda text: f"a photo of {text}",
    "A picture of ... .": lambda text: f"A picture of {text}.",
}


def paraphrase_prompt(text: str, rng: random.Random, used: dict | None = None) -> tuple[str, list[str]]:
    """
    A paraphrase of a canonical prompt: one rewrite that changes its wording (the least used so far in `used`, rule
    name -> count, which it updates), then half the time a framing ("a photo of") on top. Returns the text and the
    names of the rules applied.
    """
    used = {} if used is None else used
    framings = ("a photo of", "A picture of ... .")
    wording = [name for name in PROMPT_REWRITES if name not in framings and PROMPT_REWRITES[name](text) is not None]
    candidates = wording or list(framings)
    least = min(used.get(name, 0) for name in candidates)
    first = rng.choice([name for name in candidates if used.get(name, 0) == least])
    applied = [first]
    text = PROMPT_REWRITES[first](text)
    if first not in framings and rng.random() < 0.5:
        applied.append(rng.choice(framings))
        text = PROMPT_REWRITES[applied[-1]](text)
    for name in applied:
        used[name] = used.get(name, 0) + 1
    return text, applied


# Canonical question pattern -> its paraphrases (US/UK spelling, "objects" for "shapes", reordered wording).
_QUESTION_PARAPHRASES = (
    (
        re.compile(r"^How many shapes are there\?$"),
        ("How many objects are there?", "How many shapes are in the picture?", "How many objects can you see?"),
    ),
    (
        re.compile(r"^How many (\w+)s are there\?$"),
        ("How many {0}s are in the image?", "How many {0}s do you see?", "Count the {0}s."),
    ),
    (
        re.compile(r"^What colour is the (\w+)\?$"),
        ("What color is the {0}?", "What is the colour of the {0}?", "What is the color of the {0}?",
         "The {0} is what colour?"),
    ),
    (
        re.compile(r"^What shape is the (\w+) object\?$"),
        ("What shape is the {0} one?", "What is the shape of the {0} object?", "Which shape is {0}?",
         "What shape is the {0} thing?"),
    ),
    (
        re.compile(r"^Where is the (\w+) (\w+)\?$"),
        ("Where's the {0} {1}?", "Where is the {0} {1} located?", "In which part of the image is the {0} {1}?"),
    ),
)


def paraphrase_question(question: str, rng: random.Random) -> str:
    """A paraphrase of one of the world's questions (`world.questions`), with the same answer."""
    for pattern, paraphrases in _QUESTION_PARAPHRASES:
        match = pattern.match(question)
        if match:
            return rng.choice(paraphrases).format(*match.groups())
    raise ValueError(f"No paraphrase for the question {question!r}; it is not one of the world's questions.")
