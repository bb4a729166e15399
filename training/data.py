"""Training data for Pisces: image-caption (and question-answer) rows -> model batches.

- `load_image_folder(path)` reads a folder in the `datasets` "imagefolder" convention: images beside a
  `metadata.jsonl` whose lines hold `file_name` and `text`, and optionally `question` and `answer`.
- `PiscesTrainingDataset` turns rows (from that folder, a Hugging Face `datasets.Dataset`, or any list of dicts) into
  training samples, each in one direction: caption (image -> text, cross-entropy), question answering (image +
  question -> answer) or generation (text -> image vectors, MSE), with caption dropout on generation samples for
  classifier-free guidance. Bad rows (missing or unreadable image, empty text, or a sequence longer than the
  language model's positions) are skipped and counted.
- `PiscesCollator` builds the training sequences with the processor: conversations through its chat
  template (labels on the tokens its `{% generation %}` blocks mark), the generation sequence
  `prompt <boi> <gen>*m <eoi>`, and `pixel_values` / `gen_pixel_values`.
"""

import io
import json
import random
import re
from pathlib import Path

import PIL.Image
import torch
from transformers.utils import logging
from transformers.utils.chat_template_utils import render_jinja_template

from pisces.processing import SequenceTooLongError
from pisces.processing.processing_pisces import to_rgb_image


logger = logging.get_logger(__name__)

DEFAULT_CAPTION_PROMPT = "Describe the image."
# Key of the per-batch count of skipped rows; `PiscesTrainer` pops it before the forward and logs it.
SKIPPED_ROWS_KEY = "skipped_rows"


class ImageFolderDataset(torch.utils.data.Dataset):
    """
    The rows of an image folder in the `datasets` "imagefolder" convention: `{"image": path, "text": str, ...}`.

    The images are not opened here: `PiscesTrainingDataset` opens them and skips the ones that fail.
    """

    def __init__(self, rows: list[dict]):
        self.rows = rows
        self.column_names = sorted({key for row in rows for key in row})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]


def load_image_folder(path: str | Path) -> ImageFolderDataset:
    """
    Reads `path/metadata.jsonl` (one JSON object a line, with `file_name` relative to `path`, `text`, and optionally
    `question` and `answer`). Lines that are not JSON objects or lack `file_name` are skipped with a warning.
    """
    root = Path(path)
    metadata = root / "metadata.jsonl"
    if not metadata.is_file():
        raise ValueError(
            f"{root} has no metadata.jsonl; an image folder needs one line per image, e.g. "
            '{"file_name": "0.png", "text": "a red circle"}.'
        )
    rows, bad = [], 0
    for number, line in enumerate(metadata.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
            bad += 1
            logger.warning(f"{metadata}:{number} is not a JSON object with a file_name; skipped.")
            continue
        row = {key: value for key, value in record.items() if key != "file_name"}
        row["image"] = str(root / record["file_name"])
        rows.append(row)
    if not rows:
        raise ValueError(f"{metadata} lists no images.")
    return ImageFolderDataset(rows)


def _text(value) -> str | None:
    """A non-empty stripped string, or None."""
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value or None


class PiscesTrainingDataset(torch.utils.data.Dataset):
    """
    Training samples from rows holding an image and a text (and optionally a question and its answer).

    Each row serves one direction, drawn from a generator seeded by `(seed, index)`: generation with probability
    `generation_ratio`, otherwise understanding (question answering when the row has a question and an answer,
    captioning otherwise). Generation samples drop their caption with probability `caption_dropout`, which teaches
    the model the unconditional prompt used by classifier-free guidance. Because the draws depend on the index only,
    a resumed run and a multi-process run see exactly the samples of an uninterrupted single-process run; a row keeps
    its direction from one epoch to the next.

    A bad row (missing or unreadable image, empty text for its direction, or, given `fits`, a sequence that does not
    fit) is replaced by the next good row, and the sample says so (`SKIPPED_ROWS_KEY` = 1) so that the trainer counts
    it in its log, even from dataloader workers: an epoch counts each bad row once.

    Args:
        rows: any indexable of dicts: a `datasets.Dataset`, `load_image_folder(...)`, a list; or a stream
            (`pisces.training.streaming_rows(...)`, a `datasets.IterableDataset`), for which this returns a
            `StreamingTrainingDataset` with the same arguments.
        image_column, text_column: the keys of the image (PIL image, array, path, or a `datasets` image dict with
            `path` / `bytes`) and of the caption.
        question_column, answer_column: the keys of an optional question and answer.
        generation_ratio: fraction of rows used as generation samples (text -> image).
        caption_dropout: probability that a generation sample's caption is replaced by the empty prompt.
        seed: seeds the directions and the dropout.
        fits: optional `fits(sample) -> bool`, e.g. `PiscesCollator.fits`: whether the sample's sequence fits in the
            language model's positions; a sample that does not is skipped as a bad row.

    Returns samples `{"task", "image" (RGB PIL), "text", "question", "answer", SKIPPED_ROWS_KEY}`.
    """

    def __new__(cls, rows, *args, **kwargs):
        # A stream (WebDataset shards, a `datasets.IterableDataset`) has no length: it is read by iterating.
        from .streaming import StreamingTrainingDataset, is_stream

        if cls is PiscesTrainingDataset and is_stream(rows):
            return StreamingTrainingDataset(rows, *args, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        rows,
        image_column: str = "image",
        text_column: str = "text",
        question_column: str = "question",
        answer_column: str = "answer",
        generation_ratio: float = 0.5,
        caption_dropout: float = 0.1,
        seed: int = 0,
        fits=None,
    ):
        for name, value in (("generation_ratio", generation_ratio), ("caption_dropout", caption_dropout)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}.")
        if len(rows) == 0:
            raise ValueError("The training data is empty.")
        columns = getattr(rows, "column_names", None)
        if isinstance(columns, (list, tuple)) and image_column not in columns:
            raise ValueError(f"The data has no image column {image_column!r}; its columns are {list(columns)}.")
        self.rows = rows
        self.image_column = image_column
        self.text_column = text_column
        self.question_column = question_column
        self.answer_column = answer_column
        self.generation_ratio = generation_ratio
        self.caption_dropout = caption_dropout
        self.seed = seed
        self.fits = fits

    def __len__(self) -> int:
        return len(self.rows)

    def _sample(self, index: int) -> dict | None:
        """The sample of row `index`, or None when the row is bad."""
        sample = row_sample(self, self.rows[index], random.Random(f"pisces-{self.seed}-{index}"), index)
        if sample is None:
            return None
        if self.fits is not None and not self.fits(sample):
            logger.warning(
                f"Skipping row {index}: its {sample['task']} sequence is longer than the language model's positions."
            )
            return None
        return sample

    def __getitem__(self, index: int) -> dict:
        for offset in range(len(self.rows)):
            sample = self._sample((index + offset) % len(self.rows))
            if sample is not None:
                # Row `index` itself was bad or not; the bad rows passed over count when they are asked for.
                sample[SKIPPED_ROWS_KEY] = int(offset > 0)
                return sample
        raise ValueError(
            "Every row of the training data is bad (missing or unreadable images, empty texts, or sequences longer "
            "than the language model's positions)."
        )


def row_sample(dataset, row: dict, rng: random.Random, position: int) -> dict | None:
    """
    The training sample of one row: its task (generation with probability `dataset.generation_ratio` when the row has
    a text, else a question and answer, else a caption), its image and texts, the generation prompt dropped with
    probability `dataset.caption_dropout`; None when the row has no usable text or image. `dataset` gives the column
    names and the two probabilities (`PiscesTrainingDataset` and `StreamingTrainingDataset` share this); `rng`
    draws, so a row's sample depends on its seed only.
    """
    text = _text(row.get(dataset.text_column))
    question, answer = _text(row.get(dataset.question_column)), _text(row.get(dataset.answer_column))
    wants_generation = rng.random() < dataset.generation_ratio
    dropped = rng.random() < dataset.caption_dropout
    if wants_generation and text is not None:
        task = "generation"
    elif question is not None and answer is not None:
        task = "vqa"
    elif text is not None:
        task = "caption"
    else:
        return None
    image = load_row_image(row.get(dataset.image_column), position)
    if image is None:
        return None
    if task == "generation" and dropped:
        text = ""
    return {"task": task, "image": image, "text": text, "question": question, "answer": answer}


def load_row_image(image, index: int):
    """
    The RGB PIL image of a row's image value (PIL image, array, path, or a `datasets` Image dict with `bytes` or
    `path`), or None with a warning when it is missing or unreadable.
    """
    if isinstance(image, dict):  # a `datasets` Image feature not decoded: {"bytes", "path"}
        if image.get("bytes") is not None:
            try:
                with PIL.Image.open(io.BytesIO(image["bytes"])) as opened:
                    opened.load()
                    image = opened.copy()
            except (OSError, PIL.UnidentifiedImageError) as error:
                logger.warning(f"Skipping row {index}: its image bytes are not an image ({error}).")
                return None
        else:
            image = image.get("path")
    if image is None:
        return None
    try:
        return to_rgb_image(image, index, "image")
    except ValueError as error:
        logger.warning(f"Skipping row {index}: {error}")
        return None


# A `{% generation %}` block in a Jinja chat template: what the template marks as the assistant's own tokens.
_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


class PiscesCollator:
    """
    Batches `PiscesTrainingDataset` samples into model inputs, right-padded.

    - caption: the conversation `user: <image> {caption_prompt}` / `assistant: {caption}`, rendered by the processor's
      chat template; the labels are the assistant's tokens as the template marks them with `{% generation %}`, which
      include its end of turn (`<|eot_id|>` in Llama 3's template, `<|im_end|>` in ChatML).
    - vqa: `user: <image> {question}` / `assistant: {answer}`, labelled the same way.
    - generation: `processor.format_generation_sequence(text)` = `prompt <boi> <gen>*m <eoi>` with the image as
      `gen_images`; the only label is `<eoi>` (the image vectors are supervised by `gen_loss`).

    Args:
        processor ([`PiscesProcessor`]): tokenizer and image processors of the checkpoint. Its chat template must mark
            the assistant's turns with `{% generation %}` ... `{% endgeneration %}`, as Pisces' templates do.
        caption_prompt: the instruction of caption samples.
        max_length: optional truncation length; a sample whose placeholders would be cut raises.
        max_sequence_length: the language model's positions (default: `processor.max_sequence_length`, which a
            checkpoint's processor reads from its config); without `max_length`, a sample longer is dropped from the
            batch and counted in `SKIPPED_ROWS_KEY`, never truncated (that could cut an image's placeholders or the
            answer's end). Pass `fits` to `PiscesTrainingDataset` to replace such rows by the next one that fits.
        report_skipped: add `SKIPPED_ROWS_KEY` (the number of bad rows skipped) to the batch; `PiscesTrainer` pops
            it. Turn it off to use the batches with a stock `Trainer` or a plain loop.

    Returns a dict: `input_ids`, `attention_mask`, `labels` `(batch_size, sequence_length)`, `pixel_values`
    `(num_understanding_samples, 3, H, W)` and `gen_pixel_values` `(num_generation_samples, 3, H', W')` when present.
    """

    def __init__(self, processor, caption_prompt: str = DEFAULT_CAPTION_PROMPT, max_length: int | None = None,
                 report_skipped: bool = True, max_sequence_length: int | None = None):
        template = getattr(processor, "chat_template", None)
        if not isinstance(template, str) or not _GENERATION_BLOCK.search(template):
            raise ValueError(
                "The processor's chat template does not mark the assistant's turns with {% generation %} ... "
                "{% endgeneration %}, so the training labels cannot be taken from it. Wrap the assistant's content "
                "and its end-of-turn token in such a block (as pisces.processing.CHAT_TEMPLATE does) and set it as "
                "`processor.chat_template`."
            )
        self.processor = processor
        self.caption_prompt = caption_prompt
        self.max_length = max_length
        self.report_skipped = report_skipped
        self.max_sequence_length = (
            max_sequence_length if max_sequence_length is not None else getattr(processor, "max_sequence_length", None)
        )

    def sequence_length(self, sample: dict) -> int:
        """The number of tokens of `sample`'s training sequence (placeholders expanded), from its text alone."""
        processor = self.processor
        if sample["task"] == "generation":
            text = processor.format_generation_sequence(sample["text"])
        else:
            question, answer = self._question_and_answer(sample)
            (text,), _ = self._render_conversation(question, answer)
        bos = processor.tokenizer.bos_token
        add_special_tokens = not (bos is not None and text.startswith(bos))
        length = len(processor.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        expanded = (processor.num_image_tokens - 1) * text.count(processor.image_token)
        return length + expanded + (processor.num_gen_tokens - 1) * text.count(processor.gen_token)

    def fits(self, sample: dict) -> bool:
        """Whether `sample` fits in `max_sequence_length` (always, when truncating to `max_length` or unknown)."""
        if self.max_length is not None or self.max_sequence_length is None:
            return True
        return self.sequence_length(sample) <= self.max_sequence_length

    def _question_and_answer(self, sample: dict) -> tuple[str, str]:
        if sample["task"] == "caption":
            return self.caption_prompt, sample["text"]
        return sample["question"], sample["answer"]

    def _render_conversation(self, question: str, answer: str):
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
        return render_jinja_template(
            conversations=[messages],
            chat_template=self.processor.chat_template,
            return_assistant_tokens_mask=True,
            **self.processor.tokenizer.special_tokens_map,
        )

    def _processor_kwargs(self) -> dict:
        if self.max_length is None:
            return {}
        return {"truncation": True, "max_length": self.max_length}

    def _understanding_row(self, image, question: str, answer: str) -> tuple[dict, torch.Tensor]:
        """
        One conversation through the processor's chat template: its inputs, and as labels the tokens that overlap the
        template's `{% generation %}` spans. This is what `apply_chat_template(return_assistant_tokens_mask=True)`
        does on transformers 5.24; 5.17 drops a span whose first character falls inside a token (a template that
        writes `"A: "` before its generation block), so the spans are matched here, the same way on every version.
        """
        processor = self.processor
        (text,), (spans,) = self._render_conversation(question, answer)
        bos = processor.tokenizer.bos_token
        encoded = processor(
            text=[text],
            images=[[image]],
            return_offsets_mapping=True,
            # As `apply_chat_template` does: a template that writes the BOS itself gets no second one.
            add_special_tokens=not (bos is not None and text.startswith(bos)),
            return_tensors="pt",
            **self._processor_kwargs(),
        )
        input_ids, offsets = encoded["input_ids"][0], encoded.pop("offset_mapping")[0]
        begins, ends = offsets[:, 0], offsets[:, 1]
        assistant = torch.zeros_like(input_ids, dtype=torch.bool)
        for span_begin, span_end in spans:
            # Character offsets refer to the rendered text; zero-width tokens (added specials) never match.
            assistant |= (begins < span_end) & (ends > span_begin) & (ends > begins)
        truncated = self.max_length is not None and len(input_ids) >= self.max_length
        if not assistant.any() and not truncated:
            raise ValueError(
                f"The chat template marked no token of the answer {answer!r} as the assistant's; its "
                "{% generation %} block must hold the assistant's content."
            )
        return encoded, torch.where(assistant, input_ids, -100)

    def _generation_row(self, image, text: str) -> tuple[dict, torch.Tensor]:
        """`prompt <boi> <gen>*m <eoi>`: only <eoi> is a text target; the vectors are supervised by gen_loss."""
        processor = self.processor
        encoded = processor(
            text=[processor.format_generation_sequence(text)],
            gen_images=[[image]],
            return_tensors="pt",
            **self._processor_kwargs(),
        )
        input_ids = encoded["input_ids"][0]
        return encoded, torch.where(input_ids == processor.eoi_token_id, input_ids, -100)

    def __call__(self, samples: list[dict]) -> dict:
        rows, pixel_values, gen_pixel_values, too_long = [], [], [], 0
        for sample in samples:
            # Checked on the text first, so that a row too long costs no image processing.
            if not self.fits(sample):
                too_long += 1
                continue
            try:
                if sample["task"] == "generation":
                    encoded, labels = self._generation_row(sample["image"], sample["text"])
                else:
                    encoded, labels = self._understanding_row(sample["image"], *self._question_and_answer(sample))
            except SequenceTooLongError:  # the processor's own limit, where it differs from this one
                too_long += 1
                continue
            if sample["task"] == "generation":
                gen_pixel_values.append(encoded["gen_pixel_values"])
            else:
                pixel_values.append(encoded["pixel_values"])
            rows.append((encoded["input_ids"][0], encoded["attention_mask"][0], labels))
        if too_long:
            logger.warning(
                f"Skipped {too_long} sample(s) of this batch longer than the language model's "
                f"{self.max_sequence_length} positions."
            )
        if not rows:
            raise ValueError(
                f"Every sample of this batch is longer than the language model's {self.max_sequence_length} positions. "
                "Shorten the texts, or pass `fits=collator.fits` to PiscesTrainingDataset so that such rows are "
                "replaced by the next row that fits."
            )

        tokenizer = self.processor.tokenizer
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        length = max(len(input_ids) for input_ids, _, _ in rows)
        input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        for row, (ids, mask, row_labels) in enumerate(rows):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = mask
            labels[row, : len(ids)] = row_labels
        labels[attention_mask == 0] = -100

        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if pixel_values:
            batch["pixel_values"] = torch.cat(pixel_values)
        if gen_pixel_values:
            batch["gen_pixel_values"] = torch.cat(gen_pixel_values)
        batch["labels"] = labels
        if self.report_skipped:
            skipped = sum(sample.get(SKIPPED_ROWS_KEY, 0) for sample in samples) + too_long
            batch[SKIPPED_ROWS_KEY] = torch.tensor(skipped)
        return batch


__all__ = [
    "DEFAULT_CAPTION_PROMPT",
    "ImageFolderDataset",
    "PiscesCollator",
    "PiscesTrainingDataset",
    "SKIPPED_ROWS_KEY",
    "load_image_folder",
    "load_row_image",
]
