"""`pisces eval shapes`: ShapeEval and question answering on the shapes world, printed and optionally saved as JSON."""

import json
from pathlib import Path

from .commands import _load_pipeline, _model_folder, _require_at_least_one


def eval_shapes(args) -> None:
    from pisces.shapes import CATEGORIES, evaluate_generation, evaluate_understanding

    _require_at_least_one(args, "--images-per-prompt", "--num-scenes", "--steps")
    pipe = _load_pipeline(_model_folder(args.model))
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
