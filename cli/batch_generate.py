"""`pisces generate --prompts FILE --out DIR`: images for a benchmark's prompts, resumable, across processes.

Image k of prompt p (p counts the file's prompts from 0, blank lines skipped) is drawn with the seed
`image_seed(seed, p, k) = seed + p * SEED_STRIDE + k`, from its own `torch.Generator`; prompt 0 gets the seeds of the
single-prompt form, `--seed + k`. Prompts are drawn in fixed batches, prompts `[b * B, (b + 1) * B)` for batch b of
`--batch-size` B, and processes share out whole batches; a batch with any image missing is drawn whole (its complete
images are not written again). So every image is computed in the same batch whatever the number of processes and
however often the run was resumed, and the files are identical bit for bit; across batch sizes only the float noise of
batched matrix products differs (at most one uint8 level, measured at 2 of 36,864 values).

Layouts:
- `geneval`: `DIR/00000/metadata.jsonl` (the prompt's JSON line, `{"prompt": ...}` for a plain-text prompt) and
  `DIR/00000/samples/0000.png`, `0001.png`, ..., as GenEval's evaluator reads them.
- `flat`: `DIR/<id>.png`, or `DIR/<id>_<k>.png` with several images (DPG-Bench style); `<id>` is the line's `id`
  field, else the prompt's index as 5 digits.
"""

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import commands
from .commands import CommandError
from .output_files import clear_folder, write_file_atomically, write_text_atomically
from .progress import ItemProgress


SEED_STRIDE = 10007  # prime, above the largest --num-images: no two images of a run share a seed
MAX_IMAGES_PER_PROMPT = 9999  # GenEval's 4-digit sample names
LAYOUTS = ("geneval", "flat")


@dataclass
class PromptEntry:
    """One prompt of a prompt file: `index` among the prompts, `line` (1-based) in the file."""

    index: int
    line: int
    prompt: str
    metadata: str
    id: str


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    return seed + prompt_index * SEED_STRIDE + image_index


def _check_id(value, line: int, path: Path) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise CommandError(f"{path} line {line}: \"id\" must be a string or an integer, got {value!r}")
    value = str(value)
    if not value or value.startswith(".") or "/" in value or "\\" in value:
        raise CommandError(f"{path} line {line}: \"id\" {value!r} cannot name a file")
    return value


def read_prompt_file(path: str | Path) -> list[PromptEntry]:
    """
    The prompts of a plain-text file (one a line) or a JSON-lines file (`.jsonl`, or a first non-blank character `{`)
    whose lines hold a `prompt` field and optionally an `id` (GenEval's metadata files are such files).
    """
    path = Path(path)
    if not path.is_file():
        raise CommandError(f"prompt file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise CommandError(f"cannot read the prompt file {path}: {error}") from error
    numbered = [(number, line.strip()) for number, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:
        raise CommandError(f"the prompt file {path} holds no prompts")
    json_lines = path.suffix.lower() == ".jsonl" or numbered[0][1].startswith("{")
    entries, ids = [], {}
    for index, (number, text) in enumerate(numbered):
        if not json_lines:
            entries.append(PromptEntry(index, number, text, json.dumps({"prompt": text}), f"{index:05d}"))
            continue
        try:
            row = json.loads(text)
        except ValueError as error:
            raise CommandError(f"{path} line {number} is not valid JSON: {error}") from error
        if not isinstance(row, dict):
            raise CommandError(f"{path} line {number} is not a JSON object")
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise CommandError(f"{path} line {number} has no \"prompt\" string")
        entry_id = _check_id(row["id"], number, path) if "id" in row else f"{index:05d}"
        if entry_id in ids:
            raise CommandError(f"{path} line {number}: \"id\" {entry_id!r} is already the id of line {ids[entry_id]}")
        ids[entry_id] = number
        entries.append(PromptEntry(index, number, prompt, text, entry_id))
    return entries


def image_paths(out: Path, entry: PromptEntry, num_images: int, layout: str) -> list[Path]:
    if layout == "geneval":
        return [out / f"{entry.index:05d}" / "samples" / f"{k:04d}.png" for k in range(num_images)]
    if num_images == 1:
        return [out / f"{entry.id}.png"]
    return [out / f"{entry.id}_{k}.png" for k in range(num_images)]


def metadata_path(out: Path, entry: PromptEntry) -> Path:
    return out / f"{entry.index:05d}" / "metadata.jsonl"


class ImageProgress(ItemProgress):
    """`ItemProgress` over images, advanced a prompt at a time; plain lines carry the rate too."""

    def __init__(self, total: int, enabled: bool = True):
        super().__init__(total if enabled else 0, unit="image")
        self.enabled = enabled
        self.start = time.perf_counter()

    def advance(self, count: int, message: str) -> None:
        if not self.enabled:
            return
        self.count += count
        if self._bar is not None:
            self._bar.write(message, file=sys.stdout)
            self._bar.update(count)
        else:
            rate = self.count / max(time.perf_counter() - self.start, 1e-9)
            print(f"{message} ({self.count}/{self.total} images, {rate:.2f} images/s)", flush=True)


def generate_batch(args) -> None:
    """The `--prompts` form of `pisces generate` (see the module docstring)."""
    if args.output is not None:
        raise CommandError("--prompts writes into --out DIR; -o/--output is for a single prompt")
    if args.out is None:
        raise CommandError("--prompts FILE needs --out DIR")
    commands._require_at_least_one(args, "--steps", "--num-images", "--batch-size")
    if args.num_images > MAX_IMAGES_PER_PROMPT:
        raise CommandError(f"--num-images must be at most {MAX_IMAGES_PER_PROMPT} with --prompts, got {args.num_images}")
    if args.guidance is not None and args.guidance < 1:
        raise CommandError(f"--guidance must be at least 1 (1 turns guidance off), got {args.guidance}")
    layout = args.layout or "geneval"
    batch_size = args.batch_size or 4
    entries = read_prompt_file(args.prompts)
    out = Path(args.out)
    commands._check_output_folder(out, "--out", args.resume, args.overwrite, "pass --resume to draw what is missing, ")

    from . import distributed

    if args.overwrite and distributed.is_main_process() and out.is_dir():
        clear_folder(out)
    distributed.wait_for_everyone()

    # Every process looks at the same files before any writes, so all agree on what is left to draw.
    batches, skipped = [], 0
    for first in range(0, len(entries), batch_size):
        batch, batch_complete = [], 0
        for entry in entries[first : first + batch_size]:
            paths = image_paths(out, entry, args.num_images, layout)
            if layout == "geneval" and metadata_path(out, entry).is_file():
                if metadata_path(out, entry).read_text(encoding="utf-8").strip() != entry.metadata:
                    raise CommandError(
                        f"--resume: {metadata_path(out, entry)} holds another prompt than line {entry.line} of "
                        f"{args.prompts}; pass --overwrite or a new --out"
                    )
            missing = [k for k, path in enumerate(paths) if not (path.is_file() and commands._is_complete_png(path))]
            complete = not missing and (layout != "geneval" or metadata_path(out, entry).is_file())
            batch_complete += complete
            batch.append((entry, missing))
        skipped += batch_complete
        if batch_complete < len(batch):
            batches.append(batch)
    distributed.wait_for_everyone()
    total_images = sum(len(missing) for batch in batches for _, missing in batch)
    drawn_prompts = sum(1 for batch in batches for _, missing in batch if missing)
    mine = [batch for _, batch in distributed.split_for_this_process(batches)]

    start = time.perf_counter()
    if any(missing for batch in mine for _, missing in batch):
        _draw(args, out, layout, mine, distributed)
    else:
        for batch in mine:
            for entry, _ in batch:
                _write_metadata(out, entry, layout)
    distributed.wait_for_everyone()
    seconds = time.perf_counter() - start
    if distributed.is_main_process():
        rate = total_images / seconds if seconds > 0 and total_images else 0.0
        print(f"wrote {total_images} images for {drawn_prompts} prompts ({skipped} skipped as complete) in "
              f"{seconds:.1f} s, {rate:.2f} images/s")


def _write_metadata(out: Path, entry: PromptEntry, layout: str) -> None:
    path = metadata_path(out, entry)
    if layout == "geneval" and not path.is_file():
        write_text_atomically(path, entry.metadata + "\n")


def _draw(args, out: Path, layout: str, batches: list, distributed) -> None:
    """Draws this process's batches: each whole (every image of every prompt), writing only the missing images."""
    import torch

    pipe = commands._load_pipeline(commands._model_folder(args.model))
    pipe.to(distributed.this_process_device())
    pipe.set_progress_bar_config(disable=True)
    total = sum(len(missing) for batch in batches for _, missing in batch)
    with ImageProgress(total, enabled=distributed.is_main_process()) as progress:
        for batch in batches:
            for entry, _ in batch:
                _write_metadata(out, entry, layout)
            if not any(missing for _, missing in batch):
                continue
            try:
                with torch.no_grad():
                    # The LLM predicts each prompt's vectors once; its images decode them with their own noise.
                    vectors = pipe.encode_prompt([entry.prompt for entry, _ in batch], guidance_scale=args.guidance)
                rows = vectors.repeat_interleave(args.num_images, dim=0)
                generators = [
                    torch.Generator().manual_seed(image_seed(args.seed, entry.index, k))
                    for entry, _ in batch
                    for k in range(args.num_images)
                ]
                images = pipe(image_embeds=rows, num_inference_steps=args.steps, generator=generators).images
            except ValueError as error:
                raise CommandError(str(error)) from error
            for position, (entry, missing) in enumerate(batch):
                paths = image_paths(out, entry, args.num_images, layout)
                for k in missing:
                    image = images[position * args.num_images + k]
                    write_file_atomically(paths[k], lambda file, image=image: image.save(file, format="PNG"))
                if missing:
                    progress.advance(len(missing), f"wrote {len(missing)} images of prompt {entry.index}")
