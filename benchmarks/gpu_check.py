"""The checks that need an accelerator, in one script: a list of named checks, one JSON file, one printed table.

The pipeline checks build what they need from a Pisces pipeline folder (by default the reference model that ships
inside the package; `--model DIR` for another), run on the device, compare with a plain run on the same device and
return their measurements; a failed comparison raises. `--tiny` runs the same code on the CPU with a tiny random
checkpoint, and skips, saying why, the checks that need CUDA.

Run: `python benchmarks/gpu_check.py [--model DIR] [--steps 4] [--out gpu_check.json] [--only NAME ...] [--tiny]
[--skip-compile]`.
The exit status is 1 when a check failed.

Adding a check: write `def check_something(context) -> dict` (raise `CheckFailed` with the reason when it fails,
`CheckSkipped` when it cannot run here; return the numbers worth keeping) and decorate it with
`@check("something", needs_cuda=...)`.

The paper-size checks build random weights of the paper's shapes directly on the GPU in bfloat16 (`--tiny`: the tiny
preset on the CPU, float32). Expected time of each on one H200 (about 6 min in all, most of it compiling;
estimates, not yet measured):
    pipeline on device, bfloat16, the offload and group offload checks   ~20 s together (the reference model)
    understanding_generate                  ~15 s  (build 8B, 729 image tokens + question, 8 new tokens)
    image_embeddings_eager_vs_compiled     ~150 s  (build 8B, eager 2 x 64 guided vectors, compile ~2 min, replay)
    image_1024px                            ~40 s  (build 8B + SDXL-sized UNet and VAE, 20 steps at 1024 px)
    device_map_auto                         ~40 s  (a 1B-shaped LLM + the paper's encoders: save 4.5 GB, load)
    train_step_pretrain                     ~40 s  (build 8B, AdamW states 32 GB, two steps with checkpointing)
"""

import argparse
import contextlib
import gc
import json
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch


PROMPT = "a red circle above a blue square"
# The images are in [0, 1]; offloading moves weights, not arithmetic, so the same device gives the same image.
SAME_IMAGE_ATOL = 1e-3
# The weight-read bound of a decode step uses the H200's HBM3e bandwidth.
H200_BANDWIDTH = 4.8e12
# Lower precision changes the arithmetic: a loose bound that still catches a broken cast (NaNs, noise, black images).
LOW_PRECISION_ATOL = 0.1


class CheckFailed(AssertionError):
    """A check ran and its result is wrong."""


class CheckSkipped(Exception):
    """A check cannot run here (the reason is the message); what it measured before stopping is kept."""

    def __init__(self, reason: str, measurements: dict | None = None):
        super().__init__(reason)
        self.measurements = measurements or {}


@dataclass
class Check:
    name: str
    run: Callable[["Context"], dict]
    needs_cuda: bool = False
    description: str = ""


CHECKS: list[Check] = []


def check(name: str, needs_cuda: bool = False):
    """Registers a check under `name`; its docstring's first line is its description."""

    def register(run):
        CHECKS.append(Check(name, run, needs_cuda, (run.__doc__ or "").strip().splitlines()[0]))
        return run

    return register


@dataclass
class Context:
    """What every check shares: the checkpoint, the device, the denoising steps, and the plain run's image."""

    checkpoint: Path
    device: torch.device
    steps: int
    tiny: bool = False
    skip_compile: bool = False
    _reference: np.ndarray | None = field(default=None, repr=False)
    _bandwidth: float | None = field(default=None, repr=False)

    @property
    def dtype(self) -> torch.dtype:
        """The paper-size checks' dtype: bfloat16 on CUDA, float32 on the CPU (`--tiny`)."""
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def bandwidth(self) -> float:
        """Memory bandwidth in bytes/s: the H200's 4.8 TB/s on CUDA; on the CPU, measured here with a 256 MB copy."""
        if self._bandwidth is None:
            if self.device.type == "cuda":
                self._bandwidth = H200_BANDWIDTH
            else:
                source = torch.ones(64 * 2**20, dtype=torch.float32)  # 256 MB
                target = torch.empty_like(source)
                target.copy_(source)  # first touch of the pages
                start = time.perf_counter()
                for _ in range(3):
                    target.copy_(source)
                seconds = (time.perf_counter() - start) / 3
                self._bandwidth = 2 * source.numel() * source.element_size() / seconds  # read + write
        return self._bandwidth

    def load(self, **kwargs):
        from pisces import PiscesPipeline

        pipe = PiscesPipeline.from_pretrained(self.checkpoint, **kwargs)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def draw(self, pipe, **kwargs) -> np.ndarray:
        generator = torch.Generator("cpu").manual_seed(0)  # the same noise on every device
        return pipe(PROMPT, num_inference_steps=self.steps, generator=generator, output_type="np", **kwargs).images

    def reference(self) -> np.ndarray:
        """The image of a plain float32 pipeline moved to the device, computed once."""
        if self._reference is None:
            self._reference = self.draw(self.load().to(self.device))
        return self._reference

    def compare(self, images: np.ndarray, atol: float = SAME_IMAGE_ATOL) -> dict:
        if not np.isfinite(images).all():
            raise CheckFailed("the image has non-finite values")
        difference = float(np.abs(images - self.reference()).max())
        if difference > atol:
            raise CheckFailed(f"max abs difference {difference:.2e} from the plain run exceeds {atol:g}")
        return {"max_abs_diff": difference}


def peak_memory_mib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def module_devices(pipe) -> dict[str, str]:
    return {name: str(getattr(component, "device", "?")) for name, component in pipe.components.items()
            if isinstance(component, torch.nn.Module)}


# ---- the checks ----


@check("pipeline on device")
def check_pipeline_on_device(context: Context) -> dict:
    """pipe.to(device) draws a finite image, and the same image twice."""
    pipe = context.load().to(context.device)
    first, second = context.draw(pipe), context.draw(pipe)
    if not np.isfinite(first).all() or not np.array_equal(first, second):
        raise CheckFailed("the image is not finite, or not the same twice with the same seed")
    return {"devices": module_devices(pipe)}


@check("bfloat16")
def check_bfloat16(context: Context) -> dict:
    """A bfloat16 pipeline on the device draws close to the float32 one."""
    pipe = context.load(dtype=torch.bfloat16).to(context.device)
    return context.compare(context.draw(pipe), atol=LOW_PRECISION_ATOL)


@check("model cpu offload", needs_cuda=True)
def check_model_cpu_offload(context: Context) -> dict:
    """enable_model_cpu_offload: the same image, twice; every model back on the CPU with its CpuOffload hook."""
    import accelerate

    pipe = context.load()
    pipe.enable_model_cpu_offload(device=context.device)
    if pipe._execution_device.type != context.device.type:
        raise CheckFailed(f"execution device {pipe._execution_device}, expected {context.device}")
    result = context.compare(context.draw(pipe))
    result["second_run"] = context.compare(context.draw(pipe))["max_abs_diff"]
    models = {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}
    not_offloaded = [k for k, v in models.items() if v.device.type != "cpu"]
    wrong_hook = [k for k, v in models.items() if not isinstance(getattr(v, "_hf_hook", None), accelerate.hooks.CpuOffload)]
    if not_offloaded or wrong_hook:
        raise CheckFailed(f"not offloaded: {not_offloaded}; without a CpuOffload hook: {wrong_hook}")
    return result


@check("sequential cpu offload", needs_cuda=True)
def check_sequential_cpu_offload(context: Context) -> dict:
    """enable_sequential_cpu_offload: the same image; every model's weights on the meta device, behind hooks."""
    pipe = context.load()
    pipe.enable_sequential_cpu_offload(device=context.device)
    if pipe._execution_device.type != context.device.type:
        raise CheckFailed(f"execution device {pipe._execution_device}, expected {context.device}")
    result = context.compare(context.draw(pipe))
    models = {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}
    not_offloaded = [k for k, v in models.items() if v.device.type != "meta" or not hasattr(v, "_hf_hook")]
    if not_offloaded:
        raise CheckFailed(f"not offloaded to meta behind a hook: {not_offloaded}")
    return result


def _group_offload(context: Context, **options) -> dict:
    pipe = context.load()
    pipe.enable_group_offload(onload_device=context.device, offload_device=torch.device("cpu"), **options)
    result = context.compare(context.draw(pipe))
    result["second_run"] = context.compare(context.draw(pipe))["max_abs_diff"]
    # Between calls the weights are back on the CPU.
    on_device = [k for k, v in pipe.components.items()
                 if isinstance(v, torch.nn.Module) and next(v.parameters()).device.type != "cpu"]
    if on_device:
        raise CheckFailed(f"weights left on the device after the call: {on_device}")
    return result


@check("group offload, block level", needs_cuda=True)
def check_group_offload_block_level(context: Context) -> dict:
    """Pipeline-level group offloading by blocks (one per group): the same image; weights back on the CPU after."""
    return _group_offload(context, offload_type="block_level", num_blocks_per_group=1)


@check("group offload, leaf level", needs_cuda=True)
def check_group_offload_leaf_level(context: Context) -> dict:
    """Pipeline-level group offloading by leaf modules: the same image; weights back on the CPU after."""
    return _group_offload(context, offload_type="leaf_level")


@check("group offload, leaf level with streams", needs_cuda=True)
def check_group_offload_leaf_level_streams(context: Context) -> dict:
    """Leaf-level group offloading with a CUDA stream prefetching the next layer: the same image."""
    return _group_offload(context, offload_type="leaf_level", use_stream=True)


# ---- the paper-size checks: random weights of the paper's shapes (the tiny preset with --tiny) ----


QUESTION = "What shape is in the image?"
# Llama-3.2-1B's language model, between the paper's encoders: a checkpoint of about 4 GB to save and load.
LLAMA_1B_SHAPE = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                  "num_key_value_heads": 8}


@contextlib.contextmanager
def built_on(device: torch.device, dtype: torch.dtype):
    """Modules built inside are created on `device` in `dtype`: paper-size weights never pass through CPU RAM."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(default_dtype)


def build_pisces(context: Context, text_overrides: dict | None = None, dtype: torch.dtype | None = None):
    """
    A random `PiscesForConditionalGeneration` on the device and its processor: the paper's shape (`--tiny`: the tiny
    preset), the language model optionally resized by `text_overrides`.
    """
    from pisces import PiscesConfig, PiscesForConditionalGeneration
    from pisces.conversion import build_processor, build_tokenizer, preset_config
    from pisces.configuration_pisces import LLAMA_3_1_8B
    from pisces.conversion.random_checkpoint import text_generation_config
    from pisces.processing.processing_pisces import BOI_TOKEN, EOI_TOKEN, GEN_TOKEN, IMAGE_TOKEN

    if not context.tiny and context.device.type != "cuda":
        raise CheckSkipped("the paper-size model needs CUDA (run with --tiny for the tiny one on the CPU)")
    tokenizer = build_tokenizer()
    if context.tiny:
        config = preset_config("tiny", tokenizer)
    else:
        config = preset_config("pisces-8b") if text_overrides is None else PiscesConfig(
            text_config=dict(LLAMA_3_1_8B, **text_overrides)
        )
        # The paper's vocabulary stays (its embedding and lm_head are a quarter of the weights); the small test
        # tokenizer's ids all lie inside it, so its special tokens take the Pisces roles.
        roles = {"image_token_id": IMAGE_TOKEN, "boi_token_id": BOI_TOKEN, "eoi_token_id": EOI_TOKEN,
                 "gen_token_id": GEN_TOKEN}
        for role, token in roles.items():
            setattr(config, role, tokenizer.convert_tokens_to_ids(token))
        config.text_config.pad_token_id = tokenizer.pad_token_id
        config.text_config.bos_token_id = tokenizer.bos_token_id
        config.text_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    processor = build_processor(config, tokenizer)
    config.unconditional_input_ids = processor.unconditional_input_ids
    torch.manual_seed(0)
    with built_on(context.device, dtype or context.dtype):
        model = PiscesForConditionalGeneration(config)
    model.generation_config = text_generation_config(config, tokenizer)
    return model.eval(), processor


def random_image(side: int, seed: int = 0):
    import PIL.Image

    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def understanding_inputs(model, processor, device: torch.device) -> dict:
    side = model.config.vision_config.image_size
    text = f"{processor.image_token} {QUESTION}"
    inputs = processor(images=[random_image(side)], text=[text], return_tensors="pt").to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


def language_model_step_bytes(model) -> int:
    """
    The weights a one-position decode step of the vector loop reads: the language model's, less its input embedding
    table (a step gathers one row of it), plus `gen_head` and `gen_projector`.
    """
    language_model = model.model.language_model
    modules = (language_model, model.gen_head, model.model.gen_projector)
    total = sum(p.numel() * p.element_size() for module in modules for p in module.parameters())
    embedding = language_model.get_input_embeddings().weight
    return total - embedding.numel() * embedding.element_size()


@check("understanding_generate")
def check_understanding_generate(context: Context) -> dict:
    """model.generate on an image and a question: finite logits, new tokens."""
    model, processor = build_pisces(context)
    inputs = understanding_inputs(model, processor, context.device)
    new_tokens = 8
    with torch.no_grad():
        context.synchronize()
        start = time.perf_counter()
        output = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                output_logits=True, return_dict_in_generate=True)
        context.synchronize()
        seconds = time.perf_counter() - start
    logits = torch.stack(output.logits)
    if not torch.isfinite(logits).all():
        raise CheckFailed("the logits have non-finite values")
    produced = output.sequences.shape[1] - inputs["input_ids"].shape[1]
    if produced != new_tokens:
        raise CheckFailed(f"generate produced {produced} new tokens, expected {new_tokens}")
    return {"prompt_tokens": inputs["input_ids"].shape[1], "new_tokens": produced, "generate_s": seconds,
            "tokens_per_s": produced / seconds}


# bf16 keeps 8 mantissa bits (a relative rounding of ~0.4% per operation); the compiled step fuses and reorders
# those operations, and the differences accumulate over 32 layers and through the autoregressive loop, where each
# vector is fed back as the next input. A max difference of 5% of the vectors' spread still catches a broken step (a
# wrong cache position or mask gives differences of the order of the spread itself). In float32 (--tiny) the two
# paths agree to rounding.
COMPILED_BF16_RELATIVE_TOLERANCE = 0.05
COMPILED_FP32_ATOL = 1e-4
GUIDANCE_SCALE = 3.0


@check("image_embeddings_eager_vs_compiled")
def check_image_embeddings_eager_vs_compiled(context: Context) -> dict:
    """generate_image_embeddings, static cache + compiled step vs eager: the same guided vectors; ms per step."""
    from transformers import CompileConfig

    model, processor = build_pisces(context)
    inputs = processor(text=[PROMPT], generation_mode="image", return_tensors="pt").to(context.device)
    num_vectors = model.config.num_gen_tokens
    bound_s = language_model_step_bytes(model) / context.bandwidth()

    def timed(**options):
        with torch.no_grad():
            context.synchronize()
            start = time.perf_counter()
            vectors = model.generate_image_embeddings(**inputs, guidance_scale=GUIDANCE_SCALE, **options)
            context.synchronize()
        return vectors, time.perf_counter() - start

    timed()  # warm-up: kernels, allocator
    eager, eager_s = timed()
    if not torch.isfinite(eager).all():
        raise CheckFailed("the eager vectors have non-finite values")
    # Each of the num_vectors positions (the prompt's prefill, then one step per vector) is one forward.
    eager_step_s = eager_s / num_vectors
    result = {"num_vectors": num_vectors, "weight_read_bound_ms": bound_s * 1e3,
              "bandwidth_gb_s": context.bandwidth() / 1e9, "eager_total_s": eager_s,
              "eager_step_ms": eager_step_s * 1e3, "eager_vs_bound": eager_step_s / bound_s}
    if context.skip_compile:
        raise CheckSkipped("--skip-compile: the compiled step was not built", result)

    # On CUDA the default, CUDA graphs; on the CPU, plain inductor.
    compile_config = CompileConfig() if context.device.type == "cuda" else CompileConfig(mode="default")
    options = {"cache_implementation": "static", "compile_config": compile_config}
    _, first_s = timed(**options)  # compiles
    compiled, compiled_s = timed(**options)
    if not torch.isfinite(compiled).all():
        raise CheckFailed("the compiled vectors have non-finite values")
    difference = float((compiled.float() - eager.float()).abs().max())
    if context.dtype == torch.bfloat16:
        tolerance = COMPILED_BF16_RELATIVE_TOLERANCE * float(eager.float().std())
    else:
        tolerance = COMPILED_FP32_ATOL
    compiled_step_s = compiled_s / num_vectors
    result.update(compile_s=first_s - compiled_s, compiled_total_s=compiled_s, compiled_step_ms=compiled_step_s * 1e3,
                  compiled_vs_bound=compiled_step_s / bound_s, max_abs_diff=difference, tolerance=tolerance)
    if difference > tolerance:
        raise CheckFailed(f"compiled vectors differ from eager by {difference:.3g} (max abs), over {tolerance:.3g}")
    return result


def build_sdxl_sized_vae():
    """An `AutoencoderKL` of SDXL's shape: 3 x 1024 x 1024 pixels <-> 4 x 128 x 128 latents."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=1024,
        scaling_factor=0.13025,
    )


@check("image_1024px")
def check_image_1024px(context: Context) -> dict:
    """A full PiscesPipeline image, 20 steps, SDXL-sized decoder and VAE at 1024 px (tiny: native size): finite."""
    from pisces import PiscesPipeline
    from pisces.conversion import build_decoder, build_scheduler, build_tiny_vae

    model, processor = build_pisces(context)
    gen_width = model.config.gen_vision_config.hidden_size
    with built_on(context.device, context.dtype):
        if context.tiny:
            vae, decoder = build_tiny_vae(), build_decoder("tiny", gen_width, in_channels=4)
        else:
            vae, decoder = build_sdxl_sized_vae(), build_decoder("sdxl", gen_width, in_channels=4)
    pipe = PiscesPipeline(model=model, processor=processor, decoder=decoder, scheduler=build_scheduler(), vae=vae)
    pipe.set_progress_bar_config(disable=True)
    side = decoder.config.sample_size * pipe.vae_scale_factor  # 1024 for SDXL's shape

    decoder_seconds = []

    def started(module, args):
        context.synchronize()
        decoder_seconds.append(-time.perf_counter())

    def finished(module, args, output):
        context.synchronize()
        decoder_seconds[-1] += time.perf_counter()

    hooks = [decoder.register_forward_pre_hook(started), decoder.register_forward_hook(finished)]
    steps = 20
    try:
        context.synchronize()
        start = time.perf_counter()
        images = pipe(PROMPT, height=side, width=side, num_inference_steps=steps, output_type="np",
                      generator=torch.Generator("cpu").manual_seed(0)).images
        context.synchronize()
        total_s = time.perf_counter() - start
    finally:
        for hook in hooks:
            hook.remove()
    if images.shape != (1, side, side, 3) or not np.isfinite(images).all():
        raise CheckFailed(f"expected one finite {side}x{side} image, got shape {images.shape}")
    return {"side": side, "steps": steps, "end_to_end_s": total_s, "decoder_s": sum(decoder_seconds),
            "decoder_share": sum(decoder_seconds) / total_s}


@check("device_map_auto")
def check_device_map_auto(context: Context) -> dict:
    """save_pretrained, then from_pretrained(device_map="auto", bfloat16): the in-memory model's logits."""
    from pisces import PiscesForConditionalGeneration

    model, processor = build_pisces(context, text_overrides=LLAMA_1B_SHAPE, dtype=torch.bfloat16)
    inputs = understanding_inputs(model, processor, context.device)
    with torch.no_grad():
        expected = model(**inputs).logits.float()
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        model.save_pretrained(folder)
        save_s = time.perf_counter() - start
        del model
        gc.collect()
        if context.device.type == "cuda":
            torch.cuda.empty_cache()
        start = time.perf_counter()
        loaded = PiscesForConditionalGeneration.from_pretrained(folder, device_map="auto", dtype=torch.bfloat16).eval()
        context.synchronize()
        load_s = time.perf_counter() - start
    devices = sorted({str(parameter.device) for parameter in loaded.parameters()})
    if "meta" in devices:
        raise CheckFailed("weights left on the meta device after loading")
    with torch.no_grad():
        actual = loaded(**inputs.to(loaded.device)).logits.float().to(expected.device)
    if not torch.isfinite(actual).all():
        raise CheckFailed("the loaded model's logits have non-finite values")
    # The same bf16 weights on the same device give the same logits; a kernel chosen differently between the two
    # runs may move them by a rounding of bf16 (2^-8 relative) at the logits' scale, a wrong weight by far more.
    difference = float((actual - expected).abs().max())
    tolerance = float(expected.abs().max()) * 2**-8
    if difference > tolerance:
        raise CheckFailed(f"logits differ from the in-memory model's by {difference:.3g}, over {tolerance:.3g}")
    return {"devices": devices, "max_abs_diff": difference,
            "save_s": save_s, "load_s": load_s}


# One AdamW step must show in bfloat16 weights: the norm weights (1.0) keep 2^-7 steps, so an update under 2^-8
# rounds away. The stage's own 1e-4 would leave them unchanged; 1e-2 moves every weight with a gradient.
TRAIN_CHECK_LEARNING_RATE = 1e-2


@check("train_step_pretrain")
def check_train_step_pretrain(context: Context) -> dict:
    """apply_stage("pretrain") + gradient checkpointing, an AdamW step in bf16 autocast: finite, params move."""
    from pisces.training.data import PiscesCollator
    from pisces.training.stages import apply_stage

    model, processor = build_pisces(context)
    trainable = apply_stage(model, "pretrain")
    # transformers 5.24 renames gradient_checkpointing_enable (deprecated there) to activation_checkpointing_enable.
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    model.train()
    gen_side = model.config.gen_vision_config.image_size
    samples = [
        {"task": "caption", "image": random_image(model.config.vision_config.image_size, seed=1), "text": PROMPT,
         "question": None, "answer": None},
        {"task": "generation", "image": random_image(gen_side, seed=2), "text": PROMPT, "question": None,
         "answer": None},
    ]
    batch = PiscesCollator(processor, report_skipped=False)(samples)
    batch = {key: value.to(context.device) for key, value in batch.items()}
    parameters = dict(model.named_parameters())
    optimizer = torch.optim.AdamW([parameters[name] for name in trainable], lr=TRAIN_CHECK_LEARNING_RATE,
                                  weight_decay=0.0, fused=context.device.type == "cuda")
    tokens = int(batch["attention_mask"].sum())

    def step():
        with torch.autocast(context.device.type, dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        return loss

    before = {name: parameters[name].detach().clone() for name in trainable}
    loss = step()
    if not torch.isfinite(loss):
        raise CheckFailed(f"the loss is {loss.item()}")
    with_gradient = [name for name in trainable if parameters[name].grad is not None]
    not_finite = [name for name in with_gradient if not torch.isfinite(parameters[name].grad).all()]
    if not with_gradient or not_finite:
        raise CheckFailed(f"no gradients, or non-finite ones in {not_finite[:5]}")
    nonzero = [name for name in with_gradient if bool(parameters[name].grad.any())]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    unchanged = [name for name in nonzero if torch.equal(parameters[name], before[name])]
    del before
    if unchanged:
        raise CheckFailed(f"{len(unchanged)} trainable tensors with a gradient did not change, e.g. {unchanged[:3]}")
    # The first step pays for allocating the optimizer states and warming kernels: the second is timed.
    context.synchronize()
    start = time.perf_counter()
    step()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    context.synchronize()
    step_s = time.perf_counter() - start
    return {"loss": loss.item(), "trainable_tensors": len(trainable), "changed_tensors": len(nonzero),
            "tokens": tokens, "step_s": step_s, "tokens_per_s": tokens / step_s}


# ---- running them ----


def run_checks(context: Context, checks: list[Check]) -> list[dict]:
    results = []
    for item in checks:
        row = {"name": item.name, "description": item.description, "needs_cuda": item.needs_cuda}
        if item.needs_cuda and context.device.type != "cuda":
            row.update(status="skipped", reason="needs CUDA; none here")
            results.append(row)
            continue
        # What the last check left behind must not count in this one's peak, nor crowd it out of memory.
        gc.collect()
        if context.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(context.device)
        start = time.perf_counter()
        try:
            row.update(status="passed", measurements=item.run(context))
        except CheckSkipped as skipped:
            row.update(status="skipped", reason=str(skipped), measurements=skipped.measurements)
        except CheckFailed as error:
            row.update(status="failed", reason=str(error))
        except Exception as error:  # a crash is a failed check too; the others still run
            row.update(status="failed", reason=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
        context.synchronize()
        row["seconds"] = round(time.perf_counter() - start, 3)
        row["peak_memory_mib"] = peak_memory_mib(context.device)
        results.append(row)
    gc.collect()
    return results


def print_table(results: list[dict]) -> None:
    width = max(len(row["name"]) for row in results)
    print(f"{'check':<{width}}  {'status':<8}  {'seconds':>8}  {'peak MiB':>8}  detail")
    for row in results:
        seconds = f"{row['seconds']:.2f}" if "seconds" in row else ""
        memory = f"{row['peak_memory_mib']:.0f}" if row.get("peak_memory_mib") is not None else ""
        figures = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.get("measurements", {}).items()
        )
        detail = "; ".join(part for part in (row.get("reason"), figures) if part)
        print(f"{row['name']:<{width}}  {row['status']:<8}  {seconds:>8}  {memory:>8}  {detail}")


def environment(device: torch.device) -> dict:
    import diffusers
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "diffusers": diffusers.__version__,
            "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Pisces pipeline folder (default: the shipped reference model)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random checkpoint on the CPU (CUDA checks skipped)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 4, 2 with --tiny)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these checks")
    parser.add_argument("--out", default="gpu_check.json", help="where the results are written as JSON")
    parser.add_argument("--skip-compile", action="store_true",
                        help="skip the compiled half of image_embeddings_eager_vs_compiled (slow to compile on a CPU)")
    args = parser.parse_args(argv)
    names = [item.name for item in CHECKS]
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        parser.error(f"unknown check(s) {', '.join(unknown)}; the checks are: {', '.join(names)}")
    checks = [item for item in CHECKS if not args.only or item.name in args.only]

    import pisces  # noqa: F401  (registers the pipeline)

    with tempfile.TemporaryDirectory() as scratch:
        if args.tiny:
            from pisces.conversion import build_random_checkpoint

            checkpoint = build_random_checkpoint(Path(scratch) / "tiny", preset="tiny", seed=0)
            device = torch.device("cpu")
        else:
            if args.model is not None:
                checkpoint = Path(args.model)
            else:
                from pisces.reference_model import reference_model_path

                checkpoint = Path(reference_model_path())
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        steps = args.steps or (2 if args.tiny else 4)
        context = Context(checkpoint=checkpoint, device=device, steps=steps, tiny=args.tiny,
                          skip_compile=args.skip_compile)
        results = run_checks(context, checks)

    report = {"environment": environment(device), "checkpoint": "tiny random" if args.tiny else str(checkpoint),
              "steps": steps, "checks": results}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print_table(results)
    print(f"wrote {args.out}")
    return 1 if any(row["status"] == "failed" for row in results) else 0


if __name__ == "__main__":
    sys.exit(main())
