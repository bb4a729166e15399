"""One image, end to end, on CPU: the reference model's own sampler against DDIM at 25 steps, and its throughput.

Loads a Pisces pipeline folder (by default the reference model that ships inside the package; `--model DIR` for
another) with `PiscesPipeline.from_pretrained` and its defaults (dtype, guidance from the model config, native size),
and times one image for the prompt "a red circle above a blue square", split into its two parts:

- **autoregressive**: `pipe.encode_prompt`: the processor and `model.generate_image_embeddings` (the generation
  vectors, with classifier-free guidance), exactly what `pipe(prompt)` runs first;
- **decoder**: `pipe(image_embeds=...)`: the denoising loop and the VAE decode to a PIL image.

Two samplers, timed alternately image by image so that both see the same machine load: the checkpoint's own
(its scheduler and `default_num_inference_steps`, or `--steps`) and the baseline, `DDIMScheduler` at 25 steps (the
reference model's sampler before). One warm-up image of each first (which also checks that the two parts give the same
picture as `pipe(prompt)` in one call), then the median of `--repeats` images and the ratio of the medians. Last, images
per second of `pipe(prompts)` at batch 1, 8 and 32 (`--batch-sizes`) with the checkpoint's sampler. The threads are
torch's default.
Run: `python benchmarks/bench_reference.py [--model DIR] [--steps N] [--repeats 10] [--batch-sizes 1,8,32]`.
"""

import argparse
import statistics
import sys
import time

import numpy as np
import torch


PROMPT = "a red circle above a blue square"
FLOOR_S = 0.4
BASELINE_STEPS = 25


def millions(module) -> float:
    return 0.0 if module is None else sum(p.numel() for p in module.parameters()) / 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Pisces pipeline folder (default: the shipped reference model)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the checkpoint's)")
    parser.add_argument("--repeats", type=int, default=10, help="timed images per sampler (the median is reported)")
    parser.add_argument("--batch-sizes", default="1,8,32", help="prompts per call of the throughput runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if (args.steps is not None and args.steps < 1) or args.repeats < 1:
        parser.error("--steps and --repeats must be at least 1")
    try:
        batch_sizes = [int(size) for size in args.batch_sizes.split(",") if size]
    except ValueError:
        parser.error(f"--batch-sizes takes integers separated by commas, got {args.batch_sizes!r}")

    import pisces  # noqa: F401  (registers the pipeline)
    from diffusers import DDIMScheduler

    from pisces import PiscesPipeline

    folder = args.model
    if folder is None:
        from pisces.reference_model import reference_model_path

        try:
            folder = reference_model_path()
        except FileNotFoundError as error:
            parser.exit(2, f"bench_reference: error: {error}\n")
    try:
        pipe = PiscesPipeline.from_pretrained(folder)
    except (OSError, ValueError) as error:
        parser.exit(2, f"bench_reference: error: {error}\n")
    pipe.to("cpu")
    pipe.set_progress_bar_config(disable=True)
    guidance = pipe.model.config.gen_guidance_scale  # what pipe(prompt) uses by default
    own_scheduler = pipe.scheduler
    samplers = {
        "checkpoint": (own_scheduler, args.steps or pipe.config.default_num_inference_steps),
        "baseline": (DDIMScheduler.from_config(own_scheduler.config), BASELINE_STEPS),
    }

    def autoregressive():
        with torch.no_grad():
            return pipe.encode_prompt(PROMPT, guidance_scale=guidance)

    def decoder(image_embeds, steps, output_type="pil"):
        generator = torch.Generator().manual_seed(args.seed)
        return pipe(image_embeds=image_embeds, num_inference_steps=steps, generator=generator,
                    output_type=output_type).images

    for name, (scheduler, steps) in samplers.items():
        # Warm-up, and the check that the two timed parts are one `pipe(prompt)` call split in two.
        pipe.scheduler = scheduler
        whole = pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(args.seed),
                     output_type="np").images
        split = decoder(autoregressive(), steps, output_type="np")
        difference = float(np.abs(whole - split).max())
        if difference > 1e-4:
            sys.exit(f"bench_reference: error: {name}: the split run differs from pipe(prompt) ({difference:.2e})")

    runs = {name: [] for name in samplers}
    for _ in range(args.repeats):
        for name, (scheduler, steps) in samplers.items():
            pipe.scheduler = scheduler
            start = time.perf_counter()
            image_embeds = autoregressive()
            middle = time.perf_counter()
            decoder(image_embeds, steps)
            end = time.perf_counter()
            runs[name].append((middle - start, end - middle, end - start))
    medians = {name: [statistics.median(run[i] for run in runs[name]) for i in range(3)] for name in samplers}

    size = pipe.default_sample_size * pipe.vae_scale_factor
    print(f"model: {folder}")
    print(f"  model (LLM, encoders, heads) {millions(pipe.model):.1f}M parameters ({pipe.model.dtype}), decoder "
          f"{millions(pipe.decoder):.1f}M ({pipe.decoder.dtype}), VAE {millions(pipe.vae):.1f}M")
    print(f"  torch {torch.__version__}, CPU, {torch.get_num_threads()} threads; prompt {PROMPT!r}, "
          f"{pipe.model.config.num_gen_tokens} vectors, guidance {guidance}, {size}x{size}; medians of "
          f"{args.repeats} images per sampler, timed alternately, after one warm-up each")
    for name, (scheduler, steps) in samplers.items():
        t_ar, t_decoder, t_image = medians[name]
        print(f"{name:>10} ({type(scheduler).__name__}, {steps} steps): autoregressive {t_ar:.3f} s, decoder "
              f"{t_decoder:.3f} s, one image {t_image:.3f} s")
    t_image = medians["checkpoint"][2]
    verdict = f"{FLOOR_S / t_image:.2f}x under" if t_image <= FLOOR_S else f"{t_image / FLOOR_S:.2f}x over"
    print(f"one image: {t_image:.3f} s, {medians['baseline'][2] / t_image:.2f}x faster than the baseline "
          f"(floor {FLOOR_S:g} s: {verdict})")

    pipe.scheduler, steps = samplers["checkpoint"]
    for batch_size in batch_sizes:
        prompts = [PROMPT] * batch_size
        generators = [torch.Generator().manual_seed(args.seed + i) for i in range(batch_size)]
        pipe(prompts[:1], num_inference_steps=steps, generator=generators[:1])  # warm-up of this code path
        start = time.perf_counter()
        pipe(prompts, num_inference_steps=steps, generator=generators)
        seconds = time.perf_counter() - start
        print(f"batch {batch_size:>3}: {batch_size / seconds:.1f} images/s ({seconds:.2f} s)")


if __name__ == "__main__":
    main()
