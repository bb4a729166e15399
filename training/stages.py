"""Stage presets: which parameters of a `PiscesForConditionalGeneration` train in each stage.

The paper trains in three stages: pretraining on image + short caption in both directions,
fine-grained pretraining on image + detailed caption, then instruction tuning. Both encoders and the diffusion decoder
stay frozen by default (the generation encoder is built frozen; only a `custom` pattern that names it trains it); what
trains is a preset, a list of module name patterns:

| stage      | trains                                                          | default learning rate |
| ---------- | --------------------------------------------------------------- | --------------------- |
| `align`    | `und_projector`, `gen_projector`, `gen_head`, `lm_head`         | 1e-3                  |
| `pretrain` | the language model (with its embeddings) + the above             | 1e-4                  |
| `finetune` | the same as `pretrain`, at the instruction-tuning rate           | 2e-5                  |
| `custom`   | the patterns you pass                                           | 1e-4                  |

`align` is the short warm-up that connects fresh projectors and heads to a pretrained LLM (as in LLaVA); the paper's
stages 1 and 2 are `pretrain` on short, then detailed captions; stage 3 is `finetune` on a mix of understanding and
generation. For LoRA on the language model see `pisces.default_lora_config` and `pisces train --lora` (projectors and
heads then train whole).
"""

import fnmatch
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class StagePreset:
    """What trains in a stage: module name patterns (see `matches`) and the stage's default learning rate."""

    trainable: tuple[str, ...]
    learning_rate: float


_CONNECTORS = ("model.und_projector", "model.gen_projector", "gen_head", "lm_head")
STAGES = {
    "align": StagePreset(trainable=_CONNECTORS, learning_rate=1e-3),
    "pretrain": StagePreset(trainable=("model.language_model",) + _CONNECTORS, learning_rate=1e-4),
    "finetune": StagePreset(trainable=("model.language_model",) + _CONNECTORS, learning_rate=2e-5),
}
STAGE_NAMES = tuple(STAGES) + ("custom",)
CUSTOM_LEARNING_RATE = 1e-4


def matches(name: str, pattern: str) -> bool:
    """
    Whether parameter `name` belongs to the module `pattern`: the parameter itself, anything under the module
    (`gen_head` matches `gen_head.linear_1.weight`), and shell-style wildcards (`model.language_model.layers.1*`).
    """
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def stage_patterns(stage: str, trainable: list[str] | None = None) -> tuple[str, ...]:
    """The module name patterns that train in `stage`; `custom` takes them from `trainable`."""
    if stage == "custom":
        if not trainable:
            raise ValueError(
                "The custom stage needs module name patterns, e.g. trainable=['gen_head', 'model.gen_projector']."
            )
        return tuple(trainable)
    if stage not in STAGES:
        raise ValueError(f"Unknown stage {stage!r}; choose one of {', '.join(STAGE_NAMES)}.")
    if trainable:
        raise ValueError(f"Module patterns are only for the custom stage; {stage!r} is a preset.")
    return STAGES[stage].trainable


def apply_stage(model: nn.Module, stage: str, trainable: list[str] | None = None) -> list[str]:
    """
    Freezes every parameter of `model` but those of `stage` (or, for `stage="custom"`, those matching `trainable`).

    Args:
        model: a `PiscesForConditionalGeneration`.
        stage: `"align"`, `"pretrain"`, `"finetune"` or `"custom"`.
        trainable: module name patterns (see `matches`), for `"custom"` only.

    Returns:
        The sorted names of the parameters that train. Raises `ValueError` when a pattern matches nothing.
    """
    patterns = stage_patterns(stage, trainable)
    names = [name for name, _ in model.named_parameters()]
    unmatched = [pattern for pattern in patterns if not any(matches(name, pattern) for name in names)]
    if unmatched:
        raise ValueError(
            f"No parameter of the model matches {', '.join(unmatched)}; module names look like "
            "model.language_model, model.vision_tower, model.gen_vision_tower, model.und_projector, "
            "model.gen_projector, lm_head, gen_head."
        )
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(any(matches(name, pattern) for pattern in patterns))
    return trainable_parameter_names(model)


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """The sorted names of the parameters of `model` with `requires_grad`."""
    return sorted(name for name, parameter in model.named_parameters() if parameter.requires_grad)


__all__ = [
    "STAGES", "STAGE_NAMES", "StagePreset", "apply_stage", "matches", "stage_patterns", "trainable_parameter_names"
]
