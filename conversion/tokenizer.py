"""A small byte-level BPE tokenizer with Llama 3's special tokens and the Pisces ones, for tiny checkpoints and tests.

`build_tokenizer()` trains it in a fraction of a second with the `tokenizers` library on a small built-in English
corpus about the shapes, colours, positions and objects of the synthetic world the tests and the reference model use.
The same inputs always give the same `tokenizer.json`.
"""

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from pisces.processing.chat_template import (
    BEGIN_OF_TEXT,
    CHAT_TEMPLATE,
    END_HEADER,
    END_OF_TEXT,
    END_OF_TURN,
    PAD_TOKEN,
    START_HEADER,
)
from pisces.processing.processing_pisces import BOI_TOKEN, EOI_TOKEN, GEN_TOKEN, IMAGE_TOKEN


# Llama 3's special tokens first, then the Pisces ones; they take the last ids, after the learned vocabulary.
LLAMA_SPECIAL_TOKENS = (BEGIN_OF_TEXT, END_OF_TEXT, START_HEADER, END_HEADER, END_OF_TURN, PAD_TOKEN)
PISCES_SPECIAL_TOKENS = (IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN, GEN_TOKEN)
SPECIAL_TOKENS = LLAMA_SPECIAL_TOKENS + PISCES_SPECIAL_TOKENS

_SHAPES = ("circle", "square", "triangle", "star", "heart", "ring", "cross", "diamond", "rectangle", "hexagon")
_COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "white", "black", "gray", "brown", "cyan")
_POSITIONS = (
    "above", "below", "left of", "right of", "next to", "inside", "on top of", "under", "behind", "in front of",
)  # fmt: skip
_OBJECTS = ("ball", "box", "cup", "tree", "house", "car", "cat", "dog", "flower", "book", "chair", "lamp", "boat")

DEFAULT_CORPUS = (
    "A red circle above a blue square. A green triangle below a yellow star. A small purple heart left of a big "
    "orange ring. The white cross is right of the black diamond. A gray rectangle next to a brown hexagon.",
    "What shape is in the image? A circle. What colour is the square? The square is blue. How many shapes are there? "
    "There are two shapes: one circle and one square. Where is the triangle? The triangle is at the top left.",
    "Describe the image. The image shows a red ball on a table, a green cup next to it and a blue box behind them. "
    "The background is white. In the center there is a large yellow star, and in the corner a small pink flower.",
    "Is the circle above the square? Yes, it is. Is the star bigger than the heart? No, the star is smaller. "
    "Which object is on the left? The cat is on the left and the dog is on the right.",
    "Generate an image of a cyan boat on a blue sea. Draw a house with a red roof under a yellow sun. Paint three "
    "trees in a row, a lamp beside a chair, and a book lying on the floor.",
    "Question: what colour is the big shape? Answer: it is purple. Question: what is in the middle? Answer: a white "
    "ring inside a black square. Question: how many circles? Answer: four circles, two red and two green.",
    "The top half of the picture is empty. At the bottom right there is an orange car. A brown dog sits in front of "
    "the house. The flower is between the tree and the lamp. Each shape has one colour and one size.",
    "first second third fourth one two three four five six seven eight nine ten zero, up down top bottom middle "
    "center corner edge side small large big tiny huge short long wide narrow bright dark light round sharp.",
)


def _builtin_corpus() -> list[str]:
    """The handwritten sentences plus every colour-shape pair and a sentence per position, in a fixed order."""
    corpus = list(DEFAULT_CORPUS)
    for i, shape in enumerate(_SHAPES):
        colour = _COLOURS[i % len(_COLOURS)]
        other_colour = _COLOURS[(i + 5) % len(_COLOURS)]
        other_shape = _SHAPES[(i + 3) % len(_SHAPES)]
        position = _POSITIONS[i % len(_POSITIONS)]
        obj = _OBJECTS[i % len(_OBJECTS)]
        corpus.append(
            f"a {colour} {shape} {position} a {other_colour} {other_shape}. "
            f"Where is the {colour} {shape}? It is {position} the {other_shape}. "
            f"The {obj} is {colour}. An image of a {colour} {obj}."
        )
    corpus.append(" ".join(f"{colour} {shape}" for colour in _COLOURS for shape in _SHAPES[:4]))
    return corpus


def build_tokenizer(vocab_size: int = 1024, corpus: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    """
    Trains a byte-level BPE tokenizer with Llama 3's special tokens and `<image>`, `<boi>`, `<eoi>`, `<gen>`.

    Args:
        vocab_size: the largest vocabulary, special tokens included. A small corpus can yield fewer merges, so
            `len(tokenizer)` can be smaller; the ten special tokens always take the last ids.
        corpus: the training text; defaults to a small built-in English corpus about shapes, colours and positions.

    Returns:
        A `PreTrainedTokenizerFast` that adds `<|begin_of_text|>` at the start of every sequence (like Llama 3), pads
        on the left with `<|finetune_right_pad_id|>`, ends base text with `<|end_of_text|>`, and carries the Pisces
        chat template. The same arguments always give the same `tokenizer.json`.
    """
    num_special = len(SPECIAL_TOKENS)
    # 256 byte symbols are always in the vocabulary; ask for at least a few merges beyond them.
    if vocab_size < 256 + num_special + 1:
        raise ValueError(
            f"vocab_size must be at least {256 + num_special + 1} (256 byte symbols, {num_special} special tokens and "
            f"one merge), got {vocab_size}."
        )
    texts = _builtin_corpus() if corpus is None else [str(text) for text in corpus]
    if not texts:
        raise ValueError("corpus is empty; pass some text or None for the built-in corpus.")

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - num_special,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    # Special tokens after the learned vocabulary, in a fixed order, like Llama 3's reserved range.
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    bos_id = tokenizer.token_to_id(BEGIN_OF_TEXT)
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BEGIN_OF_TEXT}:0 $A:0",
                pair=f"{BEGIN_OF_TEXT}:0 $A:0 {BEGIN_OF_TEXT}:1 $B:1",
                special_tokens=[(BEGIN_OF_TEXT, bos_id)],
            ),
        ]
    )

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BEGIN_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[START_HEADER, END_HEADER, END_OF_TURN, *PISCES_SPECIAL_TOKENS],
        padding_side="left",
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


__all__ = ["build_tokenizer", "SPECIAL_TOKENS", "DEFAULT_CORPUS"]
