"""`pisces describe --questions FILE --out ANSWERS.jsonl`: answers many questions about images, in batches.

Questions are read and checked whole before the model loads. Batches are left-padded (the processor pads on the left)
and decoded greedily, so a batched answer is the answer the question gets alone. Each finished batch is appended to
the output (flushed and synced), so a killed run resumes with `--resume` where it stopped. Under `accelerate launch`
each process answers its own contiguous part of the questions into `ANSWERS.jsonl.part-<rank>`; the main process
merges the parts in input order at the end and writes the final file atomically.
"""

import json
import os
import time
from pathlib import Path

from .commands import CommandError, _load_checkpoint, _model_folder, _require_at_least_one
from .output_files import write_text_atomically
from .progress import ItemProgress


def read_questions(path: Path) -> list[dict]:
    """
    The rows of a questions file (JSON lines): each `{"id", "image", "question" | "messages"}` plus `image_path`, the
    image resolved against the file's folder. `id` defaults to the 0-based line index. Any bad line raises a
    `CommandError` naming its line number.
    """
    if not path.is_file():
        raise CommandError(f"questions file not found: {path}")
    rows, seen = [], set()
    for index, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        where = f"{path} line {index + 1}"
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise CommandError(f"{where} is not JSON: {error}") from error
        if not isinstance(record, dict):
            raise CommandError(f"{where} is not a JSON object")
        image = record.get("image")
        if not isinstance(image, str) or not image:
            raise CommandError(f"{where} has no image (an `image` path)")
        has_question, has_messages = "question" in record, "messages" in record
        if has_question == has_messages:
            raise CommandError(f"{where} needs either a `question` or chat `messages` (one of them)")
        if has_question and (not isinstance(record["question"], str) or not record["question"].strip()):
            raise CommandError(f"{where} has an empty question")
        if has_messages:
            _check_messages(record["messages"], where)
        row_id = record.get("id", index)
        if not isinstance(row_id, (str, int)) or isinstance(row_id, bool):
            raise CommandError(f"{where} has an id that is neither a string nor an integer: {row_id!r}")
        if _key(row_id) in seen:
            raise CommandError(f"{where} repeats the id {row_id!r}")
        seen.add(_key(row_id))
        image_path = Path(image) if Path(image).is_absolute() else path.parent / image
        if not image_path.is_file():
            raise CommandError(f"{where}: image not found: {image_path}")
        row = {"id": row_id, "image": image}
        row.update({"question": record["question"]} if has_question else {"messages": record["messages"]})
        rows.append({**row, "image_path": image_path})
    if not rows:
        raise CommandError(f"{path} holds no questions")
    return rows


def _check_messages(messages, where: str) -> None:
    """Chat messages in the processor's format, with exactly one `{"type": "image"}` entry for the row's image."""
    if not isinstance(messages, list) or not messages:
        raise CommandError(f"{where}: `messages` must be a non-empty list of chat messages")
    images = 0
    for message in messages:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise CommandError(f"{where}: each message needs a `role` and a `content`")
        if isinstance(message["content"], list):
            images += sum(isinstance(part, dict) and part.get("type") == "image" for part in message["content"])
    if images != 1:
        raise CommandError(f"{where}: `messages` must hold one {{\"type\": \"image\"}} entry, found {images}")


def _key(row_id) -> str:
    # ids may be strings or integers; "1" and 1 are different rows.
    return json.dumps(row_id)


def _read_answers(path: Path) -> list[dict]:
    """The whole answer lines of `path`; a line cut short by a kill (not JSON, or without an answer) is dropped."""
    if not path.is_file():
        return []
    answers = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "id" in record and "answer" in record:
            answers.append(record)
    return answers


def _part_files(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f"{out.name}.part-*"))


def _output_line(row: dict, answer: str) -> str:
    record = {key: value for key, value in row.items() if key != "image_path"}
    return json.dumps({**record, "answer": answer}, ensure_ascii=False) + "\n"


def _write_in_input_order(out: Path, rows: list[dict], answered: dict[str, str]) -> None:
    """`out` atomically: the answered rows in input order, each id once."""
    text = "".join(answered[_key(row["id"])] for row in rows if _key(row["id"]) in answered)
    write_text_atomically(out, text)


def _collect_answers(out: Path, rows: list[dict]) -> dict[str, str]:
    """Output lines by id key, from `out` and any part files, for the ids of `rows` (first answer of an id wins)."""
    wanted = {_key(row["id"]): row for row in rows}
    answered = {}
    for path in [out, *_part_files(out)]:
        for record in _read_answers(path):
            key = _key(record["id"])
            if key in wanted and key not in answered:
                answered[key] = _output_line(wanted[key], record["answer"])
    return answered


def _prompt_text(processor, row: dict) -> str:
    messages = row.get("messages") or [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]}
    ]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def answer_batch(model, processor, rows: list[dict], max_new_tokens: int) -> list[str]:
    """Greedy answers to `rows` (read by `read_questions`) in one left-padded batch, in the order of `rows`."""
    import torch
    from PIL import Image, UnidentifiedImageError

    images = []
    for row in rows:
        try:
            with Image.open(row["image_path"]) as image:
                images.append(image.convert("RGB"))
        except (UnidentifiedImageError, OSError) as error:
            raise CommandError(f"cannot read {row['image_path']} as an image: {error}") from error
    try:
        texts = [_prompt_text(processor, row) for row in rows]
        inputs = processor(images=images, text=texts, return_tensors="pt").to(model.device)
    except ValueError as error:  # e.g. a question longer than the language model's context
        raise CommandError(f"question {rows[0]['id']!r} and its batch: {error}") from error
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    # Left padding: every row's new tokens start right after the padded prompt.
    return [answer.strip() for answer in processor.batch_decode(output[:, inputs["input_ids"].shape[1] :])]


def batch_describe(args) -> None:
    from . import distributed

    _require_at_least_one(args, "--max-new-tokens", "--batch-size")
    if args.resume and args.overwrite:
        raise CommandError("--resume continues the answers in --out and --overwrite replaces them: pass one")
    out = Path(args.out)
    if out.is_dir():
        raise CommandError(f"--out {out} is a folder, not a file")
    rows = read_questions(Path(args.questions))
    if not args.resume and not args.overwrite and out.is_file() and out.stat().st_size > 0:
        raise CommandError(f"--out {out} already holds answers; pass --resume to continue them or --overwrite to replace them")

    # Every process must see the same answered ids before the split: the main process folds earlier answers
    # (from `out` and the part files of a killed multi-process run) into `out` first.
    if distributed.is_main_process():
        answered = _collect_answers(out, rows) if args.resume else {}
        _write_in_input_order(out, rows, answered)
        for part in _part_files(out):
            part.unlink()
    distributed.wait_for_everyone()
    answered = _collect_answers(out, rows) if args.resume else {}
    todo = [row for row in rows if _key(row["id"]) not in answered]

    mine = [row for _, row in distributed.split_for_this_process(todo)]
    alone = distributed.num_processes() == 1
    rank = int(os.environ.get("RANK", "0"))
    own_file = out if alone else out.with_name(f"{out.name}.part-{rank}")

    model, processor = _load_checkpoint(_model_folder(args.model))
    model.to(distributed.this_process_device())
    started = time.perf_counter()
    with open(own_file, "a", encoding="utf-8") as file, ItemProgress(len(mine), unit="answer") as progress:
        for start in range(0, len(mine), args.batch_size):
            batch = mine[start : start + args.batch_size]
            answers = answer_batch(model, processor, batch, args.max_new_tokens)
            file.write("".join(_output_line(row, answer) for row, answer in zip(batch, answers)))
            file.flush()
            os.fsync(file.fileno())
            elapsed = time.perf_counter() - started
            for row in batch:
                progress.done(f"answered {row['id']!r} ({(progress.count + 1) / elapsed:.2f} answers/s)")
    distributed.wait_for_everyone()

    if distributed.is_main_process():
        answered = _collect_answers(out, rows)
        _write_in_input_order(out, rows, answered)
        for part in _part_files(out):
            part.unlink()
        elapsed = time.perf_counter() - started
        skipped = len(rows) - len(todo)
        print(
            f"answered {len(todo)} questions in {elapsed:.1f}s ({len(todo) / max(elapsed, 1e-9):.2f} answers/s"
            f"{f', {skipped} already answered' if skipped else ''}) -> {out}",
            flush=True,
        )
