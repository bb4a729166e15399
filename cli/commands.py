"""The `pisces` command: its parser and sub-commands.

The command line is its own layer, above every layer it calls (training, conversion, the shapes world, pipelines,
processing, the model). Each sub-command imports what it needs inside it, and this module imports only the standard
library at the top, so `pisces --help` and a bad argument answer without loading torch.
"""

import argparse
import sys
from pathlib import Path


class CommandError(Exception):
    """A mistake the user can fix; printed as one line, without a traceback."""


def _require_at_least_one(args, *options: str) -> None:
    """Fails with a one-line error when an integer option (e.g. `"--max-steps"`) is given below 1."""
    for option in options:
        value = getattr(args, option.removeprefix("--").replace("-", "_"))
        if value is not None and value < 1:
            raise CommandError(f"{option} must be at least 1, got {value}")


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
    from pisces.conversion import build_random_checkpoint, describe_parameters, preset_config

    if args.meta:
        counts = describe_parameters(preset_config(args.preset))
        total = sum(counts.values())
        for name, count in counts.items():
            print(f"{name:>18} {count / 1e6:12.1f} M")
        print(f"{'total':>18} {total / 1e6:12.1f} M   {total * 2 / 2**30:.2f} GiB in bfloat16")
        return
    if args.out is None:
        raise CommandError("--out DIR is required (or pass --meta to only print the sizes)")
    try:
        out = build_random_checkpoint(args.out, preset=args.preset, seed=args.seed)
    except ValueError as error:
        raise CommandError(str(error)) from error
    print(f"wrote a random {args.preset} Pisces checkpoint to {out}")


def convert_assemble(args) -> None:
    from pisces.conversion import assemble_checkpoint

    _require_at_least_one(args, "--num-gen-tokens")
    try:
        out = assemble_checkpoint(
            llm=args.llm,
            und_encoder=args.und_encoder,
            gen_encoder=args.gen_encoder,
            out_dir=args.out,
            decoder=args.decoder,
            decoder_preset=args.decoder_preset,
            vae=args.vae,
            scheduler=args.scheduler,
            num_gen_tokens=args.num_gen_tokens,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            seed=args.seed,
        )
    except (OSError, ValueError) as error:
        raise CommandError(str(error)) from error
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


def generate(args) -> None:
    import torch

    out = Path(args.output)
    if out.suffix.lower() != ".png":
        raise CommandError(f"-o/--output must name a .png file, got {args.output}")
    _require_at_least_one(args, "--steps", "--num-images")
    if args.guidance is not None and args.guidance < 1:
        raise CommandError(f"--guidance must be at least 1 (1 turns guidance off), got {args.guidance}")

    pipe = _load_pipeline(_model_folder(args.model))
    pipe.set_progress_bar_config(disable=not sys.stderr.isatty())
    generator = torch.Generator().manual_seed(args.seed)
    try:
        images = pipe(
            args.prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            num_images_per_prompt=args.num_images,
            generator=generator,
        ).images
    except ValueError as error:
        raise CommandError(str(error)) from error
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
        print(f"wrote {path}")


def eval_shapes(args) -> None:
    from .eval_shapes import eval_shapes as run

    run(args)


def describe(args) -> None:
    import torch
    from PIL import Image, UnidentifiedImageError

    image_path = Path(args.image)
    if not image_path.is_file():
        raise CommandError(f"image not found: {args.image}")
    try:
        image = Image.open(image_path)
        image.load()
    except (UnidentifiedImageError, OSError) as error:
        raise CommandError(f"cannot read {args.image} as an image: {error}") from error
    _require_at_least_one(args, "--max-new-tokens")

    model, processor = _load_checkpoint(_model_folder(args.model))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :])[0]
    print(answer.strip())


def _load_rows(data: str, split: str):
    """Training rows: an image folder (metadata.jsonl), a folder saved by `datasets`, or a `datasets` Hub name."""
    from pisces.training.data import load_image_folder

    folder = Path(data)
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


def train(args) -> None:
    from transformers import HfArgumentParser, TrainingArguments

    from pisces.training.stages import CUSTOM_LEARNING_RATE, STAGES
    from pisces.training.trainer import build_trainer

    if args.stage == "custom" and not args.trainable:
        raise CommandError("--stage custom needs --trainable PATTERN [PATTERN ...] (module names, * wildcards)")
    if args.stage != "custom" and args.trainable:
        raise CommandError(f"--trainable is for --stage custom; {args.stage} is a preset")
    if args.lora and args.stage not in ("pretrain", "finetune"):
        raise CommandError("--lora adapts the language model; use it with --stage pretrain or finetune")
    _require_at_least_one(args, "--max-steps", "--batch-size", "--grad-accum")
    out = Path(args.out)
    if args.resume and not any(out.glob("checkpoint-*")):
        raise CommandError(f"--resume: {out} holds no checkpoint-* folder to resume from")

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
    rows = _load_rows(args.data, args.split)
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
    trainer.train(resume_from_checkpoint=True if args.resume else None)

    # On every process: under FSDP or ZeRO-3 the Trainer gathers the shards into one checkpoint. A PEFT model saves
    # its adapter (adapter_config.json, adapter_model.safetensors), as the Trainer's checkpoint-* folders do.
    trainer.save_model(str(out))
    if not trainer.is_world_process_zero():
        return
    (out / "training_args.bin").unlink(missing_ok=True)  # a pickle; the checkpoint folder holds safetensors only
    checkpoint = out
    if args.lora:
        # The adapter stays at the root, where PEFT looks for it; the merged model is a complete checkpoint beside it
        # (not at the root too: transformers would load the adapter again on top of the merged weights).
        checkpoint = out / LORA_MERGED_FOLDER
        trainer.accelerator.unwrap_model(trainer.model).merge_and_unload().save_pretrained(checkpoint)
        processor.save_pretrained(checkpoint)
    if pipe is not None:
        pipe.save_components(checkpoint)  # the decoder, the VAE and the scheduler did not train: carried over
    last = next((log for log in reversed(trainer.state.log_history) if "loss" in log), {})
    losses = ", ".join(f"{key} {last[key]:.4f}" for key in ("loss", "lm_loss", "gen_loss") if key in last)
    if args.lora:
        print(f"trained {trainer.state.global_step} steps ({losses}); wrote the LoRA adapter to {out} and the merged "
              f"checkpoint to {checkpoint}")
    else:
        print(f"trained {trainer.state.global_step} steps ({losses}); wrote the checkpoint to {out}")


def train_decoder(args) -> None:
    from accelerate import PartialState

    from pisces.training.decoder_training import train_decoder as run

    _require_at_least_one(args, "--max-steps", "--batch-size", "--grad-accum")
    if args.ema_decay is not None and not 0 < args.ema_decay < 1:
        raise CommandError(f"--ema-decay must be in (0, 1), got {args.ema_decay}")
    pipe = _load_pipeline(args.model)
    rows = _load_rows(args.data, args.split)
    try:
        losses = run(
            pipe, rows, max_steps=args.max_steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
            gradient_accumulation_steps=args.grad_accum, condition_dropout=args.condition_dropout,
            ema_decay=args.ema_decay, mixed_precision=args.mixed_precision, seed=args.seed,
            logging_steps=args.logging_steps, image_column=args.image_column,
        )
    except ValueError as error:
        raise CommandError(str(error)) from error
    if PartialState().is_main_process:
        pipe.save_pretrained(args.out)
        print(f"trained the decoder {len(losses)} steps (loss {losses[0]:.4f} -> {losses[-1]:.4f}); "
              f"wrote the checkpoint to {args.out}")


def train_reference(args) -> None:
    from pisces.training import reference

    try:
        out = reference.train_reference(Path(args.out), seed=args.seed, recipe=args.recipe)
    except (FileExistsError, ValueError) as error:
        raise CommandError(str(error)) from error
    print(f"wrote the reference model ({args.recipe}, seed {args.seed}) to {out}")


REFERENCE_RECIPES = ("joint", "generation-only")
# `pisces train --lora --out RUN`: the adapter at RUN, the merged checkpoint in RUN/merged.
LORA_MERGED_FOLDER = "merged"
MODEL_HELP = "a Pisces checkpoint folder (default: the reference model shipped with pisces-hf)"


def build_parser() -> argparse.ArgumentParser:
    from pisces.conversion import DECODER_PRESETS, PRESETS

    parser = argparse.ArgumentParser(prog="pisces", description="Pisces: unified image understanding and generation.")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="build Pisces checkpoints")
    convert_kinds = convert.add_subparsers(dest="kind", required=True)
    random = convert_kinds.add_parser("random", help="a checkpoint with random weights (tests, smoke runs, sizing)")
    random.add_argument("--preset", default="tiny", choices=PRESETS)
    random.add_argument("--out", help="folder to write")
    random.add_argument("--seed", type=int, default=0)
    random.add_argument("--meta", action="store_true", help="print parameter counts and bf16 memory, allocate nothing")
    random.set_defaults(run=convert_random)
    assemble = convert_kinds.add_parser(
        "assemble", help="a checkpoint from public components: an LLM, a SigLIP, a CLIP-like encoder, a decoder"
    )
    assemble.add_argument("--llm", required=True, help="causal LM with its tokenizer (folder or Hub repo id)")
    assemble.add_argument("--und-encoder", required=True, help="SigLIP checkpoint, full or vision-only")
    assemble.add_argument("--gen-encoder", required=True, help="CLIP or SigLIP checkpoint, full or vision-only")
    assemble.add_argument("--out", required=True, help="folder to write (new or empty)")
    decoder_source = assemble.add_mutually_exclusive_group()
    decoder_source.add_argument("--decoder", help="diffusers UNet2DConditionModel (folder, or a pipeline with unet/)")
    decoder_source.add_argument(
        "--decoder-preset", choices=list(DECODER_PRESETS), help="a fresh decoder (default: small)"
    )
    assemble.add_argument("--vae", help="diffusers AutoencoderKL; without it the decoder works in pixels")
    assemble.add_argument("--scheduler", help="diffusers scheduler folder (default: DDIM)")
    assemble.add_argument("--num-gen-tokens", type=int, default=64, help="generation tokens per image")
    assemble.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    assemble.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB")
    assemble.add_argument("--seed", type=int, default=0, help="seeds the fresh projectors, heads and decoder")
    assemble.set_defaults(run=convert_assemble)

    generate_cmd = commands.add_parser("generate", help="draw a picture from a prompt")
    generate_cmd.add_argument("prompt")
    generate_cmd.add_argument("-o", "--output", default="out.png", help="PNG file; several images get -0, -1, ...")
    generate_cmd.add_argument("--model", help=MODEL_HELP)
    generate_cmd.add_argument("--seed", type=int, default=0)
    generate_cmd.add_argument("--steps", type=int, default=25, help="denoising steps")
    generate_cmd.add_argument("--guidance", type=float, default=None, help="guidance on the LLM's vectors")
    generate_cmd.add_argument("--num-images", type=int, default=1)
    generate_cmd.set_defaults(run=generate)

    evaluate = commands.add_parser("eval", help="benchmarks")
    eval_kinds = evaluate.add_subparsers(dest="benchmark", required=True)
    shapes = eval_kinds.add_parser("shapes", help="ShapeEval (generation) and question answering on the shapes world")
    shapes.add_argument("--model", help=MODEL_HELP)
    shapes.add_argument("--json", help="write the scores to this JSON file")
    shapes.add_argument("--images-per-prompt", type=int, default=4)
    shapes.add_argument("--num-scenes", type=int, default=50, help="held-out scenes for question answering")
    shapes.add_argument("--steps", type=int, default=25, help="denoising steps")
    shapes.set_defaults(run=eval_shapes)

    describe_cmd = commands.add_parser("describe", help="answer a question about an image")
    describe_cmd.add_argument("image")
    describe_cmd.add_argument("--prompt", default="Describe the image.")
    describe_cmd.add_argument("--model", help=MODEL_HELP)
    describe_cmd.add_argument("--max-new-tokens", type=int, default=96, help="stops earlier at the end of the answer")
    describe_cmd.set_defaults(run=describe)
    train_cmd = commands.add_parser(
        "train",
        help="train the LLM side (stage presets, LoRA) with the transformers Trainer; `pisces train reference` trains "
        "the reference model",
        description="Trains with transformers.Trainer; Trainer arguments after `--` pass through "
        "(e.g. `-- --warmup_steps 100 --lr_scheduler_type cosine`). Runs unchanged under `accelerate launch`. "
        "`pisces train reference --out DIR` trains the reference model from nothing instead "
        "(see `pisces train reference --help`).",
    )
    train_cmd.add_argument("--model", required=True, help="a Pisces checkpoint folder")
    train_cmd.add_argument("--data", required=True, help="an image folder (metadata.jsonl) or a datasets name/folder")
    train_cmd.add_argument("--stage", default="pretrain", choices=["align", "pretrain", "finetune", "custom"])
    train_cmd.add_argument("--trainable", nargs="+", help="module name patterns that train (--stage custom)")
    train_cmd.add_argument("--out", required=True, help="output folder: checkpoints, then the trained checkpoint")
    train_cmd.add_argument("--max-steps", type=int, help="optimizer steps (default: --epochs over the data)")
    train_cmd.add_argument("--epochs", type=float, default=1.0)
    train_cmd.add_argument("--batch-size", type=int, default=8, help="per process")
    train_cmd.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    train_cmd.add_argument("--learning-rate", type=float, help="default: the stage's")
    train_cmd.add_argument("--generation-ratio", type=float, default=0.5, help="share of rows used for text-to-image")
    train_cmd.add_argument("--caption-dropout", type=float, default=0.1, help="empty prompt on this share of them")
    train_cmd.add_argument(
        "--lora", action="store_true",
        help="LoRA on the language model (pisces.default_lora_config): the PEFT adapter in --out, the merged "
        "checkpoint in --out/merged",
    )
    train_cmd.add_argument("--lora-rank", type=int, default=8)
    train_cmd.add_argument("--lora-alpha", type=int, default=16)
    train_cmd.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    train_cmd.add_argument("--save-steps", type=int, default=500)
    train_cmd.add_argument("--logging-steps", type=int, default=10)
    train_cmd.add_argument("--seed", type=int, default=0)
    train_cmd.add_argument("--gradient-checkpointing", action="store_true")
    train_cmd.add_argument("--bf16", action="store_true")
    train_cmd.add_argument("--fp16", action="store_true")
    train_cmd.add_argument("--split", default="train", help="split of a datasets dataset")
    train_cmd.add_argument("--image-column", default="image")
    train_cmd.add_argument("--text-column", default="text")
    train_cmd.add_argument("trainer_args", nargs="*", help="after --: transformers TrainingArguments flags")
    train_cmd.set_defaults(run=train)

    decoder_cmd = commands.add_parser(
        "train-decoder", help="train the diffusion decoder on the frozen gen encoder's vectors (accelerate)"
    )
    decoder_cmd.add_argument("--model", required=True, help="a Pisces pipeline checkpoint folder")
    decoder_cmd.add_argument("--data", required=True, help="an image folder (metadata.jsonl) or a datasets name/folder")
    decoder_cmd.add_argument("--out", required=True, help="output folder: the checkpoint with the trained decoder")
    decoder_cmd.add_argument("--max-steps", type=int, default=1000)
    decoder_cmd.add_argument("--batch-size", type=int, default=8, help="per process")
    decoder_cmd.add_argument("--grad-accum", type=int, default=1)
    decoder_cmd.add_argument("--learning-rate", type=float, default=1e-4)
    decoder_cmd.add_argument("--condition-dropout", type=float, default=0.1, help="zero vectors (decoder guidance)")
    decoder_cmd.add_argument("--ema-decay", type=float, help="keep an EMA of the weights, e.g. 0.9999")
    decoder_cmd.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    decoder_cmd.add_argument("--seed", type=int, default=0)
    decoder_cmd.add_argument("--logging-steps", type=int, default=10)
    decoder_cmd.add_argument("--split", default="train", help="split of a datasets dataset")
    decoder_cmd.add_argument("--image-column", default="image")
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
        "shapes world, into --out.",
    )
    parser.add_argument(
        "--out", required=True, help="output folder: new or empty, or holding a partial run of the same recipe"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recipe", default="joint", choices=REFERENCE_RECIPES)
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
        print(f"pisces: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
