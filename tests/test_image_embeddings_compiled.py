"""The static KV cache and the compiled decode step of `generate_image_embeddings`, against the eager dynamic loop."""

import pytest
import torch
from transformers import CompileConfig

from pisces.static_decoding import CACHE_LENGTH_MULTIPLE, choose_cache_implementation, choose_compile_config


def left_padded(config, rows):
    """Left-pads token rows (each ending before <boi>) and appends <boi>."""
    rows = [list(row) + [config.boi_token_id] for row in rows]
    length = max(len(row) for row in rows)
    pad = config.text_config.pad_token_id
    ids = torch.tensor([[pad] * (length - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in rows])
    return ids, mask


SHORT_PROMPTS = [[1, 40, 41, 42, 43, 44, 45], [1, 50, 51]]
LONG_PROMPTS = [[1, 40, 41], [1, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64]]
GUIDANCE = 3.0


@pytest.fixture
def fresh_model(tiny_checkpoint):
    from pisces import PiscesForConditionalGeneration

    return PiscesForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()


@pytest.fixture(scope="module")
def compiled_run(tiny_checkpoint):
    """
    Compiles the decode step once (inductor, as on a real run, behind a backend that counts its compilations) and
    runs it on two batches of prompts of different lengths; compiling on CPU takes tens of seconds, so every test
    that needs the compiled path reads this one run.
    """
    from torch._inductor.compile_fx import compile_fx

    from pisces import PiscesForConditionalGeneration

    model = PiscesForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    compilations = []

    def counting_inductor(graph_module, example_inputs):
        compilations.append(len(example_inputs))
        return compile_fx(graph_module, example_inputs)

    compile_config = CompileConfig(backend=counting_inductor, mode=None)
    from torch._dynamo.utils import counters

    few_row_matmuls = counters["inductor"]["pisces_few_row_matmul"]
    run = {}
    for name, prompts in (("short", SHORT_PROMPTS), ("long", LONG_PROMPTS)):
        ids, mask = left_padded(model.config, prompts)
        run[f"{name}_eager"] = model.generate_image_embeddings(ids, mask, guidance_scale=GUIDANCE)
        run[f"{name}_compiled"] = model.generate_image_embeddings(
            ids, mask, guidance_scale=GUIDANCE, compile_config=compile_config
        )
        run[f"{name}_compilations"] = len(compilations)
    run["few_row_matmuls"] = counters["inductor"]["pisces_few_row_matmul"] - few_row_matmuls
    return run


def test_compiled_step_gives_the_eager_vectors(compiled_run):
    for name in ("short", "long"):
        eager, compiled = compiled_run[f"{name}_eager"], compiled_run[f"{name}_compiled"]
        assert compiled.shape == eager.shape
        assert (compiled - eager).abs().max() <= 1e-4


def test_no_recompile_for_a_prompt_of_another_length(compiled_run):
    assert compiled_run["short_compilations"] >= 1  # the step was compiled, not run eagerly
    assert compiled_run["long_compilations"] == compiled_run["short_compilations"]


@pytest.mark.parametrize("guidance_scale", [1.0, GUIDANCE])
def test_static_cache_equals_dynamic_cache(fresh_model, guidance_scale):
    ids, mask = left_padded(fresh_model.config, SHORT_PROMPTS)
    dynamic = fresh_model.generate_image_embeddings(ids, mask, guidance_scale=guidance_scale)
    static = fresh_model.generate_image_embeddings(ids, mask, guidance_scale=guidance_scale, cache_implementation="static")
    assert (static - dynamic).abs().max() <= 1e-5
    recomputed = fresh_model.generate_image_embeddings(ids, mask, guidance_scale=guidance_scale, use_cache=False)
    assert (static - recomputed).abs().max() <= 1e-4


def test_generation_config_chooses_the_static_cache_and_it_is_reused(fresh_model):
    config = fresh_model.config
    fresh_model.generation_config.cache_implementation = "static"
    ids, mask = left_padded(config, SHORT_PROMPTS)
    first = fresh_model.generate_image_embeddings(ids, mask, guidance_scale=GUIDANCE)
    state = fresh_model._static_image_decoding
    (cache,) = state.caches.values()  # batch doubled by guidance: one cache of 4 rows
    assert cache.get_max_length() == CACHE_LENGTH_MULTIPLE
    keys = cache.layers[0].keys
    assert keys.shape[0] == 2 * len(SHORT_PROMPTS)
    long_ids, long_mask = left_padded(config, LONG_PROMPTS)
    fresh_model.generate_image_embeddings(long_ids, long_mask, guidance_scale=GUIDANCE)
    # Same storage, reset in place: a compiled step (and a CUDA graph) sees the same tensors on every call.
    assert state.caches[next(iter(state.caches))] is cache and cache.layers[0].keys.data_ptr() == keys.data_ptr()
    assert state.compiled_steps == []  # eager on CPU unless a compile config is given
    again = fresh_model.generate_image_embeddings(ids, mask, guidance_scale=GUIDANCE)
    torch.testing.assert_close(again, first, atol=0, rtol=0)


def test_fixed_max_cache_len_from_the_generation_config(fresh_model):
    config = fresh_model.config
    ids, mask = left_padded(config, SHORT_PROMPTS)
    fresh_model.generation_config.max_cache_len = ids.shape[1] + config.num_gen_tokens
    fresh_model.generate_image_embeddings(ids, mask, guidance_scale=1.0, cache_implementation="static")
    (cache,) = fresh_model._static_image_decoding.caches.values()
    assert cache.get_max_length() == ids.shape[1] + config.num_gen_tokens
    long_ids, long_mask = left_padded(config, LONG_PROMPTS)
    with pytest.raises(ValueError, match="max_cache_len is"):
        fresh_model.generate_image_embeddings(long_ids, long_mask, guidance_scale=1.0, cache_implementation="static")


def test_compile_is_chosen_as_generate_chooses_it(fresh_model):
    generation_config = fresh_model.generation_config
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_compile_config(None, generation_config, cpu) is None  # eager default on CPU
    on_gpu = choose_compile_config(None, generation_config, cuda)
    assert isinstance(on_gpu, CompileConfig) and on_gpu.mode == "reduce-overhead"  # CUDA graphs
    generation_config.compile_config = CompileConfig(fullgraph=True, mode="default")
    assert choose_compile_config(None, generation_config, cpu) is generation_config.compile_config
    explicit = CompileConfig(dynamic=False)
    assert choose_compile_config(explicit, generation_config, cpu) is explicit
    generation_config.disable_compile = True
    assert choose_compile_config(explicit, generation_config, cuda) is None
    assert choose_cache_implementation(None, explicit, generation_config) == "static"


def test_bad_cache_arguments_are_explained(fresh_model):
    ids, mask = left_padded(fresh_model.config, SHORT_PROMPTS)
    with pytest.raises(ValueError, match="'dynamic' or 'static'"):
        fresh_model.generate_image_embeddings(ids, mask, cache_implementation="offloaded")
    with pytest.raises(ValueError, match="needs cache_implementation='static'"):
        fresh_model.generate_image_embeddings(ids, mask, cache_implementation="dynamic", compile_config=CompileConfig())
    with pytest.raises(ValueError, match="use_cache=False"):
        fresh_model.generate_image_embeddings(ids, mask, use_cache=False, cache_implementation="static")
    with pytest.raises(TypeError, match="CompileConfig"):
        fresh_model.generate_image_embeddings(ids, mask, compile_config={"mode": "default"})


def test_the_compiled_cpu_step_swaps_its_few_row_matmuls(compiled_run):
    # Guidance doubles the two prompts: 4 rows, so every projection of the step is rewritten (and still equal, above).
    assert compiled_run["few_row_matmuls"] >= 7 * 2  # q, k, v, o, gate, up, down in each of the tiny model's layers


@pytest.mark.parametrize("rows, bias, rewritten", [(2, False, True), (4, True, True), (1, False, False), (8, True, False)])
def test_few_row_matmul_pass(rows, bias, rewritten):
    from torch._dynamo.utils import counters
    from torch.fx.experimental.proxy_tensor import make_fx

    from pisces.few_row_matmul import FEW_ROW_MATMUL

    torch.manual_seed(rows)
    x, weight, b = torch.randn(rows, 16), torch.randn(24, 16), torch.randn(24)
    graph_module = make_fx(lambda x, weight, b: torch.nn.functional.linear(x, weight, b if bias else None))(x, weight, b)
    expected = graph_module(x, weight, b)
    before = counters["inductor"]["pisces_few_row_matmul"]
    FEW_ROW_MATMUL(graph_module.graph)
    graph_module.recompile()
    targets = [node.target for node in graph_module.graph.nodes if node.op == "call_function"]
    assert (counters["inductor"]["pisces_few_row_matmul"] - before == 1) == rewritten
    assert (torch.ops.aten.addmm.default in targets) == (bias and not rewritten)
    torch.testing.assert_close(graph_module(x, weight, b), expected, rtol=1e-5, atol=1e-5)
