"""Speed of the autoregressive part of text-to-image, measured side by side in one run.

1. `generate_image_embeddings` with the KV cache against recomputing the whole sequence at every step (what Emu2
   and MetaMorph do): the floor is 5x faster.
2. Against transformers' own `JanusForConditionalGeneration.generate(generation_mode="image")`, with a language model
   of the same size: Pisces predicts 64 vectors, Janus 576 VQ tokens. The floor is 5x faster per image.
3. The compiled decode step (`compile_config=CompileConfig(...)`, static cache) against the eager default (dynamic
   cache), per step, and each against the weight-read bound of this machine: the bytes of the weights one step reads
   divided by the memory bandwidth measured in the same run (a large tensor copy). The floor is 1.5x faster. On CPU
   the compiled step includes `FewRowMatmulPass` (`--without-few-row-matmul` leaves it out).

Both sides: a Llama-shaped model (by default hidden 1024, 8 layers, about 100M parameters; `--hidden 512` for the
smaller one), float32, CPU, batch 1, classifier-free guidance on (batch-doubled), prompts of 20 and 80 tokens.
Run: `python benchmarks/bench_image_embeddings.py [--hidden 1024] [--layers 8] [--quick] [--only-compiled]
[--without-few-row-matmul]`.

Why the size matters: a cached step reads every weight once and pays the stock Llama's fixed Python cost per layer
(about 0.9 ms here), while a recomputed step is compute-bound on the whole sequence. The fixed cost is a large share
of a step at hidden 512 and shrinks as the model grows (at 8B, a step is 16 GB of weight reads).
"""

import argparse
import statistics
import time

import torch
from transformers import CompileConfig, GenerationConfig, JanusConfig, JanusForConditionalGeneration

from pisces import PiscesConfig, PiscesForConditionalGeneration


TEXT = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "max_position_embeddings": 2048,
}
COMPILED_FLOOR = 1.5
PROMPT_LENGTHS = (20, 80)  # a short caption; a chat-templated detailed caption
GUIDANCE = 3.0
IMAGE_ID, BOI_ID, EOI_ID, GEN_ID, PAD_ID, BOS_ID = 31996, 31997, 31998, 31999, 0, 1


def text_config(hidden: int, layers: int) -> dict:
    # Llama's proportions: MLP width about 2.7x hidden, 64-wide heads.
    return dict(TEXT, hidden_size=hidden, intermediate_size=int(hidden * 2.6875), num_hidden_layers=layers,
                num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64)


def pisces_model(text: dict = TEXT) -> PiscesForConditionalGeneration:
    config = PiscesConfig(
        text_config=text,
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
                       "vision_use_head": False},
        # 32 / 4 = 8x8 patches, no pooling: 64 generation tokens of width 1024 (CLIP ViT-L's width).
        gen_vision_config={"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 64,
                           "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32, "patch_size": 4},
        gen_pool_size=1,
        image_token_id=IMAGE_ID, boi_token_id=BOI_ID, eoi_token_id=EOI_ID, gen_token_id=GEN_ID,
        unconditional_input_ids=[BOS_ID, BOI_ID],
    )
    assert config.num_gen_tokens == 64
    return PiscesForConditionalGeneration(config).eval()


def janus_model(text: dict = TEXT) -> JanusForConditionalGeneration:
    hidden = text["hidden_size"]
    config = JanusConfig(
        text_config=text,
        vision_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 384,
                       "patch_size": 16, "num_image_tokens": 576, "projection_dim": hidden},
        vq_config={"base_channels": 32, "channel_multiplier": [1, 1, 1, 1, 1], "num_res_blocks": 1,
                   "embed_dim": 8, "num_embeddings": 16384, "projection_dim": hidden, "image_token_embed_dim": hidden,
                   "num_patches": 24},
        image_token_id=IMAGE_ID,
    )
    model = JanusForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, pad_token_id=PAD_ID, guidance_scale=GUIDANCE, do_sample=False,
        generation_kwargs={"boi_token_id": BOI_ID},
    )
    return model


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired(baseline, other, repeats: int) -> tuple[float, float, float]:
    """
    Median seconds of `baseline` and `other`, and the median of their ratios, timed in alternating pairs so that a
    change of load on the machine hits both sides of each ratio alike.
    """
    baseline(), other()  # warm-up
    pairs = [(seconds(baseline), seconds(other)) for _ in range(repeats)]
    return (
        statistics.median(b for b, _ in pairs),
        statistics.median(o for _, o in pairs),
        statistics.median(o / b for b, o in pairs),
    )


def memory_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second of a large tensor copy (read once and written once), the best of `repeats`."""
    source = torch.ones(megabytes * 2**20 // 4)
    target = torch.empty_like(source)
    target.copy_(source)  # touch the pages first
    best = min(seconds(lambda: target.copy_(source)) for _ in range(repeats))
    return 2 * source.numel() * source.element_size() / best


def step_weight_bytes(model: PiscesForConditionalGeneration) -> int:
    """
    Bytes of weights one decode step reads: every language model layer, the final norm, `gen_head` and
    `gen_projector` (the input embedding table is not read: the step's input is a projected vector).
    """
    language_model = model.model.language_model
    modules = [language_model.layers, language_model.norm, model.gen_head, model.model.gen_projector]
    return sum(p.numel() * p.element_size() for module in modules for p in module.parameters())


def prefill_seconds(model: PiscesForConditionalGeneration, prompt, mask, repeats: int = 3) -> float:
    """
    One eager forward of a guided batch's prompt rows (the prompt twice: the cost depends on the shape, not the
    tokens), the part of a call that is not decode steps.
    """
    embeds = model.get_input_embeddings()(torch.cat([prompt, prompt]))
    mask = torch.cat([mask, mask])

    def forward():
        with torch.no_grad():
            model.model.language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=True)

    forward()
    return statistics.median(seconds(forward) for _ in range(repeats))


def compiled_rows(pisces: PiscesForConditionalGeneration, prompt, mask, repeats: int):
    """Eager (dynamic cache, the default) against compiled (static cache) per step, and their weight-read bounds."""
    device_kind = pisces.device.type
    # Inductor's CPU code; on CUDA the default CompileConfig captures the step as a CUDA graph.
    compile_config = CompileConfig() if device_kind == "cuda" else CompileConfig(mode="default")

    def eager():
        return pisces.generate_image_embeddings(prompt, mask, guidance_scale=GUIDANCE)

    def compiled():
        return pisces.generate_image_embeddings(prompt, mask, guidance_scale=GUIDANCE, compile_config=compile_config)

    start = time.perf_counter()
    first = compiled()
    compile_s = time.perf_counter() - start
    diff = (first - eager()).abs().max().item()
    t_eager, t_compiled, ratio = paired(eager, compiled, repeats)
    bandwidth = memory_bandwidth()
    bound_s = step_weight_bytes(pisces) / bandwidth
    steps = pisces.config.num_gen_tokens - 1
    prefill = prefill_seconds(pisces, prompt, mask)
    per_step = {name: (elapsed - prefill) / steps for name, elapsed in (("eager", t_eager), ("compiled", t_compiled))}
    return {
        "compile_s": compile_s, "diff": diff, "bandwidth": bandwidth, "bound_s": bound_s, "prefill_s": prefill,
        "eager_s": t_eager, "compiled_s": t_compiled, "speedup": 1 / ratio, "per_step": per_step,
    }


def print_compiled(result: dict, length: int):
    per_step, bound = result["per_step"], result["bound_s"]
    print(f"\ncompiled decode step, prompt {length}: compiled in {result['compile_s']:.1f} s (first call), "
          f"vectors max abs diff {result['diff']:.2e}; memory bandwidth {result['bandwidth'] / 1e9:.1f} GB/s "
          f"(tensor copy), weight-read bound {bound * 1e3:.2f} ms/step; prefill {result['prefill_s'] * 1e3:.1f} ms")
    print(f"{'what':<38}{'s/image':>10}{'ms/step':>10}{'x bound':>9}{'speed-up':>10}{'floor':>7}  verdict")
    print(f"{'Pisces eager, dynamic cache':<38}{result['eager_s']:>10.3f}{per_step['eager'] * 1e3:>10.2f}"
          f"{per_step['eager'] / bound:>9.1f}")
    verdict = "PASS" if result["speedup"] >= COMPILED_FLOOR else "FAIL"
    print(f"{'Pisces compiled, static cache':<38}{result['compiled_s']:>10.3f}{per_step['compiled'] * 1e3:>10.2f}"
          f"{per_step['compiled'] / bound:>9.1f}{result['speedup']:>9.2f}x{COMPILED_FLOOR:>6.1f}x  {verdict}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=1024, help="the language model's width (a multiple of 64)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="one timed repeat instead of three")
    parser.add_argument("--only-compiled", action="store_true", help="only part 3: eager against compiled steps")
    parser.add_argument("--without-few-row-matmul", action="store_true",
                        help="compile the CPU step without FewRowMatmulPass, to see what that pass contributes")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 keeps timings stable on a machine other jobs load)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.without_few_row_matmul:
        import torch._inductor.config as inductor_config

        # Any post-grad pass set by the caller keeps Pisces' own out (a no-op one here).
        inductor_config.post_grad_custom_post_pass = lambda graph: None
    repeats = 1 if args.quick else 3
    text = text_config(args.hidden, args.layers)
    pisces = pisces_model(text)
    llm_params = sum(p.numel() for p in pisces.model.language_model.parameters()) / 1e6
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, Llama hidden {args.hidden} x {args.layers} "
          f"layers ({llm_params:.0f}M parameters), float32, "
          f"guidance {GUIDANCE} (batch-doubled), batch 1, median of {repeats} alternating pairs")
    rows, diffs = [], []
    for length in () if args.only_compiled else PROMPT_LENGTHS:
        torch.manual_seed(length)
        prompt = torch.randint(2, 31000, (1, length))
        prompt[0, 0], prompt[0, -1] = BOS_ID, BOI_ID
        mask = torch.ones_like(prompt)

        def cached():
            return pisces.generate_image_embeddings(prompt, mask, guidance_scale=GUIDANCE)

        def recomputed():
            return pisces.generate_image_embeddings(prompt, mask, guidance_scale=GUIDANCE, use_cache=False)

        diffs.append((cached() - recomputed()).abs().max().item())
        t_cached, t_recompute, ratio = paired(cached, recomputed, repeats)
        rows.append((f"Pisces, KV cache, prompt {length}", t_cached, None, None))
        rows.append((f"Pisces, recompute, prompt {length}", t_recompute, ratio, 5.0))
        if length == PROMPT_LENGTHS[0]:
            janus = janus_model(text)
            tokens = janus.generate(input_ids=prompt, attention_mask=mask, generation_mode="image")
            assert tokens.shape == (1, 576), tokens.shape
            _, t_janus, ratio = paired(
                cached, lambda: janus.generate(input_ids=prompt, attention_mask=mask, generation_mode="image"), repeats
            )
            rows.append((f"Janus image generate, prompt {length}", t_janus, ratio, 5.0))
            del janus

    if rows:
        print(f"cached vs recomputed vectors: max abs diff {max(diffs):.2e}")
        print(f"{'what':<38}{'s/image':>10}{'cached is':>12}{'floor':>8}  verdict")
    for name, elapsed, ratio, floor in rows:
        verdict = "" if floor is None else ("PASS" if ratio >= floor else "FAIL")
        ratio_text = "" if ratio is None else f"{ratio:.1f}x"
        floor_text = "" if floor is None else f"{floor:.0f}x"
        print(f"{name:<38}{elapsed:>10.3f}{ratio_text:>12}{floor_text:>8}  {verdict}")

    length = PROMPT_LENGTHS[0]
    torch.manual_seed(length)
    prompt = torch.randint(2, 31000, (1, length))
    prompt[0, 0], prompt[0, -1] = BOS_ID, BOI_ID
    print_compiled(compiled_rows(pisces, prompt, torch.ones_like(prompt), repeats), length)


if __name__ == "__main__":
    main()
