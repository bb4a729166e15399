"""The `pisces` command.

It sits in the top layer (`pisces.training`) because its sub-commands reach every layer; `import pisces` never imports
it. Heavy imports happen inside each sub-command, so `pisces --help` is instant.
"""

import argparse
import sys
from pathlib import Path


class CommandError(Exception):
    """A mistake the user can fix; printed as one line, without a traceback."""


def _load_checkpoint(path: str):
    import pisces  # noqa: F401  (registers the Auto classes)
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    folder = Path(path)
    if not folder.is_dir():
        raise CommandError(f"model folder not found: {path}")
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


def _load_pipeline(path: str):
    import pisces  # noqa: F401  (registers the pipeline)
    from pisces import PiscesPipeline

    folder = Path(path)
    if not folder.is_dir():
        raise CommandError(f"model folder not found: {path}")
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
    for name, value in (("--steps", args.steps), ("--num-images", args.num_images)):
        if value < 1:
            raise CommandError(f"{name} must be at least 1, got {value}")
    if args.guidance is not None and args.guidance < 1:
        raise CommandError(f"--guidance must be at least 1 (1 turns guidance off), got {args.guidance}")

    pipe = _load_pipeline(args.model)
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
    import json

    from pisces.training.shape_eval import CATEGORIES, evaluate_generation, evaluate_understanding

    for name, value in (("--images-per-prompt", args.images_per_prompt), ("--num-scenes", args.num_scenes),
                        ("--steps", args.steps)):
        if value < 1:
            raise CommandError(f"{name} must be at least 1, got {value}")
    pipe = _load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    result = evaluate_generation(pipe, images_per_prompt=args.images_per_prompt, num_inference_steps=args.steps)
    result.update(evaluate_understanding(pipe.model, pipe.processor, num_scenes=args.num_scenes))
    print(f"ShapeEval v{result['version']} (prompts {result['prompts']}), {result['num_images']} images")
    for name in CATEGORIES:
        print(f"  {name:<20}{result['categories'][name]:.3f}")
    print(f"  {'overall':<20}{result['overall']:.3f}")
    print(f"  {'held-out pairs':<20}{result['held_out']:.3f}")
    print(f"  {'question answering':<20}{result['vqa_accuracy']:.3f}  ({result['num_questions']} questions)")
    print(f"  {'detailed captions':<20}{result['caption_accuracy']:.3f}  ({result['num_captions']} scenes)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


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
    if args.max_new_tokens < 1:
        raise CommandError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")

    model, processor = _load_checkpoint(args.model)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :])[0]
    print(answer.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pisces", description="Pisces: unified image understanding and generation.")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="build Pisces checkpoints")
    convert_kinds = convert.add_subparsers(dest="kind", required=True)
    random = convert_kinds.add_parser("random", help="a checkpoint with random weights (tests, smoke runs, sizing)")
    random.add_argument("--preset", default="tiny", choices=["tiny", "pisces-8b"])
    random.add_argument("--out", help="folder to write")
    random.add_argument("--seed", type=int, default=0)
    random.add_argument("--meta", action="store_true", help="print parameter counts and bf16 memory, allocate nothing")
    random.set_defaults(run=convert_random)

    generate_cmd = commands.add_parser("generate", help="draw a picture from a prompt")
    generate_cmd.add_argument("prompt")
    generate_cmd.add_argument("-o", "--output", default="out.png", help="PNG file; several images get -0, -1, ...")
    generate_cmd.add_argument("--model", required=True, help="a Pisces checkpoint folder")
    generate_cmd.add_argument("--seed", type=int, default=0)
    generate_cmd.add_argument("--steps", type=int, default=25, help="denoising steps")
    generate_cmd.add_argument("--guidance", type=float, default=None, help="guidance on the LLM's vectors")
    generate_cmd.add_argument("--num-images", type=int, default=1)
    generate_cmd.set_defaults(run=generate)

    evaluate = commands.add_parser("eval", help="benchmarks")
    eval_kinds = evaluate.add_subparsers(dest="benchmark", required=True)
    shapes = eval_kinds.add_parser("shapes", help="ShapeEval (generation) and question answering on the shapes world")
    shapes.add_argument("--model", required=True, help="a Pisces checkpoint folder")
    shapes.add_argument("--json", help="write the scores to this JSON file")
    shapes.add_argument("--images-per-prompt", type=int, default=4)
    shapes.add_argument("--num-scenes", type=int, default=50, help="held-out scenes for question answering")
    shapes.add_argument("--steps", type=int, default=25, help="denoising steps")
    shapes.set_defaults(run=eval_shapes)

    describe_cmd = commands.add_parser("describe", help="answer a question about an image")
    describe_cmd.add_argument("image")
    describe_cmd.add_argument("--prompt", default="Describe the image.")
    describe_cmd.add_argument("--model", required=True, help="a Pisces checkpoint folder")
    describe_cmd.add_argument("--max-new-tokens", type=int, default=32)
    describe_cmd.set_defaults(run=describe)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except CommandError as error:
        print(f"pisces: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
