"""The shapes world and ShapeEval: a synthetic world of coloured shapes where drawing and answering are measurable.

`world` makes the scenes, their pictures, captions and questions, and the text-to-image pairs; `shape_eval` scores a
Pisces pipeline on them (GenEval's six categories in three prompt splits, question answering in the world's wording
and paraphrased, detailed captions); `paraphrase` rewords prompts and questions the ways people write them. Training (the reference
recipe) and evaluation (`pisces eval shapes`) both use it; it needs only numpy and PIL at import.
"""

from .paraphrase import paraphrase_prompt, paraphrase_question
from .shape_eval import (
    CATEGORIES,
    SHAPEEVAL_VERSION,
    SPLITS,
    Detection,
    EvalPrompt,
    detect_objects,
    evaluate_generation,
    evaluate_understanding,
    held_out_prompts,
    named_colour_prompts,
    paraphrase_prompts,
    prompt_objects,
    prompts_fingerprint,
    render_prompt,
    score,
    shapeeval_prompts,
    split_prompts,
    summarize,
)
from .world import (
    BINDING_QUESTION_STARTS,
    BRIEF_CAPTION_QUESTION,
    COLOURS,
    DEFAULT_COLOURS,
    DETAILED_CAPTION_QUESTION,
    GRID,
    HELD_OUT_PAIRS,
    IMAGE_SIZE,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    binding_questions,
    detailed_caption,
    generation_objects,
    image_array,
    is_held_out,
    questions,
    render_objects,
    sample_generation,
    sample_scene,
    short_caption,
)


__all__ = [
    "BINDING_QUESTION_STARTS", "BRIEF_CAPTION_QUESTION", "CATEGORIES", "COLOURS", "DEFAULT_COLOURS",
    "DETAILED_CAPTION_QUESTION", "GRID", "HELD_OUT_PAIRS", "IMAGE_SIZE", "SHAPEEVAL_VERSION", "SHAPES", "SIZES", "SPLITS",
    "Detection", "EvalPrompt", "Scene", "ShapeObject", "binding_questions", "detailed_caption", "detect_objects",
    "evaluate_generation", "evaluate_understanding", "generation_objects", "held_out_prompts", "image_array",
    "is_held_out", "named_colour_prompts", "paraphrase_prompt", "paraphrase_prompts", "paraphrase_question",
    "prompt_objects", "prompts_fingerprint", "questions", "render_objects", "render_prompt", "sample_generation",
    "sample_scene", "score", "shapeeval_prompts", "short_caption", "split_prompts",
    "summarize",
]
