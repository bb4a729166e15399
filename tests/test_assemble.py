"""`assemble_checkpoint` / `pisces convert assemble`: a Pisces checkpoint from public component checkpoints.

Every component is built here with its real class (Llama and Qwen2 with tokenizers from the `tokenizers` library,
SigLIP, CLIP, a UNet, a VAE, a scheduler), tiny, saved as safetensors, then assembled and loaded back.
"""

import json
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

import pisces  # noqa: F401  (registers the Auto classes and pipelines)
from pisces import PiscesForConditionalGeneration, PiscesModel, PiscesPipeline, PiscesProcessor
from pisces.conversion import SourceError, assemble_checkpoint, build_decoder, build_tiny_vae, choose_gen_pool_size
from pisces.conversion.tokenizer import DEFAULT_CORPUS
from pisces.modeling_pisces import DEFAULT_GEN_GUIDANCE_SCALE
from pisces_cli.commands import main


PISCES_TOKENS = ["<image>", "<boi>", "<eoi>", "<gen>"]
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<|finetune_right_pad_id|>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen's turn format, for string content only (as in the real Qwen2 tokenizers).
QWEN_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GEN_WIDTH = 48
NUM_GEN_TOKENS = 16  # the CLIP's 8x8 grid pooled 2x2


def _tokenizer(specials: list[str], bos: str | None, **kwargs) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer without the Pisces tokens, like a public LLM's."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(DEFAULT_CORPUS, trainer=trainer)
    tokenizer.add_special_tokens(specials)
    steps = [processors.ByteLevel(trim_offsets=False)]
    if bos is not None:
        bos_id = tokenizer.token_to_id(bos)
        steps.append(processors.TemplateProcessing(single=f"{bos}:0 $A:0", special_tokens=[(bos, bos_id)]))
    tokenizer.post_processor = processors.Sequence(steps)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **kwargs)


def _text_sizes():
    return dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=256)


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    """Tiny public-style component checkpoints, saved as safetensors the way their libraries save them."""
    root = tmp_path_factory.mktemp("components")
    torch.manual_seed(0)

    # Llama 3 style: Llama specials, no pad token, no chat template; untied embeddings.
    tokenizer = _tokenizer(LLAMA_SPECIALS, "<|begin_of_text|>", bos_token="<|begin_of_text|>",
                           eos_token="<|end_of_text|>")
    vocab = tokenizer.get_vocab()
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), bos_token_id=vocab["<|begin_of_text|>"], eos_token_id=vocab["<|end_of_text|>"],
        tie_word_embeddings=False, **_text_sizes(),
    ))
    llama.save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")

    # Qwen2 style: ChatML specials and template, a pad token, tied embeddings, a padded embedding matrix.
    tokenizer = _tokenizer(QWEN_SPECIALS, None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                           chat_template=QWEN_TEMPLATE)
    vocab = tokenizer.get_vocab()
    qwen = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer) + 8, eos_token_id=vocab["<|im_end|>"], tie_word_embeddings=True, **_text_sizes(),
    ))
    qwen.save_pretrained(root / "qwen2")
    tokenizer.save_pretrained(root / "qwen2")

    # SigLIP, full (text and vision towers, with the pooling head), 32 px / 8 px patches: 16 understanding tokens.
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    text = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).save_pretrained(root / "siglip")
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(root / "siglip")
    SiglipVisionModel(SiglipVisionConfig(**vision)).save_pretrained(root / "siglip-vision")

    # CLIP, full, 32 px / 4 px patches: an 8x8 grid.
    clip_vision = dict(hidden_size=GEN_WIDTH, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                       image_size=32, patch_size=4)
    CLIPModel(CLIPConfig(text_config=text, vision_config=clip_vision, projection_dim=16)).save_pretrained(root / "clip")
    clip_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    clip_processor.save_pretrained(root / "clip")

    # Diffusers: a UNet of the gen encoder's width, a VAE, a non-default scheduler.
    vae = build_tiny_vae()
    vae.save_pretrained(root / "vae")
    build_decoder("tiny", GEN_WIDTH, in_channels=4).save_pretrained(root / "unet")
    build_decoder("tiny", 64, in_channels=4).save_pretrained(root / "unet-64")
    from diffusers import EulerDiscreteScheduler

    EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear").save_pretrained(root / "scheduler")
    return root


@pytest.fixture(scope="module")
def llama_checkpoint(components, tmp_path_factory):
    """Llama + full SigLIP + full CLIP + a UNet, VAE and scheduler from folders, in float32 (bitwise comparable)."""
    return assemble_checkpoint(
        llm=components / "llama",
        und_encoder=components / "siglip",
        gen_encoder=components / "clip",
        out_dir=tmp_path_factory.mktemp("assembled") / "llama",
        decoder=components / "unet",
        vae=components / "vae",
        scheduler=components / "scheduler",
        num_gen_tokens=NUM_GEN_TOKENS,
        dtype="float32",
    )


@pytest.fixture(scope="module")
def qwen_checkpoint(components, tmp_path_factory):
    """Qwen2 + vision-only SigLIP + CLIP + a fresh tiny decoder, through the command, in bfloat16, sharded."""
    out = tmp_path_factory.mktemp("assembled") / "qwen2"
    argv = ["convert", "assemble", "--llm", str(components / "qwen2"),
            "--und-encoder", str(components / "siglip-vision"), "--gen-encoder", str(components / "clip"),
            "--out", str(out), "--decoder-preset", "tiny",
            "--vae", str(components / "vae"), "--num-gen-tokens", str(NUM_GEN_TOKENS), "--max-shard-size", "100KB"]
    assert main(argv) == 0
    return out


def _weights(folder, prefix=""):
    """Every tensor of a (sharded) safetensors checkpoint folder whose name starts with `prefix`."""
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefix)})
    return tensors


# ---- weights ----


def test_llm_and_encoder_weights_are_bitwise_the_ones_given(components, llama_checkpoint):
    model = PiscesForConditionalGeneration.from_pretrained(llama_checkpoint)
    assert model.dtype == torch.float32
    state = model.state_dict()
    llama = _weights(components / "llama")
    old_vocab = llama["model.embed_tokens.weight"].shape[0]
    for key, tensor in llama.items():
        ours = state["model.language_model." + key[len("model."):]] if key.startswith("model.") else state[key]
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            ours = ours[:old_vocab]
        assert torch.equal(ours, tensor), key
    for folder, tower in (("siglip", "model.vision_tower."), ("clip", "model.gen_vision_tower.")):
        given = _weights(components / folder, "vision_model.")
        given = {key[len("vision_model."):]: value for key, value in given.items()
                 if not key.startswith("vision_model.head.")}
        ours = {key[len(tower):]: value for key, value in state.items() if key.startswith(tower)}
        assert set(ours) == set(given), folder
        for key, tensor in given.items():
            assert torch.equal(ours[key], tensor), (folder, key)
    # The SigLIP pooling head is dropped: Pisces takes patch features.
    assert model.config.vision_config.vision_use_head is False
    # Projectors and heads are fresh: initialised (std 0.02), not left empty.
    for module in (model.model.und_projector, model.model.gen_projector, model.gen_head):
        weight = module.linear_1.weight
        assert torch.isfinite(weight).all() and 0.01 < weight.std().item() < 0.03
        assert torch.equal(module.linear_1.bias, torch.zeros_like(module.linear_1.bias))


def test_new_token_rows_are_the_mean_of_the_original_ones(components, llama_checkpoint):
    model = PiscesForConditionalGeneration.from_pretrained(llama_checkpoint)
    processor = PiscesProcessor.from_pretrained(llama_checkpoint)
    llama = _weights(components / "llama")
    old_vocab = llama["model.embed_tokens.weight"].shape[0]
    ids = [processor.tokenizer.convert_tokens_to_ids(token) for token in PISCES_TOKENS]
    assert ids == list(range(old_vocab, old_vocab + 4))
    assert model.config.text_config.vocab_size == old_vocab + 4 == len(processor.tokenizer)
    for name, ours in (("model.embed_tokens.weight", model.get_input_embeddings().weight),
                       ("lm_head.weight", model.lm_head.weight)):
        assert ours.shape[0] == old_vocab + 4
        mean = llama[name].float().mean(dim=0)
        for row in ids:
            assert torch.equal(ours[row], mean), (name, row)
    config = model.config
    assert (config.image_token_id, config.boi_token_id, config.eoi_token_id, config.gen_token_id) == tuple(ids)


def test_qwen2_tied_padded_embeddings_and_bfloat16(components, qwen_checkpoint):
    model = PiscesForConditionalGeneration.from_pretrained(qwen_checkpoint)
    assert model.dtype == torch.bfloat16 and model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    qwen = _weights(components / "qwen2")
    embed = qwen["model.embed_tokens.weight"]
    tokenizer = PiscesProcessor.from_pretrained(qwen_checkpoint).tokenizer
    original_length = len(tokenizer) - 4
    # The padded matrix had room: the new tokens take padding rows and the vocabulary does not grow.
    assert model.config.text_config.vocab_size == embed.shape[0] > len(tokenizer)
    ids = tokenizer.convert_tokens_to_ids(PISCES_TOKENS)
    assert ids == list(range(original_length, original_length + 4))
    ours = model.get_input_embeddings().weight
    # Mean over the original tokens' rows (not the padding rows), in float32, then cast.
    mean = embed[:original_length].to(torch.bfloat16).float().mean(dim=0).to(torch.bfloat16)
    for row in ids:
        assert torch.equal(ours[row], mean)
    untouched = [row for row in range(embed.shape[0]) if row not in ids]
    assert torch.equal(ours[untouched], embed[untouched].to(torch.bfloat16))
    state = model.state_dict()
    for key, tensor in qwen.items():
        if key.startswith("model.") and key != "model.embed_tokens.weight":
            assert torch.equal(state["model.language_model." + key[len("model."):]], tensor.to(torch.bfloat16)), key
    vision = _weights(components / "siglip-vision")
    for key, tensor in vision.items():
        if not key.startswith("head."):  # a vision-only model saved by transformers 5: no vision_model. prefix
            assert torch.equal(state["model.vision_tower." + key], tensor.to(torch.bfloat16)), key


def test_diffusers_components_are_the_ones_given(components, llama_checkpoint):
    for name, source in (("decoder", "unet"), ("vae", "vae")):
        given = load_file(components / source / "diffusion_pytorch_model.safetensors")
        ours = load_file(llama_checkpoint / name / "diffusion_pytorch_model.safetensors")
        assert set(ours) == set(given)
        assert all(torch.equal(ours[key], given[key]) for key in given), name
    scheduler = json.loads((llama_checkpoint / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "EulerDiscreteScheduler"


# ---- tokenizer, processor, configs ----


def test_tokenizer_and_processor(components, llama_checkpoint, qwen_checkpoint):
    llama = PiscesProcessor.from_pretrained(llama_checkpoint)
    assert llama.tokenizer.pad_token == "<|finetune_right_pad_id|>" and llama.tokenizer.padding_side == "left"
    # No chat template in the source: the Llama 3 one is added, and images render as placeholders.
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    prompt = llama.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>user") and prompt.count("<image>") == 1
    assert llama.num_image_tokens == 16 and llama.num_gen_tokens == NUM_GEN_TOKENS

    qwen = PiscesProcessor.from_pretrained(qwen_checkpoint)
    assert qwen.tokenizer.pad_token == "<|endoftext|>"
    # Qwen's own template takes string content only: the processor gets the ChatML one that renders images.
    prompt = qwen.format_generation_prompt("a red circle")
    assert prompt == "<|im_start|>user\na red circle<|im_end|>\n<|im_start|>assistant\n<boi>"
    # The tokenizer shares that template; text-only chats render exactly as with Qwen's own.
    from transformers import AutoTokenizer

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "draw"}]
    original = AutoTokenizer.from_pretrained(components / "qwen2").apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True)
    assert qwen.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == original
    config = json.loads((qwen_checkpoint / "config.json").read_text())
    assert config["unconditional_input_ids"] == qwen.unconditional_input_ids
    assert config["gen_pool_size"] == 2
    generation = json.loads((qwen_checkpoint / "generation_config.json").read_text())
    vocab = qwen.tokenizer.get_vocab()
    assert vocab["<|im_end|>"] in np.atleast_1d(generation["eos_token_id"])
    assert set(generation["suppress_tokens"]) == {vocab["<image>"], vocab["<gen>"]}
    assert generation["pad_token_id"] == vocab["<|endoftext|>"]
    # The default guidance on the vectors is a generation setting, beside the text ones, not a model-config field.
    assert generation["gen_guidance_scale"] == DEFAULT_GEN_GUIDANCE_SCALE and "guidance_scale" not in generation
    assert "gen_guidance_scale" not in config


def test_the_folder_is_what_the_pipeline_saves(llama_checkpoint, tmp_path):
    pipe = PiscesPipeline.from_pretrained(llama_checkpoint)
    pipe.save_pretrained(tmp_path / "resaved")

    def listing(folder):
        return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())

    assert listing(llama_checkpoint) == listing(tmp_path / "resaved")
    for name in ("model_index.json", "config.json", "generation_config.json", "decoder/config.json"):
        ours = json.loads((llama_checkpoint / name).read_text())
        theirs = json.loads((tmp_path / "resaved" / name).read_text())
        for data in (ours, theirs):
            for key in ("_name_or_path", "_diffusers_version", "transformers_version"):
                data.pop(key, None)
            # Loading records the dtype in each sub-config too; a fresh save leaves it to the top level.
            for sub in ("text_config", "vision_config", "gen_vision_config"):
                data.get(sub, {}).pop("dtype", None)
        assert ours == theirs, name
    assert not any(path.suffix in (".bin", ".pt", ".pth") for path in llama_checkpoint.rglob("*"))


def test_large_outputs_are_sharded_and_load_with_device_map_auto(qwen_checkpoint):
    index = json.loads((qwen_checkpoint / "model.safetensors.index.json").read_text())
    shards = sorted(qwen_checkpoint.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {shard.name for shard in shards}
    model = AutoModelForImageTextToText.from_pretrained(qwen_checkpoint, device_map="auto")
    assert {p.device.type for p in model.parameters()} == {"cpu"} and model.dtype == torch.bfloat16
    reference = AutoModelForImageTextToText.from_pretrained(qwen_checkpoint)
    for (name, a), (_, b) in zip(reference.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name


# ---- every entry point ----


def _run_understanding(model, processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[PIL.Image.new("RGB", (40, 30), (255, 0, 0))], text=[text], return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 2


@pytest.mark.parametrize("checkpoint", ["llama_checkpoint", "qwen_checkpoint"])
def test_every_entry_point_loads_it(checkpoint, request):
    from diffusers import AutoPipelineForText2Image
    from transformers import pipeline

    folder = request.getfixturevalue(checkpoint)
    assert isinstance(AutoModel.from_pretrained(folder), PiscesModel)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    assert isinstance(model, PiscesForConditionalGeneration) and isinstance(processor, PiscesProcessor)
    _run_understanding(model, processor)

    pipe = PiscesPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert isinstance(image, PIL.Image.Image)
    auto = AutoPipelineForText2Image.from_pretrained(folder)
    assert type(auto) is PiscesPipeline

    text_to_image = pipeline("text-to-image", model=str(folder))
    assert isinstance(text_to_image("a red circle", num_inference_steps=2, seed=0)["image"], PIL.Image.Image)
    image_to_text = pipeline("image-text-to-text", model=str(folder))
    messages = [{"role": "user", "content": [{"type": "image", "image": PIL.Image.new("RGB", (32, 32))},
                                             {"type": "text", "text": "What is it?"}]}]
    assert image_to_text(text=messages, max_new_tokens=2)


def test_reader_casts_through_small_chunks_without_changing_a_value(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from pisces.conversion import assemble

    tensors = {"a": torch.randn(37, 11), "b": torch.arange(10), "c": torch.randn(()), "d": torch.randn(0, 3)}
    save_file(tensors, tmp_path / "w.safetensors")
    monkeypatch.setattr(assemble, "_CHUNK_BYTES", 64)  # many chunks, boundaries inside rows
    read = dict(assemble.read_safetensors(tmp_path / "w.safetensors", torch.bfloat16, extra_rows={"a": 2}))
    assert read["a"].shape == (39, 11) and torch.equal(read["a"][:37], tensors["a"].to(torch.bfloat16))
    assert torch.equal(read["b"], tensors["b"])  # integers keep their dtype
    assert torch.equal(read["c"], tensors["c"].to(torch.bfloat16)) and read["d"].shape == (0, 3)
    same = dict(assemble.read_safetensors(tmp_path / "w.safetensors"))
    assert all(torch.equal(same[key], value) for key, value in tensors.items())

    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(SourceError, match="cut.safetensors is truncated or corrupt: tensor"):
        list(assemble.read_safetensors(tmp_path / "cut.safetensors"))


# ---- choices and errors ----


def test_pool_size_follows_the_grid():
    config = SiglipVisionConfig(image_size=448, patch_size=14)  # 32x32 patches
    assert choose_gen_pool_size(config, 64) == 4 and choose_gen_pool_size(config, 1024) == 1
    with pytest.raises(ValueError, match=r"32x32 patch grid .* cannot be average-pooled into 100 tokens; choose "
                                         r"--num-gen-tokens from 1024, 256, 64, 16, 4, 1"):
        choose_gen_pool_size(config, 100)


def _assemble(components, tmp_path, **overrides):
    kwargs = dict(llm=components / "llama", und_encoder=components / "siglip", gen_encoder=components / "clip",
                  out_dir=tmp_path / "out", decoder_preset="tiny", num_gen_tokens=NUM_GEN_TOKENS)
    kwargs.update(overrides)
    return assemble_checkpoint(**kwargs)


def _no_weights(components, tmp_path):
    folder = tmp_path / "llama-config-only"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(components / "llama" / name, folder / name)
    return folder


def _pickle_only(components, tmp_path):
    folder = _no_weights(components, tmp_path)
    # Not a valid pickle at all: loading it would fail loudly, so passing shows it is never opened.
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 not a pickle, and never to be unpickled")
    return folder


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"llm": "clip"}, r"--llm .*clip: found a 'clip' checkpoint \(CLIPModel\), which is not a causal language "
                          r"model"),
        ({"llm": _no_weights}, r"--llm .*llama-config-only: found no weights, no \*\.safetensors file \(files: "
                               r"config.json, tokenizer.json, tokenizer_config.json\)"),
        ({"llm": _pickle_only}, r"--llm .*: found only pickle weights \(pytorch_model.bin\), which Pisces never "
                                r"unpickles"),
        ({"und_encoder": "clip"}, r"--und-encoder .*clip: found a 'clip' checkpoint \(CLIPModel\); expected one of "
                                  r"siglip, siglip_vision_model"),
        ({"gen_encoder": "llama"}, r"--gen-encoder .*llama: found a 'llama' checkpoint \(LlamaForCausalLM\)"),
        ({"und_encoder": "vae"}, r"--und-encoder .*vae: found a 'AutoencoderKL' checkpoint"),
        ({"decoder": "unet-64", "decoder_preset": None},
         r"--decoder .*unet-64: the decoder cross-attends to vectors of width 64 \(cross_attention_dim\), but the "
         r"generation encoder's vectors have width 48"),
        ({"decoder": "unet", "decoder_preset": None},
         r"the decoder takes 4 input channels, but it must take 3 pixel channels \(no --vae\)"),
        ({"num_gen_tokens": 10}, r"8x8 patch grid .* cannot be average-pooled into 10 tokens; choose --num-gen-tokens "
                                 r"from 64, 16, 4, 1"),
        ({"llm": "no-such-folder"}, r"--llm .*no-such-folder: no such folder, and not a Hub repo id"),
        ({"dtype": "int8"}, r"dtype must be one of bfloat16, float16, float32"),
    ],
)
def test_bad_sources_fail_naming_what_was_found(components, tmp_path, overrides, message):
    overrides = {
        key: value(components, tmp_path) if callable(value) else components / value if key in
        ("llm", "und_encoder", "gen_encoder", "decoder") and value is not None else value
        for key, value in overrides.items()
    }
    with pytest.raises(ValueError, match=message):
        _assemble(components, tmp_path, **overrides)
    # Nothing is left behind.
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_hub_ids_are_downloaded_first(components, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(components / repo_id.split("/")[1])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    out = _assemble(components, tmp_path, llm="meta-llama/llama", und_encoder="google/siglip",
                    gen_encoder="openai/clip")
    assert [repo for repo, _ in calls] == ["meta-llama/llama", "google/siglip", "openai/clip"]
    # Pickle files are never downloaded.
    assert all(not any(".bin" in pattern or pattern == "*" for pattern in patterns) for _, patterns in calls)
    assert (out / "model_index.json").is_file()


def test_diffusers_components_are_found_in_a_pipeline_folder(components, tmp_path):
    pipeline_folder = tmp_path / "sd-like"
    for source, sub in (("unet", "unet"), ("vae", "vae"), ("scheduler", "scheduler")):
        shutil.copytree(components / source, pipeline_folder / sub)
    (pipeline_folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    out = _assemble(components, tmp_path, decoder=pipeline_folder, decoder_preset=None, vae=pipeline_folder,
                    scheduler=pipeline_folder)
    given = load_file(components / "unet" / "diffusion_pytorch_model.safetensors")
    ours = load_file(out / "decoder" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(ours[key], given[key].to(torch.bfloat16)) for key in given)
    assert json.loads((out / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderKL"]


def test_offline_hub_id_fails_with_the_reason(components, tmp_path):
    with pytest.raises(SourceError, match=r"--llm meta-llama/Llama-3.1-8B-Instruct: not a local folder, and "
                                          r"downloading it from the Hub failed"):
        _assemble(components, tmp_path, llm="meta-llama/Llama-3.1-8B-Instruct")


def test_the_output_folder_must_be_new(components, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists and is not an empty folder"):
        _assemble(components, tmp_path)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_command_errors_are_one_line(components, tmp_path, capsys):
    argv = ["convert", "assemble", "--llm", str(components / "clip"), "--und-encoder", str(components / "siglip"),
            "--gen-encoder", str(components / "clip"), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pisces: error: --llm") and "not a causal language model" in err and "\n" not in err
