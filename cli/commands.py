"""The `pisces` command: its parser and sub-commands.

The command line is its own layer, above every layer it calls (training, conversion, the shapes world, pipelines,
processing, the model). Each sub-command imports what it needs inside it, and this module imports only the standard
library at the top, so `pisces --help` and a bad argument answer without loading torch.
"""

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

from .output_files import clear_folder, move_folder_contents, partial_name, write_file_atomically, write_folder_atomically


class CommandError(Exception):
    """A mistake the user can fix; printed as one line, without a traceback."""


def _require_at_least_one(args, *options: str) -> None:
    """Fails with a one-line error when an integer option (e.g. `"--max-steps"`) is given below 1."""
    for option in options:
        value = getattr(args, option.removeprefix("--").replace("-", "_"))
        if value is not None and value < 1:
            raise CommandError(f"{option} must be at least 1, got {value}")


def _one_line(error: BaseException) -> str:
    """The message of `error` on one line (library messages may list things on several)."""
    return " ".join(str(error).split())


def _check_output_folder(out: Path, option: str, resume: bool, overwrite: bool, resume_hint: str) -> None:
    """
    Refuses a non-empty output folder unless the run resumes (`resume`) or replaces it (`overwrite`): a new run beside
    an old one would mix their checkpoints, and a later resume would pick the stale one.
    """
    if resume and overwrite:
        raise CommandError("--resume continues the run in the output folder and --overwrite deletes it: pass one")
    if not out.exists():
        return
    if not out.is_dir():
        raise CommandError(f"{option} {out} is a file, not a folder")
    if overwrite:
        here = Path.cwd().resolve()
        if out.resolve() in (here, *here.parents):
            raise CommandError(f"--overwrite would delete {out}, which holds the working directory; pass another {option}")
        return
    if not resume and any(out.iterdir()):
        raise CommandError(
            f"{option} {out} is not empty (it may hold another run); {resume_hint}pass --overwrite to replace it, or a "
            f"new {option}"
        )


def _is_main_process() -> bool:
    """Whether this is the first process of a `accelerate launch` / `torchrun` run (read without loading torch)."""
    return os.environ.get("RANK", "0") == "0"


def _model_folder(model: str | None) -> str:
    """The `--model` folder, or the reference model that ships inside the package when `--model` is not given."""
    if model is not None:
        return model
    from pisces.reference_model import reference_model_path

    try:
        return str(reference_model_path())
    except FileNotFoundError as error:
        raise CommandError(f"no --model given: {error}") from error


def _checkpoint_folder(path: str) -> Path:
    """
    `path` as an absolute folder: the model then records where it came from (`name_or_path`, which a PEFT adapter
    saves as `base_model_name_or_path`) in a form that loads from any working directory.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CommandError(f"model folder not found: {path}")
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        merged = folder / LORA_MERGED_FOLDER
        hint = f"; its merged checkpoint is {merged}" if merged.is_dir() else ""
        raise CommandError(f"{path} is a LoRA adapter (load it with peft.PeftModel on its base model){hint}")
    return folder.resolve()


def _load_checkpoint(path: str):
    import pisces  # noqa: F401  (registers the Auto classes)
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    folder = _checkpoint_folder(path)
    if not (folder / "config.json").is_file():
        raise CommandError(f"{path} is not a Pisces checkpoint: it has no config.json")
    try:
        # The config alone says whether this is a Pisces checkpoint; check it before loading any weights.
        config = AutoConfig.from_pretrained(folder)
        if config.model_type != "pisces":
            raise CommandError(f"{path} is not a Pisces checkpoint (model_type={config.model_type!r})")
        model = AutoModelForImageTextToText.from_pretrained(folder, config=config, use_safetensors=True)
        processor = AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as error:
        raise CommandError(f"could not load a Pisces checkpoint from {path}: {error}") from error
    return model.eval(), processor


def convert_random(args) -> None:
    if not args.meta:
        if args.out is None:
            raise CommandError("--out DIR is required (or pass --meta to only print the sizes)")
        _check_new_folder(Path(args.out))

    from pisces.conversion import build_random_checkpoint, describe_parameters, preset_config

    if args.meta:
        counts = describe_parameters(preset_config(args.preset))
        total = sum(counts.values())
        for name, count in counts.items():
            print(f"{name:>18} {count / 1e6:12.1f} M")
        print(f"{'total':>18} {total / 1e6:12.1f} M   {total * 2 / 2**30:.2f} GiB in bfloat16")
        return
    out = Path(args.out)
    try:
        write_folder_atomically(out, lambda folder: build_random_checkpoint(folder, preset=args.preset, seed=args.seed))
    except ValueError as error:
        raise CommandError(str(error)) from error
    print(f"wrote a random {args.preset} Pisces checkpoint to {out}")


def _check_new_folder(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CommandError(f"{out} already exists and is not an empty folder; choose a new output folder")


def convert_assemble(args) -> None:
    _require_at_least_one(args, "--num-gen-tokens")
    out = Path(args.out)
    _check_new_folder(out)

    from pisces.conversion import assemble_checkpoint

    # Assembled under a hidden sibling and renamed: an interrupted run leaves no half checkpoint at --out.
    def assemble(folder: Path) -> None:
        assemble_checkpoint(
            llm=args.llm,
            und_encoder=args.und_encoder,
            gen_encoder=args.gen_encoder,
            out_dir=folder,
            decoder=args.decoder,
            decoder_preset=args.decoder_preset,
            vae=args.vae,
            scheduler=args.scheduler,
            num_gen_tokens=args.num_gen_tokens,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            seed=args.seed,
        )

    try:
        write_folder_atomically(out, assemble)
    except (OSError, ValueError) as error:
        raise CommandError(str(error).replace(str(partial_name(out)), str(out))) from error
    print(f"wrote a Pisces checkpoint assembled from {args.llm}, {args.und_encoder} and {args.gen_encoder} to {out}")


def _load_pipeline(path: str):
    import pisces  # noqa: F401  (registers the pipeline)
    from pisces import PiscesPipeline

    folder = _checkpoint_folder(path)
    if not (folder / "model_index.json").is_file():
        raise CommandError(
            f"{path} is not a Pisces pipeline checkpoint: it has no model_index.json (a folder with only the LLM can "
            "describe images, not draw them)"
        )
    try:
        return PiscesPipeline.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as error:
        raise CommandError(f"could not load a Pisces pipeline from {path}: {error}") from error


def _image_paths(output: Path, num_images: int) -> list[Path]:
    """`output` for one image; `stem-0.png`, `stem-1.png`, ... beside it for several."""
    if num_images == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{index}{output.suffix}") for index in range(num_images)]


def _is_complete_png(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()  # every chunk present with its checksum
        return True
    except (OSError, SyntaxError):  # PIL raises SyntaxError for some broken PNGs
        return False


def generate(args) -> None:
    if args.prompt is not None and args.prompt_option is not None:
        raise CommandError("pass the prompt once: as PROMPT or as --prompt")
    prompt = args.prompt if args.prompt is not None else args.prompt_option
    if prompt is not None and args.prompts is not None:
        raise CommandError("pass one prompt (PROMPT or --prompt) or a file of them (--prompts FILE), not both")
    if args.prompts is not None:
        from .batch_generate import generate_batch

        generate_batch(args)
        return
    if prompt is None:
        raise CommandError("the following arguments are required: prompt (or --prompts FILE)")
    args.prompt = prompt
    for option, given in (("--out", args.out), ("--layout", args.layout), ("--batch-size", args.batch_size),
                          ("--overwrite", args.overwrite or None)):
        if given is not None:
            raise CommandError(f"{option} is for --prompts FILE; a single prompt writes -o/--output")
    args.output = "out.png" if args.output is None else args.output
    out = Path(args.output)
    if out.suffix.lower() != ".png":
        raise CommandError(f"-o/--output must name a .png file, got {args.output}")
    _require_at_least_one(args, "--steps", "--num-images")
    if args.guidance is not None and args.guidance < 1:
        raise CommandError(f"--guidance must be at least 1 (1 turns guidance off), got {args.guidance}")
    paths = _image_paths(out, args.num_images)
    # Image i is drawn with seed --seed + i, alone: it does not depend on which other images this run draws, so a
    # resumed run draws the missing ones exactly as the interrupted run would have.
    todo = [index for index, path in enumerate(paths) if not (args.resume and path.is_file() and _is_complete_png(path))]
    if args.resume and len(todo) < len(paths):
        print(f"kept the {len(paths) - len(todo)} images already written; drawing {len(todo)}")
    if not todo:
        return

    import torch

    from .progress import ItemProgress

    pipe = _load_pipeline(_model_folder(args.model))
    out.parent.mkdir(parents=True, exist_ok=True)
    with ItemProgress(total=len(todo), unit="image") as progress:
        # The denoising bar of each image on a terminal; under the images bar it is cleared when the image is done.
        pipe.set_progress_bar_config(disable=not progress.terminal, leave=len(todo) == 1)
        vectors = []

        def keep_vectors(pipe, step, timestep, tensors):
            if step == 0:
                vectors.append(tensors["image_embeds"])
            return {}

        for index in todo:
            generator = torch.Generator().manual_seed(args.seed + index)
            try:
                if not vectors:
                    # The LLM predicts the prompt's vectors once; every other image decodes them with its own noise.
                    image = pipe(
                        args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance, generator=generator,
                        callback_on_step_end=keep_vectors, callback_on_step_end_tensor_inputs=["image_embeds"],
                    ).images[0]
                else:
                    image = pipe(image_embeds=vectors[0], num_inference_steps=args.steps, generator=generator).images[0]
            except ValueError as error:
                raise CommandError(str(error)) from error
            write_file_atomically(paths[index], lambda file: image.save(file, format="PNG"))
            progress.done(f"wrote {paths[index]}")


def eval_shapes(args) -> None:
    from .eval_shapes import eval_shapes as run

    run(args)


def describe(args) -> None:
    if args.questions is not None:
        if args.image is not None:
            raise CommandError("pass either an image or --questions FILE, not both")
        if args.out is None:
            raise CommandError("--questions needs --out ANSWERS.jsonl")
        from .batch_describe import batch_describe

        return batch_describe(args)
    if args.image is None:
        raise CommandError("pass an image, or --questions FILE --out ANSWERS.jsonl")
    for option in ("out", "resume", "overwrite"):
        if getattr(args, option):
            raise CommandError(f"--{option} goes with --questions FILE")
    image_path = Path(args.image)
    if not image_path.is_file():
        raise CommandError(f"image not found: {args.image}")
    if not args.prompt.strip():
        raise CommandError("--prompt is empty: ask a question about the image (default: 'Describe the image.')")
    _require_at_least_one(args, "--max-new-tokens")

    import torch
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(image_path)
        image.load()
    except (UnidentifiedImageError, OSError) as error:
        raise CommandError(f"cannot read {args.image} as an image: {error}") from error

    model, processor = _load_checkpoint(_model_folder(args.model))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt}]}]
    try:
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=[image], text=[text], return_tensors="pt")
    except ValueError as error:  # e.g. a question longer than the language model's context
        raise CommandError(str(error)) from error
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :])[0]
    print(answer.strip())


def _load_rows(data: str, split: str, streaming: bool = False, max_steps: int | None = 1):
    """
    Training rows: an image folder (metadata.jsonl), a folder saved by `datasets`, or a `datasets` Hub name; or a
    stream, read as training goes: WebDataset shards (a `.tar` brace pattern or glob, or a folder of `.tar` files), or,
    with `streaming`, any of the `datasets` sources (and `.parquet` / `.json` / `.jsonl` files or globs). A stream has
    no length to count epochs over, so it needs `max_steps` (None: the user gave no --max-steps).
    """
    from pisces.training.data import load_image_folder

    folder = Path(data)
    webdataset = data.endswith((".tar", ".tar}")) or (
        folder.is_dir() and not (folder / "metadata.jsonl").is_file() and any(folder.glob("*.tar"))
    )
    if webdataset or streaming:
        if max_steps is None:
            raise CommandError(f"--data {data} is a stream, which has no length: pass --max-steps")
        if webdataset:
            try:
                import webdataset  # noqa: F401
            except ImportError as error:
                raise CommandError(
                    f"{data} names WebDataset shards; to read them, install `webdataset` (pip install 'pisces-hf[train]')"
                ) from error
        try:
            from pisces.training.streaming import streaming_rows

            return streaming_rows(data, split=split)
        except ImportError as error:
            raise CommandError(f"streaming needs `datasets` (pip install 'pisces-hf[train]'): {error}") from error
        except (OSError, ValueError) as error:
            raise CommandError(f"could not stream the data {data}: {_one_line(error)}") from error
    if (folder / "metadata.jsonl").is_file():
        try:
            return load_image_folder(folder)
        except ValueError as error:
            raise CommandError(str(error)) from error
    try:
        import datasets
    except ImportError as error:
        raise CommandError(
            f"{data} is not an image folder with a metadata.jsonl; to read it as a Hugging Face dataset, install "
            "`datasets` (pip install 'pisces-hf[train]')"
        ) from error
    try:
        if folder.is_dir():
            loaded = datasets.load_from_disk(str(folder))
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        return datasets.load_dataset(data, split=split)
    except (OSError, ValueError, FileNotFoundError) as error:
        raise CommandError(f"could not load the data {data}: {error}") from error


def _load_trainable(path: str):
    """(pipeline or None, model, processor) of a checkpoint folder; a pipeline folder keeps its decoder."""
    if (Path(path) / "model_index.json").is_file():
        pipe = _load_pipeline(path)
        return pipe, pipe.model, pipe.processor
    model, processor = _load_checkpoint(path)
    return None, model, processor


def _last_checkpoint(out: Path) -> Path | None:
    """
    The `checkpoint-N` folder of `out` with the largest N that holds its `trainer_state.json` (written last), the one a
    resumed run continues from; None when there is none. Read here without loading torch, for the early checks.
    """
    steps = {}
    for folder in out.glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", folder.name)
        if match and (folder / "trainer_state.json").is_file():
            steps[int(match.group(1))] = folder
    return steps[max(steps)] if steps else None


def _resume_kind(args, out: Path) -> None:
    """
    Makes `args` resume the run in `out` as the kind it is: a LoRA run (its checkpoints hold `adapter_config.json`)
    resumes as LoRA with its own rank and alpha, `--lora` given or not; a full-model run refuses `--lora`.
    """
    checkpoint = _last_checkpoint(out)
    if checkpoint is None:
        raise CommandError(f"--resume: {out} holds no checkpoint-* folder to resume from")
    adapter_config = checkpoint / "adapter_config.json"
    if not adapter_config.is_file():
        if args.lora:
            raise CommandError(
                f"--resume --lora: {checkpoint} holds a full model, not a LoRA adapter (no adapter_config.json); "
                "resume this run without --lora"
            )
        return
    try:
        adapter = json.loads(adapter_config.read_text())
    except (OSError, ValueError) as error:
        raise CommandError(f"--resume: cannot read {adapter_config}: {error}") from error
    for option, key in (("--lora-rank", "r"), ("--lora-alpha", "lora_alpha")):
        given = getattr(args, option.removeprefix("--").replace("-", "_"))
        if given is not None and key in adapter and given != adapter[key]:
            raise CommandError(
                f"--resume: the run in {out} is a LoRA run with {option} {adapter[key]}, not {given}; drop {option}"
            )
    if not args.lora and _is_main_process():
        print(f"resuming the LoRA run in {out} ({checkpoint.name} holds a LoRA adapter)")
    args.lora = True
    args.lora_rank = adapter.get("r", args.lora_rank)
    args.lora_alpha = adapter.get("lora_alpha", args.lora_alpha)


def _log_last_step():
    """A callback that logs the last step too (the Trainer logs only every `logging_steps`), for the summary."""
    from transformers import TrainerCallback

    class LogLastStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = True
            return control

    return LogLastStep()


# The finished checkpoint is written here first, then moved to the run's root: `config.json` (or the adapter's
# config) last, so a root that has it has every other file too.
FINAL_PARTIAL_FOLDER = ".final.partial"
CHECKPOINT_MARKERS = ("model_index.json", "adapter_config.json", "config.json")


def train(args) -> None:
    if args.stage == "custom" and not args.trainable:
        raise CommandError("--stage custom needs --trainable PATTERN [PATTERN ...] (module names, * wildcards)")
    if args.stage != "custom" and args.trainable:
        raise CommandError(f"--trainable is for --stage custom; {args.stage} is a preset")
    _require_at_least_one(args, "--max-steps", "--batch-size", "--grad-accum", "--lora-rank", "--lora-alpha")
    out = Path(args.out)
    _check_output_folder(out, "--out", args.resume, args.overwrite, "pass --resume to continue its run, ")
    if args.resume:
        _resume_kind(args, out)
    if args.lora and args.stage not in ("pretrain", "finetune"):
        raise CommandError("--lora adapts the language model; use it with --stage pretrain or finetune")
    args.lora_rank = 8 if args.lora_rank is None else args.lora_rank
    args.lora_alpha = 16 if args.lora_alpha is None else args.lora_alpha

    from transformers import HfArgumentParser, TrainingArguments

    from pisces.training.stages import CUSTOM_LEARNING_RATE, STAGES
    from pisces.training.trainer import build_trainer

    learning_rate = args.learning_rate
    if learning_rate is None:
        learning_rate = CUSTOM_LEARNING_RATE if args.stage == "custom" else STAGES[args.stage].learning_rate
    # Pisces' defaults first, then whatever Trainer arguments followed `--`: the later value wins.
    trainer_argv = [
        "--output_dir", str(out),
        "--per_device_train_batch_size", str(args.batch_size),
        "--gradient_accumulation_steps", str(args.grad_accum),
        "--learning_rate", str(learning_rate),
        "--max_steps", str(args.max_steps or -1),
        "--num_train_epochs", str(args.epochs),
        "--logging_steps", str(args.logging_steps),
        "--save_steps", str(args.save_steps),
        "--seed", str(args.seed),
        "--report_to", "none",
        "--remove_unused_columns", "False",
    ]
    # transformers 5.24 renamed gradient_checkpointing -> activation_checkpointing (the old name warns).
    checkpointing = "activation_checkpointing"
    if checkpointing not in TrainingArguments.__dataclass_fields__:
        checkpointing = "gradient_checkpointing"
    trainer_argv += ["--bf16"] * args.bf16 + ["--fp16"] * args.fp16
    trainer_argv += [f"--{checkpointing}"] * args.gradient_checkpointing
    try:
        (training_args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
            args=trainer_argv + list(args.trainer_args)
        )
    except ValueError as error:
        raise CommandError(f"bad Trainer arguments: {error}") from error

    pipe, model, processor = _load_trainable(args.model)
    rows = _load_rows(args.data, args.split, streaming=args.streaming, max_steps=args.max_steps)
    stage = args.stage
    if args.lora:
        from peft import get_peft_model
        from transformers import set_seed

        from pisces import default_lora_config

        set_seed(args.seed)  # LoRA's A matrices start random: the same --seed, the same adapter
        model = get_peft_model(model, default_lora_config(model, r=args.lora_rank, lora_alpha=args.lora_alpha))
        stage = None
    try:
        trainer = build_trainer(
            model, processor, rows, training_args, stage=stage, trainable=args.trainable,
            generation_ratio=args.generation_ratio, caption_dropout=args.caption_dropout, data_seed=args.seed,
            image_column=args.image_column, text_column=args.text_column,
        )
    except ValueError as error:
        raise CommandError(str(error)) from error
    trainer.add_callback(_log_last_step())
    # Only the first process touches the folder; no process writes into it before the first step's collectives.
    if args.overwrite and _is_main_process() and out.is_dir():
        clear_folder(out)
    final = out / FINAL_PARTIAL_FOLDER
    if _is_main_process():
        shutil.rmtree(final, ignore_errors=True)  # left by a run killed while saving
    trainer.train(resume_from_checkpoint=True if args.resume else None)

    # On every process: under FSDP or ZeRO-3 the Trainer gathers the shards into one checkpoint. A PEFT model saves
    # its adapter (adapter_config.json, adapter_model.safetensors), as the Trainer's checkpoint-* folders do.
    trainer.save_model(str(final))
    if not trainer.is_world_process_zero():
        return
    (final / "training_args.bin").unlink(missing_ok=True)  # a pickle; the checkpoint folder holds safetensors only
    checkpoint = out
    if args.lora:
        # The adapter stays at the root, where PEFT looks for it; the merged model is a complete checkpoint beside it
        # (not at the root too: transformers would load the adapter again on top of the merged weights).
        checkpoint = out / LORA_MERGED_FOLDER
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()

        def save_merged(folder: Path) -> None:
            merged.save_pretrained(folder)
            processor.save_pretrained(folder)
            if pipe is not None:
                pipe.save_components(folder)

        write_folder_atomically(checkpoint, save_merged)
    elif pipe is not None:
        pipe.save_components(final)  # the decoder, the VAE and the scheduler did not train: carried over
    move_folder_contents(final, out, last=CHECKPOINT_MARKERS)
    last = next((log for log in reversed(trainer.state.log_history) if "loss" in log), {})
    losses = ", ".join(f"{key} {last[key]:.4f}" for key in ("loss", "lm_loss", "gen_loss") if key in last)
    if last and last.get("step") != trainer.state.global_step:
        losses = f"at step {last.get('step')}: {losses}"
    if args.lora:
        print(f"trained {trainer.state.global_step} steps ({losses}); wrote the LoRA adapter to {out} and the merged "
              f"checkpoint to {checkpoint}")
    else:
        print(f"trained {trainer.state.global_step} steps ({losses}); wrote the checkpoint to {out}")


def _check_pipeline_folder(path: str) -> None:
    """The torch-free part of `_load_pipeline`'s checks, so that argument mistakes answer before anything loads."""
    folder = _checkpoint_folder(path)
    if not (folder / "model_index.json").is_file():
        raise CommandError(
            f"{path} is not a Pisces pipeline checkpoint: it has no model_index.json (a folder with only the LLM can "
            "describe images, not draw them)"
        )


def train_decoder(args) -> None:
    _require_at_least_one(args, "--max-steps", "--batch-size", "--grad-accum", "--save-steps", "--save-total-limit")
    if args.ema_decay is not None and not 0 < args.ema_decay < 1:
        raise CommandError(f"--ema-decay must be in (0, 1), got {args.ema_decay}")
    _check_pipeline_folder(args.model)
    out = Path(args.out)
    _check_output_folder(out, "--out", args.resume, args.overwrite, "pass --resume to continue its run, ")
    if args.resume and _last_checkpoint(out) is None:
        raise CommandError(f"--resume: {out} holds no complete checkpoint-* folder to resume from")

    from accelerate import PartialState

    from pisces.training.decoder_training import train_decoder as run

    pipe = _load_pipeline(args.model)
    rows = _load_rows(args.data, args.split, streaming=args.streaming, max_steps=args.max_steps)
    if _is_main_process():
        if args.overwrite and out.is_dir():
            clear_folder(out)
        shutil.rmtree(out / FINAL_PARTIAL_FOLDER, ignore_errors=True)  # left by a run killed while saving
    try:
        losses = run(
            pipe, rows, max_steps=args.max_steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
            gradient_accumulation_steps=args.grad_accum, condition_dropout=args.condition_dropout,
            ema_decay=args.ema_decay, mixed_precision=args.mixed_precision, seed=args.seed,
            logging_steps=args.logging_steps, image_column=args.image_column, output_dir=str(out),
            save_steps=args.save_steps, save_total_limit=args.save_total_limit,
            resume_from_checkpoint=True if args.resume else None,
        )
    except ValueError as error:
        raise CommandError(str(error)) from error
    if PartialState().is_main_process:
        final = out / FINAL_PARTIAL_FOLDER
        shutil.rmtree(final, ignore_errors=True)
        pipe.save_pretrained(final)
        move_folder_contents(final, out, last=CHECKPOINT_MARKERS)
        print(f"trained the decoder {len(losses)} steps (loss {losses[0]:.4f} -> {losses[-1]:.4f}); "
              f"wrote the checkpoint to {args.out}")


def train_reference(args) -> None:
    out = Path(args.out)
    work = out.with_name(out.name + ".partial")
    if args.overwrite:
        _check_output_folder(out, "--out", False, True, "")
        for folder in (out, work):
            shutil.rmtree(folder, ignore_errors=True)
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CommandError(
            f"--out {out} is not empty (a finished run resumes nothing; an interrupted one continues from {work}); "
            "pass --overwrite to train again from nothing, or a new --out"
        )

    if args.components_from is not None and not (Path(args.components_from) / "model_index.json").is_file():
        raise CommandError(f"--components-from {args.components_from} is not a pipeline folder (no model_index.json)")

    from pisces.training import reference

    try:
        out = reference.train_reference(
            out, seed=args.seed, recipe=args.recipe, budget=reference.BUDGETS[args.budget],
            components_from=args.components_from,
        )
    except (FileExistsError, ValueError) as error:
        raise CommandError(str(error)) from error
    print(f"wrote the reference model ({args.recipe}, seed {args.seed}) to {out}")


# Choices of the parser, kept here so that `pisces --help` loads no torch (importing `pisces.conversion` would); a test
# checks that they equal `pisces.conversion.PRESETS`, `DECODER_PRESETS` and the reference recipe's `RECIPES`.
CHECKPOINT_PRESETS = ("tiny", "pisces-8b")
REFERENCE_BUDGETS = ("reference", "wording", "wording-long")
DECODER_PRESET_NAMES = ("tiny", "reference", "small", "sdxl")
REFERENCE_RECIPES = ("joint", "generation-only")
# `pisces train --lora --out RUN`: the adapter at RUN, the merged checkpoint in RUN/merged.
LORA_MERGED_FOLDER = "merged"
MODEL_HELP = "a Pisces checkpoint folder (default: the reference model shipped with pisces-hf)"


class HelpFormatter(argparse.HelpFormatter):
    """
    Every option's help ends with its default, `(default: 25)`, or `(default: off)` for a flag. An option whose default
    needs words (None meaning "the stage's", "the reference model") says it in its own help, with the word "default".
    """

    def _get_help_string(self, action):
        help_text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or "default" in help_text:
            return help_text
        if action.nargs == 0:
            return f"{help_text} (default: off)".strip()
        if action.default is None:
            return help_text
        return f"{help_text} (default: %(default)s)".strip()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pisces-hf")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def _add_parser(commands, name: str, **kwargs) -> argparse.ArgumentParser:
    return commands.add_parser(name, formatter_class=HelpFormatter, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pisces", description="Pisces: unified image understanding and generation.", formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = _add_parser(commands, "convert", help="build Pisces checkpoints")
    convert_kinds = convert.add_subparsers(dest="kind", required=True)
    random = _add_parser(
        convert_kinds, "random", help="a checkpoint with random weights (tests, smoke runs, sizing)"
    )
    random.add_argument("--preset", default="tiny", choices=CHECKPOINT_PRESETS, help="the size")
    random.add_argument("--out", help="folder to write, new or empty (no default: required unless --meta)")
    random.add_argument("--seed", type=int, default=0, help="seeds the random weights")
    random.add_argument("--meta", action="store_true", help="print parameter counts and bf16 memory, allocate nothing")
    random.set_defaults(run=convert_random)
    assemble = _add_parser(
        convert_kinds, "assemble", help="a checkpoint from public components: an LLM, a SigLIP, a CLIP-like encoder, a decoder"
    )
    assemble.add_argument("--llm", required=True, help="causal LM with its tokenizer (folder or Hub repo id)")
    assemble.add_argument("--und-encoder", required=True, help="SigLIP checkpoint, full or vision-only")
    assemble.add_argument("--gen-encoder", required=True, help="CLIP or SigLIP checkpoint, full or vision-only")
    assemble.add_argument("--out", required=True, help="folder to write (new or empty)")
    decoder_source = assemble.add_mutually_exclusive_group()
    decoder_source.add_argument(
        "--decoder", help="diffusers UNet2DConditionModel, a folder or a pipeline with unet/ (default: --decoder-preset)"
    )
    decoder_source.add_argument(
        "--decoder-preset", choices=DECODER_PRESET_NAMES, help="a fresh decoder (default: small, without --decoder)"
    )
    assemble.add_argument(
        "--vae", help="diffusers AutoencoderKL (default: none, the decoder then works in pixels)"
    )
    assemble.add_argument("--scheduler", help="diffusers scheduler folder (default: DDIM)")
    assemble.add_argument("--num-gen-tokens", type=int, default=64, help="generation tokens per image")
    assemble.add_argument(
        "--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="dtype of the saved weights"
    )
    assemble.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB")
    assemble.add_argument("--seed", type=int, default=0, help="seeds the fresh projectors, heads and decoder")
    assemble.set_defaults(run=convert_assemble)

    generate_cmd = _add_parser(
        commands, "generate", help="draw a picture from a prompt, or images for a file of prompts (benchmarks)",
        description="Draws PROMPT into -o/--output, or, with --prompts FILE --out DIR, --num-images images for every "
        "prompt of FILE (plain text, one prompt a line; or JSON lines with a \"prompt\" field, e.g. GenEval's "
        "metadata file). Layout geneval: DIR/00000/metadata.jsonl (the prompt's JSON line) and "
        "DIR/00000/samples/0000.png, 0001.png, ... as GenEval's evaluator reads them. Layout flat: DIR/<id>.png, or "
        "DIR/<id>_<k>.png with several images (DPG-Bench style; <id> is the line's \"id\" field, else the prompt's "
        "index as 5 digits). Image k of prompt p uses seed --seed + p * 10007 + k, whatever the batch size or the "
        "number of processes. Runs unchanged under `accelerate launch` (python -m pisces_cli), which shares the "
        "prompts between the processes.",
    )
    generate_cmd.add_argument("prompt", nargs="?", help="what to draw (or --prompt, or --prompts FILE)")
    generate_cmd.add_argument("--prompt", dest="prompt_option", metavar="PROMPT", help="what to draw (default: none)")
    generate_cmd.add_argument(
        "--prompts", metavar="FILE", help="a file of prompts, .txt or .jsonl, drawn into --out (default: none)"
    )
    generate_cmd.add_argument("--out", metavar="DIR", help="with --prompts: the output folder, new or empty (default: none)")
    generate_cmd.add_argument(
        "--layout", choices=["geneval", "flat"], help="with --prompts: the files in --out (default: geneval)"
    )
    generate_cmd.add_argument(
        "--batch-size", type=int, help="with --prompts: prompts per pipeline call, per process (default: 4)"
    )
    generate_cmd.add_argument(
        "--overwrite", action="store_true", help="with --prompts: delete what --out holds, then draw"
    )
    generate_cmd.add_argument(
        "-o", "--output",
        help="PNG file; several images get -0, -1, ... (each written when done) (default: out.png)",
    )
    generate_cmd.add_argument("--model", help=MODEL_HELP)
    generate_cmd.add_argument("--seed", type=int, default=0, help="image i is drawn with seed --seed + i")
    generate_cmd.add_argument(
        "--steps", type=int, help="denoising steps (default: the checkpoint's own, default_num_inference_steps in model_index.json)"
    )
    generate_cmd.add_argument(
        "--guidance", type=float, default=None,
        help="guidance on the LLM's vectors, 1 turns it off (default: the model's generation config)",
    )
    generate_cmd.add_argument("--num-images", type=int, default=1, help="how many images to draw")
    generate_cmd.add_argument(
        "--resume", action="store_true",
        help="keep the complete images an interrupted run with the same arguments wrote; draw only the missing ones "
        "(with --prompts: skip the prompts whose images are all complete)",
    )
    generate_cmd.set_defaults(run=generate)

    evaluate = _add_parser(commands, "eval", help="benchmarks")
    eval_kinds = evaluate.add_subparsers(dest="benchmark", required=True)
    shapes = _add_parser(
        eval_kinds, "shapes", help="ShapeEval (generation) and question answering on the shapes world"
    )
    shapes.add_argument("--model", help=MODEL_HELP)
    shapes.add_argument("--json", help="write the scores to this JSON file (default: print them only)")
    shapes.add_argument("--images-per-prompt", type=int, default=4, help="images drawn per ShapeEval prompt")
    shapes.add_argument("--num-scenes", type=int, default=50, help="held-out scenes for question answering")
    shapes.add_argument(
        "--steps", type=int, help="denoising steps (default: the checkpoint's own, default_num_inference_steps in model_index.json)"
    )
    shapes.set_defaults(run=eval_shapes)

    describe_cmd = _add_parser(commands, "describe", help="answer a question about an image")
    describe_cmd.add_argument("image", nargs="?", help="the image file (or --questions)")
    describe_cmd.add_argument("--questions", help="JSON lines of {image, question | messages, id?}, answered in batches (default: none, one IMAGE)")
    describe_cmd.add_argument("--out", help="with --questions: the answers, JSON lines in input order (default: none)")
    describe_cmd.add_argument("--batch-size", type=int, default=8, help="with --questions: questions per batch")
    describe_cmd.add_argument("--resume", action="store_true", help="with --questions: keep the answers in --out")
    describe_cmd.add_argument("--overwrite", action="store_true", help="with --questions: replace the answers in --out")
    describe_cmd.add_argument("--prompt", default="Describe the image.", help="the question")
    describe_cmd.add_argument("--model", help=MODEL_HELP)
    describe_cmd.add_argument("--max-new-tokens", type=int, default=96, help="stops earlier at the end of the answer")
    describe_cmd.set_defaults(run=describe)
    train_cmd = _add_parser(
        commands, "train",
        help="train the LLM side (stage presets, LoRA) with the transformers Trainer; `pisces train reference` trains "
        "the reference model",
        description="Trains with transformers.Trainer; Trainer arguments after `--` pass through "
        "(e.g. `-- --warmup_steps 100 --lr_scheduler_type cosine`). Runs unchanged under `accelerate launch`. "
        "`pisces train reference --out DIR` trains the reference model from nothing instead "
        "(see `pisces train reference --help`).",
    )
    train_cmd.add_argument("--model", required=True, help="a Pisces checkpoint folder")
    train_cmd.add_argument(
        "--data", required=True,
        help="an image folder (metadata.jsonl), a datasets name/folder, or WebDataset shards (dir/{000000..000009}.tar, "
        "or a folder of .tar files; streamed, needs --max-steps)",
    )
    train_cmd.add_argument(
        "--streaming", action="store_true", help="stream a datasets --data (or .parquet/.jsonl files); needs --max-steps"
    )
    train_cmd.add_argument(
        "--stage", default="pretrain", choices=["align", "pretrain", "finetune", "custom"],
        help="what trains (pisces.training.stages)",
    )
    train_cmd.add_argument(
        "--trainable", nargs="+", help="module name patterns that train (default: none; required by --stage custom)"
    )
    train_cmd.add_argument(
        "--out", required=True, help="output folder, new or empty: checkpoints, then the trained checkpoint"
    )
    train_cmd.add_argument("--max-steps", type=int, help="optimizer steps (default: --epochs over the data)")
    train_cmd.add_argument("--epochs", type=float, default=1.0, help="passes over the data, without --max-steps")
    train_cmd.add_argument("--batch-size", type=int, default=8, help="per process")
    train_cmd.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    train_cmd.add_argument("--learning-rate", type=float, help="default: the stage's")
    train_cmd.add_argument("--generation-ratio", type=float, default=0.5, help="share of rows used for text-to-image")
    train_cmd.add_argument("--caption-dropout", type=float, default=0.1, help="empty prompt on this share of them")
    train_cmd.add_argument(
        "--lora", action="store_true",
        help="LoRA on the language model (pisces.default_lora_config): the PEFT adapter in --out, the merged "
        "checkpoint in --out/merged (--resume finds a LoRA run by itself)",
    )
    train_cmd.add_argument(
        "--lora-rank", type=int, help="LoRA rank (default: 8; a resumed run keeps its own)"
    )
    train_cmd.add_argument(
        "--lora-alpha", type=int, help="LoRA alpha (default: 16; a resumed run keeps its own)"
    )
    run_mode = train_cmd.add_mutually_exclusive_group()
    run_mode.add_argument(
        "--resume", action="store_true",
        help="continue the run in --out from its last checkpoint (a LoRA run resumes as LoRA)",
    )
    run_mode.add_argument("--overwrite", action="store_true", help="delete what --out holds, then train")
    train_cmd.add_argument("--save-steps", type=int, default=500, help="a checkpoint-N folder every this many steps")
    train_cmd.add_argument("--logging-steps", type=int, default=10, help="log the losses every this many steps")
    train_cmd.add_argument("--seed", type=int, default=0, help="seeds the data order, the task draw and LoRA's init")
    train_cmd.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    train_cmd.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision")
    train_cmd.add_argument("--fp16", action="store_true", help="float16 mixed precision")
    train_cmd.add_argument("--split", default="train", help="split of a datasets dataset")
    train_cmd.add_argument("--image-column", default="image", help="column of the images in a datasets dataset")
    train_cmd.add_argument("--text-column", default="text", help="column of the captions in a datasets dataset")
    train_cmd.add_argument("trainer_args", nargs="*", help="after --: transformers TrainingArguments flags")
    train_cmd.set_defaults(run=train)

    decoder_cmd = _add_parser(
        commands, "train-decoder", help="train the diffusion decoder on the frozen gen encoder's vectors (accelerate)"
    )
    decoder_cmd.add_argument("--model", required=True, help="a Pisces pipeline checkpoint folder")
    decoder_cmd.add_argument(
        "--data", required=True,
        help="an image folder (metadata.jsonl), a datasets name/folder, or WebDataset shards (dir/{000000..000009}.tar, "
        "or a folder of .tar files; streamed)",
    )
    decoder_cmd.add_argument(
        "--streaming", action="store_true", help="stream a datasets --data (or .parquet/.jsonl files)"
    )
    decoder_cmd.add_argument(
        "--out", required=True, help="output folder, new or empty: the checkpoint with the trained decoder"
    )
    decoder_run_mode = decoder_cmd.add_mutually_exclusive_group()
    decoder_run_mode.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last complete checkpoint"
    )
    decoder_run_mode.add_argument("--overwrite", action="store_true", help="delete what --out holds, then train")
    decoder_cmd.add_argument(
        "--save-steps", type=int, default=500, help="a checkpoint-N folder every this many steps, and at the last"
    )
    decoder_cmd.add_argument(
        "--save-total-limit", type=int, help="keep only this many checkpoints, the newest (default: all)"
    )
    decoder_cmd.add_argument("--max-steps", type=int, default=1000, help="optimizer steps")
    decoder_cmd.add_argument("--batch-size", type=int, default=8, help="per process")
    decoder_cmd.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    decoder_cmd.add_argument("--learning-rate", type=float, default=1e-4, help="AdamW learning rate")
    decoder_cmd.add_argument("--condition-dropout", type=float, default=0.1, help="zero vectors (decoder guidance)")
    decoder_cmd.add_argument(
        "--ema-decay", type=float, help="keep an EMA of the weights, e.g. 0.9999 (default: no EMA)"
    )
    decoder_cmd.add_argument(
        "--mixed-precision", default="no", choices=["no", "fp16", "bf16"], help="accelerate's mixed precision"
    )
    decoder_cmd.add_argument("--seed", type=int, default=0, help="seeds the noise, timesteps and condition dropout")
    decoder_cmd.add_argument("--logging-steps", type=int, default=10, help="print the loss every this many steps")
    decoder_cmd.add_argument("--split", default="train", help="split of a datasets dataset")
    decoder_cmd.add_argument("--image-column", default="image", help="column of the images in a datasets dataset")
    decoder_cmd.set_defaults(run=train_decoder)
    return parser


def build_reference_parser() -> argparse.ArgumentParser:
    """
    `pisces train reference`: parsed on its own (see `main`), because `pisces train` takes free Trainer arguments
    (`trainer_args`) and its own required options, which a nested sub-command could not share cleanly.
    """
    parser = argparse.ArgumentParser(
        prog="pisces train reference",
        description="Trains the reference model (the small Pisces shipped with the package) from nothing, on the "
        "shapes world, into --out. Work goes to --out's sibling OUT.partial/; a run that was interrupted continues "
        "from its last finished part when run again with the same arguments.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--out", required=True, help="output folder, new or empty; an interrupted run resumes from OUT.partial/"
    )
    parser.add_argument(
        "--overwrite", action="store_true",
        help="delete --out and OUT.partial/ first, and train from nothing instead of resuming",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds everything")
    parser.add_argument("--recipe", default="joint", choices=REFERENCE_RECIPES, help="the LLM stages' data")
    parser.add_argument(
        "--budget", default="reference", choices=REFERENCE_BUDGETS,
        help="steps and data of every part: the shipped model's, 'wording' (more named colours, a quarter of the "
        "prompts and questions reworded), or 'wording-long' (the same with 4,800 stage-3 steps instead of 3,200)",
    )
    parser.add_argument(
        "--components-from", metavar="FOLDER", default=None,
        help="a reference model folder whose encoders, VAE and decoder to take instead of training them; the "
        "tokenizer and the LLM stages train from nothing (default: train every part)",
    )
    parser.set_defaults(run=train_reference)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["train", "reference"]:
        args = build_reference_parser().parse_args(argv[2:])
    else:
        args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except CommandError as error:
        # A mistake the user can fix: one line. Anything else is a bug and keeps its traceback.
        print(f"pisces: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pisces: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
