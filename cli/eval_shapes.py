"""`pisces eval shapes`: ShapeEval (every split) and question answering on the shapes world, printed and optionally
saved as JSON."""

import json
import sys

from .commands import _load_pipeline, _model_folder, _require_at_least_one
from .output_files import write_text_atomically


class PromptProgress:
    """
    Progress over evaluated prompts: a tqdm bar on stderr when it is a terminal, else one line per finished prompt
    (a bar redrawn with carriage returns is unreadable in a log).
    """

    def __init__(self, terminal: bool | None = None):
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self._bar = None

    def prompt_done(self, done: int, total: int, prompt, passed: int) -> None:
        if self.terminal:
            if self._bar is None:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, unit="prompt", file=sys.stderr, dynamic_ncols=True)
            self._bar.update(done - self._bar.n)
        else:
            print(f"[{done}/{total}] {prompt.category}: {prompt.prompt!r} passed {passed}", file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        self.close()
        print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def report_lines(result: dict) -> list[str]:
    """The printed report of an `evaluate_generation` + `evaluate_understanding` result."""
    from pisces.shapes import CATEGORIES

    lines = [f"ShapeEval v{result['version']}"]

    def split_lines(title, summary, extra):
        lines.append(f"  {title} (prompts {summary['prompts']}), {summary['num_images']} images")
        for name in CATEGORIES:
            if name in summary["categories"]:
                lines.append(f"    {name:<24}{summary['categories'][name]:.3f}")
        lines.append(f"    {'overall':<24}{summary['overall']:.3f}")
        for label, value in extra:
            if value is not None:
                lines.append(f"    {label:<24}{value:.3f}")

    split_lines("v1", result, [("held-out pairs", result["held_out"])])
    splits = result.get("splits", {})
    if "named_colours" in splits:
        summary = splits["named_colours"]
        split_lines("named colours", summary, [("held-out pairs", summary["held_out"])])
    if "paraphrase" in splits:
        summary = splits["paraphrase"]
        split_lines("paraphrase", summary, [("same prompts canonical", summary["canonical"])])
    lines.append("Understanding (held-out scenes)")
    lines.append(f"  {'questions':<24}{result['vqa_accuracy']:.3f}  ({result['num_questions']} questions)")
    lines.append(f"  {'paraphrased questions':<24}{result['vqa_paraphrased_accuracy']:.3f}  (the same, reworded)")
    lines.append(f"  {'detailed captions':<24}{result['caption_accuracy']:.3f}  ({result['num_captions']} scenes)")
    return lines


def eval_shapes(args) -> None:
    from pisces.shapes import evaluate_generation, evaluate_understanding

    _require_at_least_one(args, "--images-per-prompt", "--num-scenes", "--steps")
    pipe = _load_pipeline(_model_folder(args.model))
    pipe.set_progress_bar_config(disable=True)
    progress = PromptProgress()
    try:
        result = evaluate_generation(
            pipe,
            images_per_prompt=args.images_per_prompt,
            num_inference_steps=args.steps,
            progress=progress.prompt_done,
        )
        progress.message("answering questions")
        result.update(
            evaluate_understanding(pipe.model, pipe.processor, num_scenes=args.num_scenes, progress=progress.message)
        )
    finally:
        progress.close()
    print("\n".join(report_lines(result)))
    if args.json:
        write_text_atomically(args.json, json.dumps(result, indent=2))
        print(f"wrote {args.json}")
