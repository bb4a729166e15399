"""One image, end to end, on CPU: the reference model against the 2-second floor.

Loads a Pisces pipeline folder (by default the reference model that ships inside the package; `--model DIR` for
another) with `PiscesPipeline.from_pretrained` and its defaults (dtype, scheduler, guidance from the model config,
native size), and times one image for the prompt "a red circle above a blue square", split into its two parts:

- **autoregressive**: `pipe.encode_prompt`: the processor and `model.generate_image_embeddings` (the generation
  vectors, with classifier-free guidance), exactly what `pipe(prompt)` runs first;
- **decoder**: `pipe(image_embeds=...)`: the denoising loop (`--steps`, 25 by default) and the VAE decode to a PIL
  image.

One warm-up image first (which also checks that the two parts give the same picture as `pipe(prompt)` in one call),
then the median of `--repeats` images (10 by default). The threads are torch's default.
Run: `python benchmarks/bench_reference.py [--model DIR] [--steps 25] [--repeats 10]`.
"""

import argparse
import statistics
import sys
import time

import numpy as np
import torch


PROMPT = "a red circle above a blue square"
FLOOR_S = 2.0


def millions(module) -> float:
    return 0.0 if module is None else sum(p.numel() for p in module.parameters()) / 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Pisces pipeline folder (default: the shipped reference model)")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps")
    parser.add_argument("--repeats", type=int, default=10, help="timed images (the median is reported)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be at least 1")

    import pisces  # noqa: F401  (registers the pipeline)
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

    def autoregressive():
        with torch.no_grad():
            return pipe.encode_prompt(PROMPT, guidance_scale=guidance)

    def decoder(image_embeds, output_type="pil"):
        generator = torch.Generator().manual_seed(args.seed)
        return pipe(image_embeds=image_embeds, num_inference_steps=args.steps, generator=generator,
                    output_type=output_type).images

    # Warm-up, and the check that the two timed parts are one `pipe(prompt)` call split in two.
    whole = pipe(PROMPT, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed),
                 output_type="np").images
    split = decoder(autoregressive(), output_type="np")
    difference = float(np.abs(whole - split).max())
    if difference > 1e-4:
        sys.exit(f"bench_reference: error: the split run differs from pipe(prompt) (max abs diff {difference:.2e})")

    runs = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        image_embeds = autoregressive()
        middle = time.perf_counter()
        decoder(image_embeds)
        end = time.perf_counter()
        runs.append((middle - start, end - middle, end - start))
    t_ar, t_decoder, t_image = (statistics.median(run[i] for run in runs) for i in range(3))

    size = pipe.default_sample_size * pipe.vae_scale_factor
    print(f"model: {folder}")
    print(f"  model (LLM, encoders, heads) {millions(pipe.model):.1f}M parameters ({pipe.model.dtype}), decoder "
          f"{millions(pipe.decoder):.1f}M ({pipe.decoder.dtype}), VAE {millions(pipe.vae):.1f}M, "
          f"scheduler {type(pipe.scheduler).__name__}")
    print(f"  torch {torch.__version__}, CPU, {torch.get_num_threads()} threads; prompt {PROMPT!r}, "
          f"{pipe.model.config.num_gen_tokens} vectors, guidance {guidance}, {args.steps} denoising steps, "
          f"{size}x{size}; medians of {args.repeats} after one warm-up, each part's and the sum's "
          f"(split = pipe(prompt): max diff {difference:.1e})")
    print(f"autoregressive (encode_prompt): {t_ar:.3f} s")
    print(f"decoder ({args.steps} steps + VAE decode): {t_decoder:.3f} s")
    if t_image <= FLOOR_S:
        verdict = f"{FLOOR_S / t_image:.1f}x under"
    else:
        verdict = f"{t_image / FLOOR_S:.1f}x over"
    print(f"one image: {t_image:.2f} s (floor {FLOOR_S:g} s: {verdict})")


if __name__ == "__main__":
    main()
