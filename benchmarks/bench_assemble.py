"""Peak memory of `assemble_checkpoint` against the size of the checkpoint it writes.

The components are built locally with their real classes and saved as float32 safetensors, the way a user downloads
them: a Llama-shaped LLM (hidden 1024, 16 layers, 32k vocabulary: about 270M parameters), a SigLIP-B/16-shaped
understanding encoder (full SiglipModel, text tower included) and a CLIP-B/16-shaped generation encoder (full
CLIPModel), about 1.9 GB on disk in all, plus a tiny VAE. The assembly runs in a fresh subprocess, which reports
its peak resident set (`ru_maxrss`) and its resident set after the imports, before any weight is touched. The written
size is the sum of the `*.safetensors` files in the output folder.

Run: `python benchmarks/bench_assemble.py [--dtype bfloat16|float32] [--workdir DIR] [--keep]`.
The floor: peak memory under 1.5x the written checkpoint (the assembly's own memory: peak minus the imports).
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


LLM = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
           num_key_value_heads=16, max_position_embeddings=2048, tie_word_embeddings=False)
VOCAB = 32000
VIT_B = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16)
TEXT = dict(vocab_size=32000, hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8)
FLOOR = 1.5


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build_components(root: Path) -> dict:
    """Saves the components under `root` (float32 safetensors) and returns their folders and total size."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        CLIPConfig,
        CLIPModel,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        SiglipConfig,
        SiglipModel,
    )

    from pisces.conversion import build_tiny_vae

    torch.manual_seed(0)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<|finetune_right_pad_id|>"]
    # A 32k vocabulary without training: the byte alphabet and made-up pieces (never produced without merges, which is
    # fine here: only the vocabulary size matters for memory).
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    pieces = sorted(alphabet) + [f"piece{i}" for i in range(VOCAB - len(alphabet) - len(specials))]
    tokenizer = Tokenizer(models.BPE(vocab={piece: i for i, piece in enumerate(pieces)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=specials[0], eos_token=specials[1])
    assert len(tokenizer) == VOCAB

    folders = {name: root / name for name in ("llm", "siglip", "clip", "vae")}
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, bos_token_id=tokenizer.bos_token_id,
                                       eos_token_id=tokenizer.eos_token_id, **LLM))
    llm.save_pretrained(folders["llm"])
    tokenizer.save_pretrained(folders["llm"])
    del llm
    SiglipModel(SiglipConfig(text_config=TEXT, vision_config=dict(VIT_B, image_size=224))).save_pretrained(
        folders["siglip"]
    )
    CLIPModel(CLIPConfig(text_config=TEXT, vision_config=dict(VIT_B, image_size=256))).save_pretrained(folders["clip"])
    build_tiny_vae().save_pretrained(folders["vae"])
    size = sum(file.stat().st_size for file in root.rglob("*.safetensors"))
    return {"folders": {name: str(path) for name, path in folders.items()}, "bytes": size}


def child(args) -> None:
    """Runs one assembly and prints its memory figures as JSON (the subprocess side)."""
    import pisces  # noqa: F401
    from pisces.conversion import assemble_checkpoint

    folders = json.loads(args.child)
    baseline = _rss_mib()
    start = time.perf_counter()
    out = assemble_checkpoint(
        llm=folders["llm"], und_encoder=folders["siglip"], gen_encoder=folders["clip"], out_dir=args.out,
        vae=folders["vae"], decoder_preset="tiny", num_gen_tokens=64, dtype=args.dtype, max_shard_size="500MB",
    )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    written = sum(file.stat().st_size for file in Path(out).rglob("*.safetensors"))
    print(json.dumps({"baseline_mib": baseline, "peak_mib": peak, "written_bytes": written, "seconds": seconds}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--workdir", help="where to build the components (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the components and the output")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-assemble-"))
    work.mkdir(parents=True, exist_ok=True)
    manifest = work / "components.json"
    if manifest.is_file():
        components = json.loads(manifest.read_text())
    else:
        components = build_components(work / "components")
        manifest.write_text(json.dumps(components))
    out = work / f"assembled-{args.dtype}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    result = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(components["folders"]), "--out", str(out),
         "--dtype", args.dtype],
        check=True, capture_output=True, text=True,
    )
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    written_mib = figures["written_bytes"] / 2**20
    own = figures["peak_mib"] - figures["baseline_mib"]
    print(f"components (float32 safetensors): {components['bytes'] / 2**20:8.0f} MiB")
    print(f"written checkpoint ({args.dtype}):  {written_mib:8.0f} MiB")
    print(f"after imports (baseline RSS):      {figures['baseline_mib']:8.0f} MiB")
    print(f"peak RSS of the process:           {figures['peak_mib']:8.0f} MiB  "
          f"= {figures['peak_mib'] / written_mib:.2f}x the written checkpoint")
    print(f"assembly's own peak (peak - base): {own:8.0f} MiB  = {own / written_mib:.2f}x the written checkpoint "
          f"(floor {FLOOR}x: {'pass' if own / written_mib < FLOOR else 'FAIL'})")
    print(f"time: {figures['seconds']:.1f} s")
    if not args.keep and not args.workdir:
        import shutil

        shutil.rmtree(work)
    return 0 if own / written_mib < FLOOR else 1


if __name__ == "__main__":
    sys.exit(main())
