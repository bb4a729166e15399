"""
The static KV cache and the compiled one-position step of `generate_image_embeddings`.

A decode step of the vector loop runs one position through the language model, `gen_head`, the guidance combination
and `gen_projector`. Eager, that is a few hundred small kernels whose launch cost exceeds the weight reads of a small
model on CPU, and of any model on a GPU. With a static cache every step has the same shapes, so `torch.compile` can
fuse it (and, on CUDA with `mode="reduce-overhead"`, replay it as one captured graph).

Shapes stay fixed across calls, so that a compiled step is reused instead of recompiled:
- the cache is `max_cache_len` long: the generation config's `max_cache_len` when set, otherwise the prompt plus the
  generated positions rounded up to a multiple of `CACHE_LENGTH_MULTIPLE`, and never shorter than the last cache this
  model used at that batch size. Prompts of different lengths inside that length reuse the same cache and graph;
- the attention mask handed to the step is the whole cache length (the prompt's padding, then ones: causality hides
  the positions not written yet), so it is the same tensor at every step;
- the guidance scale is a 0-d tensor, not a Python float the graph would be specialized on.

On CPU the step is compiled with `FewRowMatmulPass` (`few_row_matmul.py`), which swaps the operands of its 2- to 4-row
matrix products, the shape at which MKL is slowest.
"""

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import CompileConfig, PretrainedConfig
from transformers.cache_utils import StaticCache


# A short caption plus 64 vectors fits one bucket, a detailed one two; short, because every step attends over the
# whole reserved length.
CACHE_LENGTH_MULTIPLE = 128

CACHE_IMPLEMENTATIONS = ("dynamic", "static")


def choose_cache_implementation(
    cache_implementation: str | None, compile_config: CompileConfig | None, generation_config
) -> str:
    """
    The cache `generate_image_embeddings` runs with: the argument, else the generation config's
    `cache_implementation`, else `"static"` when a compile config was given, else `"dynamic"`.
    """
    if cache_implementation is None:
        cache_implementation = getattr(generation_config, "cache_implementation", None)
    if cache_implementation is None:
        cache_implementation = "static" if compile_config is not None else "dynamic"
    if cache_implementation not in CACHE_IMPLEMENTATIONS:
        raise ValueError(
            f"generate_image_embeddings supports cache_implementation 'dynamic' or 'static', got "
            f"{cache_implementation!r}."
        )
    if cache_implementation == "dynamic" and compile_config is not None:
        raise ValueError(
            "A compile_config needs cache_implementation='static' (a dynamic cache changes shape every step); pass "
            "cache_implementation='static' or drop compile_config."
        )
    return cache_implementation


def choose_compile_config(
    compile_config: CompileConfig | None, generation_config, device: torch.device
) -> CompileConfig | None:
    """
    The compile settings of the static decode step, or `None` for eager: the argument, else the generation config's
    `compile_config`; without either, `CompileConfig()` (`mode="reduce-overhead"`, CUDA graphs) on accelerators and
    eager on CPU, where compiling a small model costs tens of seconds. `generation_config.disable_compile` wins.
    """
    if getattr(generation_config, "disable_compile", None):
        return None
    if compile_config is None:
        compile_config = getattr(generation_config, "compile_config", None)
    if compile_config is None and device.type in ("cuda", "xpu"):
        compile_config = CompileConfig()
    if compile_config is not None and not isinstance(compile_config, CompileConfig):
        raise TypeError(f"compile_config must be a transformers.CompileConfig, got {type(compile_config).__name__}.")
    return compile_config


def compile_context(device: torch.device):
    """
    The inductor settings a CPU decode step is compiled under: `FewRowMatmulPass` as the post-grad custom pass,
    unless one is set already (by the caller's inductor config). Entered around the calls that may compile.
    """
    if device.type != "cpu":
        return contextlib.nullcontext()
    import torch._inductor.config as inductor_config

    if inductor_config.post_grad_custom_post_pass is not None:
        return contextlib.nullcontext()
    # Imported here: inductor is loaded only when something is compiled.
    from .few_row_matmul import FEW_ROW_MATMUL

    return inductor_config.patch(post_grad_custom_post_pass=FEW_ROW_MATMUL)


def round_up_cache_length(needed: int, multiple: int = CACHE_LENGTH_MULTIPLE) -> int:
    return -(-needed // multiple) * multiple


@dataclass
class StaticImageDecoding:
    """
    Per-model state of the static path: one cache per (batch size, dtype, device), reused (reset, same storage) by
    later calls so that a compiled step, and a captured CUDA graph, see the same tensors; and the compiled step per
    compile config.
    """

    caches: dict = field(default_factory=dict)
    compiled_steps: list = field(default_factory=list)

    def cache(
        self,
        text_config: PretrainedConfig,
        batch_size: int,
        needed_length: int,
        max_cache_len: int | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> StaticCache:
        """A reset static cache of `batch_size` rows holding at least `needed_length` positions."""
        if max_cache_len is not None and max_cache_len < needed_length:
            raise ValueError(
                f"The prompt and the generated vectors need {needed_length} cache positions, but the generation "
                f"config's max_cache_len is {max_cache_len}; raise it or shorten the prompt."
            )
        key = (batch_size, dtype, device)
        cache = self.caches.get(key)
        length = max_cache_len or round_up_cache_length(needed_length)
        if cache is not None and max_cache_len is None:
            length = max(length, cache.get_max_length())
        if cache is None or cache.get_max_length() != length:
            cache = StaticCache(config=text_config, max_cache_len=length)
            self.caches[key] = cache
        else:
            cache.reset()
        return cache

    def compiled(self, step: Callable, compile_config: CompileConfig) -> Callable:
        """`step` compiled with `compile_config`, compiled once per config."""
        for config, compiled_step in self.compiled_steps:
            if config == compile_config:
                return compiled_step
        compiled_step = torch.compile(step, **compile_config.to_dict())
        self.compiled_steps.append((compile_config, compiled_step))
        return compiled_step
